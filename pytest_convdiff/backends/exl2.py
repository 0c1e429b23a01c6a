"""exllamav2 backend: an EXL2 directory (or a plain FP16/BF16/FP32 transformers directory) on a CUDA GPU.

exllamav2 is imported only inside ``load()``: importing it JIT-builds a CUDA extension
(minutes, needs nvcc) and it cannot run without a CUDA GPU at all.

Options (all optional; strings such as ``"true"`` or ``"20,24"`` are accepted, as from a command line):

- ``no_sdpa`` (bool): sets ``config.no_sdpa``. exllamav2 0.3.2 without flash-attn or xformers
  runs attention through torch SDPA *without a causal mask*, which gives wrong logits; ``no_sdpa=true``
  selects its matmul attention, which is correct. Left unset, exllamav2's own default is used,
  so that a check can expose the problem (the causality probe fails).
- ``no_flash_attn``, ``no_xformers`` (bool): the matching config switches.
- ``max_input_len`` (int): the longest sequence one forward pass takes (exllamav2 sizes its
  buffers by it). Default: the model's max_seq_len, capped at 4096.
- ``gpu_split`` (list of GB per GPU, or ``"20,24"``): passed to ``model.load``; default: first GPU only.
- ``add_bos`` / ``add_eos`` (bool): override what ``tokenize`` adds; by default it follows the
  checkpoint's tokenizer_config.json (``add_bos_token``) or else tokenizer.json's post-processor,
  as the transformers tokenizer does.
- ``encode_special_tokens`` (bool, default true): special-token text such as ``<|im_start|>`` in a
  prompt becomes the special token, as with transformers.

Hidden states use the common index of :mod:`.base`: ``hidden[i]`` is the output of decoder layer
``i``, the last one before the final norm. exllamav2's module list is
``[Embedding, (Attention, MLP) x L, Norm, Head]`` and ``forward_chunk(extract_state_indices=...)``
returns the *input* of module ``idx``, so layer ``i``'s output is the input of the module after the
layer's last module (index ``2i + 3`` for a Llama). The indices are derived from the modules'
``layer_idx``, not hard-coded, so architectures with extra modules keep the meaning.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ContextLengthError, MissingDependencyError, ModelLoadError
from .base import ForwardOutput, ModelInfo, info_from_hf_config, installed_version, special_token_flags

NAME = "exllamav2"
DEFAULT_MAX_INPUT_LEN = 4096
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "generation_config.json")


def library_version() -> str | None:
    return installed_version("exllamav2")


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) if path.is_dir() else []


def fingerprint_files(path: Path) -> list[Path]:
    """Files whose content identifies the model (weights, config, tokenizer)."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    extra = [path / n for n in ("config.json", *_TOKENIZER_FILES) if (path / n).is_file()]
    return _weight_files(path) + extra


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.is_file():
        raise ModelLoadError(
            f"{path}: not an EXL2 or transformers checkpoint directory (no config.json); "
            "exllamav2 loads a directory holding config.json, *.safetensors and tokenizer.json."
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({exc}); is the checkpoint complete?") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path}: expected a JSON object")
    return cfg


def _quant_config(cfg: dict[str, Any]) -> dict[str, Any] | None:
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "exl2":
        return qc
    return None


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:
    """Cheap facts from config.json (no exllamav2 or torch import)."""
    path = Path(path)
    cfg = _read_config(path)
    if not _weight_files(path):
        raise ModelLoadError(
            f"{path}: has config.json but no *.safetensors weights; the download or conversion is incomplete."
        )
    qc = _quant_config(cfg)
    extra: dict[str, Any] = {}
    if qc is not None:
        for key in ("bits", "head_bits", "version"):
            if key in qc:
                extra[key] = qc[key]
        dtype = "float16"  # activations; the weights are EXL2-quantised
        quant = f"exl2 {float(qc['bits']):.2f}bpw" if isinstance(qc.get("bits"), (int, float)) else "exl2"
    else:
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16")
        quant = None
    return info_from_hf_config(path, NAME, cfg, dtype=dtype, library_version=library_version(),
                               quantization=quant, extra=extra)


