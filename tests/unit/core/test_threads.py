"""core.threads: each xdist worker takes its share of the cores, never fewer than one thread."""

from __future__ import annotations

import pytest

from pytest_convdiff.core import threads


@pytest.mark.parametrize(("cores", "workers", "expected"), [(2, None, 2), (2, "2", 1), (16, "4", 4), (2, "8", 1),
                                                             (6, "4", 1), (4, "not-a-count", 4)])
def test_a_worker_takes_its_share_of_the_cores(monkeypatch, cores, workers, expected):
    monkeypatch.setattr(threads, "cores", lambda: cores)
    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert threads.default_threads() == expected


def test_the_quantiser_uses_the_share(monkeypatch):
    from pytest_convdiff.backends import ggml

    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    assert ggml._threads() == 2  # private: the quantiser's pool size, read where it is used
