"""core.routing by hand: kept router logits, flips, A's margin, B's router error, and the positions the
position profile leaves out."""

from __future__ import annotations

import math

import numpy as np

from pytest_convdiff.core import compact, metrics, routing


def _one_layer(rows: list[list[float]]) -> np.ndarray:
    return np.asarray([rows], dtype=np.float32)  # [L=1, T, E]


def test_summarise_keeps_the_highest_logits_and_marks_layers_without_experts():
    router = np.stack([np.asarray([[0.1, 0.9, 0.5, -1.0]], np.float32), np.full((1, 4), np.nan, np.float32)])
    ids, logits = routing.summarise(router, kept=3)
    assert ids[0, 0].tolist() == [1, 2, 0]
    assert logits[0, 0].tolist() == [np.float32(0.9), np.float32(0.5), np.float32(0.1)]
    assert ids[1, 0].tolist() == [-1, -1, -1] and np.isnan(logits[1, 0]).all()


def test_a_flip_is_another_set_of_k_experts_and_its_margin_is_a_s_kth_minus_next():
    a = _one_layer([[3.0, 2.0, 1.9, 0.0],    # top-2 {0, 1}; margin 2.0 - 1.9 = 0.1
                    [3.0, 2.0, 1.0, 0.0]])   # top-2 {0, 1}; margin 1.0
    b = _one_layer([[3.0, 1.8, 1.95, 0.0],   # top-2 {0, 2}: a flip
                    [2.1, 3.1, 1.0, 0.0]])   # top-2 {1, 0}: the same set in another order, no flip
    a_ids, a_lg = routing.summarise(a)
    b_ids, b_lg = routing.summarise(b)
    flipped, margin = routing.flips(a_ids, a_lg, b_ids, k=2)
    assert flipped.tolist() == [[True, False]]
    assert np.allclose(margin, [[0.1, 1.0]])
    err = routing.router_error(a_ids, a_lg, b_ids, b_lg)
    assert np.allclose(err, [[0.2, 1.1]], atol=1e-6)  # expert 1 moved 2.0 -> 1.8; expert 1 moved 2.0 -> 3.1


