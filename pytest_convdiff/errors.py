"""Exceptions that carry a message meant for the person running the checks."""

from __future__ import annotations


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
