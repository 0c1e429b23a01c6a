"""The evaluation corpus: a built-in default and user-supplied files.

The default mixes prose, code, maths, several languages and scripts, a
ChatML-rendered conversation, and one long sequence (well over 1024 tokens for a
49k-vocabulary tokenizer): position-handling bugs (rope, context scaling) only
show at long positions, and a single short prompt lets them through.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import CorpusError

_ID_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Prompt:
    """One evaluation text. ``id`` appears in test ids and messages."""

    id: str
    text: str
    kind: str = "text"


@dataclass(frozen=True)
class Corpus:
    prompts: tuple[Prompt, ...]
    source: str = "built-in"
    # a corpus given as token ids rather than texts (a llama-perplexity base file's chunks): their digest
    tokens_digest: str = ""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise CorpusError(f"{self.source}: the corpus is empty; give at least one non-empty prompt.")
        seen: set[str] = set()
        for p in self.prompts:
            if p.id in seen:
                raise CorpusError(f"{self.source}: prompt id {p.id!r} appears twice; ids must be unique.")
            seen.add(p.id)

    def __iter__(self):
        return iter(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def digest(self) -> str:
        """Content hash: any change to a prompt's id or text invalidates cached outputs."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(json.dumps([p.id, p.text], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        h.update(self.tokens_digest.encode())
        return h.hexdigest()[:16]


def _long_text() -> str:
    essay = resources.files("pytest_convdiff").joinpath("data/long_essay.txt").read_text(encoding="utf-8")
    rows = []
    for i in range(40):
        # A deterministic table: digits, separators and units at long positions.
        temp = ((i * 37) % 200) / 10.0 - 5.0
        pressure = 990 + (i * 13) % 40
        rows.append(f"| station-{i % 7 + 1:02d} | 2024-03-{i % 28 + 1:02d} | {temp:+.1f} °C | {pressure} hPa |")
    table = "| station | date | temperature | pressure |\n|---|---|---|---|\n" + "\n".join(rows)
    return essay.strip() + "\n\nMeasurements recorded along the river this spring:\n\n" + table + "\n"


def default_corpus() -> Corpus:
    """The built-in corpus (stable across runs, so its outputs cache)."""
    path = resources.files("pytest_convdiff").joinpath("data/default_corpus.jsonl")
    prompts = list(_parse_jsonl(path.read_text(encoding="utf-8").splitlines(), "built-in corpus"))
    prompts.append(Prompt("long-essay", _long_text(), "long"))
    return Corpus(tuple(prompts), "built-in")


def quick_corpus() -> Corpus:
    """Three short prompts and the long one: for quick smoke runs."""
    keep = {"prose-en", "code-python", "chat", "long-essay"}
    return Corpus(tuple(p for p in default_corpus() if p.id in keep), "built-in:quick")


def _clean_id(raw: str) -> str:
    return _ID_RE.sub("-", raw).strip("-") or "prompt"


def _parse_jsonl(lines: Iterable[str], source: str) -> Iterable[Prompt]:
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{source}, line {n}: not valid JSON ({exc.msg}).") from exc
        if isinstance(obj, str):
            text, pid, kind = obj, f"line-{n}", "text"
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            text = obj["text"]
            pid = _clean_id(str(obj.get("id", f"line-{n}")))
            kind = str(obj.get("kind", "text"))
        else:
            raise CorpusError(f"{source}, line {n}: expected a JSON string or an object with a \"text\" string.")
        if not text.strip():
            raise CorpusError(f"{source}, line {n}: the prompt is empty; remove the line or give it text.")
        yield Prompt(pid, text, kind)


def load_corpus(path: str | Path | None) -> Corpus:
    """Read a corpus file: ``.jsonl``, ``.parquet`` (a ``text`` column), or plain text (one prompt per line).

    ``None`` or ``"default"`` gives the built-in corpus, ``"quick"`` a smaller one.
    """
    if path is None or str(path) == "default":
        corpus = default_corpus()
    elif str(path) == "quick":
        corpus = quick_corpus()
    else:
        p = Path(path)
        if not p.is_file():
            raise CorpusError(f"{p}: corpus file not found (--convdiff-prompts).")
        if p.suffix == ".parquet":
            corpus = Corpus(tuple(_read_parquet(p)), str(p))
        else:
            try:
                content = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
            lines = content.splitlines()
            if p.suffix in (".jsonl", ".json"):
                prompts = list(_parse_jsonl(lines, str(p)))
            else:
                # Plain text: one prompt per line; blank lines are separators, not prompts.
                prompts = [Prompt(f"line-{n}", line, "text") for n, line in enumerate(lines, start=1) if line.strip()]
            corpus = Corpus(tuple(prompts), str(p))
    return corpus


def _read_parquet(path: Path) -> Iterable[Prompt]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CorpusError(f"{path}: reading parquet needs pyarrow: pip install pyarrow.") from exc
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise CorpusError(f"{path}: parquet corpus needs a 'text' column (has {table.column_names}).")
    for n, text in enumerate(table.column("text").to_pylist(), start=1):
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{path}, row {n}: empty or non-text prompt.")
        yield Prompt(f"row-{n}", text, "text")
