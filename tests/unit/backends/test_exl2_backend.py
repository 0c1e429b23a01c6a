"""The exllamav2 backend.

CPU tests (always run): the module imports without exllamav2 or torch, probes config.json only,
and ``load()`` fails with a readable error where exllamav2 or a CUDA GPU is missing.

GPU tests (``-m gpu``; skipped unless exllamav2 is importable and torch sees a CUDA GPU): the tiny
Llama fixture run through exllamav2 is compared with transformers (fp32 on CPU) position by
position and layer by layer: the FP16 directory with ``no_sdpa``, the default SDPA path (whose
missing causal mask the prefix-vs-full probe exposes), EXL2 conversions at 4.0 and 6.0 bpw, a
conversion of the deliberately broken model (layer 3), and layer-swap injection.

EXL2 conversions are read from ``$CONVDIFF_EXL2_DIR`` (default ``fixtures/exl2``) and made there,
or in a temporary directory when that is not writable, when missing (about a minute on a GPU).
``$CONVDIFF_EXL2_REPORT`` names a JSON file that receives every number the GPU tests measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pytest_convdiff.backends import detect_backend, exl2
from pytest_convdiff.core import metrics
from pytest_convdiff.errors import ContextLengthError, MissingDependencyError, ModelLoadError

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "fixtures" / "models"
EXL2_DIR = Path(os.environ.get("CONVDIFF_EXL2_DIR") or ROOT / "fixtures" / "exl2")
REPORT_PATH = os.environ.get("CONVDIFF_EXL2_REPORT")
BROKEN_LAYER = 3
MAX_TOKENS = 512  # per prompt; the tiny model's long essay is ~3100 tokens

# name -> (source fixture under fixtures/models, bits per weight)
CONVERSIONS = {
    "tiny-llama-4.0bpw": ("tiny-llama", 4.0),
    "tiny-llama-6.0bpw": ("tiny-llama", 6.0),
    "tiny-llama-broken-layer3-6.0bpw": ("tiny-llama-broken-layer3", 6.0),
}
# Small calibration: the fixture is tiny and random; defaults (100 x 2048 tokens) only cost time.
CONVERT_ARGS = ["-hb", "6", "-r", "32", "-mr", "8", "-l", "1024", "-ml", "1024"]

REPORT: dict[str, object] = {}


# --------------------------------------------------------------------------- CPU tests


def _write_tokenizer(d: Path, post_processor, tokenizer_config: dict | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "post_processor": post_processor}))
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return d


def _template(first_special: str | None, last_special: str | None = None) -> dict:
    single = []
    if first_special:
        single.append({"SpecialToken": {"id": first_special, "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if last_special:
        single.append({"SpecialToken": {"id": last_special, "type_id": 0}})
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": {}}


def _fake_checkpoint(d: Path, exl2_bits: float | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 6,
           "hidden_size": 128, "vocab_size": 512, "dtype": "float16"}
    if exl2_bits is not None:
        cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.3.2", "bits": exl2_bits, "head_bits": 6}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "output.safetensors").write_bytes(b"\0" * 16)
    (d / "tokenizer.json").write_text("{}")
    return d


def test_import_does_not_import_exllamav2_or_torch():
    code = ("import sys, pytest_convdiff.backends.exl2 as m; "
            "assert 'exllamav2' not in sys.modules, 'exllamav2 imported'; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(m.probe) and callable(m.load) and callable(m.fingerprint_files); "
            "m.library_version()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_probe_reads_config_only(tmp_path):
    fp16 = exl2.probe(_fake_checkpoint(tmp_path / "fp16"))
    assert (fp16.backend, fp16.num_layers, fp16.vocab_size, fp16.hidden_size) == ("exllamav2", 6, 512, 128)
    assert fp16.quantization is None and fp16.dtype == "float16"
    q = exl2.probe(_fake_checkpoint(tmp_path / "q", exl2_bits=4.0))
    assert q.quantization == "exl2 4.00bpw" and q.extra["bits"] == 4.0 and q.extra["head_bits"] == 6
    assert detect_backend(tmp_path / "q") == "exllamav2"
    assert detect_backend(tmp_path / "fp16") == "transformers"


def test_probe_and_load_explain_a_bad_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        exl2.probe(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        exl2.load(tmp_path, {})
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(ModelLoadError, match="no weights \\(\\*.safetensors\\)"):
        exl2.probe(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        exl2.probe(tmp_path)


def test_fingerprint_files(tmp_path):
    d = _fake_checkpoint(tmp_path / "m", exl2_bits=6.0)
    (d / "tokenizer_config.json").write_text("{}")
    (d / "measurement.json").write_text("{}")
    names = [p.name for p in exl2.fingerprint_files(d)]
    assert names == ["output.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_adds_special(tmp_path):
    # The tiny fixture: template "<s> $A" and add_bos_token true.
    d = _write_tokenizer(tmp_path / "a", _template("<s>"), {"add_bos_token": True, "add_eos_token": False})
    assert exl2.tokenizer_adds_special(d) == (True, False)
    # Llama-3 style: Sequence[ByteLevel, TemplateProcessing], nothing in tokenizer_config.
    seq = {"type": "Sequence", "processors": [{"type": "ByteLevel"}, _template("<|begin_of_text|>")]}
    assert exl2.tokenizer_adds_special(_write_tokenizer(tmp_path / "b", seq, {})) == (True, False)
    # Qwen/SmolLM style: ByteLevel only.
    assert exl2.tokenizer_adds_special(_write_tokenizer(tmp_path / "c", {"type": "ByteLevel"}, None)) == (False, False)
    # An explicit tokenizer_config flag wins over the template.
    d = _write_tokenizer(tmp_path / "d", _template("<s>", "</s>"), {"add_bos_token": False})
    assert exl2.tokenizer_adds_special(d) == (False, True)
    assert exl2.tokenizer_adds_special(_write_tokenizer(tmp_path / "e", None, None)) == (False, False)


def test_layer_output_indices():
    # [Embedding, (Attn, MLP) x 3, Norm, Head]: output of layer i is the input of module 2i + 3.
    layers = [None, 0, 0, 1, 1, 2, 2, None, None]
    assert exl2.layer_output_indices(layers, 3) == [3, 5, 7]
    # An extra module (learned position embedding) before the layers shifts every index.
    assert exl2.layer_output_indices([None, None, 0, 0, 1, 1, None, None], 2) == [4, 6]
    with pytest.raises(ModelLoadError, match="expected 0..3"):
        exl2.layer_output_indices(layers, 4)


def test_option_parsing():
    from pytest_convdiff.backends.options import validate_options

    typed = validate_options("exllamav2", {"no_sdpa": "true", "max_input_len": "512", "gpu_split": "20;24",
                                           "add_bos": 0, "encode_special_tokens": "off"})
    assert typed == {"no_sdpa": True, "max_input_len": 512, "gpu_split": [20.0, 24.0], "add_bos": False,
                     "encode_special_tokens": False}
    with pytest.raises(ValueError, match="option no_sdpa expects true or false"):
        validate_options("exllamav2", {"no_sdpa": "maybe"})
    with pytest.raises(ValueError, match="option gpu_split expects GB per GPU"):
        validate_options("exllamav2", {"gpu_split": "a,b"})
    with pytest.raises(ValueError, match="option max_input_len expects an integer >= 1, got 'long'"):
        validate_options("exllamav2", {"max_input_len": "long"})
    with pytest.raises(ValueError, match="unknown option 'no_spda'.*did you mean 'no_sdpa'"):
        validate_options("exllamav2", {"no_spda": True})


def test_bad_option_fails_load_before_anything_else(tmp_path):
    with pytest.raises(ModelLoadError, match="option max_input_len expects an integer"):
        exl2.load(_fake_checkpoint(tmp_path / "m"), {"max_input_len": "long"})
    with pytest.raises(ModelLoadError, match="gpu_split or device, not both"):
        exl2.load(_fake_checkpoint(tmp_path / "m"), {"gpu_split": 20, "device": "cuda:1"})


def test_gpu_split_for():
    assert exl2.gpu_split_for(None, None) is None
    assert exl2.gpu_split_for([20.0, 24.0], None) == [20.0, 24.0]
    assert exl2.gpu_split_for(None, "cuda") is None and exl2.gpu_split_for(None, "cuda:0") is None
    split = exl2.gpu_split_for(None, "cuda:2")
    assert split[:2] == [0.0, 0.0] and len(split) == 3 and split[2] > 1000
    assert exl2.first_gpu(split) == 2 and exl2.first_gpu(None) == 0 and exl2.first_gpu([0, 8]) == 1


def _gpu_ready() -> bool:
    if not exl2._has_exllamav2():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def test_load_fails_readably_without_exllamav2_or_gpu(tmp_path):
    if _gpu_ready():
        pytest.skip("exllamav2 and a CUDA GPU are both present here; the GPU tests cover load()")
    d = _fake_checkpoint(tmp_path / "m", exl2_bits=4.0)
    if not exl2._has_exllamav2():
        with pytest.raises(MissingDependencyError, match=r"pip install 'pytest-convdiff\[exllamav2\]'"):
            exl2.load(d, {})
    else:
        with pytest.raises(ModelLoadError, match="exllamav2 needs a CUDA GPU"):
            exl2.load(d, {})
    assert "exllamav2" not in sys.modules or _gpu_ready()


def test_load_without_gpu_says_so_and_imports_nothing(tmp_path, monkeypatch):
    """exllamav2 installed but no CUDA GPU: a readable ModelLoadError before exllamav2 is imported
    (importing it would start a JIT build of its CUDA extension)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(exl2, "_has_exllamav2", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = "exllamav2" in sys.modules
    with pytest.raises(ModelLoadError, match="exllamav2 needs a CUDA GPU") as err:
        exl2.load(_fake_checkpoint(tmp_path / "m", exl2_bits=4.0), {"no_sdpa": True})
    assert not isinstance(err.value, MissingDependencyError)
    assert ("exllamav2" in sys.modules) == before


# --------------------------------------------------------------------------- GPU fixtures and helpers


@pytest.fixture(scope="session")
def gpu():
    if not exl2._has_exllamav2():
        pytest.skip("exllamav2 is not installed (pip install 'pytest-convdiff[exllamav2]')")
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("exllamav2 needs a CUDA GPU and torch sees none")
    pytest.importorskip("transformers")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fixtures.tiny import build

    build(MODELS)
    yield torch
    if REPORT_PATH:
        Path(REPORT_PATH).write_text(json.dumps(REPORT, indent=2, default=str))


@pytest.fixture(scope="session")
def reference(gpu):
    """Model A: the fp32 tiny Llama in transformers on CPU, run on the built-in corpus."""
    from pytest_convdiff.backends import hf
    from pytest_convdiff.core.corpus import default_corpus

    backend = hf.load(MODELS / "tiny-llama", {})
    runs = {}
    for prompt in default_corpus():
        tokens = backend.tokenize(prompt.text)[:MAX_TOKENS]
        runs[prompt.id] = (prompt.text, tokens, backend.forward(tokens))
    special = backend.special_tokens()
    pieces = {i: backend.decode_piece(i) for i in (0, 1, 2, 3, 40, 300, 511)}
    backend.close()
    return {"runs": runs, "special": special, "pieces": pieces}


@contextlib.contextmanager
def opened(path: Path, **options):
    backend = exl2.load(path, options)
    try:
        yield backend
    finally:
        backend.close()


def compare(backend, reference, label: str, inject_layers: int = 0) -> dict:
    """Logit and per-layer metrics of ``backend`` against A on A's tokens; printed and recorded."""
    logit_acc = metrics.LogitAccumulator()
    layer_acc = metrics.LayerAccumulator(backend.info.num_layers)
    for pid, (_text, tokens, ref) in reference["runs"].items():
        inject = {i: ref.hidden[i] for i in range(inject_layers)} or None
        out = backend.forward(tokens, inject=inject)
        assert out.logits.shape == ref.logits.shape and out.logits.dtype == np.float32
        assert out.hidden.shape == ref.hidden.shape and out.hidden.dtype == np.float32
        logit_acc.update(pid, ref.logits, out.logits, tokens)
        layer_acc.update(pid, ref.hidden, out.hidden)
    lm, ly = logit_acc.result(), layer_acc.result()
    row = {"nmse": lm.nmse, "nmse_label": lm.nmse_label, "top1": lm.topk_ordered[1], "top5_ordered": lm.topk_ordered[5],
           "kl_mean": lm.kl_mean, "kl_max": lm.kl_max, "ppl_a": lm.ppl_a, "ppl_b": lm.ppl_b,
           "rfn": ly.rfn, "positions": lm.positions}
    REPORT[label] = row
    print(f"\n[exl2] {label}: NMSE {lm.nmse:.3e} ({lm.nmse_label}), top-1 {lm.topk_ordered[1]:.4f}, "
          f"top-5 ordered {lm.topk_ordered[5]:.4f}, KL mean {lm.kl_mean:.3e} max {lm.kl_max:.3e}, "
          f"ppl A {lm.ppl_a:.3f} B {lm.ppl_b:.3f}, {lm.positions} positions")
    print(f"[exl2] {label}: per-layer rfn " + " ".join(f"L{i}={v:.3e}" for i, v in enumerate(ly.rfn)))
    return row


def _convert(name: str, out_root: Path) -> tuple[subprocess.Popen, Path]:
    source, bits = CONVERSIONS[name]
    work = Path(tempfile.mkdtemp(prefix=f"exl2-work-{name}-"))
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(MODELS / source),
           "-o", str(work / "job"), "-cf", str(out_root / name), "-b", str(bits), *CONVERT_ARGS]
    log = work / "convert.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, log


