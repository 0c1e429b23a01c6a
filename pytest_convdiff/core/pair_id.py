"""One way to name a pair: ``<A's file or directory name>-vs-<B's>``, made safe for node ids and file names.

A pair id keys cached documents, baselines, report sections, plot files and xdist groups, so the command
line, manifests and the library must all spell it the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["pair_id", "safe_id", "unique_pair_ids"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def safe_id(text: str, empty: str = "pair") -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9_.+-]`` replaced by ``_``."""
    return _UNSAFE.sub("_", text) or empty


def pair_id(a: str, b: str) -> str:
    """The id of the pair (A, B) from their paths' last parts."""
    return f"{safe_id(Path(str(a)).name, 'A')}-vs-{safe_id(Path(str(b)).name, 'B')}"


def unique_pair_ids(a: str, bs: Iterable[str]) -> list[str]:
    """``pair_id(a, b)`` for each B, with ``-2``, ``-3``... added where two Bs have the same name."""
    ids: list[str] = []
    for b in bs:
        base = pair_id(a, b)
        candidate, n = base, 2
        while candidate in ids:
            candidate, n = f"{base}-{n}", n + 1
        ids.append(candidate)
    return ids
