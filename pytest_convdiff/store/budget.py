"""How much disk the cache may take, and how each decision about it is explained.

Policy only, no file work: sizes (parsed and printed), the budget (a size, a share of the disk, or
none), the estimate of a run's entry before a model runs, the order in which stored things are
evicted (least recently used first, never one in use), and the texts of a refusal and of
``--convdiff-cache-info``. ``store.cache`` scans, locks and removes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

GB = 10**9
DEFAULT_MAX_BYTES = 20 * GB
HEADROOM_BYTES = 1 << 30  # what a write leaves free on the disk, at most (see headroom())
ENTRY, DOCUMENT, PENDING = "entry", "document", "pending"
SIZE_FORMS = ("20GB, 500MiB, 1.5TB or a byte count; 25% (a share of the disk space the cache can use: "
              "its own size plus the free space); 0 or none for no limit")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[kmgtp])(?P<binary>i)?)?b?", re.IGNORECASE)
_SHARE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*%")
_NO_LIMIT = ("none", "unlimited", "off", "no")


@dataclass(frozen=True)
class CacheBudget:
    """The most the cache may hold: a fixed size, a share of the space it can use, or no limit.

    A share is taken of the cache's own size plus the disk's free space, so evicting does not move
    it and other files growing on the disk shrink it.
    """

    max_bytes: int | None = DEFAULT_MAX_BYTES
    share: float | None = None  # (0, 1]

    @property
    def unlimited(self) -> bool:
        return self.max_bytes is None and self.share is None

    def limit(self, used: int, free: int | None) -> int | None:
        """The budget in bytes now, or None for no limit (and for a share when the disk cannot be asked)."""
        if self.share is not None:
            return int(self.share * (used + free)) if free is not None else None
        return self.max_bytes

    def describe(self, used: int | None = None, free: int | None = None) -> str:
        if self.unlimited:
            return "no limit"
        if self.share is not None:
            now = f", now {human_size(self.limit(used, free) or 0)}" if used is not None and free is not None else ""
            return f"{self.share:.0%} of the disk space the cache can use{now}"
        return human_size(self.max_bytes or 0)


DEFAULT_BUDGET = CacheBudget()
NO_LIMIT = CacheBudget(max_bytes=None)


def parse_size(text: str | int | None) -> CacheBudget:
    """``20GB``, ``500MiB``, ``1.5T``, ``123456`` (bytes), ``25%``, ``0`` / ``none`` (no limit).

    Decimal units (kB, MB, GB, TB) are powers of 1000 and binary ones (KiB, MiB, GiB, TiB) of 1024,
    as ``df -H`` and ``df -h`` print them; the trailing B is optional. ValueError names the accepted forms.
    """
    raw = "" if text is None else str(text).strip()
    if raw.lower() in _NO_LIMIT:
        return NO_LIMIT
    m = _SHARE.fullmatch(raw)
    if m:
        share = float(m["num"]) / 100
        if not 0 < share <= 1:
            raise ValueError(f"{raw!r}: a share of the disk must be above 0% and at most 100% (accepted: "
                             f"{SIZE_FORMS})")
        return CacheBudget(max_bytes=None, share=share)
    m = _SIZE.fullmatch(raw)
    if not m:
        raise ValueError(f"{raw!r} is not a size (accepted: {SIZE_FORMS})")
    unit = (m["unit"] or "").lower()
    factor = 1024 ** (" kmgtp".index(unit)) if m["binary"] else _UNITS[unit]
    size = float(m["num"]) * factor
    if size == 0:
        return NO_LIMIT
    return CacheBudget(max_bytes=max(1, math.ceil(size)))


def human_size(n: float) -> str:
    """Decimal units, as the budget's default is given: ``1.2 GB``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def headroom(disk_total: int) -> int:
    """Free space a write must leave on the disk: 1 GiB, or 5% of a small disk. A disk filled to the
    last byte breaks everything else on the machine (the test's own logs and temporary files too)."""
    return min(HEADROOM_BYTES, disk_total // 20)


# --------------------------------------------------------------------------- estimating an entry


class _RunSettings(Protocol):
    cache_dtype: str
    hidden_states: bool
    layer_swap: int
    keep_b: bool


_ITEM_BYTES = {"float32": 4, "float16": 2}
# A streamed B's entry: two int64 token arrays and ~32 bytes of pieces per token, plus its records (tokenizer
# cases, greedy continuations, causality) and the pair's metrics (a few hundred bytes per prompt and per layer)
STREAMED_FIXED_BYTES = 64_000
STREAMED_PER_LAYER_BYTES = 1_000


def expected_entry_bytes(info: Any, tokens: int, settings: _RunSettings, *, fed: bool = False) -> int:
    """About how many bytes a run's entry takes: ``s·T·(V + 3·L·H) + 16·T`` (README, Cache), s the stored
    dtype's size (model A stored compact: ``core.compact.summary_bytes`` a token, plus the sampled positions'
    logits); plus the layer-swap states (float32) for a kept B, and ~32 bytes a token of metadata (pieces).
    A streamed B (``fed`` and not ``settings.keep_b``) stores no arrays but its tokens: ``48·T`` plus ~64 kB
    of records and metrics.

    ``info``: the model's ``ModelInfo`` (or its dict); an unknown dimension counts as 0, so the
    estimate is low rather than a refusal of a model whose header omits it. Settings without ``keep_b``
    (from before B was streamed) are estimated as a kept B.
    """
    def dim(name: str) -> int:
        v = info.get(name) if isinstance(info, dict) else getattr(info, name, None)
        return int(v) if v else 0

    item = _ITEM_BYTES.get(str(settings.cache_dtype), 4)
    vocab, layers, hidden = dim("vocab_size"), dim("num_layers"), dim("hidden_size")
    tokens = max(0, int(tokens))
    if fed and not getattr(settings, "keep_b", True):
        return tokens * (16 + 32) + STREAMED_FIXED_BYTES + STREAMED_PER_LAYER_BYTES * layers
    if not fed and getattr(settings, "store", "full") == "compact":
        from ..core.compact import SAMPLE_EVERY, summary_bytes

        return tokens * int(16 + 32 + summary_bytes(vocab, layers, settings.hidden_states, 2)
                            + item * vocab / SAMPLE_EVERY) + item * vocab * 16  # a sampled position per prompt
    per_token = item * vocab + 16 + 32
    if settings.hidden_states:
        per_token += item * 3 * layers * hidden
        if fed and settings.layer_swap:
            per_token += 4 * layers * hidden
    return tokens * per_token


# --------------------------------------------------------------------------- what is stored


@dataclass
class Stored:
    """One thing in the cache that takes space: an entry, a small document, or a pending write."""

    kind: str  # ENTRY, DOCUMENT or PENDING
    name: str  # the entry's key, "<folder>/<name>.json", or the temporary directory's name
    path: Path
    size: int
    last_used: float
    in_use: bool = False  # held by this or another live process (pending writes always are)
    created: float | None = None
    model: str | None = None  # entries: the model's path; documents: "A -> B"
    backend: str | None = None


@dataclass
class CacheUsage:
    root: Path
    exists: bool
    items: list[Stored] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s.size for s in self.items)

    def of(self, kind: str) -> list[Stored]:
        return [s for s in self.items if s.kind == kind]

    @property
    def in_use(self) -> list[Stored]:
        return [s for s in self.items if s.in_use]


