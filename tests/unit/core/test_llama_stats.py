"""llama-perplexity's statistics against values worked out by hand."""

import math

import numpy as np
import pytest

from pytest_convdiff.core import llama_stats as ls


def test_row_width_pads_the_vocabulary_to_even_after_four_header_values():
    assert ls.row_width(4) == 8 and ls.row_width(5) == 10 and ls.row_width(1) == 6


def test_a_flat_row_has_scale_zero_and_decodes_to_log_one_over_v():
    rows = ls.encode_rows(np.zeros((1, 2), dtype=np.float32))
    head = rows[:, :4].view(np.float32)
    assert head[0, 0] == 0 and head[0, 1] == pytest.approx(-math.log(2), rel=1e-6)
    assert np.allclose(ls.decode_rows(rows, 2), -math.log(2), rtol=1e-6)


def test_entries_16_nats_below_the_top_are_clamped_to_the_floor_and_the_top_decodes_exactly():
    rows = ls.encode_rows(np.array([[0.0, -16.0, -20.0]], dtype=np.float32))
    assert rows[0, 4:7].tolist() == [65535, 0, 0] and rows[0, 7] == 0  # the padding entry stays 0
    lse = math.log(1 + math.exp(-16) + math.exp(-20))
    dec = ls.decode_rows(rows, 3)[0]
    assert dec[0] == pytest.approx(-lse, abs=1e-6) and dec[1] == dec[2] == pytest.approx(-16 - lse, abs=1e-5)


def test_encoding_rounds_to_the_nearest_step_of_range_over_65535():
    x = np.array([[0.0, -1.0, -8.0, -16.0]], dtype=np.float32)
    step = 16.0 / 65535
    q = ls.encode_rows(x)[0, 4:8]
    assert q.tolist() == [65535, round(15 / step), round(8 / step), 0]
    assert np.allclose(ls.decode_rows(ls.encode_rows(x), 4)[0, :3] - ls.decode_rows(ls.encode_rows(x), 4)[0, 0],
                       [0.0, -1.0, -8.0], atol=step)


def test_one_token_scored_by_hand():
    base = ls.encode_rows(np.zeros((1, 2), dtype=np.float32))  # p_base = (1/2, 1/2)
    q = np.array([[math.log(3), 0.0]], dtype=np.float32)  # p_Q = (3/4, 1/4)
    s = ls.score_rows(base, q, np.array([1]))
    assert s.kld[0] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)  # 1/2 ln(2/3) + 1/2 ln 2
    assert s.nll[0] == pytest.approx(math.log(4), rel=1e-6) and s.nll_base[0] == pytest.approx(math.log(2), rel=1e-6)
    assert s.p_diff[0] == pytest.approx(-0.25, abs=1e-6)
    assert bool(s.same_top[0])  # both argmaxes are entry 0 (a tie in the base goes to the first, as in llama.cpp)


def test_base_entries_at_or_below_minus_16_do_not_count_towards_kl():
    base = ls.encode_rows(np.array([[0.0, -30.0]], dtype=np.float32))
    q = np.array([[0.0, 5.0]], dtype=np.float32)  # Q puts most mass on the entry the base file cannot see
    s = ls.score_rows(base, q, np.array([0]))
    p0_base = 1 / (1 + math.exp(-16))  # the base's entry 1 decodes at the floor, -16 below entry 0
    assert s.kld[0] == pytest.approx(p0_base * (math.log(p0_base) - (0 - math.log(1 + math.exp(5)))), rel=1e-4)
    assert not s.same_top[0]


def test_scores_refuse_mismatched_shapes_and_tokens_outside_the_vocabulary():
    base = ls.encode_rows(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="2 base rows for 1 rows"):
        ls.score_rows(base, np.zeros((1, 3), dtype=np.float32), np.array([0]))
    with pytest.raises(ValueError, match="outside the vocabulary of 3"):
        ls.score_rows(base, np.zeros((2, 3), dtype=np.float32), np.array([0, 3]))


def test_mean_and_error_is_a_standard_error_and_zero_for_ten_values_or_fewer():
    v = np.arange(1, 12, dtype=float)  # mean 6, population variance 10, n - 1 = 10
    assert ls.mean_and_error(v.sum(), (v * v).sum(), 11) == pytest.approx((6.0, 1.0))
    w = v[:10]
    assert ls.mean_and_error(w.sum(), (w * w).sum(), 10) == (pytest.approx(5.5), 0.0)


def test_percentiles_interpolate_at_fraction_times_n_minus_one():
    v = np.arange(5, dtype=np.float32)
    assert ls.percentile(v, 0.999) == pytest.approx(3.996, rel=1e-5)
    assert ls.percentile(v, 0.1) == pytest.approx(0.4, rel=1e-5)
    assert ls.percentile(v, 0.0) == 0 and ls.percentile(v, 1.0) == 4