@pytest.fixture(scope="session")
def exl2_models(gpu, tmp_path_factory) -> dict[str, Path]:
    """The EXL2 conversions; the missing ones are made in parallel (each about a minute on a GPU)."""
    root = EXL2_DIR
    stamp = (MODELS / "BUILD_STAMP").read_text().strip()
    stamp_file = root / "SOURCE_STAMP"
    stale = stamp_file.is_file() and stamp_file.read_text().strip() != stamp
    missing = [n for n in CONVERSIONS if stale or not (root / n / "config.json").is_file()]
    if missing:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe_file = root / ".write-test"
            probe_file.write_text("")
            probe_file.unlink()
        except OSError:
            root = tmp_path_factory.mktemp("exl2")
            missing = list(CONVERSIONS)
        for name in missing:
            shutil.rmtree(root / name, ignore_errors=True)
        t0 = time.perf_counter()
        jobs = {n: _convert(n, root) for n in missing}
        failed = []
        for name, (proc, log) in jobs.items():
            rc = proc.wait(timeout=900)
            tail = log.read_text(errors="replace").splitlines()[-12:]
            print(f"\n[exl2] converted {name}: rc {rc}, {time.perf_counter() - t0:.0f}s since start\n  "
                  + "\n  ".join(tail))
            if rc != 0:
                failed.append(name)
                shutil.rmtree(root / name, ignore_errors=True)
        if failed:
            tails = "\n".join(f"--- {n}:\n" + jobs[n][1].read_text(errors="replace")[-3000:] for n in failed)
            pytest.fail(f"EXL2 conversion failed for {failed}:\n{tails}")
        (root / "SOURCE_STAMP").write_text(stamp + "\n")
    return {n: root / n for n in CONVERSIONS}


