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

Beside the entries, ``pairs/`` holds small JSON documents (the bound-independent
metrics of a pair of entries), so a warm run need not reduce the arrays again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError

FORMAT_VERSION = 2
META = "meta.json"
PAIRS = "pairs"
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


class CacheEntry:
    """A complete, verified entry (read side)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

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
        self.files: dict[str, dict[str, Any]] = {}  # name -> sha256, bytes, mtime_ns

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
            with (self.tmp / META).open("w", encoding="utf-8") as fh:
                json.dump(meta, fh)
        except OSError as exc:
            self.abort()
            raise _write_error(self.cache.root, exc) from exc
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
        return CacheEntry(final, meta)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    """

    root: Path
    read: bool = True
    full_verify: bool = False

    def get(self, key: str) -> CacheEntry | None:
        """The verified entry, or None. A damaged entry is removed (and reported) so it is recomputed."""
        if not self.read:
            return None
        path = self.root / key
        meta_path = path / META
        if not meta_path.is_file():
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
            warnings.warn(f"convdiff cache entry {path} is damaged ({problem}); recomputing it.", stacklevel=2)
            self.discard(key)
            return None
        if restamp:  # so the next read of an intact copy needs no hashing
            with contextlib.suppress(OSError):
                _write_json_atomic(meta_path, meta)
        return CacheEntry(path, meta)

    def get_json(self, name: str) -> dict[str, Any] | None:
        """A small derived document (``pairs/<name>.json``), or None when missing, unreadable or refreshing."""
        if not self.read:
            return None
        try:
            doc = json.loads((self.root / PAIRS / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("format") == FORMAT_VERSION else None

    def put_json(self, name: str, doc: dict[str, Any]) -> None:
        """Store a derived document atomically; failing to store it only costs recomputation."""
        with contextlib.suppress(OSError):
            (self.root / PAIRS).mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.root / PAIRS / f"{name}.json", {**doc, "format": FORMAT_VERSION})

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
        """Remove leftovers of killed runs (temporary and trash directories)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                # Only leftovers of dead processes: a live writer's dir is young.
                with contextlib.suppress(OSError):
                    import time

                    if time.time() - p.stat().st_mtime > 3600:
                        shutil.rmtree(p, ignore_errors=True)
