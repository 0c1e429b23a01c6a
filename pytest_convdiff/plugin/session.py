"""The session's convdiff state (in ``config.stash``): the options read once into a ``Zoo`` (the pairs and
their comparisons, ``pytest_convdiff.zoo``), plus what the reports gather.

Imported only when a convdiff option or a manifest is in play.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..comparison import default_cache_dir
from ..core.results import PairResult
from ..options import OptionError, build_zoo, read_options
from ..reporting.gather import Gathered
from ..store.budget import DEFAULT_BUDGET, cleared_lines
from ..store.cache import Cache
from ..zoo import Zoo
from . import options as opts


@dataclass
class ConvdiffState(Zoo):
    json_path: Path | None = None
    plot_dir: Path | None = None
    html_path: Path | None = None
    shard: tuple[int, int] | None = None  # (K, N): run the K-th of N round-robin slices of the sorted pair ids
    gathered: Gathered = field(default_factory=Gathered)  # every item's report (the controller's view)
    errors_shown: set[str] = field(default_factory=set)  # pairs whose error block was printed once
    headers_sent: set[str] = field(default_factory=set)  # pairs whose header this process has reported
    report_lines: list[tuple[str, str]] = field(default_factory=list)
    final_pairs: list[PairResult] = field(default_factory=list)


STASH = pytest.StashKey[ConvdiffState]()


def build_session(config: pytest.Config) -> ConvdiffState:
    """Every option read and validated now: a bad value is a UsageError naming the option and what it accepts."""
    def cache_root() -> Path:
        return Path(config.cache.mkdir("convdiff")) if getattr(config, "cache", None) is not None \
            else default_cache_dir()

    try:
        v = read_options(lambda name: opts.value(config, name))
        return build_zoo(v, cache_root, getattr(config, "workerinput", {}).get("workerid", ""), ConvdiffState,
                         json_path=v["convdiff_json"], plot_dir=v["convdiff_plot"], html_path=v["convdiff_html"],
                         shard=v["convdiff_shard"])
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None


def cache_command(config: pytest.Config, *, info: bool, clear: bool) -> int | None:
    """--convdiff-cache-clear, then --convdiff-cache-info: 0 (exit) after the listing, None to run on. The
    cache directory is the one the session will use, known before pytest configures its own cache."""
    try:
        v = read_options(lambda name: opts.value(config, name), ("convdiff_cache_dir", "convdiff_cache_max_size"))
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None
    root = v["convdiff_cache_dir"]
    if root is None and config.pluginmanager.is_blocked("cacheprovider"):
        root = default_cache_dir()
    elif root is None:
        base = Path(os.path.expanduser(os.path.expandvars(str(config.getini("cache_dir")))))
        root = (base if base.is_absolute() else config.rootpath / base) / "d" / "convdiff"
    cache = Cache(root, budget=v["convdiff_cache_max_size"] or DEFAULT_BUDGET)
    lines = cleared_lines(cache.root, *cache.clear()) if clear else []
    if info:
        lines += cache.info()
    print("\n".join(lines), flush=True)
    return 0 if info else None