def test_the_accumulator_counts_flips_by_layer_and_names_a_consequence():
    # two layers, three positions; position 1 flips at layer 0 and again at layer 1 (a consequence)
    a = np.asarray([[[2.0, 1.0, 0.0], [1.0, 0.99, 0.0], [2.0, 0.0, 1.0]],
                    [[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]], np.float32)
    b = a.copy()
    b[0, 1] = [0.98, 1.0, 0.0]  # k=1: expert 1 instead of 0 at layer 0
    b[1, 1] = [0.5, 1.0, 0.0]
    acc = routing.RouterAccumulator(k=1)
    got = acc.update("p", *routing.summarise(a), *routing.summarise(b))
    assert got.rerouted.tolist() == [False, True, False]
    assert got.by_layer[0].tolist() == [1] and got.by_layer[1].tolist() == [1]
    r = acc.result()
    assert (r.positions, r.rerouted, r.k) == (3, 1, 1)
    assert math.isclose(r.share, 1 / 3)
    l0, l1 = r.layers
    assert (l0["flips"], l0["first_flips"], l1["flips"], l1["first_flips"]) == (1, 1, 1, 0)
    assert math.isclose(l0["max_flip_margin"], 0.01, rel_tol=1e-4) and l1["max_flip_margin"] is None
    assert r.examples[0] == {"prompt": "p", "position": 1, "layer": 0, "margin": l0["max_flip_margin"],
                             "first": True, "router_error_p99": l0["router_error_p99"]}
    assert routing.RoutingMetrics.from_dict(r.to_dict()) == r


def _long_prompt(t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((1, t, 32)).astype(np.float32)
    b = a + 1e-3 * rng.standard_normal(a.shape).astype(np.float32)
    b[0, 700] += 5.0 * a[0, 700]  # one rerouted position in the 256-1k bucket: a whole expert's difference
    return a, b


def test_rerouted_positions_leave_the_position_profile_and_stay_in_the_layer_rfn():
    a, b = _long_prompt(1100)
    rerouted = np.zeros(1100, dtype=bool)
    rerouted[700] = True
    kept, left = metrics.LayerAccumulator(1), metrics.LayerAccumulator(1)
    kept.update("p", a, b)
    left.update("p", a, b, rerouted=rerouted)
    with_flip, without = kept.result(), left.result()
    assert with_flip.rfn == without.rfn  # the layer's rfn keeps every position
    bucket = {p["bucket"]: p for p in with_flip.position_profile}["256-1k"]
    clean = {p["bucket"]: p for p in without.position_profile}["256-1k"]
    assert bucket["rfn"] > 50 * clean["rfn"] and clean["positions"] == bucket["positions"] - 1
    assert math.isclose(clean["rfn"], 1e-3, rel_tol=0.2)


def test_a_compact_reference_leaves_them_out_too():
    a, b = _long_prompt(1100, seed=1)
    cfg = compact.CompactConfig()
    summary = compact.StateSummary(**compact.summarise_states(a, "p", cfg))
    rerouted = np.zeros(1100, dtype=bool)
    rerouted[700] = True
    kept, left = metrics.LayerAccumulator(1), metrics.LayerAccumulator(1)
    kept.update_compact("p", summary, b, cfg)
    left.update_compact("p", summary, b, cfg, rerouted=rerouted)
    bucket = {p["bucket"]: p for p in kept.result().position_profile}["256-1k"]
    clean = {p["bucket"]: p for p in left.result().position_profile}["256-1k"]
    assert bucket["rfn"] > 50 * clean["rfn"]
    assert math.isclose(clean["rfn"], 1e-3, rel_tol=0.3)  # from the rows' sketches, 744 rows of 8 buckets each


def test_a_flip_reaches_its_own_state_and_every_later_layer_at_or_after_its_position():
    """The causal cone: a flip at layer 1, position 3 changes that state and, through attention, layers 2+ at
    positions 3+; a flip at layer 2, position 1 adds layer 2's position 1 and layer 3's positions 1+."""
    pf = routing.PromptFlips(np.zeros(6, dtype=bool), {1: np.array([3]), 2: np.array([1])})
    pf.rerouted[[1, 3]] = True
    cone = pf.cone(4)
    expect = np.zeros((4, 6), dtype=bool)
    expect[1, 3] = True
    expect[2, 3:] = True
    expect[2, 1] = True
    expect[3, 1:] = True
    assert (cone == expect).all()
    assert pf.logit_cone().tolist() == [False, True, True, True, True, True]
    none = routing.PromptFlips(np.zeros(6, dtype=bool), {0: np.array([], dtype=np.int64)})
    assert not none.cone(2).any() and not none.logit_cone().any()


def test_rfn_kept_leaves_reached_states_out_exact_and_compact():
    """The runtime twin judges B on the states no flip reaches: rfn_kept is the plain rfn of the others
    (1e-3 here), whether A is kept whole or compact; None when no flip reaches any."""
    a, b = _long_prompt(1100, seed=2)
    reach = np.zeros((1, 1100), dtype=bool)
    reach[0, 700] = True
    exact = metrics.LayerAccumulator(1)
    exact.update("p", a, b, reach=reach)
    res = exact.result()
    assert res.rfn[0] > 50 * res.rfn_kept[0]
    keep = ~reach[0]
    by_hand = math.sqrt(float(((b[0, keep] - a[0, keep]).astype(np.float64) ** 2).sum())
                        / float((a[0, keep].astype(np.float64) ** 2).sum()))
    assert math.isclose(res.rfn_kept[0], by_hand, rel_tol=1e-9)
    cfg = compact.CompactConfig()
    summary = compact.StateSummary(**compact.summarise_states(a, "p", cfg))
    comp = metrics.LayerAccumulator(1)
    comp.update_compact("p", summary, b, cfg, reach=reach)
    assert math.isclose(comp.result().rfn_kept[0], by_hand, rel_tol=0.3)  # from the row sketches
    plain = metrics.LayerAccumulator(1)
    plain.update("p", a, b)
    assert plain.result().rfn_kept is None
    every = metrics.LayerAccumulator(1)  # nothing left to judge by: the whole rfn, never a free 0
    every.update("p", a, b, reach=np.ones((1, 1100), dtype=bool))
    assert every.result().rfn_kept == every.result().rfn


def test_kl_kept_is_the_kl_of_the_positions_no_flip_reaches():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 16)).astype(np.float32)
    b = a + 0.01 * rng.standard_normal(a.shape).astype(np.float32)
    b[37:] = rng.standard_normal((3, 16)).astype(np.float32)  # after a flip at position 37: other experts
    reach = np.zeros(40, dtype=bool)
    reach[37:] = True
    acc = metrics.LogitAccumulator()
    acc.update("p", a, b, reach=reach)
    res = acc.result()
    la = a - np.log(np.exp(a.astype(np.float64)).sum(-1, keepdims=True))
    lb = b - np.log(np.exp(b.astype(np.float64)).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    assert math.isclose(res.kl_mean, kl.mean(), rel_tol=1e-4)
    assert math.isclose(res.kl_mean_kept, kl[:37].mean(), rel_tol=1e-4)
    assert res.kl_mean > 10 * res.kl_mean_kept
    acc = metrics.LogitAccumulator()
    acc.update("p", a, b)
    assert acc.result().kl_mean_kept is None


def test_per_layer_logits_stack_with_nan_rows_for_layers_without_experts():
    """Both backends hand their captured router logits through stack_layers: a layer without a router, or one
    captured for another number of tokens, is a NaN row; no layer at all is None."""
    got = routing.stack_layers({1: np.ones((3, 4)), 2: np.zeros((5, 4))}, n_layers=3, n_tokens=3)
    assert got.shape == (3, 3, 4) and np.isnan(got[0]).all() and (got[1] == 1).all() and np.isnan(got[2]).all()
    assert routing.stack_layers({}, 3, 3) is None