def eviction_order(items: Iterable[Stored]) -> list[Stored]:
    """What may be evicted, least recently used first: entries and documents not in use."""
    return sorted((s for s in items if not s.in_use and s.kind in (ENTRY, DOCUMENT)), key=lambda s: s.last_used)


def refusal(*, root: Path, what: str, expected: int, usage: CacheUsage, budget: CacheBudget,
            limit: int | None, free: int | None, keep_free: int, evictable: int) -> str:
    """Why an entry of ``expected`` bytes cannot be written, and what to do: one paragraph."""
    busy = usage.in_use
    held = sum(s.size for s in busy)
    head = (f"convdiff cache {root}: no room for the outputs of {what} (about {human_size(expected)}). ")
    reasons = []
    if limit is not None and expected > limit:
        reasons.append(f"Its budget is {budget.describe(usage.total, free)} (--convdiff-cache-max-size), less "
                       "than this one entry; nothing was evicted.")
    elif limit is not None and expected + usage.total - evictable > limit:
        reasons.append(
            f"Its budget is {budget.describe(usage.total, free)} (--convdiff-cache-max-size): it holds "
            f"{human_size(usage.total)}, of which {human_size(held)} is in use by this or another running "
            f"pytest ({_count(len(busy), 'entry or write', 'entries or writes')}) and only {human_size(evictable)} "
            "could be evicted.")
    if free is not None and expected + keep_free > free + evictable:
        reasons.append(
            f"The disk holding it has {human_size(free)} free; the entry needs {human_size(expected)} plus "
            f"{human_size(keep_free)} left free, and evicting everything not in use would free only "
            f"{human_size(evictable)}.")
    fixes = ("Raise --convdiff-cache-max-size (or 0 for no limit)" if limit is not None else None,
             "free space on that disk", "point --convdiff-cache-dir at a larger disk",
             "or halve what each model stores with --convdiff-cache-dtype float16")
    return head + " ".join(reasons) + " " + ", ".join(f for f in fixes if f) + "."


