"""A llama-perplexity base file as model A: recognised by content, served as a run, reduced as the tool scores it."""

import math

import numpy as np
import pytest

from pytest_convdiff import sources
from pytest_convdiff.checks import applies, families, plan_by_family
from pytest_convdiff.checks.base import PlanContext
from pytest_convdiff.core import llama_stats, metrics
from pytest_convdiff.core.llama_stats import encode_rows
from pytest_convdiff.core.settings import RunSettings
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.pair import PairReducer
from pytest_convdiff.runner import ModelSpec
from pytest_convdiff.sources import BASE_FILE
from pytest_convdiff.store.kld_file import evaluated_chunk, is_kld, scored_rows, write_kld
from pytest_convdiff.store.kld_run import BACKEND, kld_corpus, open_kld_run

N_CTX, N_VOCAB, N_CHUNK = 16, 11, 3


def _base(path, seed=0, spread=3.0):
    """A base file of random logits, and those logits over every position of each chunk."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, N_VOCAB, size=(N_CHUNK, N_CTX))
    logits = (spread * rng.normal(size=(N_CHUNK, N_CTX, N_VOCAB))).astype(np.float32)
    first = N_CTX // 2
    write_kld(path, tokens, N_VOCAB, lambda i: encode_rows(logits[i, first:first + scored_rows(N_CTX)]))
    return tokens, logits


def test_a_base_file_is_recognised_by_its_content_whatever_it_is_called(tmp_path):
    _base(tmp_path / "weights.bin")
    (tmp_path / "notes.kld").write_text("not a base file")
    assert is_kld(tmp_path / "weights.bin")
    assert not is_kld(tmp_path / "notes.kld") and not is_kld(tmp_path) and not is_kld(tmp_path / "missing")
    spec = ModelSpec(str(tmp_path / "weights.bin"))
    assert spec.kind() is sources.BASE_FILE and spec.resolved_backend() == BACKEND
    assert spec.can(sources.SCORES, sources.OWN_CORPUS) and not spec.can(sources.RUNS) and not spec.can(sources.OUTPUTS)
    info = spec.probe()
    assert (info.vocab_size, info.context_length, info.num_layers) == (N_VOCAB, N_CTX, None)


def test_its_chunks_are_the_corpus_keyed_by_their_token_ids(tmp_path):
    _base(tmp_path / "a.kld", seed=0)
    _base(tmp_path / "b.kld", seed=1)
    ca, cb = kld_corpus(tmp_path / "a.kld"), kld_corpus(tmp_path / "b.kld")
    assert [p.id for p in ca] == ["chunk-1", "chunk-2", "chunk-3"]
    assert ca.digest != cb.digest  # same ids, same (empty) texts: the tokens tell them apart
    assert kld_corpus(tmp_path / "a.kld").digest == ca.digest


def test_a_chunk_starts_with_bos_where_the_model_adds_one():
    assert evaluated_chunk([5, 6, 7], {"adds_bos": True, "bos_id": 1}) == [1, 6, 7]
    assert evaluated_chunk([5, 6, 7], {"adds_bos": False, "bos_id": 1}) == [5, 6, 7]
    assert evaluated_chunk([5, 6, 7], {"adds_bos": True, "bos_id": None}) == [5, 6, 7]


def test_the_run_serves_tokens_and_rows_and_refuses_logits_saying_why(tmp_path):
    tokens, _ = _base(tmp_path / "a.kld")
    run = open_kld_run(tmp_path / "a.kld", ModelSpec(str(tmp_path / "a.kld")))
    assert run.base_file and not run.compact and not run.streamed
    assert run.vocab_width() == N_VOCAB and run.hidden_dims() is None
    assert run.inputs("chunk-2") == tokens[1].tolist()
    rows, targets, first = run.base_rows("chunk-2")
    assert first == N_CTX // 2 and rows.shape[0] == scored_rows(N_CTX)
    assert np.array_equal(targets, tokens[1, first + 1:])
    with pytest.raises(ConvdiffError, match="llama-perplexity base file.*not logits"):
        run.logits("chunk-1")


def test_b_reduced_against_it_gives_llama_perplexitys_statistics(tmp_path):
    """The pair's metrics against a base file are the tool's per-token scores, summed as it sums them."""
    tokens, logits_a = _base(tmp_path / "a.kld")
    rng = np.random.default_rng(7)
    logits_b = logits_a + rng.normal(scale=0.5, size=logits_a.shape).astype(np.float32)
    run = open_kld_run(tmp_path / "a.kld", ModelSpec(str(tmp_path / "a.kld")))
    reducer = PairReducer(run)
    for i, pid in enumerate(run.prompt_ids):
        reducer.add(pid, logits_b[i])  # B's logits over the whole chunk, as the runner hands them over
    m = reducer.result().logits

    first, n = N_CTX // 2, scored_rows(N_CTX)
    sums = llama_stats.Sums()
    kld, same = [], []
    for i in range(N_CHUNK):
        s = llama_stats.score_rows(encode_rows(logits_a[i, first:first + n]), logits_b[i, first:first + n],
                                   tokens[i, first + 1:])
        sums.add(s)
        kld.append(s.kld)
        same.append(s.same_top)
    want = sums.stats().to_dict()
    assert m.base_file and m.positions == N_CHUNK * n
    for key in ("count", "kld_mean", "kld_err", "same_top", "same_top_err", "ppl_ratio", "ppl_ratio_err"):
        assert m.llama[key] == pytest.approx(want[key], rel=1e-9), key
    assert m.llama["rms_p_diff"] == pytest.approx(want["rms_p_diff"], rel=1e-6)
    assert m.kl_mean == pytest.approx(float(np.mean(np.concatenate(kld))), rel=1e-9)
    assert m.topk_ordered[1] == pytest.approx(float(np.mean(np.concatenate(same))))
    assert m.ppl_ratio == pytest.approx(want["ppl_ratio"], rel=1e-9)
    assert math.isnan(m.nmse) and math.isnan(m.max_abs)  # the file holds no logits to take them from
    assert m.kl_max_where.prompt.startswith("chunk-") and m.kl_max_where.position >= first  # a chunk position
    again = metrics.LogitMetrics.from_dict(m.to_dict())
    assert again.base_file and again.llama == m.llama


def test_b_identical_to_the_base_model_scores_zero_where_the_rows_allow(tmp_path):
    _, logits_a = _base(tmp_path / "a.kld", spread=1.0)  # every entry within 16 nats: nothing is clamped
    run = open_kld_run(tmp_path / "a.kld", ModelSpec(str(tmp_path / "a.kld")))
    reducer = PairReducer(run)
    for i, pid in enumerate(run.prompt_ids):
        reducer.add(pid, logits_a[i])
    m = reducer.result().logits
    # the rows' 16-bit rounding (steps of ~1e-4 nats here) leaves a floor of a few 1e-6, far below any quantisation
    assert m.kl_mean < 1e-5 and m.topk_ordered[1] == 1.0 and m.ppl_ratio == pytest.approx(1.0, abs=1e-4)


def test_update_base_refuses_rows_that_do_not_match_the_logits():
    acc = metrics.LogitAccumulator()
    rows = encode_rows(np.zeros((3, N_VOCAB), dtype=np.float32))
    with pytest.raises(ValueError, match="3 base rows and 3 targets for 4 rows"):
        acc.update_base("c", rows, np.zeros((4, N_VOCAB), dtype=np.float32), np.zeros(3, dtype=np.int64), 8)


def test_only_the_families_that_read_a_base_file_are_planned_against_one(tmp_path):
    _base(tmp_path / "a.kld")
    spec_a = ModelSpec(str(tmp_path / "a.kld"))
    ctx = PlanContext(kld_corpus(tmp_path / "a.kld"), None, RunSettings(), spec_a=spec_a, spec_b=ModelSpec("b.gguf"))
    planned = plan_by_family(ctx)
    assert set(planned) == {f.name for f in families() if f.reads <= BASE_FILE.gives} == {"logits", "baseline"}
    assert planned["baseline"] == []  # planned only in regression mode
    assert [str(c) for c in planned["logits"]] == ["finite", "nmse", "topk[1]", "topk[5]", "kl[mean]", "kl[p99]",
                                                   "ppl[ratio]"]
    weights = next(f for f in families() if f.name == "weights")
    assert applies(weights, ModelSpec("ref-dir")) and not applies(weights, spec_a)


def test_near_lossless_b_keeps_llama_perplexitys_negative_kl_values(tmp_path):
    """Against rounded, truncated rows a per-token KL can be slightly negative; the tool keeps it, so the
    pair's KL mean and statistics do too (clamping them at 0 would make a Q8_0's figures differ from the tool's)."""
    tokens, logits_a = _base(tmp_path / "a.kld", spread=1.0)
    run = open_kld_run(tmp_path / "a.kld", ModelSpec(str(tmp_path / "a.kld")))
    reducer = PairReducer(run)
    for i, pid in enumerate(run.prompt_ids):
        reducer.add(pid, logits_a[i])
    m = reducer.result().logits
    first, n = N_CTX // 2, scored_rows(N_CTX)
    kld = np.concatenate([llama_stats.score_rows(encode_rows(logits_a[i, first:first + n]),
                                                 logits_a[i, first:first + n], tokens[i, first + 1:]).kld
                          for i in range(N_CHUNK)])
    assert (kld < 0).any()  # the case in question exists here
    assert m.kl_mean == pytest.approx(float(kld.mean()), rel=1e-9, abs=1e-15)
    assert m.llama["kld_mean"] == pytest.approx(float(kld.mean()), rel=1e-9, abs=1e-15)
    assert m.llama["kld_quantiles"]["min"] < 0