# --------------------------------------------------------------------------- pure helpers (CPU-testable)


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ModelLoadError(f"exllamav2 backend: option {name} must be true or false, not {value!r}.")


def _as_int(value: Any, name: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"exllamav2 backend: option {name} must be an integer, not {value!r}.") from None
    if out <= 0:
        raise ModelLoadError(f"exllamav2 backend: option {name} must be positive, not {value!r}.")
    return out


def _as_split(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        split = [float(x) for x in items]
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"exllamav2 backend: gpu_split must be GB per GPU, e.g. [20, 24] or \"20,24\", not {value!r}."
        ) from None
    if not split or any(x <= 0 for x in split):
        raise ModelLoadError(f"exllamav2 backend: gpu_split needs positive sizes in GB, not {value!r}.")
    return split


def _template_ends(processor: Any) -> tuple[bool, bool] | None:
    """(adds a special token first, adds one last) from a tokenizer.json post_processor, or None."""
    if not isinstance(processor, dict):
        return None
    kind = processor.get("type")
    if kind == "Sequence":
        for sub in processor.get("processors") or []:
            found = _template_ends(sub)
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


def tokenizer_adds_special(model_dir: Path) -> tuple[bool, bool]:
    """(add BOS, add EOS) as the transformers tokenizer of this checkpoint would.

    An explicit ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json wins (transformers'
    Llama-style tokenizers rebuild their post-processor from it); otherwise tokenizer.json's
    post-processor template decides; otherwise nothing is added.
    """
    tc: dict[str, Any] = {}
    tc_path = model_dir / "tokenizer_config.json"
    if tc_path.is_file():
        try:
            loaded = json.loads(tc_path.read_text(encoding="utf-8"))
            tc = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            tc = {}
    template: tuple[bool, bool] | None = None
    tj_path = model_dir / "tokenizer.json"
    if tj_path.is_file():
        try:
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
            template = _template_ends(tj.get("post_processor")) if isinstance(tj, dict) else None
        except json.JSONDecodeError:
            template = None
    bos = tc.get("add_bos_token")
    eos = tc.get("add_eos_token")
    add_bos = bool(bos) if isinstance(bos, bool) else bool(template and template[0])
    add_eos = bool(eos) if isinstance(eos, bool) else bool(template and template[1])
    return add_bos, add_eos


def layer_output_indices(module_layers: Sequence[int | None], num_layers: int) -> list[int]:
    """Index into exllamav2's state list (input of module idx) holding decoder layer i's output.

    ``module_layers[idx]`` is the decoder layer module ``idx`` belongs to (None for embedding, norm,
    head). Layer i's output is the input of the module right after layer i's last module.
    """
    last: dict[int, int] = {}
    for idx, layer in enumerate(module_layers):
        if layer is not None:
            last[int(layer)] = idx
    if sorted(last) != list(range(num_layers)):
        raise ModelLoadError(
            f"exllamav2 model has modules for layers {sorted(last)}, expected 0..{num_layers - 1}; "
            "cannot map its states to decoder-layer outputs."
        )
    out = [last[i] + 1 for i in range(num_layers)]
    if out[-1] >= len(module_layers):
        raise ModelLoadError("exllamav2 model: no module after the last decoder layer (final norm missing?).")
    return out


# --------------------------------------------------------------------------- the backend


def _has_exllamav2() -> bool:
    """Whether exllamav2 is installed, without importing it (its import JIT-builds a CUDA extension)."""
    return importlib.util.find_spec("exllamav2") is not None


class _Replaced:
    """Stand-in for one exllamav2 module whose output is replaced (layer-swap injection)."""

    def __init__(self, inner: Any, value: Any) -> None:
        self._inner = inner
        self._value = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def forward(self, hidden_states, *args, **kwargs):
        out = self._inner.forward(hidden_states, *args, **kwargs)
        return self._value.to(device=out.device, dtype=out.dtype).reshape(out.shape).clone()


