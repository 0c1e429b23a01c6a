"""The plugin's options: one namespace (``--model-a``, ``--model-b``, ``--convdiff-*``), each also an
ini/pyproject key. This module is imported in every pytest run where the plugin is installed, so it
imports nothing but pytest: parsing and validation that need the library happen in ``session``,
and only when one of these options (or a manifest) is in play.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Option:
    """One option: its flags, ini key, help; how its value is read (``parse``, a parser of
    ``pytest_convdiff.option_values`` named by string so that this table imports nothing), and the
    ``RunSettings`` field it sets (``setting``), if any."""

    flags: tuple[str, ...]
    ini: str  # also the option's dest
    help: str
    ini_type: str | None = None  # "linelist", "bool" or None (a string)
    action: str | None = None  # "append", "store_true"
    metavar: str | None = None
    cli_only: bool = False  # not an ini key (one-off actions)
    parse: str = "text"
    setting: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option(("--model-a",), "convdiff_model_a", "reference model: transformers checkpoint dir, .gguf, EXL2 dir, or "
           "saved convdiff reference", metavar="PATH"),
    Option(("--model-b",), "convdiff_model_b", "converted model to check against --model-a; repeat for several "
           "(one pair each)", "linelist", "append", "PATH", parse="texts"),
    Option(("--convdiff-backend-a", "--backend-a"), "convdiff_backend_a",
           "backend for model A (transformers, llama.cpp, exllamav2); default: detected from the path (a saved "
           "reference is recognised by its content)", metavar="NAME", parse="backend"),
    Option(("--convdiff-backend-b", "--backend-b"), "convdiff_backend_b",
           "backend for the B models; default: detected from each path", metavar="NAME", parse="backend"),
    Option(("--convdiff-option-a",), "convdiff_options_a", "backend option for model A, e.g. dtype=float32, "
           "device=cuda, n_gpu_layers=99 (unknown keys are an error that lists the valid ones)", "linelist", "append",
           "KEY=VALUE", parse="backend_items"),
    Option(("--convdiff-option-b",), "convdiff_options_b", "backend option for the B models, e.g. no_sdpa=true, "
           "n_threads=8", "linelist", "append", "KEY=VALUE", parse="backend_items"),
    Option(("--convdiff-prompts",), "convdiff_prompts", "evaluation corpus: .txt (one prompt per line), .jsonl, "
           ".parquet, or 'default' / 'quick'", metavar="FILE", parse="corpus"),
    Option(("--convdiff-max-tokens",), "convdiff_max_tokens", "truncate each prompt to N tokens (reported); "
           "default: no truncation", metavar="N", parse="int>=2", setting="max_tokens"),
    Option(("--convdiff-bound",), "convdiff_bounds", "override a default bound, e.g. rfn=0.1 (see the README's "
           "bounds table); repeatable", "linelist", "append", "NAME=VALUE", parse="bounds"),
    Option(("--convdiff-cache-dir",), "convdiff_cache_dir", "where model outputs are cached "
           "(default: .pytest_cache/d/convdiff)", metavar="DIR", parse="directory"),
    Option(("--convdiff-cache-dtype",), "convdiff_cache_dtype", "how logits and hidden states are stored: float32 "
           "(default, exact) or float16 (half the disk; see docs/performance.md)", metavar="DTYPE", parse="cache_dtype", setting="cache_dtype"),
    Option(("--convdiff-store",), "convdiff_store", "how model A's outputs are stored in the cache and in a golden "
           "reference: compact (default: its top-256 logits, log-normaliser and a seeded sketch of the logits and "
           "states, a few kB per token; see docs/storage.md) or full (every logit and state; needed by "
           "--convdiff-layer-swap and by A's arrays in the convdiff_pair fixture)", metavar="FORM", parse="store", setting="store"),
    Option(("--convdiff-runtime-twin",), "convdiff_runtime_twin", "the runtime twin of a GGUF B (A's architecture "
           "run with B's weights, docs/twins.md): quick (default: the corpus's first three prompts and its longest), "
           "full (every prompt) or off", metavar="MODE", parse="runtime_twin", setting="runtime_twin"),
    Option(("--convdiff-imatrix",), "convdiff_imatrix", "llama.cpp's importance matrix (llama-imatrix's "
           "imatrix.gguf or legacy .dat) that the GGUF B files were quantised with: their weights are then compared "
           "with an exact re-quantisation twin; without it such files are judged by error ratio (docs/twins.md)",
           metavar="FILE", parse="imatrix", setting="imatrix"),
    Option(("--convdiff-cache-max-size",), "convdiff_cache_max_size", "the most the cache may hold, e.g. 20GB, "
           "500MiB, 25%% (of the disk space it can use), 0 for no limit (default 20GB); least recently used entries "
           "not in use are evicted to make room", metavar="SIZE", parse="size"),
    Option(("--convdiff-cache-info",), "convdiff_cache_info", "list the cache (entries, pair documents, sizes, "
           "last use, in use) and exit without running tests", action="store_true", cli_only=True, parse="flag"),
    Option(("--convdiff-cache-clear",), "convdiff_cache_clear", "remove every cache entry and document that no "
           "running pytest is using, then run as usual", action="store_true", cli_only=True, parse="flag"),
    Option(("--convdiff-keep-b",), "convdiff_keep_b", "store each B model's full outputs (logits, hidden states) in "
           "the cache, as A's are, instead of reducing them into the pair's metrics as B runs; your own tests read "
           "them through the convdiff_pair fixture, which turns this on by itself", "bool", "store_true", parse="flag", setting="keep_b"),
    Option(("--convdiff-verify-cache",), "convdiff_verify_cache", "re-hash every cache file on read (default: only "
           "files whose size or mtime changed)", "bool", "store_true", parse="flag"),
    Option(("--convdiff-refresh",), "convdiff_refresh", "recompute model outputs even when the cache holds valid "
           "entries", action="store_true", cli_only=True, parse="flag"),
    Option(("--convdiff-json",), "convdiff_json", "write a JSON report of every pair", metavar="PATH", parse="path"),
    Option(("--convdiff-plot",), "convdiff_plot", "write a PNG per pair (per-layer rfn, KL) into DIR (needs "
           "matplotlib: the plot extra)", metavar="DIR", parse="directory"),
    Option(("--convdiff-html",), "convdiff_html", "write a self-contained HTML report", metavar="PATH", parse="path"),
    Option(("--convdiff-baseline",), "convdiff_baseline", "regression mode: compare each pair's metrics with those "
           "stored for it in PATH (JSON)", metavar="PATH", parse="path"),
    Option(("--convdiff-baseline-update",), "convdiff_baseline_update", "write this run's metrics into the "
           "--convdiff-baseline file (accepting them)", action="store_true", cli_only=True, parse="flag"),
    Option(("--convdiff-baseline-tolerance",), "convdiff_baseline_tolerance", "how much worse than the baseline is "
           "allowed, e.g. 'nmse:50%%,kl_mean:abs:1e-3,rfn:25%%' (defaults: nmse/kl 50%%, rfn 25%% per layer, "
           "top1/top5/ppl_ratio abs 0.01)", metavar="SPEC", parse="tolerances"),
    Option(("--convdiff-gpus",), "convdiff_gpus", "under xdist, worker gwK runs its models on GPU K mod N (through "
           "each backend's device option; the environment is left alone)", metavar="N", parse="int>=1"),
    Option(("--convdiff-save-reference",), "convdiff_save_reference", "write model A's outputs to PATH (a golden "
           "reference); later runs pass it as --model-a and never need the reference model again", metavar="PATH", parse="path"),
    Option(("--convdiff-layer-swap",), "convdiff_layer_swap", "layer-swap analysis: also run B with A's hidden "
           "states fed in for layers < K (backends that can take them); reported per layer", metavar="K", parse="int>=0", setting="layer_swap"),
    Option(("--convdiff-greedy-tokens",), "convdiff_greedy_tokens", "length of the greedy continuations of the "
           "greedy check (default 16; 0 turns the check off)", metavar="N", parse="int>=0", setting="greedy_tokens"),
    Option(("--convdiff-no-layers",), "convdiff_no_layers", "skip per-layer hidden states (logit checks only)",
           "bool", "store_true", parse="negated", setting="hidden_states"),
    Option(("--convdiff-no-tokenizer-cases",), "convdiff_no_tokenizer_cases", "skip the built-in tricky tokenizer "
           "strings", "bool", "store_true", parse="negated", setting="tokenizer_cases"),
    Option(("--convdiff-no-causality",), "convdiff_no_causality", "skip the prefix-vs-full causality probe",
           "bool", "store_true", parse="negated", setting="causality"),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("convdiff", "model-conversion checks (pytest-convdiff)")
    for o in OPTIONS:
        kw: dict[str, Any] = {"dest": o.ini, "help": o.help}
        if o.action:
            kw["action"] = o.action
        if o.metavar and o.action != "store_true":
            kw["metavar"] = o.metavar
        kw["default"] = False if o.action == "store_true" else None
        group.addoption(*o.flags, **kw)
        if not o.cli_only:
            default: Any = [] if o.ini_type == "linelist" else False if o.ini_type == "bool" else None
            parser.addini(o.ini, help=o.help, type=o.ini_type, default=default)


def value(config: pytest.Config, name: str) -> Any:
    """Command line first, then ini/pyproject."""
    v = config.getoption(name)
    if v in (None, [], False):
        opt = next(o for o in OPTIONS if o.ini == name)
        if not opt.cli_only:
            v = config.getini(name)
    return v


def in_play(config: pytest.Config) -> bool:
    """Whether any convdiff option is set (command line or ini): only then does the plugin do anything."""
    return any(value(config, o.ini) not in (None, "", [], False) for o in OPTIONS)
