"""Celo2 with two gloo processes: DDP through a plain Trainer, and FSDP2-sharded tensors
(tests/scripts/celo2_distributed.py under torchrun: the conftest fixture ``two_process_runs``), against
the same run in this process."""

from __future__ import annotations

import pytest
import torch
from scripts import celo2_distributed

pytestmark = pytest.mark.reference


@pytest.mark.slow
def test_ddp_ranks_stay_identical_and_fsdp2_gathered_equals_unsharded(two_process_runs, tmp_path):
    celo2_distributed.run(tmp_path, world_size=1)
    ranks = [torch.load(two_process_runs / "celo2_distributed" / f"rank{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(ranks[0]["ddp"], ranks[1]["ddp"])
    torch.testing.assert_close(ranks[0]["ddp"], single["ddp"], rtol=0, atol=1e-5)
    assert max(r["fsdp"] for r in ranks) < 1e-6
