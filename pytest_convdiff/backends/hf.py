"""transformers backend: a checkpoint directory run with torch.

Options (declared in ``OPTIONS``): ``dtype`` (auto | float32 | float16 | bfloat16; auto keeps the
checkpoint's own), ``device`` (auto | cpu | cuda | cuda:N; default auto: the GPU when torch sees one), ``gguf_file`` (a GGUF in the
directory, loaded through transformers' dequantising loader), ``trust_remote_code`` (default false).

Hidden states: transformers returns L+1 tensors whose last one is *after* the
final norm; the last layer's pre-norm output is taken with a forward hook on the
final norm's input, so index i is always "output of decoder layer i".
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import routing
from ..errors import ContextLengthError, MissingDependencyError, ModelLoadError
from . import gguf_header, hfdir
from .base import (
    HIDDEN_STATES,
    INCREMENTAL_DECODE,
    LAYER_SWAP,
    SUBBLOCKS,
    TWIN_HOST,
    WEIGHTS_TWIN,
    ForwardOutput,
    ModelInfo,
    info_from_hf_config,
    installed_version,
    special_token_flags,
)
from .options import BackendOption, resolve_options
from .registry import BackendSpec

NAME = "transformers"
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_WEIGHTS = ("*.safetensors", "*.bin", "*.gguf")

OPTIONS: tuple[BackendOption, ...] = (
    BackendOption("dtype", "str", "auto", "torch dtype to run in; auto keeps the checkpoint's own", choices=_DTYPES),
    BackendOption("device", "str", "auto", "torch device: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda "
                  "or cuda:N", pattern=r"auto|cpu|cuda(:\d+)?"),
    BackendOption("gguf_file", "str", None, "a .gguf file in the directory, dequantised by transformers"),
    BackendOption("trust_remote_code", "bool", False, "allow the checkpoint's own modelling code"),
    BackendOption("weights_from", "str", None,
                  "run this checkpoint's architecture with another model's weights (a GGUF, dequantised into this "
                  "checkpoint's naming and convention): the runtime twin of that model"),
    BackendOption("emulate", "str", "none",
                  "with weights_from a GGUF: round what llama.cpp's CPU kernels round (each matmul's input to its "
                  "weight type's activation type, Q8_0 / Q8_K / F16 / BF16; the KV cache to F16), to measure the size "
                  "of that runtime's own noise", choices=("none", "llama.cpp")),
)

# llama.cpp's activation type for a weight type's matrix products (ggml-cpu's vec_dot_type): the input row
# is quantised to it before the dot products. Block size of the activation type; 0: rounded to a float type.
_VEC_DOT = {**{t: ("Q8", 32) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4")},
            **{t: ("Q8", 256) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                                         "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0")},
            "F16": ("F16", 0), "BF16": ("BF16", 0)}


def _round_activation(torch: Any, x: Any, kind: str, block: int) -> Any:
    """x rounded as llama.cpp's CPU kernels round a matmul's input (ggml-quants.c's reference quantisers), or to
    a float type.

    - 8-bit blocks of 32 (Q8_0, Q8_1): scale max |x| / 127 stored in f16, x times its f32 inverse rounded half
      away from zero (roundf).
    - 8-bit blocks of 256 (Q8_K, the K- and I-quants' activations): the scale comes from the block's signed
      extreme (the first value of largest magnitude), -127 / max, and is kept in f32; rounded half to even
      (``nearest_int``), capped at 127."""
    if kind == "F16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    shape = x.shape
    n = shape[-1]
    if n % block:
        return x
    xb = x.reshape(-1, n // block, block).to(torch.float32)
    if block == 256:  # Q8_K
        extreme = torch.gather(xb, -1, xb.abs().argmax(-1, keepdim=True))  # argmax: the first of equal maxima
        live = extreme != 0
        iscale = torch.where(live, -127.0 / torch.where(live, extreme, 1.0), 0.0)
        q = torch.clamp(torch.round(xb * iscale), max=127.0)  # torch.round: half to even, as nearest_int
        d = torch.where(live, 1.0 / torch.where(live, iscale, 1.0), 0.0)
        return (q * d).reshape(shape).to(x.dtype)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.sign(xb * inv) * torch.floor((xb * inv).abs() + 0.5)  # roundf: halves away from zero
    return (q * d.to(torch.float16).to(torch.float32)).reshape(shape).to(x.dtype)


CAPABILITIES: frozenset[str] = frozenset({HIDDEN_STATES, SUBBLOCKS, LAYER_SWAP, INCREMENTAL_DECODE, WEIGHTS_TWIN,
                                          TWIN_HOST})


def library_version() -> str | None:
    return installed_version("transformers")


def _options(path: Path, options: dict[str, Any] | None) -> dict[str, Any]:
    """Every declared option, typed; a bad one is a ModelLoadError naming the model."""
    try:
        return resolve_options(NAME, options)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def fingerprint_files(path: Path) -> list[Path]:
    """Files whose content identifies the model (weights, config, tokenizer)."""
    return hfdir.fingerprint_files(path, _WEIGHTS)


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:
    path = Path(path)
    opts = _options(path, options)
    if opts["gguf_file"]:
        info = gguf_header.model_info(path / opts["gguf_file"], NAME)
        return ModelInfo(str(path), NAME, info.architecture, info.num_layers, info.vocab_size,
                         info.hidden_size, "float32", library_version(), None)
    cfg = hfdir.read_config(path, NAME)
    hfdir.require_weights(path, _WEIGHTS)
    dtype = opts["dtype"] if opts["dtype"] != "auto" else cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return info_from_hf_config(path, NAME, cfg, dtype=str(dtype), library_version=library_version(),
                               quantization=hfdir.quant_method(cfg))


def _torch_dtype(torch: Any, name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def _check_ids(path: Path, tokens: Sequence[int], n_ids: int) -> None:
    """Token ids must index the embedding; torch would fail with an IndexError deep inside the model."""
    bad = [int(t) for t in tokens if not 0 <= int(t) < n_ids]
    if bad:
        raise ModelLoadError(f"{path}: token id {bad[0]} is outside the vocabulary (0..{n_ids - 1}).")


def _check_device(torch: Any, path: Path, device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ModelLoadError(f"{path}: device {device!r} asked for, but torch sees no CUDA GPU.")
    m = re.fullmatch(r"cuda:(\d+)", device)
    if m and int(m.group(1)) >= torch.cuda.device_count():
        raise ModelLoadError(f"{path}: device {device!r} asked for, but torch sees "
                             f"{torch.cuda.device_count()} CUDA GPU(s) (0..{torch.cuda.device_count() - 1}).")


class TwinUnavailable(ModelLoadError):
    """B's weights cannot all be loaded into A's architecture: no runtime twin for this pair (its items skip)."""


_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+\.)")


def _place(torch: Any, params: dict[str, Any], name: str, a: Any) -> tuple[str, Any] | None:
    """Where the checkpoint's matrix ``name`` lives in the loaded model when transformers keeps it under another
    name (Mixtral's ``block_sparse_moe.gate`` is ``mlp.gate``) or inside a bigger parameter (transformers 5 stacks
    a layer's experts into one (expert, rows, columns) parameter and joins gate and up along the rows): found by
    value, from A's own copy of the tensor, which the model was loaded from. No layout is assumed, so none can be
    assumed wrongly: a matrix found nowhere, or in more than one place, is None."""
    t = a.tensors.get(name)
    if t is None or len(t.shape) not in (2, 3):
        return None
    mine = torch.from_numpy(np.array(a.read(t, 0, t.rows).reshape(t.shape)))
    prefix = _LAYER_PREFIX.match(name)
    found: list[tuple[str, Any]] = []
    for pname, p in params.items():
        if prefix and not pname.startswith(prefix.group(1)):
            continue
        want = mine.to(p.dtype)
        if tuple(p.shape) == tuple(t.shape) and torch.equal(p, want):  # renamed (a 3-D one: experts stacked on disk)
            found.append((pname, Ellipsis))
        if len(t.shape) != 2 or p.dim() != 3 or p.shape[-1] != t.shape[1] or p.shape[1] % t.shape[0]:
            continue
        for e in range(p.shape[0]):
            for r0 in range(0, p.shape[1], t.shape[0]):
                index = (e, slice(r0, r0 + t.shape[0]))
                # the first row rules out nearly every slot at the cost of one row (a 128-expert layer has 256)
                if torch.equal(p[e, r0], want[0]) and torch.equal(p[index], want):
                    found.append((pname, index))
    return found[0] if len(found) == 1 else None


def _share_cores(torch: Any) -> None:
    """Under xdist, torch's intra-op threads take this worker's share of the cores (``core.threads``), unless
    the user set OMP_NUM_THREADS; outside xdist torch keeps its own default."""
    from ..core.threads import default_threads, workers

    if workers() > 1 and not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > default_threads():
        torch.set_num_threads(default_threads())


# what transformers' MoE configs call the number of experts each token is sent to
_EXPERTS_USED = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_topk", "num_selected_experts",
                 "n_activated_experts", "top_k")


def _experts_used(cfg: Any) -> int | None:
    for name in _EXPERTS_USED:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class TransformersBackend:
    """A causal LM from transformers, in eval mode, on one device."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        try:
            transformers = hfdir.import_transformers("models.auto.modeling_auto", "models.auto.tokenization_auto")
            import torch
        except ImportError as exc:
            raise MissingDependencyError("transformers", "transformers and torch", "transformers") from exc
        self._torch = torch
        _share_cores(torch)
        self.path = path
        self.options = opts = _options(path, options)
        device = opts["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        _check_device(torch, path, device)
        self.device = torch.device(device)
        kwargs: dict[str, Any] = {"dtype": _torch_dtype(torch, opts["dtype"])}
        if opts["gguf_file"]:
            kwargs["gguf_file"] = opts["gguf_file"]
        if opts["trust_remote_code"]:
            kwargs["trust_remote_code"] = True
        tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "trust_remote_code")}
        oom_advice = "Use a smaller dtype (dtype=bfloat16) or another GPU (device=cuda:N)."
        with hfdir.quiet_transformers(transformers), hfdir.readable_oom(torch, path, "while loading", oom_advice):
            self._emulation: list[Any] = []
            self._placed: dict[str, set[str]] = {}  # a fused or stacked parameter: the GGUF types placed in it
            self._types: dict[str, str] = {}  # each parameter's GGUF type, with weights_from
            self._share_key = _share_key(path, opts) if opts["weights_from"] else None
            kept = _take_kept(self._share_key)
            if kept is not None:  # the same checkpoint with the same weights, just run: the model is reused
                self.tokenizer, self.model, self._types, self._placed = kept
            else:
                try:
                    self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **tok_kwargs)
                    self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    if hfdir.is_oom(torch, exc):
                        raise
                    raise ModelLoadError(f"{path}: transformers could not load it: {exc}") from exc
                if opts["weights_from"]:
                    self._types = self._load_weights_from(Path(opts["weights_from"]))
            if opts["weights_from"]:
                if opts["emulate"] == "llama.cpp":
                    self._emulate_llamacpp(self._types)
            elif opts["emulate"] != "none":
                raise ModelLoadError(f"{path}: emulate={opts['emulate']} needs weights_from (a GGUF whose runtime to "
                                     "emulate)")
            self.model.to(self.device).eval()
        cfg = self.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        self._final_norm = self._find_final_norm()
        self._routers = self._find_routers()
        self.experts_used = _experts_used(text_cfg) if self._routers else None
        if self.experts_used is None:
            self._routers = []
        self._n_ids = int(self.model.get_input_embeddings().weight.shape[0])
        self.info = ModelInfo(
            path=str(path), backend=NAME,
            architecture=(cfg.architectures or [cfg.model_type])[0],
            num_layers=self.num_layers, vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            hidden_size=int(text_cfg.hidden_size), dtype=str(self.model.dtype).replace("torch.", ""),
            library_version=transformers.__version__, extra={"device": str(self.device)},
        )

    def _emulate_llamacpp(self, types: dict[str, str]) -> None:
        """Hooks that round what llama.cpp's CPU kernels round: each linear layer's input to its weight type's
        activation type, and the keys and values to the F16 of llama.cpp's KV cache."""
        torch = self._torch
        # the last input rounded to each activation type, and its rounding: q, k and v (gate and up) take the one
        # tensor, which is rounded once (llama.cpp quantises it per matmul, to the same values)
        last: dict[tuple[str, int], tuple[Any, Any]] = {}

        def rounded(x: Any, vd: tuple[str, int]) -> Any:
            hit = last.get(vd)
            if hit is not None and hit[0] is x:
                return hit[1]
            y = _round_activation(torch, x, *vd)
            last[vd] = (x, y)
            return y

        for name, mod in self.model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            vd = _VEC_DOT.get(types.get(f"{name}.weight", ""))
            if vd is not None:
                def pre(_m, args, vd=vd):
                    return (rounded(args[0], vd),) + tuple(args[1:])

                self._emulation.append(mod.register_forward_pre_hook(pre))
            if name.endswith(".o_proj"):  # the attention's output: flash attention accumulates it in F16
                def pre16(_m, args):
                    return (args[0].to(torch.float16).to(args[0].dtype),) + tuple(args[1:])

                self._emulation.append(mod.register_forward_pre_hook(pre16, prepend=True))
            if name.endswith((".q_proj", ".k_proj", ".v_proj")):  # F16 K/V cache; Q converted to F16 for K·Q
                def post(_m, _args, output):
                    return output.to(torch.float16).to(output.dtype)

                self._emulation.append(mod.register_forward_hook(post))

        self._emulate_stacked(torch)

    def _emulate_stacked(self, torch: Any) -> None:
        """A module that holds stacked experts as one parameter (no ``nn.Linear`` per expert): its input is
        rounded as llama.cpp's expert matmul rounds it, when every GGUF type placed in it rounds the same way
        (a K-quant mix does: 8-bit blocks of 256). The input of the down projection inside it is not reached."""
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                continue
            kinds = {_VEC_DOT.get(t) for pname, _ in mod.named_parameters(recurse=False)
                     for t in self._placed.get(f"{name}.{pname}" if name else pname, ())}
            if len(kinds) != 1 or None in kinds:
                continue
            vd = kinds.pop()

            def pre(_m, args, vd=vd):
                return (_round_activation(torch, args[0], *vd),) + tuple(args[1:]) if args else args

            self._emulation.append(mod.register_forward_pre_hook(pre))

    def _load_weights_from(self, other: Path) -> dict[str, str]:
        """Replace every parameter with the other model's tensor of the same name (``backends.pairing`` brings a
        GGUF's tensors into this checkpoint's naming and convention): A's code, B's weights. An output layer
        that A ties to its embedding is untied when B's differs."""
        torch = self._torch
        from . import pairing, tensors

        try:
            a = tensors.SafetensorsWeights(self.path)
            b = tensors.GGUFWeights(other) if other.suffix == ".gguf" else tensors.SafetensorsWeights(other)
        except (tensors.WeightsUnreadable, OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: the weights of {other} cannot be read into it: {exc}") from exc
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for bname, buf in self.model.named_buffers(remove_duplicate=False):  # a stored buffer (DeepSeek's expert
            params.setdefault(bname, buf)  # score bias) is one of the checkpoint's tensors like a parameter
        loaded = 0
        types: dict[str, str] = {}
        unplaced: list[str] = []
        with torch.no_grad():
            try:
                for name, _shape, values, stored in pairing.tensors_in_a_convention(a, b):
                    p = params.get(name)
                    if p is None:  # stored under another name in the loaded model: a fused or stacked parameter
                        slot = _place(torch, params, name, a)
                        if slot is None:
                            unplaced.append(name)
                            continue
                        pname, index = slot
                        p = params[pname][index]  # a view: copying into it writes the parameter
                        self._placed.setdefault(pname, set()).add(stored)
                    types[name] = stored
                    if p.dim() >= 3:  # a layer's experts stacked in one parameter: its module rounds as one
                        self._placed.setdefault(name, set()).add(stored)
                    src = torch.from_numpy(np.ascontiguousarray(values)).to(p.dtype)
                    if name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
                        emb = self.model.get_input_embeddings().weight
                        if p is emb and not torch.equal(emb, src):
                            self.model.lm_head.weight = torch.nn.Parameter(src.clone(), requires_grad=False)
                            loaded += 1
                            continue
                    p.copy_(src.reshape(p.shape))
                    loaded += 1
            except tensors.WeightsUnreadable as exc:
                raise ModelLoadError(f"{self.path}: the weights of {other} cannot be read into it: {exc}") from exc
            finally:
                a.close()
                b.close()
        if not loaded:
            raise ModelLoadError(f"{self.path}: no tensor of {other} matches a parameter of this checkpoint")
        if unplaced:
            raise TwinUnavailable(
                f"{len(unplaced)} of B's tensors have no place in the model transformers loads from {self.path} "
                f"({', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''}): transformers keeps them under "
                "other names, in a layout this twin could not find by value, so a twin would run A's own values "
                "for them")
        return types

    def _check_open(self) -> None:
        if self.model is None:
            raise ModelLoadError(f"{self.path}: the transformers model was closed.")

    def _find_routers(self) -> list[tuple[int, Any, int]]:
        """(layer, module, output index) of each router: transformers declares which module's output holds a
        mixture-of-experts model's router logits (``_can_record_outputs["router_logits"]``)."""
        rec = (getattr(type(self.model), "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(rec, "target_class", rec)
        if not isinstance(target, type):
            return []
        index = int(getattr(rec, "index", 0) or 0)
        return [(li, mod, index) for li, layer in enumerate(self._layers()) for mod in layer.modules()
                if isinstance(mod, target)]

    def _find_final_norm(self):
        """The module whose input is the last layer's pre-norm output; when the base model names its final norm
        otherwise (LFM2's ``embedding_norm``), the last decoder layer itself, whose output that input is."""
        base = getattr(self.model, self.model.base_model_prefix, None) or self.model.model
        for name in ("norm", "final_layernorm", "ln_f"):
            mod = getattr(base, name, None)
            if mod is not None:
                return mod
        return None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode_piece(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def special_tokens(self) -> dict[str, Any]:
        tok = self.tokenizer
        return special_token_flags(tok.bos_token_id, tok.eos_token_id,
                                   list(tok("a", add_special_tokens=True)["input_ids"]),
                                   list(tok("a", add_special_tokens=False)["input_ids"]))

    def forward(self, tokens: Sequence[int], *, hidden_states: bool = True,
                inject: dict[int, np.ndarray] | None = None) -> ForwardOutput:
        """One sequence. ``inject`` maps layer i to a ``[T, H]`` state that replaces layer i's output
        (layer-swap analysis: feed A's states into B for the first k layers)."""
        torch = self._torch
        self._check_open()
        _check_ids(self.path, tokens, self._n_ids)
        if self.max_positions and len(tokens) > self.max_positions:
            raise ContextLengthError(
                f"{self.path}: a prompt of {len(tokens)} tokens is longer than the model's "
                f"max_position_embeddings ({self.max_positions}); shorten it or use --convdiff-max-tokens."
            )
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        captured: dict[str, Any] = {}
        handles = []
        layers = self._layers()
        if hidden_states and self._final_norm is not None:
            handles.append(self._final_norm.register_forward_pre_hook(
                lambda _m, args: captured.__setitem__("last", args[0].detach())))
        elif hidden_states:
            handles.append(layers[-1].register_forward_hook(
                lambda _m, _args, output: captured.__setitem__(
                    "last", (output[0] if isinstance(output, tuple) else output).detach())))
        outs: list[Any] = [None] * len(layers)
        if hidden_states:  # each layer's own output, as llama.cpp's ``l_out-N`` is: what the model records as
            # its hidden states is not always that (Mamba's list starts after layer 0, with no embeddings entry)
            for li, layer in enumerate(layers[:-1]):
                def keep(_m, _args, output, li=li):
                    outs[li] = (output[0] if isinstance(output, tuple) else output).detach()

                handles.append(layer.register_forward_hook(keep))
        subs: dict[str, list[Any]] = {"attn": [None] * len(layers), "mlp": [None] * len(layers)}
        if hidden_states:
            for li, layer in enumerate(layers):
                for sub, attr in (("attn", "self_attn"), ("mlp", "mlp")):
                    mod = getattr(layer, attr, None)
                    if mod is None:
                        continue

                    def grab(_m, _args, output, sub=sub, li=li):
                        value = output[0] if isinstance(output, tuple) else output
                        subs[sub][li] = value.detach()

                    handles.append(mod.register_forward_hook(grab))
        for idx, state in (inject or {}).items():
            value = torch.as_tensor(np.array(state, dtype=np.float32), device=self.device)  # a copy: A's arrays are read-only maps

            def replace(_m, _args, output, value=value):
                if isinstance(output, tuple):
                    return (value.to(output[0].dtype).unsqueeze(0),) + tuple(output[1:])
                return value.to(output.dtype).unsqueeze(0)

            handles.append(layers[idx].register_forward_hook(replace))
        routers: dict[int, Any] = {}
        for li, mod, index in (self._routers if hidden_states else []):
            def route(_m, _args, output, li=li, index=index):
                value = output[index] if isinstance(output, (tuple, list)) else output
                routers[li] = value.detach().float().reshape(-1, value.shape[-1])

            handles.append(mod.register_forward_hook(route))
        try:
            with hfdir.readable_oom(torch, self.path, f"on a {len(tokens)}-token prompt",
                                    "Lower --convdiff-max-tokens or use dtype=bfloat16."), torch.inference_mode():
                out = self.model(input_ids=ids, output_hidden_states=hidden_states, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        logits = out.logits[0].float().cpu().numpy()
        hidden = None
        if hidden_states:
            if all(o is not None for o in outs[:-1]):
                per_layer = [o[0] for o in outs[:-1]] + [captured["last"][0]]
            else:  # a layer that was never called as a module: what transformers records
                hs = out.hidden_states
                per_layer = [hs[i + 1][0] for i in range(self.num_layers - 1)] + [captured["last"][0]]
            hidden = torch.stack([h.float() for h in per_layer]).cpu().numpy()
            for idx, state in (inject or {}).items():
                # What flows on from an injected layer is the injected state; transformers may record
                # the layer's own output before the replacing hook runs.
                hidden[idx] = np.asarray(state, dtype=np.float32)
        sublayers = {
            name: torch.stack([v[0].float() for v in values]).cpu().numpy()
            for name, values in subs.items() if hidden_states and all(v is not None for v in values)
        }
        return ForwardOutput(logits=logits, hidden=hidden, sublayers=sublayers,
                             router=routing.stack_layers({li: v.cpu().numpy() for li, v in routers.items()},
                                                         self.num_layers, len(tokens)))

    def greedy_decode(self, sequences: Sequence[Sequence[int]], steps: int,
                      pick: Callable[[int, np.ndarray], int]) -> None:
        """Greedy decoding of several prefixes at once on the KV cache: one batched forward over the
        left-padded prefixes, then one batched token per step (``steps`` forwards in all, not
        ``steps x len(sequences)`` nor a whole-prefix forward per token).

        ``pick(i, logits)`` gets sequence i's next-token logits (float32 ``[V]``) and returns the
        token to append. Padding is masked out and positions count from each prefix's first token,
        so a sequence's logits are those it has alone, up to floating-point reassociation.
        """
        torch = self._torch
        seqs = [[int(t) for t in s] for s in sequences]
        if not seqs or steps <= 0:
            return
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._check_open()
        for seq in seqs:
            _check_ids(self.path, seq, self._n_ids)
        oom = hfdir.readable_oom(torch, self.path, f"decoding {len(seqs)} prefixes of up to {width} tokens greedily",
                                 "Lower --convdiff-greedy-tokens or use dtype=bfloat16.")
        # The KV cache is handed back under the name this transformers uses: ``cache`` since 5.x, where
        # ``past_key_values`` (argument and output attribute) is deprecated; ``past_key_values`` before.
        import inspect

        try:
            accepted = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            accepted = {}
        cache_kw = "cache" if "cache" in accepted else "past_key_values"
        # only the last position's logits of the prefixes are read: the output layer skips the others
        last_only = {name: 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in accepted}

        def kv_cache(output: Any) -> Any:
            names = output.keys() if hasattr(output, "keys") else ()
            return output["cache"] if "cache" in names else output.past_key_values

        with oom, torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
            for step in range(steps):
                rows = out.logits[:, -1].float().cpu().numpy()
                chosen = [int(pick(i, rows[i])) for i in range(len(seqs))]
                if step == steps - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=torch.long, device=self.device)], dim=1)
                positions = positions[:, -1:] + 1
                nxt = torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None]
                out = self.model(input_ids=nxt, attention_mask=mask, position_ids=positions,
                                 use_cache=True, **{cache_kw: kv_cache(out)})

    def _layers(self):
        """The decoder layers: the base model's ``layers``, else the module list there with one entry per
        hidden layer (``h`` in Bloom, GPT-2 and Falcon; found by shape, not by name)."""
        base = getattr(self.model, self.model.base_model_prefix, None) or self.model.model
        layers = getattr(base, "layers", None)
        if layers is not None:
            return layers
        torch = self._torch
        found = [m for _, m in base.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == self.num_layers]
        if not found:
            raise ModelLoadError(f"{self.path}: no list of {self.num_layers} decoder layers in "
                                 f"{type(base).__name__}; per-layer states cannot be read. Run it with "
                                 "--convdiff-no-layers.")
        return found[0]

    def close(self) -> None:
        torch = self._torch
        if self.model is not None and self._share_key is not None and _kept_slot:
            for hook in self._emulation:  # the next run of these weights sets its own roundings
                hook.remove()
            self._emulation = []
            _kept_slot[0] = (self._share_key, (self.tokenizer, self.model, self._types, self._placed))
            self.model = None
            self.tokenizer = None
            return
        self.model = None
        self.tokenizer = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- one model for T and T8

_kept_slot: list[Any] = []  # inside ``sharing_weights``: [None] or [(key, (tokenizer, model, types, placed))]


def _share_key(path: Path, opts: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two loads the same model: everything but ``emulate`` (hooks, added and removed)."""
    return (str(Path(path).resolve()), str(Path(opts["weights_from"]).resolve()),
            *(str(opts.get(k)) for k in ("device", "dtype", "gguf_file", "trust_remote_code")))


def _take_kept(key: tuple[Any, ...] | None) -> tuple[Any, Any, dict[str, str], dict[str, set[str]]] | None:
    if key is None or not _kept_slot or _kept_slot[0] is None or _kept_slot[0][0] != key:
        return None
    kept = _kept_slot[0][1]
    _kept_slot[0] = None
    return kept


@contextlib.contextmanager
def sharing_weights() -> Iterator[None]:
    """Runs of one checkpoint with one model's weights (``weights_from``) in a row: T, then T8 (the same with
    ``emulate``). A closed one's model is kept, and the next load of the same checkpoint and weights takes it,
    its roundings set anew, instead of reading and dequantising both files again. On leaving the block
    whatever is kept is freed, so that the next model (B) loads alone, as every model does."""
    outer = bool(_kept_slot)
    if not outer:
        _kept_slot.append(None)
    try:
        yield
    finally:
        if not outer:
            kept = _kept_slot.pop()
            if kept is not None:
                del kept
                import gc

                gc.collect()
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()


def load(path: Path, options: dict[str, Any] | None = None) -> TransformersBackend:
    return TransformersBackend(Path(path), dict(options or {}))


def _detect(path: Path) -> bool:
    """A checkpoint directory (config.json), unless packed for exllama's own kernels (EXL2/EXL3)."""
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and hfdir.quant_method(hfdir.read_json(cfg)) not in ("exl2", "exl3")


def open_weights(path: Path, options: dict[str, Any], role: str) -> Any:
    """The checkpoint's tensors for the weights check: its safetensors, or the GGUF it is loaded from."""
    from . import tensors

    gguf_file = (options or {}).get("gguf_file")
    if gguf_file:
        return tensors.GGUFWeights(path / str(gguf_file))
    method = hfdir.quant_method(hfdir.read_config(path, NAME))
    if method not in (None, "gguf"):  # a GGUF-loaded checkpoint saved by transformers holds plain floats
        raise tensors.WeightsUnreadable(f"{role}'s weights are packed by {method}, which this check does not unpack")
    return tensors.SafetensorsWeights(path)


def read_config(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's configuration for the config check: its files, or the GGUF it is loaded from."""
    gguf_file = (options or {}).get("gguf_file")
    if gguf_file:
        from .gguf_config import read_gguf

        return read_gguf(Path(path) / str(gguf_file))
    from .hf_config import read_hf_dir

    return read_hf_dir(Path(path))


BACKEND = BackendSpec(NAME, __name__, aliases=("hf", "huggingface", "torch"), detect=_detect, priority=0,
                      gpu_option="device", gpu_value=lambda i: f"cuda:{i}", open_weights=open_weights,
                      read_config=read_config)
