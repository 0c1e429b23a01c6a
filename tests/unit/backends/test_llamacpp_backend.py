"""The llama.cpp backend against the transformers reference, on GGUFs written by fixtures/gguf_writer.py.

Header-only tests (``probe``, damaged files) run without llama-cpp-python; the rest skip cleanly
when it is missing. GGUFs are written once per module into a temporary directory (~0.3 s).

Bounds below come from measurements on the tiny Llama (llama.cpp defaults: flash attention
auto, F16 KV cache; the backend now runs without flash attention unless asked, which only lowers them), over
the default corpus:
  f32/f16 GGUF: per-layer rfn <= 4e-3, logits NMSE <= 2.4e-5;  q8_0: rfn <= 4e-2, NMSE <= 2.4e-3;
  f32 GGUF with an F32 KV cache and no flash attention: rfn ~2e-6, NMSE ~1e-11 (exact pipeline).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pytest_convdiff.backends import llamacpp
from pytest_convdiff.core import metrics
from pytest_convdiff.core.corpus import default_corpus
from pytest_convdiff.errors import ContextLengthError, ModelLoadError

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "fixtures" / "models"
HF_DIR = MODELS / "tiny-llama"

# Measured maxima x ~5 margin.
RFN_F16 = 2e-2
NMSE_F16 = 2e-4
RFN_Q8 = 0.15
NMSE_Q8 = 1.5e-2
RFN_EXACT = 1e-4
NMSE_EXACT = 1e-8
EXACT = {"flash_attn": False, "type_k": "f32", "type_v": "f32"}
SHORT_PROMPTS = ("prose-en", "code-python", "chat", "numbers")


def _gguf_writer():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fixtures import gguf_writer, tiny

    tiny.build(MODELS)
    return gguf_writer


@pytest.fixture(scope="module")
def writer():
    pytest.importorskip("gguf", reason="the GGUF fixtures are written with the gguf package")
    pytest.importorskip("safetensors", reason="the GGUF fixtures are read from safetensors")
    return _gguf_writer()


@pytest.fixture(scope="module")
def ggufs(writer, tmp_path_factory) -> dict[str, Path]:
    return writer.build_all(tmp_path_factory.mktemp("gguf"), HF_DIR)


@pytest.fixture(scope="module")
def corpus():
    return {p.id: p for p in default_corpus()}


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch", reason="the reference runs in transformers")
    pytest.importorskip("transformers", reason="the reference runs in transformers")
    from pytest_convdiff.backends import open_backend

    _gguf_writer()  # builds the tiny HF fixture when missing
    backend = open_backend(HF_DIR)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(hf, corpus):
    """Reference tokens and outputs, computed once per prompt."""
    cache: dict[str, tuple[list[int], object]] = {}

    def get(prompt_id: str):
        if prompt_id not in cache:
            toks = hf.tokenize(corpus[prompt_id].text)
            cache[prompt_id] = (toks, hf.forward(toks))
        return cache[prompt_id]

    return get


@pytest.fixture(scope="module")
def llama_cpp_mod():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def _open(path: Path, **options):
    return llamacpp.load(path, options)


def _layer_rfns(ref_hidden: np.ndarray, test_hidden: np.ndarray) -> list[float]:
    return [metrics.rfn(ref_hidden[i], test_hidden[i]) for i in range(ref_hidden.shape[0])]


def _compare(backend, reference, prompt_ids) -> tuple[list[float], float]:
    """Worst per-layer rfn and worst logits NMSE over the prompts (B fed A's tokens)."""
    worst = None
    worst_nmse = 0.0
    for pid in prompt_ids:
        toks, ref = reference(pid)
        out = backend.forward(toks)
        assert out.logits.shape == ref.logits.shape
        assert out.hidden.shape == ref.hidden.shape
        r = _layer_rfns(ref.hidden, out.hidden)
        worst = r if worst is None else [max(a, b) for a, b in zip(worst, r, strict=True)]
        worst_nmse = max(worst_nmse, metrics.nmse(ref.logits, out.logits))
    return worst, worst_nmse


# --------------------------------------------------------------------------- header only


def test_probe_reads_header(ggufs):
    info = llamacpp.probe(ggufs["tiny-q8_0"])
    assert info.backend == "llama.cpp"
    assert info.architecture == "llama"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (6, 128, 512)
    assert info.quantization == "Q8_0"
    assert info.extra["add_bos_token"] is True
    assert info.extra["add_eos_token"] is False
    assert llamacpp.probe(ggufs["tiny-f16"]).quantization == "F16"
    assert llamacpp.probe(ggufs["tiny-f32"]).quantization == "F32"
    assert llamacpp.probe(ggufs["tiny-bos-flag"]).extra["add_bos_token"] is False
    assert llamacpp.probe(ggufs["tiny-rope-base"]).extra["rope_freq_base"] == 500000.0
    assert llamacpp.fingerprint_files(ggufs["tiny-f16"]) == [ggufs["tiny-f16"]]


def test_probe_is_cheap_and_imports_nothing_heavy(ggufs):
    start = time.perf_counter()
    for _ in range(10):
        llamacpp.probe(ggufs["tiny-f32"])
    assert (time.perf_counter() - start) / 10 < 0.05
    code = (
        "import sys; from pytest_convdiff.backends import llamacpp; "
        f"info = llamacpp.probe({str(ggufs['tiny-f16'])!r}); "
        "heavy = [m for m in ('llama_cpp', 'gguf', 'torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; print(info.num_layers)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "6"


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.001])
def test_probe_truncated_file(ggufs, tmp_path, keep):
    src = ggufs["tiny-f16"]
    data = src.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: max(12, int(len(data) * keep))])
    with pytest.raises(ModelLoadError) as err:
        llamacpp.probe(bad)
    msg = str(err.value)
    assert str(bad) in msg and ("truncated" in msg or "ends early" in msg or "too short" in msg)
    assert "\n" not in msg


