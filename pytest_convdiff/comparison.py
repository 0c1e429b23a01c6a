"""Compare a reference model A with a converted model B: the one pipeline, for the library and the plugin.

    from pytest_convdiff import compare
    result = compare("ref-dir", "model-f16.gguf")
    print(result.verdict, result.first_divergent_layer)

A ``Comparison`` owns a pair from start to end: the plan (which checks, known before any model
loads), the runs (A, then B on A's token ids, each loaded only when its cache entry is missing and
closed before the next loads), the bound-independent metrics (computed once, cached beside the
entries), and the evaluation of every check family against the bounds in force. ``compare()`` is
one Comparison; the pytest plugin keeps one per pair and maps its results onto items.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import checks, measure_worker, runner, sources
from .backends.base import WEIGHTS_TWIN
from .checks.base import BaselineConfig, CheckFamily, EvalContext, PlanContext
from .core.bounds import Bounds
from .core.code_version import code_digest
from .core.corpus import Corpus, load_corpus
from .core.pair_id import pair_id
from .core.results import ERROR, FAILED, CheckId, CheckResult, PairResult
from .errors import ConvdiffError, describe_failure
from .pair import PairMetrics, pair_metrics
from .runner import ModelRun, ModelSpec, Progress, RunSettings, quiet
from .store.cache import Cache, make_key


def run_model(spec: ModelSpec, corpus: Corpus, cache: Cache, *, producers: Any = None, **kwargs: Any) -> ModelRun:
    """``runner.run_model`` with what the check families record from a loaded model (greedy continuations,
    the causality probe, tokenizer cases) unless ``producers`` says otherwise: the run a comparison makes,
    for notebooks and scripts (``from pytest_convdiff import run_model``)."""
    return runner.run_model(spec, corpus, cache, producers=checks.producers() if producers is None else producers,
                            **kwargs)


# --------------------------------------------------------------------------- bound-independent metrics

MEASUREMENTS = "measurements"  # the cache folder of the families' stored measurements


# --------------------------------------------------------------------------- evaluation


def _notes(a: ModelRun, b: ModelRun) -> list[str]:
    notes = []
    swap_info = b.meta.get("layer_swap") or {}
    if swap_info.get("error"):
        notes.append(f"layer swap (k={swap_info.get('k')}) not run: {swap_info['error']}")
    truncated = {**a.meta.get("truncated", {}), **b.meta.get("truncated", {})}
    if truncated:
        limit = a.meta.get("max_tokens") or b.meta.get("max_tokens")
        notes.append(f"prompts cut to {limit} tokens (the shorter model context, or --convdiff-max-tokens): "
                     + ", ".join(f"{k} (was {v} tokens)" for k, v in sorted(truncated.items())))
    return notes


def family_measurement_key(family: CheckFamily, spec_a: ModelSpec, spec_b: ModelSpec,
                           ctx: EvalContext | None = None) -> str:
    """A family's measurement is reused only for the same two models' contents and the same family code (and,
    for a family that runs the models, the same corpus and run settings)."""
    own = (family.measure.__module__,) if family.measure else ()
    parts: dict[str, Any] = {"family": family.name, "code": code_digest(own + family.code, family.libraries),
                             "a": [spec_a.fingerprint(), spec_a.resolved_backend(), spec_a.options],
                             "b": [spec_b.fingerprint(), spec_b.resolved_backend(), spec_b.options]}
    if family.needs_outputs and ctx is not None:
        parts["corpus"] = ctx.corpus.digest
        parts["settings"] = dict(ctx.settings.__dict__)
    if ctx is not None and ctx.settings.imatrix:  # the weights twin is made with it: its contents are an input
        parts["imatrix"] = _file_digest(ctx.settings.imatrix)
    if ctx is not None and ctx.settings.weights_twin != "auto":  # how much of it is made
        parts["weights_twin"] = ctx.settings.weights_twin
    return make_key(parts)


def token_record(spec: ModelSpec) -> dict[str, Any] | None:
    """A's special tokens and stop ids, as its backend's configuration reader gives them, for a golden reference to
    keep (config[special_tokens] and config[eog] then run in a replay); None when there is no reader."""
    from .backends import registry

    try:
        if not spec.can(sources.RUNS, sources.CONFIG):  # a stored source keeps its own record
            return None
        side = registry.get(spec.resolved_backend()).read_config(Path(spec.path), spec.options or {})
    except Exception:  # noqa: BLE001 - optional: without it those two items skip in a replay, saying why
        return None
    return {"special_tokens": side.get("special_tokens"), "stop_ids": side.get("stop_ids")}


def weights_sketch(spec: ModelSpec) -> tuple[dict[str, Any], np.ndarray] | str:
    """What a golden reference keeps of A's weights for the weights check to replay (``backends.replay``), or
    why it keeps nothing: only a checkpoint's safetensors are sketched (what the replay reads as A)."""
    from .backends import registry, replay, tensors

    if not spec.can(sources.TENSORS):
        return f"A was a {spec.kind().name}, which keeps no tensors"
    backend = registry.get(spec.resolved_backend())
    try:
        src = backend.open_weights(Path(spec.path), dict(spec.options or {}), "A")
        if not isinstance(src, tensors.SafetensorsWeights):
            src.close()
            return f"A was a {backend.name} model, whose weights are a {src.kind} file, not a checkpoint's safetensors"
        return replay.sketch_model(src)
    except tensors.WeightsUnreadable as exc:
        return str(exc)


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:  # the check reports the unreadable file; the key only has to differ
        return f"unreadable: {exc}"


