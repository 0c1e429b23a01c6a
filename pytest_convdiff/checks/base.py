"""What a check family is, and the helpers every family uses to judge a value against a bound.

A family is one module in ``pytest_convdiff.checks`` with a module-level ``FAMILY``: its name,
its order in the report, the bounds it declares (name, direction, default per precision class),
``plan`` (the items it will produce, known before any model runs, so pytest can collect them)
and ``evaluate`` (one result per planned item, with its message). Nothing else in the project
lists checks: the registry (``checks/__init__.py``) discovers the modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import sources
from ..core.bounds import Bounds, BoundSpec
from ..core.results import (
    BUDGET,
    CORRECTNESS,
    FAILED,
    LOWER,
    PASSED,
    SKIPPED,
    UPPER,
    CheckId,
    CheckResult,
    PairResult,
)

if TYPE_CHECKING:
    from ..core.corpus import Corpus
    from ..core.settings import RunSettings
    from ..pair import PairMetrics
    from ..store.run import ModelRun

OVERRIDE_HINT = ("Change it with --convdiff-bound {name}=VALUE, the convdiff_bounds ini option, or "
                 "@pytest.mark.convdiff_bounds({name}=VALUE).")

__all__ = ["BUDGET", "CORRECTNESS", "LOWER", "UPPER", "BaselineConfig", "CheckFamily", "EvalContext",
           "PlanContext", "fmt", "judge", "per_class", "result", "skipped"]


@dataclass
class BaselineConfig:
    """Regression mode: the baseline file, how much worse is allowed, and whether to rewrite it."""

    path: Any  # pathlib.Path
    tolerances: dict[str, tuple[str, float]]
    update: bool = False


@dataclass
class PlanContext:
    """What planning may know: nothing that needs a model loaded (probes read headers and configs)."""

    corpus: Corpus
    num_layers: int | None
    settings: RunSettings
    baseline: BaselineConfig | None = None
    spec_a: Any = None  # runner.ModelSpec, for families whose items depend on the files (tensors, fields)
    spec_b: Any = None


@dataclass
class EvalContext:
    """What evaluation gets: both runs (None for a family that needs no outputs), the corpus, the
    bounds in force, the pair's metrics (computed once per pair, lazily), each family's measurement
    (``measurement(family)``, kept in ``measurements``), and the pair result that families annotate (layers, metrics, notes).

    ``spec_a``/``spec_b`` name the models (path, backend, options) for families that read the model
    files themselves (config, weights): they run before any model is loaded.
    """

    a: ModelRun | None
    b: ModelRun | None
    corpus: Corpus
    bounds: Bounds
    settings: RunSettings
    result: PairResult
    pair_metrics_fn: Callable[[], PairMetrics]
    baseline: BaselineConfig | None = None
    plan: list[CheckId] | None = None  # what was collected; families answer every planned item of theirs
    plan_families: dict[str, list[CheckId]] | None = None  # the same, by family
    specs: dict[str, BoundSpec] = field(default_factory=dict)
    spec_a: Any = None  # runner.ModelSpec
    spec_b: Any = None
    measurements: dict[str, Any] = field(default_factory=dict)
    measure_with: Callable[[CheckFamily, EvalContext], Any] | None = None  # cached measurement (Comparison)
    # True where B's correctness is judged against twins (a GGUF or transformers B), or where A is a base file
    # (no twin can be made from one): quality budgets that the user did not set are reported, not judged, and
    # ``quality_why`` says why. False for a backend without twins (EXL2) against a model A.
    quality_reported: bool = False
    quality_why: str = "correctness is judged against the twins"
    cache: Any = None  # store.cache.Cache: where a family that runs models itself (runtime) keeps their outputs
    _metrics: PairMetrics | None = None

    def measurement(self, family: CheckFamily) -> Any:
        """The family's measurement (made once per pair; an exception it raised is raised again)."""
        if family.name not in self.measurements:
            try:
                fn = self.measure_with or (lambda f, c: f.measure(c))
                self.measurements[family.name] = fn(family, self)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - stored: the family's items report it
                self.measurements[family.name] = exc
        value = self.measurements[family.name]
        if isinstance(value, Exception):
            raise value
        return value

    def planned(self, name: str) -> list[CheckId]:
        return [c for c in self.plan or [] if c.name == name]

    @property
    def pair_metrics(self) -> PairMetrics:
        if self._metrics is None:
            self._metrics = self.pair_metrics_fn()
        return self._metrics


@dataclass
class Findings:
    """A family's item results plus what it found about the pair as a whole, which the pair result
    assembles (``checks.evaluate_all``): families return these instead of writing into the shared result.

    ``metrics``: the logit summary the report shows (``PairResult.metrics``); ``layers``: the per-layer
    table (``PairResult.layers``); ``divergence``: a candidate first divergent layer and its sub-block
    (the earliest candidate of all families wins); ``baseline_rfn``: the stored per-layer rfn a baseline
    compares with (drawn beside the current curve).
    """

    checks: list[CheckResult]
    metrics: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None
    divergence: tuple[int, str | None] | None = None
    baseline_rfn: list[Any] | None = None

    def assemble_into(self, res: PairResult) -> None:
        if self.metrics is not None:
            res.metrics = self.metrics
        if self.layers is not None:
            res.layers = self.layers
        if self.baseline_rfn is not None:
            res.baseline_rfn = self.baseline_rfn
        if self.divergence is not None and (res.first_divergent_layer is None
                                            or self.divergence[0] < res.first_divergent_layer):
            res.first_divergent_layer, res.divergent_sublayer = self.divergence


