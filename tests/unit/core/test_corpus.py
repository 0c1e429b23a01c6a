"""Corpus: the built-in default and user files, with clear errors."""

from __future__ import annotations

import json

import pytest

from pytest_convdiff.core.corpus import default_corpus, load_corpus
from pytest_convdiff.errors import CorpusError


def test_default_corpus_covers_the_kinds_and_a_long_text():
    c = default_corpus()
    kinds = {p.kind for p in c}
    assert {"prose", "code", "maths", "multilingual", "chat", "long"} <= kinds
    long = next(p for p in c if p.kind == "long")
    assert len(long.text.split()) > 900  # > 1024 tokens for any subword tokenizer
    assert default_corpus().digest == c.digest


def test_text_file_one_prompt_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    c = load_corpus(f)
    assert [p.text for p in c] == ["first prompt", "second prompt"]
    assert [p.id for p in c] == ["line-1", "line-3"]


def test_jsonl_objects_and_strings(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a b", "text": "hello"}) + "\n" + json.dumps("plain") + "\n", encoding="utf-8")
    c = load_corpus(f)
    assert [(p.id, p.text) for p in c] == [("a-b", "hello"), ("line-2", "plain")]


@pytest.mark.parametrize(("content", "match"), [
    ("", "corpus is empty"),
    ("\n\n", "corpus is empty"),
    ('{"text": ""}\n', "line 1: the prompt is empty"),
    ('{"text": "ok"}\n{broken\n', "line 2: not valid JSON"),
    ('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "appears twice"),
    ('{"no_text": 1}\n', 'line 1: expected a JSON string or an object with a "text"'),
])
def test_bad_corpus_files_name_file_and_line(tmp_path, content, match):
    f = tmp_path / ("p.jsonl" if content.strip().startswith("{") else "p.txt")
    f.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=match) as exc:
        load_corpus(f)
    assert str(f) in str(exc.value)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt")


def test_quick_corpus_is_a_subset_with_the_long_prompt():
    q = load_corpus("quick")
    assert "long-essay" in [p.id for p in q] and len(q) < len(default_corpus())