def measure(family: CheckFamily, ctx: EvalContext, cache: Cache | None,
            worker: measure_worker.Worker | None = None) -> Any:
    """The family's bound-independent measurement: from the cache when stored, else the value of the ``worker``
    making it (``measure_worker``) when it gives one, else computed here; then stored."""
    key = family_measurement_key(family, ctx.spec_a, ctx.spec_b, ctx) if cache is not None else ""
    doc = cache.get_json(key, folder=MEASUREMENTS) if cache is not None else None
    if doc is not None and "value" in doc:
        if worker is not None:
            worker.cancel()
        return doc["value"]
    answered, value = worker.value() if worker is not None else (False, None)
    if not answered:
        value = family.measure(ctx)
    if cache is not None:
        cache.put_json(key, {"value": value, "family": family.name, "a": str(ctx.spec_a.path), "b": str(ctx.spec_b.path)},
                       folder=MEASUREMENTS)
    return value


def evaluate(a: ModelRun, b: ModelRun, corpus: Corpus, bounds: Any, *, pair_id: str = "",
             precision: str | None = None, pm: PairMetrics | None = None, cache: Cache | None = None,
             settings: RunSettings | None = None, plan: list[CheckId] | None = None,
             plan_families: dict[str, list[CheckId]] | None = None, baseline: BaselineConfig | None = None,
             measurements: dict[str, Any] | None = None, static: list[CheckResult] | None = None) -> PairResult:
    """Every check family's results for a pair whose two runs exist.

    ``bounds``: a ``Bounds`` (or a mapping of every bound name). ``pm``: the pair's metrics when already
    computed; else computed here (read from / stored in ``cache`` when one is given). ``measurements``: the
    families' measurements already made (filled in as they are made). ``static``: the results of the
    families that read only the files, made before the models ran with these bounds; kept, not redone.
    """
    if isinstance(bounds, Mapping) and not hasattr(bounds, "with_overrides"):
        from .core.bounds import Bounds

        bounds = Bounds(bounds)
    res = PairResult(pair_id, a.spec.path, b.spec.path, a.info.get("backend"), b.info.get("backend"),
                     precision_class=precision, bounds=bounds.to_dict(), info_a=a.info, info_b=b.info,
                     from_cache={"A": a.from_cache, "B": b.from_cache}, notes=_notes(a, b))
    ctx = EvalContext(a, b, corpus, bounds, settings or RunSettings(), res,
                      (lambda: pm) if pm is not None else (lambda: pair_metrics(a, b, corpus, cache)),
                      baseline=baseline, plan=plan, plan_families=plan_families, spec_a=a.spec, spec_b=b.spec,
                      measurements=measurements if measurements is not None else {},
                      measure_with=lambda f, c: measure(f, c, cache), cache=cache,
                      **quality_policy(a.spec, b.spec))
    res.checks = checks.evaluate_all(ctx, plan, done=static)
    return res


