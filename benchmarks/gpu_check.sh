#!/usr/bin/env bash
# One-GPU check: bf16 fine-tuning vs bf16 MIU retain steps on a ViT-B/16-size model.
#
# Prepared for a fresh machine with one NVIDIA GPU and possibly no network:
#   * uses the torch already installed (or installs it from wheels in $WHEELS_DIR);
#   * installs this package with `pip install -e . --no-deps --no-build-isolation`
#     (falls back to importing the checkout directly if that fails);
#   * installs transformers / accelerate / safetensors only if missing, from
#     $WHEELS_DIR when it holds wheels, else from the index;
#   * runs benchmarks/gpu_check.py (about 1-2 minutes on an H100) under a 5-minute timeout.
#
# Usage: bash benchmarks/gpu_check.sh [--smoke] [--batch-size N] [--steps N] [--json FILE]
# Env:   PYTHON (default: .venv/bin/python if present, else python3),
#        WHEELS_DIR (default: benchmarks/_cache/wheels), GPU_CHECK_TIMEOUT (seconds, 300).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
WHEELS_DIR="${WHEELS_DIR:-$ROOT/benchmarks/_cache/wheels}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

log() { printf '==> %s\n' "$*"; }

have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

pip_install() {
    # Prefer carried wheels (offline); fall back to the index.
    if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS_DIR" "$@" && return 0
        log "offline install of $* from $WHEELS_DIR failed; trying the index"
    fi
    "$PYTHON" -m pip install -q "$@"
}

log "python: $("$PYTHON" --version 2>&1) ($PYTHON)"
if ! have torch; then
    log "torch missing: installing"
    pip_install torch
fi
"$PYTHON" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available={torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
PYEOF

for mod in transformers accelerate safetensors numpy; do
    if ! have "$mod"; then
        log "$mod missing: installing"
        pip_install "$mod"
    fi
done

if ! "$PYTHON" -c "import miu_hooks.integrations.accelerate" >/dev/null 2>&1; then
    log "installing miu_hooks (editable, no deps)"
    "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation \
        || log "editable install failed; gpu_check.py imports the checkout directly"
fi

log "running benchmarks/gpu_check.py $*"
if command -v timeout >/dev/null 2>&1; then
    timeout "${GPU_CHECK_TIMEOUT:-300}" "$PYTHON" benchmarks/gpu_check.py "$@"
else
    "$PYTHON" benchmarks/gpu_check.py "$@"
fi
