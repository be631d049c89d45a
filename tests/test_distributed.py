"""Celo under 2-process data parallelism on CPU (gloo): tests/scripts/ddp_trainer.py under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.ddp_trainer import CASES

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_trainer.py"


def run(command: list[str], out_dir: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, str(SCRIPT), str(out_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.mark.slow
def test_two_processes_feed_the_logged_loss_and_stay_identical(tmp_path):
    """Same global batch (2 x 2 vs 1 x 4): fed loss == logged loss on each rank, bit-identical
    parameters across ranks, and the one-process run's parameters within float tolerance."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "ddp")
    run([sys.executable], tmp_path / "single")
    for kind, accumulation in CASES:
        name = f"{kind}-ga{accumulation}"
        ranks = [torch.load(tmp_path / "ddp" / f"{name}-rank{r}.pt") for r in (0, 1)]
        single = torch.load(tmp_path / "single" / f"{name}-rank0.pt")
        for result in ranks:
            assert len(result["fed"]) == 4
            assert result["fed"] == result["logged"], name
        assert ranks[0]["fed"] == ranks[1]["fed"], name
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), name
        torch.testing.assert_close(ranks[0]["fed"], single["fed"], rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["params"], single["params"], rtol=0, atol=1e-5, msg=name)
