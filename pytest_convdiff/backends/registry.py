"""The backend registry: every backend is one module that exports one declaration, ``BACKEND``.

A ``BackendSpec`` says everything the rest of the package needs to know about a backend without
loading a model: its name and aliases, how to recognise a path it runs (``detect``), its options and
capabilities, the option that picks a GPU, how to read its weights for the ``weights`` check and its
configuration for the ``config`` check. The module itself provides ``probe``, ``load`` and
``fingerprint_files``; they are looked up on the module when called, so the backend's library (torch,
llama_cpp, exllamav2) is imported only in ``load``.

Backends are found in two places: the modules of this package (``BUILTIN``), and the entry-point group
``pytest_convdiff.backends``, whose entries name either a module that exports ``BACKEND`` or a
``BackendSpec`` itself. A third-party package adds a backend with, in its pyproject.toml::

    [project.entry-points."pytest_convdiff.backends"]
    mlx = "convdiff_mlx.backend"

Nothing here imports a backend library, and the registry is built on first use, not at import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelLoadError

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "BackendSpec", "all_specs", "claimant", "detect_backend", "get",
           "register", "unregister"]

ENTRY_POINT_GROUP = "pytest_convdiff.backends"
BUILTIN = ("pytest_convdiff.backends.hf", "pytest_convdiff.backends.llamacpp", "pytest_convdiff.backends.exl2")


@dataclass(frozen=True)
class BackendSpec:
    """One backend, as the registry, the options and the checks see it.

    ``module`` holds ``probe(path, options) -> ModelInfo``, ``load(path, options) -> Backend``,
    ``fingerprint_files(path)``, optionally ``library_version()``, and the tuples ``OPTIONS``
    (``BackendOption``) and ``CAPABILITIES`` (constants of ``backends.base``). ``detect(path) -> bool`` must be cheap (a header or a config
    read); among the backends that claim a path, the highest ``priority`` wins, so a specific format
    (an EXL2 directory) is tried before a generic one (any transformers directory). ``gpu_option`` is the
    option that picks a GPU and ``gpu_value`` spells GPU ``i`` in it (``device_options``).
    ``open_weights(path, options, role)`` returns a ``backends.tensors.Source`` over the model's tensors,
    or raises ``WeightsUnreadable`` saying why the ``weights`` check cannot read them; None: never.
    ``read_config(path, options)`` returns the model's normalised configuration record for the ``config``
    check (fields in ``core.config_fields``'s vocabulary, each with the file and key it came from), as
    ``hf_config.read_hf_dir`` and ``gguf_config.read_gguf`` do: cheap (config files and headers, no model);
    None: the backend has no configuration the config check can read (its items skip, saying so).
    """

    name: str
    module: str
    aliases: tuple[str, ...] = ()
    detect: Callable[[Path], bool] | None = None
    priority: int = 0
    gpu_option: str | None = None
    gpu_value: Callable[[int], Any] | None = None
    open_weights: Callable[[Path, dict[str, Any], str], Any] | None = None
    read_config: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None

    def load_module(self) -> ModuleType:
        """The module with ``probe``/``load``/``fingerprint_files`` (cheap: backend libraries load in ``load``)."""
        return importlib.import_module(self.module)

    @property
    def options(self) -> tuple[Any, ...]:
        return tuple(getattr(self.load_module(), "OPTIONS", ()))

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(getattr(self.load_module(), "CAPABILITIES", frozenset()))

    def hint(self, topic: str, **fields: str) -> str:
        """What the backend tells a user whose model fails ``topic`` (a check family's name): its module's
        ``HINTS[topic]``, formatted with ``fields``; empty when it has none."""
        text = dict(getattr(self.load_module(), "HINTS", {})).get(topic, "")
        return text.format(**fields) if text else ""

    def library_version(self) -> str | None:
        """The backend library's version (part of every run's cache key); None when the module does not say."""
        fn = getattr(self.load_module(), "library_version", None)
        return fn() if callable(fn) else None


_EXTRA: dict[str, BackendSpec] = {}  # registered at run time (tests, benchmarks, notebooks)


def _spec_of(obj: Any, origin: str) -> BackendSpec:
    spec = getattr(obj, "BACKEND", obj)
    if not isinstance(spec, BackendSpec):
        raise TypeError(f"{origin}: expected a BackendSpec or a module exporting BACKEND, got {type(obj).__name__}")
    return spec


@lru_cache(maxsize=1)
def _discovered() -> dict[str, BackendSpec]:
    """The built-in backends, then those of installed packages' entry points (a built-in name wins)."""
    out: dict[str, BackendSpec] = {}
    for name in BUILTIN:
        spec = _spec_of(importlib.import_module(name), name)
        out[spec.name] = spec
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = _spec_of(ep.load(), f"entry point {ep.name} = {ep.value}")
        except Exception as exc:  # a broken third-party backend must not break the others
            raise ModelLoadError(
                f"the backend entry point {ep.name!r} ({ep.value}, group {ENTRY_POINT_GROUP}) cannot be loaded: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall the package that provides it.") from None
        out.setdefault(spec.name, spec)
    return out


def all_specs() -> dict[str, BackendSpec]:
    """Every known backend by canonical name."""
    return {**_discovered(), **_EXTRA}


def refresh() -> None:
    """Discover the installed backends again (after a package was installed in this process)."""
    _discovered.cache_clear()


def register(spec: BackendSpec) -> None:
    """Add a backend for this process (what an entry point does for an installed package)."""
    _EXTRA[spec.name] = spec


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def get(name: str) -> BackendSpec:
    """The backend called ``name`` or one of its aliases (any case); ValueError listing the known ones."""
    specs = all_specs()
    key = name.strip().lower()
    for spec in specs.values():
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(sorted(specs))}")


