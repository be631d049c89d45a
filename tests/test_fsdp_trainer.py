"""Celo through ``transformers.Trainer`` on an FSDP2-sharded model, 2 CPU processes (gloo):
tests/scripts/fsdp_trainer.py under torchrun (the conftest fixture ``two_process_runs``), against the
same run in this process.

Accelerate's FSDP plugin cannot be used on CPU (accelerate 1.15 enables FSDP only for GPU-like
distributed types: under ``use_cpu=True`` / MULTI_CPU the plugin is silently dropped), so the model
is sharded the way transformers does it natively, ``from_pretrained(..., distributed_config=
DistributedConfig(fsdp_size=2))`` (``fully_shard``, ``Shard(0)`` DTensors), which Trainer trains as is.
"""

from __future__ import annotations

import pytest
import torch
from scripts import fsdp_trainer

#: Largest |FSDP - single process| allowed on a final parameter. Measured ~7e-7 (float32 reduction
#: order: reduce-scatter of the gradients, all-reduced Celo statistics); parameters move ~4e-2 from
#: their initial values, and an update whose per-tensor statistics miss the other rank's rows is far off.
PARAM_ATOL = 1e-5

pytestmark = pytest.mark.reference  # tests/scripts/fsdp_trainer.py runs Celo with the paper's checkpoint


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The same run in this process, unsharded (once for this file's tests): its rank0.pt."""
    out_dir = tmp_path_factory.mktemp("fsdp_trainer_one_process")
    fsdp_trainer.run(out_dir, world_size=1)
    return torch.load(out_dir / "rank0.pt")


@pytest.mark.slow
def test_fsdp2_trainer_equals_one_process(two_process_runs, one_process):
    """Same global batch (2 x 2 vs 1 x 4, gradient accumulation 2, 4 steps), Celo built by Trainer
    through CeloFactory: on each rank fed loss == logged loss and Celo updated Shard(0) DTensors; the
    ranks end with identical full parameters, equal to the one-process run within PARAM_ATOL."""
    ranks = [torch.load(two_process_runs / "fsdp_trainer" / f"rank{r}.pt") for r in (0, 1)]
    single = one_process
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    for result in (*ranks, single):
        assert result["iteration"] == 4
        assert len(result["fed"]) == 4
        assert result["fed"] == result["logged"]
    assert all(r["split"] > 0 for r in ranks), "no parameter was split between the ranks"
    assert ranks[0]["fed"] == ranks[1]["fed"]
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys() == single["params"].keys()
    for name, value in single["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=0, atol=PARAM_ATOL, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(ranks[0]["fed"], single["fed"], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_fsdp2_sharding_keeps_from_pretrained_marks_so_the_factory_finds_the_fresh_head(two_process_runs, one_process):
    """The LM reloaded as a sequence classifier and sharded by transformers at load time: on each
    rank CeloFactory marks exactly the new ``score`` head fresh, a DTensor, as it does unsharded."""
    ranks = [torch.load(two_process_runs / "fsdp_trainer" / f"rank{r}.pt") for r in (0, 1)]
    assert one_process["fresh"] == {"score.weight": False}
    assert [r["fresh"] for r in ranks] == [{"score.weight": True}] * 2
