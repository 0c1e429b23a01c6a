"""The weights check without A's files: what a golden reference keeps of A's tensors, and the replay.

A golden reference (``--convdiff-save-reference``) keeps A's outputs so that a CI job need not load A.
The weights check compares B's tensors with A's, so the reference also keeps, per tensor of A:

- a **count sketch** of its values (``BUCKETS`` signed sums of the entries a seeded hash sends to each
  bucket). It is linear, so the sketch of B minus the sketch of A is the sketch of B - A, and its squared
  norm estimates ``||B - A||^2`` without bias, with a relative standard deviation of about
  ``sqrt(2 / BUCKETS)`` (4.4 % at 1,024 buckets; half that on the norm itself);
- its **twin error** at every storage type llama.cpp makes without an importance matrix: how far
  llama.cpp's quantiser (or the float type's rounding) moves A's values, ``||T - A|| / ||A||``. Float
  types are measured on every entry; quantised types on evenly spaced rows, at most ``SAMPLE_VALUES``
  entries (a row is quantised alone, so llama.cpp's q/k row permutation does not change it).

The replay judges each tensor of B by ``ratio = ||B - A|| / ||T - A||`` (estimated / measured): about 1
for a correct file, far above for a swapped, unpermuted, scaled or zeroed tensor. It cannot see what
adds less than the sketch's noise to the type's own error; the live run (B against its exact twin) can,
and the message says which was used. For SmolLM2-135M the sketches take 272 x 1,024 float32: 1.1 MB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.weight_errors import layer_and_role, pair_expected_error
from ..store.reference import (
    SKETCH_ARRAY,  # the reference's array: one row of BUCKETS per tensor, in the table's order
)
from . import ggml, gguf_header, twin
from .conventions import HF_ARCH, PRIORS
from .dequant import start_entry, tensor_meaning
from .pairing import Reader, check_groups, perm_groups, plan_pairs
from .tensors import SafetensorsWeights, StoredTensor, view_2d

__all__ = ["BUCKETS", "FORMAT", "SKETCH_ARRAY", "ReplayWeights", "TYPES", "measure_replay", "sketch_model"]

FORMAT = 1
BUCKETS = 1024
SAMPLE_VALUES = 1 << 16
SEED = 0x9E3779B97F4A7C15
# what llama-quantize makes without an importance matrix (the ternary and MXFP4 types aside)
TYPES: tuple[str, ...] = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1",
                          "IQ4_NL", "IQ4_XS", "Q3_K", "IQ3_S", "Q2_K")
_CHUNK = 1 << 22
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 indices: a fixed, seedable hash that needs no table."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(SEED)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return z ^ (z >> np.uint64(31))


def sketch_rows(rows: np.ndarray, r0: int, cols: int, out: np.ndarray) -> None:
    """Add rows ``r0 ..`` of a (rows, cols) tensor into its count sketch ``out`` (float64, BUCKETS)."""
    x = np.asarray(rows, dtype=np.float64).reshape(-1)
    start = r0 * cols
    idx = np.arange(start, start + x.size, dtype=np.uint64)
    h = _mix(idx)
    bucket = (h >> np.uint64(33)) % np.uint64(BUCKETS)
    sign = 1.0 - 2.0 * (h & np.uint64(1)).astype(np.float64)
    out += np.bincount(bucket.astype(np.int64), weights=x * sign, minlength=BUCKETS)


def _chunks(rows: int, cols: int, align: int = 1) -> Iterator[tuple[int, int]]:
    step = max(align, (_CHUNK // max(cols, 1)) // align * align)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _sample_rows(rows: int, cols: int) -> np.ndarray:
    n = max(1, min(rows, SAMPLE_VALUES // max(cols, 1)))
    return np.unique(np.linspace(0, rows - 1, n).round().astype(np.int64))


def _offset(name: str, norm_offset: float) -> float:
    return norm_offset if norm_offset and name.endswith("norm.weight") else 0.0


def sketch_model(a: Any) -> tuple[dict[str, Any], np.ndarray]:
    """(the table a reference keeps, the sketches: one row of BUCKETS per tensor) of A's weights.

    ``a``: a ``backends.tensors.SafetensorsWeights``. Each tensor is read once in row chunks (and its sample
    rows once more)."""
    arch = HF_ARCH.get(str(a.config.get("model_type") or ""))
    conv = PRIORS.get(arch or "")
    norm_offset = conv.norm_offset if conv else 0.0
    no_quantiser = ggml.available()  # None when llama.cpp's quantiser can be called
    tensors: list[dict[str, Any]] = []
    sketches = np.zeros((len(a.tensors), BUCKETS), dtype=np.float32)
    for i, (name, t) in enumerate(a.tensors.items()):
        off = _offset(name, norm_offset)
        sk = np.zeros(BUCKETS, dtype=np.float64)
        norm2 = 0.0
        float_err = {ft: 0.0 for ft in ("F32", "F16", "BF16")}
        for r0, r1 in _chunks(t.rows, t.cols):
            x = a.read(t, r0, r1).reshape(r1 - r0, t.cols)
            x = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
            sketch_rows(x, r0, t.cols, sk)
            norm2 += float(np.dot(x.ravel().astype(np.float64), x.ravel().astype(np.float64)))
            for ft in float_err:  # the float types' rounding of the stored (offset) values, on every entry
                back = twin.round_to(x + np.float32(off), ft) - np.float32(off) if off else twin.round_to(x, ft)
                d = (back - x).astype(np.float64).ravel()
                float_err[ft] += float(np.dot(d, d))
        errors: dict[str, float] = {ft: math.sqrt(e / norm2) if norm2 > 0 else 0.0 for ft, e in float_err.items()}
        sampled = 0
        if no_quantiser is None and len(t.shape) >= 2 and norm2 > 0:
            rows_i = _sample_rows(t.rows, t.cols)
            x = np.concatenate([a.read(t, int(r), int(r) + 1).reshape(1, t.cols) for r in rows_i])
            x = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
            xs2 = float(np.sum(x.astype(np.float64) ** 2))
            sampled = int(x.shape[0])
            for ty in TYPES:
                if ty in twin.FLOAT_TYPES:
                    continue
                block = gguf_header.GGML_TYPES[ggml.type_id(ty)][1]
                if t.cols % block or xs2 == 0:
                    continue
                _, v = twin.twin_rows(x, ty, "F16")
                d = (v.reshape(x.shape) - x).astype(np.float64)
                errors[ty] = math.sqrt(float(np.sum(d * d)) / xs2)
        sketches[i] = sk.astype(np.float32)
        tensors.append({"name": name, "shape": list(t.shape), "type": t.type, "norm": math.sqrt(norm2),
                        "twin_error": errors, "sampled_rows": sampled})
    table = {"format": FORMAT, "buckets": BUCKETS, "seed": SEED, "config": a.config, "tensors": tensors,
             "quantiser": None if no_quantiser else "ggml_quantize_chunk (llama-cpp-python's libggml-base), F16 "
                                                    "intermediate",
             "no_quantiser": no_quantiser}
    return table, sketches


class ReplayWeights(SafetensorsWeights):
    """A reference's record of A's weights, standing in for A's checkpoint in the pairing (names, shapes,
    config); its values exist only as sketches."""

    kind = "replay"

    def __init__(self, path: str | Path, table: dict[str, Any], sketches: np.ndarray) -> None:  # noqa: D107
        self.path = Path(path)
        self.table = table
        self.config: dict[str, Any] = dict(table.get("config") or {})
        self.skipped: dict[str, str] = {}
        self.tensors: dict[str, StoredTensor] = {}
        self.sketch: dict[str, np.ndarray] = {}
        self.info: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(table["tensors"]):
            shape = tuple(int(d) for d in t["shape"])
            r, c = view_2d(shape)
            self.tensors[t["name"]] = StoredTensor(t["name"], shape, t["type"], self.path, 0, 0, r, c)
            self.sketch[t["name"]] = np.asarray(sketches[i], dtype=np.float64)
            self.info[t["name"]] = t

    def read(self, t: Any, r0: int, r1: int) -> np.ndarray:
        raise RuntimeError(f"{self.path} keeps sketches of A's weights, not their values")

    def heads(self, layer: int | None) -> tuple[int | None, int | None]:
        n = self.config.get("num_attention_heads")
        k = self.config.get("num_key_value_heads") or n
        return (int(n) if n else None, int(k) if k else None)

    def close(self) -> None:
        pass


@dataclass
class _Side:
    sketch: np.ndarray
    raw: np.ndarray | None  # B's rows without the q/k unpermutation (what an unpermuted q/k matches)
    nonfinite: int
    first_nonfinite: dict[str, Any] | None


def _sketch_b(b: Any, pair: Any) -> _Side:
    n = perm_groups(pair)
    if pair.qk and not check_groups(pair.a.rows, n):
        n = 0
    rows, cols = pair.a.rows, pair.a.cols
    rb = Reader(b, pair.b, n if pair.unpermute[1] else 0, pair.norm_offset[1])
    raw_reader = Reader(b, pair.b, 0, pair.norm_offset[1]) if n and pair.unpermute[1] else None
    sk = np.zeros(BUCKETS, dtype=np.float64)
    raw = np.zeros(BUCKETS, dtype=np.float64) if raw_reader else None
    bad, first = 0, None
    for r0, r1 in _chunks(rows, cols, rows // n if n else 1):
        x = rb.rows(r0, r1).reshape(r1 - r0, cols)
        finite = np.isfinite(x)
        if not finite.all():
            if first is None:
                r, c = np.argwhere(~finite)[0]
                first = {"side": "B", "row": int(r0 + r), "col": int(c), "value": str(x[r, c])}
            bad += int((~finite).sum())
            x = np.where(finite, x, 0.0)
        sketch_rows(x, r0, cols, sk)
        if raw_reader is not None and raw is not None:
            y = raw_reader.rows(r0, r1).reshape(r1 - r0, cols)
            sketch_rows(np.where(np.isfinite(y), y, 0.0), r0, cols, raw)
    return _Side(sk, raw, bad, first)


def _rel(x: np.ndarray, y: np.ndarray, norm: float) -> float:
    return float(np.linalg.norm(x - y)) / norm if norm > 0 else (0.0 if not np.any(x - y) else math.inf)


# the smallest twin error a ratio is taken against: F32's half-ulp, relative
_FLOOR = 2.0 ** -23


def measure_replay(ref: ReplayWeights, b: Any, n_layers: int | None = None) -> dict[str, Any]:
    """Every tensor of B against the reference's sketch of A's (see the module docstring)."""
    import time

    t0 = time.perf_counter()
    plan = plan_pairs(ref, b)
    entries: list[dict[str, Any]] = []
    sides: dict[int, _Side] = {}
    for pair in plan.pairs:
        e = start_entry(pair, entries)
        if e is None:
            continue
        info = ref.info[pair.a.name]
        side = _sketch_b(b, pair)
        sides[len(entries) - 1] = side
        sa = ref.sketch[pair.a.name]
        norm = float(info["norm"])
        est = _rel(side.sketch, sa, norm)
        tb = pair.b.type
        twin_err = (info["twin_error"] or {}).get(tb)
        dot = float(np.dot(sa, sa))
        scale = float(np.dot(sa, side.sketch) / dot) if dot > 0 else None
        e.update({"error": est if math.isfinite(est) else None, "expected": twin_err, "scale": scale,
                  "nonfinite_b": side.nonfinite, "first_nonfinite": side.first_nonfinite,
                  "a_zero": norm == 0.0, "b_zero": not np.any(side.sketch)})
        if twin_err is None:  # a type the reference did not measure: the tabled error, and the message says so
            e["expected"] = pair_expected_error(pair.a.type, tb)
            e["twin_unavailable"] = (f"the reference holds A's twin error for {', '.join(info['twin_error'])}, "
                                     f"not {tb}")
        else:
            e["replay"] = {"ratio": est / max(twin_err, _FLOOR) if math.isfinite(est) else math.inf,
                           "twin_error": twin_err, "sampled_rows": info.get("sampled_rows") or 0}
    for idx, side in sides.items():
        e = entries[idx]
        r = (e.get("replay") or {}).get("ratio")
        if r is not None and r > 1.2:
            e["matches"] = _replay_matches(ref, plan, idx, e, side)
    return {"status": "ok", "mode": "replay", "arch": plan.arch, "tensors": entries, "imatrix": None,
            "unmatched_b": plan.unmatched_b, "not_compared": plan.not_compared, "n_layers": n_layers,
            "replay": {"buckets": ref.table.get("buckets"), "reference": str(ref.path)},
            "seconds": time.perf_counter() - t0}


def _replay_matches(ref: ReplayWeights, plan: Any, idx: int, e: dict[str, Any], side: _Side) -> list[dict[str, Any]]:
    """What B's tensor is closer to than A's own, from the sketches: another tensor of A of its shape, A's
    q/k without llama.cpp's row permutation, a multiple of A, zeros."""
    pair = plan.pairs[idx]
    own = float(e["error"] or math.inf)
    limit = 0.5 * own
    found: list[dict[str, Any]] = []
    for other in plan.pairs:
        if other is pair or other.a is None or other.a.shape != pair.a.shape:
            continue
        info = ref.info[other.a.name]
        d = _rel(side.sketch, ref.sketch[other.a.name], float(info["norm"]))
        if d <= limit:
            layer, role = layer_and_role(other.name)
            found.append({"kind": "tensor", "tensor": other.name, "a_name": other.a.name, "layer": layer,
                          "role": role, "error": d, "sampled": False, "what": f"A's {other.name}",
                          "meaning": tensor_meaning(pair, other)})
    norm = float(ref.info[pair.a.name]["norm"])
    sa = ref.sketch[pair.a.name]
    if side.raw is not None:
        d = _rel(side.raw, sa, norm)
        if d <= limit:
            which = "q_proj" if pair.qk == "q" else "k_proj"
            found.append({"kind": "rope-unpermuted", "error": d, "sampled": False,
                          "what": f"A's {which} without llama.cpp's rope permutation",
                          "meaning": "the converter did not permute this tensor's rows for llama.cpp's rope"})
    c = e.get("scale")
    if e.get("b_zero") and not e.get("a_zero"):
        found.append({"kind": "zero", "error": 1.0, "sampled": False, "what": "zeros",
                      "meaning": "B's tensor is all zeros"})
    elif c is not None and abs(c - 1.0) > 0.02 and c != 0.0:
        d = _rel(side.sketch, c * sa, abs(c) * norm)
        if d <= limit:
            found.append({"kind": "scale", "factor": c, "error": d, "sampled": False,
                          "what": f"{c:.3g} × A's tensor", "meaning": "the tensor was scaled"})
    found.sort(key=lambda m: m["error"])
    return found[:3]