# --------------------------------------------------------------------------- GPU tests


@pytest.mark.gpu
def test_fp16_no_sdpa_matches_transformers(gpu, reference):
    with opened(MODELS / "tiny-llama-fp16", no_sdpa=True) as b:
        info = b.info
        assert (info.backend, info.num_layers, info.vocab_size, info.hidden_size) == ("exllamav2", 6, 512, 128)
        assert info.quantization is None and info.extra["no_sdpa"] is True
        for pid, (text, tokens, _ref) in reference["runs"].items():
            assert b.tokenize(text)[:MAX_TOKENS] == tokens, f"prompt {pid}: token ids differ from transformers"
        assert b.special_tokens() == reference["special"]
        assert {i: b.decode_piece(i) for i in reference["pieces"]} == reference["pieces"]
        row = compare(b, reference, "fp16 no_sdpa vs transformers fp32")
    assert row["nmse"] < 1e-4, row
    assert row["top1"] >= 0.98, row
    assert row["kl_mean"] < 1e-3, row
    assert max(row["rfn"]) < 1e-2, row["rfn"]


def _causality(backend, tokens: list[int]) -> float:
    n = len(tokens) // 2
    full = backend.forward(tokens, hidden_states=False).logits[:n]
    prefix = backend.forward(tokens[:n], hidden_states=False).logits
    return metrics.nmse(full, prefix)


