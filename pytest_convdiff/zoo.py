"""A set of pairs run together: the command line's A against each B, and a manifest's entries.

What the plugin's session holds besides pytest's own state, kept here so that it can be used (and
tested) without pytest: each pair's models and options validated against their backends, one
``Comparison`` per pair (made on first use), the GPU of an xdist worker, the reference to save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import sources
from .checks.base import BaselineConfig
from .comparison import Comparison
from .core.corpus import Corpus, load_corpus
from .core.settings import RunSettings
from .errors import ConvdiffError
from .runner import ModelSpec
from .store.cache import Cache

__all__ = ["PairSpec", "Zoo", "backend_options", "check_model", "gpu_for_worker", "manifest_pair", "on_gpu", "resolve_backend"]


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
class Zoo:
    pairs: list[PairSpec]
    corpus: Corpus
    settings: RunSettings
    bound_overrides: dict[str, float]
    cache: Cache
    save_reference: Path | None = None
    baseline: BaselineConfig | None = None
    gpu: int | None = None  # this worker's GPU under --convdiff-gpus
    manifest_pairs: list[PairSpec] = field(default_factory=list)
    comparisons: dict[str, Comparison] = field(default_factory=dict)

    def all_pairs(self) -> list[PairSpec]:
        return self.pairs + self.manifest_pairs

    def pair(self, pair_id: str) -> PairSpec:
        found = next((p for p in self.all_pairs() if p.id == pair_id), None)
        if found is None:
            raise ConvdiffError(f"no pair {pair_id!r} in this session (pairs: "
                                f"{', '.join(p.id for p in self.all_pairs()) or 'none'})")
        return found

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
            claimed = any(c.save_reference is not None for c in self.comparisons.values())
            save = self.save_reference if self.save_reference is not None and not claimed else None
            settings = replace(self.settings, imatrix=pair.imatrix) if pair.imatrix else self.settings
            self.comparisons[pair.id] = Comparison(
                pair.a, pair.b, pair.corpus or self.corpus, self.cache, settings,
                {**self.bound_overrides, **pair.bound_overrides}, pair.id, self.baseline, save, progress)
        return self.comparisons[pair.id]


def gpu_for_worker(worker_id: str, n_gpus: int) -> int | None:
    """``gw3`` with 2 GPUs -> 1; None for the controller or a run without xdist."""
    m = re.fullmatch(r"gw(\d+)", worker_id or "")
    return int(m.group(1)) % n_gpus if m and n_gpus > 0 else None


def on_gpu(spec: ModelSpec, gpu: int) -> ModelSpec:
    """The spec with its backend's device option set to ``gpu``, unless the user chose a device.
    The process environment (CUDA_VISIBLE_DEVICES) is left alone: it belongs to the user's tests too."""
    from .backends import device_options

    if sources.RUNS not in spec.kind().gives:  # stored outputs: nothing runs
        return spec
    backend = resolve_backend(spec.path, spec.backend)
    if backend is None:
        return spec
    return ModelSpec(spec.path, spec.backend, device_options(backend, gpu, dict(spec.options)))


def check_model(path: str, backend: str | None) -> None:
    """That ``path`` is a model some backend runs (the one named by ``backend`` when given) or a saved
    reference, checked from the files alone, before any model loads; ConvdiffError saying what it is and
    what is accepted."""
    from .backends import detect_backend, registry

    spec = ModelSpec(path, backend)
    if not Path(path).exists():
        detect_backend(path)  # the readable "no such file or directory" with what is accepted
    kind = spec.kind()
    if kind.check is not None:
        kind.check(path)  # a stored source's own check (a base file's header against its size)
    if sources.RUNS not in kind.gives:
        return
    if backend is None:
        detect_backend(path)
        return
    declared = registry.get(backend)
    if declared.detect is not None and not declared.detect(Path(path)):
        try:
            found = f"it looks like a {detect_backend(path)} model"
        except ConvdiffError as exc:
            found = str(exc)
        raise ConvdiffError(f"{path}: the {declared.name} backend was named for it, but it is not a model that "
                            f"backend runs ({found}). Name another backend, or let it be detected.")


def resolve_backend(path: str, backend: str | None) -> str | None:
    """The backend that will run ``path`` ("reference" for a saved reference), or None when it cannot be
    told yet (the pair then errors with the readable reason when it runs)."""
    try:
        return ModelSpec(path, backend).resolved_backend()
    except (ConvdiffError, ValueError):
        return None


def backend_options(option: str, raw: dict[str, Any], paths: list[str], backend: str | None) -> list[dict[str, Any]]:
    """Each model's typed options. A key must be known to the backend of at least one model on this side
    (else a ConvdiffError naming ``option`` and listing the valid keys); each model gets the keys its own
    backend knows."""
    from .backends.options import validate_options

    resolved = [resolve_backend(p, backend) for p in paths]
    known = {b for p, b in zip(paths, resolved, strict=True)  # stored outputs take no options
             if b and sources.RUNS in ModelSpec(p, backend).kind().gives}
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
                    raise ConvdiffError(f"{option}: {exc}") from None
        typed[b] = per
    for key in raw:
        if known and all(key not in typed[b] for b in known):
            raise ConvdiffError(f"{option}: {errors.get(key, key)}")
    return [typed.get(b, dict(raw)) if b else dict(raw) for b in resolved]


def manifest_pair(entry: Any, source: Path, bound_overrides: dict[str, float]) -> PairSpec:
    """A manifest entry (``manifest.ManifestEntry``) as a pair, its corpus, importance matrix and backend
    options checked now; a ConvdiffError names the manifest and the entry."""
    where = f"{source}, pair {entry.id!r}"
    for key, path, backend in (("model_a", entry.model_a, entry.backend_a), ("model_b", entry.model_b, entry.backend_b)):
        try:
            check_model(path, backend)
        except ConvdiffError as exc:
            raise ConvdiffError(f"{where}: {key}: {exc}") from None
    corpus = load_corpus(entry.corpus) if entry.corpus else None
    if entry.imatrix:
        from .backends.imatrix import read as read_imatrix

        try:
            read_imatrix(entry.imatrix)
        except ConvdiffError as exc:
            raise ConvdiffError(f"{where}: imatrix: {exc}") from None
    (options_a,) = backend_options(f"{where}: options_a", entry.options_a, [entry.model_a], entry.backend_a)
    (options_b,) = backend_options(f"{where}: options_b", entry.options_b, [entry.model_b], entry.backend_b)
    return PairSpec(entry.id, ModelSpec(entry.model_a, entry.backend_a, options_a),
                    ModelSpec(entry.model_b, entry.backend_b, options_b), tuple(entry.marks),
                    {**bound_overrides, **entry.bounds}, corpus, str(source), entry.imatrix)
