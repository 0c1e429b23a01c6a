"""The weights measurement in a worker process (``measure_worker``): the same value as in this process, used only
where it can pay for its start, and never a lost or wrong result when the worker fails."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pytest_convdiff import compare, measure_worker
from pytest_convdiff.checks import weights
from pytest_convdiff.comparison import Comparison
from pytest_convdiff.core import threads
from pytest_convdiff.core.corpus import load_corpus
from pytest_convdiff.runner import ModelSpec, RunSettings
from pytest_convdiff.store.cache import Cache

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "fixtures" / "models" / "tiny-llama"
GGUF = ROOT / "fixtures" / "models" / "gguf"

pytest.importorskip("gguf")


@pytest.fixture
def files() -> tuple[Path, Path, Path]:
    b, defect = GGUF / "tiny-f16.gguf", GGUF / "tiny-no-permute.gguf"
    if not (TINY.is_dir() and b.is_file() and defect.is_file()):
        pytest.skip("the tiny fixtures are not built (python -m fixtures.build)")
    return TINY, b, defect


@pytest.fixture
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers for the tiny files too, on a share of two cores whatever this machine has."""
    monkeypatch.setattr(measure_worker, "WORKER_MIN_BYTES", 0)
    monkeypatch.setattr(threads, "default_threads", lambda: 2)


def _plan(a: Path, b: Path, cache: Path) -> list:
    return Comparison(ModelSpec(str(a)), ModelSpec(str(b)), load_corpus(None), Cache(cache), RunSettings()).plan()


@pytest.fixture
def measured_here(request: pytest.FixtureRequest):
    """Replace the weights family's ``measure`` in this process (the family is frozen: set and put back)."""
    real = weights.FAMILY.measure
    request.addfinalizer(lambda: object.__setattr__(weights.FAMILY, "measure", real))

    def replace(fn):
        object.__setattr__(weights.FAMILY, "measure", fn)
        return real

    return replace


@pytest.mark.parametrize("which", ["correct", "defect"])
def test_the_workers_value_is_the_measurement_made_here(files, which: str, tmp_path: Path) -> None:
    a, good, defect = files
    b = good if which == "correct" else defect
    spec_a, spec_b, settings = ModelSpec(str(a)), ModelSpec(str(b)), RunSettings()
    plan = _plan(a, b, tmp_path)
    assert any(c.name == "weights" for c in plan)
    worker = measure_worker.start("weights", spec_a, spec_b, settings, plan)
    assert worker is not None
    answered, value = worker.value()
    assert answered
    here = weights.measure(measure_worker.context(spec_a, spec_b, settings, plan))
    assert _timeless(value) == _timeless(here)


def _timeless(value: dict) -> str:
    """The measurement as JSON, without the time it took."""
    return json.dumps({k: v for k, v in value.items() if k != "seconds"}, sort_keys=True, default=str)


def _static(a: Path, b: Path, cache: Path) -> dict[str, str]:
    res = compare(a, b, cache_dir=cache, static_only=True)
    return {c.id: c.outcome for c in res.checks if c.name == "weights"}


def test_a_comparison_reads_the_workers_value(files, any_size, measured_here, tmp_path: Path) -> None:
    a, _, defect = files
    expected = _static(a, defect, tmp_path / "here")
    assert "failed" in expected.values() and "passed" in expected.values()

    def not_here(ctx):  # measured in this process, the pair's weights items would be errors
        raise AssertionError("measured in this process")

    measured_here(not_here)
    assert _static(a, defect, tmp_path / "apart") == expected


@pytest.mark.parametrize("boot", ["import sys; sys.exit(3)", "import sys; sys.stdout.write('not a reply')",
                                  "import pickle, sys; sys.stdout.buffer.write(pickle.dumps({'family': 'config', "
                                  "'value': {}}))"])
def test_a_worker_that_gives_nothing_leaves_the_measurement_to_this_process(files, any_size, monkeypatch, measured_here,
                                                                           tmp_path: Path, boot: str) -> None:
    a, _, defect = files
    expected = _static(a, defect, tmp_path / "here")
    monkeypatch.setattr(measure_worker, "_BOOT", boot)
    calls = []

    def counted(ctx):
        calls.append(1)
        return real(ctx)

    real = measured_here(counted)
    assert _static(a, defect, tmp_path / "fallback") == expected
    assert calls == [1]


def test_a_stored_measurement_starts_no_worker(files, any_size, monkeypatch, tmp_path: Path) -> None:
    a, b, _ = files
    _static(a, b, tmp_path / "c")
    started = []
    monkeypatch.setattr(measure_worker, "start", lambda *args: started.append(args))
    _static(a, b, tmp_path / "c")
    assert started == []


def test_workers_only_where_they_can_pay(files, monkeypatch) -> None:
    a, b, _ = files
    spec_a, spec_b = ModelSpec(str(a)), ModelSpec(str(b))
    small = measure_worker.file_bytes(spec_a) + measure_worker.file_bytes(spec_b)
    assert 0 < small < measure_worker.WORKER_MIN_BYTES  # the tiny files: measured here
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    assert not measure_worker.worth_a_worker(spec_a, spec_b)
    monkeypatch.setattr(measure_worker, "WORKER_MIN_BYTES", small)
    assert measure_worker.worth_a_worker(spec_a, spec_b)
    monkeypatch.setattr(threads, "default_threads", lambda: 1)  # pytest -n 2 on two cores: no idle core
    assert not measure_worker.worth_a_worker(spec_a, spec_b)


def test_a_worker_not_read_is_stopped(files, monkeypatch) -> None:
    a, b, _ = files
    monkeypatch.setattr(measure_worker, "_BOOT", "import time; time.sleep(60)")
    worker = measure_worker.start("weights", ModelSpec(str(a)), ModelSpec(str(b)), RunSettings(), None)
    assert worker is not None
    t = time.perf_counter()
    worker.cancel()
    assert worker.proc.poll() is not None and time.perf_counter() - t < 10


def test_options_that_cannot_reach_a_worker_start_none(files) -> None:
    a, b, _ = files
    spec_b = ModelSpec(str(b), options={"hook": lambda: 0})  # a notebook's callable, say
    assert measure_worker.start("weights", ModelSpec(str(a)), spec_b, RunSettings(), None) is None