def over_budget(root: Path, usage: CacheUsage, budget: CacheBudget, free: int | None) -> str:
    """The warning when a commit leaves the cache above its budget (what is over it is in use)."""
    return (f"convdiff cache {root} holds {human_size(usage.total)}, above its budget of "
            f"{budget.describe(usage.total, free)}: {human_size(sum(s.size for s in usage.in_use))} of it is in use "
            f"by running tests and cannot be evicted now; a later write trims it.")


# --------------------------------------------------------------------------- --convdiff-cache-info


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _table(header: Sequence[str], rows: list[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def info_lines(usage: CacheUsage, budget: CacheBudget, free: int | None, disk_total: int | None) -> list[str]:
    """``--convdiff-cache-info``: entries, documents and pending writes, least recently used first, and totals."""
    root = usage.root.absolute()
    if not usage.exists:
        return [f"convdiff cache {root}: does not exist (nothing has been cached there yet).",
                f"  budget: {budget.describe()}"]
    lines = [f"convdiff cache {root}"]
    disk = f"; disk: {human_size(free)} free of {human_size(disk_total)}" if free is not None and disk_total else ""
    limit = budget.limit(usage.total, free)
    share = f" ({usage.total / limit:.0%} of the budget)" if limit else ""
    lines.append(f"  budget: {budget.describe(usage.total, free)} (--convdiff-cache-max-size); holds "
                 f"{human_size(usage.total)}{share}{disk}")
    if not usage.items:
        lines.append("  the cache is empty.")
        return lines
    order = sorted(usage.items, key=lambda s: s.last_used)
    entries, docs, pending = ([s for s in order if s.kind == k] for k in (ENTRY, DOCUMENT, PENDING))
    if entries:
        lines += ["", f"entries ({len(entries)}), least recently used first (evicted first):"]
        lines += _table(("key", "size", "created", "last used", "in use", "backend", "model"),
                        [(s.name, human_size(s.size), _when(s.created), _when(s.last_used), "yes" if s.in_use else "-",
                          s.backend or "?", s.model or "?") for s in entries], right=(1,))
    if docs:
        lines += ["", f"pair documents ({len(docs)}), least recently used first:"]
        lines += _table(("name", "size", "last used", "A -> B"),
                        [(s.name, human_size(s.size), _when(s.last_used), s.model or "?") for s in docs], right=(1,))
    if pending:
        lines += ["", f"temporary ({len(pending)}): writes in progress, or left by killed runs (removed after an hour):"]
        lines += _table(("name", "size", "started"),
                        [(s.name, human_size(s.size), _when(s.last_used)) for s in pending], right=(1,))
    lines += ["", "total: " + ", ".join(
        f"{_count(len(group), *label)} {human_size(sum(s.size for s in group))}"
        for group, label in ((entries, ("entry", "entries")), (docs, ("document", "documents")),
                             (pending, ("temporary", "temporary"))) if group)
        + f"; {human_size(usage.total)} in all, {human_size(sum(s.size for s in usage.in_use))} in use"]
    return lines


def cleared_lines(root: Path, removed: list[Stored], kept: list[Stored]) -> list[str]:
    """What ``--convdiff-cache-clear`` did, in one line (and one more for entries it had to keep)."""
    entries, docs = ([s for s in removed if s.kind == k] for k in (ENTRY, DOCUMENT))
    lines = [f"convdiff cache {root.absolute()}: cleared {_count(len(entries), 'entry', 'entries')} and "
             f"{_count(len(docs), 'document', 'documents')} ({human_size(sum(s.size for s in removed))})."]
    if kept:
        lines.append(f"  kept {_count(len(kept), 'entry', 'entries')} in use by a running pytest "
                     f"({human_size(sum(s.size for s in kept))}).")
    return lines
