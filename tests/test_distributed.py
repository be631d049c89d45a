"""Celo under 2-process data parallelism on CPU (gloo): tests/scripts/ddp_trainer.py under torchrun
(the conftest fixture ``two_process_runs``)."""

from __future__ import annotations

import pytest
import torch
from scripts import ddp_trainer
from scripts.ddp_trainer import CASES


@pytest.mark.slow
def test_two_processes_feed_the_logged_loss_and_stay_identical(two_process_runs, tmp_path):
    """Same global batch (2 x 2 vs 1 x 4): fed loss == logged loss on each rank, bit-identical
    parameters across ranks, and the one-process run's (here, in this process) parameters within
    float tolerance."""
    ddp = two_process_runs / "ddp_trainer"
    ddp_trainer.run(tmp_path, world_size=1)
    for kind, accumulation in CASES:
        name = f"{kind}-ga{accumulation}"
        ranks = [torch.load(ddp / f"{name}-rank{r}.pt") for r in (0, 1)]
        single = torch.load(tmp_path / f"{name}-rank0.pt")
        for result in ranks:
            assert len(result["fed"]) == 4
            assert result["fed"] == result["logged"], name
        assert ranks[0]["fed"] == ranks[1]["fed"], name
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), name
        torch.testing.assert_close(ranks[0]["fed"], single["fed"], rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["params"], single["params"], rtol=0, atol=1e-5, msg=name)
