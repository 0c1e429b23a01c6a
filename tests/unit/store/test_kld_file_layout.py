"""llama-perplexity's base-logit file: its byte layout, and damaged files named as such."""

import struct

import numpy as np
import pytest

from pytest_convdiff.core.llama_stats import encode_rows, row_width
from pytest_convdiff.store.kld_file import KldFileError, read_kld, scored_rows, write_kld


def _write(path, n_chunk=2, n_ctx=8, n_vocab=5):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, n_vocab, size=(n_chunk, n_ctx))
    logits = rng.normal(size=(n_chunk, scored_rows(n_ctx), n_vocab)).astype(np.float32)
    write_kld(path, tokens, n_vocab, lambda i: encode_rows(logits[i]))
    return tokens, logits


def test_the_bytes_follow_llama_perplexitys_layout(tmp_path):
    p = tmp_path / "base.kld"
    tokens, logits = _write(p)
    raw = p.read_bytes()
    assert raw[:8] == b"_logits_" and struct.unpack("<iii", raw[8:20]) == (8, 5, 2)
    assert np.array_equal(np.frombuffer(raw[20:20 + 4 * 16], dtype="<i4").reshape(2, 8), tokens)
    assert scored_rows(8) == 3  # positions 4, 5, 6 predict tokens 5, 6, 7
    rows = np.frombuffer(raw[20 + 64:], dtype="<u2").reshape(2, 3, row_width(5))
    assert np.array_equal(rows[1], encode_rows(logits[1])) and len(raw) == 20 + 64 + 2 * 2 * 3 * 10
    f = read_kld(p)
    assert (f.n_ctx, f.n_vocab, f.n_chunk, f.first) == (8, 5, 2, 4)
    assert np.array_equal(f.targets(1), tokens[1, 5:]) and np.array_equal(f.rows[0], rows[0])


def test_a_truncated_file_is_named_truncated(tmp_path):
    p = tmp_path / "base.kld"
    _write(p)
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(KldFileError, match="truncated"):
        read_kld(p)


def test_a_file_of_another_kind_says_how_to_make_one(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a base file")
    with pytest.raises(KldFileError, match="does not start with '_logits_'.*kl-divergence-base"):
        read_kld(p)
    with pytest.raises(KldFileError, match="cannot read it"):
        read_kld(tmp_path / "missing.kld")
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"_logits_" + struct.pack("<iii", 2, 5, 1))
    with pytest.raises(KldFileError, match="n_ctx=2"):
        read_kld(bad)


def test_a_writer_that_fails_leaves_no_file(tmp_path):
    p = tmp_path / "base.kld"

    def rows(i):
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        write_kld(p, np.zeros((1, 8), dtype=np.int32), 5, rows)
    assert not p.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="expected"):
        write_kld(p, np.zeros((1, 8), dtype=np.int32), 5, lambda i: np.zeros((2, 10), dtype=np.uint16))


def test_the_kld_command_refuses_a_backend_option_that_is_not_key_value_before_loading_anything(tmp_path, capsys):
    from pytest_convdiff.__main__ import main

    assert main(["kld", "score", str(tmp_path / "model.gguf"), "--base", str(tmp_path / "b.kld"), "--option",
                 "n_threads"]) == 2
    assert "--option: expected KEY=VALUE, got 'n_threads'" in capsys.readouterr().err