def quality_reported(spec_b: ModelSpec) -> bool:
    """Whether B's quality budgets are reported rather than judged by default: where B's backend makes twins
    (``backends.base.WEIGHTS_TWIN``: llama.cpp's quantiser, or the storage type's rounding, on A's tensors),
    correctness is judged against the twins, and the quality budgets (KL, NMSE, top-K, PPL, rfn against A) are
    reported unless the user sets them. An EXL2 model has no quantiser on the CPU to make its twin: its budgets
    still judge it (docs/twins.md)."""
    try:
        return spec_b.can(WEIGHTS_TWIN)
    except Exception:  # noqa: BLE001 - an unrecognisable B errors elsewhere
        return False


NO_WEIGHTS_WHY = ("A is a {}, which holds no weights to make twins from, so no bound comes from the files; these "
                  "are llama-perplexity's figures, to read against published ones")


def quality_policy(spec_a: Any, spec_b: ModelSpec) -> dict[str, Any]:
    """``EvalContext``'s ``quality_reported`` and ``quality_why`` for a pair: an A that gives scores and nothing
    else (a base file) has no weights or outputs to make twins from, so whatever B is, its quality budgets are
    reported unless the user sets them."""
    can = getattr(spec_a, "can", None)
    if can is not None and not can(sources.OUTPUTS):
        return {"quality_reported": True, "quality_why": NO_WEIGHTS_WHY.format(spec_a.kind().name)}
    return {"quality_reported": quality_reported(spec_b)}


def base_file_settings(settings: RunSettings) -> RunSettings:
    """What a run against a base file can produce: B's logits on the file's chunks; nothing that needs A's
    text, tokenizer or hidden states (tokenizer cases, causality probe, greedy continuations, layers)."""
    return replace(settings, hidden_states=False, tokenizer_cases=False, causality=False, greedy_tokens=0,
                   layer_swap=0, runtime_twin="off", max_tokens=None)


# --------------------------------------------------------------------------- the pipeline


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVDIFF_CACHE_DIR") or Path(tempfile.gettempdir()) / "convdiff-cache")


def error_result(pair_id: str, spec_a: ModelSpec, spec_b: ModelSpec, plan: list[CheckId], error: str) -> PairResult:
    """A pair that could not be run: the reason, and every planned check marked as errored by it."""
    res = PairResult(pair_id, spec_a.path, spec_b.path, _backend_or_none(spec_a), _backend_or_none(spec_b), error=error)
    res.checks = [CheckResult(c.name, c.param, None, None, ERROR, error) for c in plan]
    return res


def _backend_or_none(spec: ModelSpec) -> str | None:
    try:
        return spec.resolved_backend()
    except (ConvdiffError, ValueError):
        return None