def test_a_header_is_parsed_once_per_unchanged_file_and_again_when_it_changes(ggufs, tmp_path, monkeypatch):
    from pytest_convdiff.backends import gguf_header

    path = tmp_path / "m.gguf"
    shutil.copyfile(ggufs["tiny-f16"], path)
    parses = []
    real = gguf_header._parse
    monkeypatch.setattr(gguf_header, "_parse", lambda *a: parses.append(a[0]) or real(*a))
    first, second = gguf_header.read_header(path), gguf_header.read_header(path)
    assert len(parses) == 1 and first.kv == second.kv and first.tensors == second.tensors
    first.kv["general.architecture"] = "changed by a caller"
    assert gguf_header.read_header(path).kv["general.architecture"] != "changed by a caller"  # each its own copy
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the same file, cut: parsed again, and found truncated
    with pytest.raises(ModelLoadError, match="truncated|ends early"):
        gguf_header.read_header(path)
    assert len(parses) == 2


def test_probe_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="magic"):
        llamacpp.probe(bad)


# --------------------------------------------------------------------------- llama.cpp runs


@pytest.mark.gguf
def test_load_truncated_file(llama_cpp_mod, ggufs, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(ggufs["tiny-f16"].read_bytes()[:200_000])
    with pytest.raises(ModelLoadError, match="truncated"):
        _open(bad)


@pytest.mark.gguf
def test_load_failure_carries_llama_log(llama_cpp_mod, writer, tmp_path, capfd):
    import gguf

    path = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(path), "no-such-arch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    capfd.readouterr()
    with pytest.raises(ModelLoadError) as err:
        _open(path)
    assert "llama.cpp could not load it" in str(err.value)
    assert "no-such-arch" in str(err.value)  # llama.cpp's own words, from the captured log
    assert capfd.readouterr().err == ""


@pytest.mark.gguf
def test_tokens_match_transformers_on_corpus(llama_cpp_mod, ggufs, hf, corpus):
    b = _open(ggufs["tiny-f16"])
    try:
        for pid, prompt in corpus.items():
            assert b.tokenize(prompt.text) == hf.tokenize(prompt.text), pid
        assert b.special_tokens() == hf.special_tokens()
        for i in range(b.n_vocab):
            assert b.decode_piece(i) == hf.decode_piece(i), i
    finally:
        b.close()


TRICKY = [
    "", " ", "   ", "\t", "\n\n\n", " \n \t\n  x", "hello  world   ", "I'm", "'RE 'lL 'Ve",
    "3", "333", "123456789", "3.3", "3..3", "!!!???...", "🦙", "👨‍👩‍👧", "中文", "ខ្មែរ",
    "Български", "Tiếng Việt", "\ufeffBOM", "\x00\x07", "a\u00a0b", "<s>", "x<s>y", "</s>",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start", "line\r\nbreak",
]


@pytest.mark.gguf
def test_tokens_match_transformers_on_tricky_strings(llama_cpp_mod, ggufs, hf):
    b = _open(ggufs["tiny-f32"])
    try:
        diffs = [(s, hf.tokenize(s), b.tokenize(s)) for s in TRICKY if hf.tokenize(s) != b.tokenize(s)]
    finally:
        b.close()
    assert not diffs


@pytest.mark.gguf
def test_no_console_noise(llama_cpp_mod, ggufs, capfd):
    capfd.readouterr()
    b = _open(ggufs["tiny-f16"])
    b.forward(b.tokenize("<s>hello there"))
    b.close()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.gguf
def test_forward_shapes_and_sublayers(llama_cpp_mod, ggufs):
    with _open(ggufs["tiny-f16"]) as b:
        toks = b.tokenize("The river runs past the city.")
        out = b.forward(toks)
        t = len(toks)
        assert out.logits.shape == (t, 512) and out.logits.dtype == np.float32
        assert out.hidden.shape == (6, t, 128) and out.hidden.dtype == np.float32
        assert set(out.sublayers) == {"attn", "mlp"}
        assert out.sublayers["attn"].shape == (6, t, 128)
        # layer i's output = layer i's input + attention + MLP
        prev = out.hidden[:-1]
        recon = prev + out.sublayers["attn"][1:] + out.sublayers["mlp"][1:]
        assert np.allclose(recon, out.hidden[1:], atol=1e-4)
        no_hidden = b.forward(toks, hidden_states=False)
        assert no_hidden.hidden is None
        assert np.allclose(no_hidden.logits, out.logits, atol=1e-5)
        # independent sequences: the same prompt twice gives the same answer
        again = b.forward(toks)
        assert np.array_equal(again.logits, out.logits)
        with pytest.raises(NotImplementedError):
            b.forward(toks, inject={0: out.hidden[0]})
    # private: the llama.cpp context and model handles, to check they are freed (no public accessor)
    assert b._ctx is None and b._model is None


@pytest.mark.gguf
def test_context_length_error(llama_cpp_mod, ggufs):
    with _open(ggufs["tiny-f16"], n_ctx=32) as b:
        n_ctx = b.n_ctx  # llama.cpp may round the context up (to 256)
        assert 32 <= n_ctx <= 1024
        toks = b.tokenize("word " * (2 * n_ctx))
        with pytest.raises(ContextLengthError, match=f"{len(toks)} tokens .*n_ctx={n_ctx}"):
            b.forward(toks)
        assert b.forward(toks[:n_ctx]).logits.shape == (n_ctx, 512)


@pytest.mark.gguf
def test_small_ubatch_is_stitched(llama_cpp_mod, ggufs, reference):
    toks, _ = reference("prose-en")
    with _open(ggufs["tiny-f32"], **EXACT) as b:
        whole = b.forward(toks)
    with _open(ggufs["tiny-f32"], n_ubatch=32, **EXACT) as b:
        parts = b.forward(toks)
    assert metrics.rfn(whole.hidden, parts.hidden) < 1e-5
    assert metrics.nmse(whole.logits, parts.logits) < 1e-9


@pytest.mark.gguf
def test_n_batch_reaches_the_context(llama_cpp_mod, ggufs, reference):
    """n_batch (documented) used to be ignored: the context always got n_batch = n_ctx."""
    toks, _ = reference("prose-en")
    assert len(toks) > 2 * 64
    with _open(ggufs["tiny-f32"], **EXACT) as b:
        whole = b.forward(toks)
        assert llama_cpp_mod.llama_n_batch(b._ctx) == b.n_ctx
    with _open(ggufs["tiny-f32"], n_batch=64, **EXACT) as b:
        assert llama_cpp_mod.llama_n_batch(b._ctx) == 64 and b.n_batch == 64
        assert llama_cpp_mod.llama_n_ubatch(b._ctx) == 64 and b.info.extra["n_batch"] == 64
        assert b.n_ctx >= len(toks)  # a prompt longer than n_batch is decoded in pieces, not refused
        pieces = b.forward(toks)
    assert pieces.hidden.shape == whole.hidden.shape
    assert set(pieces.sublayers) == {"attn", "mlp"}
    assert metrics.rfn(whole.hidden, pieces.hidden) < 1e-5
    assert metrics.nmse(whole.logits, pieces.logits) < 1e-9
    with _open(ggufs["tiny-f32"], n_batch="128", n_ubatch="32") as b:
        assert (llama_cpp_mod.llama_n_batch(b._ctx), llama_cpp_mod.llama_n_ubatch(b._ctx)) == (128, 32)


@pytest.mark.gguf
def test_greedy_decode_with_a_small_n_batch(llama_cpp_mod, ggufs, reference):
    toks, _ = reference("prose-en")
    chosen: dict[int, list[int]] = {}

    def pick(i, row):
        chosen.setdefault(i, []).append(int(row.argmax()))
        return chosen[i][-1]

    with _open(ggufs["tiny-f32"], **EXACT) as b:
        b.greedy_decode([toks], 4, pick)
    with _open(ggufs["tiny-f32"], n_batch=64, **EXACT) as b:
        whole, chosen = chosen, {}
        b.greedy_decode([toks], 4, pick)
    assert chosen == whole


@pytest.mark.gguf
def test_layer_outputs_read_straight_into_their_rows_equal_those_joined_from_chunks(llama_cpp_mod, ggufs, reference,
                                                                                      monkeypatch):
    """The eval callback copies a contiguous F32 layer output straight into its rows of the [L, T, H] array; any
    other layout is kept as a chunk and joined, also when it comes after rows already read straight in."""
    toks, _ = reference("prose-en")
    real = llamacpp.LlamaCppBackend._read_into_slot

    def first_ubatch_only(self, name, tensor, ggml_type, ne, nb, need):
        # straight in for the first ubatch, then a layout the slots refuse: the rows read move to the chunks
        return real(self, name, tensor, ggml_type if not self._filled.get(name) else -1, ne, nb, need)

    outs = {}
    for how, patch in (("straight", None), ("chunks", lambda self, *args: False), ("mixed", first_ubatch_only)):
        with monkeypatch.context() as m, _open(ggufs["tiny-f32"], n_batch="64", n_ubatch="16", **EXACT) as b:
            if patch is not None:
                m.setattr(llamacpp.LlamaCppBackend, "_read_into_slot", patch)
            outs[how] = b.forward(toks)
    assert len(toks) > 32  # three ubatches or more
    for how in ("chunks", "mixed"):
        np.testing.assert_array_equal(outs[how].hidden, outs["straight"].hidden)
        assert set(outs[how].sublayers) == set(outs["straight"].sublayers) == {"attn", "mlp"}
        for key in ("attn", "mlp"):
            np.testing.assert_array_equal(outs[how].sublayers[key], outs["straight"].sublayers[key])


@pytest.mark.gguf
def test_a_run_from_a_kept_prefix_gives_the_logits_of_a_run_from_scratch(llama_cpp_mod, ggufs, reference):
    """The greedy check's B run continues from the state B's run over the prompt kept (B is causal): the same
    logits as the whole run, cut, in one run of what follows the prefix; a kept state is used once."""
    from pytest_convdiff.backends.base import PrefixKeeper, logits_from

    toks, _ = reference("prose-en")
    forced = [int(t) for t in np.random.default_rng(0).integers(3, 200, 9)]
    run = toks[:20] + forced
    with _open(ggufs["tiny-f32"], **EXACT) as b:
        assert isinstance(b, PrefixKeeper)
        scratch = np.asarray(b.forward(run, hidden_states=False).logits)[19:]
        b.keep_prefixes([toks[:19], [1, 2, 3]])
        b.forward(toks)
        assert list(b._kept) == [tuple(toks[:19])]  # only the prefix this run passed
        calls: list[int] = []
        decode = b._decode
        b._decode = lambda ids, *a, **k: calls.append(len(ids)) or decode(ids, *a, **k)
        kept = logits_from(b, run, 19)
        assert calls == [len(forced) + 1]  # only what follows the kept prefix was run
        np.testing.assert_array_equal(kept, scratch)
        again = logits_from(b, run, 19)  # used once: now from scratch
        assert calls[-1] == len(run)
        np.testing.assert_array_equal(again, scratch)


@pytest.mark.gguf
def test_a_memory_that_cannot_be_cut_back_to_the_prefix_keeps_nothing(llama_cpp_mod, ggufs, reference, monkeypatch):
    """A recurrent state (a hybrid such as LFM2) cannot drop its last positions: llama.cpp refuses the cut, so no
    state is kept and the forced run runs from scratch (a kept state would continue from the prompt's end)."""
    from pytest_convdiff.backends.base import logits_from

    toks, _ = reference("prose-en")
    run = toks[:20] + [5, 6, 7]
    with _open(ggufs["tiny-f32"], **EXACT) as b:
        scratch = np.asarray(b.forward(run, hidden_states=False).logits)[19:]
        b.keep_prefixes([toks[:19]])
        monkeypatch.setattr(llama_cpp_mod, "llama_memory_seq_rm", lambda *args: False)
        b.forward(toks)
        assert b._kept == {}
        np.testing.assert_array_equal(logits_from(b, run, 19), scratch)


def test_bad_options_are_refused_before_loading(ggufs):
    with pytest.raises(ModelLoadError, match="unknown option 'n_ctxx' for the llama.cpp backend.*did you mean 'n_ctx'"):
        _open(ggufs["tiny-f16"], n_ctxx=64)
    with pytest.raises(ModelLoadError, match="option flash_attn expects one of auto, true, false, got 'fast'"):
        _open(ggufs["tiny-f16"], flash_attn="fast")
    with pytest.raises(ModelLoadError, match=r"n_ubatch \(256\) cannot be larger than n_batch \(128\)"):
        _open(ggufs["tiny-f16"], n_batch=128, n_ubatch=256)


@pytest.mark.gguf
def test_main_gpu_selects_without_cuda_visible_devices(llama_cpp_mod, ggufs):
    # a CPU-only build has no GPU to select and runs as before; a GPU build puts the model on GPU 0
    with _open(ggufs["tiny-f16"], main_gpu=0) as b:
        assert b.forward(b.tokenize("hello there"), hidden_states=False).logits.shape[1] == 512


@pytest.mark.gguf
def test_unreadable_tensor_fails_forward_naming_it(llama_cpp_mod, ggufs, monkeypatch):
    """A wanted tensor the callback cannot read used to be dropped silently (fewer layers came back)."""
    def unreadable(raw, ggml_type, ne, nb):
        raise llamacpp.UnreadableTensor("its ggml type Q8_0 (8) is not F32, F16 or BF16")

    with _open(ggufs["tiny-f16"]) as b:
        toks = b.tokenize("The river runs past the city.")
        with monkeypatch.context() as m:
            m.setattr(llamacpp, "tensor_to_float32", unreadable)
            # as a Q8_0 tensor would be: not the contiguous F32 the [L, T, H] arrays take straight in
            m.setattr(llamacpp.LlamaCppBackend, "_read_into_slot", lambda self, *args: False)
            with pytest.raises(ModelLoadError) as err:
                b.forward(toks)
            assert b.forward(toks, hidden_states=False).hidden is None  # logits need no capture
        msg = str(err.value)
        assert "cannot capture llama.cpp's tensor 'attn_out-0' (and 17 more)" in msg
        assert "Q8_0" in msg and "--convdiff-no-layers" in msg
        assert b.forward(toks).hidden.shape == (6, len(toks), 128)  # nothing left over from the failure


@pytest.mark.gguf
def test_decode_failures_are_convdiff_errors(llama_cpp_mod, ggufs, monkeypatch):
    with _open(ggufs["tiny-f16"]) as b:
        toks = b.tokenize("hello there")
        monkeypatch.setattr(llama_cpp_mod, "llama_decode", lambda ctx, batch: -1)
        with pytest.raises(ModelLoadError, match=f"llama_decode failed \\(code -1\\) on a {len(toks)}-token prompt"):
            b.forward(toks)
        monkeypatch.setattr(llama_cpp_mod, "llama_decode", lambda ctx, batch: 1)
        with pytest.raises(ContextLengthError, match="no room in its KV cache"):
            b.greedy_decode([toks], 2, lambda i, row: 0)
        monkeypatch.undo()
        with pytest.raises(ModelLoadError, match="outside the vocabulary"):
            b.forward([1, 10_000])
    with pytest.raises(ModelLoadError, match="closed"):
        b.forward(toks)


@pytest.mark.gguf
def test_f32_exact_pipeline(llama_cpp_mod, ggufs, reference):
    """F32 weights, F32 KV cache, no flash attention: the writer and capture are exact."""
    with _open(ggufs["tiny-f32"], **EXACT) as b:
        rfns, nmse = _compare(b, reference, SHORT_PROMPTS)
    assert max(rfns) < RFN_EXACT, rfns
    assert nmse < NMSE_EXACT


@pytest.mark.gguf
@pytest.mark.parametrize("name", ["tiny-f32", "tiny-f16"])
def test_correct_conversion_matches(llama_cpp_mod, ggufs, reference, name):
    with _open(ggufs[name]) as b:
        rfns, nmse = _compare(b, reference, ("prose-en", "chat", "long-essay"))
    assert max(rfns) < RFN_F16, rfns
    assert nmse < NMSE_F16
    assert metrics.first_divergent_layer(rfns, RFN_F16) is None


@pytest.mark.gguf
def test_q8_0_close_but_noisier(llama_cpp_mod, ggufs, reference):
    with _open(ggufs["tiny-q8_0"]) as b:
        rfns, nmse = _compare(b, reference, ("prose-en", "long-essay"))
    with _open(ggufs["tiny-f16"]) as b:
        rfns16, nmse16 = _compare(b, reference, ("prose-en",))
    assert max(rfns) < RFN_Q8, rfns
    assert nmse < NMSE_Q8
    assert rfns[0] > 3 * rfns16[0] and nmse > 3 * nmse16
    # quantisation noise grows smoothly: no jump that looks like a defect
    assert metrics.first_divergent_layer(rfns, RFN_Q8) is None


@pytest.mark.gguf
def test_no_permute_jumps_at_layer_2(llama_cpp_mod, ggufs, reference):
    with _open(ggufs["tiny-no-permute"]) as b:
        rfns, nmse = _compare(b, reference, SHORT_PROMPTS)
    assert rfns[0] < RFN_F16 and rfns[1] < RFN_F16, rfns
    assert rfns[2] > 10 * rfns[1], rfns
    assert metrics.first_divergent_layer(rfns, RFN_F16) == 2


@pytest.mark.gguf
def test_defects_are_caught_where_declared(llama_cpp_mod, writer, ggufs, reference, hf, corpus):
    """Every broken conversion in gguf_writer.DEFECTS is caught by what its entry says."""
    for name, spec in writer.DEFECTS.items():
        with _open(ggufs[f"tiny-{name}"]) as b:
            tokens_equal = all(b.tokenize(corpus[p].text) == hf.tokenize(corpus[p].text)
                               for p in SHORT_PROMPTS)
            rfns, nmse = _compare(b, reference, SHORT_PROMPTS)
        first = metrics.first_divergent_layer(rfns, RFN_F16)
        if spec["caught_by"] == "tokens":
            assert not tokens_equal, name
            assert first is None, (name, rfns)  # same weights: fed A's tokens it agrees
        elif spec["caught_by"] == "hidden":
            assert tokens_equal, name
            assert first == spec["layer"], (name, rfns)
            assert nmse > NMSE_F16, (name, nmse)
        elif spec["caught_by"] == "logits":
            assert tokens_equal, name
            assert first is None, (name, rfns)
            assert nmse > 10 * NMSE_F16, (name, nmse)
        else:  # pragma: no cover
            raise AssertionError(f"{name}: unknown caught_by {spec['caught_by']!r}")


def test_writer_is_deterministic_and_idempotent(writer, ggufs, tmp_path):
    again = writer.write_gguf(HF_DIR, tmp_path / "again.gguf", "f16")
    assert again.read_bytes() == ggufs["tiny-f16"].read_bytes()
    out_dir = ggufs["tiny-f16"].parent
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.gguf")}
    writer.build_all(out_dir, HF_DIR)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.gguf")} == before


def test_missing_llama_cpp_gives_readable_error(ggufs, monkeypatch):
    from pytest_convdiff.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingDependencyError, match="llama-cpp-python"):
        llamacpp.load(ggufs["tiny-f16"], {})


