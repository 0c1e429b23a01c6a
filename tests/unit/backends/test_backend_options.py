"""Declared backend options, capabilities and GPU selection (``pytest_convdiff.backends.options``).

Everything here runs without llama-cpp-python or exllamav2: option parsing and the registry are
pure Python, exllamav2's load path runs against a stand-in module, the eval callback's tensor
reading is tested on bytes built here. The transformers tests load the tiny fixture model (CPU).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pytest_convdiff.backends import (
    backend_capabilities,
    backend_module,
    backend_options,
    device_options,
    exl2,
    gguf_header,
    hfdir,
    llamacpp,
    open_backend,
)
from pytest_convdiff.backends.base import (
    ALL_CAPABILITIES,
    HIDDEN_STATES,
    INCREMENTAL_DECODE,
    LAYER_SWAP,
    SUBBLOCKS,
    TWIN_GUEST,
    TWIN_HOST,
    WEIGHTS_TWIN,
)
from pytest_convdiff.backends.options import (
    BackendOption,
    all_options,
    describe_options,
    parse_option_items,
    parse_value,
    resolve_options,
    validate_options,
)
from pytest_convdiff.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "fixtures" / "models"
BACKEND_NAMES = ("transformers", "llama.cpp", "exllamav2")


# --------------------------------------------------------------------------- parse_value


def _opt(type_: str, **kw) -> BackendOption:
    return BackendOption("x", type_, None, "test option", **kw)


@pytest.mark.parametrize(("raw", "want"), [("20", 20), (20, 20), (20.0, 20), (" 7 ", 7), ("4096.0", 4096)])
def test_int_values(raw, want):
    got = parse_value(_opt("int"), raw)
    assert got == want and type(got) is int


@pytest.mark.parametrize("raw", ["abc", "2.5", 2.5, True, None, [1]])
def test_int_rejects(raw):
    with pytest.raises(ValueError, match=r"option x expects an integer, got "):
        parse_value(_opt("int"), raw)


def test_minimum_is_enforced():
    with pytest.raises(ValueError, match=r"option x expects an integer >= 1, got 0 \(below the minimum 1\)"):
        parse_value(_opt("int", minimum=1), 0)
    assert parse_value(_opt("float", minimum=0.5), "0.75") == 0.75


@pytest.mark.parametrize(("raw", "want"), [
    ("true", True), ("YES", True), ("on", True), ("1", True), (1, True), (True, True),
    ("false", False), ("No", False), ("off", False), ("0", False), (0, False), (False, False),
])
def test_bool_spellings(raw, want):
    assert parse_value(_opt("bool"), raw) is want


@pytest.mark.parametrize("raw", ["maybe", "", 2, 0.5])
def test_bool_rejects_with_the_spellings(raw):
    with pytest.raises(ValueError) as err:
        parse_value(_opt("bool"), raw)
    assert str(err.value) == f"option x expects true or false (true/false, yes/no, on/off, 1/0), got {raw!r}"


def test_choices_are_case_insensitive_and_listed():
    opt = _opt("str", choices=("auto", "float32", "bfloat16"))
    assert parse_value(opt, "BFloat16") == "bfloat16"
    with pytest.raises(ValueError, match=r"^option x expects one of auto, float32, bfloat16, got 'fp8'$"):
        parse_value(opt, "fp8")
    tri = _opt("str", choices=("auto", "true", "false"))  # llama.cpp's flash_attn
    assert [parse_value(tri, v) for v in (True, False, "on", "0", "AUTO")] == ["true", "false", "true", "false", "auto"]


def test_pattern():
    opt = _opt("str", pattern=r"cpu|cuda(:\d+)?")
    assert parse_value(opt, "cuda:3") == "cuda:3"
    with pytest.raises(ValueError, match="option x expects a text value, got 'gpu0'"):
        parse_value(opt, "gpu0")


@pytest.mark.parametrize(("raw", "want"), [
    ("20", [20.0]), (20, [20.0]), (20.5, [20.5]), ("20,24", [20.0, 24.0]), ("20;24", [20.0, 24.0]),
    ("20, 24", [20.0, 24.0]), ("20 24", [20.0, 24.0]), ("[20, 24]", [20.0, 24.0]), ([20, 24], [20.0, 24.0]),
    ((20, "24.5"), [20.0, 24.5]), ("0;24", [0.0, 24.0]),
])
def test_split_spellings(raw, want):
    got = parse_value(_opt("split"), raw)
    assert got == want and all(type(v) is float for v in got)


@pytest.mark.parametrize(("raw", "why"), [
    ("a,b", "'a' is not a number"), ("", "no GPU gets any memory"), ([], "no GPU gets any memory"),
    ("0", "no GPU gets any memory"), ("-4,8", "'-4' is not a size in GB"), (True, None), ({"a": 1}, None),
])
def test_split_rejects(raw, why):
    with pytest.raises(ValueError) as err:
        parse_value(_opt("split"), raw)
    assert str(err.value).startswith("option x expects GB per GPU, e.g. 20 or 20,24")
    assert f"got {raw!r}" in str(err.value)
    if why:
        assert why in str(err.value)


def test_bad_declaration():
    with pytest.raises(ValueError, match="type must be one of"):
        BackendOption("x", "list", None, "")
    with pytest.raises(ValueError, match="choices apply to str options only"):
        BackendOption("x", "int", None, "", choices=("1",))


# --------------------------------------------------------------------------- validate_options


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ValueError) as err:
        validate_options("transformers", {"dtyp": "float16"})
    assert str(err.value) == ("unknown option 'dtyp' for the transformers backend; valid options: device, dtype, "
                              "emulate, gguf_file, trust_remote_code, weights_from; did you mean 'dtype'?")
    with pytest.raises(ValueError, match=r"\(n_ctx is an option of the llama.cpp backend\)$"):
        validate_options("hf", {"n_ctx": 8192})
    with pytest.raises(ValueError, match="unknown backend 'vllm'"):
        validate_options("vllm", {})


def test_values_from_cli_toml_and_python_agree():
    cli = {"n_ctx": "8192", "n_batch": "64", "flash_attn": "false", "type_k": "F32", "main_gpu": "1"}
    toml = {"n_ctx": 8192, "n_batch": 64, "flash_attn": False, "type_k": "f32", "main_gpu": 1}
    want = {"n_ctx": 8192, "n_batch": 64, "flash_attn": "false", "type_k": "f32", "main_gpu": 1}
    assert validate_options("llama.cpp", cli) == want
    assert validate_options("gguf", toml) == want
    assert validate_options("llama.cpp", want) == want  # validating twice changes nothing


@pytest.mark.parametrize("raw", ["20,24", "20;24", [20, 24], [20.0, "24"]])
def test_gpu_split_from_every_source(raw):
    assert validate_options("exllamav2", {"gpu_split": raw}) == {"gpu_split": [20.0, 24.0]}


def test_gpu_split_single_number_is_a_list():
    # gpu_split=20 used to become an int that exllamav2's loader could not iterate
    assert validate_options("exl2", {"gpu_split": 20}) == {"gpu_split": [20.0]}
    assert validate_options("exl2", {"gpu_split": "20"}) == {"gpu_split": [20.0]}


def test_bad_value_names_backend_option_and_value():
    with pytest.raises(ValueError, match=r"^llama.cpp backend: option n_ctx expects an integer >= 1, got 'big'$"):
        validate_options("llama.cpp", {"n_ctx": "big"})


def test_none_means_not_given_and_defaults_fill_in():
    assert validate_options("transformers", {"dtype": None}) == {}
    resolved = resolve_options("llama.cpp", {"n_ctx": "512"})
    assert resolved["n_ctx"] == 512 and resolved["flash_attn"] is None and resolved["n_batch"] is None
    assert set(resolved) == {o.name for o in describe_options("llama.cpp")}


def test_parse_option_items_keeps_split_values_together():
    items = ["n_ctx=8192,flash_attn=false", "gpu_split=20,24", "type_k=f32, type_v=f32"]
    assert parse_option_items(items) == {"n_ctx": "8192", "flash_attn": "false", "gpu_split": "20,24",
                                         "type_k": "f32", "type_v": "f32"}
    assert validate_options("exllamav2", parse_option_items(["gpu_split=20,24,no_sdpa=true"])) == {
        "gpu_split": [20.0, 24.0], "no_sdpa": True}
    with pytest.raises(ValueError, match="expected KEY=VALUE, got '20'"):
        parse_option_items(["20,gpu_split=4"])


def test_open_backend_rejects_unknown_options_before_loading(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown option 'n_ctxx' for the llama.cpp backend.*did you mean 'n_ctx'"):
        open_backend(tmp_path / "x.gguf", "llama.cpp", {"n_ctxx": 4})


# --------------------------------------------------------------------------- registry and declarations


def test_registry_lists_every_backend():
    opts = all_options()
    for name in BACKEND_NAMES:
        assert opts[name] == describe_options(name) == list(backend_options(name))
        assert all(isinstance(o, BackendOption) for o in opts[name])
        names = [o.name for o in opts[name]]
        assert len(names) == len(set(names)), name
        for o in opts[name]:
            assert o.doc, (name, o.name)
            if o.default is not None:
                assert parse_value(o, o.default) == o.default, (name, o.name)


def test_capabilities():
    assert backend_capabilities("transformers") == {HIDDEN_STATES, SUBBLOCKS, LAYER_SWAP, INCREMENTAL_DECODE,
                                                    WEIGHTS_TWIN, TWIN_HOST}
    assert backend_capabilities("gguf") == {HIDDEN_STATES, SUBBLOCKS, INCREMENTAL_DECODE, WEIGHTS_TWIN, TWIN_GUEST}
    assert backend_capabilities("exl2") == {HIDDEN_STATES, LAYER_SWAP}
    for name in BACKEND_NAMES:
        assert backend_capabilities(name) <= ALL_CAPABILITIES
        cls = {"transformers": "TransformersBackend", "llama.cpp": "LlamaCppBackend",
               "exllamav2": "ExLlamaV2Backend"}[name]
        backend_cls = getattr(backend_module(name), cls)
        assert (INCREMENTAL_DECODE in backend_capabilities(name)) == hasattr(backend_cls, "greedy_decode")
        takes_inject = "inject" in inspect.signature(backend_cls.forward).parameters
        assert LAYER_SWAP not in backend_capabilities(name) or takes_inject


def _option_reads(module) -> set[str]:
    """Option keys a backend module reads: ``opts[...]``, ``options[...]``, ``self.options[...]`` and
    ``.get(...)`` on them, the key a string constant or a loop variable over string constants."""

    def is_options(expr: ast.AST) -> bool:
        return (isinstance(expr, ast.Name) and expr.id in ("opts", "options")) or (
            isinstance(expr, ast.Attribute) and expr.attr == "options")

    def read_keys(tree: ast.AST) -> list[ast.AST]:
        out = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and is_options(node.value):
                out.append(node.slice)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and is_options(node.func.value) and node.args):
                out.append(node.args[0])
        return out

    tree = ast.parse(inspect.getsource(module))
    found = {k.value for k in read_keys(tree) if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    for loop in ast.walk(tree):
        if isinstance(loop, ast.For) and isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Tuple):
            values = {e.value for e in loop.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            for body in loop.body:
                if any(isinstance(k, ast.Name) and k.id == loop.target.id for k in read_keys(body)):
                    found |= values
    return found


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_every_declared_option_is_read_and_every_read_one_declared(name):
    declared = {o.name for o in backend_options(name)}
    read = _option_reads(backend_module(name))
    assert read - declared == set(), f"{name} reads undeclared options"
    assert declared - read == set(), f"{name} declares options it never reads"


def test_registry_imports_no_backend_library():
    code = ("import sys; from pytest_convdiff.backends import backend_options, backend_capabilities, device_options; "
            "from pytest_convdiff.backends.options import all_options, validate_options; "
            "all_options(); [backend_capabilities(n) for n in ('hf', 'gguf', 'exl2')]; "
            "validate_options('exl2', {'gpu_split': '20;24'}); device_options('gguf', 1, {}); "
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'exllamav2', 'gguf') if m in sys.modules]; "
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- docs/options.md


_ROW = re.compile(r"^\|\s*`--convdiff-option-a/-b KEY=VALUE`\s*\|(?P<text>.*)\|\s*$", re.M)
_SEGMENT = re.compile(r"(?P<backend>transformers|llama\.cpp|exllamav2)\s+(?P<body>.*?)(?=;\s*(?:transformers|llama\.cpp|"
                      r"exllamav2)\s|$)")


def documented_option_names(text: str) -> dict[str, set[str]]:
    """Option names the options reference's backend-options row gives per backend (backticked identifiers)."""
    m = _ROW.search(text)
    assert m, "docs/options.md has no `--convdiff-option-a/-b KEY=VALUE` row in its options table"
    out: dict[str, set[str]] = {}
    for seg in _SEGMENT.finditer(m["text"]):
        names = set(re.findall(r"`([a-z][a-z0-9_]*)`", seg["body"]))
        out.setdefault(seg["backend"], set()).update(names)
    return out


