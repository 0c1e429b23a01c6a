"""pytest glue: options, collection of check items, the pair fixture, reports.

Everything that computes lives in the library (compare, runner, metrics, cache,
report); this module parses options at configure time, turns each planned check
of each pair into a test item, runs the pair lazily on its first item, and ships
each item's result through ``user_properties`` so the summary and the JSON
report also work under pytest-xdist.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import report
from .bounds import Bounds, default_bounds, parse_bound_overrides
from .cache import Cache
from .compare import (
    ERROR,
    FAILED,
    SKIPPED,
    CheckResult,
    PairMetrics,
    PairResult,
    error_result,
    evaluate,
    pair_metrics,
    plan_checks,
)
from .corpus import Corpus, load_corpus
from .errors import ConvdiffError
from .runner import ModelRun, ModelSpec, RunSettings, cache_dtype_name, run_model

PROPERTY = "convdiff"


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("convdiff", "model-conversion checks (pytest-convdiff)")

    def add(*names: str, ini: str, help: str, type_: str | None = None, default: Any = None, **kw: Any) -> None:
        g.addoption(*names, dest=ini, default=None, help=help, **kw)
        parser.addini(ini, help=help, type=type_, default=default)

    add("--model-a", ini="convdiff_model_a", metavar="PATH",
        help="reference model: transformers checkpoint dir, .gguf, EXL2 dir, or saved reference")
    add("--model-b", ini="convdiff_model_b", action="append", metavar="PATH", type_="linelist", default=[],
        help="converted model to check against --model-a; repeat for several (one pair each)")
    add("--convdiff-backend-a", "--backend-a", ini="convdiff_backend_a", metavar="NAME",
        help="backend for model A (transformers, llama.cpp, exllamav2, reference); default: detected from the path")
    add("--convdiff-backend-b", "--backend-b", ini="convdiff_backend_b", metavar="NAME",
        help="backend for the B models; default: detected from each path")
    add("--convdiff-option-a", ini="convdiff_options_a", action="append", metavar="KEY=VALUE", type_="linelist",
        default=[], help="backend option for model A, e.g. dtype=float32, device=cuda, n_gpu_layers=99")
    add("--convdiff-option-b", ini="convdiff_options_b", action="append", metavar="KEY=VALUE", type_="linelist",
        default=[], help="backend option for the B models, e.g. no_sdpa=true, n_threads=8")
    add("--convdiff-prompts", ini="convdiff_prompts", metavar="FILE",
        help="evaluation corpus: .txt (one prompt per line), .jsonl, .parquet, or 'default' / 'quick'")
    add("--convdiff-max-tokens", ini="convdiff_max_tokens", metavar="N",
        help="truncate each prompt to N tokens (reported); default: no truncation")
    add("--convdiff-bound", ini="convdiff_bounds", action="append", metavar="NAME=VALUE", type_="linelist",
        default=[], help=f"override a default bound ({', '.join(Bounds.names())}); repeatable")
    add("--convdiff-cache-dir", ini="convdiff_cache_dir", metavar="DIR",
        help="where model outputs are cached (default: .pytest_cache/d/convdiff)")
    add("--convdiff-cache-dtype", ini="convdiff_cache_dtype", metavar="DTYPE",
        help="how logits and hidden states are stored: float32 (default, exact) or float16 (half the disk; "
             "see docs/performance.md for its effect on each metric)")
    add("--convdiff-verify-cache", ini="convdiff_verify_cache", action="store_true", type_="bool", default=False,
        help="re-hash every cache file on read (default: only files whose size or mtime changed)")
    add("--convdiff-json", ini="convdiff_json", metavar="PATH", help="write a JSON report of every pair")
    g.addoption("--convdiff-refresh", action="store_true", default=False,
                help="recompute model outputs even when the cache holds valid entries")
    add("--convdiff-plot", ini="convdiff_plot", metavar="DIR",
        help="write a PNG per pair (per-layer rfn, KL) into DIR (needs matplotlib: the plot extra)")
    add("--convdiff-html", ini="convdiff_html", metavar="PATH", help="write a self-contained HTML report")
    add("--convdiff-baseline", ini="convdiff_baseline", metavar="PATH",
        help="regression mode: compare each pair's metrics with those stored for it in PATH (JSON)")
    g.addoption("--convdiff-baseline-update", action="store_true", default=False,
                help="write this run's metrics into the --convdiff-baseline file (accepting them)")
    add("--convdiff-baseline-tolerance", ini="convdiff_baseline_tolerance", metavar="SPEC",
        help="how much worse than the baseline is allowed, e.g. 'nmse:50%%,kl_mean:abs:1e-3,rfn:25%%' "
             "(defaults: nmse/kl 50%%, rfn 25%% per layer, top1/top5/ppl_ratio abs 0.01)")
    add("--convdiff-gpus", ini="convdiff_gpus", metavar="N",
        help="under xdist, give worker gwK the GPU K mod N (sets CUDA_VISIBLE_DEVICES unless already set)")
    add("--convdiff-save-reference", ini="convdiff_save_reference", metavar="PATH",
        help="write model A's outputs to PATH (a safetensors golden reference); later runs pass it as --model-a "
             "and never need the reference model again")
    add("--convdiff-layer-swap", ini="convdiff_layer_swap", metavar="K",
        help="layer-swap analysis: also run B with A's hidden states fed in for layers < K "
             "(transformers and exllamav2 backends); reported per layer next to the plain rfn")
    add("--convdiff-greedy-tokens", ini="convdiff_greedy_tokens", metavar="N",
        help="length of the greedy continuations of the greedy check (default 16; 0 turns the check off)")
    add("--convdiff-no-layers", ini="convdiff_no_layers", action="store_true", type_="bool", default=False,
        help="skip per-layer hidden states (logit checks only)")
    add("--convdiff-no-tokenizer-cases", ini="convdiff_no_tokenizer_cases", action="store_true", type_="bool",
        default=False, help="skip the built-in tricky tokenizer strings")
    add("--convdiff-no-causality", ini="convdiff_no_causality", action="store_true", type_="bool", default=False,
        help="skip the prefix-vs-full causality probe")


# --------------------------------------------------------------------------- configuration


@dataclass
class PairSpec:
    id: str
    a: ModelSpec
    b: ModelSpec
    marks: tuple[str, ...] = ()
    bound_overrides: dict[str, float] = field(default_factory=dict)
    corpus: Corpus | None = None  # a manifest entry's own corpus; None: the session's


@dataclass
class State:
    """Everything a session needs, in config.stash."""

    pairs: list[PairSpec]
    corpus: Corpus
    settings: RunSettings
    bound_overrides: dict[str, float]
    cache: Cache
    refresh: bool
    json_path: Path | None
    save_reference: Path | None = None
    plot_dir: Path | None = None
    html_path: Path | None = None
    baseline_path: Path | None = None
    baseline_update: bool = False
    baseline_tolerances: dict[str, tuple[str, float]] = field(default_factory=dict)
    manifest_pairs: list[PairSpec] = field(default_factory=list)
    reference_saved: bool = False
    results: dict[str, PairResult] = field(default_factory=dict)
    runs: dict[str, tuple[ModelRun, ModelRun]] = field(default_factory=dict)
    evaluations: dict[tuple[str, tuple], PairResult] = field(default_factory=dict)
    metrics: dict[str, PairMetrics] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)


STATE = pytest.StashKey[State]()


def _opt(config: pytest.Config, name: str) -> Any:
    """Command line first, then ini/pyproject."""
    value = config.getoption(name)
    if value in (None, [], False):
        value = config.getini(name)
    return value


def _int_option(config: pytest.Config, name: str, option: str, minimum: int, default: int | None) -> int | None:
    """An integer option (command line or ini) of at least ``minimum``; UsageError naming it otherwise."""
    raw = _opt(config, name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
        if value < minimum:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"{option}: expected an integer >= {minimum}, got {raw!r}") from None
    return value


def parse_options(items: list[str], option: str) -> dict[str, Any]:
    """``["dtype=float16", "n_gpu_layers=99"]`` -> typed dict; UsageError naming the option on bad input."""
    out: dict[str, Any] = {}
    for raw in items or []:
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise pytest.UsageError(f"{option}: expected KEY=VALUE, got {part!r}")
            out[key.strip()] = _typed(value.strip())
    return out


def _typed(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def pair_ids(a: str, bs: list[str]) -> list[str]:
    """Readable, unique ids: ``<A name>-vs-<B name>``."""
    name_a = _UNSAFE.sub("_", Path(a).name) or "A"
    ids = []
    for b in bs:
        base = f"{name_a}-vs-{_UNSAFE.sub('_', Path(b).name) or 'B'}"
        candidate, n = base, 2
        while candidate in ids:
            candidate, n = f"{base}-{n}", n + 1
        ids.append(candidate)
    return ids


def _validate_backend(name: str | None, option: str) -> str | None:
    if not name:
        return None
    from .backends import normalize_backend_name

    try:
        return normalize_backend_name(name)
    except ValueError as exc:
        raise pytest.UsageError(f"{option}: {exc}") from None


def build_state(config: pytest.Config) -> State:
    """Parse and validate every option at configure time; models are optional (manifests bring their own)."""
    model_a = _opt(config, "convdiff_model_a")
    model_bs = [b for b in (_opt(config, "convdiff_model_b") or []) if str(b).strip()]
    if model_bs and not model_a:
        raise pytest.UsageError("--model-b was given without --model-a: give the reference model with --model-a PATH.")
    if model_a and not model_bs:
        raise pytest.UsageError("--model-a was given without --model-b: give the converted model(s) with --model-b PATH.")
    backend_a = _validate_backend(_opt(config, "convdiff_backend_a"), "--convdiff-backend-a")
    backend_b = _validate_backend(_opt(config, "convdiff_backend_b"), "--convdiff-backend-b")
    options_a = parse_options(_opt(config, "convdiff_options_a"), "--convdiff-option-a")
    options_b = parse_options(_opt(config, "convdiff_options_b"), "--convdiff-option-b")

    bounds: dict[str, float] = {}
    for text in _opt(config, "convdiff_bounds") or []:
        try:
            bounds.update(parse_bound_overrides(str(text)))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None

    max_tokens = _int_option(config, "convdiff_max_tokens", "--convdiff-max-tokens", 2, None)

    try:
        corpus = load_corpus(_opt(config, "convdiff_prompts") or None)
    except ConvdiffError as exc:
        raise pytest.UsageError(f"--convdiff-prompts: {exc}") from None

    layer_swap = _int_option(config, "convdiff_layer_swap", "--convdiff-layer-swap", 0, 0)
    greedy = _int_option(config, "convdiff_greedy_tokens", "--convdiff-greedy-tokens", 0, RunSettings.greedy_tokens)
    try:
        cache_dtype = cache_dtype_name(_opt(config, "convdiff_cache_dtype") or RunSettings.cache_dtype)
    except ValueError as exc:
        raise pytest.UsageError(f"--convdiff-cache-dtype: {exc}.") from None
    settings = RunSettings(
        hidden_states=not _opt(config, "convdiff_no_layers"),
        tokenizer_cases=not _opt(config, "convdiff_no_tokenizer_cases"),
        causality=not _opt(config, "convdiff_no_causality"),
        max_tokens=max_tokens,
        layer_swap=layer_swap,
        greedy_tokens=greedy,
        cache_dtype=cache_dtype,
    )
    cache_dir = _opt(config, "convdiff_cache_dir")
    if cache_dir:
        root = Path(os.path.expanduser(str(cache_dir)))
        if root.exists() and not root.is_dir():
            raise pytest.UsageError(f"--convdiff-cache-dir: {root} exists and is not a directory.")
    elif getattr(config, "cache", None) is not None:
        root = Path(config.cache.mkdir("convdiff"))
    else:
        from .compare import default_cache_dir

        root = default_cache_dir()
    json_path = _opt(config, "convdiff_json")
    refresh = bool(config.getoption("convdiff_refresh"))
    pairs = []
    if model_a:
        ids = pair_ids(str(model_a), [str(b) for b in model_bs])
        pairs = [
            PairSpec(pid, ModelSpec(str(model_a), backend_a, options_a), ModelSpec(str(b), backend_b, options_b))
            for pid, b in zip(ids, model_bs, strict=True)
        ]
    from . import baseline as baseline_mod

    baseline_path = _opt(config, "convdiff_baseline")
    baseline_update = bool(config.getoption("convdiff_baseline_update"))
    if baseline_update and not baseline_path:
        raise pytest.UsageError("--convdiff-baseline-update needs --convdiff-baseline PATH (the file to write).")
    try:
        tolerances = baseline_mod.parse_tolerances(str(_opt(config, "convdiff_baseline_tolerance") or ""))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    save_ref = _opt(config, "convdiff_save_reference")
    plot_dir = _opt(config, "convdiff_plot")
    html_path = _opt(config, "convdiff_html")
    if plot_dir and Path(plot_dir).exists() and not Path(plot_dir).is_dir():
        raise pytest.UsageError(f"--convdiff-plot: {plot_dir} exists and is not a directory.")
    cache = Cache(root, read=not refresh, full_verify=bool(_opt(config, "convdiff_verify_cache")))
    return State(pairs, corpus, settings, bounds, cache, refresh,
                 Path(json_path) if json_path else None, Path(save_ref) if save_ref else None,
                 plot_dir=Path(plot_dir) if plot_dir else None, html_path=Path(html_path) if html_path else None,
                 baseline_path=Path(baseline_path) if baseline_path else None, baseline_update=baseline_update,
                 baseline_tolerances=tolerances)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "convdiff: a model-conversion check generated by pytest-convdiff")
    config.addinivalue_line("markers", "convdiff_bounds(**bounds): override convdiff bounds for the marked checks")
    for mark, what in (("slow", "slow model-conversion pairs (manifest marks)"),
                       ("gpu", "pairs that need a CUDA GPU (manifest marks)")):
        config.addinivalue_line("markers", f"{mark}: {what}")
    _assign_gpu(config)
    state = build_state(config)
    config.stash[STATE] = state
    if state.pairs:
        state.cache.clean_stale()


def gpu_for_worker(worker_id: str, n_gpus: int) -> str | None:
    """``gw3`` with 2 GPUs -> "1"; None for the controller or a non-xdist run."""
    m = re.fullmatch(r"gw(\d+)", worker_id or "")
    return str(int(m.group(1)) % n_gpus) if m and n_gpus > 0 else None


def _assign_gpu(config: pytest.Config) -> None:
    n = _int_option(config, "convdiff_gpus", "--convdiff-gpus", 1, None)
    if n is None:
        return
    worker = getattr(config, "workerinput", {}).get("workerid", "")
    gpu = gpu_for_worker(worker, n)
    # Before any backend initialises CUDA; a value set by the user or the runner wins.
    if gpu is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def pytest_cmdline_main(config: pytest.Config) -> None:
    # Under xdist, keep all checks of a pair on one worker (each model loads once) unless
    # the user chose a distribution mode themselves.
    opt = config.option
    if getattr(opt, "numprocesses", None) and getattr(opt, "dist", None) == "load":
        args = [str(a) for a in config.invocation_params.args]
        if not any(a == "--dist" or a.startswith("--dist=") or a == "-d" for a in args):
            opt.dist = "loadgroup"


# --------------------------------------------------------------------------- collection


class ConvdiffCheckFailure(AssertionError):
    """A check outside its bound; the message is the whole report."""


class PairCollector(pytest.Collector):
    """``convdiff[<pair>]``: the checks of one A/B pair."""

    def __init__(self, *, pair: PairSpec, plan: list[tuple[str, str]], **kw: Any) -> None:
        super().__init__(**kw)
        self.pair = pair
        self.plan = plan

    def collect(self) -> Iterator[ConvdiffItem]:
        for name, param in self.plan:
            item_name = f"{name}[{param}]" if param else name
            item = ConvdiffItem.from_parent(self, name=item_name, check=(name, param))
            item.order = len(self.plan) and self.plan.index((name, param))
            item.add_marker(pytest.mark.convdiff)
            item.add_marker(pytest.mark.xdist_group(self.pair.id))
            for mark in self.pair.marks:
                item.add_marker(getattr(pytest.mark, mark))
            yield item


class ConvdiffItem(pytest.Item):
    def __init__(self, *, check: tuple[str, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.check = check
        self.order = 0
        self.result: CheckResult | None = None
        self.pair_result: PairResult | None = None

    @property
    def pair(self) -> PairSpec:
        return self.parent.pair  # type: ignore[attr-defined]

    def setup(self) -> None:
        state = self.config.stash[STATE]
        pair_result = pair_result_for(self.config, state, self.pair, self._marker_bounds())
        self.pair_result = pair_result
        if pair_result.error:
            raise ConvdiffError(pair_result.error)

    def _marker_bounds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for mark in reversed(list(self.iter_markers("convdiff_bounds"))):
            for key, value in mark.kwargs.items():
                out.update(parse_bound_overrides(f"{key}={value}", "@pytest.mark.convdiff_bounds"))
        return out

    def runtest(self) -> None:
        assert self.pair_result is not None
        check_id = f"{self.check[0]}[{self.check[1]}]" if self.check[1] else self.check[0]
        try:
            result = self.pair_result.check(check_id)
        except KeyError:
            raise ConvdiffError(f"check {check_id} was planned but not computed for pair {self.pair.id}") from None
        self.result = result
        if result.outcome == SKIPPED:
            pytest.skip(result.message)
        if result.outcome in (FAILED, ERROR):
            raise ConvdiffCheckFailure(result.message)

    def repr_failure(self, excinfo, style=None):  # type: ignore[override]
        if isinstance(excinfo.value, (ConvdiffCheckFailure, ConvdiffError)):
            head = f"convdiff {self.pair.id} :: {self.name}\n  A: {self.pair.a.path}\n  B: {self.pair.b.path}\n"
            rerun = f"\nRerun just this check: pytest ... -k '{self.name}'" if isinstance(
                excinfo.value, ConvdiffCheckFailure) else ""
            return head + str(excinfo.value) + rerun
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return Path(self.pair.b.path), None, f"convdiff[{self.pair.id}]::{self.name}"


def pair_plan(state: State, pair: PairSpec) -> list[tuple[str, str]]:
    plan = plan_checks(pair.corpus or state.corpus, _probe_layers(pair.a), state.settings)
    if state.baseline_path is not None:
        from .baseline import METRICS

        plan += [("baseline", name) for name in METRICS]
    return plan


def _probe_layers(spec: ModelSpec) -> int | None:
    try:
        return spec.probe().num_layers
    except Exception:  # noqa: BLE001 - reported as the pair's error when it runs
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash.get(STATE, None)
    if state is None or not state.pairs:
        return
    for pair in state.pairs:
        plan = pair_plan(state, pair)
        collector = PairCollector.from_parent(session, name=f"convdiff[{pair.id}]",
                                              nodeid=f"convdiff[{pair.id}]", pair=pair, plan=plan)
        items.extend(collector.collect())


# --------------------------------------------------------------------------- running pairs


def _progress(config: pytest.Config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(config, "workerinput") or config.option.verbose < 0:
        return lambda _msg: None

    def emit(msg: str) -> None:
        reporter.ensure_newline()
        reporter.write_line(f"convdiff: {msg}", cyan=True)

    return emit


def pair_runs(config: pytest.Config, state: State, pair: PairSpec) -> tuple[ModelRun, ModelRun]:
    """A then B (on A's tokens), each loaded only if its cache entry is missing, one at a time."""
    if pair.id not in state.runs:
        progress = _progress(config)
        corpus = pair.corpus or state.corpus
        run_a = run_model(pair.a, corpus, state.cache, settings=state.settings, progress=progress,
                          label=f"[{pair.id}] A ")
        if state.save_reference is not None and not state.reference_saved:
            from .reference import save_reference

            save_reference(run_a, state.save_reference, corpus, state.settings)
            state.reference_saved = True
            progress(f"reference for {pair.a.path} saved to {state.save_reference}")
        run_b = run_model(pair.b, corpus, state.cache, feed=run_a, settings=state.settings,
                          progress=progress, label=f"[{pair.id}] B ")
        state.runs[pair.id] = (run_a, run_b)
    return state.runs[pair.id]


def pair_result_for(config: pytest.Config, state: State, pair: PairSpec,
                    marker_bounds: dict[str, float] | None = None) -> PairResult:
    overrides = {**state.bound_overrides, **pair.bound_overrides, **(marker_bounds or {})}  # narrowest wins
    key = (pair.id, tuple(sorted(overrides.items())))
    if key in state.evaluations:
        return state.evaluations[key]
    if pair.id in state.results and state.results[pair.id].error:
        return state.results[pair.id]
    try:
        run_a, run_b = pair_runs(config, state, pair)
        cls, chosen = default_bounds(run_a.info, run_b.info)
        corpus = pair.corpus or state.corpus
        if pair.id not in state.metrics:  # bound-independent: computed (or read from the cache) once per pair
            state.metrics[pair.id] = pair_metrics(run_a, run_b, corpus, state.cache)
        result = evaluate(run_a, run_b, corpus, chosen.with_overrides(overrides), pair_id=pair.id, precision=cls,
                          pm=state.metrics[pair.id])
        if state.baseline_path is not None:
            result.checks += baseline_checks(state, pair, result)
    except ConvdiffError as exc:
        result = error_result(pair.id, pair.a, pair.b, [], f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a backend crash must error the pair, never pass it
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = error_result(pair.id, pair.a, pair.b, [],
                              f"unexpected {type(exc).__name__} while running the pair: {exc} "
                              f"(at {Path(where.filename).name}:{where.lineno}). This is a bug in a backend or in "
                              "pytest-convdiff; please report it with this message.")
    state.evaluations[key] = result
    state.results.setdefault(pair.id, result)
    return result


def baseline_checks(state: State, pair: PairSpec, result: PairResult) -> list[CheckResult]:
    """One ``baseline[<metric>]`` item per metric: worse than the stored value beyond tolerance fails."""
    from . import baseline

    assert state.baseline_path is not None
    current = baseline.snapshot(result.to_dict()) or {}
    stored = baseline.load(state.baseline_path).get(pair.id)
    out = []
    for name, worse_up in baseline.METRICS.items():
        if state.baseline_update:
            out.append(CheckResult("baseline", name, None, None, "passed",
                                   f"baseline for {pair.id} will be updated in {state.baseline_path}"))
            continue
        if stored is None:
            out.append(CheckResult("baseline", name, None, None, SKIPPED,
                                   f"no baseline for pair {pair.id} in {state.baseline_path}; record one with "
                                   "--convdiff-baseline-update"))
            continue
        r = baseline.regressions(current, stored, state.baseline_tolerances)[name]
        kind, tol = state.baseline_tolerances[name]
        tol_text = f"{tol:.0%}" if kind == "rel" else f"abs {tol:g}"
        if r["worse"]:
            msg = (f"{name} got worse than the baseline for {pair.id} beyond the tolerance ({tol_text}): "
                   f"baseline {r['old']!r}, now {r['new']!r}, allowed {'<=' if worse_up else '>='} {r['allowed']!r}."
                   + (f"\n{r['detail']}" if r["detail"] else "")
                   + f"\nBaseline recorded {stored.get('recorded', '?')} from {stored.get('model_b')}.\n"
                   f"Accept the new values with --convdiff-baseline-update, or widen it with "
                   f"--convdiff-baseline-tolerance {name}:PCT%.")
            out.append(CheckResult("baseline", name, r["new"] if name != "rfn" else r["new"], r["allowed"],
                                   FAILED, msg))
        else:
            out.append(CheckResult("baseline", name, r["new"] if name != "rfn" else None, r["allowed"], "passed",
                                   f"{name}: within {tol_text} of the baseline ({r['old']!r} -> {r['new']!r})"
                                   + (f"; {r['detail']}" if r["detail"] else "")))
    return out


# --------------------------------------------------------------------------- zoo manifests


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.name.endswith(".convdiff.toml"):
        return ManifestFile.from_parent(parent, path=file_path)
    return None


class ManifestFile(pytest.File):
    """A model-zoo manifest: each ``[[pair]]`` entry becomes a pair of checks, like --model-a/--model-b."""

    def collect(self):
        from .manifest import load_manifest

        state = self.config.stash[STATE]
        try:
            entries = load_manifest(self.path)
        except ConvdiffError as exc:
            raise self.CollectError(str(exc)) from None
        for entry in entries:
            for mark in entry.marks:
                self.config.addinivalue_line("markers", f"{mark}: set by {self.path.name}")
            corpus = None
            if entry.corpus:
                try:
                    corpus = load_corpus(entry.corpus)
                except ConvdiffError as exc:
                    raise self.CollectError(f"{self.path}, pair {entry.id!r}: {exc}") from None
            try:
                overrides = {**state.bound_overrides, **entry.bounds}
            except ValueError as exc:
                raise self.CollectError(str(exc)) from None
            pair = PairSpec(entry.id, ModelSpec(entry.model_a, entry.backend_a, entry.options_a),
                            ModelSpec(entry.model_b, entry.backend_b, entry.options_b), tuple(entry.marks),
                            overrides, corpus)
            state.manifest_pairs.append(pair)
            yield PairCollector.from_parent(self, name=f"convdiff[{pair.id}]", pair=pair, plan=pair_plan(state, pair))


# --------------------------------------------------------------------------- user fixture


@dataclass
class PairHandle:
    """What a user's own test gets: both runs (cached logits, hidden states), the result, the metrics."""

    id: str
    a: ModelRun
    b: ModelRun
    result: PairResult
    corpus: Corpus

    @property
    def metrics(self):
        from . import metrics

        return metrics


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "convdiff_pair" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash.get(STATE, None)
    ids = [p.id for p in state.pairs] if state and state.pairs else ["no-models"]
    metafunc.parametrize("convdiff_pair", ids, indirect=True, ids=ids)


@pytest.fixture
def convdiff_pair(request: pytest.FixtureRequest) -> PairHandle:
    """The pair's cached runs and evaluated result, for custom checks (parametrized over every --model-b)."""
    state = request.config.stash.get(STATE, None)
    if state is None or not state.pairs:
        pytest.skip("convdiff_pair needs --model-a and --model-b")
    pair = next(p for p in state.pairs if p.id == request.param)
    result = pair_result_for(request.config, state, pair)
    if result.error:
        raise ConvdiffError(result.error)
    run_a, run_b = state.runs[pair.id]
    return PairHandle(pair.id, run_a, run_b, result, state.corpus)


# --------------------------------------------------------------------------- reporting


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    rep = outcome.get_result()
    if not isinstance(item, ConvdiffItem):
        return
    if call.when == "call" or (call.when == "setup" and rep.outcome != "passed"):
        pr = item.pair_result
        payload = report.item_payload(item.pair.id, item.check, item.result, pr,
                                      item.pair.a.path, item.pair.b.path, rep.outcome,
                                      str(rep.longrepr) if rep.failed and item.result is None else None)
        payload["check"]["order"] = item.order
        props = [(PROPERTY, json.dumps(payload))]
        if item.result is not None and item.result.value is not None:
            props.append((f"convdiff_{item.check[0]}", repr(item.result.value)))
            if item.result.threshold is not None:
                props.append(("convdiff_bound", repr(item.result.threshold)))
        rep.user_properties.extend(props)
        # junitxml writes properties from the teardown report, which copies item.user_properties
        item.user_properties.extend(props)


def _collect_payload(config: pytest.Config, rep: pytest.TestReport) -> None:
    state = config.stash.get(STATE, None)
    if state is None:
        return
    for name, value in rep.user_properties:
        if name == PROPERTY:
            report.merge_payload(state.reports, json.loads(value))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ARG001
    state = config.stash.get(STATE, None)
    if state is None or hasattr(config, "workerinput"):
        return
    for stat in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(stat, []):
            if isinstance(rep, pytest.TestReport) and rep.when in ("setup", "call"):
                _collect_payload(config, rep)
    pairs = report.build_pairs(state.reports, [p.id for p in state.pairs + state.manifest_pairs])
    if not pairs:
        return
    terminalreporter.write_sep("=", "convdiff summary")
    for line in report.summary_lines(pairs):
        terminalreporter.write_line(line)
    if state.json_path is not None:
        report.write_json(state.json_path, pairs)
        terminalreporter.write_line(f"convdiff: JSON report written to {state.json_path}")
    _extra_reports(terminalreporter, state, pairs)
    if state.baseline_update and state.baseline_path is not None:
        from . import baseline

        written = baseline.update(state.baseline_path, pairs)
        terminalreporter.write_line(f"convdiff: baseline {state.baseline_path} updated for {len(written)} pair(s)")


def _extra_reports(terminalreporter, state: State, pairs: list[dict[str, Any]]) -> None:
    """Plots, HTML and the GitHub Actions step summary; a failure here is reported, never fatal."""
    from . import report_extra

    plots: dict[str, Path] = {}
    try:
        if state.plot_dir is not None:
            try:
                paths = report_extra.plot_pairs(pairs, state.plot_dir)
                plots = {p["id"]: path for p, path in zip(pairs, paths, strict=False)}
                terminalreporter.write_line(f"convdiff: {len(paths)} plot(s) written to {state.plot_dir}")
            except report_extra.PlotDependencyError as exc:
                terminalreporter.write_line(f"convdiff: {exc}", yellow=True)
        if state.html_path is not None:
            state.html_path.parent.mkdir(parents=True, exist_ok=True)
            state.html_path.write_text(report_extra.html_report(pairs, plots or None), encoding="utf-8")
            terminalreporter.write_line(f"convdiff: HTML report written to {state.html_path}")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:  # append: other steps write there too
                fh.write(report_extra.markdown_summary(pairs))
            terminalreporter.write_line("convdiff: summary appended to $GITHUB_STEP_SUMMARY")
    except OSError as exc:
        terminalreporter.write_line(f"convdiff: could not write a report: {exc}", red=True)
