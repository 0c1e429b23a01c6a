# Sourced by bench/gpu_plugin.sh and bench/gpu_verify.sh (from the repository root, OUT set): the log
# in $OUT, the environment, and what was carried to the device machine: wheels in .whl (installed to
# /tmp/site) and a prebuilt exllamav2 extension in .dev/exllamav2_ext (which skips its ~2.5 min build).
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD
PY=${PYTHON:-python3}
note() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  note "installing the carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { note "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -f .dev/exllamav2_ext/exllamav2_ext.so.gz ]; then
  mkdir -p /tmp/exl2ext && gunzip -c .dev/exllamav2_ext/exllamav2_ext.so.gz >/tmp/exl2ext/exllamav2_ext.so
  note "using the prebuilt extension from .dev/exllamav2_ext/exllamav2_ext.so.gz"
  export PYTHONPATH=/tmp/exl2ext:$PYTHONPATH
fi
