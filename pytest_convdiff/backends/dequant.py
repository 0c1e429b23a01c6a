"""Read two models' weights one tensor (a chunk of rows) at a time, in one naming and one convention.

A GGUF keeps its tensors under llama.cpp's names (``blk.3.ffn_down.weight``) and in llama.cpp's
conventions (q/k rows permuted for its rope, Gemma's norms stored as 1 + w); a transformers checkpoint
keeps them under its own. To compare them tensor by tensor, B's tensors are dequantised and brought
into A's naming and convention the way transformers' GGUF loader does (gguf-py's tensor name map for
the architecture, then the reverse of each transform the converter applied). Everything is read
through memory maps a block of rows at a time, as float32: a 70B model's weights are never all in
memory, only one chunk of one tensor pair and a small fixed sample (sketch) of each tensor.

No pytest here and no torch: numpy, the ``gguf`` package (for its name maps and dequantisers) and the
project's own GGUF header reader; safetensors files are read from their (JSON) header and a memory map.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.weight_errors import (
    Sketch,
    TensorStats,
    expected_error,
    layer_and_role,
    pair_expected_error,
    rope_permute,
    rope_unpermute,
    sample_error,
)
from . import conventions, ggml, gguf_header, restructure, twin
from .conventions import HF_ARCH, PRIORS, Convention
from .imatrix import ImportanceMatrix
from .twin import TwinStats

__all__ = ["CONVENTIONS", "Convention", "GGUFWeights", "SafetensorsWeights", "StoredTensor", "WeightsUnreadable",
           "measure_weights"]

CHUNK_ELEMENTS = 1 << 22  # entries per side per chunk (16 MiB as float32)
CANDIDATE_RATIO = 0.5  # an alternative explains B when its error is at most half of B's own error


class WeightsUnreadable(Exception):
    """This side's weights cannot be compared here; the message says why (the items skip with it)."""


