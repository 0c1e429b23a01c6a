"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_convdiff.core import metrics


def test_nmse_matches_hand_computation():
    # mse = 1/4, var(ref) = 1.25  ->  0.2
    assert metrics.nmse(np.array([1, 2, 3, 4.0]), np.array([1, 2, 3, 5.0])) == pytest.approx(0.2)
    assert metrics.nmse_db(0.2) == pytest.approx(-6.98970004)
    assert metrics.nmse(np.ones(3), np.ones(3)) == 0.0
    assert metrics.nmse(np.ones(3), np.array([1, 1, 2.0])) == math.inf


@pytest.mark.parametrize(("value", "label"), [
    (0.0, "perfect match"), (5e-7, "essentially identical"), (5e-5, "excellent match"),
    (5e-4, "very good match"), (5e-3, "good match"), (5e-2, "acceptable match"), (0.5, "poor match"),
    (2.0, "very poor match"), (math.nan, "not a number"),
])
def test_nmse_labels_follow_llama_cpp_scale(value, label):
    assert metrics.nmse_label(value) == label


def test_kl_divergence_hand_value():
    # P = (1/2, 1/2), Q = (3/4, 1/4): KL = 1/2 ln(4/3)
    kl = metrics.kl_per_position(np.array([[0.0, 0.0]]), np.array([[math.log(3.0), 0.0]]))
    assert kl[0] == pytest.approx(0.5 * math.log(4 / 3))
    assert metrics.kl_per_position(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]]))[0] == pytest.approx(0.0)


def test_topk_ordered_and_overlap():
    ref = np.array([[3.0, 2.0, 1.0, 0.0]])
    test = np.array([[3.0, 1.0, 2.0, 0.0]])
    assert metrics.topk_agreement(ref, test, 1)[0][0] == 1.0
    ordered, overlap = metrics.topk_agreement(ref, test, 2)
    assert (ordered[0], overlap[0]) == (0.0, 0.5)
    ordered, overlap = metrics.topk_agreement(ref, test, 3)
    assert (ordered[0], overlap[0]) == (0.0, 1.0)


def test_rfn_hand_value():
    assert metrics.rfn(np.array([[3.0, 4.0]]), np.array([[3.0, 5.0]])) == pytest.approx(0.2)


@pytest.mark.parametrize(("rfns", "expected"), [
    ([0.01, 0.012, 0.5, 0.6], 2),            # a jump: the defect's layer
    ([0.02, 0.03, 0.045, 0.06, 0.08], 3),    # smooth growth crossing the bound: the first failing layer
    ([0.0, 0.0, 0.3, 0.3], 2),
    ([0.01, 0.02, 0.03], None),
    ([0.01, math.nan, 0.02], 1),             # NaN is never within a bound
    ([0.02, 0.2, 0.04, 0.06], 1),
])
def test_first_divergent_layer(rfns, expected):
    assert metrics.first_divergent_layer(rfns, 0.05) == expected


def test_compare_tokens_first_mismatch_and_count():
    d = metrics.compare_tokens([1, 2, 3], [1, 2, 4, 5])
    assert (d.equal, d.first_mismatch, d.id_a, d.id_b, d.mismatches) == (False, 2, 3, 4, 2)
    assert metrics.compare_tokens([7], [7]).equal
    d = metrics.compare_tokens([1, 2], [1, 2, 9])
    assert (d.first_mismatch, d.id_a, d.id_b) == (2, None, 9)