def test_options_reference_row_matches_the_declarations():
    """The full options table lives in docs/options.md (the README links it); every backend option is there."""
    documented = documented_option_names((ROOT / "docs" / "options.md").read_text(encoding="utf-8"))
    for name in BACKEND_NAMES:
        declared = {o.name for o in backend_options(name)}
        assert documented.get(name, set()) == declared, (
            f"docs/options.md's --convdiff-option-a/-b row for {name}: missing {sorted(declared - documented.get(name, set()))}, "
            f"not declared {sorted(documented.get(name, set()) - declared)}")


# --------------------------------------------------------------------------- GPU selection


def test_device_options_transformers():
    assert device_options("transformers", 2, {"device": "cuda"}) == {"device": "cuda:2"}
    assert device_options("hf", 2, {"device": "cuda:0", "dtype": "bfloat16"}) == {"device": "cuda:0", "dtype": "bfloat16"}
    assert device_options("transformers", 2, {"device": "cpu"}) == {"device": "cpu"}
    # the default (auto: the GPU when there is one) follows --convdiff-gpus like the other backends
    assert device_options("transformers", 2, {}) == {"device": "cuda:2"}
    assert device_options("transformers", 2, {"device": "auto"}) == {"device": "cuda:2"}


def test_device_options_llamacpp():
    assert device_options("llama.cpp", 3, {"n_gpu_layers": 99}) == {"n_gpu_layers": 99, "main_gpu": 3}
    assert device_options("gguf", 3, {"main_gpu": 0}) == {"main_gpu": 0}
    assert device_options("gguf", 3, None) == {"main_gpu": 3}


