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

from ..backends.options import validate_options
from ..checks.base import BaselineConfig
from ..comparison import Comparison, default_cache_dir
from ..core.corpus import Corpus, load_corpus
from ..core.pair_id import unique_pair_ids
from ..core.results import PairResult
from ..core.settings import LAYER_SWAP_NEEDS_FULL, RunSettings
from ..errors import ConvdiffError
from ..runner import ModelSpec
from ..store.baseline_file import parse_tolerances
from ..store.budget import DEFAULT_BUDGET, cleared_lines
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


def option_values(config: pytest.Config, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every option's typed value (None when not given), or those named, read by the parser its table
    row names: a bad value is a UsageError naming the option and what it accepts, before anything runs."""
    from .. import option_values as parsers

    out: dict[str, Any] = {}
    for o in opts.OPTIONS:
        if names is not None and o.ini not in names:
            continue
        try:
            out[o.ini] = parsers.parse(o.parse, opts.value(config, o.ini))
        except (ValueError, ConvdiffError) as exc:
            raise usage(o.flags[0], exc) from None
    return out


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


def build_session(config: pytest.Config) -> ConvdiffState:
    """Parse and validate every option (a UsageError names the option and the valid values), then the
    rules between options."""
    v = option_values(config)
    model_a, model_bs = v["convdiff_model_a"], v["convdiff_model_b"] or []
    if model_bs and not model_a:
        raise pytest.UsageError("--model-b was given without --model-a: give the reference model with --model-a PATH.")
    if model_a and not model_bs:
        raise pytest.UsageError("--model-a was given without --model-b: give the converted model(s) with "
                                "--model-b PATH.")
    fields = {o.setting: v[o.ini] for o in opts.OPTIONS if o.setting and v[o.ini] is not None}
    if fields.get("layer_swap") and fields.get("hidden_states", True) and fields.get("store", "compact") != "full":
        raise pytest.UsageError(f"--convdiff-layer-swap: {LAYER_SWAP_NEEDS_FULL}.")
    settings = RunSettings(**fields)
    if v["convdiff_baseline_update"] and not v["convdiff_baseline"]:
        raise pytest.UsageError("--convdiff-baseline-update needs --convdiff-baseline PATH (the file to write).")
    root = v["convdiff_cache_dir"]
    if root is None:
        root = Path(config.cache.mkdir("convdiff")) if getattr(config, "cache", None) is not None \
            else default_cache_dir()

    pairs: list[PairSpec] = []
    if model_a:
        backend_a, backend_b = v["convdiff_backend_a"], v["convdiff_backend_b"]
        (options_a,) = backend_options("--convdiff-option-a", v["convdiff_options_a"] or {}, [model_a], backend_a)
        options_b = backend_options("--convdiff-option-b", v["convdiff_options_b"] or {}, model_bs, backend_b)
        pairs = [PairSpec(pid, ModelSpec(model_a, backend_a, options_a), ModelSpec(b, backend_b, ob))
                 for pid, b, ob in zip(unique_pair_ids(model_a, model_bs), model_bs, options_b, strict=True)]
    baseline = v["convdiff_baseline"]
    return ConvdiffState(
        pairs, v["convdiff_prompts"] or load_corpus(None), settings, v["convdiff_bounds"] or {},
        Cache(root, read=not v["convdiff_refresh"], full_verify=v["convdiff_verify_cache"],
              budget=v["convdiff_cache_max_size"] or DEFAULT_BUDGET),
        json_path=v["convdiff_json"], save_reference=v["convdiff_save_reference"], plot_dir=v["convdiff_plot"],
        html_path=v["convdiff_html"], gpu=_worker_gpu(config, v["convdiff_gpus"]),
        baseline=BaselineConfig(baseline, v["convdiff_baseline_tolerance"] or parse_tolerances(""),
                                v["convdiff_baseline_update"]) if baseline else None,
    )


def configured_cache_root(config: pytest.Config, given: Path | None) -> Path:
    """The cache directory the session will use, known before pytest configures its own cache (the
    cache commands run first) and without creating anything."""
    if given is not None:
        return given
    if config.pluginmanager.is_blocked("cacheprovider"):
        return default_cache_dir()
    base = Path(os.path.expanduser(os.path.expandvars(str(config.getini("cache_dir")))))
    return (base if base.is_absolute() else config.rootpath / base) / "d" / "convdiff"


def cache_command(config: pytest.Config, *, info: bool, clear: bool) -> int | None:
    """--convdiff-cache-clear, then --convdiff-cache-info: 0 (exit) after the listing, None to run on."""
    v = option_values(config, ("convdiff_cache_dir", "convdiff_cache_max_size"))
    cache = Cache(configured_cache_root(config, v["convdiff_cache_dir"]),
                  budget=v["convdiff_cache_max_size"] or DEFAULT_BUDGET)
    lines = cleared_lines(cache.root, *cache.clear()) if clear else []
    if info:
        lines += cache.info()
    print("\n".join(lines), flush=True)
    return 0 if info else None


def _worker_gpu(config: pytest.Config, n: int | None) -> int | None:
    if n is None:
        return None
    return gpu_for_worker(getattr(config, "workerinput", {}).get("workerid", ""), n)
