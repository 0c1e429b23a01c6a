"""The cache: atomic entries, checksums, damage detected and recomputed, no partial entry on failure."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pytest_convdiff.cache import Cache, content_fingerprint
from pytest_convdiff.errors import CacheError


def _write(cache: Cache, key: str = "k1", value: float = 1.0):
    w = cache.writer(key)
    w.add("a", np.full((3, 4), value, dtype=np.float32))
    w.add("b", np.arange(5))
    return w.commit({"info": {"x": 1}})


def test_roundtrip_is_memory_mapped(tmp_path):
    cache = Cache(tmp_path)
    _write(cache)
    entry = cache.get("k1")
    assert entry is not None and entry.meta["info"] == {"x": 1}
    a = entry.array("a")
    assert isinstance(a, np.memmap) and a.shape == (3, 4) and float(a[0, 0]) == 1.0
    assert list(entry.array("b")) == [0, 1, 2, 3, 4]


def test_missing_entry_is_none(tmp_path):
    assert Cache(tmp_path).get("nothing") is None


def test_flipped_byte_is_detected_and_discarded(tmp_path):
    cache = Cache(tmp_path)
    entry = _write(cache)
    f = entry.path / "a.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert cache.get("k1") is None
    assert not (tmp_path / "k1").exists()
    _write(cache)  # recomputed
    assert cache.get("k1") is not None


def test_truncated_file_is_detected(tmp_path):
    cache = Cache(tmp_path)
    entry = _write(cache)
    f = entry.path / "b.npy"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.warns(UserWarning, match="damaged"):
        assert cache.get("k1") is None


def test_damaged_meta_is_detected(tmp_path):
    cache = Cache(tmp_path)
    entry = _write(cache)
    (entry.path / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get("k1") is None


def test_killed_writer_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path)
    w = cache.writer("k1")
    w.add("a", np.zeros(3))
    # the process dies here: no commit
    assert cache.get("k1") is None
    assert _write(cache) is not None and cache.get("k1") is not None


def test_second_writer_of_same_entry_keeps_one_complete_entry(tmp_path):
    cache = Cache(tmp_path)
    w1, w2 = cache.writer("k1"), cache.writer("k1")
    for w in (w1, w2):
        w.add("a", np.ones(4))
    e1 = w1.commit({})
    e2 = w2.commit({})
    assert e1.path == e2.path
    assert cache.get("k1") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]


def test_disk_full_gives_clear_error_and_no_partial_entry(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    w = cache.writer("k1")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(CacheError, match="disk is full.*--convdiff-cache-dir"):
        w.add("a", np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_refresh_mode_never_reads(tmp_path):
    _write(Cache(tmp_path))
    assert Cache(tmp_path, read=False).get("k1") is None


def test_fingerprint_changes_with_content_not_location(tmp_path):
    d1, d2 = tmp_path / "m1", tmp_path / "m2"
    for d in (d1, d2):
        d.mkdir()
        (d / "w.bin").write_bytes(b"abc" * 100)
    assert content_fingerprint([d1 / "w.bin"], d1) == content_fingerprint([d2 / "w.bin"], d2)
    (d2 / "w.bin").write_bytes(b"abd" * 100)
    assert content_fingerprint([d1 / "w.bin"], d1) != content_fingerprint([d2 / "w.bin"], d2)
