"""Today's verdicts on the real-pipeline fixtures: every built file against its fp32 transformers reference.

    python -m fixtures.pipeline                     # build the files first
    python bench/pipeline_table.py [--models tiny,smollm2] [--json /tmp/pipeline_table.json] [--out docs/pipeline.md]

For each file of fixtures/models/pipeline/MANIFEST.json: ``compare(A, B, corpus="default")`` with the
default bounds (A = the model's transformers checkpoint in fp32), the real bits per weight from the
tensor types, and llama.cpp's own check as bench/seed_method.py computes it (one prompt, last
position, NMSE < 1e-2, same token ids). These are the numbers the bounds are recalibrated on, so they
come from real runs only: each pair's row is saved to the JSON as soon as it is measured, a re-run
skips rows already there (``--refresh`` redoes them), and the Markdown is rendered from the JSON.
A's cache entry is kept for the whole model; each B's entry is deleted after its pair (SmolLM2 takes
about 1 GB per entry on the default corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fixtures import pipeline  # noqa: E402
from pytest_convdiff import compare  # noqa: E402
from pytest_convdiff.core import metrics  # noqa: E402

SEED_BOUND = 1e-2


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _runs(layers: list[int]) -> str:
    """[2, 3, 4, 9] -> "2-4,9"."""
    layers = sorted(layers)
    runs: list[str] = []
    start = prev = layers[0]
    for i in [*layers[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(runs)


def _failing(ids: list[str]) -> str:
    """Failed check ids, shortened: ``tokens×3, kl[p99], rfn[4,28-29]`` (per-layer items folded into runs)."""
    names: list[str] = []
    per_layer: dict[str, list[int]] = {}
    n_tok = 0
    for cid in ids:
        m = re.fullmatch(r"(\w+)\[layer-(\d+)\]", cid)
        if m:
            per_layer.setdefault(m.group(1), []).append(int(m.group(2)))
        elif cid.startswith("tokens["):
            n_tok += 1
        else:
            names.append(cid)
    tok_cases = [n for n in names if n.startswith("tokenizer[")]
    if len(tok_cases) > 3:  # a flipped BOS fails every case: say how many, and whether special is one
        names = [n for n in names if not n.startswith("tokenizer[")]
        special = " incl. special" if "tokenizer[special]" in tok_cases else ""
        names.insert(0, f"tokenizer×{len(tok_cases)}{special}")
    if n_tok:
        names.insert(0, f"tokens×{n_tok}")
    names += [f"{family}[{_runs(layers)}]" for family, layers in per_layer.items()]
    return ", ".join(names)


def _prune(cache: Path, keep: str) -> None:
    """Delete every cache entry except A's (entries name their model in meta.json's spec.path)."""
    for d in cache.iterdir():
        meta = d / "meta.json"
        if not meta.is_file():
            continue
        try:
            path = json.loads(meta.read_text()).get("spec", {}).get("path")
        except ValueError:
            path = None
        if path != keep:
            shutil.rmtree(d, ignore_errors=True)


def _seed(seed_fn: Any, path: Path) -> tuple[list[int], np.ndarray]:
    ids, logits = seed_fn(path)
    return list(ids), logits


def measure(entry: dict[str, Any], a_path: str, cache: Path, seed_a: tuple[list[int], np.ndarray],
            corpus: str = "default") -> dict[str, Any]:
    from seed_method import last_logits

    b_path = _rel(entry["path"])
    t0 = time.perf_counter()
    r = compare(a_path, b_path, corpus=corpus, cache_dir=cache)
    seconds = time.perf_counter() - t0
    m = r.metrics or {}
    rfns = [(layer.get("rfn"), layer["index"]) for layer in r.layers if layer.get("rfn") is not None]
    finite = [(v, i) for v, i in rfns if np.isfinite(v)]
    worst = max(finite) if finite else (None, None)
    top1 = r.find("topk[1]")
    row: dict[str, Any] = {
        "file": Path(entry["file"]).name, "model": entry["model"], "kind": entry["kind"], "quant": entry["quant"],
        "bpw": round(pipeline.bits_per_weight(entry["path"]), 3), "verdict": r.verdict, "error": r.error,
        "precision_class": r.precision_class, "failing": _failing([c.id for c in r.failed]), "failed_ids": [c.id for c in r.failed],
        "kl_mean": m.get("kl_mean"), "kl_p99": m.get("kl_p99"), "nmse": m.get("nmse"),
        "max_rfn": worst[0], "max_rfn_layer": worst[1], "nonfinite_rfn_layers": [i for v, i in rfns if not np.isfinite(v)],
        "first_divergent_layer": r.first_divergent_layer, "divergent_sublayer": r.divergent_sublayer,
        "top1": top1.value if top1 is not None else None, "nonfinite_b": m.get("nonfinite_b"),
        "seconds": round(seconds, 1), "corpus": corpus,
        "checks": {c.id: [c.value, c.threshold, c.outcome] for c in r.checks
                   if c.name not in ("tokens", "tokenizer", "config")},
    }
    if entry["kind"] == "bug":
        row["bug"] = entry["bug"]["description"]
        row["expected_layer"] = entry["expect"].get("layer")
    try:
        ids, logits = _seed(last_logits, entry["path"])
        value = float(metrics.nmse(seed_a[1], logits))
        same = ids == seed_a[0]
        row["seed"] = {"tokens_equal": same, "nmse": value, "verdict": "pass" if same and value < SEED_BOUND else "fail"}
    except Exception as exc:  # a file llama.cpp cannot load fails the seed check too
        row["seed"] = {"tokens_equal": None, "nmse": None, "verdict": "error", "error": str(exc)[:200]}
    return row


def run(models: list[str], json_path: Path, cache_root: Path, refresh: bool, only: str | None,
        corpus: str = "default") -> dict[str, Any]:
    from seed_method import last_logits

    doc = json.loads(json_path.read_text()) if json_path.is_file() else {}  # other models' rows are kept
    doc.setdefault("rows", {})
    env = _ENV
    doc["environment"] = env
    entries = pipeline.load_manifest()
    for model in models:
        mine = [e for e in entries if e["model"] == model
                and (only is None or any(o in e["file"] for o in only.split(",")))]
        if not mine:
            print(f"{model}: nothing built (python -m fixtures.pipeline --models {model})", flush=True)
            continue
        a_path = _rel(mine[0]["source_path"])
        cache = cache_root / model
        seed_a = _seed(last_logits, Path(a_path))
        for e in mine:
            key = e["file"]
            if key in doc["rows"] and not refresh:
                continue
            row = measure(e, a_path, cache, seed_a, corpus)
            row["library"] = env["library"]
            doc["rows"][key] = row
            tmp = json_path.with_name(json_path.name + ".part")
            tmp.write_text(json.dumps(doc, indent=1, default=float))
            tmp.replace(json_path)
            _prune(cache, a_path)
            print(f"{row['file']:55s} {row['verdict']:5s} {row['seconds']:6.1f} s  {row['failing']}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    return doc


def _environment() -> dict[str, Any]:
    """Machine, versions, and the state of the library as this process imported it."""
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except OSError:
        pass
    import hashlib
    import importlib.metadata as md

    # The library is measured as it is in the working tree when this process starts (its modules are
    # imported once): say which state that was, so rows from different runs can be told apart.
    h = hashlib.sha256()
    for f in sorted((ROOT / "pytest_convdiff").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "llama_cpp_python": md.version("llama_cpp_python"), "transformers": md.version("transformers"),
            "torch": md.version("torch"), "date": time.strftime("%Y-%m-%d"),
            "library": f"git {head} + working tree, pytest_convdiff sources sha256 {h.hexdigest()[:12]}"}


# --------------------------------------------------------------------------- Markdown


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e4:
            return f"{v:.{digits + 1}g}"
        return f"{v:.{digits}e}".replace("e-0", "e-").replace("e+0", "e+")
    return str(v)


def _layer(row: dict[str, Any]) -> str:
    if row["first_divergent_layer"] is None:
        return "–"
    sub = row.get("divergent_sublayer")
    return f"{row['first_divergent_layer']}" + (f" ({sub})" if sub else "")


def _seed_cell(row: dict[str, Any]) -> str:
    s = row["seed"]
    if s["verdict"] == "error":
        return "error"
    tok = "" if s["tokens_equal"] else ", tokens differ"
    return f"{s['verdict']} ({_f(s['nmse'])}{tok})"


def _rfn_cell(row: dict[str, Any]) -> str:
    cell = f"{_f(row['max_rfn'])} (L{row['max_rfn_layer']})" if row["max_rfn"] is not None else "–"
    if row.get("nonfinite_rfn_layers"):
        cell += f"; NaN from L{row['nonfinite_rfn_layers'][0]}"
    return cell


def _base_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The correct file a bug is made from: the Q4_K_M, or the F16 for an F16 bug."""
    want = f"{row['model']}.{row['quant'].lower()}.gguf"
    return next((r for r in rows if r["file"] == want), None)