class ExLlamaV2Backend:
    """A model loaded with exllamav2 on CUDA; no cache, one sequence per forward pass."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        self.path = Path(path)
        self.options = dict(options or {})
        self.model = None
        self.tokenizer = None
        cfg_json = _read_config(self.path)
        if not _has_exllamav2():
            raise MissingDependencyError("exllamav2", "exllamav2", "exllamav2")
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError("exllamav2", "exllamav2 (and torch)", "exllamav2") from exc
        self._torch = torch
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"{self.path}: exllamav2 needs a CUDA GPU, and torch sees none on this machine "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda}). Run the exllamav2 side on a "
                "machine with an NVIDIA GPU, or compare the original checkpoint with the transformers backend."
            )
        try:
            from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
        except ImportError as exc:
            raise MissingDependencyError("exllamav2", "exllamav2", "exllamav2") from exc
        except Exception as exc:  # noqa: BLE001 - the JIT build of the extension can fail in many ways
            raise ModelLoadError(
                f"exllamav2 is installed but its CUDA extension could not be built or loaded: "
                f"{type(exc).__name__}: {exc}. It needs nvcc and ninja matching torch's CUDA version."
            ) from exc

        opts = self.options
        try:
            config = ExLlamaV2Config(str(self.path))
            config.arch_compat_overrides(quiet=True)
        except Exception as exc:  # noqa: BLE001 - exllamav2 reports config problems with asserts and ValueErrors
            raise ModelLoadError(f"{self.path}: exllamav2 cannot read this checkpoint: {type(exc).__name__}: {exc}") from exc
        for key in ("no_sdpa", "no_flash_attn", "no_xformers"):
            if opts.get(key) is not None:
                setattr(config, key, _as_bool(opts[key], key))
        max_len = opts.get("max_input_len")
        max_len = _as_int(max_len, "max_input_len") if max_len is not None else min(
            int(config.max_seq_len), DEFAULT_MAX_INPUT_LEN)
        config.max_input_len = max_len
        config.max_attention_size = max(int(config.max_attention_size), max_len * max_len)
        if max_len > int(config.max_seq_len):
            config.max_seq_len = max_len
        self.config = config
        self.max_input_len = max_len
        gpu_split = _as_split(opts.get("gpu_split"))

        try:
            self.model = ExLlamaV2(config)
            self.model.load(gpu_split=gpu_split, progress=False)
            self.tokenizer = ExLlamaV2Tokenizer(config)
        except torch.cuda.OutOfMemoryError as exc:
            self.close()
            raise ModelLoadError(f"{self.path}: out of GPU memory while loading ({exc}). "
                                 "Lower max_input_len or use gpu_split across GPUs.") from exc
        except Exception as exc:  # noqa: BLE001 - asserts, ValueErrors and CUDA errors from the loader
            self.close()
            raise ModelLoadError(f"{self.path}: exllamav2 could not load it: {type(exc).__name__}: {exc}") from exc

        modules = self.model.modules
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.head_idx = int(self.model.head_layer_idx)
        module_layers = [getattr(m, "layer_idx", None) if i < self.head_idx else None
                         for i, m in enumerate(modules)]
        self.state_indices = layer_output_indices(module_layers, self.num_layers)

        add_bos, add_eos = tokenizer_adds_special(self.path)
        self.add_bos = _as_bool(opts["add_bos"], "add_bos") if opts.get("add_bos") is not None else add_bos
        self.add_eos = _as_bool(opts["add_eos"], "add_eos") if opts.get("add_eos") is not None else add_eos
        self.encode_special = _as_bool(opts.get("encode_special_tokens", True), "encode_special_tokens")

        info = probe(self.path)
        info.library_version = library_version()
        info.vocab_size = self.vocab_size
        info.num_layers = self.num_layers
        info.hidden_size = self.hidden_size
        info.extra = {**info.extra, "no_sdpa": bool(config.no_sdpa), "max_input_len": max_len,
                      "head_padding": int(getattr(modules[-1], "padding", 0) or 0)}
        if cfg_json.get("architectures"):
            info.architecture = cfg_json["architectures"][0]
        self.info = info

    # ----------------------------------------------------------------- tokenizer

    def _encode(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos,
                                    encode_special_tokens=self.encode_special)
        return [int(t) for t in ids[0].tolist()]

    def tokenize(self, text: str) -> list[int]:
        return self._encode(text, self.add_bos, self.add_eos)

    def decode_piece(self, token_id: int) -> str:
        torch = self._torch
        special = self.tokenizer.extended_id_to_piece.get(int(token_id))
        if special is not None:  # exllamav2's decode drops the pad token; transformers shows it
            return special
        return self.tokenizer.decode(torch.tensor([int(token_id)], dtype=torch.long), decode_special_tokens=True)

    def special_tokens(self) -> dict[str, Any]:
        tok = self.tokenizer
        return special_token_flags(tok.bos_token_id, tok.eos_token_id, self.tokenize("a"),
                                   self._encode("a", False, False))

    # ----------------------------------------------------------------- forward

    def forward(self, tokens: Sequence[int], *, hidden_states: bool = True,
                inject: dict[int, np.ndarray] | None = None) -> ForwardOutput:
        """One sequence. ``inject`` maps layer i to a ``[T, H]`` state that replaces layer i's output
        (layer-swap analysis: feed A's states into B for the first k layers)."""
        torch = self._torch
        if self.model is None:
            raise ModelLoadError(f"{self.path}: the exllamav2 model was closed.")
        tokens = [int(t) for t in tokens]
        t = len(tokens)
        if t == 0:
            raise ValueError("forward needs at least one token")
        if t > self.max_input_len:
            raise ContextLengthError(
                f"{self.path}: a prompt of {t} tokens is longer than exllamav2's max_input_len "
                f"({self.max_input_len}); pass the backend option max_input_len={t} (uses more GPU memory) "
                "or use --convdiff-max-tokens."
            )
        bad = [x for x in tokens if x < 0 or x >= self.vocab_size]
        if bad:
            raise ModelLoadError(f"{self.path}: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1}).")
        ids = torch.tensor([tokens], dtype=torch.long)
        extract = list(self.state_indices) if hidden_states else None

        modules = self.model.modules
        saved = list(modules)
        try:
            for layer, state in (inject or {}).items():
                layer = int(layer)
                if not 0 <= layer < self.num_layers:
                    raise ValueError(f"inject: layer {layer} is out of range 0..{self.num_layers - 1}")
                value = torch.from_numpy(np.array(state, dtype=np.float32))
                if tuple(value.shape) != (t, self.hidden_size):
                    raise ValueError(f"inject: layer {layer} state has shape {tuple(value.shape)}, "
                                     f"expected {(t, self.hidden_size)}")
                idx = self.state_indices[layer] - 1  # the layer's last module
                modules[idx] = _Replaced(saved[idx], value.unsqueeze(0))
            result = self.model.forward_chunk(ids, extract_state_indices=extract)
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(f"{self.path}: out of GPU memory on a {t}-token prompt. "
                                 "Lower --convdiff-max-tokens or max_input_len.") from exc
        finally:
            modules[:] = saved
        logits = result["logits"][0, :, : self.vocab_size].float().cpu().numpy()
        hidden = None
        if hidden_states:
            states = result["states"]
            # .float() copies, so later in-place updates inside exllamav2 cannot touch what we keep.
            hidden = torch.stack([states[i][0].float() for i in self.state_indices]).cpu().numpy()
        return ForwardOutput(logits=logits, hidden=hidden)

    # ----------------------------------------------------------------- cleanup

    def close(self) -> None:
        model, self.model = self.model, None
        self.tokenizer = None
        if model is not None:
            try:
                model.unload()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
            del model
        gc.collect()
        torch = getattr(self, "_torch", None)
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def load(path: Path, options: dict[str, Any]) -> ExLlamaV2Backend:
    return ExLlamaV2Backend(Path(path), dict(options or {}))
