"""Reading a transformers-style checkpoint directory, shared by the transformers and exllamav2 backends.

Both backends load the same kind of directory (config.json, *.safetensors, tokenizer files), so the
reading, the fingerprinted file list and the readable errors (broken JSON, missing weights, GPU out of
memory) live here once and say the same thing whichever backend hits them. ``quiet_transformers``
silences transformers while it loads (the transformers backend, and the GGUF config reader's use of
transformers' GGUF mapping). No torch or transformers import at module level: the helpers receive the
module from their caller.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = [
    "CONFIG_FILE",
    "TOKENIZER_FILES",
    "fingerprint_files",
    "import_transformers",
    "is_oom",
    "quant_method",
    "quiet_transformers",
    "read_config",
    "read_json",
    "readable_oom",
    "require_weights",
    "template_ends",
    "tokenizer_adds_special",
    "weight_files",
]

CONFIG_FILE = "config.json"
# Files besides the weights whose content changes what the model computes or how it tokenizes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``; ModelLoadError saying what is wrong (unreadable, broken, not an object)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror or exc}).") from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: not UTF-8 text ({exc}); is the checkpoint complete?") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}); is the checkpoint complete?") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike[str], backend: str) -> dict[str, Any]:
    """The checkpoint's config.json; ModelLoadError naming the backend when ``path`` is not such a directory."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not path.is_dir() or not cfg_path.is_file():
        raise ModelLoadError(
            f"{path}: not a checkpoint directory for the {backend} backend (no config.json); it loads a "
            "directory holding config.json, the weights (*.safetensors) and the tokenizer files."
        )
    return read_json(cfg_path)


def quant_method(cfg: dict[str, Any]) -> str | None:
    """``quantization_config.quant_method`` in lower case (``"exl2"``, ``"gptq"``...), or None."""
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method"):
        return str(qc["quant_method"]).lower()
    return None


def weight_files(path: str | os.PathLike[str], patterns: tuple[str, ...] = ("*.safetensors",)) -> list[Path]:
    """Weight files of a directory (each pattern's matches sorted, patterns in order); a file is its own."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return [f for pattern in patterns for f in sorted(path.glob(pattern))]


def require_weights(path: str | os.PathLike[str], patterns: tuple[str, ...] = ("*.safetensors",)) -> list[Path]:
    """``weight_files``, or ModelLoadError when a directory with a config.json has none."""
    files = weight_files(path, patterns)
    if not files:
        wanted = " or ".join(patterns)
        raise ModelLoadError(
            f"{path}: has config.json but no weights ({wanted}); the download or conversion is incomplete."
        )
    return files


def fingerprint_files(path: str | os.PathLike[str], patterns: tuple[str, ...] = ("*.safetensors",)) -> list[Path]:
    """Files whose content identifies the model: the weights, then config.json and the tokenizer files."""
    path = Path(path)
    extra = [path / n for n in (CONFIG_FILE, *TOKENIZER_FILES) if (path / n).is_file()] if path.is_dir() else []
    return weight_files(path, patterns) + extra


def template_ends(processor: Any) -> tuple[bool, bool] | None:
    """(adds a special token first, adds one last) from a tokenizer.json post_processor, or None."""
    if not isinstance(processor, dict):
        return None
    kind = processor.get("type")
    if kind == "Sequence":
        for sub in processor.get("processors") or []:
            found = template_ends(sub)
            if found is not None:
                return found
        return None
    if kind == "TemplateProcessing":
        single = processor.get("single") or []
        if not single:
            return (False, False)
        return ("SpecialToken" in single[0], "SpecialToken" in single[-1])
    if kind in ("BertProcessing", "RobertaProcessing"):
        return (True, True)
    return None


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A tokenizer file's JSON object, or {} when it is missing or unreadable (transformers' defaults then apply)."""
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ModelLoadError:
        return {}


def tokenizer_adds_special(model_dir: str | os.PathLike[str]) -> tuple[bool, bool]:
    """(add BOS, add EOS) as the transformers tokenizer of this checkpoint would.

    An explicit ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json wins (transformers'
    Llama-style tokenizers rebuild their post-processor from it); otherwise tokenizer.json's
    post-processor template decides; otherwise nothing is added.
    """
    model_dir = Path(model_dir)
    tc = _json_or_empty(model_dir / "tokenizer_config.json")
    template = template_ends(_json_or_empty(model_dir / "tokenizer.json").get("post_processor"))
    bos = tc.get("add_bos_token")
    eos = tc.get("add_eos_token")
    add_bos = bool(bos) if isinstance(bos, bool) else bool(template and template[0])
    add_eos = bool(eos) if isinstance(eos, bool) else bool(template and template[1])
    return add_bos, add_eos


def is_oom(torch: Any, exc: BaseException) -> bool:
    """Whether ``exc`` is the GPU running out of memory, however the library reported it."""
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    # CUDA extensions (exllamav2's) report it as a plain RuntimeError
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextlib.contextmanager
def readable_oom(torch: Any, path: str | os.PathLike[str], when: str, advice: str) -> Iterator[None]:
    """Turn a GPU out-of-memory error inside the block into ModelLoadError: what ran out, when, what to do."""
    try:
        yield
    except Exception as exc:
        if not is_oom(torch, exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: out of GPU memory {when} ({first}). {advice}") from exc


_frozen: list[bool] = []


def import_transformers(*submodules: str) -> Any:
    """transformers (with torch, which it imports) and the named submodules of it, imported with the cyclic
    garbage collector paused; then, once per process, every object alive is frozen out of
    its generations.

    The first import of torch and transformers makes a few million objects, nearly all of them modules' own
    and alive for good. With the collector running, the allocations trigger collections that walk them again
    and again (0.4-1.2 s of a 2.7-3.9 s import on a 2-core machine); and after it, each ``gc.collect`` (a model's
    ``close``, pytest's own at the session's end) would walk them once more. The freeze comes before any model
    is made, so a model's own cycles are still collected when it closes. Raises ImportError when transformers
    itself cannot be imported; a submodule this transformers does not have is left to its caller's import.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import transformers

        for name in submodules:  # imported now only to import them paused: the caller imports what it uses
            with contextlib.suppress(ImportError):
                importlib.import_module(f"transformers.{name}")
        if not _frozen:  # before the collector is back: its first collection would walk all of it once more
            _frozen.append(True)
            gc.freeze()
    finally:
        if was_enabled:
            gc.enable()
    return transformers


@contextlib.contextmanager
def quiet_transformers(transformers: Any) -> Iterator[None]:
    """Errors-only logging and no progress bars for the duration of a load, then the caller's settings back.

    transformers' verbosity and progress bars are process-wide; changing them for good would silence
    the user's own warnings for the rest of the session.
    """
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
