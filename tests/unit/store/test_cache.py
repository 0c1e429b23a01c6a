"""The cache: atomic entries, checksums, damage detected and recomputed, no partial entry on failure."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pytest_convdiff.errors import CacheError
from pytest_convdiff.store import cache as cache_mod
from pytest_convdiff.store.cache import Cache, content_fingerprint, sha256_file


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


def _later(path, seconds: float = 2.0) -> None:
    """Give a file the mtime a later modification has (a test runs faster than the clock's tick)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def test_checksums_are_those_of_the_written_files(tmp_path):
    entry = _write(Cache(tmp_path))
    for name, rec in entry.meta["files"].items():
        f = entry.path / f"{name}.npy"
        assert rec["sha256"] == sha256_file(f) and rec["bytes"] == f.stat().st_size


def test_flipped_byte_is_detected_and_discarded(tmp_path):
    cache = Cache(tmp_path)
    entry = _write(cache)
    f = entry.path / "a.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    _later(f)
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert cache.get("k1") is None
    assert not (tmp_path / "k1").exists()
    _write(cache)  # recomputed
    assert cache.get("k1") is not None


def test_intact_entry_is_read_without_hashing_until_a_file_changes(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    entry = _write(cache)
    hashed = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert cache.get("k1") is not None and hashed == []
    _later(entry.path / "a.npy")  # touched (or copied without its times): content intact
    assert cache.get("k1") is not None and hashed == ["a.npy"]
    assert cache.get("k1") is not None and hashed == ["a.npy"]  # the new mtime was recorded


def test_full_verify_catches_a_flip_that_kept_size_and_mtime(tmp_path):
    cache = Cache(tmp_path)
    entry = _write(cache)
    f = entry.path / "a.npy"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get("k1") is not None  # stat-level check: same size, same mtime
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert Cache(tmp_path, full_verify=True).get("k1") is None


def test_pair_documents_roundtrip_and_damage_is_a_miss(tmp_path):
    cache = Cache(tmp_path)
    assert cache.get_json("p1") is None
    cache.put_json("p1", {"metrics": {"x": float("nan"), "y": 1.5}})
    doc = cache.get_json("p1")
    assert doc["metrics"]["y"] == 1.5 and doc["metrics"]["x"] != doc["metrics"]["x"]
    assert Cache(tmp_path, read=False).get_json("p1") is None
    (tmp_path / "pairs" / "p1.json").write_text("{torn")
    assert cache.get_json("p1") is None


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

    class FullDisk(cache_mod._HashingFile):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_mod, "_HashingFile", FullDisk)
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


def test_cache_dtype_spellings_share_one_key_and_bad_ones_fail_early():
    from pytest_convdiff.runner import RunSettings

    assert RunSettings(cache_dtype="FP16").key() == RunSettings(cache_dtype="float16").key()
    assert RunSettings(cache_dtype="f32").key() == RunSettings().key()
    assert RunSettings(cache_dtype="half").key() != RunSettings().key()
    with pytest.raises(ValueError, match="'int8' is not one of float32, float16"):
        RunSettings(cache_dtype="int8")


def test_small_documents_live_in_named_folders_and_names_cannot_escape(tmp_path):
    cache = Cache(tmp_path)
    cache.put_json("abc123", {"v": 1})
    cache.put_json("abc123", {"v": 2}, folder="other")
    assert cache.get_json("abc123")["v"] == 1 and cache.get_json("abc123", folder="other")["v"] == 2
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["abc123.json"]  # no temporary file left
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="not a document name"):
            cache.put_json(bad, {})
    with pytest.raises(ValueError, match="not a document name"):
        cache.get_json("x", folder="..")


def test_restamped_meta_is_rewritten_atomically(tmp_path, monkeypatch):
    from pytest_convdiff.store import atomic

    cache = Cache(tmp_path)
    entry = _write(cache)
    _later(entry.path / "a.npy")
    written = []
    real = atomic.write_text
    monkeypatch.setattr(atomic, "write_text", lambda p, t: written.append(p) or real(p, t))
    assert cache.get("k1") is not None and written == [entry.path / "meta.json"]
    # no temporary file left; .lock is the entry's in-use lock and last-use stamp
    assert sorted(p.name for p in entry.path.iterdir()) == [".lock", "a.npy", "b.npy", "meta.json"]


def test_clean_stale_removes_only_old_leftovers(tmp_path):
    cache = Cache(tmp_path)
    entry = _write(cache)
    cache.put_json("doc", {"x": 1})
    old_dir, young_dir = tmp_path / ".tmp-k2-dead", tmp_path / ".tmp-k3-live"
    old_dir.mkdir()
    young_dir.mkdir()
    old_doc, young_doc = tmp_path / "pairs" / ".doc.json.dead.tmp", tmp_path / "pairs" / ".doc.json.live.tmp"
    old_doc.write_text("{")
    young_doc.write_text("{")
    for p in (old_dir, old_doc):
        os.utime(p, (0, 0))
    cache.clean_stale()
    assert not old_dir.exists() and not old_doc.exists()
    assert young_dir.exists() and young_doc.exists() and entry.path.exists() and cache.get_json("doc")["x"] == 1
