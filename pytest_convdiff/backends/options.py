"""Backend options, declared once per backend and checked before a model is loaded.

Each backend module lists what it understands as ``OPTIONS: tuple[BackendOption, ...]``. Options
arrive from three places with different typing: command-line text (``"20,24"``, ``"true"``), TOML
manifests (ints, floats, bools, lists) and Python callers. ``validate_options`` turns any of them
into the declared type, so a backend reads ``options["n_ctx"]`` as an int and a typo such as
``dtyp=float16`` stops the run with a message naming the valid keys instead of being ignored.

Nothing here imports a backend library: the registry imports only the backend modules, which keep
torch, llama_cpp and exllamav2 imports inside ``load``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import registry

__all__ = [
    "OPTION_TYPES",
    "BackendOption",
    "all_options",
    "describe_options",
    "parse_option_items",
    "parse_value",
    "resolve_options",
    "validate_options",
]

OPTION_TYPES = ("int", "float", "bool", "str", "split")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_EXPECTS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false (true/false, yes/no, on/off, 1/0)",
    "str": "a text value",
    "split": "GB per GPU, e.g. 20 or 20,24 (or 20;24 on a command line that splits at commas)",
}


@dataclass(frozen=True)
class BackendOption:
    """One option a backend understands.

    ``type`` is one of ``OPTION_TYPES``; ``split`` is a list of floats (exllamav2's ``gpu_split``).
    ``default`` is what the backend uses when the option is not given; None means the backend (or
    its library) decides, as ``doc`` says. ``choices`` restricts a ``str`` option to those values
    (matched case-insensitively); ``pattern`` is a regular expression a ``str`` value must match in
    full; ``minimum`` is the smallest allowed ``int``/``float`` (for ``split``: of each entry).
    """

    name: str
    type: str
    default: Any
    doc: str
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    minimum: float | None = None

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of {', '.join(OPTION_TYPES)}, not {self.type!r}")
        if self.choices is not None and self.type != "str":
            raise ValueError(f"option {self.name!r}: choices apply to str options only")

    def expects(self) -> str:
        """What a valid value looks like, for error messages and help text."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        text = _EXPECTS[self.type]
        if self.minimum is not None and self.type in ("int", "float"):
            text += f" >= {_number_text(self.minimum)}"
        return text


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _fail(opt: BackendOption, raw: Any, why: str | None = None) -> ValueError:
    return ValueError(f"option {opt.name} expects {opt.expects()}, got {raw!r}" + (f" ({why})" if why else ""))


def _as_int(opt: BackendOption, raw: Any) -> int:
    if isinstance(raw, bool):
        raise _fail(opt, raw)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if raw.is_integer():
            return int(raw)
        raise _fail(opt, raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:  # "4096.0" from a float-happy config writer
            value = float(text)
        except ValueError:
            raise _fail(opt, raw) from None
        if value.is_integer():
            return int(value)
    raise _fail(opt, raw)


def _as_float(opt: BackendOption, raw: Any) -> float:
    if isinstance(raw, bool):
        raise _fail(opt, raw)
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise _fail(opt, raw) from None
    if not math.isfinite(value):
        raise _fail(opt, raw)
    return value


def _as_bool(opt: BackendOption, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _fail(opt, raw)


def _as_str(opt: BackendOption, raw: Any) -> str:
    if isinstance(raw, bool):  # flash_attn=true arrives as True from a TOML manifest
        text = "true" if raw else "false"
    elif isinstance(raw, (int, float, str)):
        text = str(raw).strip()
    else:
        raise _fail(opt, raw)
    if opt.choices:
        low = text.lower()
        by_lower = {c.lower(): c for c in opt.choices}
        if low not in by_lower and "true" in by_lower and "false" in by_lower:
            low = "true" if low in _TRUE else "false" if low in _FALSE else low
        if low not in by_lower:
            raise _fail(opt, raw)
        return by_lower[low]
    if opt.pattern is not None and not re.fullmatch(opt.pattern, text):
        raise _fail(opt, raw)
    return text


_SPLIT_SEPARATORS = re.compile(r"[,;\s]+")


def _as_split(opt: BackendOption, raw: Any) -> list[float]:
    if isinstance(raw, bool):
        raise _fail(opt, raw)
    if isinstance(raw, (int, float)):
        items: list[Any] = [raw]
    elif isinstance(raw, str):
        text = raw.strip().strip("[]()").strip()
        items = [p for p in _SPLIT_SEPARATORS.split(text) if p]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise _fail(opt, raw)
    values = []
    for item in items:
        if isinstance(item, bool):
            raise _fail(opt, raw)
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise _fail(opt, raw, f"{item!r} is not a number") from None
        if not math.isfinite(value) or value < (opt.minimum if opt.minimum is not None else 0.0):
            raise _fail(opt, raw, f"{item!r} is not a size in GB")
        values.append(value)
    if not values or not any(v > 0 for v in values):
        raise _fail(opt, raw, "no GPU gets any memory")
    return values


_PARSERS = {"int": _as_int, "float": _as_float, "bool": _as_bool, "str": _as_str, "split": _as_split}


def parse_value(opt: BackendOption, raw: Any) -> Any:
    """``raw`` (command-line text, a TOML value or a Python value) as ``opt``'s declared type.

    Raises ValueError naming the option, what it expects and what it got.
    """
    value = _PARSERS[opt.type](opt, raw)
    if opt.minimum is not None and opt.type in ("int", "float") and value < opt.minimum:
        raise _fail(opt, raw, f"below the minimum {_number_text(opt.minimum)}")
    return value


# --------------------------------------------------------------------------- the registry


def _canonical(backend: str) -> str:
    return registry.get(backend).name


def describe_options(backend: str) -> list[BackendOption]:
    """The options ``backend`` declares (its module's ``OPTIONS``), in declaration order."""
    return list(registry.get(backend).options)


def all_options() -> dict[str, list[BackendOption]]:
    """Every backend's declared options, by canonical backend name."""
    return {name: describe_options(name) for name in registry.all_specs()}


def _unknown_key(key: Any, backend: str, declared: Mapping[str, BackendOption]) -> ValueError:
    valid = ", ".join(sorted(declared)) or "(none)"
    msg = f"unknown option {key!r} for the {backend} backend; valid options: {valid}"
    close = difflib.get_close_matches(str(key), list(declared), n=1, cutoff=0.6)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    else:
        owners = [name for name, opts in all_options().items()
                  if name != backend and any(o.name == key for o in opts)]
        if owners:
            msg += f" ({key} is an option of the {' and '.join(owners)} backend)"
    return ValueError(msg)


def validate_options(backend: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The given options, typed as ``backend`` declares them; ValueError on an unknown key or a bad value.

    Values may be text (``"20,24"``, ``"true"``), numbers, bools or lists; a None value means "not
    given" and is dropped. Only the given keys come back (defaults are ``resolve_options``' job), so
    validating twice gives the same dict.
    """
    name = _canonical(backend)
    declared = {o.name: o for o in describe_options(name)}
    given = dict(options or {})
    for key in given:
        if key not in declared:
            raise _unknown_key(key, name, declared)
    out: dict[str, Any] = {}
    for key, raw in given.items():
        if raw is None:
            continue
        try:
            out[key] = parse_value(declared[key], raw)
        except ValueError as exc:
            raise ValueError(f"{name} backend: {exc}") from None
    return out


def resolve_options(backend: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every declared option of ``backend``: the validated given ones, the declared default for the rest.

    What a backend's ``load`` works from, so a default lives in one place (its ``BackendOption``).
    """
    given = validate_options(backend, options)
    return {o.name: given.get(o.name, o.default) for o in describe_options(backend)}


def parse_option_items(items: Iterable[str]) -> dict[str, str]:
    """``["n_ctx=8192,flash_attn=false", "gpu_split=20,24"]`` -> ``{"n_ctx": "8192", ...}``, values as text.

    Items may hold several comma-separated ``KEY=VALUE`` parts; a part without ``=`` continues the
    previous value, so ``gpu_split=20,24`` keeps both numbers. Types are left to ``validate_options``,
    which knows each option's type. ValueError on a part that is not ``KEY=VALUE``.
    """
    out: dict[str, str] = {}
    for item in items:
        last: str | None = None
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            if sep and key.strip():
                last = key.strip()
                out[last] = value.strip()
            elif not sep and last is not None:
                out[last] = f"{out[last]},{part}"
            else:
                raise ValueError(f"expected KEY=VALUE, got {part!r}")
    return out