def test_device_options_exllamav2():
    assert device_options("exllamav2", 1, {"no_sdpa": True}) == {"no_sdpa": True, "device": "cuda:1"}
    assert device_options("exl2", 1, {"device": "cuda:0"}) == {"device": "cuda:0"}
    assert device_options("exl2", 1, {"device": "cuda"}) == {"device": "cuda:1"}
    assert device_options("exl2", 1, {"gpu_split": "20;24"}) == {"gpu_split": "20;24"}


def test_device_options_are_valid_and_leave_the_input_alone():
    given = {"no_sdpa": True}
    for name in BACKEND_NAMES:
        out = device_options(name, 1, given)
        validate_options(name, {k: v for k, v in out.items() if k in {o.name for o in backend_options(name)}})
    assert given == {"no_sdpa": True}
    with pytest.raises(ValueError, match="gpu_index"):
        device_options("gguf", -1, {})


# --------------------------------------------------------------------------- exllamav2's load path (stand-in library)


def _checkpoint(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
                                               "hidden_size": 8, "vocab_size": 16}))
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


@pytest.fixture
def fake_exllamav2(monkeypatch):
    """An ``exllamav2`` module that records what ``load`` is given, and torch pretending to have 4 GPUs."""
    torch = pytest.importorskip("torch")
    record: dict[str, list] = {"gpu_split": [], "device": []}

    class Config:
        def __init__(self, _path):
            self.max_seq_len, self.max_attention_size, self.no_sdpa = 2048, 2048 ** 2, False
            self.num_hidden_layers, self.hidden_size, self.vocab_size = 2, 8, 16

        def arch_compat_overrides(self, quiet=True):
            pass

    class Module:
        def __init__(self, layer_idx=None):
            self.layer_idx, self.padding = layer_idx, 0

    class Model:
        def __init__(self, _config):
            self.modules = [Module(), Module(0), Module(0), Module(1), Module(1), Module(), Module()]
            self.head_layer_idx = 6

        def load(self, gpu_split=None, progress=False):
            record["gpu_split"].append(gpu_split)

        def unload(self):
            pass

    @contextlib.contextmanager
    def device(index):
        record["device"].append(index)
        yield

    fake = types.ModuleType("exllamav2")
    fake.ExLlamaV2, fake.ExLlamaV2Config, fake.ExLlamaV2Tokenizer = Model, Config, lambda _config: object()
    monkeypatch.setitem(sys.modules, "exllamav2", fake)
    monkeypatch.setattr(exl2, "_has_exllamav2", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return record


@pytest.mark.parametrize(("given", "loaded"), [
    ("20;24", [20.0, 24.0]), ("20,24", [20.0, 24.0]), (20, [20.0]), ("20", [20.0]), ([20, 24], [20.0, 24.0]),
])
def test_exl2_load_receives_the_parsed_split(fake_exllamav2, tmp_path, given, loaded):
    backend = exl2.load(_checkpoint(tmp_path / "m"), {"gpu_split": given})
    backend.close()
    assert fake_exllamav2["gpu_split"] == [loaded]


def test_exl2_device_becomes_a_split_on_that_gpu(fake_exllamav2, tmp_path):
    d = _checkpoint(tmp_path / "m")
    open_backend(d, "exllamav2", device_options("exllamav2", 2, {"no_sdpa": "true"})).close()
    split = fake_exllamav2["gpu_split"][-1]
    assert split[:2] == [0.0, 0.0] and len(split) == 3 and split[2] > 0
    assert fake_exllamav2["device"] == [2]  # torch's current device set around the load, not process-wide
    exl2.load(d, {}).close()
    assert fake_exllamav2["gpu_split"][-1] is None and fake_exllamav2["device"] == [2]
    with pytest.raises(ModelLoadError, match="asked to use GPU 5.*torch sees 4 GPU"):
        exl2.load(d, {"device": "cuda:5"})


# --------------------------------------------------------------------------- llama.cpp's eval-callback reading


def _bytes(arr: np.ndarray) -> np.ndarray:
    return np.frombuffer(arr.tobytes(), dtype=np.uint8)


def _layout(arr: np.ndarray) -> tuple[list[int], list[int]]:
    """ggml's ne/nb (fastest dimension first, 4 of each) of a numpy array of up to 4 dimensions."""
    shape, strides = list(reversed(arr.shape)), list(reversed(arr.strides))
    while len(shape) < 4:
        shape.append(1)
        strides.append(strides[-1] * (shape[-2] if len(shape) > 1 else 1))
    return shape, strides


def test_reads_contiguous_f32_and_f16():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    ne, nb = _layout(x)
    assert llamacpp.tensor_nbytes(0, ne, nb) == x.nbytes
    np.testing.assert_array_equal(llamacpp.tensor_to_float32(_bytes(x), 0, ne, nb), x)
    h = x.astype(np.float16)
    ne, nb = _layout(h)
    out = llamacpp.tensor_to_float32(_bytes(h), 1, ne, nb)
    assert out.dtype == np.float32 and np.array_equal(out, h.astype(np.float32))


def test_reads_bf16_by_widening():
    x = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -65280.0]], dtype=np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16 (1e-3 truncated)
    ne, nb = _layout(bf16)
    out = llamacpp.tensor_to_float32(_bytes(bf16), 30, ne, nb)
    want = (bf16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(out, want)
    assert out[0, 1] == -2.5 and abs(out[1, 1] - 1e-3) < 1e-5


def test_reads_a_non_contiguous_view_through_its_strides():
    # a [H, T] tensor stored transposed: ne = (T... ) read as rows of ne0 through nb, as ggml views do
    base = (np.arange(6 * 5, dtype=np.float32) * 0.5).reshape(6, 5)
    view = base.T  # shape (5, 6), strides (4, 20): not contiguous
    ne, nb = [6, 5, 1, 1], [view.strides[1], view.strides[0], view.nbytes, view.nbytes]
    raw = _bytes(base)  # what ggml_backend_tensor_get returns: the underlying span
    assert llamacpp.tensor_nbytes(0, ne, nb) == base.nbytes
    np.testing.assert_array_equal(llamacpp.tensor_to_float32(raw, 0, ne, nb), view)
    # a row-sliced view: every other row of a [4, 3] tensor
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    ne, nb = [3, 2, 1, 1], [4, 24, 48, 48]
    span = llamacpp.tensor_nbytes(0, ne, nb)
    np.testing.assert_array_equal(llamacpp.tensor_to_float32(_bytes(rows)[:span], 0, ne, nb), rows[::2])


def test_unreadable_tensor_says_which_type():
    with pytest.raises(llamacpp.UnreadableTensor, match=r"ggml type Q8_0 \(8\) is not F32, F16 or BF16"):
        llamacpp.tensor_nbytes(8, [32, 2, 1, 1], [34, 34, 68, 68])
    with pytest.raises(llamacpp.UnreadableTensor, match=r"type 77 \(77\)"):
        llamacpp.tensor_to_float32(np.zeros(8, np.uint8), 77, [2, 1, 1, 1], [4, 8, 8, 8])
    with pytest.raises(llamacpp.UnreadableTensor, match="needs 32 bytes, 16 were read"):
        llamacpp.tensor_to_float32(np.zeros(16, np.uint8), 0, [4, 2, 1, 1], [4, 16, 32, 32])
    with pytest.raises(llamacpp.UnreadableTensor, match="not multiples of the element size"):
        llamacpp.tensor_to_float32(np.zeros(64, np.uint8), 0, [2, 2, 1, 1], [6, 12, 24, 24])


def test_empty_tensor():
    assert llamacpp.tensor_nbytes(0, [4, 0, 1, 1], [4, 16, 16, 16]) == 0
    assert llamacpp.tensor_to_float32(np.zeros(0, np.uint8), 0, [4, 0, 1, 1], [4, 16, 16, 16]).shape == (0, 4)


# --------------------------------------------------------------------------- header split, shared HF-directory reading


def test_gguf_header_is_the_llamacpp_header_reader():
    assert llamacpp.read_header is gguf_header.read_header
    assert llamacpp.GGML_TYPES is gguf_header.GGML_TYPES and llamacpp.FILE_TYPES is gguf_header.FILE_TYPES
    assert gguf_header.ggml_type_name(30) == "BF16" and gguf_header.ggml_type_name(99) == "type 99"
    code = ("import sys; import pytest_convdiff.backends.gguf_header, pytest_convdiff.backends.hf; "
            "assert 'llama_cpp' not in sys.modules and 'pytest_convdiff.backends.llamacpp' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr


def test_hfdir_readable_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config.json\); it loads a directory holding config.json"):
        hfdir.read_config(tmp_path, "transformers")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="expected a JSON object, found list"):
        hfdir.read_config(tmp_path, "exllamav2")
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "EXL2"}}')
    assert hfdir.quant_method(hfdir.read_config(tmp_path, "exllamav2")) == "exl2"
    with pytest.raises(ModelLoadError, match=r"no weights \(\*.safetensors or \*.bin\)"):
        hfdir.require_weights(tmp_path, ("*.safetensors", "*.bin"))
    for name in ("b.safetensors", "a.safetensors", "tokenizer.json", "special_tokens_map.json", "notes.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in hfdir.fingerprint_files(tmp_path)] == [
        "a.safetensors", "b.safetensors", "config.json", "tokenizer.json", "special_tokens_map.json"]
    assert hfdir.fingerprint_files(tmp_path, ("*.bin",))[0].name == "config.json"