def test_statistics_of_known_per_token_values():
    n = 20
    rng = np.random.default_rng(0)
    nll, nll_base = rng.uniform(1, 3, n), rng.uniform(1, 3, n)
    kld, dp = rng.uniform(0, 0.1, n), rng.uniform(-0.1, 0.1, n)
    same = np.arange(n) % 4 != 0  # 15 of 20
    sums = ls.Sums()
    sums.add(ls.TokenScores(nll[:7], nll_base[:7], kld[:7], dp[:7], same[:7]))  # in two parts: sums add up
    sums.add(ls.TokenScores(nll[7:], nll_base[7:], kld[7:], dp[7:], same[7:]))
    st = sums.stats()
    se = lambda x: math.sqrt(x.var() / (n - 1))  # noqa: E731  (population variance / (n - 1))
    assert st.count == n and st.kld_mean == pytest.approx(kld.mean()) and st.kld_err == pytest.approx(se(kld))
    assert st.ppl_q == pytest.approx(math.exp(nll.mean())) and st.ppl_q_err == pytest.approx(st.ppl_q * se(nll))
    cov = (np.mean(nll * nll_base) - nll.mean() * nll_base.mean()) / (n - 1)
    ln_err = math.sqrt(se(nll) ** 2 + se(nll_base) ** 2 - 2 * cov)
    assert st.ln_ppl_ratio == pytest.approx(nll.mean() - nll_base.mean())
    assert st.ln_ppl_ratio_err == pytest.approx(ln_err)
    assert st.ppl_ratio_err == pytest.approx(math.exp(nll.mean() - nll_base.mean()) * ln_err)
    assert st.ln_ppl_correlation == pytest.approx(np.corrcoef(nll, nll_base)[0, 1])  # Pearson r
    rms = math.sqrt(np.mean(dp ** 2))
    assert st.rms_p_diff == pytest.approx(rms) and st.rms_p_diff_err == pytest.approx(0.5 / rms * se(dp ** 2))
    assert st.same_top == 0.75 and st.same_top_err == pytest.approx(math.sqrt(0.75 * 0.25 / 19))
    assert st.kld_quantiles["max"] == pytest.approx(kld.max(), rel=1e-6)
    assert st.kld_quantiles["median"] == pytest.approx(np.median(kld), rel=1e-6)
    assert st.p_diff_quantiles["min"] == pytest.approx(dp.min(), rel=1e-6)
    assert ls.PerplexityStats.from_dict(st.to_dict()) == st


def test_the_report_has_llama_perplexitys_lines_and_units():
    sums = ls.Sums()
    sums.add(ls.TokenScores(np.full(12, 2.0), np.full(12, 2.0), np.full(12, 0.01), np.full(12, 0.02),
                            np.ones(12, dtype=bool)))
    text = "\n".join(sums.stats().report())
    for line in ("Mean    KLD:   0.010000 ±   0.000000", "RMS Δp    :  2.000 ± 0.000 %",
                 "Same top p: 100.000 ± 0.000 %", "Mean PPL(Q)/PPL(base)         :   1.000000", "99.9%   KLD:"):
        assert line in text
    with pytest.raises(ValueError, match="too few"):
        ls.Sums().stats()


def test_the_pipelines_logit_metrics_carry_the_same_statistics_as_scoring_a_base_file():
    """The plugin's pair metrics (A as base, B as Q) and a base-file scoring of the same logits agree:
    one definition, whichever way the logits arrive (KL differs only by the base file's 16-nat floor
    and its uint16 steps, far below the tolerance here)."""
    from pytest_convdiff.core import metrics

    rng = np.random.default_rng(3)
    t, v = 60, 50
    a = rng.normal(0, 2, size=(t, v)).astype(np.float32)
    b = (a + rng.normal(0, 0.3, size=(t, v))).astype(np.float32)
    tokens = rng.integers(0, v, size=t)
    acc = metrics.LogitAccumulator()
    acc.update("p", a, b, tokens.tolist(), chunk=17)  # chunked: the rows must line up with their targets
    lp = acc.result().llama
    s = ls.Sums()
    s.add(ls.score_rows(ls.encode_rows(a[:-1]), b[:-1], tokens[1:]))
    st = s.stats()
    assert lp["count"] == st.count == t - 1
    for key in ("kld_mean", "ppl_ratio", "rms_p_diff", "same_top", "ppl_q", "ppl_base", "ln_ppl_ratio_err"):
        assert lp[key] == pytest.approx(getattr(st, key), rel=2e-3), key
