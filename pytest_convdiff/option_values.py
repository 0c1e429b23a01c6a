"""How each option's value is read: one parser per kind of value, named by the options table.

The table (``plugin/options.py``) is loaded in every pytest run and imports nothing but pytest; it names
its parsers here by string, and this module is imported only once a convdiff option is in play. A parser
takes the raw value (command-line text, an ini string or line list, a bool for flags) and returns the
typed value, or raises ValueError / ConvdiffError saying what is wrong; the caller adds the option's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["PARSERS", "parse"]


def text(raw: Any) -> str:
    return str(raw)


def texts(raw: Any) -> list[str]:
    """A repeatable option's values (command line or ini lines), blanks dropped."""
    return [str(v) for v in raw if str(v).strip()]


def flag(raw: Any) -> bool:
    return bool(raw)


def negated(raw: Any) -> bool:
    """A ``--convdiff-no-X`` flag sets the setting X to False."""
    return not raw


def path(raw: Any) -> Path:
    return Path(os.path.expanduser(str(raw)))


def directory(raw: Any) -> Path:
    """A directory that may not exist yet, but is not a file."""
    p = path(raw)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} exists and is not a directory.")
    return p


def _int_at_least(minimum: int):
    def parse(raw: Any) -> int:
        try:
            v = int(str(raw).strip())
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {raw!r}")
        return v

    return parse


def backend(raw: Any) -> str:
    from .backends import normalize_backend_name

    return normalize_backend_name(str(raw))


def backend_items(raw: Any) -> dict[str, str]:
    """``KEY=VALUE`` items as text; typed per model once its backend is known (``validate_options``)."""
    from .backends.options import parse_option_items

    return parse_option_items(raw or [])


def bounds(raw: Any) -> dict[str, float]:
    from . import checks

    out: dict[str, float] = {}
    for item in raw or []:
        out.update(checks.parse_bound_overrides(str(item)))
    return out


def corpus(raw: Any) -> Any:
    from .core.corpus import load_corpus

    return load_corpus(str(raw))


def cache_dtype(raw: Any) -> str:
    from .core.settings import cache_dtype_name

    return cache_dtype_name(str(raw))


def store(raw: Any) -> str:
    from .core.settings import store_name

    return store_name(str(raw))


def runtime_twin(raw: Any) -> str:
    from .core.settings import runtime_twin_name

    return runtime_twin_name(str(raw))


def imatrix(raw: Any) -> str:
    """The path of a readable importance matrix (read once now, so a wrong file stops the run at start-up)."""
    from .backends.imatrix import read

    p = os.path.expanduser(str(raw))
    read(p)
    return p


def size(raw: Any) -> Any:
    from .store.budget import parse_size

    return parse_size(raw)


def tolerances(raw: Any) -> Any:
    from .store.baseline_file import parse_tolerances

    return parse_tolerances(str(raw))


PARSERS = {
    "text": text, "texts": texts, "flag": flag, "negated": negated, "path": path, "directory": directory,
    "int>=0": _int_at_least(0), "int>=1": _int_at_least(1), "int>=2": _int_at_least(2),
    "backend": backend, "backend_items": backend_items, "bounds": bounds, "corpus": corpus,
    "cache_dtype": cache_dtype, "store": store, "runtime_twin": runtime_twin, "imatrix": imatrix,
    "size": size, "tolerances": tolerances,
}


def parse(kind: str, raw: Any) -> Any:
    """``raw`` read by the parser called ``kind``; a value that was not given (None, "", []) stays None."""
    if raw is None or raw == "" or raw == []:
        return None
    return PARSERS[kind](raw)
