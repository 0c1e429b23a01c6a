"""Exceptions that carry a message meant for the person running the checks."""

from __future__ import annotations

import traceback
from pathlib import Path


class ConvdiffError(Exception):
    """Base class: the message is the whole story (which file, what is wrong, what to do)."""


class ModelLoadError(ConvdiffError):
    """A model could not be found, recognised, or loaded."""


class MissingDependencyError(ModelLoadError):
    """An optional backend library is not installed."""

    def __init__(self, backend: str, package: str, extra: str) -> None:
        super().__init__(
            f"The {backend} backend needs {package}, which is not installed: "
            f"pip install 'pytest-convdiff[{extra}]'."
        )
        self.backend = backend
        self.extra = extra


class CorpusError(ConvdiffError):
    """The evaluation corpus is missing, empty, or malformed."""


class ContextLengthError(ConvdiffError):
    """A prompt is longer than a backend can take in one sequence."""


class CacheError(ConvdiffError):
    """The cache could not be written (disk full, permissions)."""


def describe_failure(exc: BaseException, stage: str) -> str:
    """One readable paragraph for an exception that stopped a pair.

    A ``ConvdiffError`` already says what is wrong and what to do. A backend's runtime failure
    (RuntimeError, OSError, MemoryError: CUDA out of memory, llama_decode failing) is the backend's
    word, not a bug here. Anything else is a bug, reported with where it happened.
    """
    if isinstance(exc, ConvdiffError):
        return str(exc)
    if isinstance(exc, (RuntimeError, OSError, MemoryError)):
        return f"{stage} failed: {type(exc).__name__}: {exc}"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return (f"unexpected {type(exc).__name__} while {stage}: {exc}{at}. This is a bug in a backend or in "
            "pytest-convdiff; please report it with this message.")
