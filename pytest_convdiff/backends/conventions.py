"""What llama.cpp's converter did to each tensor role, established from the two files, and how experts pair.

A GGUF stores some tensors in another convention than the transformers checkpoint it was converted from:
q/k rows reordered for llama.cpp's rope (``LlamaModel.permute``), RMSNorm weights stored as 1 + w (Gemma and
others whose norm computes x * (1 + w)). Which architecture gets which is written in the converter's model
classes, about 150 of them, and changes with its versions. So no table decides it here. For each tensor
role (``attn_q.weight``, ``ffn_norm.weight``, ...) whose converter transform is in doubt, every candidate
transform is tried on every layer's tensor, on a small sample of it (one head of q/k rows, a norm vector
whole). The role's convention is the candidate that reproduces B best in most layers, because a converter
applies a transform to a role uniformly. A layer that breaks its role's convention is then a defect that
the weights check localises there (B's tensor is not its twin, and the candidate it does match is named).

The table of conventions known from the converter's sources (``PRIORS``) is kept as a prior. It breaks
ties, and it is verified: a role whose files contradict it in every layer is reported, and so is a role
that no candidate explains (it is "not verified", and the runtime twin and the other checks judge the
pair). A transform that is wrong in every layer (a converter that forgot the permutation everywhere)
looks like a convention here. The runtime twin catches that case: it runs A's code with B's tensors
brought back by the established convention, and llama.cpp's rope then disagrees with it.

Experts: the converter stacks the per-expert matrices of a mixture-of-experts layer
(``mlp.experts.3.gate_proj``, Mixtral's ``block_sparse_moe.experts.3.w1``) into one 3-D tensor
(``blk.N.ffn_gate_exps``: expert, rows, columns). ``expert_name`` finds a per-expert name's stacked
counterpart through gguf-py's name map, and ``expert_slice`` gives expert e's rows of the stacked tensor as
a tensor of its own, so each expert is compared, and named, as itself.

No torch and no pytest: numpy and the GGUF/safetensors readers of ``backends.tensors``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..core.weight_errors import layer_and_role, relative_error, rope_permute

__all__ = ["HF_ARCH", "NONE", "NORM_PLUS_ONE", "PRIORS", "ROPE_PERMUTE", "Convention", "RoleConvention",
           "candidates", "establish", "expert_name", "expert_slice"]

NONE, ROPE_PERMUTE, NORM_PLUS_ONE = "none", "rope-permute", "norm+1"
# A candidate explains a layer when it brings A within this relative error of B: above the error of any
# quantisation type llama.cpp writes (Q2_K's is about 0.4, IQ1's about 0.6), and below what a wrong row order
# gives (about 1.4: two unrelated rows) or a wrong offset on a norm (about 1 where the weights are near 1).
EXPLAINED = 0.8


@dataclass(frozen=True)
class Convention:
    """What llama.cpp's converter does to an architecture's tensors beyond renaming them (a prior)."""

    permute_qk: bool = False  # q/k rows reordered for llama.cpp's rope (LlamaModel.permute)
    norm_offset: float = 0.0  # GGUF norm weight = HF norm weight + offset (Gemma's RMSNorm computes x * (1 + w))


# GGUF architecture -> convention, from convert_hf_to_gguf.py (LlamaModel and its subclasses with undo_permute,
# GemmaModel/Gemma2Model/Gemma3Model's norm shift) and transformers' GGUF loader, which undoes the same. A prior:
# ``establish`` verifies it on the files and decides without it for every other architecture.
PRIORS: dict[str, Convention] = {
    "llama": Convention(permute_qk=True),
    "arcee": Convention(permute_qk=True),
    "smollm3": Convention(permute_qk=True),
    "qwen2": Convention(),
    "qwen3": Convention(),
    "gemma": Convention(norm_offset=1.0),
    "gemma2": Convention(norm_offset=1.0),
    "gemma3": Convention(norm_offset=1.0),
}
# transformers model_type -> GGUF architecture, for comparing two transformers checkpoints of these
HF_ARCH = {"llama": "llama", "mistral": "llama", "arcee": "arcee", "smollm3": "smollm3", "qwen2": "qwen2",
           "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


def candidates(gguf_name: str) -> tuple[str, ...]:
    """The transforms llama.cpp's converter may have applied to a tensor of this role (first: none)."""
    if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
        return (NONE, ROPE_PERMUTE)
    if gguf_name.endswith("norm.weight"):
        return (NONE, NORM_PLUS_ONE)
    return (NONE,)


def _prior(conv: Convention | None, gguf_name: str) -> str | None:
    if conv is None:
        return None
    if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
        return ROPE_PERMUTE if conv.permute_qk else NONE
    if gguf_name.endswith("norm.weight"):
        return NORM_PLUS_ONE if conv.norm_offset else NONE
    return NONE