def test_hf_and_exl2_share_the_directory_reading(tmp_path):
    d = _checkpoint(tmp_path / "m")
    (d / "tokenizer_config.json").write_text("{}")
    assert backend_module("transformers").fingerprint_files(d) == exl2.fingerprint_files(d)
    assert exl2.tokenizer_adds_special is hfdir.tokenizer_adds_special


def test_readable_oom():
    class OutOfMemoryError(RuntimeError):
        pass

    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
    with pytest.raises(ModelLoadError, match=r"^m: out of GPU memory while loading \(CUDA out of memory\. Tried\)\. "
                                             r"Use less\.$"):
        with hfdir.readable_oom(torch, "m", "while loading", "Use less."):
            raise OutOfMemoryError("CUDA out of memory. Tried\nmore detail")
    with pytest.raises(ModelLoadError, match="out of GPU memory on a 9-token prompt"):
        with hfdir.readable_oom(torch, "m", "on a 9-token prompt", ""):
            raise RuntimeError("CUDA error: out of memory")
    with pytest.raises(RuntimeError, match="something else"):
        with hfdir.readable_oom(torch, "m", "x", ""):
            raise RuntimeError("something else")


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    pytest.importorskip("torch", reason="the transformers backend needs torch")
    pytest.importorskip("transformers", reason="the transformers backend needs transformers")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fixtures import tiny

    tiny.build(MODELS)
    return MODELS / "tiny-llama"


