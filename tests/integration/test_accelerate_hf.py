"""``MIUCallback`` (HF Trainer) under 2 CPU processes (gloo, torchrun + ``use_cpu=True``).

Ranks must end bit-identical (the callback's forget passes bypass DDP and must
average gradients by hand, docs/integrations.md §8), and the 2-process run must agree
with a 1-process run at the same global batch (§7 contract, rtol 1e-5).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "miu_test_launch", Path(__file__).resolve().parent / "scripts" / "launch.py"
)
assert _spec is not None and _spec.loader is not None
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)
SCRIPTS, load, single, torchrun = launch.SCRIPTS, launch.load, launch.single, launch.torchrun

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess, pytest.mark.slow]

HF_RUN = SCRIPTS / "hf_run.py"


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("hf_runs")
    (work / "one").mkdir()
    (work / "two").mkdir()
    single(HF_RUN, "--expect-world", "1", "--batch", "16", "--out", str(work / "one.pt"),
           cwd=work / "one")  # fmt: skip
    torchrun(HF_RUN, "--expect-world", "2", "--batch", "8", "--out", str(work / "two.pt"),
             cwd=work / "two")  # fmt: skip
    return {"one": load(work / "one.pt"), "two": load(work / "two.pt")}


def test_hf_callback_two_processes_identical_ranks(hf_runs: dict[str, Any]) -> None:
    two = hf_runs["two"]
    assert two["world"] == 2
    assert two["max_rank_diff"] == 0.0
    assert two["counters"]["tune"] > 0 and two["counters"]["forget"] > 0
    assert all(torch.isfinite(torch.tensor(two["losses"])))


def test_hf_callback_two_processes_match_one_process(hf_runs: dict[str, Any]) -> None:
    one, two = hf_runs["one"], hf_runs["two"]
    assert one["counters"] == two["counters"]
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-5, atol=1e-6)