def test_b_with_another_vocabulary_errors_instead_of_skipping_every_item(tmp_path):
    _, logits_a = _base(tmp_path / "a.kld")
    run = open_kld_run(tmp_path / "a.kld", ModelSpec(str(tmp_path / "a.kld")))
    with pytest.raises(ConvdiffError, match=f"vocabulary of {N_VOCAB} entries, but model B's logits have 12"):
        PairReducer(run).add("chunk-1", np.zeros((N_CTX, 12), dtype=np.float32))


def test_a_damaged_row_is_non_finite_output_of_a(tmp_path):
    _, logits_a = _base(tmp_path / "a.kld")
    raw = bytearray((tmp_path / "a.kld").read_bytes())
    row0 = 20 + 4 * N_CHUNK * N_CTX  # the first row's float32 scale
    raw[row0:row0 + 4] = np.float32(np.nan).tobytes()
    (tmp_path / "a.kld").write_bytes(bytes(raw))
    run = open_kld_run(tmp_path / "a.kld", ModelSpec(str(tmp_path / "a.kld")))
    reducer = PairReducer(run)
    for i, pid in enumerate(run.prompt_ids):
        reducer.add(pid, logits_a[i])
    m = reducer.result().logits
    assert m.nonfinite_a == N_VOCAB and m.nonfinite_b == 0 and m.nonfinite_where.prompt == "chunk-1"


