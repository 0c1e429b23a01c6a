"""On-disk store of one model's outputs over one corpus.

An entry is a directory named by its key, holding one ``.npy`` file per array
(read back memory-mapped, so a large corpus is never all in memory) and a
``meta.json`` with each file's SHA-256, size and mtime. Entries are written into a
private temporary directory and renamed into place in one step, so a killed run, a
full disk or two xdist workers racing never leave a torn entry.

Reading an entry checks every file's size and mtime against meta.json and re-hashes
only a file whose mtime changed (``full_verify`` re-hashes all of them): a warm run
over gigabytes of logits then costs a few ``stat`` calls, while a file that was
truncated, rewritten or modified after it was written fails its checksum and the
entry is recomputed. Writers hash the bytes as they write them, so nothing is read back.

Beside the entries, folders of small JSON documents (``pairs/``: the bound-independent
metrics of a pair of entries) spare a warm run reducing the arrays again. Every file written
here outside an entry's private directory goes through ``store.atomic``.

The cache keeps to a budget (``store.budget``: 20 GB unless told otherwise). Before a model runs,
``Cache.reserve`` makes room for its entry's estimated size or refuses with the numbers; before an
entry is committed, ``trim`` brings the cache back within the budget. Both evict whole entries and
documents, least recently used first, and never an entry in use: each entry holds a ``.lock`` file
that every reader and writer holds a shared ``flock`` on for as long as it has the entry open, and
whose mtime is the entry's last use (so reading an entry rewrites none of its files). An evictor takes
the lock exclusively, without waiting, and renames the entry to a trash name before deleting it, so a
later ``get`` sees the whole entry or none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheError
from .atomic import write_json
from .budget import (
    DEFAULT_BUDGET,
    DOCUMENT,
    ENTRY,
    PENDING,
    CacheBudget,
    CacheUsage,
    Stored,
    eviction_order,
    headroom,
    info_lines,
    over_budget,
    refusal,
)

try:  # flock: seen by every process, also between two opens in one process, dropped when a process dies
    import fcntl
except ImportError:  # pragma: no cover - Windows: _held falls back to the last-used age
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 2
META = "meta.json"
PAIRS = "pairs"
LOCK = ".lock"  # in each entry: held shared while it is in use; its mtime is the entry's last use
EXPECTED = ".expected"  # in a writer's temporary directory: the bytes reserved for it, for others' budgets
STALE_SECONDS = 3600  # a leftover older than this belongs to a dead process, not a live writer
_DOC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PARALLEL_HASH_BYTES = 8 << 20


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_fingerprint(files: Iterable[Path], root: Path | None = None) -> str:
    """A cheap content fingerprint: size plus hashes of the first, middle and last MiB of each file.

    Small files (< 8 MiB) are hashed whole. Re-converting a model in place changes it;
    copying it elsewhere does not.
    """
    h = hashlib.sha256()
    window = 1 << 20
    for f in sorted(Path(p) for p in files):
        size = f.stat().st_size
        name = str(f.relative_to(root)) if root and f.is_relative_to(root) else f.name
        h.update(f"{name}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 8 * window:
                h.update(fh.read())
            else:
                for off in (0, size // 2, size - window):
                    fh.seek(off)
                    h.update(fh.read(window))
    return h.hexdigest()[:20]


def make_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it (the .npy header is
    written through it; the array's bytes are hashed and written side by side)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return self.fh.write(data)


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _Lease:
    """A shared lock on one entry's lock file: while any process holds one, no process evicts the entry.

    Released by ``release`` or when its holder (a ``CacheEntry``, hence a ``ModelRun``) is garbage
    collected; the kernel drops it when the process dies, so a crashed run never pins an entry.
    ``fd`` is None where nothing could be locked (a read-only cache, no flock).
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(self, _close_fd, fd)

    def touch(self, lock: Path) -> None:
        """Mark the entry used now: the lock file's mtime, so no file of the entry is rewritten."""
        with contextlib.suppress(OSError):
            if self.fd is not None and os.utime in os.supports_fd:
                os.utime(self.fd)
            else:
                os.utime(lock)

    def release(self) -> None:
        self._finalizer()


