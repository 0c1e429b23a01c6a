#!/usr/bin/env bash
# Verify the exllamav2 backend on a CUDA machine: JIT-build exllamav2, convert the tiny Llama to
# EXL2 (4.0 / 6.0 bpw, and the broken-layer-3 model at 6.0 bpw) and run tests/unit/backends/test_exl2_backend.py,
# which prints every number (NMSE, top-1, KL, per-layer rfn) and writes them to results.json.
#
# On this workplace's device machine (the `run` tool), from the repository root:
#   carry:   [".whl", "fixtures/models/tiny-llama", "fixtures/models/tiny-llama-fp16",
#             "fixtures/models/tiny-llama-broken-layer3", "fixtures/models/_tokenizer",
#             "fixtures/models/BUILD_STAMP"]  (not all of fixtures/models: it may hold large GGUFs;
#             without them the script rebuilds the tiny fixtures there in seconds)
#            + ".dev/exllamav2_ext" to reuse a built extension
#   command: bash bench/gpu_verify.sh
# .whl holds exllamav2-0.3.2-py3-none-any.whl and the wheels it misses there (fastparquet, cramjam,
# websockets), fetched with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`.
# Elsewhere: pip install 'pytest-convdiff[exllamav2,transformers]' and run the same script.
#
# Outputs in $OUT (default ./out/gpu-verify): log.txt, results.json, exl2-fixtures.tar.gz (the
# converted models, to unpack at the repository root) and exllamav2_ext.so.gz (the built extension:
# put it in .dev/exllamav2_ext/ and carry that folder to skip the ~2.5 min build next time).
# Converted models already in fixtures/exl2 (with a matching SOURCE_STAMP) are reused, not remade.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu-verify}
# shellcheck source=bench/gpu_env.sh
. bench/gpu_env.sh
step() {
  local t0=$SECONDS rc
  note "RUN: $*"
  "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  note "rc=$rc after $((SECONDS - t0))s: $*"
  return "$rc"
}

step nvidia-smi -L
step "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
step "$PY" -m fixtures.tiny || exit 1

# 1. exllamav2's CUDA extension (JIT build at first import, ~2.5 min with MAX_JOBS=16).
step "$PY" -c "
import time; t = time.time()
from exllamav2.ext import exllamav2_ext as e
from exllamav2 import attn, version
print('exllamav2', version.__version__, 'extension', e.__file__, f'{time.time() - t:.0f}s')
print('flash_attn', attn.has_flash_attn, 'xformers', attn.has_xformers, 'lower_right_sdpa', attn.has_lower_right_sdpa)
" || exit 1
SO=$(find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name 'exllamav2_ext*.so' 2>/dev/null | head -1)
[ -f /tmp/exl2ext/exllamav2_ext.so ] && SO=""
if [ -n "$SO" ]; then
  gzip -c "$SO" >"$OUT/exllamav2_ext.so.gz"
  note "extension $SO: $(du -h "$SO" | cut -f1), gz $(du -h "$OUT/exllamav2_ext.so.gz" | cut -f1)"
  [ "$(stat -c %s "$OUT/exllamav2_ext.so.gz")" -gt 16000000 ] && rm -f "$OUT/exllamav2_ext.so.gz" && note "extension too big to bring back"
fi

# 2. The module list of the FP16 tiny model (how states map to decoder layers).
step "$PY" -c "
from exllamav2 import ExLlamaV2, ExLlamaV2Config
c = ExLlamaV2Config('fixtures/models/tiny-llama-fp16'); m = ExLlamaV2(c); m.load()
print('head_layer_idx', m.head_layer_idx, 'vocab', c.vocab_size, 'head padding', m.modules[-1].padding)
for i, mod in enumerate(m.modules): print(i, type(mod).__name__, getattr(mod, 'layer_idx', None), mod.key)
from pytest_convdiff.backends import exl2; b = exl2.load('fixtures/models/tiny-llama-fp16', {}); print('state indices', b.state_indices, b.info)
"

# 3. Conversions (made by the test session, in parallel) and the tests, with every number printed.
export CONVDIFF_EXL2_DIR=$PWD/fixtures/exl2 CONVDIFF_EXL2_REPORT=$OUT/results.json
step "$PY" -m pytest tests/unit/backends/test_exl2_backend.py -o addopts="" -p no:cacheprovider -p no:convdiff \
  -v -s -rA --tb=short --durations=10
TEST_RC=$?

if [ -d fixtures/exl2 ]; then
  du -sh fixtures/exl2/* 2>&1 | tee -a "$LOG"
  find fixtures/exl2 -type f | sort | tee -a "$LOG"
  tar czf "$OUT/exl2-fixtures.tar.gz" fixtures/exl2
  sha256sum fixtures/exl2/*/output.safetensors | tee -a "$LOG"
fi
note "pytest rc=$TEST_RC"
exit "$TEST_RC"
