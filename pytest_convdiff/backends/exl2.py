"""exllamav2 backend: an EXL2 directory (or a plain FP16/BF16/FP32 transformers directory) on a CUDA GPU.

exllamav2 is imported only inside ``load()``: importing it JIT-builds a CUDA extension
(minutes, needs nvcc) and it cannot run without a CUDA GPU at all.

Options (declared in ``OPTIONS``; text such as ``"true"`` or ``"20,24"`` is accepted, as from a command line):

- ``no_sdpa`` (bool): sets ``config.no_sdpa``. exllamav2 0.3.2 without flash-attn or xformers
  runs attention through torch SDPA *without a causal mask*, which gives wrong logits; ``no_sdpa=true``
  selects its matmul attention, which is correct. Left unset, exllamav2's own default is used,
  so that a check can expose the problem (the causality probe fails).
- ``no_flash_attn``, ``no_xformers`` (bool): the matching config switches.
- ``max_input_len`` (int): the longest sequence one forward pass takes (exllamav2 sizes its
  buffers by it). Default: the model's max_seq_len, capped at 4096.
- ``gpu_split`` (GB per GPU: ``20``, ``"20,24"``, ``"20;24"``, ``[20, 24]``): passed to ``model.load``;
  default: first GPU only.
- ``device`` (``cuda`` or ``cuda:N``): the whole model on GPU N, without touching
  ``CUDA_VISIBLE_DEVICES`` (translated into a gpu_split that gives the GPUs before N nothing).
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

import contextlib
import gc
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ContextLengthError, MissingDependencyError, ModelLoadError
from . import hfdir
from .base import (
    HIDDEN_STATES,
    LAYER_SWAP,
    ForwardOutput,
    ModelInfo,
    info_from_hf_config,
    installed_version,
    special_token_flags,
)
from .hfdir import tokenizer_adds_special
from .options import BackendOption, resolve_options
from .registry import BackendSpec

NAME = "exllamav2"
DEFAULT_MAX_INPUT_LEN = 4096
# A gpu_split entry larger than any GPU: "as much as this GPU has".
_WHOLE_GPU_GB = 100_000.0
_WEIGHTS = ("*.safetensors",)

OPTIONS: tuple[BackendOption, ...] = (
    BackendOption("no_sdpa", "bool", None, "use exllamav2's matmul attention instead of SDPA (exllamav2's default)"),
    BackendOption("no_flash_attn", "bool", None, "do not use flash-attn (exllamav2's default)"),
    BackendOption("no_xformers", "bool", None, "do not use xformers (exllamav2's default)"),
    BackendOption("max_input_len", "int", None,
                  f"longest sequence one forward takes; default the model's max_seq_len capped at {DEFAULT_MAX_INPUT_LEN}",
                  minimum=1),
    BackendOption("gpu_split", "split", None, "GB of weights per GPU, e.g. 20,24; default the first GPU"),
    BackendOption("device", "str", None, "the whole model on this GPU: cuda or cuda:N", pattern=r"cuda(:\d+)?"),
    BackendOption("add_bos", "bool", None, "add BOS when tokenizing; default as the checkpoint's tokenizer does"),
    BackendOption("add_eos", "bool", None, "add EOS when tokenizing; default as the checkpoint's tokenizer does"),
    BackendOption("encode_special_tokens", "bool", True, "special-token text in a prompt becomes the special token"),
)
CAPABILITIES: frozenset[str] = frozenset({HIDDEN_STATES, LAYER_SWAP})
# advice for a model that fails a check family (``BackendSpec.hint``)
HINTS = {"causality": "exllamav2 without flash-attn computes attention through SDPA without a causal mask; set its "
                      "no_sdpa option: --convdiff-option-{role} no_sdpa=true."}

__all__ = ["CAPABILITIES", "HINTS", "NAME", "OPTIONS", "fingerprint_files", "gpu_split_for", "layer_output_indices", "load",
           "probe", "tokenizer_adds_special"]


def library_version() -> str | None:
    return installed_version("exllamav2")


def fingerprint_files(path: Path) -> list[Path]:
    """Files whose content identifies the model (weights, config, tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        return [path] if path.is_file() else []
    return hfdir.fingerprint_files(path, _WEIGHTS)


def _exl2_quantization(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization_config of an EXL2 conversion, None for a plain checkpoint."""
    return cfg["quantization_config"] if hfdir.quant_method(cfg) == "exl2" else None


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:  # noqa: ARG001 - nothing option-dependent
    """Cheap facts from config.json (no exllamav2 or torch import)."""
    path = Path(path)
    cfg = hfdir.read_config(path, NAME)
    hfdir.require_weights(path, _WEIGHTS)
    qc = _exl2_quantization(cfg)
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


def device_index(device: str | None) -> int | None:
    """``"cuda:2"`` -> 2, ``"cuda"`` -> 0, None -> None."""
    if device is None:
        return None
    _, _, index = device.partition(":")
    return int(index) if index else 0


def gpu_split_for(gpu_split: list[float] | None, device: str | None) -> list[float] | None:
    """The ``gpu_split`` handed to ``model.load`` from the validated options.

    ``device=cuda:N`` puts every module on GPU N: nothing on the GPUs before it, all of GPU N. None
    means exllamav2's own default (everything on the first GPU). Giving both is ambiguous.
    """
    if gpu_split is not None and device is not None:
        raise ModelLoadError("exllamav2 backend: give gpu_split or device, not both "
                             f"(gpu_split={gpu_split}, device={device!r}).")
    if gpu_split is not None:
        return list(gpu_split)
    index = device_index(device)
    if not index:
        return None
    return [0.0] * index + [_WHOLE_GPU_GB]


def first_gpu(split: list[float] | None) -> int:
    """The GPU the first module lands on: the first with memory in the split (0 without one)."""
    if not split:
        return 0
    return next(i for i, gb in enumerate(split) if gb > 0)


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
        self.model = None
        self.tokenizer = None
        self._torch: Any = None
        try:
            self.options = opts = resolve_options(NAME, options)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from None
        self.gpu_split = gpu_split_for(opts["gpu_split"], opts["device"])
        self.gpu = first_gpu(self.gpu_split)
        cfg_json = hfdir.read_config(self.path, NAME)
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
        n_gpus = int(torch.cuda.device_count())
        if len(self.gpu_split or ()) > n_gpus:
            raise ModelLoadError(
                f"{self.path}: exllamav2 was asked to use GPU {len(self.gpu_split) - 1} "
                f"(device={opts['device']!r}, gpu_split={opts['gpu_split']}), but torch sees {n_gpus} GPU(s).")
        try:
            from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
        except ImportError as exc:
            raise MissingDependencyError("exllamav2", "exllamav2", "exllamav2") from exc
        except Exception as exc:  # noqa: BLE001 - the JIT build of the extension can fail in many ways
            raise ModelLoadError(
                f"exllamav2 is installed but its CUDA extension could not be built or loaded: "
                f"{type(exc).__name__}: {exc}. It needs nvcc and ninja matching torch's CUDA version."
            ) from exc

        try:
            config = ExLlamaV2Config(str(self.path))
            config.arch_compat_overrides(quiet=True)
        except Exception as exc:  # noqa: BLE001 - exllamav2 reports config problems with asserts and ValueErrors
            raise ModelLoadError(f"{self.path}: exllamav2 cannot read this checkpoint: {type(exc).__name__}: {exc}") from exc
        for key in ("no_sdpa", "no_flash_attn", "no_xformers"):
            if opts[key] is not None:
                setattr(config, key, opts[key])
        max_len = opts["max_input_len"] or min(int(config.max_seq_len), DEFAULT_MAX_INPUT_LEN)
        config.max_input_len = max_len
        config.max_attention_size = max(int(config.max_attention_size), max_len * max_len)
        if max_len > int(config.max_seq_len):
            config.max_seq_len = max_len
        self.config = config
        self.max_input_len = max_len

        oom_advice = "Lower max_input_len, or spread the model with gpu_split or move it with device=cuda:N."
        try:
            with self._on_gpu(), hfdir.readable_oom(torch, self.path, "while loading", oom_advice):
                self.model = ExLlamaV2(config)
                self.model.load(gpu_split=self.gpu_split, progress=False)
                self.tokenizer = ExLlamaV2Tokenizer(config)
        except ModelLoadError:
            self.close()
            raise
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
        self.add_bos = add_bos if opts["add_bos"] is None else opts["add_bos"]
        self.add_eos = add_eos if opts["add_eos"] is None else opts["add_eos"]
        self.encode_special = opts["encode_special_tokens"]

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

    def _on_gpu(self) -> contextlib.AbstractContextManager[Any]:
        """torch's current device set to the model's first GPU for the block (scoped, not process-wide)."""
        if not self.gpu:
            return contextlib.nullcontext()
        return self._torch.cuda.device(self.gpu)

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

        replaced: dict[int, Any] = {}
        for layer, state in (inject or {}).items():
            layer = int(layer)
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"inject: layer {layer} is out of range 0..{self.num_layers - 1}")
            value = torch.from_numpy(np.array(state, dtype=np.float32))
            if tuple(value.shape) != (t, self.hidden_size):
                raise ValueError(f"inject: layer {layer} state has shape {tuple(value.shape)}, "
                                 f"expected {(t, self.hidden_size)}")
            replaced[self.state_indices[layer] - 1] = value.unsqueeze(0)  # the layer's last module

        modules = self.model.modules
        saved = list(modules)
        oom_advice = "Lower --convdiff-max-tokens or max_input_len."
        try:
            for idx, value in replaced.items():
                modules[idx] = _Replaced(saved[idx], value)
            with self._on_gpu(), hfdir.readable_oom(torch, self.path, f"on a {t}-token prompt", oom_advice):
                result = self.model.forward_chunk(ids, extract_state_indices=extract)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - asserts and CUDA errors from exllamav2's kernels
            raise ModelLoadError(f"{self.path}: exllamav2 failed on a {t}-token prompt: "
                                 f"{type(exc).__name__}: {exc}") from exc
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


def _detect(path: Path) -> bool:
    """A checkpoint directory whose quantization_config says exl2."""
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and hfdir.quant_method(hfdir.read_json(cfg)) == "exl2"


def open_weights(path: Path, options: dict[str, Any], role: str) -> Any:  # noqa: ARG001
    from . import tensors

    raise tensors.WeightsUnreadable(
        f"{role} is an EXL2 model: its weights are packed for exllamav2's GPU kernels, which this check does "
        "not unpack (its outputs are still compared)")


def read_config(path: Path, options: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001
    """The directory's config.json, tokenizer files and safetensors headers for the config check."""
    from .hf_config import read_hf_dir

    return read_hf_dir(Path(path))


BACKEND = BackendSpec(NAME, __name__, aliases=("exl2",), detect=_detect, priority=10,
                      gpu_option="device", gpu_value=lambda i: f"cuda:{i}", open_weights=open_weights,
                      read_config=read_config)
