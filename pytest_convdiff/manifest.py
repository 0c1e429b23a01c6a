"""Model-zoo manifests: a TOML file listing many A/B pairs, collected by pytest like a test file.

    # zoo.convdiff.toml
    [defaults]
    corpus = "quick"                       # or a path relative to this file
    options_b = { n_threads = 4 }
    bounds = { rfn = 0.05 }

    [[pair]]
    id = "llama-f16"                       # optional: derived from the file names
    model_a = "models/llama-hf"            # paths relative to this file
    model_b = ["models/llama-f16.gguf", "models/llama-q8_0.gguf"]   # one pair per B
    marks = ["slow"]

Keys of an entry: ``model_a``, ``model_b`` (string or list), ``id``, ``backend_a``,
``backend_b``, ``options_a``, ``options_b`` (tables), ``bounds`` (table), ``corpus``, ``marks``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import parse_bound_mapping
from .core.pair_id import pair_id, safe_id
from .errors import ConvdiffError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_KEYS = {"id", "model_a", "model_b", "backend_a", "backend_b", "options_a", "options_b", "bounds", "corpus", "marks",
         "imatrix"}
_MARK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ManifestEntry:
    id: str
    model_a: str
    model_b: str
    backend_a: str | None = None
    backend_b: str | None = None
    options_a: dict[str, Any] = field(default_factory=dict)
    options_b: dict[str, Any] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    corpus: str | None = None
    marks: list[str] = field(default_factory=list)
    imatrix: str | None = None  # llama.cpp's importance matrix B was quantised with (relative to the manifest)


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


CORPUS_VALUES = ('"default" (the built-in corpus), "quick" (its short version), or the path of a corpus file, '
                 'relative to the manifest: .txt (one prompt per line), .jsonl or .parquet (a "text" column)')


def _corpus(entry: dict[str, Any], raw: dict[str, Any], base: Path, where: str,
            corpora: dict[str, str | None]) -> str | None:
    """The entry's ``corpus``: "default", "quick", a corpus file's resolved path, or None (the session's).
    A value that is none of these is a ConvdiffError naming the entry, the key and the accepted values."""
    if "corpus" not in entry:
        return None
    value = entry["corpus"]
    key = "corpus" if "corpus" in raw else "corpus (from [defaults])"
    if not isinstance(value, str) or not value.strip():
        raise ConvdiffError(f"{where}: {key} = {value!r} is not a corpus; accepted: {CORPUS_VALUES}.")
    if value in ("default", "quick"):
        return value
    resolved = _resolve(base, value)
    if resolved not in corpora:
        problem = None
        if not Path(resolved).is_file():
            problem = f"no such file {resolved}" if not Path(resolved).exists() else f"{resolved} is not a file"
        else:
            from .core.corpus import load_corpus

            try:
                load_corpus(resolved)
            except ConvdiffError as exc:
                problem = str(exc).replace(" (--convdiff-prompts)", "").rstrip(".")
        corpora[resolved] = problem
    if corpora[resolved] is not None:
        raise ConvdiffError(f"{where}: {key} = {value!r} cannot be used ({corpora[resolved]}); "
                            f"accepted: {CORPUS_VALUES}.")
    return resolved


def load_manifest(path: Path) -> list[ManifestEntry]:
    """Entries of a manifest, validated; ConvdiffError naming the file, the entry and the problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConvdiffError(f"{path}: not a readable TOML manifest ({exc}).") from exc
    defaults = data.get("defaults", {})
    pairs = data.get("pair")
    unknown = set(data) - {"defaults", "pair"}
    if unknown:
        raise ConvdiffError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [defaults] and [[pair]].")
    if not isinstance(pairs, list) or not pairs:
        raise ConvdiffError(f"{path}: no [[pair]] entries; each needs model_a and model_b.")
    base = path.parent
    out: list[ManifestEntry] = []
    seen: set[str] = set()
    corpora: dict[str, str | None] = {}  # each corpus file read once: its path -> the problem with it, if any
    for n, raw in enumerate(pairs, start=1):
        where = f"{path}, pair {n}"
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"]:
            where += f" (id {raw['id']!r})"
        if not isinstance(raw, dict):
            raise ConvdiffError(f"{where}: expected a table")
        entry = {**defaults, **raw}
        for key in ("options_a", "options_b", "bounds"):
            if isinstance(defaults.get(key), dict) and isinstance(raw.get(key), dict):
                entry[key] = {**defaults[key], **raw[key]}
        bad = set(entry) - _KEYS
        if bad:
            raise ConvdiffError(f"{where}: unknown key(s) {sorted(bad)}; known: {sorted(_KEYS)}")
        if not entry.get("model_a") or not entry.get("model_b"):
            raise ConvdiffError(f"{where}: needs model_a and model_b")
        bs = entry["model_b"] if isinstance(entry["model_b"], list) else [entry["model_b"]]
        marks = entry.get("marks", [])
        if isinstance(marks, str):
            marks = [marks]
        for m in marks:
            if not isinstance(m, str) or not _MARK.match(m):
                raise ConvdiffError(f"{where}: mark {m!r} is not a valid marker name")
        try:
            bounds = parse_bound_mapping(dict(entry.get("bounds") or {}), f"{where}, bounds")
        except ValueError as exc:
            raise ConvdiffError(str(exc)) from None
        for key in ("backend_a", "backend_b"):
            if entry.get(key):
                from .backends import normalize_backend_name

                try:
                    entry[key] = normalize_backend_name(str(entry[key]))
                except ValueError as exc:
                    raise ConvdiffError(f"{where}: {key}: {exc}") from None
        corpus = _corpus(entry, raw, base, where, corpora)
        imatrix = _resolve(base, str(entry["imatrix"])) if entry.get("imatrix") else None
        model_a = _resolve(base, str(entry["model_a"]))
        for b in bs:
            model_b = _resolve(base, str(b))
            pid = safe_id(str(entry["id"])) if entry.get("id") else pair_id(model_a, model_b)
            if len(bs) > 1 and entry.get("id"):
                pid = safe_id(f"{entry['id']}-{Path(model_b).name}")
            if pid in seen:
                raise ConvdiffError(f"{where}: pair id {pid!r} is used twice in this manifest; give each an id")
            seen.add(pid)
            out.append(ManifestEntry(pid, model_a, model_b, entry.get("backend_a"), entry.get("backend_b"),
                                     dict(entry.get("options_a") or {}), dict(entry.get("options_b") or {}),
                                     bounds, corpus, list(marks), imatrix))
    return out
