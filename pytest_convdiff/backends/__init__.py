"""Backend registry: recognise a model path, probe it cheaply, open it lazily.

Each backend lives in its own module, imported only when a model of that kind is
used, so ``import pytest_convdiff`` never pulls in torch, llama.cpp or exllamav2.
Each module provides ``probe(path) -> ModelInfo`` (no heavy imports: config and
header reads only), ``fingerprint_files(path)`` and ``load(path, options) -> Backend``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelLoadError
from .base import Backend, ForwardOutput, ModelInfo

__all__ = [
    "BACKENDS",
    "Backend",
    "ForwardOutput",
    "ModelInfo",
    "backend_module",
    "detect_backend",
    "normalize_backend_name",
    "open_backend",
    "probe_model",
]

BACKENDS: dict[str, str] = {
    "transformers": "pytest_convdiff.backends.hf",
    "llama.cpp": "pytest_convdiff.backends.llamacpp",
    "exllamav2": "pytest_convdiff.backends.exl2",
    "reference": "pytest_convdiff.backends.reference",
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
    "golden": "reference",
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
    return importlib.import_module(BACKENDS[normalize_backend_name(name)])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}); is the checkpoint complete?") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


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
        qc = _read_json(cfg).get("quantization_config") or {}
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "exl2":
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
    if p.suffix in (".safetensors", ".convdiff") or p.name.endswith(".convdiff.safetensors"):
        return "reference"
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
    return backend_module(name).load(Path(path), dict(options or {}))