def claimant(path: str | os.PathLike[str]) -> BackendSpec | None:
    """The backend that runs this path (the highest-priority claim); None when it does not exist or no
    backend claims it. A ``detect`` that cannot read the path (a broken config.json) raises."""
    p = Path(path)
    if not p.exists():
        return None
    claims = sorted((s for s in all_specs().values() if s.detect is not None and s.detect(p)),
                    key=lambda s: -s.priority)
    return claims[0] if claims else None


def detect_backend(path: str | os.PathLike[str]) -> str:
    """Which backend runs this path, from what it is (not only its name); ModelLoadError saying what it is not."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"{p}: no such file or directory. Pass a transformers checkpoint directory, "
            "a .gguf file, an EXL2 directory, or (as model A) a saved convdiff reference or a llama-perplexity "
            "base file."
        )
    spec = claimant(p)
    if spec is not None:
        _check_gguf_version(p)
        return spec.name
    raise ModelLoadError(_not_recognised(p))


def _check_gguf_version(p: Path) -> None:
    """A GGUF whose header claims a version this build cannot read is refused before anything loads."""
    from .gguf_header import GGUF_MAGIC, header_version, version_problem

    if not p.is_file():
        return
    with p.open("rb") as fh:
        head = fh.read(8)
    if head[:4] == GGUF_MAGIC and len(head) == 8:
        problem = version_problem(p, header_version(head))
        if problem:
            raise ModelLoadError(problem)


def _not_recognised(p: Path) -> str:
    """Why no backend claims ``p``, with what to pass instead."""
    from .gguf_header import GGUF_MAGIC
    from .hfdir import quant_method, read_json

    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else ""
            return (f"{p}: a directory but not a model: it has no config.json "
                    f"(a transformers or EXL2 checkpoint needs one).{hint}")
        method = quant_method(read_json(cfg))
        return (f"{p}: a checkpoint quantised by {method!r}, which no installed backend runs (known backends: "
                f"{', '.join(sorted(all_specs()))}). Install a package that provides a backend for it "
                f"(entry-point group {ENTRY_POINT_GROUP}) or pass --convdiff-backend-a/-b.")
    with p.open("rb") as fh:
        head = fh.read(8)
    if p.suffix == ".gguf" and head[:4] != GGUF_MAGIC:
        return (f"{p}: named .gguf but does not start with the GGUF magic bytes "
                f"(found {head[:4]!r}); the file is damaged or not a GGUF. Re-download or re-convert it.")
    if p.name == "config.json":
        return f"{p}: pass the checkpoint directory ({p.parent}), not its config.json."
    return (f"{p}: not a model this plugin recognises. Pass a transformers checkpoint directory "
            "(with config.json), a .gguf file, an EXL2 directory, or (as model A) a saved convdiff reference or a "
            "llama-perplexity base file.")
