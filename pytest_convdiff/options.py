"""Every option of the plugin, declared once: its flags and ini key, its help, how its value is read and
which ``RunSettings`` field it sets; and how a set of option values becomes a session's pairs (a ``Zoo``).

The table is read in every pytest run where the plugin is installed, so this module imports only the
standard library at import time; the parsers import what they need when a convdiff option is in play.
A parser takes the raw value (command-line text, an ini string or line list, a bool for flags) and
returns the typed value, or raises ValueError / ConvdiffError saying what is wrong; ``read_options``
adds the option's name (``OptionError``), and the plugin turns that into a usage error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OPTIONS", "PARSERS", "Option", "OptionError", "build_zoo", "parse", "read_options"]


@dataclass(frozen=True)
class Option:
    """One option: its flags, ini key, help; how its value is read (``parse``, a key of ``PARSERS``), and
    the ``RunSettings`` field it sets (``setting``), if any."""

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
    Option(("--model-a",), "convdiff_model_a", "reference model: transformers checkpoint dir, .gguf, EXL2 dir, "
           "saved convdiff reference, or llama-perplexity --kl-divergence-base file", metavar="PATH"),
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
    Option(("--convdiff-weights-twin",), "convdiff_weights_twin", "the weights twin of a quantised B (llama.cpp's "
           "quantiser run on A's tensors): full (every row), sampled (a seeded 1/32 of each tensor's rows, every "
           "row of B still checked against A's) or auto (default: sampled when B has more than 1 B parameters; "
           "docs/twins.md)", metavar="MODE", parse="weights_twin", setting="weights_twin"),
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
    Option(("--convdiff-shard",), "convdiff_shard", "run only shard K of N (1-based, e.g. 2/4) of the pairs, for a "
           "zoo split across CI jobs: the pairs' sorted ids are dealt round-robin, a pair is never split; join the "
           "shards' --convdiff-json reports with python -m pytest_convdiff merge", metavar="K/N", parse="shard"),
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


# --------------------------------------------------------------------------- parsers


def text(raw: Any) -> str:
    return str(raw)


def texts(raw: Any) -> list[str]:
    """A repeatable option's values (command line or ini lines), blanks dropped."""
    return [str(v) for v in raw if str(v).strip()]


def flag(raw: Any) -> bool:
    return bool(raw)


def negated(raw: Any) -> bool:
    """A ``--convdiff-no-X`` flag sets the setting X to False."""
    return not raw


def path(raw: Any) -> Path:
    return Path(os.path.expanduser(str(raw)))


def directory(raw: Any) -> Path:
    """A directory that may not exist yet, but is not a file."""
    p = path(raw)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} exists and is not a directory.")
    return p


def _int_at_least(minimum: int):
    def parse(raw: Any) -> int:
        try:
            v = int(str(raw).strip())
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {raw!r}")
        return v

    return parse


def shard(raw: Any) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N."""
    k, sep, n = str(raw).strip().partition("/")
    try:
        kk, nn = int(k), int(n)
    except ValueError:
        kk = nn = 0
    if not sep or nn < 1 or not 1 <= kk <= nn:
        raise ValueError(f"expected K/N with 1 <= K <= N (shard K of N), got {raw!r}")
    return kk, nn


def backend(raw: Any) -> str:
    from .backends import normalize_backend_name

    return normalize_backend_name(str(raw))


def backend_items(raw: Any) -> dict[str, str]:
    """``KEY=VALUE`` items as text; typed per model once its backend is known (``validate_options``)."""
    from .backends.options import parse_option_items

    return parse_option_items(raw or [])


def bounds(raw: Any) -> dict[str, float]:
    from . import checks

    out: dict[str, float] = {}
    for item in raw or []:
        out.update(checks.parse_bound_overrides(str(item)))
    return out


def corpus(raw: Any) -> Any:
    from .core.corpus import load_corpus

    return load_corpus(str(raw))


def cache_dtype(raw: Any) -> str:
    from .core.settings import cache_dtype_name

    return cache_dtype_name(str(raw))


def store(raw: Any) -> str:
    from .core.settings import store_name

    return store_name(str(raw))


def runtime_twin(raw: Any) -> str:
    from .core.settings import runtime_twin_name

    return runtime_twin_name(str(raw))


def weights_twin(raw: Any) -> str:
    from .core.settings import weights_twin_name

    return weights_twin_name(str(raw))


def imatrix(raw: Any) -> str:
    """The path of a readable importance matrix (read once now, so a wrong file stops the run at start-up)."""
    from .backends.imatrix import read

    p = os.path.expanduser(str(raw))
    read(p)
    return p


def size(raw: Any) -> Any:
    from .store.budget import parse_size

    return parse_size(raw)


def tolerances(raw: Any) -> Any:
    from .store.baseline_file import parse_tolerances

    return parse_tolerances(str(raw))


PARSERS = {
    "text": text, "texts": texts, "flag": flag, "negated": negated, "path": path, "directory": directory,
    "int>=0": _int_at_least(0), "int>=1": _int_at_least(1), "int>=2": _int_at_least(2),
    "shard": shard, "backend": backend, "backend_items": backend_items, "bounds": bounds, "corpus": corpus,
    "cache_dtype": cache_dtype, "store": store, "runtime_twin": runtime_twin, "imatrix": imatrix,
    "weights_twin": weights_twin,
    "size": size, "tolerances": tolerances,
}


def parse(kind: str, raw: Any) -> Any:
    """``raw`` read by the parser called ``kind``; a value that was not given (None, "", []) stays None."""
    if raw is None or raw == "" or raw == []:
        return None
    return PARSERS[kind](raw)


class OptionError(Exception):
    """A bad option value: ``option`` is its flag, the message says what is wrong and what is accepted."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message if message.startswith(option) else f"{option}: {message}")
        self.option = option


