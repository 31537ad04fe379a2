"""Launch helpers shared by ``tests/integration/test_accelerate*.py`` (not a test module).

Loaded by path (``--import-mode=importlib`` keeps test folders off ``sys.path``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parents[2]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    # One intra-op thread per rank: 2 ranks on a 2-core machine otherwise thrash.
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check(cmd: list[str], cwd: Path, timeout: int = 300, **extra: str) -> str:
    """Run ``cmd``; raise ``AssertionError`` (with the output tail) unless it exits 0."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout, check=False
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}")
    return out


def single(script: Path, *args: str, cwd: Path) -> str:
    """One plain process."""
    return check([sys.executable, str(script), *args], cwd)


def torchrun(script: Path, *args: str, cwd: Path) -> str:
    """Two CPU ranks with torchrun (scripts use ``Accelerator(cpu=True)``/``use_cpu=True``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return check([*cmd, str(script), *args], cwd)


def accelerate_launch(script: Path, *args: str, cwd: Path) -> str:
    """Two CPU ranks the way the README says: ACCELERATE_USE_CPU=true + --multi_gpu."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return check([*cmd, str(script), *args], cwd, ACCELERATE_USE_CPU="true")


def load(path: Path) -> dict[str, Any]:
    """Read what a script saved: tensors, numbers, strings, lists and dicts only."""
    return torch.load(path, weights_only=True)