def test_transformers_load_leaves_logging_as_it_was(tiny_llama):
    import transformers

    logging = transformers.utils.logging
    before, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    try:
        logging.set_verbosity_info()
        logging.enable_progress_bar()
        backend = open_backend(tiny_llama, options={"dtype": "float32"})
        try:
            assert logging.get_verbosity() == logging.INFO
            assert logging.is_progress_bar_enabled()
            assert backend.forward(backend.tokenize("hello"), hidden_states=False).logits.shape[1] == 512
        finally:
            backend.close()
        with pytest.raises(ModelLoadError, match="closed"):
            backend.forward([1, 2])
        assert logging.get_verbosity() == logging.INFO
    finally:
        logging.set_verbosity(before)
        (logging.enable_progress_bar if bars else logging.disable_progress_bar)()


def test_transformers_options_are_checked(tiny_llama):
    hf = backend_module("transformers")
    with pytest.raises(ModelLoadError, match="option dtype expects one of auto, float32, float16, bfloat16, got 'fp8'"):
        hf.load(tiny_llama, {"dtype": "fp8"})
    with pytest.raises(ModelLoadError, match="option device expects a text value, got 'gpu'"):
        hf.load(tiny_llama, {"device": "gpu"})
    assert hf.probe(tiny_llama, {"dtype": "bfloat16"}).dtype == "bfloat16"
    assert hf.probe(tiny_llama, {"dtype": "auto"}).dtype != "auto"


