"""config[special_tokens] and config[eog]: B stops where A stops, whether or not the checkpoint ships a chat template.

A tiny checkpoint without a chat template (the check must not depend on one) and GGUFs written from it by
fixtures/gguf_writer.py: correct, with the end-of-turn token typed NORMAL, and against an A whose
generation_config.json lists a second stop id that B's runtime does not stop on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama.cpp reads B's end-of-generation set")
pytest.importorskip("gguf")

NORMAL = 1  # gguf.TokenType.NORMAL


@pytest.fixture
def no_template(tiny_ref: Path, tmp_path: Path) -> Path:
    """tiny-llama without a chat template: special tokens are then emitted by no template render."""
    dst = tmp_path / "tiny-no-template"
    shutil.copytree(tiny_ref, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    return dst


def _items(a: Path, b: Path) -> dict:
    from pytest_convdiff import compare

    res = compare(a, b, static_only=True)
    assert res.error is None, res.error
    return {c.id: c for c in res.checks if c.name == "config"}


def _special_id(hf: Path, text: str) -> int:
    tok = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    return next(t["id"] for t in tok["added_tokens"] if t["content"] == text)


def test_a_correct_file_passes_both(no_template: Path, tmp_path: Path):
    from fixtures import gguf_writer

    b = gguf_writer.write_gguf(no_template, tmp_path / "ok.gguf", "f32")
    items = _items(no_template, b)
    assert items["config[special_tokens]"].outcome == "passed", items["config[special_tokens]"].message
    assert items["config[eog]"].outcome == "passed", items["config[eog]"].message
    assert items["config[chat_template]"].outcome == "passed"  # neither has one


def test_an_end_of_turn_token_typed_normal_fails_by_name_without_a_chat_template(no_template: Path, tmp_path: Path):
    from fixtures import gguf_writer

    eot = _special_id(no_template, "<|im_end|>")
    b = gguf_writer.write_gguf(no_template, tmp_path / "eot-normal.gguf", "f32", token_types={eot: NORMAL})
    items = _items(no_template, b)
    failed = {k for k, c in items.items() if c.outcome == "failed"}
    assert failed == {"config[special_tokens]"}, {k: items[k].message for k in failed}
    msg = items["config[special_tokens]"].message
    assert f"'<|im_end|>' (id {eot}): special in A, typed NORMAL in B" in msg and "printed when generated" in msg


def test_a_stop_id_b_does_not_stop_on_fails_by_name(no_template: Path, tmp_path: Path):
    """generation_config.json lists a second stop id; llama.cpp's runtime does not end generation there."""
    from fixtures import gguf_writer

    second = _special_id(no_template, "<|im_start|>")
    gen = json.loads((no_template / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen["eos_token_id"]
    gen["eos_token_id"] = [eos, second]
    (no_template / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    b = gguf_writer.write_gguf(no_template, tmp_path / "one-stop.gguf", "f32")
    items = _items(no_template, b)
    assert items["config[eog]"].outcome == "failed"
    msg = items["config[eog]"].message
    assert f"A stops at '<|im_start|>' (id {second}), B's runtime does not" in msg
    assert items["config[special_tokens]"].outcome == "passed"


def test_a_control_token_that_a_reads_as_text_fails(no_template: Path, tmp_path: Path):
    """The other direction: B marks an ordinary token of A's as CONTROL (never produced from text, never printed)."""
    from fixtures import gguf_writer

    tok = json.loads((no_template / "tokenizer.json").read_text(encoding="utf-8"))
    text, i = next((t, i) for t, i in tok["model"]["vocab"].items() if len(t) > 2 and t.isalpha())
    b = gguf_writer.write_gguf(no_template, tmp_path / "control.gguf", "f32", token_types={i: 3})
    msg = _items(no_template, b)["config[special_tokens]"].message
    assert f"{text!r} (id {i}): ordinary text in A, a control token in B" in msg


def test_both_run_in_a_golden_reference_replay(no_template: Path, tmp_path: Path):
    """A reference saved from A keeps A's special tokens and stop ids: against it (A's files gone), the end-of-turn
    token typed NORMAL still fails by name, and the correct file passes."""
    from fixtures import gguf_writer
    from pytest_convdiff.comparison import Comparison
    from pytest_convdiff.core.corpus import load_corpus
    from pytest_convdiff.runner import ModelSpec, RunSettings
    from pytest_convdiff.store.cache import Cache

    ok = gguf_writer.write_gguf(no_template, tmp_path / "ok.gguf", "f32")
    eot = _special_id(no_template, "<|im_end|>")
    bad = gguf_writer.write_gguf(no_template, tmp_path / "eot-normal.gguf", "f32", token_types={eot: NORMAL})
    ref = tmp_path / "a.reference.safetensors"
    settings = RunSettings(runtime_twin="off")
    Comparison(ModelSpec(str(no_template)), ModelSpec(str(ok)), load_corpus("quick"), Cache(tmp_path / "cache"),
               settings, {}, "save", None, ref).result()
    shutil.rmtree(no_template)
    good, broken = _items(ref, ok), _items(ref, bad)
    assert good["config[special_tokens]"].outcome == "passed" and good["config[eog]"].outcome == "passed"
    assert broken["config[special_tokens]"].outcome == "failed"
    assert f"'<|im_end|>' (id {eot}): special in A, typed NORMAL" in broken["config[special_tokens]"].message
