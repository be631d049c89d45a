"""Celo2 with two gloo processes: DDP through a plain Trainer, and FSDP2-sharded tensors
(tests/scripts/celo2_distributed.py under torchrun, against the same script in one process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REFERENCE, TWO_PROCESSES

SCRIPT = Path(__file__).resolve().parent / "scripts" / "celo2_distributed.py"
WEIGHTS = REFERENCE / "celo2" / "theta_random.state"

pytestmark = pytest.mark.reference


def _run(launcher: tuple[str, ...], out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    command = [sys.executable, *launcher, str(SCRIPT), str(WEIGHTS), str(out_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.slow
def test_ddp_ranks_stay_identical_and_fsdp2_gathered_equals_unsharded(tmp_path):
    _run(TWO_PROCESSES, tmp_path / "two")
    _run((), tmp_path / "one")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "one" / "rank0.pt")
    assert torch.equal(ranks[0]["ddp"], ranks[1]["ddp"])
    torch.testing.assert_close(ranks[0]["ddp"], single["ddp"], rtol=0, atol=1e-5)
    assert max(r["fsdp"] for r in ranks) < 1e-6
