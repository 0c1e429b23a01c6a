"""The session's convdiff state (in ``config.stash``): options parsed and validated once, the pairs,
one ``Comparison`` per pair, and the results gathered for the reports.

Imported only when a convdiff option or a manifest is in play.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from .. import checks
from ..backends import normalize_backend_name
from ..backends.imatrix import read as read_imatrix
from ..backends.options import parse_option_items, validate_options
from ..checks.base import BaselineConfig
from ..comparison import Comparison, default_cache_dir
from ..core.corpus import Corpus, load_corpus
from ..core.pair_id import unique_pair_ids
from ..core.results import PairResult
from ..errors import ConvdiffError
from ..runner import (
    LAYER_SWAP_NEEDS_FULL,
    ModelSpec,
    RunSettings,
    cache_dtype_name,
    runtime_twin_name,
    store_name,
)
from ..store import baseline_file
from ..store.budget import DEFAULT_BUDGET, CacheBudget, cleared_lines, parse_size
from ..store.cache import Cache
from . import options as opts


@dataclass
class PairSpec:
    id: str
    a: ModelSpec
    b: ModelSpec
    marks: tuple[str, ...] = ()
    bound_overrides: dict[str, float] = field(default_factory=dict)
    corpus: Corpus | None = None  # a manifest entry's own corpus; None: the session's
    source: str = "the command line"  # where the pair was declared, for duplicate-id errors
    imatrix: str | None = None  # a manifest entry's importance matrix; None: the session's


@dataclass
class ConvdiffState:
    pairs: list[PairSpec]
    corpus: Corpus
    settings: RunSettings
    bound_overrides: dict[str, float]
    cache: Cache
    json_path: Path | None = None
    save_reference: Path | None = None
    plot_dir: Path | None = None
    html_path: Path | None = None
    baseline: BaselineConfig | None = None
    gpu: int | None = None  # this worker's GPU under --convdiff-gpus
    manifest_pairs: list[PairSpec] = field(default_factory=list)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    # gathered from item reports (the controller's view under xdist)
    pair_headers: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_payloads: dict[str, dict[str, tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    errors_shown: set[str] = field(default_factory=set)  # pairs whose error block was printed once
    headers_sent: set[str] = field(default_factory=set)  # pairs whose header this process has reported
    report_lines: list[tuple[str, str]] = field(default_factory=list)
    final_pairs: list[PairResult] = field(default_factory=list)

    def all_pairs(self) -> list[PairSpec]:
        return self.pairs + self.manifest_pairs

    def pair(self, pair_id: str) -> PairSpec:
        return next(p for p in self.all_pairs() if p.id == pair_id)

    def add_manifest_pair(self, pair: PairSpec) -> None:
        """Pair ids name runs, metrics, baselines and xdist groups: two pairs may not share one."""
        for other in self.all_pairs():
            if other.id == pair.id:
                raise ConvdiffError(
                    f"{pair.source}: pair id {pair.id!r} is already used by a pair from {other.source}; "
                    "pair ids must be unique across the session (they key cached results, baselines and xdist "
                    "groups): give one of them another `id`.")
        self.manifest_pairs.append(pair)

    def comparison(self, pair: PairSpec, progress: Any) -> Comparison:
        if pair.id not in self.comparisons:
            if self.gpu is not None:
                pair.a, pair.b = on_gpu(pair.a, self.gpu), on_gpu(pair.b, self.gpu)
            save = self.save_reference if self.save_reference is not None and not self._reference_claimed() else None
            settings = replace(self.settings, imatrix=pair.imatrix) if pair.imatrix else self.settings
            self.comparisons[pair.id] = Comparison(
                pair.a, pair.b, pair.corpus or self.corpus, self.cache, settings,
                {**self.bound_overrides, **pair.bound_overrides}, pair.id, self.baseline, save, progress)
        return self.comparisons[pair.id]

    def _reference_claimed(self) -> bool:
        return any(c.save_reference is not None for c in self.comparisons.values())


STASH = pytest.StashKey[ConvdiffState]()


def gpu_for_worker(worker_id: str, n_gpus: int) -> int | None:
    """``gw3`` with 2 GPUs -> 1; None for the controller or a run without xdist."""
    m = re.fullmatch(r"gw(\d+)", worker_id or "")
    return int(m.group(1)) % n_gpus if m and n_gpus > 0 else None


def on_gpu(spec: ModelSpec, gpu: int) -> ModelSpec:
    """The spec with its backend's device option set to ``gpu``, unless the user chose a device.
    The process environment (CUDA_VISIBLE_DEVICES) is left alone: it belongs to the user's tests too."""
    from ..backends import device_options

    backend = resolve_backend(spec.path, spec.backend)
    if backend is None or backend == "reference":
        return spec
    return ModelSpec(spec.path, spec.backend, device_options(backend, gpu, dict(spec.options)))


def usage(option: str, exc: Exception) -> pytest.UsageError:
    text = str(exc)
    return pytest.UsageError(text if text.startswith(option) else f"{option}: {text}")


