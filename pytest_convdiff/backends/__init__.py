"""Backend registry: recognise a model path, probe it cheaply, open it lazily.

Each backend lives in its own module, imported only when a model of that kind is
used, so ``import pytest_convdiff`` never pulls in torch, llama.cpp or exllamav2.
Each module provides ``probe(path) -> ModelInfo`` (no heavy imports: config and
header reads only), ``fingerprint_files(path)`` and ``load(path, options) -> Backend``,
and declares ``OPTIONS`` (what ``options`` may hold, see :mod:`.options`) and
``CAPABILITIES`` (what it can do beyond logits, constants in :mod:`.base`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelLoadError
from .base import Backend, ForwardOutput, ModelInfo
from .hfdir import quant_method, read_json
from .options import BackendOption, validate_options

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendOption",
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

BACKENDS: dict[str, str] = {
    "transformers": "pytest_convdiff.backends.hf",
    "llama.cpp": "pytest_convdiff.backends.llamacpp",
    "exllamav2": "pytest_convdiff.backends.exl2",
}

_ALIASES = {
    "hf": "transformers",
    "huggingface": "transformers",
    "torch": "transformers",
    "llamacpp": "llama.cpp",
    "llama-cpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "gguf": "llama.cpp",
    "exl2": "exllamav2",
}

GGUF_MAGIC = b"GGUF"


def normalize_backend_name(name: str) -> str:
    """Canonical backend name, or ValueError listing the known ones."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown backend {name!r}; known backends: {known}")
    return key


def backend_module(name: str) -> ModuleType:
    """The backend's module; cheap (backend modules import their libraries only in ``load``)."""
    return importlib.import_module(BACKENDS[normalize_backend_name(name)])


def backend_options(name: str) -> tuple[BackendOption, ...]:
    """The options a backend declares (``--convdiff-option-a/-b KEY=VALUE``, manifest ``options_a/b``)."""
    return tuple(getattr(backend_module(name), "OPTIONS", ()))


def backend_capabilities(name: str) -> frozenset[str]:
    """What a backend can do beyond logits: ``base.HIDDEN_STATES``, ``SUBBLOCKS``, ``LAYER_SWAP``,
    ``INCREMENTAL_DECODE``."""
    return frozenset(getattr(backend_module(name), "CAPABILITIES", frozenset()))


# Per backend: the option that picks a GPU, and how a GPU index is written in it.
_GPU_OPTION: dict[str, tuple[str, Callable[[int], Any]]] = {
    "transformers": ("device", lambda i: f"cuda:{i}"),
    "llama.cpp": ("main_gpu", lambda i: i),
    "exllamav2": ("device", lambda i: f"cuda:{i}"),
}


def device_options(backend: str, gpu_index: int, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with the backend's GPU-selecting option set to ``gpu_index``, unless the user chose already.

    How a run spreads models over GPUs (an xdist worker per GPU) without setting
    ``CUDA_VISIBLE_DEVICES`` in-process. A plain ``device=cuda`` (a GPU, but not which) becomes
    ``cuda:N``. Otherwise what counts as the user's choice: transformers, any ``device`` (``cpu``
    stays on the CPU, and so does an unset device: moving a CPU reference onto a GPU would change its
    numerics); llama.cpp, ``main_gpu`` (harmless when no layers are offloaded); exllamav2, ``device``
    or ``gpu_split``.
    Returns a new dict; the input's values are kept as given (validate them with ``validate_options``).
    """
    name = normalize_backend_name(backend)
    out = dict(options or {})
    if name not in _GPU_OPTION:
        return out
    if gpu_index < 0:
        raise ValueError(f"gpu_index must be >= 0, not {gpu_index}")
    key, spell = _GPU_OPTION[name]
    current = out.get(key)
    if isinstance(current, str) and current.strip().lower() == "cuda":  # a GPU, but not which one
        out[key] = spell(gpu_index)
    elif current is None and name != "transformers" and out.get("gpu_split") is None:
        out[key] = spell(gpu_index)
    return out


def detect_backend(path: str | os.PathLike[str]) -> str:
    """Which backend runs this path, from what it is (not only its name)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"{p}: no such file or directory. Pass a transformers checkpoint directory, "
            "a .gguf file, an EXL2 directory or a saved convdiff reference."
        )
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else ""
            raise ModelLoadError(
                f"{p}: a directory but not a model: it has no config.json "
                f"(a transformers or EXL2 checkpoint needs one).{hint}"
            )
        if quant_method(read_json(cfg)) == "exl2":
            return "exllamav2"
        return "transformers"
    with p.open("rb") as fh:
        head = fh.read(8)
    if head[:4] == GGUF_MAGIC:
        return "llama.cpp"
    if p.suffix == ".gguf":
        raise ModelLoadError(
            f"{p}: named .gguf but does not start with the GGUF magic bytes "
            f"(found {head[:4]!r}); the file is damaged or not a GGUF. Re-download or re-convert it."
        )
    if p.name == "config.json":
        raise ModelLoadError(f"{p}: pass the checkpoint directory ({p.parent}), not its config.json.")
    raise ModelLoadError(
        f"{p}: not a model this plugin recognises. Pass a transformers checkpoint directory "
        "(with config.json), a .gguf file, an EXL2 directory, or a saved convdiff reference."
    )


def probe_model(path: str | os.PathLike[str], backend: str | None = None) -> ModelInfo:
    """Cheap facts about a model (layers, vocabulary) without loading weights."""
    name = normalize_backend_name(backend) if backend else detect_backend(path)
    if not Path(path).exists():
        detect_backend(path)  # raises the readable error
    return backend_module(name).probe(Path(path))


def open_backend(path: str | os.PathLike[str], backend: str | None = None,
                 options: dict[str, Any] | None = None) -> Backend:
    """Load a model. Raises ModelLoadError / MissingDependencyError with a readable message."""
    name = normalize_backend_name(backend) if backend else detect_backend(path)
    try:
        typed = validate_options(name, options)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return backend_module(name).load(Path(path), typed)