def test_logit_accumulator_streams_like_the_whole():
    # float32, as logits are cached: the accumulator reads its inputs as float32
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(loc=1.0, size=(3, 7)).astype(np.float32)
    b1 = (a1 + 0.1 * rng.normal(size=a1.shape)).astype(np.float32)
    b2 = (a2 + 0.1 * rng.normal(size=a2.shape)).astype(np.float32)
    acc = metrics.LogitAccumulator()
    acc.update("p1", a1, b1, list(range(5)))
    acc.update("p2", a2, b2, list(range(3)))
    r = acc.result()
    whole_a, whole_b = np.concatenate([a1, a2]), np.concatenate([b1, b2])
    assert r.nmse == pytest.approx(metrics.nmse(whole_a, whole_b), rel=1e-12)
    assert r.kl_mean == pytest.approx(float(np.mean(metrics.kl_per_position(whole_a, whole_b))))
    assert r.max_abs == pytest.approx(float(np.max(np.abs(whole_b - whole_a))))
    assert r.positions == 8
    top1 = np.mean(np.argmax(whole_a, -1) == np.argmax(whole_b, -1))
    assert r.topk_ordered[1] == pytest.approx(top1)


def test_perplexity_of_uniform_logits_is_vocab_size():
    acc = metrics.LogitAccumulator()
    logits = np.zeros((3, 4))
    acc.update("p", logits, logits, [0, 1, 2])
    r = acc.result()
    assert r.ppl_a == pytest.approx(4.0)
    assert r.ppl_ratio == pytest.approx(1.0)
    assert r.delta_p_mean == pytest.approx(0.0)


def test_nan_never_passes_and_is_located():
    a = np.zeros((4, 3))
    b = np.zeros((4, 3))
    b[2, 1] = np.nan
    acc = metrics.LogitAccumulator()
    acc.update("p", a, b)
    r = acc.result()
    assert math.isnan(r.nmse)
    assert not r.nmse <= 1e9
    assert r.nonfinite_b == 1 and r.nonfinite_where.position == 2


def test_layer_accumulator_rfn_and_worst_row():
    ref = np.ones((2, 3, 4))
    test = ref.copy()
    test[1, 2] += 1.0  # layer 1, position 2: row rfn = 1
    acc = metrics.LayerAccumulator(2)
    acc.update("p", ref, test)
    r = acc.result()
    assert r.rfn[0] == 0.0
    assert r.rfn[1] == pytest.approx(math.sqrt(4 / 12))
    assert r.worst_where[1].position == 2 and r.worst_row_rfn[1] == pytest.approx(1.0)


def test_layer_accumulator_flags_inf():
    ref = np.ones((1, 2, 2))
    test = ref.copy()
    test[0, 0, 0] = np.inf
    acc = metrics.LayerAccumulator(1)
    acc.update("p", ref, test)
    r = acc.result()
    assert math.isnan(r.rfn[0]) and r.nonfinite_b == [1]


def test_subblock_anomaly_needs_more_than_inherited_error():
    # layer 2's MLP error is 8x the median of its sub-block: a local defect
    contrib = {"mlp": [0.01, 0.012, 0.08, 0.011, 0.01], "attn": [0.01, 0.01, 0.01, 0.01, 0.01]}
    found = metrics.subblock_anomalies(contrib, jump=4.0, floor=0.002)
    assert [(layer, name) for layer, name, _ in found] == [(2, "mlp")]
    # the same value is no anomaly when the layer's input already carries that much error
    assert metrics.subblock_anomalies(contrib, 4.0, 0.002, inherited=[0, 0.01, 0.05, 0.06, 0.06]) == []
    # identical models up to one sub-block: a median of zero still flags it, but not below the floor
    zero = {"attn": [0.0, 0.0, 0.0, 0.3, 0.001]}
    assert [x[0] for x in metrics.subblock_anomalies(zero, 4.0, 0.002)] == [3]


def test_chunked_update_equals_one_pass():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(37, 11))
    b = a + 0.2 * rng.normal(size=a.shape)
    tokens = list(rng.integers(0, 11, size=37))
    whole, chunked = metrics.LogitAccumulator(), metrics.LogitAccumulator()
    whole.update("p", a, b, tokens, chunk=1000)
    chunked.update("p", a, b, tokens, chunk=5)
    w, c = whole.result(), chunked.result()
    for name in ("nmse", "kl_mean", "kl_p99", "kl_max", "max_abs", "mean_abs", "ppl_a", "ppl_b", "delta_p_mean"):
        assert getattr(c, name) == pytest.approx(getattr(w, name), rel=1e-10), name
    assert c.topk_ordered == pytest.approx(w.topk_ordered) and c.topk_overlap == pytest.approx(w.topk_overlap)
    assert c.kl_max_where == w.kl_max_where and c.max_abs_where == w.max_abs_where
    assert c.per_prompt["p"] == pytest.approx(w.per_prompt["p"])
    assert c.per_prompt["p"]["nmse"] == pytest.approx(metrics.nmse(a, b))