def int_option(config: pytest.Config, name: str, option: str, minimum: int, default: int | None) -> int | None:
    """An integer option (command line or ini) of at least ``minimum``; UsageError naming it otherwise."""
    raw = opts.value(config, name)
    if raw in (None, ""):
        return default
    try:
        v = int(raw)
        if v < minimum:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"{option}: expected an integer >= {minimum}, got {raw!r}") from None
    return v


def split_options(items: list[str] | None, option: str) -> dict[str, str]:
    try:
        return parse_option_items(items or [])
    except ValueError as exc:
        raise usage(option, exc) from None


def resolve_backend(path: str, backend: str | None) -> str | None:
    """The backend that will run ``path`` ("reference" for a saved reference), or None when it cannot be
    told yet (the pair then errors with the readable reason when it runs)."""
    try:
        return ModelSpec(path, backend).resolved_backend()
    except (ConvdiffError, ValueError):
        return None


def backend_options(option: str, raw: dict[str, Any], paths: list[str], backend: str | None) -> list[dict[str, Any]]:
    """Each model's typed options. A key must be known to the backend of at least one model on this side
    (else a UsageError listing the valid keys); each model gets the keys its own backend knows."""
    resolved = [resolve_backend(p, backend) for p in paths]
    known = {b for b in resolved if b and b != "reference"}
    errors: dict[str, str] = {}
    typed: dict[str, dict[str, Any]] = {}
    for b in known:
        per: dict[str, Any] = {}
        for key, val in raw.items():
            try:
                per.update(validate_options(b, {key: val}))
            except ValueError as exc:
                errors.setdefault(key, str(exc))
                if "unknown option" not in str(exc):  # a known key with a bad value is always an error
                    raise pytest.UsageError(f"{option}: {exc}") from None
        typed[b] = per
    for key in raw:
        if known and all(key not in typed[b] for b in known):
            raise pytest.UsageError(f"{option}: {errors.get(key, key)}")
    return [typed.get(b, dict(raw)) if b else dict(raw) for b in resolved]


def _backend_name(config: pytest.Config, name: str, option: str) -> str | None:
    raw = opts.value(config, name)
    if not raw:
        return None
    try:
        return normalize_backend_name(str(raw))
    except ValueError as exc:
        raise usage(option, exc) from None