@pytest.mark.gpu
def test_default_sdpa_breaks_causality_and_no_sdpa_keeps_it(gpu, reference):
    from exllamav2 import attn

    if attn.has_flash_attn or attn.has_xformers:
        pytest.skip("flash-attn or xformers is installed, so exllamav2 does not take its SDPA path")
    _text, tokens, _ref = reference["runs"]["prose-en"]
    with opened(MODELS / "tiny-llama-fp16") as b:
        assert b.info.extra["no_sdpa"] is False
        broken = _causality(b, tokens)
        row = compare(b, reference, "fp16 default SDPA vs transformers fp32")
    with opened(MODELS / "tiny-llama-fp16", no_sdpa=True) as b:
        fine = _causality(b, tokens)
    REPORT["causality prefix-vs-full NMSE"] = {"sdpa_default": broken, "no_sdpa": fine}
    print(f"\n[exl2] causality prefix-vs-full NMSE: default SDPA {broken:.3e}, no_sdpa {fine:.3e}")
    assert broken > 1e-2, "exllamav2's SDPA path kept causality: has the missing-mask bug been fixed?"
    assert fine < 1e-4
    assert row["nmse"] > 1e-2 and row["top1"] < 0.9, row


@pytest.mark.gpu
# Bounds from the H100 run of 2026-11-22 (4.0: NMSE 0.150, top-1 0.486, max rfn 0.387; 6.0: 0.0101,
# 0.852, 0.100): this random-weight 128-wide model quantises poorly, so 4.0 bpw is loose. The broken
# conversion (6.0 bpw: NMSE 0.42, top-1 0.24, rfn 0.69 from layer 3) fails every one of them.
@pytest.mark.parametrize("bits, nmse_max, top1_min, rfn_max", [(4.0, 0.3, 0.35, 0.6), (6.0, 0.03, 0.75, 0.2)])
def test_exl2_conversion_within_bounds(gpu, reference, exl2_models, bits, nmse_max, top1_min, rfn_max):
    path = exl2_models[f"tiny-llama-{bits:.1f}bpw"]
    assert detect_backend(path) == "exllamav2"
    assert exl2.probe(path).quantization == f"exl2 {bits:.2f}bpw"
    with opened(path, no_sdpa=True) as b:
        row = compare(b, reference, f"exl2 {bits:.1f}bpw no_sdpa vs transformers fp32")
    assert all(math.isfinite(v) for v in row["rfn"])
    assert row["nmse"] < nmse_max, row
    assert row["top1"] >= top1_min, row
    assert max(row["rfn"]) < rfn_max, row["rfn"]
    # Quantisation noise grows smoothly through the layers; a defect shows as a jump.
    assert max(_jumps(row["rfn"])) < 3, _jumps(row["rfn"])


