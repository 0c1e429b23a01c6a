"""One way to write a file so that a reader sees the old content or the new, never half of either.

Every file the project writes for a person or a later run (cache metadata, golden references,
baselines, JSON/HTML reports, plots) goes through here: the bytes go to a temporary file in the
target's directory, which is renamed over the target; on any error the temporary file is removed
and the target is untouched.

The file ends up with the permissions a plain ``open(path, "w")`` would give a new file,
``0o666 & ~umask`` (0644 under the usual umask 022): the temporary file is created with mode 0666 and
the kernel applies the process's umask, as it does for any new file. (``tempfile.mkstemp`` would
create it 0600, leaving reports that CI artifact servers and other users cannot read.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8",
                fsync: bool = False) -> Iterator[IO[Any]]:
    """``with atomic_open(p) as fh: ...``: ``p`` appears complete when the block ends, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    binary = "b" in mode
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else encoding) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
          | getattr(os, "O_CLOEXEC", 0))
_ATTEMPTS = 100


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path``, opened for writing: ``(fd, its path)``.

    Created like any new file (mode 0666, which the kernel narrows by the umask), so no umask is read
    or changed here and threads writing at the same time cannot race on it; O_EXCL (and O_NOFOLLOW)
    keep it from opening a file or link that is already there."""
    for _ in range(_ATTEMPTS):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path} ({_ATTEMPTS} names taken)")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike[str], doc: Any, *, indent: int | None = None) -> None:
    # Serialise first: an unserialisable document must not leave even a temporary file behind.
    write_text(path, json.dumps(doc, indent=indent))


def write_with(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> None:
    """Stream binary content (e.g. a large reference file) through ``writer(fh)``, atomically."""
    with atomic_open(path, "wb") as fh:
        writer(fh)
