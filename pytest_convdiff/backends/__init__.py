"""Backends: recognise a model path, probe it cheaply, open it lazily.

Each backend is one module that exports one declaration, ``BACKEND`` (a ``registry.BackendSpec``), and
provides ``probe(path) -> ModelInfo`` (no heavy imports: config and header reads only),
``fingerprint_files(path)`` and ``load(path, options) -> Backend``, with ``OPTIONS`` (see :mod:`.options`)
and ``CAPABILITIES`` (constants in :mod:`.base`). The registry (:mod:`.registry`) finds the built-in ones
and those of installed packages (entry-point group ``pytest_convdiff.backends``). Backend libraries are
imported only in ``load``, so ``import pytest_convdiff`` never pulls in torch, llama.cpp or exllamav2.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelLoadError
from . import registry
from .base import Backend, ForwardOutput, ModelInfo
from .options import BackendOption, validate_options
from .registry import BackendSpec, detect_backend

__all__ = [
    "Backend",
    "BackendOption",
    "BackendSpec",
    "ForwardOutput",
    "ModelInfo",
    "backend_capabilities",
    "backend_module",
    "backend_options",
    "detect_backend",
    "device_options",
    "normalize_backend_name",
    "open_backend",
    "probe_model",
    "validate_options",
]


def normalize_backend_name(name: str) -> str:
    """Canonical backend name, or ValueError listing the known ones."""
    return registry.get(name).name


def backend_module(name: str) -> ModuleType:
    """The backend's module; cheap (backend modules import their libraries only in ``load``)."""
    return registry.get(name).load_module()


def backend_options(name: str) -> tuple[BackendOption, ...]:
    """The options a backend declares (``--convdiff-option-a/-b KEY=VALUE``, manifest ``options_a/b``)."""
    return registry.get(name).options


def backend_capabilities(name: str) -> frozenset[str]:
    """What a backend can do beyond logits: ``base.HIDDEN_STATES``, ``SUBBLOCKS``, ``LAYER_SWAP``,
    ``INCREMENTAL_DECODE``."""
    return registry.get(name).capabilities


def device_options(backend: str, gpu_index: int, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with the backend's GPU-selecting option set to ``gpu_index``, unless the user chose already.

    How a run spreads models over GPUs (an xdist worker per GPU) without setting
    ``CUDA_VISIBLE_DEVICES`` in-process. A plain ``device=cuda`` (a GPU, but not which) becomes
    ``cuda:N``, and so does transformers' default ``auto``. Otherwise what counts as the user's choice:
    transformers, ``cpu`` or ``cuda:N``; llama.cpp, ``main_gpu`` (harmless when no layers are offloaded);
    exllamav2, ``device`` or ``gpu_split``. The option and its spelling are each backend's declaration (``gpu_option``).
    Returns a new dict; the input's values are kept as given (validate them with ``validate_options``).
    """
    spec = registry.get(backend)
    out = dict(options or {})
    if spec.gpu_option is None or spec.gpu_value is None:
        return out
    if gpu_index < 0:
        raise ValueError(f"gpu_index must be >= 0, not {gpu_index}")
    key, spell = spec.gpu_option, spec.gpu_value
    current = out.get(key)
    if isinstance(current, str) and current.strip().lower() in ("cuda", "auto"):  # a GPU, but not which one
        out[key] = spell(gpu_index)
    elif current is None and out.get("gpu_split") is None:
        out[key] = spell(gpu_index)
    return out


def probe_model(path: str | os.PathLike[str], backend: str | None = None) -> ModelInfo:
    """Cheap facts about a model (layers, vocabulary) without loading weights."""
    name = normalize_backend_name(backend) if backend else detect_backend(path)
    if not Path(path).exists():
        detect_backend(path)  # raises the readable error
    return backend_module(name).probe(Path(path))


def open_backend(path: str | os.PathLike[str], backend: str | None = None,
                 options: dict[str, Any] | None = None, *, as_tools: bool = False) -> Backend:
    """Load a model. Raises ModelLoadError / MissingDependencyError with a readable message. ``as_tools``: with
    the options the runtime's own command-line tools default to (``TOOL_DEFAULTS``), where ``options`` set none."""
    name = normalize_backend_name(backend) if backend else detect_backend(path)
    if as_tools:
        options = {**getattr(backend_module(name), "TOOL_DEFAULTS", {}), **(options or {})}
    try:
        typed = validate_options(name, options)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return backend_module(name).load(Path(path), typed)
