#!/usr/bin/env bash
# One-GPU check of miu_hooks: plain vs MIU throughput, peak memory and syncs per step on the
# unlearn(), Accelerate and Trainer paths, on a ViT-B/16-size model (benchmarks/gpu_check.py).
#
# For a fresh clone on a GPU machine whose Python already has a CUDA build of torch, plus
# transformers, accelerate and safetensors, and no network:
#   * the whole script runs under `timeout` (GPU_CHECK_TIMEOUT, default 280 s, under 5 min);
#   * it makes its own venv (.venv-gpu, --system-site-packages: the system's torch and
#     friends are used as they are) and installs nothing but this checkout, with
#     `pip install --no-deps --no-build-isolation -e .`; if that is not possible (no venv
#     module, no setuptools), the checkout is put on PYTHONPATH instead;
#   * a missing package is reported, never installed.
#
# Usage: bash benchmarks/gpu_check.sh [--smoke] [--batch-size N] [--steps N] [--paths ...]
# Env:   PYTHON (default python3), GPU_CHECK_TIMEOUT (seconds, 280), GPU_CHECK_VENV,
#        GPU_CHECK_JSON (default: $OUT/gpu_check.json when OUT is set, else gpu_check.json).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMIT="${GPU_CHECK_TIMEOUT:-280}"
if [ -z "${GPU_CHECK_INNER:-}" ] && command -v timeout >/dev/null 2>&1; then
    # A hard limit for everything below: venv, install and the measurements.
    GPU_CHECK_INNER=1 exec timeout -k 10 "$LIMIT" bash "${BASH_SOURCE[0]}" "$@"
fi
START=$(date +%s)
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-$ROOT/.venv-gpu}"
JSON="${GPU_CHECK_JSON:-${OUT:+$OUT/}gpu_check.json}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

log() { printf '==> %s\n' "$*"; }

log "system python: $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
missing=$("$PYTHON" - <<'PYEOF'
import importlib.util
need = ["torch", "transformers", "accelerate", "safetensors", "numpy"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    log "missing in $PYTHON: $missing (this check installs nothing; use a Python that has them)"
    exit 3
fi

PY="$PYTHON"
if [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
    if "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
        >/dev/null 2>&1; then
        PY="$VENV/bin/python"
        log "miu_hooks installed (editable, no dependencies) in $VENV"
    else
        log "editable install not possible here; using the checkout on PYTHONPATH"
    fi
else
    log "no venv module; using the checkout on PYTHONPATH with $PYTHON"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available={torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
PYEOF

SPENT=$(( $(date +%s) - START ))
BUDGET=$(( LIMIT - SPENT - 45 ))  # later phases are skipped past this; leave time to write
log "running benchmarks/gpu_check.py (budget ${BUDGET} s, results in $JSON)"
"$PY" "$ROOT/benchmarks/gpu_check.py" --budget "$BUDGET" --json "$JSON" "$@"
