"""The store package: one atomic-write helper, one entry interface, baselines from PairResults, no import cycle.

Everything here runs without a model: a small in-memory entry stands in for a run, which is
exactly what the ``Entry`` interface promises any store can do.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import pkgutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pytest_convdiff
from pytest_convdiff.core.corpus import Corpus, Prompt
from pytest_convdiff.core.results import CheckResult, PairResult
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.store import atomic, baseline_file
from pytest_convdiff.store.cache import Cache
from pytest_convdiff.store.entry import Entry
from pytest_convdiff.store.reference import (
    ReferenceEntry,
    ReferenceSource,
    is_reference,
    open_reference_run,
    reference_info,
    save_reference,
    write_safetensors,
)
from pytest_convdiff.store.run import ModelRun

ROOT = "pytest_convdiff"


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_the_target_whole(tmp_path):
    target = tmp_path / "sub" / "doc.json"
    atomic.write_json(target, {"a": 1}, indent=2)
    atomic.write_text(tmp_path / "t.txt", "hello")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "t.txt").read_text() == "hello" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and _listing(target.parent) == ["doc.json"]


def test_a_writer_that_fails_halfway_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")

    def writer(fh):
        fh.write(b"half of the new content")
        raise RuntimeError("the producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        atomic.write_with(target, writer)
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["big.bin"]
    with pytest.raises(TypeError):
        atomic.write_json(target, {"x": object()})
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["big.bin"]


# --------------------------------------------------------------------------- the entry interface


class MemoryEntry:
    """An Entry whose arrays live in memory (any object with these five members is an entry)."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], fail_on: str | None = None) -> None:
        self.path = Path("memory")
        self.arrays = arrays
        self.meta = {**meta, "files": {n: {} for n in arrays}}
        self.fail_on = fail_on
        self.calls: dict[str, int] = {}

    @property
    def identity(self) -> str:
        return "memory"

    def has(self, name: str) -> bool:
        return name in self.arrays

    def array(self, name: str) -> np.ndarray:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == self.fail_on and self.calls[name] > 1:  # the first call only asks for the shape
            raise OSError("the source went away while its bytes were copied")
        return self.arrays[name]


CORPUS = Corpus((Prompt("one", "first prompt"), Prompt("two", "second prompt")), "memory.jsonl")


def _memory_run(fail_on: str | None = None) -> ModelRun:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for i, n in enumerate((3, 5)):
        arrays[f"p{i}.own_tokens"] = np.arange(n, dtype=np.int64)
        arrays[f"p{i}.inputs"] = np.arange(n, dtype=np.int64)
        arrays[f"p{i}.logits"] = rng.standard_normal((n, 7)).astype(np.float32)
        arrays[f"p{i}.hidden"] = rng.standard_normal((2, n, 4)).astype(np.float16)
    info = {"path": "m", "backend": "transformers", "num_layers": 2, "vocab_size": 7, "hidden_size": 4}
    meta = {"info": info, "prompts": ["one", "two"], "pieces": {"one": ["a"] * 3, "two": ["b"] * 5},
            "spec": {"path": "m", "backend": "transformers"}, "sublayers": [], "key": "k"}
    return ModelRun(ReferenceSource("m"), MemoryEntry(arrays, meta, fail_on), from_cache=False)


def test_cache_entries_references_and_memory_entries_are_all_entries(tmp_path):
    w = Cache(tmp_path / "cache").writer("k")
    w.add("x", np.zeros(3))
    assert isinstance(w.commit({}), Entry)
    run = _memory_run()
    assert isinstance(run.entry, Entry)
    path = save_reference(run, tmp_path / "golden", CORPUS)
    assert isinstance(ReferenceEntry(path), Entry)


def test_model_run_is_one_class_wherever_it_is_imported_from():
    from pytest_convdiff import runner

    assert runner.ModelRun is ModelRun and pytest_convdiff.ModelRun is ModelRun


def test_a_reference_roundtrips_any_entry_without_a_model(tmp_path):
    run = _memory_run()
    path = save_reference(run, tmp_path / "golden", CORPUS)
    assert is_reference(path) and _listing(tmp_path) == ["golden"]
    info = reference_info(path)
    assert info.num_layers == 2 and info.vocab_size == 7 and info.extra["reference"] == str(path)
    back = open_reference_run(path, CORPUS)
    assert back.from_cache and back.spec.path == str(path)
    for pid in ("one", "two"):
        assert np.array_equal(back.logits(pid), run.logits(pid))
        assert back.hidden(pid).dtype == np.float16 and np.array_equal(back.hidden(pid), run.hidden(pid))
        assert back.inputs(pid) == run.inputs(pid) and back.pieces(pid) == run.pieces(pid)
    assert back.hidden_swap("one") is None and back.sublayers("one") == {}