def test_copy_of_gguf_is_recognised(ggufs, tmp_path):
    from pytest_convdiff.backends import detect_backend

    dst = tmp_path / "model.bin"
    shutil.copy(ggufs["tiny-f16"], dst)
    assert detect_backend(dst) == "llama.cpp"


def _router_backend(path: Path, n_layer: int, captured: dict[str, list[np.ndarray]]) -> llamacpp.LlamaCppBackend:
    """A backend with nothing loaded but what ``_router`` reads: the file, its layer count, the captured tensors."""
    be = object.__new__(llamacpp.LlamaCppBackend)
    be.path, be.n_layer, be._captured, be._router_biases = path, n_layer, captured, None
    return be


def test_a_biased_router_is_read_as_it_chooses(tmp_path):
    """llama.cpp's MoE graph adds ``ffn_gate_inp.bias`` to ``ffn_moe_logits`` before choosing; where the graph's
    name for that sum is not captured (gpt-oss's gating renames it ``ffn_moe_probs``), the file's bias is added.
    Without it, a correct gpt-oss file was compared with A's router a bias off (its F16 rerouted 13 % of positions
    instead of 0.5 %)."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "router.gguf"
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    bias = np.array([0.5, -0.25, 0.0, 1.0], dtype=np.float32)
    w.add_tensor("blk.0.ffn_gate_inp.bias", bias)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    biased = logits + 10.0
    be = _router_backend(path, 3, {"ffn_moe_logits-0": [logits], "ffn_moe_logits-1": [logits],
                                   "ffn_moe_logits_biased-1": [biased], "ffn_moe_logits-2": [logits[:2], logits[2:]]})
    r = be._router(3)
    np.testing.assert_array_equal(r[0], logits + bias)  # the graph's sum not captured: the file's bias added
    np.testing.assert_array_equal(r[1], biased)  # the graph's own sum, not biased twice
    np.testing.assert_array_equal(r[2], logits)  # a layer without a bias in the file: its logits as they are