CONVENTIONS = PRIORS  # the converter's known conventions: a prior that backends.conventions verifies
# GGUF tensors that a transformers checkpoint does not store (its config describes them)
_CONFIG_TENSORS = {n: "llama.cpp's rope frequency factors; transformers computes them from the config (the config "
                      "check compares the rope settings)"
                   for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")}
# safetensors dtype -> (numpy dtype of the stored values, name in the type table)
_ST_DTYPES = {"F64": ("<f8", "F64"), "F32": ("<f4", "F32"), "F16": ("<f2", "F16"), "BF16": ("<u2", "BF16")}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored: its name in its file, numpy-order shape, storage type, and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    type: str
    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int
    rows: int  # the 2-D view the comparison streams: (rows, cols)
    cols: int


def _view(shape: tuple[int, ...], block: int = 1) -> tuple[int, int]:
    """A tensor's 2-D view: leading dims as rows; a 1-D tensor as a column (rows are what chunks split and
    what llama.cpp's q/k permutation moves), unless its type packs blocks along it."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return (shape[0], 1) if block == 1 else (1, shape[0])
    return math.prod(shape[:-1]), shape[-1]


DERIVED = Path("<derived>")  # the "files" of tensors held in memory (``SafetensorsWeights.add_derived``)


def _derived(t: StoredTensor) -> bool:
    return t.file.parent == DERIVED


class _Maps:
    """One read-only memory map per file, opened on first use."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap] = {}

    def get(self, path: Path) -> np.memmap:
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[path]

    def close(self) -> None:
        self._maps.clear()


def _ggml_ready() -> bool:
    from . import ggml

    return ggml.available() is None


class GGUFWeights:
    """A GGUF file (or the shards of a split one): tensor table from the header, data through a memory map,
    rows dequantised by gguf-py."""

    kind = "gguf"

    def __init__(self, path: str | Path) -> None:
        import gguf  # noqa: F401 - fail early with a readable reason when missing

        self.path = Path(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.kv: dict[str, Any] = {}
        for shard in gguf_header.shard_files(self.path):
            hdr = gguf_header.read_header(shard)
            if not self.kv:
                self.kv = hdr.kv
            for name, ne, ttype, offset in hdr.tensors:
                tname, block, nbytes = gguf_header.GGML_TYPES.get(ttype, (f"type {ttype}", 0, 0))
                shape = tuple(int(d) for d in reversed(ne))
                n = math.prod(shape) if shape else 1
                size = n // block * nbytes if block else 0
                r, c = _view(shape, block or 1)
                self.tensors[name] = StoredTensor(name, shape, tname, shard, hdr.data_start + offset, size, r, c)
        self.arch = str(self.kv.get("general.architecture") or "")
        self._maps = _Maps()

    def meta(self, key: str, layer: int | None = None) -> Any:
        v = self.kv.get(f"{self.arch}.{key}")
        if isinstance(v, list):
            return v[layer] if layer is not None and layer < len(v) else (v[0] if v else None)
        return v

    def heads(self, layer: int | None) -> tuple[int | None, int | None]:
        n_head = self.meta("attention.head_count", layer)
        n_kv = self.meta("attention.head_count_kv", layer) or n_head
        return (int(n_head) if n_head else None), (int(n_kv) if n_kv else None)

    def raw(self, t: StoredTensor, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the tensor's 2-D view as stored: (rows, bytes per row)."""
        return np.asarray(self._maps.get(t.file)[t.offset:t.offset + t.nbytes].reshape(t.rows, -1)[r0:r1])

    def read(self, t: StoredTensor, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the tensor's 2-D view, dequantised to float32 (by llama.cpp's own ``to_float``
        where its library is installed, so that B and its re-quantisation twin are read the same way)."""
        raw = self.raw(t, r0, r1)
        if t.type == "F64":
            return raw.view("<f8").astype(np.float32)
        if t.type == "F32":
            return raw.view("<f4").reshape(r1 - r0, t.cols).copy()
        if t.type == "F16":
            return raw.view("<f2").reshape(r1 - r0, t.cols).astype(np.float32)
        if _ggml_ready():
            from . import ggml

            try:
                return ggml.dequantize(t.type, raw, t.cols)
            except ggml.GGMLUnavailable:
                pass
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            qtype = GGMLQuantizationType[t.type]
        except KeyError:
            raise WeightsUnreadable(f"gguf-py does not know the tensor type {t.type}") from None
        out = dequantize(np.asarray(raw), qtype)
        return np.asarray(out, dtype=np.float32).reshape(r1 - r0, t.cols)

    def close(self) -> None:
        self._maps.close()


class SafetensorsWeights:
    """A transformers checkpoint's ``*.safetensors`` files: header JSON, data through a memory map (bf16
    widened to float32 by bit shift, so no torch is needed)."""

    kind = "safetensors"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = self._files()
        if not files:
            bins = sorted(self.path.glob("*.bin")) + sorted(self.path.glob("*.pt"))
            if bins:
                raise WeightsUnreadable(f"{self.path} keeps its weights in {bins[0].name} (a pickle), which this check "
                                        "does not read; save the checkpoint with safetensors")
            raise WeightsUnreadable(f"{self.path} has no *.safetensors weights")
        self.tensors: dict[str, StoredTensor] = {}
        self.skipped: dict[str, str] = {}
        self.derived: dict[str, np.ndarray] = {}  # A's values cut as B stores them (``backends.restructure``)
        for f in files:
            self._read_header(f)
        cfg = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
        except (OSError, ValueError):
            self.config = {}
        self._maps = _Maps()

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                return [self.path / n for n in names]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return sorted(self.path.glob("*.safetensors"))

    def _read_header(self, f: Path) -> None:
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError) as exc:
            raise WeightsUnreadable(f"{f}: not a readable safetensors file ({exc})") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = str(info.get("dtype"))
            if dtype not in _ST_DTYPES:
                self.skipped[name] = f"dtype {dtype} (not a float type this check reads)"
                continue
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            r, c = _view(shape)
            self.tensors[name] = StoredTensor(name, shape, _ST_DTYPES[dtype][1], f, base + start, end - start, r, c)

    def add_derived(self, name: str, values: np.ndarray, like: StoredTensor) -> StoredTensor:
        """A tensor made of this checkpoint's values (a piece of a tensor the converter splits), read from memory
        like a stored one; it keeps the storage type of the tensor it was cut from."""
        self.derived[name] = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        r, c = _view(tuple(values.shape))  # stored like a file's bytes, so that an expert's slice of it reads too
        return StoredTensor(name, tuple(values.shape), like.type, DERIVED / name, 0, values.size * 4, r, c)

    def read(self, t: StoredTensor, r0: int, r1: int) -> np.ndarray:
        if _derived(t):
            flat = self.derived[t.file.name][t.offset // 4:(t.offset + t.nbytes) // 4]
            return flat.reshape(t.rows, t.cols)[r0:r1]
        np_dtype = _ST_DTYPES[t.type][0]
        raw = self._maps.get(t.file)[t.offset:t.offset + t.nbytes].view(np_dtype).reshape(t.rows, t.cols)[r0:r1]
        if t.type == "BF16":
            return (np.asarray(raw).astype(np.uint32) << 16).view(np.float32)
        if t.type == "F32":
            return np.asarray(raw)
        return np.asarray(raw, dtype=np.float32)

    def close(self) -> None:
        self._maps.close()


Source = GGUFWeights | SafetensorsWeights


# --------------------------------------------------------------------------- pairing


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


def _gguf_to_hf(arch: str, n_blocks: int, hf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> transformers name, from gguf-py's name map for the architecture applied to the
    transformers names (as transformers' ``get_gguf_hf_weights_map`` does)."""
    from gguf import MODEL_ARCH_NAMES

    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    name_map = _tensor_name_map(arch_id, n_blocks) if arch_id is not None else _any_arch_name_map(n_blocks)
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


def _tensor_name_map(arch_id: Any, n_blocks: int) -> Any:
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
            for key, value in _tensor_name_map(arch_id, n_blocks).mapping.items():
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


def _qk_kind(gguf_name: str) -> str | None:
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
    g2h = _gguf_to_hf(arch, _n_blocks(gg), hf_names)
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
        _same_view(pair)
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
        if (q.a is None or q.b is None or _derived(q.a) or q.qk or any(q.norm_offset) or not q.gguf_name
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
    missing = [q for q in plan.pairs if q.b is None and q.a is not None and not _derived(q.a)]
    # a pair the name map made whose layouts differ (gpt-oss's experts, transposed per expert): B's tensor is
    # a candidate piece like any unmatched one
    relaid = [q for q in plan.pairs if q.a is not None and q.b is not None and not _derived(q.a)
              and _shape_problem(q) and math.prod(q.a.shape) == math.prod(q.b.shape)]
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
                # stacked experts are then compared expert by expert, as every other pair (``_per_expert``)
                cut = hf.add_derived(f"{a_name}[{piece.role.removesuffix('.weight')}]",
                                     restructure.cut(x, f.split, piece), old.a)
                plan.pairs.append(Pair(cut.name, cut, gg.tensors[b_name], gguf_name=b_name, note=note))
                used.add(b_name)
            plan.splits.append((a_name, old.a.shape, f.split, pieces))
        if role:
            plan.conventions[role] = conventions.RoleConvention(
                role, f.split.describe(), None, len(f.layers), len(f.layers), True, {f.split.describe(): f.error})


def _same_view(pair: Pair) -> None:
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
    kind = _qk_kind(pair.gguf_name)
    if kind:
        n_head, n_kv = gg.heads(layer_and_role(pair.gguf_name)[0])
        n = (n_head if kind == "q" else n_kv) or 0
        if not _check_groups(rows, n):
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
    kind = _qk_kind(pair.gguf_name)
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
    conv = CONVENTIONS.get(arch or "")
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
            kind = _qk_kind(pair.name) if mode == "gguf-gguf" else (
                "q" if ".q_proj." in pair.name else "k" if ".k_proj." in pair.name else None)
            if kind:
                layer = layer_and_role(pair.name)[0]
                h = a.heads(layer) if isinstance(a, GGUFWeights) else heads
                pair.qk, pair.groups = kind, {"q": h[0] or 0, "k": h[1] or 0}
    return plan


# --------------------------------------------------------------------------- streaming one pair


class _Reader:
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


def _chunks(rows: int, cols: int, align: int) -> Iterator[tuple[int, int]]:
    step = max(align, (CHUNK_ELEMENTS // max(cols, 1)) // align * align)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _perm_groups(pair: Pair) -> int:
    return pair.groups.get(pair.qk or "", 0) if pair.qk else 0


def _check_groups(rows: int, n: int) -> bool:
    return n > 0 and rows % n == 0 and (rows // n) % 2 == 0


_HALF_ULP = {"F32": 2.0 ** -24, "F64": 2.0 ** -53, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}


class _Twin:
    """B's re-quantisation twin over one tensor (``backends.twin``): A's rows brought into B's stored convention
    (the converter's forward transforms), written through an intermediate, stored as B's type, and read
    back into the common convention, chunk by chunk beside B's own rows."""

    def __init__(self, pair: Pair, n_groups: int, intermediate: str, imatrix: np.ndarray | None = None) -> None:
        assert pair.b is not None
        self.pair, self.type, self.imatrix = pair, pair.b.type, imatrix
        self.groups = n_groups if pair.unpermute[1] else 0
        self.offset = pair.norm_offset[1]
        self.stats = TwinStats(intermediate, half_ulp=_HALF_ULP.get(self.type, 0.0), type=self.type)
        self.block = gguf_header.GGML_TYPES[ggml.type_id(self.type)][1] if self.type not in twin.FLOAT_TYPES else 1

    def update(self, src_b: Source, a: np.ndarray, b: np.ndarray, r0: int, r1: int) -> None:
        k = (r1 - r0) // (self.pair.b.rows // self.groups) if self.groups else 0
        fwd = rope_permute(a, k) if k else a
        if self.offset:
            fwd = fwd + np.float32(self.offset)
        raw_t, vt = twin.twin_rows(fwd.reshape(r1 - r0, -1), self.type, self.stats.intermediate, self.imatrix)
        raw_b = src_b.raw(self.pair.b, r0, r1) if raw_t is not None and isinstance(src_b, GGUFWeights) else None
        if raw_t is not None and raw_b is None:  # B's bytes unknown: compare values
            raw_t = None
        if raw_t is not None and raw_b is not None and k:  # byte rows in B's stored (rope) order: into A's
            raw_t, raw_b = rope_unpermute(raw_t, k), rope_unpermute(raw_b, k)
        index = np.arange(r0, r1)
        vt = vt.reshape(a.shape)
        if k:
            vt = rope_unpermute(vt, k)
        if self.offset:
            vt = vt - np.float32(self.offset)
        # the quantiser's own input, in A's order, for the rounding-tie test (without an importance matrix only:
        # with one, the rounding types search their scale too)
        quantised = None
        if raw_t is not None and self.imatrix is None and self.type in twin.ROUNDING_TYPES:
            quantised = twin.round_to(a + np.float32(self.offset) if self.offset else a, self.stats.intermediate)
        self.stats.update(raw_b, raw_t, b, vt, a, self.block, index, quantised)


def twin_unavailable(pair: Pair, src_b: Source, cols: int, has_imatrix: bool = False) -> str | None:
    """Why B's twin cannot be made for this tensor, or None."""
    assert pair.b is not None
    t = pair.b.type
    if t in twin.FLOAT_TYPES:
        return None
    why = ggml.available()
    if why:
        return why
    try:
        block = gguf_header.GGML_TYPES[ggml.type_id(t)][1]
        if ggml.requires_imatrix(t) and not has_imatrix:
            return (f"llama.cpp makes {t} only with an importance matrix: give the one B was made with "
                    "(--convdiff-imatrix FILE)")
    except ggml.GGMLUnavailable as exc:
        return str(exc)
    if cols % block:
        return f"its rows of {cols} values do not split into {t}'s blocks of {block}"
    if not isinstance(src_b, GGUFWeights):
        return f"B's {t} tensor is not stored as llama.cpp stores it"
    return None


def _type_group(type_name: str) -> str:
    return "float" if type_name in twin.FLOAT_TYPES else "quantised"


FORCE_INTERMEDIATE: str | None = None  # bench/twin_margins.py: a twin from one intermediate only


def _first_intermediate(type_name: str, preferred: dict[str, str]) -> str:
    """The intermediate to try first: the one this file's other tensors were made from; else F32 for a
    float type (the converter writes it directly) and F16 for a quantised one (llama-quantize's usual input)."""
    group = _type_group(type_name)
    if FORCE_INTERMEDIATE and group != "float":
        return FORCE_INTERMEDIATE
    return preferred.get(group) or ("F32" if group == "float" else "F16")


def _stream(srcs: tuple[Source, Source], pair: Pair, rows: int, cols: int,
            alternatives: bool = False, twins: list[_Twin] | None = None) -> tuple[TensorStats, Sketch, Sketch]:
    """One pass over a tensor pair: its stats and both sketches (and, with ``alternatives``, how B compares
    with A under the other q/k row orders; with ``twins``, B against each of them)."""
    n = _perm_groups(pair)
    ra = _Reader(srcs[0], pair.a, n if pair.unpermute[0] else 0, pair.norm_offset[0])
    rb = _Reader(srcs[1], pair.b, n if pair.unpermute[1] else 0, pair.norm_offset[1])
    align = rows // n if n else 1
    n_head = pair.groups.get("q", 0)
    stats = TensorStats()
    sa, sb = Sketch.for_shape(rows, cols), Sketch.for_shape(rows, cols)
    for r0, r1 in _chunks(rows, cols, align):
        a, b = ra.rows(r0, r1), rb.rows(r0, r1)
        if a.shape != b.shape:
            a, b = a.reshape(r1 - r0, cols), b.reshape(r1 - r0, cols)
        stats.update(a, b, r0)
        sa.update(a, r0)
        sb.update(b, r0)
        for tw in twins or ():
            tw.update(srcs[1], a, b, r0, r1)
        if alternatives and n:
            k = (r1 - r0) // align
            stats.add_alt("unpermuted", a, rope_permute(b, k))
            stats.add_alt("twice", a, rope_unpermute(b, k))
            if pair.qk == "k" and n_head and n_head != n and _check_groups(rows, n_head) and n_head % n == 0:
                per_h = rows // n_head
                stats.add_alt("heads", a, rope_unpermute(rope_permute(b, k), (r1 - r0) // per_h))
    return stats, sa, sb


# --------------------------------------------------------------------------- the measurement


def _describe_alt(name: str, mode: str, pair: Pair) -> tuple[str, str]:
    """(what B matches, what that means) when another q/k row order explains it, in this comparison's
    terms (B a GGUF: what its converter did; B a transformers checkpoint: what a GGUF-to-transformers
    conversion did)."""
    which = "q_proj" if pair.qk == "q" else "k_proj"
    if name == "heads":
        return (f"A's {which} permuted for llama.cpp's rope with n_head={pair.groups.get('q')} heads instead of "
                f"n_head_kv={pair.groups.get('k')}", "the grouped-query attention permutation bug")
    if mode in ("hf-gguf", "gguf-gguf"):
        if name == "unpermuted":
            return (f"A's {which} without llama.cpp's rope permutation",
                    "the converter did not permute this tensor's rows for llama.cpp's rope")
        return f"A's {which} with llama.cpp's rope permutation applied twice", "the rows were permuted twice"
    if name == "unpermuted":
        return (f"A's {which} with llama.cpp's rope permutation undone twice",
                "the conversion back from GGUF undid a permutation that was not there")
    return (f"A's {which} in llama.cpp's rope row order",
            "the conversion back from GGUF did not undo llama.cpp's q/k permutation")


def _entry(pair: Pair, layer: int | None, role: str) -> dict[str, Any]:
    a, b = pair.a, pair.b
    return {
        "name": pair.name, "a_name": a.name if a else None, "b_name": b.name if b else None,
        "type_a": a.type if a else None, "type_b": b.type if b else None,
        "shape_a": list(a.shape) if a else None, "shape_b": list(b.shape) if b else None,
        "layer": layer, "role": role, "error": None, "expected": None, "measured_types": None,
        "scale": None, "scale_residual": None, "offset": None, "offset_residual": None,
        "nonfinite_a": 0, "nonfinite_b": 0, "first_nonfinite": None, "problem": None,
        "note": pair.note, "matches": [], "sample_error": None,
    }


def _shape_problem(pair: Pair) -> str | None:
    a, b = pair.a, pair.b
    assert a is not None and b is not None
    if a.shape == b.shape or (a.rows, a.cols) == (b.rows, b.cols):
        return None
    if len(a.shape) == 2 and tuple(reversed(a.shape)) == b.shape:
        return f"B's shape {b.shape} is A's {a.shape} transposed"
    return f"B's shape {b.shape} differs from A's {a.shape}"


def start_entry(pair: Pair, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Append the pair's entry; it, when both sides exist in the same shape, else None (its problem set)."""
    layer, role = layer_and_role(pair.name)
    e = _entry(pair, layer, role)
    entries.append(e)
    if pair.b is None:
        e["problem"] = f"B has no tensor for A's {pair.name}" + (f" ({pair.a.name})" if pair.a and
                                                                 pair.a.name != pair.name else "")
        return None
    if pair.a is None:
        return None
    shape = _shape_problem(pair)
    if shape:
        e["problem"] = shape
        return None
    return e


def measure_weights(a: Source, b: Source, n_layers: int | None = None,
                    matrix: ImportanceMatrix | None = None) -> dict[str, Any]:
    """Compare every tensor of B with A's; a JSON-serialisable dict (see checks/weights.py for the reading).

    Tensors are read and compared one at a time in row chunks; afterwards, the tensors whose error is
    above what their types give (or whose scale is off) are compared cheaply, on their sketches, with every
    other tensor of A of the same shape, with A's transpose, and (q/k) with A under llama.cpp's other row
    orders, to say what B matches better.

    ``matrix``: the importance matrix B was quantised with (``--convdiff-imatrix``). Without it, a file
    whose header says it was made with one has its quantised tensors judged against a twin made without
    (``weights_imatrix``).
    """
    t0 = time.perf_counter()
    plan = plan_pairs(a, b)
    plan.pairs = [q for pair in plan.pairs for q in _per_expert(pair)]
    preferred: dict[str, str] = {}  # the intermediate B's file was made from, once a tensor shows it
    imatrix_used = isinstance(b, GGUFWeights) and any(k.startswith("quantize.imatrix") for k in b.kv)
    entries: list[dict[str, Any]] = []
    sketches_a: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    sketches_b: dict[int, Sketch] = {}
    for pair in plan.pairs:
        e = start_entry(pair, entries)
        if e is None:
            continue
        assert pair.a is not None and pair.b is not None
        rows, cols = pair.a.rows, pair.a.cols
        n = _perm_groups(pair)
        if pair.qk and (pair.unpermute[0] or pair.unpermute[1]) and not _check_groups(rows, n):
            e["problem"] = (f"its {rows} rows are not {n} heads of an even size, so llama.cpp's rope permutation "
                            "cannot be undone")
            continue
        if pair.qk and not _check_groups(rows, n):
            pair.qk = None
        imatrix, imatrix_problem = matrix.get(pair.b.name, cols) if matrix is not None else (None, None)
        if imatrix_problem:
            e["imatrix_problem"] = imatrix_problem
        if pair.b.type not in twin.FLOAT_TYPES:
            if imatrix is not None:
                e["imatrix_given"] = Path(matrix.path).name if matrix is not None else True
            elif imatrix_used and matrix is None:
                e["imatrix"] = True  # B was made with a matrix we do not have: judged by error ratio
        why_no_twin = twin_unavailable(pair, b, cols, imatrix is not None)
        first = _Twin(pair, n, _first_intermediate(pair.b.type, preferred), imatrix) if why_no_twin is None else None
        try:
            stats, sa, sb = _stream((a, b), pair, rows, cols, twins=[first] if first else None)
            best = first
            if first is not None and first.stats.differing and not FORCE_INTERMEDIATE:  # another intermediate may be the one B was made from
                others = [_Twin(pair, n, i, imatrix) for i in twin.INTERMEDIATES if i != first.stats.intermediate]
                _stream((a, b), pair, rows, cols, twins=others)
                for tw in others:
                    if tw.stats.better_than(best.stats if best else None):
                        best = tw
        except WeightsUnreadable as exc:
            e["problem"] = None
            e["unreadable"] = str(exc)
            continue
        except ggml.GGMLUnavailable as exc:
            best, why_no_twin = None, str(exc)
            stats, sa, sb = _stream((a, b), pair, rows, cols)
        if best is not None:
            e["twin"] = best.stats.to_dict()
            if not best.stats.differing and pair.b.type not in twin.FLOAT_TYPES:
                preferred[_type_group(pair.b.type)] = best.stats.intermediate
        else:
            e["twin_unavailable"] = why_no_twin
        exp = pair_expected_error(pair.a.type, pair.b.type)
        c, c_res = stats.scale()
        k, k_res = stats.offset()
        v, v_res = stats.constant()
        err = stats.error()
        e.update({"error": err if math.isfinite(err) else None, "expected": exp,
                  "measured_types": expected_error(pair.a.type)[1] and expected_error(pair.b.type)[1],
                  "scale": c, "scale_residual": c_res, "offset": k, "offset_residual": k_res,
                  "constant": v, "constant_residual": v_res, "nonfinite_a": stats.nonfinite_a, "nonfinite_b": stats.nonfinite_b,
                  "first_nonfinite": stats.first_nonfinite, "a_zero": stats.a2 == 0.0, "b_zero": stats.b2 == 0.0})
        idx = len(entries) - 1
        sketches_a.setdefault((rows, cols), []).append((idx, sa.values))
        sketches_b[idx] = sb
    for idx, sb in sketches_b.items():
        e = entries[idx]
        if _suspect(e):
            e["matches"] = _matches((a, b), plan, idx, e, sb, sketches_a)
    a.close()
    b.close()
    return {"status": "ok", "mode": plan.mode, "arch": plan.arch, "tensors": entries,
            "imatrix": ({k: v for k, v in b.kv.items() if k.startswith("quantize.imatrix")} if imatrix_used
                        and isinstance(b, GGUFWeights) else None),
            "imatrix_file": None if matrix is None else {"path": matrix.path, "layout": matrix.layout,
                                                         "entries": len(matrix.weights), "datasets": matrix.datasets},
            "unmatched_b": plan.unmatched_b, "not_compared": plan.not_compared,
            "conventions": [c.to_dict() for c in plan.conventions.values()],
            "n_layers": n_layers, "seconds": time.perf_counter() - t0}


def _per_expert(pair: Pair) -> list[Pair]:
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


def _suspect(e: dict[str, Any]) -> bool:
    """Worth asking what B matches instead: off its twin by more than near-ties explain (or, with no twin,
    above its type's tabled error or off in scale). Cheap: the candidates are compared on sketches."""
    t = e.get("twin")
    if t is not None:
        return t["differing"] > 0 and (t["share"] > 0.05 or (t.get("tie_ratio") or math.inf) > 1.2)
    err, exp = e["error"], e["expected"]
    if err is None or exp is None:
        return False
    return err > exp or (e["scale"] is not None and abs(e["scale"] - 1.0) > 0.05)


def _matches(srcs: tuple[Source, Source], plan: Plan, idx: int, e: dict[str, Any], sb: Sketch,
             sketches_a: dict[tuple[int, int], list[tuple[int, np.ndarray]]]) -> list[dict[str, Any]]:
    """What B's tensor is closer to than A's own, best first: another tensor of A (a swap, a tied embedding),
    A transposed, A with another q/k row order, a multiple of A, A plus a constant, zeros."""
    pair = plan.pairs[idx]
    assert pair.a is not None
    err = float(e["error"])
    found: list[dict[str, Any]] = []
    cands = sketches_a.get((pair.a.rows, pair.a.cols), [])
    own = next(v for i, v in cands if i == idx)
    own_sample = sample_error(own, sb.values)
    e["sample_error"] = own_sample
    limit = CANDIDATE_RATIO * own_sample
    best = sorted((s, i) for s, i in ((sample_error(v, sb.values), i) for i, v in cands if i != idx) if s <= limit)
    for s, i in best[:3]:
        other = plan.pairs[i]
        layer, role = layer_and_role(other.name)
        found.append({"kind": "tensor", "tensor": other.name, "a_name": other.a.name if other.a else None,
                      "layer": layer, "role": role, "error": s, "sampled": True, "what": f"A's {other.name}",
                      "meaning": _tensor_meaning(pair, other)})
    if sb.square:
        s = sample_error(own.T, sb.values)
        if s <= limit:
            found.append({"kind": "transpose", "error": s, "sampled": True, "what": "A's tensor transposed",
                          "meaning": "the tensor was written transposed"})
    if pair.qk and plan.permute_arch:
        stats, _, _ = _stream(srcs, pair, pair.a.rows, pair.a.cols, alternatives=True)
        for name in ("unpermuted", "twice", "heads"):
            alt = stats.alt_error(name)
            if alt is not None and alt <= CANDIDATE_RATIO * err:
                what, meaning = _describe_alt(name, plan.mode, pair)
                found.append({"kind": f"rope-{name}", "error": alt, "sampled": False, "what": what,
                              "meaning": meaning})
    c, c_res = e["scale"], e["scale_residual"]
    if e.get("b_zero") and not e.get("a_zero"):
        found.append({"kind": "zero", "error": 1.0, "sampled": False, "what": "zeros",
                      "meaning": "B's tensor is all zeros"})
    elif (c is not None and c_res is not None and abs(c - 1.0) > 0.02 and c != 0.0
          and c_res / abs(c) <= CANDIDATE_RATIO * err):
        found.append({"kind": "scale", "factor": c, "error": c_res / abs(c) if c else c_res, "sampled": False,
                      "what": f"{c:.3g} × A's tensor", "meaning": "the tensor was scaled"})
    v, v_res = e.get("constant"), e.get("constant_residual")
    if not e.get("b_zero") and v is not None and v_res is not None and v_res <= 1e-3 * CANDIDATE_RATIO * err:
        found.append({"kind": "constant", "value": v, "error": v_res, "sampled": False,
                      "what": f"the constant {v:.4g}",
                      "meaning": "every value of B's tensor is the same" + (
                          ": a norm weight left at its initial value" if abs(v - 1.0) < 1e-6 else "")})
    k, k_res = e["offset"], e["offset_residual"]
    if k is not None and k_res is not None and abs(k) > 0 and k_res <= CANDIDATE_RATIO * err:
        meaning = "a constant was added to the tensor"
        if abs(abs(k) - 1.0) < 0.02 and pair.name.endswith("norm.weight"):
            meaning = ("a norm weight stored in the (1 + w) convention of Gemma's RMSNorm (or with it undone) "
                       "where the architecture does not use it")
        found.append({"kind": "offset", "offset": k, "error": k_res, "sampled": False,
                      "what": f"A's tensor {'+' if k > 0 else '−'} {abs(k):.3g}", "meaning": meaning})
    found.sort(key=lambda m: m["error"])
    if found:  # the best explanation, and the others only when nearly as good
        keep = 2.0 * found[0]["error"] + 2.0 * float(e["expected"] or 0.0)
        found = [m for m in found if m["error"] <= keep]
    return found


def _tensor_meaning(pair: Pair, other: Pair) -> str:
    """What it means that B's tensor is A's ``other`` tensor."""
    layer, role = layer_and_role(pair.name)
    o_layer, o_role = layer_and_role(other.name)
    if role == o_role and layer is not None and o_layer is not None:
        return f"layer {o_layer}'s tensor is in layer {layer}'s place (layers swapped or written twice)"
    if pair.note and layer is None and o_layer is None:
        return f"{pair.note[0].lower()}{pair.note[1:]}, where A's own tensor is different"
    if layer is None and o_layer is None:
        return "B's tensor is another of A's tensors (an output layer tied or untied, or a mix-up)"
    return "B's tensor is another of A's tensors of the same shape (a mix-up)"


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
        if pair.a is None or pair.b is None or _shape_problem(pair) or _derived(pair.a):
            continue
        n = _perm_groups(pair)
        if pair.qk and not _check_groups(pair.a.rows, n):
            n = 0
        rb = _Reader(b, pair.b, n if pair.unpermute[1] else 0, pair.norm_offset[1])
        values = np.concatenate([rb.rows(r0, r1).reshape(r1 - r0, pair.a.cols)
                                 for r0, r1 in _chunks(pair.a.rows, pair.a.cols, pair.a.rows // n if n else 1)])
        yield pair.name, pair.a.shape, values.reshape(pair.a.shape), pair.b.type