def build_session(config: pytest.Config) -> ConvdiffState:
    """Parse and validate every option (a UsageError names the option and the valid values)."""
    model_a = opts.value(config, "convdiff_model_a")
    model_bs = [str(b) for b in (opts.value(config, "convdiff_model_b") or []) if str(b).strip()]
    if model_bs and not model_a:
        raise pytest.UsageError("--model-b was given without --model-a: give the reference model with --model-a PATH.")
    if model_a and not model_bs:
        raise pytest.UsageError("--model-a was given without --model-b: give the converted model(s) with "
                                "--model-b PATH.")
    backend_a = _backend_name(config, "convdiff_backend_a", "--convdiff-backend-a")
    backend_b = _backend_name(config, "convdiff_backend_b", "--convdiff-backend-b")
    raw_a = split_options(opts.value(config, "convdiff_options_a"), "--convdiff-option-a")
    raw_b = split_options(opts.value(config, "convdiff_options_b"), "--convdiff-option-b")

    bounds: dict[str, float] = {}
    for text in opts.value(config, "convdiff_bounds") or []:
        try:
            bounds.update(checks.parse_bound_overrides(str(text)))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    try:
        corpus = load_corpus(opts.value(config, "convdiff_prompts") or None)
    except ConvdiffError as exc:
        raise usage("--convdiff-prompts", exc) from None
    try:
        cache_dtype = cache_dtype_name(opts.value(config, "convdiff_cache_dtype") or RunSettings.cache_dtype)
    except ValueError as exc:
        raise pytest.UsageError(f"--convdiff-cache-dtype: {exc}.") from None
    try:
        store = store_name(opts.value(config, "convdiff_store") or RunSettings.store)
    except ValueError as exc:
        raise pytest.UsageError(f"--convdiff-store: {exc}.") from None
    try:
        runtime_twin = runtime_twin_name(opts.value(config, "convdiff_runtime_twin") or RunSettings.runtime_twin)
    except ValueError as exc:
        raise pytest.UsageError(f"--convdiff-runtime-twin: {exc}.") from None
    imatrix_path = opts.value(config, "convdiff_imatrix") or None
    if imatrix_path:
        imatrix_path = os.path.expanduser(str(imatrix_path))
        try:
            read_imatrix(imatrix_path)
        except ConvdiffError as exc:
            raise usage("--convdiff-imatrix", exc) from None
    layer_swap = int_option(config, "convdiff_layer_swap", "--convdiff-layer-swap", 0, 0) or 0
    hidden_states = not opts.value(config, "convdiff_no_layers")
    if layer_swap and hidden_states and store != "full":
        raise pytest.UsageError(f"--convdiff-layer-swap: {LAYER_SWAP_NEEDS_FULL}.")
    settings = RunSettings(
        hidden_states=hidden_states,
        tokenizer_cases=not opts.value(config, "convdiff_no_tokenizer_cases"),
        causality=not opts.value(config, "convdiff_no_causality"),
        max_tokens=int_option(config, "convdiff_max_tokens", "--convdiff-max-tokens", 2, None),
        layer_swap=layer_swap,
        greedy_tokens=int_option(config, "convdiff_greedy_tokens", "--convdiff-greedy-tokens", 0,
                                 RunSettings.greedy_tokens) or 0,
        cache_dtype=cache_dtype,
        keep_b=bool(opts.value(config, "convdiff_keep_b")),
        store=store,
        runtime_twin=runtime_twin,
        imatrix=imatrix_path,
    )
    cache_dir = opts.value(config, "convdiff_cache_dir")
    if cache_dir:
        root = Path(os.path.expanduser(str(cache_dir)))
        if root.exists() and not root.is_dir():
            raise pytest.UsageError(f"--convdiff-cache-dir: {root} exists and is not a directory.")
    elif getattr(config, "cache", None) is not None:
        root = Path(config.cache.mkdir("convdiff"))
    else:
        root = default_cache_dir()

    baseline_path = opts.value(config, "convdiff_baseline")
    baseline_update = bool(config.getoption("convdiff_baseline_update"))
    if baseline_update and not baseline_path:
        raise pytest.UsageError("--convdiff-baseline-update needs --convdiff-baseline PATH (the file to write).")
    try:
        tolerances = baseline_file.parse_tolerances(str(opts.value(config, "convdiff_baseline_tolerance") or ""))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    plot_dir = opts.value(config, "convdiff_plot")
    if plot_dir and Path(plot_dir).exists() and not Path(plot_dir).is_dir():
        raise pytest.UsageError(f"--convdiff-plot: {plot_dir} exists and is not a directory.")

    pairs: list[PairSpec] = []
    if model_a:
        (options_a,) = backend_options("--convdiff-option-a", raw_a, [str(model_a)], backend_a)
        options_b = backend_options("--convdiff-option-b", raw_b, model_bs, backend_b)
        ids = unique_pair_ids(str(model_a), model_bs)
        pairs = [PairSpec(pid, ModelSpec(str(model_a), backend_a, options_a), ModelSpec(b, backend_b, ob))
                 for pid, b, ob in zip(ids, model_bs, options_b, strict=True)]
    json_path, html_path, save_ref = (opts.value(config, n) for n in ("convdiff_json", "convdiff_html",
                                                                       "convdiff_save_reference"))
    return ConvdiffState(
        pairs, corpus, settings, bounds,
        Cache(root, read=not config.getoption("convdiff_refresh"),
              full_verify=bool(opts.value(config, "convdiff_verify_cache")), budget=cache_budget(config)),
        json_path=Path(json_path) if json_path else None,
        save_reference=Path(save_ref) if save_ref else None,
        plot_dir=Path(plot_dir) if plot_dir else None,
        html_path=Path(html_path) if html_path else None,
        baseline=BaselineConfig(Path(baseline_path), tolerances, baseline_update) if baseline_path else None,
        gpu=_worker_gpu(config),
    )


def cache_budget(config: pytest.Config) -> CacheBudget:
    """--convdiff-cache-max-size (ini convdiff_cache_max_size); UsageError naming the accepted forms."""
    raw = opts.value(config, "convdiff_cache_max_size")
    if raw in (None, ""):
        return DEFAULT_BUDGET
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise pytest.UsageError(f"--convdiff-cache-max-size: {exc}.") from None


def configured_cache_root(config: pytest.Config) -> Path:
    """The cache directory the session will use, known before pytest configures its own cache (the
    cache commands run first) and without creating anything."""
    cache_dir = opts.value(config, "convdiff_cache_dir")
    if cache_dir:
        root = Path(os.path.expanduser(str(cache_dir)))
        if root.exists() and not root.is_dir():
            raise pytest.UsageError(f"--convdiff-cache-dir: {root} exists and is not a directory.")
        return root
    if config.pluginmanager.is_blocked("cacheprovider"):
        return default_cache_dir()
    base = Path(os.path.expanduser(os.path.expandvars(str(config.getini("cache_dir")))))
    return (base if base.is_absolute() else config.rootpath / base) / "d" / "convdiff"


def cache_command(config: pytest.Config, *, info: bool, clear: bool) -> int | None:
    """--convdiff-cache-clear, then --convdiff-cache-info: 0 (exit) after the listing, None to run on."""
    cache = Cache(configured_cache_root(config), budget=cache_budget(config))
    lines = cleared_lines(cache.root, *cache.clear()) if clear else []
    if info:
        lines += cache.info()
    print("\n".join(lines), flush=True)
    return 0 if info else None


def _worker_gpu(config: pytest.Config) -> int | None:
    n = int_option(config, "convdiff_gpus", "--convdiff-gpus", 1, None)
    if n is None:
        return None
    return gpu_for_worker(getattr(config, "workerinput", {}).get("workerid", ""), n)
