"""FSDP2: Celo on row-sharded DTensor parameters equals Celo on the unsharded model."""

import pytest
import torch

pytestmark = pytest.mark.reference  # every test reads the paper's checkpoint


@pytest.mark.slow
def test_fsdp2_sharded_update_equals_unsharded(two_process_runs):
    """Two gloo processes, uneven and empty shards, a square matrix: every per-tensor statistic
    (parameter RMS, feature normalisers, factored row / column means) is taken over the whole tensor
    (tests/scripts/fsdp_equivalence.py, run by the conftest fixture ``two_process_runs``)."""
    diff = torch.load(two_process_runs / "fsdp_equivalence" / "rank0.pt")["max_abs_diff"]
    assert diff < 1e-6, diff