@pytest.mark.gpu
def test_more_bits_is_closer(gpu, reference, exl2_models):
    rows = {}
    for bits in (4.0, 6.0):
        label = f"exl2 {bits:.1f}bpw no_sdpa vs transformers fp32"
        if label not in REPORT:
            with opened(exl2_models[f"tiny-llama-{bits:.1f}bpw"], no_sdpa=True) as b:
                compare(b, reference, label)
        rows[bits] = REPORT[label]
    assert rows[6.0]["nmse"] < rows[4.0]["nmse"]
    assert rows[6.0]["kl_mean"] < rows[4.0]["kl_mean"]


def _jumps(rfn: list[float]) -> list[float]:
    """rfn[i] / max(rfn[:i]) for i >= 1 (0 for layer 0)."""
    return [0.0] + [rfn[i] / max(max(rfn[:i]), 1e-12) for i in range(1, len(rfn))]


@pytest.mark.gpu
def test_broken_conversion_is_localised(gpu, reference, exl2_models):
    with opened(exl2_models["tiny-llama-6.0bpw"], no_sdpa=True) as b:
        good = compare(b, reference, "exl2 6.0bpw no_sdpa vs transformers fp32")["rfn"]
    with opened(exl2_models["tiny-llama-broken-layer3-6.0bpw"], no_sdpa=True) as b:
        row = compare(b, reference, "exl2 broken-layer3 6.0bpw no_sdpa vs transformers fp32")
        # Layer swap: A's states for layers 0..3 hide the broken layer; layers 4, 5 fall to quantisation noise.
        swapped = compare(b, reference, "exl2 broken-layer3 6.0bpw, A injected for layers 0-3", inject_layers=4)["rfn"]
    bad = row["rfn"]
    jumps = _jumps(bad)
    bound = 2 * max(good)
    fdl = metrics.first_divergent_layer(bad, bound)
    REPORT["broken localisation"] = {"good_rfn": good, "broken_rfn": bad, "jumps": jumps,
                                     "first_divergent_layer(bound=2*max good)": fdl, "bound": bound}
    print(f"\n[exl2] broken: jumps {[round(j, 2) for j in jumps]}; "
          f"first_divergent_layer(bound={bound:.3e}) = {fdl}")
    assert int(np.argmax(jumps)) == BROKEN_LAYER, jumps
    assert fdl == BROKEN_LAYER, (fdl, bad, bound)
    assert jumps[BROKEN_LAYER] > 4, jumps
    assert bad[BROKEN_LAYER] > 5 * good[BROKEN_LAYER]
    for i in range(BROKEN_LAYER):
        assert bad[i] < 1.5 * good[i] + 1e-3, (i, bad, good)
    assert max(swapped[:4]) < 2e-3, swapped
    for i in range(4, len(swapped)):
        assert swapped[i] < 0.5 * bad[i], (i, swapped, bad)


