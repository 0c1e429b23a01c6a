"""``position[*]``: growth with position, and the share of it that B's weights show run by A's own code."""

from __future__ import annotations

import math

import pytest

from pytest_convdiff.checks.position import growth


def _profile(values: list[float], positions: tuple[int, ...] = (64, 192, 768, 2000)) -> list[dict]:
    spans = ((0, 64, "0-64"), (64, 256, "64-256"), (256, 1024, "256-1k"), (1024, 4096, "1k-4k"))
    return [{"bucket": name, "start": lo, "stop": hi, "positions": n, "rfn": v}
            for (lo, hi, name), n, v in zip(spans, positions, values, strict=False)]


def test_growth_is_a_later_bucket_over_the_position_weighted_early_level():
    # early level: (0.01 * 64 + 0.02 * 192) / 256 = 0.0175; worst later bucket 0.07 / 0.0175 = 4
    worst, where, level = growth(_profile([0.01, 0.02, 0.035, 0.07]), "rfn", floor=0.001)
    assert level == pytest.approx(0.0175) and where == "1k-4k" and worst == pytest.approx(4.0)
    # a floor above the early level: 0.07 / 0.035 = 2
    assert growth(_profile([0.01, 0.02, 0.035, 0.07]), "rfn", floor=0.035)[0] == pytest.approx(2.0)


def test_the_twins_growth_divides_each_bucket_and_never_raises_it():
    b = _profile([0.01, 0.02, 0.035, 0.07])  # 256-1k: 2.0, 1k-4k: 4.0 over the early level
    # the twin grows 1.6x at 256-1k and 3.2x at 1k-4k (early level 0.0025): B adds 1.25x in both
    twin = _profile([0.002, 0.002666667, 0.004, 0.008])
    worst, where, _ = growth(b, "rfn", 0.001, twin)
    assert worst == pytest.approx(1.25, rel=1e-3) and where in ("256-1k", "1k-4k")
    # a twin whose error shrinks with position relaxes nothing: B's own growth stands
    assert growth(b, "rfn", 0.001, _profile([0.01, 0.01, 0.005, 0.004]))[0] == pytest.approx(4.0)
    # a bucket the twin lacks keeps B's own ratio there
    worst, where, _ = growth(b, "rfn", 0.001, _profile([0.002, 0.002666667, 0.004])[:3])
    assert where == "1k-4k" and worst == pytest.approx(4.0)


def test_no_early_level_is_no_verdict():
    worst, where, _ = growth([{"bucket": "1k-4k", "start": 1024, "stop": 4096, "positions": 10, "rfn": 0.1}],
                             "rfn", 0.001)
    assert where is None and math.isnan(worst)
