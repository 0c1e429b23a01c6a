"""Which tensor of B goes with which of A, and what turns each side's rows into one convention.

A GGUF keeps its tensors under llama.cpp's names (``blk.3.ffn_down.weight``) and in llama.cpp's conventions
(q/k rows permuted for its rope, Gemma's norms stored as 1 + w, experts stacked, fused projections split); a
transformers checkpoint keeps them under its own. The rules, each established from the files under test and
never from a list of architectures:

- names: gguf-py's tensor name map for B's architecture applied to A's names (the union of its maps for an
  architecture it does not know), experts of a stacked tensor as slices (``blk.1.ffn_up_exps.weight[3]``);
- transforms per role (``backends.conventions``): the one that reproduces B in most layers;
- restructurings (``backends.restructure``): a fused tensor split into pieces, or its rows regrouped;
- tied output layers, and tensors that only gained or lost dimensions of size 1.

``plan_pairs`` gives the plan; ``tensors_in_a_convention`` reads B back into A's naming and convention (what
the runtime twin loads). A new structural rule is added here; a new transform in ``backends.conventions``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..core.weight_errors import layer_and_role, rope_unpermute
from . import conventions, ggml, restructure, twin
from .conventions import HF_ARCH, PRIORS
from .tensors import (
    CHUNK_ELEMENTS,
    GGUFWeights,
    SafetensorsWeights,
    Source,
    StoredTensor,
    WeightsUnreadable,
    is_derived,
)

__all__ = ["Pair", "Plan", "Reader", "chunks", "plan_pairs", "tensors_in_a_convention"]

_CONFIG_TENSORS = {n: "llama.cpp's rope frequency factors; transformers computes them from the config (the config "
                      "check compares the rope settings)"
                   for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")}
# safetensors dtype -> (numpy dtype of the stored values, name in the type table)


@dataclass
class Pair:
    """One tensor of the comparison: its name in the common naming, each side's stored tensor, and what
    turns each side's rows into the common convention."""

    name: str
    a: StoredTensor | None
    b: StoredTensor | None
    qk: str | None = None  # "q" or "k": rows in llama.cpp's rope order on a GGUF side
    groups: dict[str, int] = field(default_factory=dict)  # "q"/"k" head count for the permutation
    unpermute: tuple[bool, bool] = (False, False)  # whether A's / B's rows must be rope-unpermuted
    norm_offset: tuple[float, float] = (0.0, 0.0)  # subtracted from A's / B's values
    note: str = ""
    gguf_name: str = ""  # the GGUF side's tensor name (its role decides which transforms are candidates)


@dataclass
class Plan:
    mode: str  # "hf-gguf", "gguf-hf", "gguf-gguf", "hf-hf"
    arch: str | None
    pairs: list[Pair]
    permute_arch: bool  # whether the architecture's q/k are permuted by llama.cpp (for the candidates)
    heads: tuple[int | None, int | None] = (None, None)
    unmatched_b: list[str] = field(default_factory=list)
    not_compared: list[dict[str, str]] = field(default_factory=list)
    conventions: dict[str, conventions.RoleConvention] = field(default_factory=dict)  # role -> established
    # A's tensors the converter split (``backends.restructure``): (A's name, A's shape, the split, B's role -> name)
    splits: list[tuple[str, tuple[int, ...], restructure.Split, dict[str, str]]] = field(default_factory=list)
    # A's tensor name, its shape, how the converter reordered its rows, B's tensor (``restructure.Regroup``)
    regroups: list[tuple[str, tuple[int, ...], restructure.Regroup, str]] = field(default_factory=list)


