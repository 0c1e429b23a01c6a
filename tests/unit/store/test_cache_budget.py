"""The cache budget: sizes, least-recently-used eviction that never touches an entry in use, the space
check before a model runs, and ``--convdiff-cache-info`` / ``--convdiff-cache-clear``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pytest_convdiff.errors import CacheError
from pytest_convdiff.store import budget as budget_mod
from pytest_convdiff.store import cache as cache_mod
from pytest_convdiff.store.budget import NO_LIMIT, CacheBudget, expected_entry_bytes, human_size, parse_size
from pytest_convdiff.store.cache import LOCK, Cache

ROOT = Path(__file__).resolve().parents[3]
ROWS = 250  # 250 x 1000 float32: 1 MB of logits per entry
DiskUsage = namedtuple("DiskUsage", "total used free")


def _entry(cache: Cache, key: str, *, used: float | None = None, model: str = "models/m", release: bool = True):
    """A fake entry of about 1 MB (no model), last used ``used`` seconds since the epoch."""
    w = cache.writer(key)
    w.add("p0.logits", np.zeros((ROWS, 1000), dtype=np.float32))
    entry = w.commit({"spec": {"path": model, "backend": "transformers"}, "created": time.time()})
    if release:
        entry.release()
    if used is not None:
        os.utime(entry.path / LOCK, (used, used))
    return entry


def _keys(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "pairs")


def _budget(n_bytes: int) -> CacheBudget:
    return CacheBudget(max_bytes=n_bytes)


MB = 10**6
ENTRY = MB  # about what _entry() takes on disk (the array; its .npy header and meta.json add ~400 bytes)
SLACK = ENTRY // 10  # budgets are whole entries plus this, so counting entries is what decides


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("20GB", 20 * 10**9), ("20 gb", 20 * 10**9), ("20G", 20 * 10**9), ("500MiB", 500 * 2**20),
    ("1.5TB", 1_500_000_000_000), ("2Ki", 2048), ("123456", 123456), ("100b", 100), (".5kB", 500),
])
def test_sizes_in_decimal_and_binary_units(text, expected):
    assert parse_size(text).max_bytes == expected and parse_size(text).share is None


@pytest.mark.parametrize("text", ["0", "0GB", "none", "Unlimited", "off"])
def test_zero_or_none_means_no_limit(text):
    assert parse_size(text).unlimited and parse_size(text).limit(10**12, 10**12) is None


def test_a_share_is_of_the_space_the_cache_can_use():
    b = parse_size("25%")
    assert b.share == 0.25 and b.limit(used=4 * MB, free=36 * MB) == 10 * MB
    assert b.limit(used=0, free=40 * MB) == b.limit(used=40 * MB, free=0)  # evicting does not move it


@pytest.mark.parametrize("text", ["lots", "-5GB", "20 XB", "1e9", "0%", "150%", "GB", ""])
def test_bad_sizes_name_the_accepted_forms(text):
    with pytest.raises(ValueError, match="20GB, 500MiB.*25%.*0 or none for no limit"):
        parse_size(text)


def test_a_bad_size_stops_the_run_with_a_usage_error(pytester):
    res = pytester.runpytest("--convdiff-cache-max-size", "lots", "--convdiff-cache-dir", "c", "-p", "no:randomly")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--convdiff-cache-max-size: 'lots' is not a size (accepted: 20GB, 500MiB*"])


def test_the_estimate_is_the_readmes_formula_and_covers_a_written_entry(tmp_path):
    smollm2 = {"vocab_size": 49152, "num_layers": 30, "hidden_size": 576}
    fp32 = SimpleNamespace(cache_dtype="float32", hidden_states=True, layer_swap=0)
    per_token = expected_entry_bytes(smollm2, 1, fp32)
    assert 403_984 <= per_token < 404_100  # README: 4·(V + 3·L·H) + 16 bytes, 404 kB per token
    assert 0.99e9 < expected_entry_bytes(smollm2, 2470, fp32) < 1.01e9  # "about 1.0 GB ... quick corpus"
    fp16 = SimpleNamespace(cache_dtype="float16", hidden_states=True, layer_swap=0)
    assert expected_entry_bytes(smollm2, 2470, fp16) < 0.51 * expected_entry_bytes(smollm2, 2470, fp32)
    logits_only = SimpleNamespace(cache_dtype="float32", hidden_states=False, layer_swap=4)
    assert expected_entry_bytes(smollm2, 10, logits_only, fed=True) == 10 * (4 * 49152 + 48)

    # against the arrays the runner writes for a small model (two prompts)
    v, layers, h, tokens = 300, 4, 32, (40, 70)
    w = Cache(tmp_path).writer("k")
    for i, t in enumerate(tokens):
        w.add(f"p{i}.own_tokens", np.zeros(t, np.int64))
        w.add(f"p{i}.inputs", np.zeros(t, np.int64))
        w.add(f"p{i}.logits", np.zeros((t, v), np.float32))
        w.add(f"p{i}.hidden", np.zeros((layers, t, h), np.float32))
        for sub in ("attn", "mlp"):
            w.add(f"p{i}.sub_{sub}", np.zeros((layers, t, h), np.float32))
    entry = w.commit({})
    written = sum(f.stat().st_size for f in entry.path.iterdir())
    estimate = expected_entry_bytes({"vocab_size": v, "num_layers": layers, "hidden_size": h}, sum(tokens), fp32)
    assert written * 0.95 < estimate < written * 1.1


# --------------------------------------------------------------------------- eviction


def test_least_recently_used_go_first_and_a_read_counts_as_use(tmp_path):
    cache = Cache(tmp_path, budget=_budget(3 * ENTRY + SLACK))
    now = time.time()
    for i, key in enumerate(("k1", "k2", "k3")):
        _entry(cache, key, used=now - 1000 + i)  # written in order: k1 is the oldest
    cache.get("k1").release()  # ... but read just now, so k2 is the least recently used
    cache.reserve(ENTRY, "models/new")
    assert _keys(tmp_path) == ["k1", "k3"]
    cache.reserve(2 * ENTRY, "models/bigger")
    assert _keys(tmp_path) == ["k1"]


def test_reading_an_entry_rewrites_none_of_its_files(tmp_path):
    cache = Cache(tmp_path)
    entry = _entry(cache, "k1", used=1000.0)
    before = {p.name: p.stat().st_mtime_ns for p in entry.path.iterdir() if p.name != LOCK}
    cache.get("k1").release()
    assert {p.name: p.stat().st_mtime_ns for p in entry.path.iterdir() if p.name != LOCK} == before
    assert (entry.path / LOCK).stat().st_mtime > time.time() - 60  # the last-use stamp moved


def test_an_entry_this_process_holds_is_never_evicted(tmp_path):
    cache = Cache(tmp_path, budget=_budget(2 * ENTRY + SLACK))
    held = _entry(cache, "old", used=1.0, release=False)  # the oldest, but a ModelRun still reads it
    _entry(cache, "newer", used=time.time())
    cache.reserve(ENTRY, "models/new")
    assert _keys(tmp_path) == ["old"]
    assert held.array("p0.logits").shape == (ROWS, 1000)


def test_an_entry_another_process_holds_is_never_evicted(tmp_path):
    cache = Cache(tmp_path, budget=_budget(2 * ENTRY + SLACK))
    _entry(cache, "theirs", used=1.0)
    _entry(cache, "mine", used=2.0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from pytest_convdiff.store.cache import Cache; "
         "e = Cache(Path(sys.argv[1])).get('theirs'); print('held' if e else 'missing', flush=True); sys.stdin.read()",
         str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.utime(tmp_path / "theirs" / LOCK, (1.0, 1.0))  # its read made it recent: make it the oldest again
        assert [s.name for s in cache.usage().in_use] == ["theirs"]
        cache.reserve(ENTRY, "models/new")  # evicts "mine", though "theirs" is older
        assert _keys(tmp_path) == ["theirs"]
        with pytest.raises(CacheError, match="in use by this or another running pytest") as info:
            cache.reserve(2 * ENTRY, "models/big")
        assert _keys(tmp_path) == ["theirs"] and "only 0 B could be evicted" in str(info.value)
        (scanned,) = cache.usage().of("entry")
        scanned.in_use = False  # as a scan made just before the holder took it would say
        # private: one eviction step, to race it against a concurrent reader
        assert not cache._evict_one(scanned) and _keys(tmp_path) == ["theirs"]  # the lock decides, not the scan
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    cache.reserve(2 * ENTRY, "models/big")  # its holder is gone (a dead process holds nothing)
    assert _keys(tmp_path) == []


@pytest.mark.parametrize("then", ["gone", "written again"])
def test_a_reader_waiting_on_an_evicted_entry_never_trusts_the_old_one(tmp_path, then):
    """The evictor holds the lock exclusively while it renames the entry to a trash name. A get() that
    opened the lock file before the rename finds nothing (no damage reported), or the entry written
    again since, which it then holds: not the lock of the evicted one."""
    import fcntl

    cache = Cache(tmp_path)
    _entry(cache, "k1")
    fd = os.open(tmp_path / "k1" / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an evictor, half-way
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # process-wide: a "damaged entry" warning in the reader fails it
        reader = threading.Thread(target=lambda: got.append(cache.get("k1")))
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive() and not got  # waiting for the evictor
        os.rename(tmp_path / "k1", tmp_path / ".trash-k1-x")
        if then == "written again":
            _entry(cache, "k1")
        os.close(fd)
        reader.join(timeout=10)
    if then == "gone":
        assert got == [None]
    else:
        assert got[0] is not None and got[0].path == tmp_path / "k1"
        assert [s.name for s in cache.usage().in_use] == ["k1"]  # the new entry is the one held


def test_eviction_never_leaves_an_entry_a_later_get_would_trust(tmp_path, monkeypatch):
    cache = Cache(tmp_path, budget=_budget(ENTRY + SLACK))
    _entry(cache, "k1", used=1.0)
    removed = []

    def killed_half_way(path, ignore_errors=False):  # the process dies while deleting: half the files go
        files = sorted(Path(path).iterdir())
        for f in files[: len(files) // 2]:
            f.unlink()
        removed.append(Path(path).name)

    monkeypatch.setattr(cache_mod.shutil, "rmtree", killed_half_way)
    cache.reserve(ENTRY, "models/new")
    monkeypatch.undo()
    assert removed and removed[0].startswith(".trash-k1-")
    assert cache.get("k1") is None and _keys(tmp_path) == []
    trash = tmp_path / removed[0]
    os.utime(trash, (0, 0))
    cache.clean_stale()  # the leftover goes with the next session's clean-up
    assert not trash.exists()


def test_committing_trims_the_cache_to_its_budget(tmp_path):
    cache = Cache(tmp_path, budget=_budget(2 * ENTRY + SLACK))
    _entry(cache, "k1", used=1.0)
    _entry(cache, "k2", used=2.0)
    _entry(cache, "k3")  # no reserve() call: the commit itself makes room
    assert _keys(tmp_path) == ["k2", "k3"]


def test_a_commit_over_budget_because_of_entries_in_use_warns_once(tmp_path):
    cache = Cache(tmp_path, budget=_budget(ENTRY + SLACK))
    held = [_entry(cache, "k1", release=False)]
    with pytest.warns(UserWarning, match="above its budget of 1.1 MB: 2.0 MB of it is in use by running tests"):
        held.append(_entry(cache, "k2", release=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        held.append(_entry(cache, "k3", release=False))  # said once is enough
    assert _keys(tmp_path) == ["k1", "k2", "k3"]


def test_pending_writes_of_other_processes_count(tmp_path):
    cache = Cache(tmp_path, budget=_budget(3 * ENTRY))
    other = Cache(tmp_path).writer("theirs")  # another worker is writing a 2-entry run
    other.expect(2 * ENTRY)
    with pytest.raises(CacheError, match="no room"):
        cache.reserve(2 * ENTRY, "models/mine")
    other.abort()
    cache.reserve(2 * ENTRY, "models/mine")


def test_documents_are_evicted_by_last_use_too(tmp_path):
    cache = Cache(tmp_path, budget=_budget(10**9))
    cache.put_json("old", {"a": "x", "b": "y", "pad": "." * 400})
    cache.put_json("read", {"a": "x", "b": "y", "pad": "." * 400})
    for name in ("old", "read"):
        os.utime(tmp_path / "pairs" / f"{name}.json", (1.0, 1.0))
    assert cache.get_json("read") is not None  # used now
    size = (tmp_path / "pairs" / "old.json").stat().st_size
    total = cache.usage().total
    cache.budget = _budget(total + size // 2)  # room for half a document more
    cache.reserve(size, "models/new")
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["read.json"]


# --------------------------------------------------------------------------- the space check


def test_an_entry_larger_than_the_budget_is_refused_and_nothing_is_evicted(tmp_path):
    cache = Cache(tmp_path, budget=_budget(5 * MB))
    _entry(cache, "k1", used=1.0)
    with pytest.raises(CacheError) as info:
        cache.reserve(8 * MB, "models/llama (transformers)")
    msg = str(info.value)
    assert f"convdiff cache {tmp_path}: no room for the outputs of models/llama (transformers) (about 8.0 MB)" in msg
    assert "budget is 5.0 MB (--convdiff-cache-max-size), less than this one entry" in msg
    for fix in ("Raise --convdiff-cache-max-size", "free space", "--convdiff-cache-dir", "--convdiff-cache-dtype float16"):
        assert fix in msg
    assert _keys(tmp_path) == ["k1"]


def test_a_full_disk_is_refused_before_the_model_runs(tmp_path, monkeypatch):
    cache = Cache(tmp_path, budget=NO_LIMIT)
    _entry(cache, "k1", used=1.0)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(100 * 10**9, 100 * 10**9 - 3 * 10**9, 3 * 10**9))
    with pytest.raises(CacheError) as info:
        cache.reserve(4 * 10**9, "models/llama (transformers)")
    msg = str(info.value)
    assert "(about 4.0 GB)" in msg and "has 3.0 GB free" in msg and "plus 1.1 GB left free" in msg
    assert str(tmp_path) in msg and "evicting everything not in use would free only 1.0 MB" in msg
    assert "Raise --convdiff-cache-max-size" not in msg  # no budget was in the way
    assert "free space on that disk, point --convdiff-cache-dir at a larger disk" in msg
    assert _keys(tmp_path) == ["k1"]  # evicting could not have been enough: nothing was


def test_eviction_makes_room_on_a_small_disk(tmp_path, monkeypatch):
    disk = 10**9  # a small disk: 5% of it (50 MB) is kept free; 53.5 MB is free but for the cache's files

    def small_disk(path):
        used = sum(f.stat().st_size for f in Path(tmp_path).rglob("*") if f.is_file())
        return DiskUsage(disk, disk - 53_500_000 + used, 53_500_000 - used)

    cache = Cache(tmp_path, budget=NO_LIMIT)
    for i, key in enumerate(("k1", "k2", "k3")):
        _entry(cache, key, used=100.0 + i)
    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    cache.reserve(2 * MB, "models/new")  # 50 MB + 2 MB must be free: two of the three entries go
    assert _keys(tmp_path) == ["k3"]


def test_a_share_budget_follows_the_disk(tmp_path, monkeypatch):
    cache = Cache(tmp_path, budget=parse_size("50%"))
    _entry(cache, "k1", used=1.0)
    _entry(cache, "k2", used=2.0)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(10 * MB, 6 * MB, 4 * MB))
    cache.reserve(ENTRY, "models/new")  # half of (2 MB held + 4 MB free) is 3 MB: one entry makes way
    assert _keys(tmp_path) == ["k2"]
    with pytest.raises(CacheError, match=r"budget is 50% of the disk space the cache can use, now 2\.5 MB"):
        cache.reserve(3 * MB, "models/big")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: (_ for _ in ()).throw(OSError("no statfs")))
    cache.reserve(3 * MB, "models/big")  # a share of an unknown disk limits nothing: no eviction either
    assert _keys(tmp_path) == ["k2"]


# --------------------------------------------------------------------------- info and clear


def test_info_lists_entries_documents_and_totals(tmp_path):
    cache = Cache(tmp_path, budget=_budget(100 * MB))
    _entry(cache, "a1b2c3", used=time.time() - 7200, model="models/tiny-llama")
    held = _entry(cache, "d4e5f6", model="models/tiny-f16.gguf", release=False)
    cache.put_json("pairdoc", {"a": "models/tiny-llama", "b": "models/tiny-f16.gguf", "metrics": {}})
    text = "\n".join(cache.info())
    lines = text.splitlines()
    assert lines[0] == f"convdiff cache {tmp_path}"
    assert "budget: 100.0 MB (--convdiff-cache-max-size); holds 2.0 MB (2% of the budget); disk:" in lines[1]
    assert "entries (2), least recently used first (evicted first):" in text
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["key", "size"])
    first, second = lines[header + 1].split(), lines[header + 2].split()
    assert first[0] == "a1b2c3" and first[-3:] == ["-", "transformers", "models/tiny-llama"]
    assert second[0] == "d4e5f6" and second[-3:] == ["yes", "transformers", "models/tiny-f16.gguf"]
    assert "pairs/pairdoc.json" in text and "models/tiny-llama -> models/tiny-f16.gguf" in text
    assert lines[-1].startswith("total: 2 entries 2.0 MB, 1 document ") and "1.0 MB in use" in lines[-1]
    held.release()


def test_info_on_an_empty_or_missing_cache_says_so(tmp_path):
    missing = Cache(tmp_path / "nowhere").info()
    assert missing[0] == f"convdiff cache {tmp_path / 'nowhere'}: does not exist (nothing has been cached there yet)."
    assert not (tmp_path / "nowhere").exists()
    empty = Cache(tmp_path).info()
    assert empty[-1] == "  the cache is empty."


def test_cache_info_on_the_command_line_lists_and_runs_nothing(pytester):
    cache = Cache(pytester.path / "c")
    _entry(cache, "abc123", model="models/tiny-llama")
    pytester.makepyfile(test_never="def test_never():\n    raise AssertionError('THE TEST RAN')\n")
    res = pytester.runpytest("--convdiff-cache-info", "--convdiff-cache-dir", "c", "-p", "no:randomly")
    assert res.ret == 0
    res.stdout.fnmatch_lines([f"convdiff cache {pytester.path / 'c'}", "*budget: 20.0 GB*",
                              "*abc123*transformers*models/tiny-llama", "total: 1 entry 1.0 MB*"])
    assert "THE TEST RAN" not in res.stdout.str() and "test session starts" not in res.stdout.str()
    default = pytester.runpytest("--convdiff-cache-info", "-p", "no:randomly")
    default.stdout.fnmatch_lines(["convdiff cache */.pytest_cache/d/convdiff: does not exist*"])
    assert default.ret == 0


def test_clear_removes_what_no_one_uses(tmp_path):
    cache = Cache(tmp_path)
    _entry(cache, "k1")
    held = _entry(cache, "k2", release=False)
    cache.put_json("doc", {"x": 1})
    removed, kept = cache.clear()
    assert sorted(s.name for s in removed) == ["k1", "pairs/doc.json"] and [s.name for s in kept] == ["k2"]
    assert _keys(tmp_path) == ["k2"]
    lines = budget_mod.cleared_lines(tmp_path, removed, kept)
    assert lines[0].endswith("cleared 1 entry and 1 document (1.0 MB).") and "kept 1 entry in use" in lines[1]
    held.release()


def test_human_sizes():
    assert [human_size(n) for n in (0, 999, 1500, 2.5e6, 20e9, 3e12)] == [
        "0 B", "999 B", "1.5 kB", "2.5 MB", "20.0 GB", "3.0 TB"]