def test_a_baseline_keeps_what_a_base_file_pair_measures():
    from pytest_convdiff.core.results import PairResult
    from pytest_convdiff.store import baseline_file

    pair = PairResult("p", "a.kld", "b.gguf", "llama-perplexity base", "llama.cpp")
    pair.metrics = {"nmse": None, "kl_mean": 0.02, "kl_p99": 0.1, "ppl_ratio": 1.01, "base_file": True,
                    "topk_ordered": {"1": 0.9}, "topk_overlap": {"5": 0.8}}
    snap = baseline_file.snapshot(pair)
    assert snap is not None and snap["kl_mean"] == 0.02 and snap["top1"] == 0.9 and snap["nmse"] is None
    worse = dict(snap, kl_mean=0.05)
    found = baseline_file.regressions(worse, snap, {name: ("rel", 0.1) for name in baseline_file.METRICS})
    assert found["kl_mean"]["worse"] and not found["nmse"]["worse"] and not found["rfn"]["worse"]


def test_gpu_placement_leaves_a_base_file_alone(tmp_path):
    """--convdiff-gpus sets each model's device option; a base file runs nothing and takes none."""
    from pytest_convdiff.zoo import backend_options, on_gpu

    _base(tmp_path / "a.kld")
    spec = ModelSpec(str(tmp_path / "a.kld"))
    assert on_gpu(spec, 1) is spec
    assert backend_options("--convdiff-option-a", {"n_threads": "2"}, [spec.path], None) == [{"n_threads": "2"}]
