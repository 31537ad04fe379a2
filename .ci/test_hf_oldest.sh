#!/usr/bin/env bash
# Run the Hugging Face integration tests against the oldest supported stack
# (transformers 5.0.0, the lowest accelerate the package allows).
#
# The Trainer changed a lot between 5.0 and the newest 5.x (loss scaling under
# gradient accumulation, the sampler hook, checkpoint key names), so CI runs the
# HF tests twice: with the versions .ci/run installed, and with this script.
#
# The venv lives outside the repository (so `ruff check .` and pytest never see
# it) and is reused when it already holds the right versions:
#   MIU_HF_OLDEST_VENV   venv folder (default: ~/.cache/miu-hooks/venv-hf50)
#   PYTHON               interpreter that creates it (default: python3)
# Idempotent; needs no standard input. Exit code: pytest's (5, "no tests", is 0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${MIU_HF_OLDEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/miu-hooks/venv-hf50}"
CONSTRAINTS="$ROOT/.ci/constraints.txt"
TORCH_SPEC="torch==2.13.0"
TRANSFORMERS_VERSION="5.0.0"
ACCELERATE_SPEC="accelerate>=1.10,<2"

export PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

log() { printf '\n==> [hf-oldest] %s\n' "$*"; }
die() { printf '\nERROR [hf-oldest]: %s\n' "$*" >&2; exit 1; }

log "virtual environment ($VENV)"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' </dev/null >/dev/null 2>&1; then
    echo "reusing existing venv"
else
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV" </dev/null
fi
PY="$VENV/bin/python"
"$PY" --version

# CPU torch first: an unpinned torch pulled in by transformers resolves to the CUDA build.
log "install $TORCH_SPEC (CPU build)"
"$PY" -m pip install -q -c "$CONSTRAINTS" "$TORCH_SPEC" </dev/null

# The same extras as .ci/run (the `-k hf` selection includes CLI tests that draw plots),
# with transformers pinned to the oldest supported release.
log "install the package with transformers==$TRANSFORMERS_VERSION"
"$PY" -m pip install -q -c "$CONSTRAINTS" -e "$ROOT[test,plot,image]" \
    "transformers==$TRANSFORMERS_VERSION" "$ACCELERATE_SPEC" </dev/null

"$PY" - "$TRANSFORMERS_VERSION" <<'PYEOF' || die "unexpected versions in the venv (see above)"
import sys

import accelerate
import torch
import transformers

print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}")
if transformers.__version__ != sys.argv[1]:
    sys.exit(f"expected transformers {sys.argv[1]}, got {transformers.__version__}")
if "+cpu" not in torch.__version__ and torch.version.cuda is not None:
    sys.exit(f"expected the CPU build of torch, got {torch.__version__}")
PYEOF

log "pytest tests/integration -k hf (transformers $TRANSFORMERS_VERSION)"
cd "$ROOT"
rc=0
"$PY" -m pytest tests/integration -k hf -m "not gpu" -q </dev/null || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit code 5); treating as success"
    rc=0
fi
exit "$rc"
