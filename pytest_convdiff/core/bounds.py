"""Bounds: named limits with a direction, a default per precision class, and overrides.

A correct 4-bit conversion is legitimately further from its reference than a correct F16
one, so each bound has a default per precision class, and B's (or A's, if less precise)
class picks the column. The bounds themselves are declared by the check families that use
them (``pytest_convdiff.checks``): this module only knows how to hold, choose and override
them, so a new family brings its bounds without touching this file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .results import LOWER, UPPER

PRECISION_CLASSES: tuple[str, ...] = ("float", "bf16", "q8", "q5-6", "q4", "q2-3")  # most to least precise


@dataclass(frozen=True)
class BoundSpec:
    """One bound as its family declares it: name, direction, default per precision class, meaning."""

    name: str
    direction: str  # UPPER: the value must be <= the bound; LOWER: >= the bound
    defaults: Mapping[str, float]
    doc: str

    def __post_init__(self) -> None:
        if self.direction not in (UPPER, LOWER):
            raise ValueError(f"bound {self.name}: direction must be {UPPER!r} or {LOWER!r}")
        missing = [c for c in PRECISION_CLASSES if c not in self.defaults]
        if missing:
            raise ValueError(f"bound {self.name}: no default for precision class(es) {', '.join(missing)}")

    def ok(self, value: float, bound: float) -> bool:
        """NaN never passes: both comparisons are False for NaN."""
        return value <= bound if self.direction == UPPER else value >= bound


class Bounds(Mapping[str, float]):
    """The bound values in force for one pair: ``bounds["rfn"]`` or ``bounds.rfn``."""

    def __init__(self, values: Mapping[str, float], user: Iterable[str] = ()) -> None:
        self._values = dict(values)
        self.__dict__["user"] = frozenset(user)  # the names a user set (CLI, ini, marker, manifest, compare())

    def __getitem__(self, name: str) -> float:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> float:
        if name == "user":
            return frozenset()
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"Bounds({self._values!r})"

    def with_overrides(self, overrides: Mapping[str, float]) -> Bounds:
        unknown = set(overrides) - set(self._values)
        if unknown:
            raise KeyError(f"unknown bound(s): {', '.join(sorted(unknown))}")
        return Bounds({**self._values, **overrides}, self.user | set(overrides))

    def is_user_set(self, name: str) -> bool:
        return name in self.user

    def to_dict(self) -> dict[str, float]:
        return dict(self._values)


class BoundTable:
    """Every declared bound: the default row per precision class, and override parsing."""

    def __init__(self, specs: Iterable[BoundSpec]) -> None:
        self.specs: dict[str, BoundSpec] = {}
        for s in specs:
            if s.name in self.specs:
                raise ValueError(f"bound {s.name!r} is declared twice")
            self.specs[s.name] = s

    def names(self) -> list[str]:
        return list(self.specs)

    def row(self, cls: str) -> Bounds:
        return Bounds({name: s.defaults[cls] for name, s in self.specs.items()})

    def defaults(self) -> dict[str, Bounds]:
        return {cls: self.row(cls) for cls in PRECISION_CLASSES}

    def parse(self, text: str, where: str = "--convdiff-bound") -> dict[str, float]:
        """``"rfn=0.1,kl_mean=0.02"`` -> {"rfn": 0.1, "kl_mean": 0.02}; ValueError naming the bad part."""
        out: dict[str, float] = {}
        for part in re.split(r"[,\s]+", str(text).strip()):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"{where}: expected NAME=VALUE, got {part!r}")
            if name not in self.specs:
                close = difflib.get_close_matches(name, self.names(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}: unknown bound {name!r}{hint}; known: {', '.join(self.names())}")
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
            if v != v or v < 0:
                raise ValueError(f"{where}: {name} must be a non-negative number, got {value!r}")
            out[name] = v
        return out

    def parse_mapping(self, values: Mapping[str, Any], where: str) -> dict[str, float]:
        """Overrides given as a table (manifest, marker keywords)."""
        return self.parse(",".join(f"{k}={v}" for k, v in values.items()), where) if values else {}


def class_of_bits(bits: float) -> str:
    """The class of a quantised model from its real bits per weight (Q8_0 8.5, Q6_K 6.56, Q5_K/Q5_0 5.5,
    Q4_K/Q4_0 4.5, IQ4_XS 4.25, Q3_K 3.44, Q2_K 2.63; EXL2 files state theirs)."""
    return "q8" if bits >= 7.5 else "q5-6" if bits >= 5 else "q4" if bits >= 3.75 else "q2-3"


# The weight noise (RMS relative error expected from the storage types, see ``weight_noise``) at which one
# class gives way to the next: the geometric means of neighbouring types' errors in
# ``weight_errors.TYPE_ERROR`` (F16 2.9e-4 | BF16 2.3e-3 | Q8_0 8e-3 | Q6_K 0.025 ... Q5_0 0.064 | Q4_K 0.095
# ... Q4_0 0.125 | Q3_K 0.2, Q2_K 0.38).
NOISE_CLASSES: tuple[tuple[float, str], ...] = (
    (8e-4, "float"), (4.3e-3, "bf16"), (0.014, "q8"), (0.078, "q5-6"), (0.158, "q4"))


def weight_noise(tensor_types: Mapping[str, float]) -> float:
    """The RMS relative error a file's weights are expected to carry, from what they are stored as:
    sqrt(sum over types of share * error(type)^2), each type's error measured (core.weight_errors).

    Why not bits per weight: SmolLM2's "Q2_K" averages 5.1 bits because most rows fall back to Q4_0,
    but a fifth of its weights are Q3_K with twice Q4_0's error; the noise, not the bits, sets how far
    a correct conversion's outputs drift."""
    from .weight_errors import EXACT_TYPES, expected_error

    total = sum(float(v) for v in tensor_types.values()) or 1.0
    sq = sum(float(share) * (0.0 if t.upper() in EXACT_TYPES else expected_error(t)[0]) ** 2
             for t, share in tensor_types.items())
    return (sq / total) ** 0.5


def class_of_noise(noise: float) -> str:
    """The precision class of an expected weight noise (``weight_noise``)."""
    for limit, cls in NOISE_CLASSES:
        if noise <= limit:
            return cls
    return "q2-3"


def precision_class(info: dict[str, Any]) -> str:
    """Map what a backend reports about a model to a precision class.

    Where the weights' real storage is known it decides, not the file's label: a GGUF's tensor types
    give the noise its weights carry (``weight_noise``), an EXL2's bits per weight their class.
    SmolLM2's "Q4_K_M" stores most tensors as Q5_0 and Q8_0 because its 576-wide rows fall back from
    K-quants, and is held to the class of what it stores (q5-6), not to q4.
    """
    quant = str(info.get("quantization") or "").upper()
    dtype = str(info.get("dtype") or "").lower()
    extra = info.get("extra") if isinstance(info.get("extra"), dict) else {}
    types = extra.get("tensor_types") or {}
    if types:
        return class_of_noise(weight_noise(types))
    bits = extra.get("bits")
    if bits is not None:
        return class_of_bits(float(bits))
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


def pair_class(info_a: dict[str, Any], info_b: dict[str, Any]) -> str:
    """The class of the less precise of the two models (a bf16 reference bounds an F16 B too)."""
    ca, cb = precision_class(info_a), precision_class(info_b)
    return ca if PRECISION_CLASSES.index(ca) > PRECISION_CLASSES.index(cb) else cb