def test_a_failing_reference_write_leaves_the_old_reference_and_no_temporary_file(tmp_path):
    path = save_reference(_memory_run(), tmp_path / "golden", CORPUS)
    before = path.read_bytes()
    with pytest.raises(OSError, match="went away"):
        save_reference(_memory_run(fail_on="p1.logits"), path, CORPUS)  # after p0's arrays were written
    assert path.read_bytes() == before and _listing(tmp_path) == ["golden"]
    with pytest.raises(TypeError, match="cannot be stored"):
        write_safetensors(path, {"x": lambda: np.array(["text"], dtype=object)}, {})
    assert path.read_bytes() == before and _listing(tmp_path) == ["golden"]


# --------------------------------------------------------------------------- baselines


def _pair(pid: str, nmse: float, *, error: str | None = None, rfn: tuple[float, ...] = (0.01, 0.02)) -> PairResult:
    return PairResult(pid, f"{pid}-a", f"{pid}-b", "transformers", "llama.cpp", error=error,
                      checks=[CheckResult("nmse", "", nmse, 0.01, "passed", "")],
                      layers=[{"index": i, "rfn": r} for i, r in enumerate(rfn)],
                      metrics={"nmse": nmse, "kl_mean": np.float64(0.002), "kl_p99": float("nan"), "ppl_ratio": 1.0,
                               "topk_ordered": {1: 0.97}, "topk_overlap": {"5": 0.9}})


def test_snapshot_takes_a_pair_result_and_is_json_safe():
    snap = baseline_file.snapshot(_pair("p", 1e-3))
    assert snap is not None
    assert (snap["nmse"], snap["top1"], snap["top5"], snap["rfn"]) == (1e-3, 0.97, 0.9, [0.01, 0.02])
    assert snap["kl_p99"] is None and type(snap["kl_mean"]) is float  # NaN -> null, numpy -> Python
    json.dumps(snap, allow_nan=False)
    empty = PairResult("q", "a", "b", None, None)
    assert baseline_file.snapshot(empty) is None
    assert baseline_file.snapshot(PairResult.from_dict(_pair("p", 1e-3).to_dict()))["top1"] == 0.97  # read back from JSON


def test_update_keeps_other_pairs_and_skips_errored_ones(tmp_path):
    path = tmp_path / "baseline.json"
    assert baseline_file.load(path) == {}
    assert baseline_file.update(path, [_pair("p1", 1e-3), _pair("bad", 1e-3, error="boom")]) == ["p1"]
    assert baseline_file.update(path, [_pair("p2", 2e-3)]) == ["p2"]
    stored = baseline_file.load(path)
    assert set(stored) == {"p1", "p2"} and stored["p1"]["nmse"] == 1e-3
    assert json.loads(path.read_text())["version"] == baseline_file.VERSION and _listing(tmp_path) == ["baseline.json"]


def test_regressions_compare_a_snapshot_with_the_stored_one(tmp_path):
    path = tmp_path / "baseline.json"
    baseline_file.update(path, [_pair("p", 1e-3)])
    tol = baseline_file.parse_tolerances("")
    same = baseline_file.regressions(baseline_file.snapshot(_pair("p", 1.2e-3)), baseline_file.load(path)["p"], tol)
    assert not same["nmse"]["worse"] and not same["rfn"]["worse"]
    worse = baseline_file.regressions(baseline_file.snapshot(_pair("p", 3e-3, rfn=(0.01, 0.5))), baseline_file.load(path)["p"], tol)
    assert worse["nmse"]["worse"] and worse["nmse"]["old"] == 1e-3 and worse["rfn"]["worse"]
    assert "layer 1" in worse["rfn"]["detail"]


