"""Run Celo on a FSDP2-sharded model and on the same model unsharded; the results must agree.

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_equivalence.py OUT_DIR

With the paper's checkpoint (``helpers.PAPER_WEIGHTS``), without and with weight decay, with
either gradient-scale gain (its norms are taken over whole tensors; threshold 10 puts every gain
below 1), and with a fresh last layer under the model-start gain and a fresh gain; writes ``OUT_DIR/rank0.pt``: ``{"max_abs_diff": value}`` over the parameters and the
losses the scheduler took in.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import PAPER_WEIGHTS  # noqa: E402
from trainer_setup import process_group, script_setup  # noqa: E402

from celo_hf import Celo  # noqa: E402
from celo_hf.hub import load_celo_net  # noqa: E402


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5),  # 5-row weight: rows split 3 + 2 over two ranks
        torch.nn.LayerNorm(5),
        torch.nn.Linear(5, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),  # square: tie-broken factored axes
        torch.nn.Linear(16, 1),  # a 1-row weight: one rank holds no rows at all
    )


def train(model: torch.nn.Module, weights, weight_decay: float, fresh_head: bool = False, steps: int = 6) -> torch.Tensor:
    """Train ``model`` (``fresh_head``: its last layer in a param group marked fresh); returns the
    loss buffer's means (the losses Celo's scheduler took in)."""
    body, head = [p for layer in model[:-1] for p in layer.parameters()], list(model[-1].parameters())
    groups = [{"params": body}, {"params": head, "fresh": True}] if fresh_head else [{"params": body + head}]
    optimizer = Celo(groups, total_steps=steps, weights=weights, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=generator)
        y = torch.randn(32, 1, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.detach())
    return optimizer.state_dict()["celo"]["loss_means"]


def configured(net, signal: str | None, floor: float | None, fresh_gain: float | None):
    """A copy of ``net`` with the gradient-scale gain of ``signal`` at threshold 10 (``None``: none),
    the param-scale floor ``floor`` and the fresh tensors' gain ``fresh_gain``."""
    net = copy.deepcopy(net)
    if signal is not None:
        net.gain_threshold, net.gain_signal = 10.0, signal
    net.param_scale_floor, net.fresh_gain = floor, fresh_gain
    return net


def run(out_dir: Path, world_size: int) -> None:
    """The sharded and unsharded runs in the (initialised) 2-process group; rank 0 writes the largest difference."""
    assert world_size == dist.get_world_size() == 2, f"expected 2 processes, got {world_size}"
    base = load_celo_net(PAPER_WEIGHTS)
    diffs = []
    # with weight decay, the loss's L2 term sums over every shard; the floor (1 / sqrt(5) for the
    # 5-row weight, above its RMS) reads the whole shape, not a shard's
    # a fresh head under the model-start gain: left out of the first step's median over sharded
    # norms, and stepping min(3, 1 / G) times the scheduler's
    cases = ((0.0, None, None, None), (0.1, None, None, None), (0.0, "tensor", None, None),
             (0.0, "model_start", None, None), (0.0, None, 1.0, None), (0.0, "model_start", None, 3.0))
    for weight_decay, signal, floor, fresh_gain in cases:
        net = configured(base, signal, floor, fresh_gain)
        fresh_head = fresh_gain is not None
        reference = make_model()
        sharded = copy.deepcopy(reference)
        for layer in sharded:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(sharded)
        local_rows = [p.to_local().shape[0] for p in sharded.parameters()]
        assert local_rows[0] == (3 if dist.get_rank() == 0 else 2), local_rows  # the 5-row weight is split
        assert 0 in local_rows or dist.get_rank() == 0, local_rows  # rank 1 holds no row of the 1-row weight
        reference_losses = train(reference, copy.deepcopy(net), weight_decay, fresh_head)
        sharded_losses = train(sharded, copy.deepcopy(net), weight_decay, fresh_head)
        diffs.append((sharded_losses - reference_losses).abs().max().item())
        diffs += [
            (p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), reference.parameters())
        ]
    if dist.get_rank() == 0:
        torch.save({"max_abs_diff": max(diffs)}, out_dir / "rank0.pt")


def main() -> None:
    out_dir, world_size = script_setup()
    with process_group(world_size):
        run(out_dir, world_size)


if __name__ == "__main__":
    main()
