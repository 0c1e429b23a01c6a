"""What can be known about a model without running it: a record the backends fill and the store keeps.

It lives in ``core`` because both sides use it: a backend's ``probe`` returns one, and a golden
reference (``store/reference.py``) holds one in its header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelInfo"]


@dataclass
class ModelInfo:
    """What can be known about a model without running it (cheap: config/header reads only)."""

    path: str
    backend: str
    architecture: str | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    dtype: str | None = None
    library_version: str | None = None
    quantization: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None  # the longest sequence this backend will take, as configured

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}
