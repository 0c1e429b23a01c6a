"""One code-version scheme for every cache key: a digest of the source of the modules a stored result
was computed by, and of the versions of the libraries it depends on.

A stored result (a compact summary of A, a pair's metrics, a family's measurement) is reused only by the
code that made it. Each producer names the modules and libraries its result depends on; editing any of
those files, or upgrading one of those libraries, changes the key and the result is recomputed. There
are no hand-bumped version numbers to forget.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterable
from functools import cache
from importlib import metadata

__all__ = ["code_digest"]


@cache
def _module_source(name: str) -> bytes:
    """The bytes of module ``name``'s source file (a module without one contributes its name only)."""
    module = importlib.import_module(name)
    path = getattr(module, "__file__", None)
    if not path:
        return name.encode()
    with open(path, "rb") as fh:
        return fh.read()


def _library_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def code_digest(modules: Iterable[str], libraries: Iterable[str] = ()) -> str:
    """16 hex digits over the named modules' sources and the installed versions of ``libraries``
    (distribution names, e.g. ``transformers``, ``llama-cpp-python``), in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode() + b"\0" + _module_source(name) + b"\0")
    for dist in sorted(set(libraries)):
        h.update(f"{dist}=={_library_version(dist)}\0".encode())
    return h.hexdigest()[:16]