@pytest.mark.gpu
def test_layer_swap_injection(gpu, reference, exl2_models):
    k = 3
    _text, tokens, ref = reference["runs"]["prose-en"]
    with opened(exl2_models["tiny-llama-4.0bpw"], no_sdpa=True) as b:
        plain = b.forward(tokens)
        same = b.forward(tokens, inject={})
        np.testing.assert_allclose(same.logits, plain.logits, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(same.hidden, plain.hidden, rtol=1e-3, atol=1e-3)
        row = compare(b, reference, f"exl2 4.0bpw, A injected for layers 0-{k - 1}", inject_layers=k)
        again = b.forward(tokens)  # the injection is undone after the call
        np.testing.assert_allclose(again.logits, plain.logits, rtol=1e-3, atol=1e-3)
        with pytest.raises(ValueError, match="shape"):
            b.forward(tokens, inject={0: ref.hidden[0][:-1]})
        with pytest.raises(ValueError, match="out of range"):
            b.forward(tokens, inject={6: ref.hidden[0]})
    base = REPORT.get("exl2 4.0bpw no_sdpa vs transformers fp32")
    rfn = row["rfn"]
    assert max(rfn[:k]) < 2e-3, rfn  # fp16 rounding of A's state only
    assert min(rfn[k:]) > 5 * max(rfn[:k]), rfn
    if base:
        assert row["nmse"] <= base["nmse"] * 1.5, (row["nmse"], base["nmse"])


@pytest.mark.gpu
def test_max_input_len_and_close(gpu, reference):
    torch = gpu
    _text, tokens, _ref = reference["runs"]["prose-en"]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    b = exl2.load(MODELS / "tiny-llama-fp16", {"no_sdpa": "true", "max_input_len": "32"})
    try:
        assert b.info.extra["max_input_len"] == 32
        assert b.forward(tokens[:32], hidden_states=False).logits.shape == (32, 512)
        with pytest.raises(ContextLengthError, match="max_input_len"):
            b.forward(tokens[:33])
        with pytest.raises(ModelLoadError, match="outside the vocabulary"):
            b.forward([1, 512])
        loaded = torch.cuda.memory_allocated()
    finally:
        b.close()
    b.close()  # idempotent
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    REPORT["cuda memory_allocated (before, loaded, after close)"] = [before, loaded, after]
    print(f"\n[exl2] memory_allocated before {before}, loaded {loaded}, after close {after}")
    assert after <= before + (1 << 20)
    with pytest.raises(ModelLoadError, match="closed"):
        b.forward(tokens[:4])