def _beyond(row: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """Checks the bug fails that its correct counterpart does not: what the bug itself is caught by."""
    base = _base_row(row, rows)
    if base is None or "failed_ids" not in row or "failed_ids" not in base:
        return None
    return _failing(sorted(set(row["failed_ids"]) - set(base["failed_ids"])))


def _table(rows: list[dict[str, Any]], all_rows: list[dict[str, Any]], bugs: bool) -> list[str]:
    head = ["file", "bpw", "class", "verdict", "failing checks", "KL mean", "KL p99", "NMSE", "max rfn (layer)",
            "first div. layer", "top-1", "seed method (last-pos NMSE)"]
    if bugs:
        head[1:1] = ["expected layer"]
        head[6:6] = ["failing beyond the correct file"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['file']}`", f"{r['bpw']:.2f}", r.get("precision_class") or "–", ("**" + r["verdict"] + "**") if r["verdict"] != "pass" else "pass",
                 r["failing"] or "", _f(r["kl_mean"]), _f(r["kl_p99"]), _f(r["nmse"]), _rfn_cell(r), _layer(r),
                 _f(r["top1"], 3), _seed_cell(r)]
        if r.get("error"):
            cells[4] = "error: " + r["error"].splitlines()[0][:80]
        if bugs:
            exp = r.get("expected_layer")
            cells[1:1] = ["–" if exp is None else str(exp)]
            beyond = _beyond(r, all_rows)
            cells[6:6] = ["?" if beyond is None else (beyond or "**nothing**")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _build_section(model: str, mine: list[dict[str, Any]]) -> list[str]:
    """Sizes and build times of one model's files, from the manifest and the last build's BUILD_TIMES.json."""
    mdir = pipeline.DEFAULT_OUT / model
    try:
        times = json.loads((mdir / pipeline.TIMES).read_text())
    except (OSError, ValueError):
        return []
    entries = [e for e in pipeline.load_manifest() if e["model"] == model]
    size = sum(e["size"] for e in entries) / 1e9
    label = {"convert": "convert_hf_to_gguf (F16, BF16, Q8_0)", "quantize": "llama_model_quantize from the F16",
             "checkpoint": "bugs through the converter (checkpoint copy, convert, quantise)",
             "f16": "bugs written into the F16, then quantised", "scale-nan": "NaN block scale (copy and patch)",
             "metadata": "metadata bugs (copy of the correct Q4_K_M)"}
    groups: dict[str, float] = {}
    for e in entries:
        group = label.get(e.get("stage", ""), e.get("stage", "?"))
        groups[group] = groups.get(group, 0.0) + times.get(Path(e["file"]).name, 0.0)
    lines = [f"Build ({len(entries)} files, {size:.2f} GB, {sum(groups.values()):.0f} s in the last full build"
             + (f", plus {times['_converter']:.0f} s fetching the converter" if "_converter" in times else "") + "):", ""]
    lines += [f"- {g}: {t:.0f} s" for g, t in groups.items()]
    slow = sorted(((v, k) for k, v in times.items() if k != "_converter"), reverse=True)[:3]
    lines += ["- slowest: " + ", ".join(f"`{k}` {v:.0f} s" for v, k in slow), ""]
    return lines


NOTES = """\
## How the files are made, and what the pipeline turned up

- **Converter**: `convert_hf_to_gguf.py` from the llama-cpp-python sdist of the installed version
  (`pip download --no-deps --no-binary :all:`: about 40 s the first time, 5 s from pip's cache), of which only
  `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` (2 MB) are unpacked, run with `PYTHONPATH=gguf-py`.
  It imports torch, transformers, numpy, pyyaml, tqdm and **sentencepiece**: sentencepiece although neither
  model has a `tokenizer.model`, because the Llama converter tries the sentencepiece vocabulary first and
  catches only `FileNotFoundError`, so without the module it stops with `ModuleNotFoundError`. protobuf and
  mistral_common are not needed for these models.
- **SmolLM2's checkpoint** (its GGUF's Q4_1 weights dequantised into fp32 by transformers, as
  tests/integration/test_smollm2.py builds it) keeps `quantization_config: {quant_method: gguf}` in config.json, which the
  converter refuses (`Quant method is not yet supported: 'gguf'`). The converter reads a view of the checkpoint
  instead: links to its files and the config without that key, which is what a user's checkpoint looks like.
- **The tiny model's tokenizer is new to llama.cpp**: the converter stops with `BPE pre-tokenizer was not
  recognized` (its hash is in no list, as for any new model; upstream adds hashes with
  `convert_hf_to_gguf_update.py`). A wrapper runs the converter unchanged and, only where it would stop, answers
  `gpt-2` (the fixture's ByteLevel regex). SmolLM2's hash is known (`smollm`).
- **Quantiser**: `llama_model_quantize` from the F16, no importance matrix. K-quants need rows divisible by 256,
  so both models fall back to legacy types for most tensors and the label says little: on the tiny model (rows of
  128 and 384) Q6_K has exactly Q8_0's tensor types (8.53 bpw), Q2_K exactly Q4_0's and IQ4_XS exactly
  IQ4_NL's, so their rows below are identical; on SmolLM2 (hidden 576) Q4_K_M is 6.17 bpw, Q2_K 5.14 bpw. The
  plugin takes its bounds class from the noise the tensor types carry, not from the label
  ([bounds.md](bounds.md)): the tiny Q6_K is q8 (its tensors are Q8_0), both models' Q4_K_M are q5-6 and
  their Q2_K q4.
- **NaN**: `llama_model_quantize` refuses NaN input (`tensor 'blk.22.ffn_down.weight' has invalid data`; the
  same for a NaN in an F32 norm weight), so a NaN a converter writes survives only in the F16 file (the
  `.f16.gguf` NaN bug). The Q4_K_M NaN bug carries its NaN the only way a quantised file can: the f16 scale of
  one block (row 5, block 0 of `ffn_down`) is NaN, as a quantiser bug would write it, which makes that block's
  32 or 256 weights NaN.
- **Tied output**: SmolLM2 ties its output to the token embedding; the bug unties it with an untrained
  lm_head, which the converter writes as `output.weight`. The quantiser then types `token_embd` differently (it is
  no longer the output) and `general.size_label` changes: differences that follow from the bug. The tiny model,
  untied, gets the opposite bug (lm_head dropped, output tied to the embedding).
- **Deterministic**: two builds gave byte-identical files, and every bug file differs from the correct Q4_K_M
  only where its manifest entry says (tests/integration/test_pipeline_fixtures.py checks both).
"""


# (check id, bound name, which value is the worst)
_BUDGETS = (("nmse", "nmse", max), ("kl[mean]", "kl_mean", max), ("kl[p99]", "kl_p99", max),
            ("topk[1]", "top1", min), ("topk[5]", "top5", min), ("rfn", "rfn", max), ("ppl[ratio]", "ppl_ratio", max))


def _worst_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per precision class, the worst correct file's value of each budget and the budget's margin over it
    (for a lower bound such as top-1, the margin on the disagreement: (1 - bound) / (1 - value)). The budgets
    are today's defaults (``checks.bound_table()``), not those in force when a row was measured."""
    from pytest_convdiff import checks

    table = checks.bound_table()
    correct = [r for r in rows if r["kind"] == "correct" and r.get("checks")]
    out = ["| class | files | " + " | ".join(f"{n} {'≥' if agg is min else '≤'}" for _, n, agg in _BUDGETS) + " |",
           "|" + "---|" * (len(_BUDGETS) + 2)]
    for cls in ("float", "bf16", "q8", "q5-6", "q4", "q2-3"):
        mine = [r for r in correct if r.get("precision_class") == cls]
        if not mine:
            continue
        cells = []
        for key, name, agg in _BUDGETS:
            t = getattr(table.row(cls), name)
            vals = [(v, f"{r['model']} {r['quant']}") for r in mine for cid, (v, _t, _o) in r["checks"].items()
                    if (cid == key or (key == "rfn" and cid.startswith("rfn[layer")))
                    and isinstance(v, (int, float)) and np.isfinite(v)]
            if not vals:
                cells.append("–")
                continue
            v, who = agg(vals, key=lambda x: x[0])
            if key == "ppl[ratio]":  # on the excess over 1
                margin = (t - 1) / (v - 1) if v > 1 else float("inf")
            elif agg is max:
                margin = t / v if v else float("inf")
            else:
                margin = (1 - t) / (1 - v) if v < 1 else float("inf")
            cells.append(f"{_f(float(v))} ({who}; {_f(float(t))}, {margin:.1f}×)")
        files = ", ".join(f"{r['model']} {r['quant']}" for r in mine)
        out.append(f"| {cls} | {files} | " + " | ".join(cells) + " |")
    return out


def render(doc: dict[str, Any], models: list[str]) -> str:
    env = doc.get("environment", {})
    rows = list(doc["rows"].values())
    corpus = next((r.get("corpus") for r in rows if r.get("corpus")), "default")
    lines = [
        "# The real conversion pipeline: today's verdicts",
        "",
        "Files built by `python -m fixtures.pipeline` with llama.cpp's own `convert_hf_to_gguf.py` (from the "
        f"llama-cpp-python {env.get('llama_cpp_python')} sdist) and `llama_model_quantize`; the list, and how each "
        "bug was made, is in `fixtures/models/pipeline/MANIFEST.json` and [fixtures/pipeline.py](../fixtures/pipeline.py). "
        f"Each file is compared with `pytest_convdiff.compare(A, B, corpus=\"{corpus}\")` under the default "
        "bounds, A being the model's transformers checkpoint in fp32. Measured by `bench/pipeline_table.py` on "
        f"{env.get('cpu')} ({env.get('cores')} cores, CPU only), {env.get('date')}; transformers "
        f"{env.get('transformers')}, torch {env.get('torch')}; library: {env.get('library')}. "
        "tests/integration/test_pipeline_verdicts.py asserts the same verdicts on the `quick` corpus in CI.",
        "",
        "- **bpw**: real bits per weight from the tensor types (Σ n·bits(type) / Σ n), not the label.",
        "- **failing checks**: `tokens×n` = n prompts tokenised differently; `tokenizer×n` = n tokenizer cases; `rfn[a-b]`, `weights[a-b]` = those per-layer items of layers a to b.",
        "- **failing beyond the correct file**: the checks the bug fails that the correct file it was made from "
        "(the Q4_K_M, or the F16) does not fail: what catches the bug itself. **nothing** = caught by nothing "
        "the correct file does not also fail.",
        "- **max rfn**: the largest finite per-layer relative Frobenius error of the hidden state, and its layer.",
        "- **top-1**: fraction of positions with the same argmax.",
        "- **seed method**: llama.cpp's own check as bench/seed_method.py computes it: \"Hello, my name is\", "
        "the last position's logits, pass when the token ids are equal and NMSE < 1e-2.",
        "",
        NOTES,
        "## Worst correct conversion per precision class",
        "",
        "Each cell: the worst value over the correct files of both models in that class, which file, the "
        "default budget, and the budget's margin over it (for top-1/top-5, on the disagreement: "
        "(1 − bound) / (1 − value); for the PPL ratio, on its excess over 1). [bounds.md](bounds.md) says how the budgets were set.",
        "",
        *_worst_table(rows),
        "",
    ]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        correct = [r for r in mine if r["kind"] == "correct"]
        bugs = [r for r in mine if r["kind"] == "bug"]
        title = {"tiny": "Tiny Llama (6 layers, hidden 128, seeded weights)",
                 "smollm2": "SmolLM2-135M-Instruct"}.get(model, model)
        lines += [f"## {title}", ""]
        libs = sorted({r.get("library") or "?" for r in mine})
        if len(libs) > 1:
            lines += [f"Rows measured with {len(libs)} library states: " + "; ".join(libs), ""]
        lines += _build_section(model, mine)
        lines += ["### Correct conversions", ""]
        lines += _table(correct, rows, bugs=False)
        lines += ["", "### Conversion bugs (Q4_K_M unless the name says otherwise)", ""]
        lines += _table(bugs, rows, bugs=True)
        lines += ["", "Bugs:", ""]
        how = {e["path"].name: e["bug"]["how"] for e in pipeline.load_manifest() if e["kind"] == "bug"}
        lines += [f"- `{r['file']}`: {r['bug']}. *Made by*: {how.get(r['file'], '?')}." for r in bugs]
        failing_correct = [f"`{r['file']}` ({r['failing']})" for r in correct if r["verdict"] != "pass"]
        passing_bugs = [f"`{r['file']}`" for r in bugs if r["verdict"] == "pass"]
        masked = [f"`{r['file']}`" for r in bugs if r["verdict"] != "pass" and _beyond(r, rows) == ""]
        seed_passing_bugs = [f"`{r['file']}`" for r in bugs if r["seed"]["verdict"] == "pass"]
        seed_failing_correct = [f"`{r['file']}`" for r in correct if r["seed"]["verdict"] != "pass"]
        wrong_layer = [f"`{r['file']}` (expected {r['expected_layer']}, got {r['first_divergent_layer']})"
                       for r in bugs if r["verdict"] == "fail" and r.get("expected_layer") is not None
                       and r["first_divergent_layer"] != r["expected_layer"]]
        lines += ["", "Summary:", "",
                  f"- correct files failing today: {len(failing_correct)} of {len(correct)}"
                  + (": " + "; ".join(failing_correct) if failing_correct else ""),
                  f"- bugs passing today: {len(passing_bugs)} of {len(bugs)}"
                  + (": " + ", ".join(passing_bugs) if passing_bugs else ""),
                  f"- bugs that fail only what their correct file fails too: {len(masked)}"
                  + (": " + ", ".join(masked) if masked else ""),
                  f"- layer-local bugs caught but localised elsewhere: {len(wrong_layer)}"
                  + (": " + "; ".join(wrong_layer) if wrong_layer else ""),
                  f"- seed method: passes {len(seed_passing_bugs)} of {len(bugs)} bugs"
                  + (" (" + ", ".join(seed_passing_bugs) + ")" if seed_passing_bugs else "")
                  + f"; fails {len(seed_failing_correct)} of {len(correct)} correct files"
                  + (" (" + ", ".join(seed_failing_correct) + ")" if seed_failing_correct else ""),
                  ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--json", type=Path, default=Path("/tmp/pipeline_table.json"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "pipeline.md")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/convdiff-pipeline-cache"))
    ap.add_argument("--only", default=None, help="only files whose name contains this (comma-separated: any of them)")
    ap.add_argument("--refresh", action="store_true", help="measure again rows already in the JSON")
    ap.add_argument("--corpus", default="default", help="corpus name or path (default: default)")
    ap.add_argument("--render-only", action="store_true", help="write the Markdown from the JSON, run nothing")
    args = ap.parse_args()
    os.chdir(ROOT)  # cache entries and the report name models by paths relative to the repository
    models = [m for m in args.models.split(",") if m]
    if args.render_only:
        doc = json.loads(args.json.read_text())
    else:
        doc = run(models, args.json, args.cache, args.refresh, args.only, args.corpus)
    args.out.write_text(render(doc, [m for m in ("tiny", "smollm2") if any(
        r["model"] == m for r in doc["rows"].values())]))
    print(args.out)


_ENV: dict[str, Any] = {}

if __name__ == "__main__":
    _ENV.update(_environment())
    main()