@dataclass
class Comparison:
    """One A/B pair: plan, runs, metrics and evaluation, each done once.

    The families that read the model files (config, weights) are evaluated before any model loads,
    so a structural bug is reported in seconds, and still reported when a model cannot be run.
    """

    a: ModelSpec
    b: ModelSpec
    corpus: Corpus
    cache: Cache
    settings: RunSettings = field(default_factory=RunSettings)
    bound_overrides: dict[str, float] = field(default_factory=dict)
    pair_id: str = ""
    baseline: BaselineConfig | None = None
    save_reference: Path | None = None
    progress: Progress = quiet

    def __post_init__(self) -> None:
        self.pair_id = self.pair_id or pair_id(self.a.path, self.b.path)
        self._plan: dict[str, list[CheckId]] | None = None
        self._runs: tuple[ModelRun, ModelRun] | None = None
        self._metrics: PairMetrics | None = None
        self._measurements: dict[str, Any] = {}
        self._results: dict[tuple[tuple[str, float], ...], PairResult] = {}
        self._workers: dict[str, measure_worker.Worker] = {}  # file-only measurements under way elsewhere
        self._error: str | None = None
        self._stage = "starting"
        self._label = f"[{self.pair_id}] "
        self.static_only = False  # set when only checks that need no model outputs were selected
        kind_a = self.a.kind()
        if kind_a.corpus is not None:  # A fixes the corpus (a base file's chunks); B is scored on it, whole
            try:
                self.corpus = kind_a.corpus(self.a)
            except ConvdiffError as exc:
                self._error = str(exc)
            self.settings = base_file_settings(self.settings)

    # -- planning: no model is loaded
    def _probe(self, spec: ModelSpec) -> dict[str, Any]:
        try:
            return spec.probe().to_dict()
        except Exception:  # noqa: BLE001 - a model that cannot be probed errors readably when the pair runs
            return {}

    def plan_by_family(self) -> dict[str, list[CheckId]]:
        if self._plan is None:
            ctx = PlanContext(self.corpus, self._probe(self.a).get("num_layers"), self.settings, self.baseline,
                              self.a, self.b)
            self._plan = checks.plan_by_family(ctx)
        return self._plan

    def plan(self) -> list[CheckId]:
        return [cid for ids in self.plan_by_family().values() for cid in ids]

    def needs_outputs(self, selected: list[str]) -> bool:
        """Whether any of these check ids belongs to a family that needs the models run (``-k weights``
        or ``-k config`` alone then loads no model)."""
        wanted = set(selected)
        static = {f.name for f in checks.families() if not f.needs_outputs}
        return any(str(c) in wanted for name, ids in self.plan_by_family().items() if name not in static
                   for c in ids)

    # -- running: A, then B on A's token ids; each loaded only when its outputs are not stored
    def runs(self) -> tuple[ModelRun, ModelRun]:
        if self._runs is None:
            self._stage = "recognising the models"
            for spec in (self.a, self.b):  # a mistyped path fails now, not after A has run
                spec.resolved_backend()
            self.settings = (self._fits_chunks() if self.a.can(sources.OWN_CORPUS)
                             else self._fit_context(self.settings))
            self._stage = f"running model A ({self.a.path})"
            run_a = runner.run_model(self.a, self.corpus, self.cache, settings=self.settings, progress=self.progress,
                              label=self._label + "A ", producers=checks.producers())
            if self.save_reference is not None and run_a.base_file:  # a manifest's pair can get here too
                self.progress(f"{self._label}not saving a reference to {self.save_reference}: A is a llama-perplexity "
                              "base file, already a stored reference")
            elif self.save_reference is not None:
                from .store.reference import save_reference

                self._stage = f"saving the reference to {self.save_reference}"
                save_reference(run_a, self.save_reference, self.corpus, self.settings, weights_sketch(self.a),
                               token_record(self.a))
                self.progress(f"reference for {self.a.path} saved to {self.save_reference}")
            companions = self._companions(run_a)
            self._stage = f"running model B ({self.b.path})"
            run_b = runner.run_model(self.b, self.corpus, self.cache, feed=run_a, settings=self.settings,
                              progress=self.progress, label=self._label + "B ", producers=checks.producers(),
                              companions=companions)
            self._runs = (run_a, run_b)
        return self._runs

    def _companions(self, run_a: ModelRun) -> list[Any]:
        """Other runs of B that B's run over the corpus computes as well (the runtime twin's B), from the planned
        families that declare them; none when B's run is served from the cache, or when the cache is not read
        (``--convdiff-refresh``: the family's own run would not find them)."""
        if not self.cache.read or runner.run_cached(self.b, self.corpus, self.cache, feed=run_a, settings=self.settings,
                             producers=checks.producers()):
            return []
        plan = self.plan_by_family()
        out: list[Any] = []
        for family in checks.families():
            if family.companions is not None and plan.get(family.name):
                self._stage = f"preparing the {family.name} family's runs"
                out += family.companions(self.a, self.b, self.corpus, self.settings, self.cache,
                                         lambda msg: self.progress(self._label + msg))
        return out

    def _fit_context(self, settings: RunSettings) -> RunSettings:
        """Prompts longer than either model's context are cut to fit (and the report says so), rather than
        erroring the pair: a 2,048-context model still gets every check on the default corpus."""
        limits = [c for c in (self._probe(self.a).get("context_length"), self._probe(self.b).get("context_length"))
                  if isinstance(c, int) and c > 1]
        if not limits or (settings.max_tokens is not None and settings.max_tokens <= min(limits)):
            return settings
        return replace(settings, max_tokens=min(limits))

    def _fits_chunks(self) -> RunSettings:
        """B must take a base file's chunks whole: llama-perplexity scores each chunk's second half in context."""
        n_ctx, limit = self._probe(self.a).get("context_length"), self._probe(self.b).get("context_length")
        if isinstance(n_ctx, int) and isinstance(limit, int) and 1 < limit < n_ctx:
            raise ConvdiffError(f"{self.b.path}: its context is {limit} tokens, shorter than the chunks of "
                                f"{self.a.path} ({n_ctx} tokens); write the base file with a smaller -c.")
        return self.settings

    def metrics(self) -> PairMetrics:
        if self._metrics is None:
            run_a, run_b = self.runs()
            self._stage = "computing the pair's metrics"
            self._metrics = pair_metrics(run_a, run_b, self.corpus, self.cache)
        return self._metrics

    def _context(self, run_a: ModelRun | None, run_b: ModelRun | None, bounds: Any, res: PairResult) -> EvalContext:
        return EvalContext(run_a, run_b, self.corpus, bounds, self.settings, res, self.metrics,
                           baseline=self.baseline, plan=self.plan(), plan_families=self.plan_by_family(),
                           spec_a=self.a, spec_b=self.b, measurements=self._measurements,
                           measure_with=lambda f, c: measure(f, c, self.cache, self._workers.pop(f.name, None)),
                           cache=self.cache, **quality_policy(self.a, self.b))

    def _start_workers(self) -> None:
        """The planned file-only measurements that are neither made nor stored, each begun in a worker process
        (``measure_worker``) where that pays, to be read when its family is evaluated."""
        try:
            if self._error is not None or not measure_worker.worth_a_worker(self.a, self.b):
                return
            plan = self.plan_by_family()
            for family in checks.families():
                if (not family.measure_apart or not plan.get(family.name) or family.name in self._measurements
                        or family.name in self._workers):
                    continue
                ctx = measure_worker.context(self.a, self.b, self.settings, self.plan())
                if self.cache.get_json(family_measurement_key(family, self.a, self.b, ctx), folder=MEASUREMENTS):
                    continue
                worker = measure_worker.start(family.name, self.a, self.b, self.settings, self.plan())
                if worker is not None:
                    self._workers[family.name] = worker
        except Exception:  # noqa: BLE001 - only a head start: what fails here fails readably where the family measures
            return

    def _stop_workers(self) -> None:
        for worker in self._workers.values():
            worker.cancel()
        self._workers.clear()

    def _static(self, merged: dict[str, float]) -> tuple[PairResult, Bounds]:
        """The families that need no model outputs, with the bounds of the classes the files declare (the
        row every family of the pair is then judged with)."""
        info_a, info_b = self._probe(self.a), self._probe(self.b)
        cls, row = checks.default_bounds(info_a, info_b)
        bounds = row.with_overrides(merged)
        res = PairResult(self.pair_id, self.a.path, self.b.path, info_a.get("backend"), info_b.get("backend"),
                         precision_class=cls, bounds=bounds.to_dict(), info_a=info_a, info_b=info_b)
        res.checks = checks.evaluate_all(self._context(None, None, bounds, res), self.plan(), outputs=False)
        failing = [c.id for c in res.checks if c.outcome == FAILED]  # an unreadable file is the pair's error
        if failing:
            self.progress(f"{self._label}{len(failing)} check(s) fail before any model runs: "
                          + ", ".join(failing[:6]) + (" ..." if len(failing) > 6 else ""))
        return res, bounds

    # -- evaluation: every family, against the bounds in force
    def result(self, overrides: Mapping[str, float] | None = None) -> PairResult:
        """The pair's result with the default bounds of its precision class, the comparison's overrides and
        then ``overrides`` (narrowest wins). Never raises for a pair that cannot run: the result's
        ``error`` says why, the checks that read only the files keep their results, and every other
        planned check is an error."""
        merged = {**self.bound_overrides, **(overrides or {})}
        key = tuple(sorted(merged.items()))
        if key in self._results:
            return self._results[key]
        try:
            self._start_workers()
            static, bounds = self._static(merged)
        finally:
            self._stop_workers()  # any its families did not read (a pair whose planning failed)
        if self.static_only:
            self._results[key] = static
            return static
        if self._error is None:
            try:
                run_a, run_b = self.runs()
                self.metrics()
                self._stage = "evaluating the checks"
                # one bounds row per pair: the one the file-only checks were judged with
                res = evaluate(run_a, run_b, self.corpus, bounds, pair_id=self.pair_id,
                               precision=static.precision_class, pm=self._metrics, cache=self.cache,
                               settings=self.settings, plan=self.plan(), plan_families=self.plan_by_family(),
                               baseline=self.baseline, measurements=self._measurements, static=static.checks)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - a crash must error the pair, never pass it
                self._error = describe_failure(exc, self._stage)
        if self._error is not None:
            res = error_result(self.pair_id, self.a, self.b, self.plan(), self._error)
            kept = {c.id: c for c in static.checks}
            res.checks = [kept.get(c.id, c) for c in res.checks]
            res.info_a, res.info_b, res.precision_class = static.info_a, static.info_b, static.precision_class
        self._results[key] = res
        return res

    def close(self) -> None:
        """Let the runs go once the pair's items are done: their cache entries are no longer in use (the
        budget may evict them). A later ``result()`` with new bounds still works from what was measured;
        ``runs()`` reads the entries again when asked."""
        if self._runs is not None:
            for run in self._runs:
                release = getattr(run.entry, "release", None)
                if release is not None:
                    release()
        self._runs = None


