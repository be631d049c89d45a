"""Celo2 under two gloo processes, or as one plain process; saves what each process ended with.

    torchrun --standalone --nproc_per_node 2 tests/scripts/celo2_distributed.py OUT_DIR
    python tests/scripts/celo2_distributed.py OUT_DIR

Celo2 runs with the reference folder's test weights (``helpers.CELO2_TEST_WEIGHTS``).

* ``ddp``: a tiny GPT-2 through a plain ``transformers.Trainer(optimizers=(Celo2(...), None))``
  (data parallel over the processes; the same global batch either way), its default linear
  schedule and weight decay; final parameters (float64).
* ``fsdp`` (two processes only): a small MLP with uneven, empty and square shards under FSDP2's
  ``fully_shard``, and the same model unsharded in the same process, both trained by Celo2
  (Newton-Schulz and the slice normalisations on the gathered tensors); the largest difference.

Writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import CELO2_TEST_WEIGHTS  # noqa: E402
from trainer_setup import collate, parameter_vector, ragged_examples, process_group, script_setup, tiny_model, training_args  # noqa: E402

from celo_hf import Celo2  # noqa: E402

from scripts.fsdp_equivalence import make_model  # noqa: E402 -- Celo's FSDP2 check's model: uneven, empty and square shards

GLOBAL_BATCH = 4


def ddp(weights: str, out_dir: Path, world_size: int) -> torch.Tensor:
    model = tiny_model("gpt2")
    optimizer = Celo2(model.named_parameters(), lr=1e-3, weight_decay=0.1, weights=weights)
    args = training_args(out_dir / "trainer", per_device_train_batch_size=GLOBAL_BATCH // world_size)
    trainer = Trainer(model, args, train_dataset=ragged_examples("gpt2"), data_collator=collate,
                      optimizers=(optimizer, None))
    assert trainer.args.world_size == world_size, (trainer.args.world_size, world_size)
    trainer.train()
    return parameter_vector(model)


def train_mlp(model: torch.nn.Module, weights: str, steps: int = 5) -> None:
    optimizer = Celo2(model.named_parameters(), lr=1e-2, weight_decay=0.1, weights=weights, model=model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=generator), torch.randn(32, 1, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def fsdp(weights: str) -> float:
    unsharded = make_model()
    sharded = copy.deepcopy(unsharded)
    for layer in sharded:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(sharded)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    train_mlp(unsharded, weights)
    train_mlp(sharded, weights)
    moved = max((p - q).abs().max().item() for p, q in zip(unsharded.parameters(), make_model().parameters()))
    assert moved > 1e-2, moved
    return max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), unsharded.parameters()))


def run(out_dir: Path, world_size: int) -> None:
    """The DDP run on ``world_size`` processes and, on two, the FSDP2 check; into ``out_dir``."""
    weights = str(CELO2_TEST_WEIGHTS)
    result = {"ddp": ddp(weights, out_dir, world_size)}
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world_size == 2:
        result["fsdp"] = fsdp(weights)
    torch.save(result, out_dir / f"rank{rank}.pt")


def main() -> None:
    out_dir, world_size = script_setup()
    with process_group(world_size):
        run(out_dir, world_size)


if __name__ == "__main__":
    main()
