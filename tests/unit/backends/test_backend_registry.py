"""The backend registry: one declaration per backend module, third-party backends through entry points.

A dummy backend ships as an installed distribution (a ``.dist-info`` with an ``entry_points.txt`` on
``sys.path``), exactly as a third-party package would, and a pytest run compares two of its models
without any change to this package.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pytest_convdiff.backends import detect_backend, device_options, normalize_backend_name, registry
from pytest_convdiff.errors import ModelLoadError

DUMMY = textwrap.dedent('''
    """A dummy backend: a JSON file names a vocabulary and a noise level; logits are a fixed table."""
    from __future__ import annotations

    import json
    from pathlib import Path

    import numpy as np

    from pytest_convdiff.backends.base import ForwardOutput, ModelInfo
    from pytest_convdiff.backends.options import BackendOption
    from pytest_convdiff.backends.registry import BackendSpec

    NAME = "dummy"
    OPTIONS = (BackendOption("scale", "float", 1.0, "multiplies the logits"),)
    CAPABILITIES = frozenset()


    class DummyBackend:
        def __init__(self, path, options):
            spec = json.loads(Path(path).read_text())
            self.v, self.noise = int(spec["vocab"]), float(spec["noise"])
            self.scale = float(options.get("scale", 1.0))
            self.info = ModelInfo(str(path), NAME, "dummy", 1, self.v, 8, "float32", "0", None)

        def tokenize(self, text):
            return [b % self.v for b in text.encode()][:64]

        def decode_piece(self, token_id):
            return chr(token_id)

        def special_tokens(self):
            return {"bos_id": None, "eos_id": None}

        def forward(self, tokens, *, hidden_states=True, inject=None):
            t = np.asarray(tokens, dtype=np.float32)[:, None]
            logits = np.sin(t * 0.37 + np.arange(self.v, dtype=np.float32)[None, :] * 0.11) * 4 * self.scale
            logits += self.noise * np.cos(np.arange(self.v, dtype=np.float32) * 1.7)[None, :]
            return ForwardOutput(logits.astype(np.float32))

        def close(self):
            pass


    def fingerprint_files(path):
        return [Path(path)]


    def probe(path, options=None):
        return DummyBackend(path, options or {}).info


    def load(path, options=None):
        return DummyBackend(path, options or {})


    BACKEND = BackendSpec(NAME, __name__, aliases=("dmy",), detect=lambda p: p.suffix == ".dummy", priority=5)
''')


@pytest.fixture
def dummy_dist(tmp_path, monkeypatch):
    """An installed distribution that declares the dummy backend in the entry-point group."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "convdiff_dummy_backend.py").write_text(DUMMY)
    info = site / "convdiff_dummy_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: convdiff-dummy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ndummy = convdiff_dummy_backend\n")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield site
    registry.refresh()


def _model(tmp_path: Path, name: str, noise: float) -> Path:
    p = tmp_path / f"{name}.dummy"
    p.write_text(json.dumps({"vocab": 40, "noise": noise}))
    return p


def test_every_builtin_module_declares_one_backend():
    # an in-process pytester run drops the modules it imported from sys.modules: discover afresh, as a session does
    registry.refresh()
    specs = registry.all_specs()
    assert set(specs) >= {"transformers", "llama.cpp", "exllamav2"}
    for spec in specs.values():
        module = spec.load_module()
        assert module.BACKEND is spec and callable(module.load) and callable(module.probe)
    assert normalize_backend_name("GGUF") == "llama.cpp" and normalize_backend_name("hf") == "transformers"
    with pytest.raises(ValueError, match="known backends: exllamav2, llama.cpp, transformers"):
        normalize_backend_name("mlx")


def test_an_entry_point_backend_is_found_detected_and_given_its_options(dummy_dist, tmp_path):
    a = _model(tmp_path, "a", 0.0)
    assert detect_backend(a) == "dummy" and normalize_backend_name("DMY") == "dummy"
    from pytest_convdiff.backends import validate_options

    assert validate_options("dummy", {"scale": "2"}) == {"scale": 2.0}
    with pytest.raises(ValueError, match="valid options: scale"):
        validate_options("dummy", {"scal": 2})
    assert device_options("dummy", 1, {}) == {}  # it declares no GPU option


def test_a_broken_entry_point_names_itself(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        with pytest.raises(ModelLoadError, match="entry point 'broken'.*no_such_module_here"):
            registry.all_specs()
    finally:
        registry.refresh()


def test_an_exl3_directory_is_not_taken_for_a_transformers_checkpoint(tmp_path):
    d = tmp_path / "model-exl3"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl3"}}))
    with pytest.raises(ModelLoadError, match="quantised by 'exl3', which no installed backend runs"):
        detect_backend(d)


def test_a_pytest_run_compares_two_models_of_an_entry_point_backend(pytester, dummy_dist, tmp_path):
    """Adding a backend is one module: nothing in pytest_convdiff names the dummy backend."""
    a, b = _model(tmp_path, "a", 0.0), _model(tmp_path, "b", 0.05)
    env_path = str(dummy_dist)
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {env_path!r})\n")
    res = pytester.runpytest_subprocess(
        f"--model-a={a}", f"--model-b={b}", "--convdiff-cache-dir", str(tmp_path / "cache"),
        "--convdiff-prompts", "quick", "--convdiff-json", "r.json", "-p", "no:randomly", "-q")
    doc = json.loads((pytester.path / "r.json").read_text())
    (pair,) = doc["pairs"]
    assert (pair["backend_a"], pair["backend_b"]) == ("dummy", "dummy"), pair
    assert pair["verdict"] == "fail" and not pair.get("error"), (pair.get("error"), res.stdout.str()[-2000:])
    outcomes = {c["name"] + (f"[{c['param']}]" if c["param"] else ""): c["outcome"] for c in pair["checks"]}
    assert outcomes["nmse"] == "passed" and outcomes["kl[mean]"] == "passed", outcomes
    assert outcomes["topk[1]"] == "failed", outcomes  # B's noise moves argmaxes: judged like any backend's
    assert res.ret == 1


def test_the_backend_contract_names_inject_and_every_layer_swap_backend_takes_it():
    """The Backend protocol's forward had no ``inject`` although the layer swap calls it with one."""
    import inspect
    import typing

    from pytest_convdiff.backends.base import LAYER_SWAP, Backend

    assert "inject" in inspect.signature(Backend.forward).parameters
    swapping = [s for s in registry.all_specs().values() if LAYER_SWAP in s.capabilities]
    assert {s.name for s in swapping} >= {"transformers", "exllamav2"}
    for spec in swapping:
        module = spec.load_module()
        cls = typing.get_type_hints(module.load, vars(module))["return"]
        assert "inject" in inspect.signature(cls.forward).parameters, spec.name