def compare(model_a: str | os.PathLike[str] | ModelSpec, model_b: str | os.PathLike[str] | ModelSpec, *,
            corpus: Corpus | str | None = None, bounds: dict[str, float] | None = None,
            cache_dir: str | os.PathLike[str] | None = None, refresh: bool = False,
            settings: RunSettings | None = None, progress: Progress | None = None,
            pair_id: str | None = None, store: str | None = None, static_only: bool = False,
            imatrix: str | os.PathLike[str] | None = None) -> PairResult:
    """Run A and B (or read them from the cache) and evaluate every check.

    ``bounds``: overrides applied on top of the default row for the pair's precision class.
    ``store``: how A's outputs are cached, ``"compact"`` (the default) or ``"full"`` (as ``RunSettings.store``,
    which it overrides). A model that cannot be loaded gives a result with ``verdict == "error"`` and the reason
    in ``error``. ``static_only``: evaluate only the checks that read the model files (``config``,
    ``weights``), loading no model: a structural or metadata defect reported in seconds. ``imatrix``: the
    llama.cpp importance matrix B was quantised with (as ``RunSettings.imatrix``, which it overrides); an
    unreadable file raises ``ImatrixError`` before anything runs.
    """
    spec_a = model_a if isinstance(model_a, ModelSpec) else ModelSpec(str(model_a))
    spec_b = model_b if isinstance(model_b, ModelSpec) else ModelSpec(str(model_b))
    overrides = checks.parse_bound_mapping(dict(bounds or {}), "compare(bounds=...)") if bounds else {}
    settings = settings or RunSettings()
    if store is not None:
        settings = replace(settings, store=store)
    if imatrix is not None:
        settings = replace(settings, imatrix=str(imatrix))
    if settings.imatrix:
        from .backends.imatrix import read as read_imatrix

        read_imatrix(settings.imatrix)  # a bad file fails here, naming itself, before any model runs
    comparison = Comparison(
        spec_a, spec_b, corpus if isinstance(corpus, Corpus) else load_corpus(corpus),
        Cache(Path(cache_dir) if cache_dir else default_cache_dir(), read=not refresh),
        settings, overrides, pair_id or "", progress=progress or quiet)
    comparison.static_only = static_only
    return comparison.result()