def test_a_failing_baseline_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "baseline.json"
    baseline_file.update(path, [_pair("p1", 1e-3)])
    before = path.read_bytes()
    unserialisable = _pair("p2", 1e-3)
    unserialisable.model_a = object()  # type: ignore[assignment]
    with pytest.raises(TypeError):
        baseline_file.update(path, [unserialisable])
    assert path.read_bytes() == before and _listing(tmp_path) == ["baseline.json"]

    def refuse(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", refuse)  # the new content was written, the rename fails
    with pytest.raises(OSError, match="no space"):
        baseline_file.update(path, [_pair("p3", 1e-3)])
    monkeypatch.undo()
    assert path.read_bytes() == before and _listing(tmp_path) == ["baseline.json"]


def test_a_damaged_baseline_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text("{torn")
    with pytest.raises(ConvdiffError, match="baseline.json: the baseline file is unreadable"):
        baseline_file.load(path)
    path.write_text(json.dumps({"version": 99, "pairs": {}}))
    with pytest.raises(ConvdiffError, match="not a convdiff baseline"):
        baseline_file.update(path, [_pair("p", 1e-3)])


# --------------------------------------------------------------------------- the import graph


def _package_modules() -> tuple[dict[str, Path], list[str]]:
    """Every module of the package and its source file (importing packages is how pkgutil finds subpackages)."""
    failed: list[str] = []
    found = {ROOT: Path(pytest_convdiff.__file__)}
    for mod in pkgutil.walk_packages(pytest_convdiff.__path__, f"{ROOT}.", onerror=failed.append):
        spec = importlib.util.find_spec(mod.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            found[mod.name] = Path(spec.origin)
    return found, failed


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, source: Path, modules: dict[str, Path], *, lazy: bool = False) -> set[str]:
    """The package modules ``name`` imports: at module level only (what runs when it is imported, so not
    inside functions nor ``if TYPE_CHECKING:``), or, with ``lazy``, anywhere in the file."""
    is_package = source.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()

    def add(node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            return
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
            else node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in modules else base)

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                add(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            else:
                for attr in ("body", "orelse", "finalbody"):
                    visit(getattr(node, attr, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    if lazy:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                add(node)
    else:
        visit(tree.body)
    return {m for m in out if m in modules and m != name}


def _import_graph(*, lazy: bool = True) -> dict[str, set[str]]:
    """Import edges between the package's modules: every import in a file (inside functions and under
    ``TYPE_CHECKING`` too, which is how a cycle hides), or with ``lazy=False`` what runs at import only.

    Importing ``a.b.c`` from outside package ``a.b`` runs ``a/b/__init__`` first, so that edge is added
    too (not for the root package, whose ``__init__`` every import runs first anyway).
    """
    modules, failed = _package_modules()
    assert not failed, f"packages that failed to import: {failed}"
    graph: dict[str, set[str]] = {}
    for name, source in modules.items():
        edges = set()
        for target in _imports(name, source, modules, lazy=lazy):
            edges.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component that has one (Tarjan, then a path inside it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for comp in components:
        start = min(comp)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:  # breadth first: the shortest way back to start
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        cycle = [*paths[v], start]
                        break
                    if w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        out.append(cycle or sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    """Strict: function-level and TYPE_CHECKING imports count, so a cycle cannot hide behind a lazy import."""
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles (any import, lazy ones too):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_strict_graph_sees_lazy_and_type_checking_imports(tmp_path):
    """The cycle test must fail on the cycles the module-level graph missed (they were on main before)."""
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n"
                   "def f():\n    from pkg import c\n")
    modules = {"pkg.mod": src, "pkg.b": src, "pkg.c": src}
    assert _imports("pkg.mod", src, modules) == set()
    assert _imports("pkg.mod", src, modules, lazy=True) == {"pkg.b", "pkg.c"}


# The layers, lowest first: a module imports its own layer or lower ones only (docs/architecture.md).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "core"),
    ("store", "sources"),
    ("backends",),
    ("pair",),
    ("runner",),
    ("checks",),
    ("comparison", "measure_worker", "perplexity"),
    ("manifest", "options", "zoo", "reporting", "plugin", "__main__"),
)


def _layer(module: str) -> int:
    top = module.removeprefix(f"{ROOT}.").split(".")[0]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its top-level name to LAYERS and docs/architecture.md")


def test_imports_go_one_way_down_the_layers():
    """core -> store -> backends -> pair -> runner -> checks -> comparison -> plugin and reporting."""
    graph = _import_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if m != ROOT
                    for t in targets if t != ROOT and _layer(t) > _layer(m))
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_store_and_runner_are_in_no_import_cycle():
    cycles = [c for c in _cycles(_import_graph())
              if any(m.startswith(f"{ROOT}.store") or m == f"{ROOT}.runner" for m in c)]
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_store_imports_nothing_above_it():
    """store/ (with ``sources``, which says what a stored file is) sits under the runner and the pipeline: a
    reference is served without them."""
    modules, _ = _package_modules()
    allowed = (f"{ROOT}.store", f"{ROOT}.sources", f"{ROOT}.core", f"{ROOT}.errors", f"{ROOT}.backends.base")
    above = ("runner", "compare", "comparison", "plugin", "checks", "reporting", "manifest")
    for name, source in modules.items():
        if not name.startswith(f"{ROOT}.store"):
            continue
        eager = _imports(name, source, modules)
        assert not [m for m in eager if not any(m == a or m.startswith(a + ".") for a in allowed)], (name, eager)
        anywhere = _imports(name, source, modules, lazy=True)  # not even lazily or for type checking
        assert not [m for m in anywhere if m.removeprefix(f"{ROOT}.").split(".")[0] in above], (name, anywhere)
