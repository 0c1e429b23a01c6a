"""A compact reference (the default store of model A): what the metrics need of A, a few kB per token.

What it must give: the exact metrics (top-K agreement, PPL, delta p) unchanged; the estimated ones (KL
over the top K plus the sampled rest, NMSE and rfn from the sketches) within a tolerance of the full
values; the same verdicts; an entry and a golden reference far smaller than full storage; a damaged
entry detected; and the layer swap, which needs A's full states, refused with the option to use.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_convdiff import ModelSpec, RunSettings, load_corpus, run_model
from pytest_convdiff.core import compact, metrics
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.pair import pair_metrics
from pytest_convdiff.store.budget import expected_entry_bytes
from pytest_convdiff.store.cache import Cache
from pytest_convdiff.store.reference import is_reference

CFG = compact.CompactConfig()


def _logits(rng: np.random.Generator, t: int, v: int, spread: float = 3.0) -> np.ndarray:
    """LM-like rows: a few likely tokens over a long tail."""
    x = rng.standard_normal((t, v)) * spread
    x[:, :8] += 6.0
    return x.astype(np.float32)


def _summary(a: np.ndarray, tokens: np.ndarray, pid: str = "p", chunk: int = 64) -> compact.LogitSummary:
    s = compact.summarise_logits(a, tokens, pid, CFG, chunk)
    return compact.LogitSummary(s["top_idx"], s["top_logit"], s["stats"], s["sketch"], s["sample"], s["rest_idx"],
                                s["rest_logit"], a.shape[1])


def _both(a: np.ndarray, b: np.ndarray, tokens: np.ndarray) -> tuple[metrics.LogitMetrics, metrics.LogitMetrics]:
    full, comp = metrics.LogitAccumulator(), metrics.LogitAccumulator()
    full.update("p", a, b, tokens)
    comp.update_compact("p", _summary(a, tokens), b, CFG, tokens, chunk=100)  # other chunks than A's: same rows
    return full.result(), comp.result()


# --------------------------------------------------------------------------- the estimators, on synthetic arrays


def test_sketch_is_exactly_zero_for_equal_rows_and_unbiased_for_a_rank_one_difference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 1000)).astype(np.float32)
    keys = compact.row_keys(CFG.seed, "p", np.arange(2000))
    assert not np.any(compact.sketch(x, keys, 64) - compact.sketch(x.copy(), keys, 64))
    # the same error vector at every position: signs that change with the position still average it out
    d = np.tile(rng.standard_normal(1000), (2000, 1)).astype(np.float32)
    est = float(np.sum(compact.sketch(d, keys, 64).astype(np.float64) ** 2))
    assert est == pytest.approx(float(np.sum(d.astype(np.float64) ** 2)), rel=0.02)  # 1/sqrt(64*2000) = 0.3 %
    # a row's sketch does not depend on the rows sketched with it (A and B chunk differently)
    assert np.array_equal(compact.sketch(x[5:9], keys[5:9], 64), compact.sketch(x, keys, 64)[5:9])


def test_sketches_equal_their_definition_computed_element_by_element():
    """The fast sketches (sign bits XOR-ed into the float32 sign) against a plain loop over the definition:
    bucket j mod m (or the layout's bucket) gets +x or -x by the element's sign bit; NaN keeps its place."""
    rng = np.random.default_rng(5)
    t, d, m = 7, 200, 64  # 200 = 3 * 64 + 8: the last bucket group is padded
    x = rng.standard_normal((t, d)).astype(np.float32)
    x[2, 130] = np.nan
    keys = compact.row_keys(CFG.seed, "p", np.arange(t))
    # private: the sign bits are checked element by element against the sketch's definition
    bits = compact._sign_bits(keys, d)
    want = np.zeros((t, m))
    for r in range(t):
        for j in range(d):
            want[r, j % m] += -float(x[r, j]) if bits[r, j] else float(x[r, j])
    got = compact.sketch(x, keys, m)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[2, 130 % m])
    ok = ~np.isnan(want)
    assert np.allclose(got[ok], want[ok].astype(np.float32), rtol=1e-6, atol=1e-6)
    assert 0.4 < bits.mean() < 0.6  # both signs occur
    # a mask made once for the rows (every layer of a prompt's states) gives the same sketch, bit for bit
    assert np.array_equal(compact.sketch_masked(x, compact.sign_mask(keys, d), m), got, equal_nan=True)

    h = 32
    states = rng.standard_normal((t, h)).astype(np.float32)
    layout = compact.flat_layout(CFG.seed, "p", t, h, CFG.state_sketch)
    negative = (layout.negative >> np.uint32(31)).astype(bool)
    flat = np.zeros(layout.size)
    for r in range(t):
        for j in range(h):
            flat[layout.index[r * h + j]] += -float(states[r, j]) if negative[r, j] else float(states[r, j])
    assert np.allclose(compact.flat_sketch(states, layout), flat.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert negative.any() and not negative.all()


def test_non_finite_values_are_counted_where_they_are_whatever_the_shortcut():
    """Non-finite values are counted only in rows (layers) whose float64 sum, or sketch, is not finite; that must
    find every NaN and infinity of either sign, alone or together (inf - inf), and count each, as a plain count
    over every element does."""
    rng = np.random.default_rng(8)
    t, v, n_layers, h = 40, 700, 4, 48
    a = _logits(rng, t, v)
    a[3, 5], a[3, 9], a[11, 0], a[20, 699], a[21, 1], a[21, 2] = np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf
    stats = compact.summarise_logits(a, rng.integers(0, v, t), "p", CFG, 16)["stats"]
    want = (~np.isfinite(a)).sum(axis=1)
    assert stats[:, compact.NONFINITE].tolist() == want.tolist() and want.sum() == 6
    assert compact.nonfinite_rows(np.full((2, 3), 3e38, np.float32), np.full(2, np.inf)).tolist() == [0, 0]

    sa = rng.standard_normal((n_layers, t, h)).astype(np.float32)
    sb = sa.copy()
    sa[1, 7, 3] = sb[2, 0, 0] = np.nan
    sa[3, 39, 47] = sb[3, 5, 5] = np.inf
    sb[3, 6, 6] = -np.inf
    summary = compact.summarise_states(sa, "p", CFG)
    assert summary["nonfinite"].tolist() == (~np.isfinite(sa)).sum(axis=(1, 2)).tolist() == [0, 1, 0, 1]
    acc = metrics.LayerAccumulator(n_layers)
    acc.update_compact("p", compact.StateSummary(**summary), sb, CFG)
    got = acc.result()
    assert got.nonfinite_a == [0, 1, 0, 1] and got.nonfinite_b == (~np.isfinite(sb)).sum(axis=(1, 2)).tolist()
    assert got.nonfinite_b == [0, 0, 1, 2]


def test_flat_sketch_estimates_a_layer_whose_error_sits_in_one_position():
    """An attention sink: one position holds most of the error; a per-row sketch would leave that row's error."""
    rng = np.random.default_rng(1)
    t, h = 600, 256
    a = rng.standard_normal((t, h)).astype(np.float32)
    d = (0.01 * rng.standard_normal((t, h))).astype(np.float32)
    d[0] *= 60.0  # position 0: ~90 % of ||d||²
    layout = compact.flat_layout(CFG.seed, "p", t, h, CFG.state_sketch)
    diff = compact.flat_sketch(a + d, layout) - compact.flat_sketch(a, layout)
    true = float(np.sum(((a + d).astype(np.float64) - a) ** 2))
    assert float(compact.segment_sq(diff, layout).sum()) == pytest.approx(true, rel=0.03)


def test_kl_over_top_k_and_the_sampled_rest_matches_the_full_kl():
    rng = np.random.default_rng(2)
    a = _logits(rng, 800, 4096)
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    tokens = rng.integers(0, 4096, 800)
    full, comp = _both(a, b, tokens)
    exact = float(np.mean(metrics.kl_per_position(a, b)))
    assert full.kl_mean == pytest.approx(exact, rel=1e-4)
    assert comp.kl_mean == pytest.approx(full.kl_mean, rel=0.01)
    assert comp.kl_p99 == pytest.approx(full.kl_p99, rel=0.03)
    # exact from the compact form: agreement, perplexities, the true token's probability
    assert comp.topk_ordered == pytest.approx(full.topk_ordered, rel=1e-12)
    assert comp.topk_overlap == pytest.approx(full.topk_overlap, rel=1e-12)  # summed in other chunks
    for k in ("ppl_a", "ppl_b", "ppl_ratio", "delta_p_mean", "delta_p_rms", "positions", "nonfinite_a"):
        assert getattr(comp, k) == pytest.approx(getattr(full, k), rel=1e-9), k
    assert comp.nmse == pytest.approx(full.nmse, rel=0.01)


def _draw_by_full_cumsum(rest: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """The rest's systematic draw by definition: one cumulative sum over the whole row, searched."""
    cdf = np.cumsum(rest, axis=1, dtype=np.float64)
    u0 = (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    out = np.full((rest.shape[0], n), -1, dtype=np.int64)
    for r in range(rest.shape[0]):
        if cdf[r, -1] > 0:
            u = (np.arange(n) + u0[r]) / n * cdf[r, -1]
            out[r] = np.minimum(np.searchsorted(cdf[r], u, side="right"), rest.shape[1] - 1)
    return out


@pytest.mark.parametrize("vocab", [49152, 1000, 65])
def test_the_rests_draw_by_blocks_is_the_draw_by_its_definition(vocab):
    rng = np.random.default_rng(vocab)
    x = _logits(rng, 24, vocab)
    e, _, _ = metrics.exp_lse(x)
    rest = compact.outside_top(e, metrics.topk_indices(x, 16))
    rest[5] = 0.0  # no mass outside the top: nothing drawn
    keys = compact.row_keys(CFG.seed, "p", np.arange(24))
    drawn = compact._draw_rest(rest, keys, 128)
    assert np.array_equal(drawn, _draw_by_full_cumsum(rest, keys, 128))
    assert (drawn[5] == -1).all()
    hit = drawn >= 0
    assert (rest[np.nonzero(hit)[0], drawn[hit]] > 0).all()  # never a token of the top, nor one without mass


def test_equal_logits_give_exactly_zero_and_nan_is_kept():
    rng = np.random.default_rng(3)
    a = _logits(rng, 300, 2048)
    tokens = rng.integers(0, 2048, 300)
    _, comp = _both(a, a.copy(), tokens)
    assert comp.nmse == 0.0 and comp.kl_mean == 0.0 and comp.kl_max == 0.0 and comp.max_abs == 0.0
    assert comp.nmse_label == "perfect match" and comp.topk_ordered[5] == 1.0
    b = a.copy()
    b[17, 3] = np.nan
    full, comp = _both(a, b, tokens)
    assert comp.nonfinite_b == full.nonfinite_b == 1 and str(comp.nonfinite_where) == str(full.nonfinite_where)
    assert math.isnan(comp.nmse) and math.isnan(comp.max_abs) and comp.max_abs_where.position == 17


def test_layer_rfn_and_sub_blocks_from_the_compact_states():
    rng = np.random.default_rng(4)
    n_layers, t, h = 3, 1200, 128  # past 1k positions: the position profile is filled too
    a = rng.standard_normal((n_layers, t, h)).astype(np.float32)
    b = (a + 0.02 * rng.standard_normal(a.shape) + 0.01).astype(np.float32)
    full, comp = metrics.LayerAccumulator(n_layers), metrics.LayerAccumulator(n_layers)
    full.update("p", a, b, {"attn": a}, {"attn": b})
    hid = compact.summarise_states(a, "p", CFG)
    sub = compact.summarise_states(a, "p", CFG, rows=False)
    comp.update_compact("p", compact.StateSummary(**hid), b, CFG, {"attn": compact.StateSummary(**sub)}, {"attn": b})
    f, c = full.result(), comp.result()
    assert c.rfn == pytest.approx(f.rfn, rel=0.01)
    assert c.sublayers["attn"] == pytest.approx(f.sublayers["attn"], rel=0.01)
    assert [r["positions"] for r in c.position_profile] == [r["positions"] for r in f.position_profile]
    assert [r["rfn"] for r in c.position_profile] == pytest.approx([r["rfn"] for r in f.position_profile], rel=0.03)
    eq = metrics.LayerAccumulator(n_layers)
    eq.update_compact("p", compact.StateSummary(**hid), a.copy(), CFG)
    assert eq.result().rfn == [0.0] * n_layers


def test_summaries_and_reductions_on_two_threads_are_the_serial_ones_exactly(monkeypatch):
    """A's summaries and B's reductions run chunk by chunk (or layer by layer) on the process's share of the cores
    (``threads.map_ordered``); each piece depends on its own rows alone and the running sums are added in order,
    so one thread and two give the very same arrays and metrics, bit for bit."""
    from pytest_convdiff.core import threads

    rng = np.random.default_rng(6)
    t, v = 300, 5000
    a = _logits(rng, t, v)
    b = (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    tokens = rng.integers(0, v, size=t)
    sa = (rng.standard_normal((4, t, 64))).astype(np.float32)
    sb = (sa + 0.05 * rng.standard_normal(sa.shape)).astype(np.float32)
    out = {}
    for n in (1, 2):
        monkeypatch.setattr(threads, "default_threads", lambda n=n: n)
        logit_sum = compact.summarise_logits(a, tokens, "p", CFG, 16)
        state_sum = compact.summarise_states(sa, "p", CFG)
        summary = compact.LogitSummary(**{k: logit_sum[k] for k in ("top_idx", "top_logit", "stats", "sketch",
                                                                   "sample", "rest_idx", "rest_logit")}, vocab=v)
        la, ly = metrics.LogitAccumulator(), metrics.LayerAccumulator(4)
        la.update_compact("p", summary, b, CFG, tokens, chunk=16)
        ly.update_compact("p", compact.StateSummary(**state_sum), sb, CFG, {"attn": compact.StateSummary(**state_sum)},
                          {"attn": sb})
        out[n] = (logit_sum, state_sum, la.result(), ly.result())
    for name in out[1][0]:
        assert np.array_equal(out[1][0][name], out[2][0][name], equal_nan=True), name
    for name in out[1][1]:
        assert np.array_equal(out[1][1][name], out[2][1][name]), name
    assert out[1][2] == out[2][2] and out[1][3] == out[2][3]
    assert out[1][2].kl_mean > 0 and out[1][3].rfn[0] > 0  # B differs from A: the figures are not trivially equal


def test_a_map_inside_a_map_runs_serially_instead_of_waiting_on_its_own_pool(monkeypatch):
    from pytest_convdiff.core import threads

    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    inner = lambda i: threads.map_ordered(lambda j: (i, j), range(3))  # noqa: E731
    assert threads.map_ordered(inner, range(4)) == [[(i, j) for j in range(3)] for i in range(4)]


# --------------------------------------------------------------------------- runs, entries, references


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Tiny Llama as A stored both ways, in one cache."""
    corpus = load_corpus("quick")
    cache = Cache(tmp_path_factory.mktemp("compact-cache"))
    spec = ModelSpec(str(tiny_models / "tiny-llama"))
    full = run_model(spec, corpus, cache, settings=RunSettings(store="full"))
    comp = run_model(spec, corpus, cache, settings=RunSettings())
    return {"corpus": corpus, "cache": cache, "full": full, "compact": comp}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_compact_is_the_default_and_serves_no_arrays(runs):
    comp, full = runs["compact"], runs["full"]
    assert comp.compact and not full.compact and RunSettings().store == "compact"
    assert comp.entry.path != full.entry.path  # two entries: the store is part of A's key
    assert comp.vocab_width() == full.vocab_width() and comp.hidden_dims() == full.hidden_dims()
    assert not any(n.endswith((".logits", ".hidden")) or ".sub_" in n for n in comp.meta["files"])
    with pytest.raises(ConvdiffError, match="--convdiff-store full"):
        comp.logits("prose-en")
    with pytest.raises(ConvdiffError, match="compact"):
        comp.hidden("prose-en")
    assert comp.meta["store"]["form"] == "compact" and comp.meta["store"]["seed"] == compact.SEED
    assert comp.inputs("prose-en") == full.inputs("prose-en")
    # the budget's estimate of a compact entry covers it, and is a fraction of a full one's
    tokens = sum(len(comp.inputs(p.id)) for p in runs["corpus"])
    estimate = expected_entry_bytes(comp.info, tokens, RunSettings())
    full_estimate = expected_entry_bytes(full.info, tokens, RunSettings(store="full"))
    assert _bytes(comp.entry.path) <= estimate < full_estimate
    # The tiny model's vocabulary (512) is no bigger than the compact logit summary (top 256, 128 samples, a
    # 256-wide sketch), so here compact is only half the size; with SmolLM2's 49k it is 33x smaller
    # (bench/compact_reference.py, docs/storage.md), and the per-token size does not grow with the vocabulary.
    assert _bytes(comp.entry.path) < 0.6 * _bytes(full.entry.path)
    assert compact.summary_bytes(49152, 30, True, 2) * 30 < 4 * (49152 + 3 * 30 * 576)


@pytest.mark.parametrize("which", ["tiny-llama-bf16", "tiny-llama-broken-layer3", "gguf/tiny-q8_0.gguf"])
def test_compact_and_full_give_the_same_verdicts_and_metrics(which, runs, tiny_models, tmp_path):
    from pytest_convdiff.checks import default_bounds
    from pytest_convdiff.comparison import evaluate

    if which.endswith(".gguf"):
        pytest.importorskip("llama_cpp")
    corpus = runs["corpus"]
    spec = ModelSpec(str(tiny_models / which))
    b = run_model(spec, corpus, Cache(tmp_path), feed=runs["full"], settings=RunSettings(keep_b=True))
    pm_full, pm_comp = pair_metrics(runs["full"], b, corpus), pair_metrics(runs["compact"], b, corpus)
    lf, lc = pm_full.logits, pm_comp.logits
    assert lc.topk_ordered == lf.topk_ordered and lc.ppl_ratio == pytest.approx(lf.ppl_ratio, rel=1e-9)
    assert lc.nmse == pytest.approx(lf.nmse, rel=0.02)
    assert lc.kl_mean == pytest.approx(lf.kl_mean, rel=0.01, abs=1e-6)
    assert pm_comp.layers.rfn == pytest.approx(pm_full.layers.rfn, rel=0.02, abs=1e-6)
    cls, bounds = default_bounds(runs["full"].info, b.info)
    res = {k: evaluate(runs[k], b, corpus, bounds, pair_id="p", precision=cls, pm=pm)
           for k, pm in (("full", pm_full), ("compact", pm_comp))}
    assert [(c.id, c.outcome) for c in res["full"].checks] == [(c.id, c.outcome) for c in res["compact"].checks]
    assert res["full"].first_divergent_layer == res["compact"].first_divergent_layer
    if which == "tiny-llama-broken-layer3":
        assert res["compact"].verdict == "fail" and res["compact"].first_divergent_layer == 3
        # a failing check's message says which values are estimates
        assert "A stored compact" in res["compact"].check("nmse").message
        assert "A stored compact" not in res["full"].check("nmse").message


def test_a_streamed_b_against_a_compact_a_equals_a_kept_one(runs, tiny_models, tmp_path):
    corpus, a = runs["corpus"], runs["compact"]
    spec = ModelSpec(str(tiny_models / "tiny-llama-bf16"))
    streamed = run_model(spec, corpus, Cache(tmp_path / "s"), feed=a)
    kept = run_model(spec, corpus, Cache(tmp_path / "k"), feed=a, settings=RunSettings(keep_b=True))
    assert streamed.streamed
    assert pair_metrics(a, streamed, corpus).to_dict() == pair_metrics(a, kept, corpus).to_dict()


def test_a_damaged_compact_entry_is_detected_and_recomputed(runs, tiny_models, tmp_path):
    cache = Cache(tmp_path)
    spec = ModelSpec(str(tiny_models / "tiny-llama"))
    first = run_model(spec, runs["corpus"], cache)
    f = first.entry.path / "p0.c_top_logit.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    del first
    with pytest.warns(UserWarning, match="fails its checksum"):
        again = run_model(spec, runs["corpus"], cache)
    assert not again.from_cache and again.compact
    assert np.array_equal(again.logit_summary("prose-en").top_logit, runs["compact"].logit_summary("prose-en").top_logit)


def test_settings_validate_the_store_and_refuse_the_layer_swap_without_full():
    assert RunSettings(store=" Full ").store == "full"
    with pytest.raises(ValueError, match="compact, full"):
        RunSettings(store="tiny")
    with pytest.raises(ValueError, match="--convdiff-store full"):
        RunSettings(layer_swap=2)
    assert RunSettings(layer_swap=2, store="full").layer_swap == 2
    assert RunSettings(layer_swap=2, hidden_states=False).store == "compact"  # no states: nothing to swap


def test_plugin_option_and_ini_and_usage_errors(pytester, tiny_models):
    from pytest_convdiff.plugin.session import STASH

    a, b = tiny_models / "tiny-llama", tiny_models / "tiny-llama-bf16"  # paths are checked at start-up; "=" keeps
    # pytest from taking its rootdir (and ini file) from them
    config = pytester.parseconfigure(f"--model-a={a}", f"--model-b={b}", "--convdiff-store", "full")
    assert config.stash[STASH].settings.store == "full"
    pytester.makeini("[pytest]\nconvdiff_store = full\n")
    config = pytester.parseconfigure(f"--model-a={a}", f"--model-b={b}")
    assert config.stash[STASH].settings.store == "full"
    for args, match in ((["--convdiff-store", "tiny"], "--convdiff-store: 'tiny' is not one of compact, full"),
                        (["--convdiff-store", "compact", "--convdiff-layer-swap", "2"], "--convdiff-store full")):
        res = pytester.runpytest(f"--model-a={a}", f"--model-b={b}", *args)
        assert res.ret == pytest.ExitCode.USAGE_ERROR
        res.stderr.fnmatch_lines([f"*{match}*"])


@pytest.mark.usefixtures("subprocess_env")
def test_plugin_compact_and_full_golden_references(pytester, tiny_models, tmp_path):
    """Saved to ``out/golden`` (no extension), read back as ``--model-a``: the same verdicts as full storage,
    from a reference a fraction of the size."""
    common = ["--model-b", tiny_models / "tiny-llama-broken-layer3", "--model-b", tiny_models / "tiny-llama-bf16",
              "--convdiff-no-tokenizer-cases", "--convdiff-greedy-tokens", "0", "--convdiff-no-causality",
              "--convdiff-prompts", "quick", "-p", "no:randomly"]
    out: dict[str, dict] = {}
    for store in ("full", "compact"):
        golden = tmp_path / store / "golden"
        first = pytester.runpytest_subprocess(*map(str, [
            "--model-a", tiny_models / "tiny-llama", *common, "--convdiff-store", store,
            "--convdiff-save-reference", golden, "--convdiff-cache-dir", tmp_path / store / "c1"]))
        assert first.ret == 1 and is_reference(golden), first.stdout.str()[-3000:]
        second = pytester.runpytest_subprocess(*map(str, [
            "--model-a", golden, *common, "--convdiff-cache-dir", tmp_path / store / "c2",
            "--convdiff-json", f"{store}.json"]))
        assert second.ret == 1, second.stdout.str()[-3000:]
        pairs = json.loads((pytester.path / f"{store}.json").read_text())["pairs"]
        out[store] = {"pairs": pairs, "bytes": golden.stat().st_size}
    for pf, pc in zip(out["full"]["pairs"], out["compact"]["pairs"], strict=True):
        assert pc["error"] is None and pc["from_cache"]["A"]
        assert pf["verdict"] == pc["verdict"] and pf["first_divergent_layer"] == pc["first_divergent_layer"]
        assert [(c["name"], c["param"], c["outcome"]) for c in pf["checks"]] == \
            [(c["name"], c["param"], c["outcome"]) for c in pc["checks"]]
    assert out["compact"]["bytes"] < 0.6 * out["full"]["bytes"]  # tiny vocabulary: see the test above


def test_library_compare_takes_the_store_and_a_compact_a_notes_the_layer_swap(runs, tiny_models, tmp_path):
    from pytest_convdiff import compare

    res = compare(tiny_models / "tiny-llama", tiny_models / "tiny-llama-bf16", corpus=runs["corpus"],
                  cache_dir=tmp_path / "c", store="full")
    assert res.verdict == "pass" and list((tmp_path / "c").glob("*/p0.logits.npy"))
    # a compact A (e.g. a compact golden reference) asked for the swap: the pair runs, the note says why not
    b = run_model(ModelSpec(str(tiny_models / "tiny-llama-broken-layer3")), runs["corpus"], Cache(tmp_path / "s"),
                  feed=runs["compact"], settings=RunSettings(layer_swap=2, store="full"))
    assert "compact" in b.meta["layer_swap"]["error"] and "--convdiff-store full" in b.meta["layer_swap"]["error"]
    assert pair_metrics(runs["compact"], b, runs["corpus"]).swap_rfn is None


def test_b_rows_shared_with_another_reduction_give_the_metrics_computed_alone(monkeypatch):
    """B's run over the corpus is reduced against A and, over a prompt's first rows, against the runtime twin: the
    second reduction takes B's own figures of those rows from the first (``metrics.SharedRows``), which must give
    the metrics it gives computing them, and compute B's top k only of the rows not shared."""
    rng = np.random.default_rng(7)
    t, n, v = 90, 50, 3000
    a, twin = _logits(rng, t, v), _logits(rng, t, v)
    b = a + 0.3 * rng.standard_normal((t, v)).astype(np.float32)
    tokens = rng.integers(0, v, t)
    alone = metrics.LogitAccumulator()
    alone.update_compact("p", _summary(a, tokens), b, CFG, tokens, chunk=16)
    shared = metrics.SharedRows()
    first = metrics.LogitAccumulator()  # the twin's reduction of B's first n rows comes first, and fills it
    first.update_compact("p", _summary(twin[:n], tokens[:n]), b[:n], CFG, tokens[:n], chunk=16, shared=shared)
    rows: list[int] = []
    real = metrics.topk_indices
    monkeypatch.setattr(metrics, "topk_indices", lambda x, k: rows.append(x.shape[0]) or real(x, k))
    second = metrics.LogitAccumulator()
    second.update_compact("p", _summary(a, tokens), b, CFG, tokens, chunk=16, shared=shared)
    assert second.result().to_dict() == alone.result().to_dict()
    assert sum(rows) == t - 48  # B's top k: n = 50, so chunks 0-15, 16-31 and 32-47 were shared; 48-63 was not
    rows.clear()  # rows of other values (float16) are not the rows shared: all computed, as alone
    b16 = b.astype(np.float16)
    other, other_alone = metrics.LogitAccumulator(), metrics.LogitAccumulator()
    other.update_compact("p", _summary(a, tokens), b16, CFG, tokens, chunk=16, shared=shared)
    other_alone.update_compact("p", _summary(a, tokens), b16, CFG, tokens, chunk=16)
    assert other.result().to_dict() == other_alone.result().to_dict()
    assert sum(rows) == 2 * t
