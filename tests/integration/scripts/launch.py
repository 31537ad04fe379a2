"""Launch helpers shared by ``tests/integration/test_accelerate*.py`` (not a test module).

Loaded by path (``--import-mode=importlib`` keeps test folders off ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parents[2]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    # One intra-op thread per rank: 2 ranks on a 2-core machine otherwise thrash.
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # A rank that aborts (SIGABRT from a C++ runtime, or from check() on a hang) prints
    # every thread's Python stack first.
    out.update(PYTHONFAULTHANDLER="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _abort_tree(root: int) -> None:
    """SIGABRT ``root`` and all its descendants (each Python process prints its stacks).

    torchrun starts every rank in a session of its own, so the tree is walked (psutil,
    a dependency of accelerate) rather than signalled as one process group. Whatever
    still runs 30 s later is killed.
    """
    try:
        top = psutil.Process(root)
        tree = [*top.children(recursive=True), top]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGABRT)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


class TeardownWarning(UserWarning):
    """Every rank finished its work, then the launch hung or failed in process teardown."""


#: The launcher sets this to a fresh folder; a script calls :func:`mark_rank_done` there.
DONE_DIR_ENV = "MIU_TEST_DONE_DIR"


#: Seconds :func:`finish_rank` leaves gloo's worker threads before the group is torn down.
SETTLE_S = 0.5


def mark_rank_done(rank: int) -> None:
    """Record that ``rank`` passed its last collective with its results written.

    A no-op outside :func:`check`'s launches. Launched scripts call it through
    :func:`finish_rank`.
    """
    folder = os.environ.get(DONE_DIR_ENV)
    if folder:
        (Path(folder) / f"rank{rank}.done").touch()


def finish_rank(rank: int) -> None:
    """Mark ``rank`` done, then let gloo's worker threads finish before the group goes.

    Called by a launched script after its final barrier, right before it destroys its
    process group. A gloo worker thread may still be freeing the last collectives'
    work, and freeing a tensor that Python also holds takes the GIL. A process group
    destroyed at that moment (by ``destroy_process_group``, or when the DDP reducer
    that holds it is freed) joins its worker threads while holding the GIL: each
    waits for the other, for ever. A two-rank Trainer run hung so here (torch 2.13,
    transformers 5.25): the main thread in ``~ProcessGroupGloo`` in ``std::thread::join``
    from ``Reducer::~Reducer``, the worker in ``AsyncBarrierWork::~AsyncBarrierWork`` →
    ``AsyncAllgatherWork::~AsyncAllgatherWork`` → ``decref_pyobject``, waiting for the GIL.
    Sleeping releases the GIL, so the worker finishes first.
    """
    mark_rank_done(rank)
    time.sleep(SETTLE_S)


def check(
    cmd: list[str], cwd: Path, timeout: int = 300, ranks: int | None = None, **extra: str
) -> str:
    """Run ``cmd``; raise ``AssertionError`` (with the output tail) unless it exits 0.

    When it outlives ``timeout`` seconds, it and every process it started get SIGABRT,
    so each Python process (the launcher and every rank) prints its threads' stacks
    (``PYTHONFAULTHANDLER``) into the error: a hang says where it hangs.

    ``ranks``: the launch starts this many ranks, each of which calls
    :func:`finish_rank` after its last barrier. When all of them did, a hang or a
    crash afterwards happened in torch's process-group teardown, not in the code
    under test (gloo's teardown can hang in ``destroy_process_group``, pytorch#75097,
    or abort at interpreter exit without it): that is a :class:`TeardownWarning`
    carrying the stacks, not a failure. The script's own checks ran before the mark.
    A launch that exits 0 without every rank's mark fails: some rank skipped its end.
    """
    done_dir = tempfile.mkdtemp(prefix="miu-ranks-") if ranks else None
    if done_dir:
        extra = {**extra, DONE_DIR_ENV: done_dir}
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=_no_core_dumps,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            problem = None if proc.returncode == 0 else f"failed ({proc.returncode})"
        except subprocess.TimeoutExpired:
            _abort_tree(proc.pid)
            stdout, stderr = proc.communicate()
            problem = f"still ran after {timeout} s; stacks at SIGABRT"
        done = len(list(Path(done_dir).glob("rank*.done"))) if done_dir else 0
    finally:
        if done_dir:
            shutil.rmtree(done_dir, ignore_errors=True)
    out = stdout + stderr
    if problem is None and ranks and done != ranks:
        problem = f"exited 0, but {done} of {ranks} ranks called mark_rank_done"
    if problem is None:
        return out
    message = f"{' '.join(cmd)} {problem}:\n{out[-20000:]}"
    if ranks and done == ranks:
        warnings.warn(f"after every rank finished, {message}", TeardownWarning, stacklevel=2)
        return out
    raise AssertionError(message)


def single(script: Path, *args: str, cwd: Path) -> str:
    """One plain process."""
    return check([sys.executable, str(script), *args], cwd)


def torchrun(script: Path, *args: str, cwd: Path) -> str:
    """Two CPU ranks with torchrun (scripts use ``Accelerator(cpu=True)``/``use_cpu=True``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return check([*cmd, str(script), *args], cwd, ranks=2)


def accelerate_launch(script: Path, *args: str, cwd: Path) -> str:
    """Two CPU ranks the way the README says: ACCELERATE_USE_CPU=true + --multi_gpu."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return check([*cmd, str(script), *args], cwd, ACCELERATE_USE_CPU="true")


def load(path: Path) -> dict[str, Any]:
    """Read what a script saved: tensors, numbers, strings, lists and dicts only."""
    import torch  # here, so that a launched script importing mark_rank_done stays light

    return torch.load(path, weights_only=True)