@dataclass
class RoleConvention:
    """One role's established transform: what most layers show, what the prior said, and how sure."""

    role: str
    transform: str
    prior: str | None
    layers: int  # tensors of this role tried
    agree: int  # of which the established transform reproduces best
    explained: bool  # the transform brings A within EXPLAINED of B in the agreeing layers
    errors: dict[str, float] = field(default_factory=dict)  # candidate -> median relative error over layers
    dissent: list[str] = field(default_factory=list)  # tensors whose best candidate is another one

    @property
    def contradicts_prior(self) -> bool:
        """The files show another transform than the prior in every layer (not one layer's defect)."""
        return self.prior is not None and self.transform != self.prior and self.agree == self.layers

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "transform": self.transform, "prior": self.prior, "layers": self.layers,
                "agree": self.agree, "explained": self.explained, "errors": self.errors,
                "dissent": self.dissent[:8], "contradicts_prior": self.contradicts_prior}


def _apply(transform: str, x: np.ndarray, heads_in_sample: int) -> np.ndarray:
    """A's rows in the GGUF convention under ``transform`` (the converter's forward direction)."""
    if transform == ROPE_PERMUTE:
        return rope_permute(x, heads_in_sample)
    if transform == NORM_PLUS_ONE:
        return x + np.float32(1.0)
    return x


# Sample: (hf rows, gguf rows, heads in them), or None when the tensor cannot be tried.
Sampler = Callable[[Any], "tuple[np.ndarray, np.ndarray, int] | None"]


def establish(pairs: list[Any], sample: Sampler, prior: Convention | None) -> dict[str, RoleConvention]:
    """Each role's convention from the files: ``pairs`` carry ``gguf_name`` (the GGUF side's name), and
    ``sample(pair)`` reads a small sample of both sides. Roles with one candidate only are left out."""
    by_role: dict[str, list[Any]] = {}
    for p in pairs:
        if len(candidates(p.gguf_name)) > 1:
            by_role.setdefault(layer_and_role(p.gguf_name)[1], []).append(p)
    out: dict[str, RoleConvention] = {}
    for role, members in by_role.items():
        cands = candidates(members[0].gguf_name)
        pri = _prior(prior, members[0].gguf_name)
        errors: dict[str, list[float]] = {c: [] for c in cands}
        best: list[tuple[Any, str]] = []
        for p in members:
            s = sample(p)
            if s is None:
                continue
            hf_rows, gguf_rows, heads = s
            errs = {c: relative_error(gguf_rows, _apply(c, hf_rows, heads)) for c in cands}
            for c, e in errs.items():
                errors[c].append(e)
            # the prior (else no transform) wins an exact tie, e.g. a norm that is 0 on both sides
            order = sorted(cands, key=lambda c: (errs[c], c != (pri or NONE)))
            best.append((p, order[0]))
        if not best:  # nothing readable (a saved reference keeps only sketches of A): the prior, unverified
            if pri is not None:
                out[role] = RoleConvention(role, pri, pri, 0, 0, explained=False)
            continue
        votes = Counter(c for _, c in best)
        top = max(votes.values())
        leaders = [c for c in cands if votes[c] == top]
        chosen = pri if pri in leaders else leaders[0]
        mine = [i for i, (_, c) in enumerate(best) if c == chosen]
        chosen_errors = [errors[chosen][i] for i in mine]
        out[role] = RoleConvention(
            role, chosen, pri, len(best), len(mine),
            explained=bool(chosen_errors) and float(np.median(chosen_errors)) <= EXPLAINED,
            errors={c: float(np.median(v)) for c, v in errors.items() if v},
            dissent=[p.name for p, c in best if c != chosen])
    return out


_EXPERT = re.compile(r"^(?P<pre>.+\.experts)\.(?P<e>\d+)\.(?P<rest>.+)$")


def expert_name(hf_base: str, lookup: Callable[[str], str | None]) -> tuple[str, int] | None:
    """(the stacked GGUF base name, the expert id) of a per-expert transformers name without its suffix
    (``model.layers.1.mlp.experts.3.gate_proj`` -> (``blk.1.ffn_gate_exps``, 3)), through ``lookup``
    (gguf-py's name map); None for any other name."""
    m = _EXPERT.match(hf_base)
    if m is None:
        return None
    stacked = lookup(f"{m.group('pre')}.{m.group('rest')}")
    return (stacked, int(m.group("e"))) if stacked else None


def expert_slice(t: Any, expert: int) -> Any | None:
    """Expert ``expert``'s rows of a stacked (expert, rows, columns) tensor, as a tensor of its own whose name
    says which expert it is (``blk.1.ffn_gate_exps.weight[3]``); None when the tensor has no such expert."""
    if len(t.shape) != 3 or not 0 <= expert < t.shape[0] or t.rows % t.shape[0]:
        return None
    per = t.rows // t.shape[0]
    row_bytes = t.nbytes // t.rows
    return replace(t, name=f"{t.name}[{expert}]", shape=tuple(t.shape[1:]), offset=t.offset + expert * per * row_bytes,
                   nbytes=per * row_bytes, rows=per)
