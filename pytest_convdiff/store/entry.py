"""What every stored run looks like to its readers, wherever its arrays live.

A model's outputs over a corpus are either a cache entry (a directory of ``.npy`` files) or a
golden reference (one safetensors file). ``ModelRun`` and everything above it read them through
this interface only, so a reference stands in for a cache entry without either knowing the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Entry(Protocol):
    """One model's stored outputs: named arrays plus the run's metadata.

    ``meta["files"]`` names every array the entry holds (what each name maps to is the store's
    own business). ``identity`` changes whenever the served bytes could differ, so results derived
    from an entry (the pair metrics in the cache's ``pairs/``) are keyed by it.
    """

    @property
    def path(self) -> Path: ...

    @property
    def meta(self) -> dict[str, Any]: ...

    @property
    def identity(self) -> str: ...

    def has(self, name: str) -> bool: ...

    def array(self, name: str) -> np.ndarray:
        """The array, memory-mapped read-only: a corpus of logits is never all in memory."""
        ...