@pytest.mark.parametrize("vocab", [49152, 49153, 3000, 512, 21])
def test_topk_over_a_large_vocabulary_is_exact_with_ties(vocab):
    rng = np.random.default_rng(1)
    ties = rng.integers(0, 4, size=(40, vocab)).astype(np.float32)  # many ties at the k-th place
    smooth = rng.normal(size=(40, vocab)).astype(np.float16)  # fp16: occasional ties
    for x in (ties, smooth):
        want = np.argsort(-x, axis=-1, kind="stable")[:, :5]
        np.testing.assert_array_equal(metrics.topk_indices(x, 5), want)


def test_topk_treats_nan_as_smallest():
    x = np.arange(6000, dtype=np.float32)[None, :].repeat(2, axis=0)
    x[1, 5999] = np.nan
    assert metrics.topk_indices(x, 2).tolist() == [[5999, 5998], [5998, 5997]]


def test_kl_from_log_normalisers_matches_float64_over_a_real_vocabulary():
    rng = np.random.default_rng(2)
    a = (3 * rng.normal(size=(40, 49152))).astype(np.float32)
    for noise, tol in ((0.05, 1e-6), (1.0, 1e-7)):
        b = (a + noise * rng.normal(size=a.shape)).astype(np.float32)
        acc = metrics.LogitAccumulator()
        acc.update("p", a, b, list(range(40)))
        want = metrics.kl_per_position(a, b)
        r = acc.result()
        assert r.kl_mean == pytest.approx(float(want.mean()), rel=tol)
        assert r.kl_max == pytest.approx(float(want.max()), rel=tol)
    acc = metrics.LogitAccumulator()
    acc.update("p", a, a.copy())
    assert acc.result().kl_max == 0.0  # identical logits: exactly zero, not rounding noise


def test_chunked_update_equals_one_chunk():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(11, 6000)).astype(np.float32)
    b = (a + 0.2 * rng.normal(size=a.shape)).astype(np.float32)
    whole, chunked = metrics.LogitAccumulator(), metrics.LogitAccumulator()
    whole.update("p", a, b, list(range(11)))
    chunked.update("p", a, b, list(range(11)), chunk=3)
    rw, rc = whole.result(), chunked.result()
    for name in ("nmse", "kl_mean", "kl_p99", "max_abs", "ppl_a", "ppl_b", "delta_p_rms"):
        assert getattr(rc, name) == pytest.approx(getattr(rw, name), rel=1e-9), name
    assert rc.topk_ordered == rw.topk_ordered and rc.max_abs_where == rw.max_abs_where


def test_metrics_survive_a_json_roundtrip():
    import json

    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 50)).astype(np.float32)
    b = a + np.float32(0.1)
    b[2, 3] = np.nan
    acc = metrics.LogitAccumulator()
    acc.update("p", a, b, list(range(6)))
    lm = acc.result()
    back = metrics.LogitMetrics.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert back.to_dict().keys() == lm.to_dict().keys()
    assert back.kl_max_where == lm.kl_max_where and back.topk_worst_prompt == lm.topk_worst_prompt
    assert math.isnan(back.nmse) and back.positions == lm.positions and back.topk_ordered == lm.topk_ordered
    layers = metrics.LayerAccumulator(2)
    h = rng.normal(size=(2, 6, 8)).astype(np.float32)
    layers.update("p", h, h * 1.1, {"attn": h}, {"attn": h * 1.2})
    ly = layers.result()
    back_l = metrics.LayerMetrics.from_dict(json.loads(json.dumps(ly.to_dict())))
    assert back_l == ly