def gguf_to_hf(arch: str, n_blocks: int, hf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> transformers name, from gguf-py's name map for the architecture applied to the
    transformers names (as transformers' ``get_gguf_hf_weights_map`` does)."""
    from gguf import MODEL_ARCH_NAMES

    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    name_map = tensor_name_map(arch_id, n_blocks) if arch_id is not None else _any_arch_name_map(n_blocks)
    out: dict[str, str] = {}
    for hf in hf_names:
        base, dot, suffix = hf.rpartition(".")
        if not dot:
            continue
        attr, _, kind = suffix.rpartition("_")
        if attr and kind in ("bias", "weight") and (g := name_map.get_name(f"{base}.{attr}")) is not None:
            # a parameter held as an attribute (DeepSeek's ``gate.e_score_correction_bias``): the converter
            # renames it ``gate.e_score_correction.bias`` before the name map, and so is it looked up here
            out[f"{g}.{kind}"] = hf
            continue
        g = name_map.get_name(base)
        if g is not None:
            out[f"{g}.{suffix}"] = hf
        elif (stacked := conventions.expert_name(base, name_map.get_name)) is not None:
            out[f"{stacked[0]}.{suffix}[{stacked[1]}]"] = hf  # one expert of a stacked tensor
    return out


def tensor_name_map(arch_id: Any, n_blocks: int) -> Any:
    """gguf-py's name map for one architecture, leaving gguf-py's shared tables as they were: building a map
    for an architecture with block overrides updates the class-wide block table in place (gguf 0.19), which
    would change every later map in the process (another pair of the session, another architecture)."""
    from gguf import TensorNameMap, get_tensor_name_map

    shared = dict(TensorNameMap.block_mappings_cfg)
    try:
        return get_tensor_name_map(arch_id, n_blocks)
    finally:
        TensorNameMap.block_mappings_cfg.clear()
        TensorNameMap.block_mappings_cfg.update(shared)


class _UnionNameMap:
    """gguf-py's names for a GGUF architecture it does not know yet (an installed gguf older than the converter):
    the union of its maps for every architecture it knows. gguf-py maps a transformers name to one GGUF name
    whatever the architecture (each architecture only selects which tensors it has), and a name pairs only
    with a tensor B has, so the union adds no wrong pair."""

    def __init__(self, n_blocks: int) -> None:
        from gguf import MODEL_ARCH_NAMES

        self.mapping: dict[str, Any] = {}
        for arch_id in MODEL_ARCH_NAMES:
            for key, value in tensor_name_map(arch_id, n_blocks).mapping.items():
                self.mapping.setdefault(key, value)

    def get_name(self, key: str) -> str | None:
        hit = self.mapping.get(key)
        return hit[1] if hit is not None else None


@functools.lru_cache(maxsize=4)
def _any_arch_name_map(n_blocks: int) -> _UnionNameMap:
    return _UnionNameMap(n_blocks)


def _n_blocks(src: Source) -> int:
    if isinstance(src, GGUFWeights):
        n = src.meta("block_count")
        if n:
            return int(n)
    layers = [layer_and_role(n)[0] for n in src.tensors]
    return max((i for i in layers if i is not None), default=-1) + 1


def qk_kind(gguf_name: str) -> str | None:
    if ".attn_q." in gguf_name:
        return "q"
    if ".attn_k." in gguf_name:
        return "k"
    return None


def plan_pairs(a: Source, b: Source) -> Plan:
    """Which tensor of B goes with which of A, in which naming, with which transforms undone."""
    if isinstance(a, SafetensorsWeights) and isinstance(b, SafetensorsWeights):
        return _plan_same(a, b, "hf-hf")
    if isinstance(a, GGUFWeights) and isinstance(b, GGUFWeights):
        return _plan_same(a, b, "gguf-gguf")
    hf, gg = (a, b) if isinstance(a, SafetensorsWeights) else (b, a)
    assert isinstance(gg, GGUFWeights) and isinstance(hf, SafetensorsWeights)
    arch = gg.arch
    prior = PRIORS.get(arch)
    hf_names = list(hf.tensors)
    g2h = gguf_to_hf(arch, _n_blocks(gg), hf_names)
    head = "lm_head.weight"
    if "output.weight" not in g2h and "output.weight" in gg.tensors:
        g2h["output.weight"] = head  # the HF side ties its head: compared with its embedding below
    h2g = {h: g for g, h in g2h.items()}
    a_is_hf = hf is a
    plan = Plan("hf-gguf" if a_is_hf else "gguf-hf", arch, [], False, gg.heads(None))
    gside = 1 if a_is_hf else 0  # which side is the GGUF
    gname = "B" if a_is_hf else "A"
    embed_hf = g2h.get("token_embd.weight")
    stacked_used: set[str] = set()
    for name in hf_names:
        g = h2g.get(name)
        if g is None:
            if a_is_hf:
                plan.not_compared.append({"name": name, "why": "no GGUF tensor corresponds to it in gguf-py's name map"})
            else:
                plan.unmatched_b.append(name)
            continue
        pair = Pair(name, None, None, gguf_name=g)
        gg_t = _gguf_tensor(gg, g, stacked_used)
        if gg_t is None and g == "output.weight" and "token_embd.weight" in gg.tensors:
            gg_t = gg.tensors["token_embd.weight"]
            pair.note = f"{gname} has no output.weight: llama.cpp uses its token_embd.weight as the output layer (tied)"
        pair.a, pair.b = (hf.tensors[name], gg_t) if a_is_hf else (gg_t, hf.tensors[name])
        same_view(pair)
        plan.pairs.append(pair)
    plan.conventions = conventions.establish([q for q in plan.pairs if q.a is not None and q.b is not None],
                                             lambda q: _sample(hf, gg, q, gside), prior)
    for pair in plan.pairs:
        _apply_convention(pair, plan.conventions.get(layer_and_role(pair.gguf_name)[1]), gg, gside)
    plan.permute_arch = any(c.transform == conventions.ROPE_PERMUTE for c in plan.conventions.values())
    if head not in hf.tensors and "output.weight" in gg.tensors and embed_hf in hf.tensors:
        hname = "A" if a_is_hf else "B"
        p = Pair(head, None, None, note=f"{hname} ties its output layer to {embed_hf}, so {gname}'s output.weight "
                                        "must be that embedding")
        hf_t, gg_t = hf.tensors[embed_hf], gg.tensors["output.weight"]
        p.a, p.b = (hf_t, gg_t) if a_is_hf else (gg_t, hf_t)
        plan.pairs.append(p)
    if a_is_hf:
        _pair_regroups(plan, hf, gg)
        _pair_splits(plan, hf, gg, [n for n in gg.tensors if n not in g2h and n not in stacked_used], stacked_used)
    unmapped = [n for n in gg.tensors if n not in g2h and n not in stacked_used]
    if a_is_hf:
        plan.unmatched_b = sorted(unmapped)
    else:  # A is the GGUF: a tensor of it that B lacks is missing, unless transformers derives it from the config
        for name in unmapped:
            if name in _CONFIG_TENSORS:
                plan.not_compared.append({"name": name, "why": _CONFIG_TENSORS[name]})
            else:
                plan.pairs.append(Pair(name, gg.tensors[name], None))
    for name, why in hf.skipped.items():
        plan.not_compared.append({"name": name, "why": why})
    return plan


def _leading_rows(src: Source, t: StoredTensor, n: int) -> np.ndarray:
    """A tensor's first ``n`` rows along its first axis, as a matrix (a vector as one column)."""
    if len(t.shape) == 1:
        return src.read(t, 0, t.rows).reshape(-1, 1)[:n]
    return src.read(t, 0, n).reshape(n, -1)


def _pair_regroups(plan: Plan, hf: SafetensorsWeights, gg: GGUFWeights) -> None:
    """Pairs of one shape whose rows the converter reordered (``restructure.Regroup``: a fused projection kept
    per head in A, grouped by part in B). Tried for a role whose first layer the plain pairing does not explain;
    the role's convention is what most of its layers show, as for every transform, so a layer that breaks it is
    that layer's defect. A's side becomes A's values reordered (held in memory), B's is read as stored."""
    by_role: dict[str, list[Pair]] = {}
    for q in plan.pairs:
        if (q.a is None or q.b is None or is_derived(q.a) or q.qk or any(q.norm_offset) or not q.gguf_name
                or "[" in q.gguf_name or q.a.shape != q.b.shape or len(q.a.shape) > 2):
            continue
        layer, role = layer_and_role(q.gguf_name)
        if layer is not None and restructure.regroups(q.a.shape[0], gg.heads(layer)):
            by_role.setdefault(role, []).append(q)

    def errors(q: Pair) -> dict[restructure.Regroup | None, float]:
        heads = gg.heads(layer_and_role(q.gguf_name)[0])
        rows = q.a.shape[0]
        n = restructure.regroup_sample(rows, heads)
        a, b = _leading_rows(hf, q.a, n), _leading_rows(gg, q.b, n)
        return {g: restructure.regroup_error(a, b, rows, g) for g in [None, *restructure.regroups(rows, heads)]}

    for role, members in by_role.items():
        members.sort(key=lambda q: layer_and_role(q.gguf_name)[0] or 0)
        try:
            if errors(members[0])[None] <= conventions.EXPLAINED:
                continue  # the plain pairing explains it: nothing was reordered
            per_layer = [errors(q) for q in members]
        except (WeightsUnreadable, ggml.GGMLUnavailable, ValueError, RuntimeError):
            continue
        wins = Counter(min(e, key=lambda g: e[g]) for e in per_layer)
        best, n_best = wins.most_common(1)[0]
        mine = [e[best] for e in per_layer if best in e]
        if best is None or n_best * 2 <= len(members) or float(np.median(mine)) > conventions.EXPLAINED:
            continue
        for q in members:
            assert q.a is not None and q.b is not None
            x = hf.read(q.a, 0, q.a.rows).reshape(q.a.shape)
            plan.regroups.append((q.name, q.a.shape, best, q.b.name))
            q.a = hf.add_derived(q.name, best.apply(x), q.a)
            q.note = f"A's {best.describe()}, as the converter writes them"
        plan.conventions[role] = conventions.RoleConvention(
            role, best.describe(), None, len(members), n_best, True,
            {"none": float(np.median([e[None] for e in per_layer])), best.describe(): float(np.median(mine))})


def _pair_splits(plan: Plan, hf: SafetensorsWeights, gg: GGUFWeights, unmapped: list[str], used: set[str]) -> None:
    """A's tensors that B lacks, paired with B's tensors that A lacks where the converter split one into the
    others (``backends.restructure``): each piece becomes a pair whose A side is A's values cut the same way."""
    missing = [q for q in plan.pairs if q.b is None and q.a is not None and not is_derived(q.a)]
    # a pair the name map made whose layouts differ (gpt-oss's experts, transposed per expert): B's tensor is
    # a candidate piece like any unmatched one
    relaid = [q for q in plan.pairs if q.a is not None and q.b is not None and not is_derived(q.a)
              and shape_problem(q) and math.prod(q.a.shape) == math.prod(q.b.shape)]
    for q in relaid:
        missing.append(q)
        unmapped = [*unmapped, q.b.name]
    # A's tensors no name maps (GraniteMoE's fused ``input_linear``: gate and up of every expert in one)
    unnamed = {d["name"]: d for d in plan.not_compared if d["name"] in hf.tensors}
    missing += [Pair(n, hf.tensors[n], None) for n in unnamed]
    if not missing or not unmapped:
        return

    def reader(src: Source) -> Any:
        """The first 1/parts of a tensor's rows (its first head), or all of them when they do not divide."""
        def read(name: str, parts: int = 1) -> np.ndarray:
            t = src.tensors[name]
            return src.read(t, 0, t.rows // parts if t.rows % parts == 0 else t.rows)
        return read

    read_a, read_b = reader(hf), reader(gg)

    try:
        found = restructure.establish([(q.name, q.a.shape) for q in missing],
                                      [(n, gg.tensors[n].shape) for n in unmapped], read_a, read_b,
                                      conventions.EXPLAINED)
    except (WeightsUnreadable, ggml.GGMLUnavailable, ValueError, RuntimeError):
        return  # unreadable here: the tensors stay unpaired, as they were
    by_name = {q.name: q for q in missing}
    for f in found:
        role = ""
        for _layer, (a_name, pieces) in sorted(f.layers.items(), key=lambda kv: kv[0] or 0):
            old = by_name.get(a_name)
            if old is None:
                continue
            if old in plan.pairs:
                plan.pairs.remove(old)
            if a_name in unnamed:
                plan.not_compared.remove(unnamed[a_name])
            role = layer_and_role(old.gguf_name)[1] if old.gguf_name else f.role_a
            x = read_a(a_name)
            note = f"A's {a_name}, {f.split.describe()}, as the converter writes it"
            for piece in f.split.pieces:
                b_name = pieces[piece.role]
                # stacked experts are then compared expert by expert, as every other pair (``per_expert``)
                cut = hf.add_derived(f"{a_name}[{piece.role.removesuffix('.weight')}]",
                                     restructure.cut(x, f.split, piece), old.a)
                plan.pairs.append(Pair(cut.name, cut, gg.tensors[b_name], gguf_name=b_name, note=note))
                used.add(b_name)
            plan.splits.append((a_name, old.a.shape, f.split, pieces))
        if role:
            plan.conventions[role] = conventions.RoleConvention(
                role, f.split.describe(), None, len(f.layers), len(f.layers), True, {f.split.describe(): f.error})


def same_view(pair: Pair) -> None:
    """Read a tensor that only gained or lost dimensions of size 1 (Qwen2-MoE's shared-expert gate, (1, n) in
    transformers, (n,) once quantised) in the other side's 2-D view: the same values in the same order. Only a
    float type's bytes can be re-viewed; a quantised one's blocks run along its stored rows."""
    a, b = pair.a, pair.b
    if a is None or b is None or (a.rows, a.cols) == (b.rows, b.cols) or a.shape == b.shape:
        return
    if tuple(d for d in a.shape if d != 1) != tuple(d for d in b.shape if d != 1):
        return
    if b.type in twin.FLOAT_TYPES:
        pair.b = replace(b, shape=a.shape, rows=a.rows, cols=a.cols)
    elif a.type in twin.FLOAT_TYPES:
        pair.a = replace(a, shape=b.shape, rows=b.rows, cols=b.cols)


def _gguf_tensor(gg: GGUFWeights, name: str, stacked_used: set[str]) -> StoredTensor | None:
    """The GGUF tensor of a name, or one expert's slice of a stacked tensor (``blk.1.ffn_gate_exps.weight[3]``)."""
    if name in gg.tensors or not name.endswith("]"):
        return gg.tensors.get(name)
    stacked, _, expert = name[:-1].rpartition("[")
    t = gg.tensors.get(stacked)
    if t is None:
        return None
    stacked_used.add(stacked)
    return conventions.expert_slice(t, int(expert))


def _sample(hf: SafetensorsWeights, gg: GGUFWeights, pair: Pair, gside: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A small sample of both sides of a pair whose transform is in doubt, for ``conventions.establish``: the
    first head's rows of q/k (the rope permutation acts within each head), a norm vector whole."""
    t_hf, t_gg = (pair.a, pair.b) if gside == 1 else (pair.b, pair.a)
    assert t_hf is not None and t_gg is not None
    if (t_hf.rows, t_hf.cols) != (t_gg.rows, t_gg.cols):
        return None
    rows = t_hf.rows
    kind = qk_kind(pair.gguf_name)
    if kind:
        n_head, n_kv = gg.heads(layer_and_role(pair.gguf_name)[0])
        n = (n_head if kind == "q" else n_kv) or 0
        if not check_groups(rows, n):
            return None
        rows = rows // n
    elif t_hf.rows * t_hf.cols > CHUNK_ELEMENTS:
        return None
    try:
        return (hf.read(t_hf, 0, rows).reshape(rows, -1), gg.read(t_gg, 0, rows).reshape(rows, -1), 1)
    except (WeightsUnreadable, ggml.GGMLUnavailable, ValueError, RuntimeError):  # RuntimeError: sketches only
        return None


def _apply_convention(pair: Pair, role: conventions.RoleConvention | None, gg: GGUFWeights, gside: int) -> None:
    """Set the pair's transforms from its role's established convention."""
    if role is None or pair.a is None or pair.b is None:
        return
    kind = qk_kind(pair.gguf_name)
    if kind and role.transform == conventions.ROPE_PERMUTE:
        n_head, n_kv = gg.heads(layer_and_role(pair.gguf_name)[0])
        pair.qk, pair.groups = kind, {"q": n_head or 0, "k": n_kv or 0}
        pair.unpermute = (gside == 0, gside == 1)
    if role.transform == conventions.NORM_PLUS_ONE:
        pair.norm_offset = (1.0, 0.0) if gside == 0 else (0.0, 1.0)


def _plan_same(a: Source, b: Source, mode: str) -> Plan:
    """Two models in the same naming: tensors pair by name; a tied output pairs with the embedding."""
    if mode == "hf-hf":
        assert isinstance(a, SafetensorsWeights)
        arch = HF_ARCH.get(str(a.config.get("model_type") or ""))
        n_head = a.config.get("num_attention_heads")
        n_kv = a.config.get("num_key_value_heads") or n_head
        heads = (int(n_head) if n_head else None, int(n_kv) if n_kv else None)
        head = "lm_head.weight"
        embed = next((n for n in list(a.tensors) + list(b.tensors) if n.endswith(("embed_tokens.weight", "wte.weight"))),
                     None)
    else:
        assert isinstance(a, GGUFWeights)
        arch = a.arch
        heads = a.heads(None)
        head, embed = "output.weight", "token_embd.weight"
    conv = PRIORS.get(arch or "")
    plan = Plan(mode, arch, [], bool(conv and conv.permute_qk), heads)
    for name, ta in a.tensors.items():
        tb = b.tensors.get(name)
        pair = Pair(name, ta, tb)
        if tb is None and name == head and embed and embed in b.tensors:
            pair.b = b.tensors[embed]
            pair.note = f"B has no {head}: it ties its output layer to {embed}"
        plan.pairs.append(pair)
    if head not in a.tensors and head in b.tensors and embed and embed in a.tensors:
        plan.pairs.append(Pair(head, a.tensors[embed], b.tensors[head],
                               note=f"A ties its output layer to {embed}, so B's {head} must be that embedding"))
    plan.unmatched_b = sorted(n for n in b.tensors if n not in a.tensors and n != head)
    for src, role in ((a, "A"), (b, "B")):
        for name, why in getattr(src, "skipped", {}).items():
            plan.not_compared.append({"name": name, "why": f"{role}: {why}"})
    if plan.permute_arch:
        for pair in plan.pairs:
            kind = qk_kind(pair.name) if mode == "gguf-gguf" else (
                "q" if ".q_proj." in pair.name else "k" if ".k_proj." in pair.name else None)
            if kind:
                layer = layer_and_role(pair.name)[0]
                h = a.heads(layer) if isinstance(a, GGUFWeights) else heads
                pair.qk, pair.groups = kind, {"q": h[0] or 0, "k": h[1] or 0}
    return plan



# --------------------------------------------------------------------------- reading one pair


class Reader:
    """One side of a pair in the common convention: rows dequantised, rope-unpermuted, norm offset removed."""

    def __init__(self, src: Source, t: StoredTensor, unpermute_groups: int, offset: float) -> None:
        self.src, self.t, self.groups, self.offset = src, t, unpermute_groups, offset

    def rows(self, r0: int, r1: int) -> np.ndarray:
        x = self.src.read(self.t, r0, r1)
        if self.groups:
            per = self.t.rows // self.groups
            x = rope_unpermute(x, (r1 - r0) // per)
        if self.offset:
            x = x - np.float32(self.offset)
        return x


def chunks(rows: int, cols: int, align: int) -> Iterator[tuple[int, int]]:
    step = max(align, (CHUNK_ELEMENTS // max(cols, 1)) // align * align)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def perm_groups(pair: Pair) -> int:
    return pair.groups.get(pair.qk or "", 0) if pair.qk else 0


def check_groups(rows: int, n: int) -> bool:
    return n > 0 and rows % n == 0 and (rows // n) % 2 == 0


def shape_problem(pair: Pair) -> str | None:
    a, b = pair.a, pair.b
    assert a is not None and b is not None
    if a.shape == b.shape or (a.rows, a.cols) == (b.rows, b.cols):
        return None
    if len(a.shape) == 2 and tuple(reversed(a.shape)) == b.shape:
        return f"B's shape {b.shape} is A's {a.shape} transposed"
    return f"B's shape {b.shape} differs from A's {a.shape}"


def per_expert(pair: Pair) -> list[Pair]:
    """A pair of stacked expert tensors stored whole on both sides (transformers' 3-D expert parameter and
    llama.cpp's ``_exps``), as one pair per expert: a failure then names the expert."""
    a, b = pair.a, pair.b
    if (a is None or b is None or len(a.shape) != 3 or a.shape != b.shape or pair.qk
            or not (pair.gguf_name or b.name).endswith("_exps.weight")):
        return [pair]
    out = []
    for e in range(a.shape[0]):
        sa, sb = conventions.expert_slice(a, e), conventions.expert_slice(b, e)
        if sa is None or sb is None:
            return [pair]
        out.append(replace(pair, name=f"{pair.name}[{e}]", a=sa, b=sb, gguf_name=sb.name))
    return out



# --------------------------------------------------------------------------- the runtime twin's weights



def tensors_in_a_convention(a: Source, b: Source) -> Iterator[tuple[str, tuple[int, ...], np.ndarray, str]]:
    """B's tensors, whole, under A's names and in A's convention (q/k rows back in transformers' order,
    Gemma's norm offset removed, B's output layer for A's tied one): what A's architecture loads to run
    with B's weights (the runtime twin). (name, A's shape, float32 values, B's storage type); tensors B lacks
    are skipped."""
    plan = plan_pairs(a, b)
    for a_name, shape, split, pieces in plan.splits:  # B's pieces joined back into the tensor A stores
        values = {role: b.read(b.tensors[n], 0, b.tensors[n].rows) for role, n in pieces.items()}
        yield a_name, shape, restructure.join(split, values, shape), b.tensors[next(iter(pieces.values()))].type
    for a_name, shape, regroup, b_name in plan.regroups:  # B's rows back in A's order
        t = b.tensors[b_name]
        yield a_name, shape, regroup.invert(b.read(t, 0, t.rows).reshape(shape)), t.type
    for pair in plan.pairs:
        if pair.a is None or pair.b is None or shape_problem(pair) or is_derived(pair.a):
            continue
        n = perm_groups(pair)
        if pair.qk and not check_groups(pair.a.rows, n):
            n = 0
        rb = Reader(b, pair.b, n if pair.unpermute[1] else 0, pair.norm_offset[1])
        values = np.concatenate([rb.rows(r0, r1).reshape(r1 - r0, pair.a.cols)
                                 for r0, r1 in chunks(pair.a.rows, pair.a.cols, pair.a.rows // n if n else 1)])
        yield pair.name, pair.a.shape, values.reshape(pair.a.shape), pair.b.type