@dataclass(frozen=True)
class CheckFamily:
    """One check family.

    ``needs_outputs=False``: the family reads the model files (``ctx.spec_a``/``spec_b``), not the runs,
    and is evaluated before any model loads (a structural bug is reported in seconds, and still when
    a model cannot be run). ``measure``: the family's costly, bound-independent part (e.g. per-tensor
    errors); its JSON-serialisable result is computed once per pair, stored in the cache keyed by both
    models' contents and the code that measured it, and handed to ``evaluate`` as ``ctx.measurement(family)``.
    ``produce``: data the family needs from a loaded model beyond the corpus outputs (greedy continuations,
    a causality probe), recorded by the runner while the model is loaded and read from the runs' ``meta``.
    ``code`` names the modules ``measure`` depends on besides its own, ``libraries`` the distributions
    (``core.code_version``): editing one, or upgrading one, recomputes the measurement.
    """

    name: str
    order: int  # place in the plan and the report
    plan: Callable[[PlanContext], list[CheckId]]
    evaluate: Callable[[EvalContext], list[CheckResult] | Findings]
    bounds: Sequence[BoundSpec] = ()
    doc: str = ""
    needs_outputs: bool = True
    measure: Callable[[EvalContext], Any] | None = None
    # a measurement made only when ``evaluate`` asks for it (``ctx.measurement``), not before every evaluation:
    # a model run that only some pairs need (the position family's twin over the long prompts)
    measure_lazily: bool = False
    # a measurement that reads only the two files (``ctx.spec_a``, ``spec_b``, ``settings`` and ``plan``): it may be
    # made in a worker process while this one reads the configuration (``measure_worker``)
    measure_apart: bool = False
    code: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    # what the family records from a loaded model besides its outputs (``runner.Producer``): ``produce``'s
    # value lands in the run's ``meta[produce_key]`` when ``produce_when(settings)``
    produce: Callable[[Any], Any] | None = None
    produce_key: str = ""
    produce_when: Callable[[Any], bool] = lambda settings: True
    # token prefixes ``produce`` continues from (``backends.base.PrefixKeeper``), given (A's run or None, the
    # corpus): the runner asks the backend to keep its state after them while it runs the corpus
    produce_prefixes: Callable[[Any, Any], list[list[int]]] | None = None
    # what model A must give for the family to judge anything (``sources``' vocabulary): most families read A's
    # run over the corpus; those that need only B's scored log-probabilities (``sources.SCORES``) are judged
    # against a llama-perplexity base file too, which gives nothing else
    reads: frozenset[str] = frozenset({sources.OUTPUTS})
    # other runs of model B that B's run over the corpus computes as well (``runner.Companion``): called with
    # (spec_a, spec_b, corpus, settings, cache, progress) just before B runs, after A; what the family needs
    # run first (the runtime twin's T) runs there
    companions: Callable[..., list[Any]] | None = None


def per_class(float_: float, bf16: float, q8: float, q5_6: float, q4: float, q2_3: float) -> dict[str, float]:
    """A bound's defaults, one per precision class, most precise first (core.bounds.PRECISION_CLASSES)."""
    return {"float": float_, "bf16": bf16, "q8": q8, "q5-6": q5_6, "q4": q4, "q2-3": q2_3}


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4g}"


def result(cid: CheckId, value: float | None, ok: bool, message: str, *, kind: str = CORRECTNESS,
           details: dict[str, Any] | None = None) -> CheckResult:
    """An exact check (no bound to change): passed or failed as ``ok`` says."""
    return CheckResult(cid.name, cid.param, value, 0.0 if value is not None else None, PASSED if ok else FAILED,
                       message, details or {}, None, kind)


def skipped(cid: CheckId, why: str, *, threshold: float | None = None, kind: str = CORRECTNESS) -> CheckResult:
    return CheckResult(cid.name, cid.param, None, threshold, SKIPPED, why, {}, None, kind)


def judge(ctx: EvalContext, cid: CheckId, bound: str, value: float, what: str, extra: str = "", *,
          kind: str = BUDGET, details: dict[str, Any] | None = None) -> CheckResult:
    """``value`` against the bound named ``bound``, in that bound's declared direction.

    The message has the shape of torch.testing.assert_close: what was compared, the value, the bound,
    where it is worst (``extra``), and how to change the bound.
    """
    spec = ctx.specs[bound]
    limit = ctx.bounds[bound]
    rel = "<=" if spec.direction == UPPER else ">="
    # a NaN or Inf is never quality: it is judged (and fails) whoever set the bound
    if kind == BUDGET and ctx.quality_reported and not ctx.bounds.is_user_set(bound) and math.isfinite(value):
        msg = (f"{what}: {fmt(value)} (quality, reported: {ctx.quality_why}; a "
               f"bound set with --convdiff-bound {bound}=VALUE judges it; the default row's {fmt(limit)} is "
               f"not applied)" + (f"\n{extra}" if extra else ""))
        return CheckResult(cid.name, cid.param, value, None, PASSED, msg, {**(details or {}), "reported": True,
                                                                          "default_bound": limit},
                           spec.direction, kind)
    ok = spec.ok(value, limit)
    if ok:
        msg = f"{what}: {fmt(value)} {rel} {fmt(limit)}"
    else:
        side = "above" if spec.direction == UPPER else "below"
        msg = (f"{what} is {fmt(value)}, {side} the bound {fmt(limit)}."
               + (f"\n{extra}" if extra else "") + "\n" + OVERRIDE_HINT.format(name=bound))
    return CheckResult(cid.name, cid.param, value, limit, PASSED if ok else FAILED, msg, details or {},
                       spec.direction, kind)