def _lease(directory: Path) -> _Lease | None:
    """A shared lease on the entry in ``directory``; None when the entry is gone (evicted meanwhile)."""
    lock = directory / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return None  # the directory itself is gone
        except OSError:  # not writable: lock the file if it exists (flock works on a read-only file)
            try:
                fd = os.open(lock, os.O_RDONLY)
            except OSError:
                return _Lease(None) if directory.is_dir() else None
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without flock: nothing to hold
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an evictor renames the entry away
        if _same_file(fd, lock):
            return _Lease(fd)
        os.close(fd)  # evicted while we waited, and perhaps written again: look again
        if not lock.exists():
            return None
    return None


def _held(lock: Path) -> bool:
    """Whether some process holds the entry whose lock file this is (probed without waiting)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False  # every holder creates the lock file before locking it
    try:
        if fcntl is None:  # no way to ask: an entry used within the hour counts as in use
            return time.time() - os.fstat(fd).st_mtime < STALE_SECONDS
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _budget_lock(root: Path):
    """One budget decision at a time per cache (xdist workers share one): the root directory itself is
    locked, so no extra file appears in it. Evicting never waits on an entry, so this cannot deadlock."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(root, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        _close_fd(fd)


def _du(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _mtime(*paths: Path) -> float:
    for p in paths:
        with contextlib.suppress(OSError):
            return p.stat().st_mtime
    return 0.0


def _disk(root: Path) -> tuple[int | None, int | None]:
    """Free and total bytes of the disk holding ``root`` (None when it cannot be asked)."""
    try:
        du = shutil.disk_usage(root)
    except OSError:
        return None, None
    return du.free, du.total


class CacheEntry:
    """A complete, verified entry (read side); one implementation of ``store.entry.Entry``.

    It holds the entry's lease: while it is alive no process evicts the entry.
    """

    def __init__(self, path: Path, meta: dict[str, Any], lease: _Lease | None = None) -> None:
        self.path = path
        self.meta = meta
        self._lease = lease

    def release(self) -> None:
        """Let the entry be evicted before this object is garbage-collected."""
        if self._lease is not None:
            self._lease.release()

    @property
    def identity(self) -> str:
        """Names this entry's content: its key and every file's checksum (a recomputed entry whose
        bytes differ gets another identity, so results derived from the old bytes are not reused)."""
        h = hashlib.sha256(self.meta["key"].encode())
        for name in sorted(self.meta["files"]):
            h.update(f"{name}:{self.meta['files'][name]['sha256']}".encode())
        return h.hexdigest()[:24]

    def has(self, name: str) -> bool:
        return name in self.meta["files"]

    def array(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)


class EntryWriter:
    """Builds an entry in a temporary directory; ``commit`` moves it into place atomically."""

    def __init__(self, cache: Cache, key: str) -> None:
        self.cache = cache
        self.key = key
        cache.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache.root))
        self.lease = _lease(self.tmp)  # moves with the directory: the committed entry is in use from birth
        self.files: dict[str, dict[str, Any]] = {}  # name -> sha256, bytes, mtime_ns

    def expect(self, expected_bytes: int) -> None:
        """Record the bytes reserved for this entry, so other processes' budgets count them while it is written."""
        with contextlib.suppress(OSError):
            (self.tmp / EXPECTED).write_text(str(int(expected_bytes)))

    def add(self, name: str, array: np.ndarray) -> None:
        """Write one array, hashing its bytes on the way (no read-back). No fsync per file: the
        rename in ``commit`` is what makes an entry visible, and a file a power cut left short or
        stale fails its size or checksum on the next read."""
        target = self.tmp / f"{name}.npy"
        try:
            arr = np.ascontiguousarray(array)
            if arr.dtype.hasobject:
                raise TypeError(f"cache arrays hold numbers, not objects ({name})")
            with target.open("wb") as fh:
                out = _HashingFile(fh)
                np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(arr))
                data = arr.reshape(-1).view(np.uint8)
                out.size += arr.nbytes
                if arr.nbytes < _PARALLEL_HASH_BYTES:
                    out.sha.update(data)
                    fh.write(data)
                else:  # both release the GIL: hash on a second core while the bytes go to the page cache
                    hasher = threading.Thread(target=out.sha.update, args=(data,))
                    hasher.start()
                    try:
                        fh.write(data)
                    finally:
                        hasher.join()
        except OSError as exc:
            self.abort()
            raise _write_error(self.cache.root, exc) from exc
        st = target.stat()
        self.files[name] = {"sha256": out.sha.hexdigest(), "bytes": out.size, "mtime_ns": st.st_mtime_ns}

    def array(self, name: str) -> np.ndarray:
        """Read back something already written (before commit)."""
        return np.load(self.tmp / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    def commit(self, meta: dict[str, Any]) -> CacheEntry:
        meta = {**meta, "format": FORMAT_VERSION, "key": self.key, "files": self.files}
        try:
            write_json(self.tmp / META, meta)
        except OSError as exc:
            self.abort()
            raise _write_error(self.cache.root, exc) from exc
        with contextlib.suppress(OSError):
            (self.tmp / EXPECTED).unlink(missing_ok=True)
        self.cache.trim()  # this entry counts (a pending write, never evicted); older ones make way
        final = self.cache.root / self.key
        try:
            os.rename(self.tmp, final)
        except OSError:
            # Someone else finished the same entry first (xdist), or a damaged one is in the way.
            existing = self.cache.get(self.key)
            if existing is not None:
                self.abort()
                return existing
            trash = self.cache.root / f".trash-{self.key}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(final, trash)
            os.rename(self.tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        if self.lease is not None:
            self.lease.touch(final / LOCK)
        return CacheEntry(final, meta, self.lease)

    def abort(self) -> None:
        if self.lease is not None:
            self.lease.release()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_error(root: Path, exc: OSError) -> CacheError:
    if exc.errno == errno.ENOSPC:
        why = "the disk is full"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "it is not writable"
    else:
        why = str(exc)
    return CacheError(
        f"convdiff cache {root}: could not write an entry because {why}; nothing partial was kept. "
        "Free space or point --convdiff-cache-dir elsewhere."
    )


@dataclass
class Cache:
    """A directory of entries. ``read=False`` still writes but never reads (refresh).

    ``full_verify``: re-hash every file on read, not only those whose size or mtime changed.
    ``budget``: the most the cache may hold (``store.budget``); the disk always keeps some space free.
    """

    root: Path
    read: bool = True
    full_verify: bool = False
    budget: CacheBudget = DEFAULT_BUDGET
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def get(self, key: str) -> CacheEntry | None:
        """The verified entry, or None. A damaged entry is removed (and reported) so it is recomputed."""
        if not self.read:
            return None
        path = self.root / key
        meta_path = path / META
        if not meta_path.is_file():
            return None
        lease = _lease(path)  # first: once verified, the entry must not be evicted under its reader
        if lease is None:
            return None
        problem, restamp = None, False
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
                problem = "written by another format version"
            else:
                for name, rec in meta["files"].items():
                    f = path / f"{name}.npy"
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        problem = f"{f.name} is missing"
                        break
                    if st.st_size != rec["bytes"]:
                        problem = f"{f.name} has {st.st_size} bytes, not the {rec['bytes']} written"
                        break
                    if self.full_verify or st.st_mtime_ns != rec["mtime_ns"]:
                        if sha256_file(f) != rec["sha256"]:
                            problem = f"{f.name} fails its checksum"
                            break
                        if st.st_mtime_ns != rec["mtime_ns"]:
                            rec["mtime_ns"] = st.st_mtime_ns  # copied or touched, content intact
                            restamp = True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"meta.json is unreadable ({exc})"
        if problem:
            lease.release()
            warnings.warn(f"convdiff cache entry {path} is damaged ({problem}); recomputing it.", stacklevel=2)
            self.discard(key)
            return None
        if restamp:  # so the next read of an intact copy needs no hashing
            with contextlib.suppress(OSError):
                write_json(meta_path, meta)
        lease.touch(path / LOCK)
        return CacheEntry(path, meta, lease)

    def get_json(self, name: str, folder: str = PAIRS) -> dict[str, Any] | None:
        """A small derived document (``<folder>/<name>.json``), or None when missing, unreadable,
        written by another format version, or when refreshing (a miss only costs recomputation)."""
        path = self._doc_path(name, folder)
        if not self.read:
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT_VERSION):
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the budget evicts least recently used documents first
        return doc

    def put_json(self, name: str, doc: dict[str, Any], folder: str = PAIRS) -> None:
        """Store a derived document atomically; failing to store it (disk full, read-only) only
        costs recomputation next time, so it is not an error."""
        path = self._doc_path(name, folder)
        with contextlib.suppress(OSError):
            write_json(path, {**doc, "format": FORMAT_VERSION})

    def _doc_path(self, name: str, folder: str) -> Path:
        """Names are keys, never paths: a document cannot land outside its folder of the cache."""
        for part in (name, folder):
            if not _DOC_NAME.fullmatch(part) or ".." in part:
                raise ValueError(f"convdiff cache: {part!r} is not a document name (letters, digits, . _ -)")
        return self.root / folder / f"{name}.json"

    def writer(self, key: str) -> EntryWriter:
        return EntryWriter(self, key)

    def discard(self, key: str) -> None:
        path = self.root / key
        trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove leftovers of killed runs: temporary and trash directories, and the temporary files
        of document writes (``store.atomic`` names them ``.<name>.<random>.tmp``)."""
        if not self.root.is_dir():
            return
        now = time.time()
        candidates = [p for p in self.root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        for folder in (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            with contextlib.suppress(OSError):  # another worker may be removing it
                if not (folder / META).exists():  # a document folder, not an entry
                    candidates += [f for f in folder.iterdir() if f.name.startswith(".") and f.name.endswith(".tmp")]
        for p in candidates:
            # Only leftovers of dead processes: a live writer's file or directory is young.
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_SECONDS:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()

    # ----------------------------------------------------------------------- the budget

    def usage(self, *, details: bool = False, skip: Path | None = None) -> CacheUsage:
        """Everything stored and its size: entries (in use or not), documents, pending writes (``skip``:
        a writer's own temporary directory). ``details`` reads each entry's model and creation time."""
        if not self.root.is_dir():
            return CacheUsage(self.root, exists=False)
        items: list[Stored] = []
        try:
            children = sorted(self.root.iterdir())
        except OSError:
            children = []
        for p in children:
            with contextlib.suppress(OSError):  # another process may be removing it
                if not p.is_dir() or p.name.startswith(".trash-") or p == skip:
                    continue
                if p.name.startswith(".tmp-"):
                    items.append(self._pending(p))
                elif (p / META).is_file():
                    items.append(self._entry_record(p, details))
                elif not p.name.startswith("."):
                    items += [self._document_record(f, details) for f in sorted(p.glob("*.json"))
                              if not f.name.startswith(".")]
        return CacheUsage(self.root, exists=True, items=items)

    def _entry_record(self, path: Path, details: bool) -> Stored:
        item = Stored(ENTRY, path.name, path, _du(path), _mtime(path / LOCK, path / META, path),
                      in_use=_held(path / LOCK))
        if details:
            try:
                meta = json.loads((path / META).read_text(encoding="utf-8"))
                spec, info = meta.get("spec") or {}, meta.get("info") or {}
                item.model = spec.get("path") or info.get("path")
                item.backend = spec.get("backend") or info.get("backend")
                item.created = float(meta["created"]) if meta.get("created") else None
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # a damaged entry is listed by its size; the next get() reports it
            item.created = item.created or _mtime(path / META)
        return item

    def _document_record(self, path: Path, details: bool) -> Stored:
        st = path.stat()
        item = Stored(DOCUMENT, f"{path.parent.name}/{path.name}", path, st.st_size, st.st_mtime)
        if details:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                doc = json.loads(path.read_text(encoding="utf-8"))
                if doc.get("a") or doc.get("b"):
                    item.model = f"{doc.get('a', '?')} -> {doc.get('b', '?')}"
        return item

    def _pending(self, path: Path) -> Stored:
        """A write in progress counts at least what it reserved; a dead writer's leftover at its size."""
        size, started = _du(path), _mtime(path)
        if time.time() - started < STALE_SECONDS:
            with contextlib.suppress(OSError, ValueError):
                size = max(size, int((path / EXPECTED).read_text()))
        return Stored(PENDING, path.name, path, size, started, in_use=True)

    def reserve(self, expected_bytes: int, what: str, *, writer: EntryWriter | None = None) -> None:
        """Make room for an entry of about ``expected_bytes`` before a model runs, or raise ``CacheError``.

        Evicts entries and documents not in use, least recently used first, until the entry fits in the
        budget and the disk keeps ``budget.headroom`` free; evicts nothing when that cannot be enough.
        ``what`` names the model in the message. ``writer``: the entry's writer, whose reservation other
        processes then count until it commits.
        """
        expected = max(0, int(expected_bytes))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(self.root, exc) from exc
        if writer is not None:
            writer.expect(expected)
        with _budget_lock(self.root):
            for attempt in (1, 2):
                usage = self.usage(skip=writer.tmp if writer is not None else None)
                free, total = _disk(self.root)
                limit = self.budget.limit(usage.total, free)
                keep_free = headroom(total) if total else 0
                deficit = max(0, usage.total + expected - limit if limit is not None else 0,
                              expected + keep_free - free if free is not None else 0)
                if deficit == 0:
                    return
                candidates = eviction_order(usage.items)
                evictable = sum(s.size for s in candidates)
                if attempt == 2 or evictable < deficit or (limit is not None and expected > limit):
                    raise CacheError(refusal(root=self.root, what=what, expected=expected, usage=usage,
                                             budget=self.budget, limit=limit, free=free, keep_free=keep_free,
                                             evictable=evictable))
                self._evict(candidates, deficit)

    def trim(self) -> int:
        """Evict least recently used entries and documents not in use until the cache is within its budget
        (called before an entry is committed; pending writes count). The bytes evicted; warns once when
        what is in use alone exceeds the budget."""
        if self.budget.unlimited or not self.root.is_dir():
            return 0
        with _budget_lock(self.root):
            usage = self.usage()
            free, _ = _disk(self.root)
            limit = self.budget.limit(usage.total, free)
            if limit is None or usage.total <= limit:
                return 0
            freed = self._evict(eviction_order(usage.items), usage.total - limit)
            if freed < usage.total - limit and not self._warned:
                self._warned = True
                after = self.usage()
                warnings.warn(over_budget(self.root, after, self.budget, free), stacklevel=3)
        return freed

    def clear(self) -> tuple[list[Stored], list[Stored]]:
        """Evict every entry and document not in use (and old leftovers): (removed, kept because in use)."""
        if not self.root.is_dir():
            return [], []
        with _budget_lock(self.root):
            usage = self.usage()
            removed = [s for s in eviction_order(usage.items) if self._evict_one(s)]
        self.clean_stale()
        return removed, [s for s in usage.items if s not in removed and s.kind == ENTRY]

    def info(self) -> list[str]:
        """The ``--convdiff-cache-info`` listing."""
        usage = self.usage(details=True)
        free, total = _disk(self.root) if usage.exists else (None, None)
        return info_lines(usage, self.budget, free, total)

    def _evict(self, candidates: list[Stored], deficit: int) -> int:
        freed = 0
        for item in candidates:
            if freed >= deficit:
                break
            if self._evict_one(item):
                freed += item.size
        return freed

    def _evict_one(self, item: Stored) -> bool:
        """Remove one entry (only if no process holds it: exclusive lock, not waiting) or document."""
        if item.kind == DOCUMENT:
            try:
                item.path.unlink()
            except OSError:
                return False
            return True
        if item.kind != ENTRY:
            return False
        lock = item.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False  # gone already, or not ours to remove
        trash = self.root / f".trash-{item.name}-{uuid.uuid4().hex[:8]}"
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif time.time() - os.fstat(fd).st_mtime < STALE_SECONDS:
                return False
            if not _same_file(fd, lock):
                return False  # evicted and written again since the scan
            os.rename(item.path, trash)  # whole or not at all: a reader waiting on the lock then finds it gone
        except OSError:
            return False  # in use (BlockingIOError), or renamed away by another evictor
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True
