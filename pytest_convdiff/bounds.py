"""Default pass/fail bounds, by the precision of the converted model.

A correct 4-bit conversion is legitimately further from its reference than a
correct F16 one, so one fixed bound either lets F16 bugs through or fails every
4-bit model. B's precision class is read from what the backend reports (GGUF
file type, EXL2 bits, torch dtype) and picks a row of ``DEFAULT_BOUNDS``; every
bound can still be overridden (command line, ini, manifest, marker).

Direction: ``nmse``, ``kl_mean``, ``kl_p99``, ``rfn``, ``causality`` and
``ppl_ratio`` are upper bounds; ``top1`` and ``top5`` are lower bounds.
docs/bounds.md gives the measurements behind the numbers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

UPPER = ("nmse", "kl_mean", "kl_p99", "rfn", "causality", "ppl_ratio", "subblock_jump")
LOWER = ("top1", "top5")


@dataclass(frozen=True)
class Bounds:
    nmse: float = 1e-2        # llama.cpp's seed-script bound, never looser for float/8-bit
    kl_mean: float = 5e-3     # nats
    kl_p99: float = 5e-2      # nats: one bad position among a hundred
    top1: float = 0.9         # fraction of positions with the same argmax
    top5: float = 0.85        # mean |top5(A) & top5(B)| / 5
    rfn: float = 0.05         # per decoder layer
    causality: float = 1e-4   # NMSE of prefix logits vs the same positions of the full run
    ppl_ratio: float = 1.05   # PPL(B) / PPL(A)
    subblock_jump: float = 4.0  # a layer's attention/MLP error vs that sub-block's median over layers

    def with_overrides(self, overrides: dict[str, float]) -> Bounds:
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(Bounds)]


# Rows are deliberately generous where noise is legitimately larger, and tight
# where it is not: a defect that matters moves these values by orders of magnitude.
DEFAULT_BOUNDS: dict[str, Bounds] = {
    "float": Bounds(nmse=1e-2, kl_mean=2e-3, kl_p99=1e-2, top1=0.95, top5=0.9, rfn=0.02, ppl_ratio=1.01),
    "bf16": Bounds(nmse=1e-2, kl_mean=5e-3, kl_p99=3e-2, top1=0.9, top5=0.85, rfn=0.05, ppl_ratio=1.02),
    "q8": Bounds(nmse=1e-2, kl_mean=1e-2, kl_p99=5e-2, top1=0.9, top5=0.85, rfn=0.06, ppl_ratio=1.03),
    "q5-6": Bounds(nmse=3e-2, kl_mean=3e-2, kl_p99=0.2, top1=0.85, top5=0.8, rfn=0.12, ppl_ratio=1.06,
                   subblock_jump=5.0),
    "q4": Bounds(nmse=6e-2, kl_mean=6e-2, kl_p99=0.5, top1=0.8, top5=0.75, rfn=0.2, ppl_ratio=1.12,
                 subblock_jump=5.0),
    "q2-3": Bounds(nmse=0.2, kl_mean=0.2, kl_p99=1.5, top1=0.6, top5=0.55, rfn=0.4, ppl_ratio=1.4,
                   subblock_jump=8.0),
}


def precision_class(info: dict[str, Any]) -> str:
    """Map what a backend reports about B to a row of DEFAULT_BOUNDS."""
    quant = str(info.get("quantization") or "").upper()
    dtype = str(info.get("dtype") or "").lower()
    bits = info.get("extra", {}).get("bits") if isinstance(info.get("extra"), dict) else None
    if bits is not None:
        b = float(bits)
        return "q8" if b >= 7.5 else "q5-6" if b >= 5 else "q4" if b >= 3.75 else "q2-3"
    if quant:
        if quant in ("F32", "F16", "FP16", "FP32", "ALL_F32", "MOSTLY_F16"):
            return "float"
        if quant in ("BF16", "MOSTLY_BF16"):
            return "bf16"
        m = re.search(r"(?:I?Q|TQ)(\d)", quant)
        if m:
            n = int(m.group(1))
            return "q8" if n >= 8 else "q5-6" if n >= 5 else "q4" if n == 4 else "q2-3"
    if "bfloat16" in dtype or dtype == "bf16":
        return "bf16"
    if any(t in dtype for t in ("float32", "float16", "f32", "f16", "fp16", "fp32")):
        return "float"
    return "q4" if quant else "float"


def default_bounds(info_a: dict[str, Any], info_b: dict[str, Any]) -> tuple[str, Bounds]:
    """The row for the less precise of the two models (a bf16 reference bounds an F16 B too)."""
    order = list(DEFAULT_BOUNDS)
    ca, cb = precision_class(info_a), precision_class(info_b)
    cls = ca if order.index(ca) > order.index(cb) else cb
    return cls, DEFAULT_BOUNDS[cls]


def parse_bound_overrides(text: str, where: str = "--convdiff-bound") -> dict[str, float]:
    """``"rfn=0.1,kl_mean=0.02"`` -> {"rfn": 0.1, "kl_mean": 0.02}; ValueError naming the bad part."""
    out: dict[str, float] = {}
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"{where}: expected NAME=VALUE, got {part!r}")
        if name not in Bounds.names():
            raise ValueError(f"{where}: unknown bound {name!r}; known: {', '.join(Bounds.names())}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
        if v != v or v < 0:
            raise ValueError(f"{where}: {name} must be a non-negative number, got {value!r}")
        out[name] = v
    return out
