"""FSDP2: Celo on row-sharded DTensor parameters equals Celo on the unsharded model."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PAPER_WEIGHTS
SCRIPT = Path(__file__).parent / "scripts" / "fsdp_equivalence.py"


@pytest.mark.slow
def test_fsdp2_sharded_update_equals_unsharded():
    """Two gloo processes, uneven and empty shards, a square matrix: every per-tensor statistic
    (parameter RMS, feature normalisers, factored row / column means) is taken over the whole tensor."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(PAPER_WEIGHTS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    diff = float(result.stdout.split("max_abs_diff")[1].split()[0])
    assert diff < 1e-6, diff
