"""Celo under 2-process data parallelism on CPU (gloo): tests/scripts/ddp_trainer.py under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TWO_PROCESSES, run_script
from scripts.ddp_trainer import CASES

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_trainer.py"


@pytest.mark.slow
def test_two_processes_feed_the_logged_loss_and_stay_identical(tmp_path):
    """Same global batch (2 x 2 vs 1 x 4): fed loss == logged loss on each rank, bit-identical
    parameters across ranks, and the one-process run's parameters within float tolerance."""
    run_script(SCRIPT, TWO_PROCESSES, tmp_path / "ddp")
    run_script(SCRIPT, (), tmp_path / "single")
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