def test_transformers_probe_of_a_gguf_file_uses_the_header_reader():
    gguf = MODELS / "gguf" / "tiny-f16.gguf"
    if not gguf.is_file():
        pytest.skip("GGUF fixtures not built (python -m fixtures.gguf_writer)")
    info = backend_module("transformers").probe(gguf.parent, {"gguf_file": gguf.name})
    assert (info.backend, info.num_layers, info.hidden_size, info.vocab_size) == ("transformers", 6, 128, 512)


def test_the_gpu_is_the_default_and_the_cpu_the_fallback(tiny_models):
    """transformers' device and llama.cpp's offload default to the GPU; without one (here) the model runs on
    the CPU and the run says where it ran."""
    pytest.importorskip("torch")
    from pytest_convdiff.backends import open_backend

    assert {o.name: o.default for o in backend_options("transformers")}["device"] == "auto"
    assert {o.name: o.default for o in backend_options("llama.cpp")}["n_gpu_layers"] is None
    import torch

    hf = open_backend(tiny_models / "tiny-llama")
    try:
        assert hf.info.extra["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        hf.close()
    lc = pytest.importorskip("llama_cpp")
    gg = open_backend(tiny_models / "gguf" / "tiny-f16.gguf")
    try:
        offloads = bool(lc.llama_supports_gpu_offload())
        assert gg.info.extra["device"] == ("gpu 0 (all layers offloaded)" if offloads else "cpu")
    finally:
        gg.close()


def test_flash_attention_is_off_unless_a_quantised_v_cache_needs_it():
    from pytest_convdiff.backends.llamacpp import flash_default

    assert flash_default(None) == "false" and flash_default("f16") == "false" and flash_default("f32") == "false"
    assert flash_default("q8_0") == "auto" and flash_default("q4_0") == "auto"


def test_transformers_imports_with_the_collector_paused_then_frozen_once():
    """``hfdir.import_transformers`` in a fresh process: no collection runs during the import, the collector is left
    as the caller had it, and what the import made leaves its generations once."""
    pytest.importorskip("transformers")
    code = (
        "import gc, sys\n"
        "from pytest_convdiff.backends import hfdir\n"
        "started = []\n"
        "gc.callbacks.append(lambda phase, info: started.append(1) if phase == 'start' else None)\n"
        "hfdir.import_transformers('modeling_gguf_pytorch_utils')\n"
        "during, enabled, frozen = len(started), gc.isenabled(), gc.get_freeze_count()\n"
        "gc.disable()\n"
        "hfdir.import_transformers()\n"
        "print(during, enabled, frozen, gc.get_freeze_count(), gc.isenabled(),\n"
        "      'transformers.modeling_gguf_pytorch_utils' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    during, enabled, frozen, frozen_after, enabled_after, imported = out
    assert during == "0" and enabled == "True" and imported == "True"
    assert int(frozen) > 100_000 and frozen_after == frozen  # torch's and transformers' objects, frozen once
    assert enabled_after == "False"  # a caller's disabled collector stays disabled


def test_a_submodule_this_transformers_lacks_is_left_to_its_caller():
    transformers = pytest.importorskip("transformers")
    assert hfdir.import_transformers("no_such_submodule", "models.auto.modeling_auto") is transformers
