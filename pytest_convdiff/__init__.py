"""pytest-convdiff: does the converted model still compute what the original did, and where does it stop?

The library works without pytest (``from pytest_convdiff import compare``); the
plugin in ``pytest_convdiff.plugin`` turns its results into test items. Importing
this package loads numpy only: backends import torch, llama.cpp or exllamav2
when a model of their kind is actually run.
"""

from __future__ import annotations

from .bounds import DEFAULT_BOUNDS, Bounds, precision_class
from .compare import CheckResult, PairResult, compare, evaluate, plan_checks
from .corpus import Corpus, Prompt, default_corpus, load_corpus
from .errors import ConvdiffError, CorpusError, MissingDependencyError, ModelLoadError
from .runner import ModelRun, ModelSpec, RunSettings, run_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BOUNDS",
    "Bounds",
    "CheckResult",
    "ConvdiffError",
    "Corpus",
    "CorpusError",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelRun",
    "ModelSpec",
    "PairResult",
    "Prompt",
    "RunSettings",
    "compare",
    "default_corpus",
    "evaluate",
    "load_corpus",
    "plan_checks",
    "precision_class",
    "run_model",
]