def read_options(get: Callable[[str], Any], names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every option's typed value (None when not given), or those named; ``get(ini_name)`` gives the raw
    value. OptionError on the first bad one."""
    from .errors import ConvdiffError

    out: dict[str, Any] = {}
    for o in OPTIONS:
        if names is not None and o.ini not in names:
            continue
        try:
            out[o.ini] = parse(o.parse, get(o.ini))
        except (ValueError, ConvdiffError) as exc:
            raise OptionError(o.flags[0], str(exc)) from None
    return out


def build_zoo(v: dict[str, Any], cache_root: Callable[[], Path], worker_id: str = "", cls: Any = None,
              **extra: Any) -> Any:
    """The session's pairs from the options' typed values (``read_options``), after the rules between
    options; OptionError names the option at fault. ``cache_root()`` gives the cache directory when none
    was given; ``worker_id``: the xdist worker (its GPU under --convdiff-gpus); ``cls``: a ``Zoo`` subclass,
    made with ``extra`` as its own fields."""
    from . import sources
    from .checks.base import BaselineConfig
    from .core.corpus import load_corpus
    from .core.pair_id import unique_pair_ids
    from .core.settings import LAYER_SWAP_NEEDS_FULL, RunSettings
    from .errors import ConvdiffError
    from .runner import ModelSpec
    from .store.baseline_file import parse_tolerances
    from .store.budget import DEFAULT_BUDGET
    from .store.cache import Cache
    from .zoo import PairSpec, Zoo, backend_options, check_model, gpu_for_worker

    model_a, model_bs = v["convdiff_model_a"], v["convdiff_model_b"] or []
    if model_bs and not model_a:
        raise OptionError("--model-b", "--model-b was given without --model-a: give the reference model with "
                          "--model-a PATH.")
    if model_a and not model_bs:
        raise OptionError("--model-a", "--model-a was given without --model-b: give the converted model(s) with "
                          "--model-b PATH.")
    fields = {o.setting: v[o.ini] for o in OPTIONS if o.setting and v[o.ini] is not None}
    if fields.get("layer_swap") and fields.get("hidden_states", True) and fields.get("store", "compact") != "full":
        raise OptionError("--convdiff-layer-swap", f"{LAYER_SWAP_NEEDS_FULL}.")
    if v["convdiff_baseline_update"] and not v["convdiff_baseline"]:
        raise OptionError("--convdiff-baseline-update", "--convdiff-baseline-update needs --convdiff-baseline PATH "
                          "(the file to write).")
    pairs: list[PairSpec] = []
    if model_a:
        backend_a, backend_b = v["convdiff_backend_a"], v["convdiff_backend_b"]
        for flag, path, backend in [("--model-a", model_a, backend_a), *(("--model-b", b, backend_b) for b in model_bs)]:
            try:
                check_model(path, backend)  # before any model loads: a typo costs a second, not a model run
            except ConvdiffError as exc:
                raise OptionError(flag, f"{flag} {path}: {exc}".replace(f"{path}: {path}:", f"{path}:")) from None
            stored = ModelSpec(path, backend)
            if flag == "--model-b" and stored.kind().only_as_a:
                raise OptionError(flag, f"--model-b {path}: a saved reference or llama-perplexity base file holds "
                                        "model A's outputs, not a model that can be run; give it as --model-a and "
                                        "the converted model as --model-b.")
        kind_a = ModelSpec(model_a, backend_a).kind()
        if v["convdiff_save_reference"] and sources.OUTPUTS not in kind_a.gives:
            raise OptionError("--convdiff-save-reference", f"--model-a {model_a} is a {kind_a.name}, already a stored "
                              "reference; --convdiff-save-reference needs the reference model.")
        try:
            (options_a,) = backend_options("--convdiff-option-a", v["convdiff_options_a"] or {}, [model_a], backend_a)
            options_b = backend_options("--convdiff-option-b", v["convdiff_options_b"] or {}, model_bs, backend_b)
        except ConvdiffError as exc:
            raise OptionError(str(exc).split(":", 1)[0], str(exc)) from None
        pairs = [PairSpec(pid, ModelSpec(model_a, backend_a, options_a), ModelSpec(b, backend_b, ob))
                 for pid, b, ob in zip(unique_pair_ids(model_a, model_bs), model_bs, options_b, strict=True)]
    baseline, n_gpus = v["convdiff_baseline"], v["convdiff_gpus"]
    return (cls or Zoo)(
        pairs, v["convdiff_prompts"] or load_corpus(None), RunSettings(**fields), v["convdiff_bounds"] or {},
        Cache(v["convdiff_cache_dir"] or cache_root(), read=not v["convdiff_refresh"],
              full_verify=v["convdiff_verify_cache"], budget=v["convdiff_cache_max_size"] or DEFAULT_BUDGET),
        save_reference=v["convdiff_save_reference"],
        baseline=BaselineConfig(baseline, v["convdiff_baseline_tolerance"] or parse_tolerances(""),
                                v["convdiff_baseline_update"]) if baseline else None,
        gpu=gpu_for_worker(worker_id, n_gpus) if n_gpus else None, **extra)
