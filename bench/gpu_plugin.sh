#!/usr/bin/env bash
# The plugin end to end on a CUDA machine: exllamav2 pairs (EXL2 conversions, FP16 through
# exllamav2 with and without SDPA) and the transformers backend on CUDA. Writes one JSON report
# per run and the full log to $OUT (default ./out/gpu-plugin).
#
# On this workplace's device machine (the `run` tool), from the repository root, carry:
#   .whl (exllamav2 and the wheels it misses there), .dev/exllamav2_ext (a prebuilt extension),
#   fixtures/models/{tiny-llama,tiny-llama-fp16,tiny-llama-bf16,_tokenizer,BUILD_STAMP}
# and run: bash bench/gpu_plugin.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu-plugin}
# shellcheck source=bench/gpu_env.sh
. bench/gpu_env.sh
M=fixtures/models
X=fixtures/exl2
run() {
  local name=$1; shift
  echo "=== $(date +%T) $name: pytest $*" | tee -a "$LOG"
  # "bench" as the path: collect no test files, only the generated convdiff items
  "$PY" -m pytest bench -p pytest_convdiff.plugin -p no:cacheprovider -q --convdiff-cache-dir /tmp/convdiff-cache \
    --convdiff-json "$OUT/$name.json" "$@" 2>&1 | tail -n 60 | tee -a "$LOG"
  echo "=== rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}
nvidia-smi -L | tee -a "$LOG"
"$PY" -m fixtures.tiny >/dev/null
# 1. EXL2 conversions against the transformers reference, exllamav2 with the causal path.
run exl2 --model-a $M/tiny-llama --model-b $X/tiny-llama-6.0bpw --model-b $X/tiny-llama-4.0bpw \
  --model-b $X/tiny-llama-broken-layer3-6.0bpw --convdiff-option-b no_sdpa=true
# 1b. The 4.0 bpw conversion of the random-weight tiny model with the bounds docs/bounds.md gives for it,
#     and layer-swap analysis on the broken conversion (A's states fed in for layers < 4).
run exl2-4bpw-bounds --model-a $M/tiny-llama --model-b $X/tiny-llama-4.0bpw --convdiff-option-b no_sdpa=true \
  --convdiff-bound nmse=0.3,top1=0.35,top5=0.5,rfn=0.6,kl_mean=0.1,kl_p99=0.5,ppl_ratio=1.2
run exl2-swap --model-a $M/tiny-llama --model-b $X/tiny-llama-broken-layer3-6.0bpw --convdiff-option-b no_sdpa=true \
  --convdiff-layer-swap 4
# 2. FP16 through exllamav2: default SDPA path (causality must fail), then no_sdpa (must pass).
run exl2-sdpa --model-a $M/tiny-llama --model-b $M/tiny-llama-fp16 --backend-b exllamav2
run exl2-nosdpa --model-a $M/tiny-llama --model-b $M/tiny-llama-fp16 --backend-b exllamav2 --convdiff-option-b no_sdpa=true
# 3. transformers on CUDA: fp32 reference on the GPU against bf16 and fp16 copies on the GPU.
run hf-cuda --model-a $M/tiny-llama --model-b $M/tiny-llama-bf16 --model-b $M/tiny-llama-fp16 \
  --convdiff-option-a device=cuda --convdiff-option-b device=cuda
# 4. The same exllamav2 pairs under xdist (two workers sharing the GPU).
run exl2-xdist -n 2 --convdiff-gpus 1 --model-a $M/tiny-llama --model-b $X/tiny-llama-6.0bpw --model-b $X/tiny-llama-broken-layer3-6.0bpw \
  --convdiff-option-b no_sdpa=true
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, glob, os
for f in sorted(glob.glob(os.path.join(os.environ.get("OUT", "out/gpu-plugin"), "*.json"))):
    for p in json.load(open(f))["pairs"]:
        fails = sorted({c["name"] + ("[" + c["param"] + "]" if c["param"] else "") for c in p["checks"] if c["outcome"] in ("failed", "error")})
        m = p.get("metrics") or {}
        print(os.path.basename(f), p["id"], p["verdict"], p.get("precision_class"), "fdl", p["first_divergent_layer"],
              "nmse", m.get("nmse"), "top1", (m.get("topk_ordered") or {}).get("1"), "kl", m.get("kl_mean"),
              "rfn", [round(l["rfn"], 4) for l in p["layers"]],
              "rfn_swap", [round(l["rfn_swap"], 5) for l in p["layers"] if "rfn_swap" in l],
              "greedy", [c["outcome"] for c in p["checks"] if c["name"] == "greedy"],
              "failed:", fails[:12], (p.get("error") or "")[:300], p.get("notes"))
PYEOF
