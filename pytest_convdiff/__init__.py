"""pytest-convdiff: does the converted model still compute what the original did, and where does it stop?

The library works without pytest (``from pytest_convdiff import compare``); the plugin in
``pytest_convdiff.plugin`` maps its results onto test items. Layout:

- ``core/``: corpus, bounds, metrics, the typed result schema (no models, no pytest);
- ``checks/``: one module per check family (its items, bounds, evaluation, messages);
- ``backends/``: one module per backend (its options and capabilities);
- ``store/``: cache entries, golden references, baselines, atomic writes;
- ``runner.py`` (one model over the corpus) and ``comparison.py`` (the pair pipeline: ``Comparison`` and ``compare``);
- ``reporting/``: terminal, JSON, JUnit, Markdown, HTML and plots from one schema;
- ``plugin/``: the pytest glue.

Names are imported on first use, so that the pytest plugin, which is loaded in every pytest run
where this package is installed, costs nothing until a convdiff option is given.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Bounds": "core.bounds",
    "CheckResult": "core.results",
    "PairResult": "core.results",
    "Corpus": "core.corpus",
    "Prompt": "core.corpus",
    "default_corpus": "core.corpus",
    "load_corpus": "core.corpus",
    "precision_class": "core.bounds",
    "Comparison": "comparison",
    "compare": "comparison",
    "evaluate": "comparison",
    "ConvdiffError": "errors",
    "CorpusError": "errors",
    "MissingDependencyError": "errors",
    "ModelLoadError": "errors",
    "ModelRun": "runner",
    "ModelSpec": "runner",
    "RunSettings": "core.settings",
    "run_model": "comparison",
    "default_bounds": "checks",
    "plan_all": "checks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_convdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
