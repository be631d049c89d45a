"""Run Celo on a FSDP2-sharded model and on the same model unsharded; the results must agree.

Launched by tests/test_fsdp.py as ``torchrun --standalone --nproc_per_node 2 fsdp_equivalence.py WEIGHTS``.
Without and with weight decay, and with either gradient-scale gain (its norms are taken over whole
tensors; threshold 10 puts every gain below 1); prints one line ``max_abs_diff <value>`` on rank 0
(over the parameters and the losses the scheduler took in).
"""

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from celo_hf import Celo
from celo_hf.hub import load_celo_net


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


def run(model: torch.nn.Module, weights, weight_decay: float, steps: int = 6) -> torch.Tensor:
    """Train ``model``; returns the loss buffer's means (the losses Celo's scheduler took in)."""
    optimizer = Celo(model.parameters(), total_steps=steps, weights=weights, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=generator)
        y = torch.randn(32, 1, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.detach())
    return optimizer.state_dict()["celo"]["loss_means"]


def with_gain(net, signal: str | None):
    """A copy of ``net`` with the gradient-scale gain of ``signal`` at threshold 10 (``None``: none)."""
    net = copy.deepcopy(net)
    if signal is not None:
        net.gain_threshold, net.gain_signal = 10.0, signal
    return net


def main() -> None:
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, f"expected 2 processes, got {dist.get_world_size()}"
    base = load_celo_net(sys.argv[1])
    diffs = []
    # with weight decay, the loss's L2 term sums over every shard
    for weight_decay, signal in ((0.0, None), (0.1, None), (0.0, "tensor"), (0.0, "model_start")):
        net = with_gain(base, signal)
        reference = make_model()
        sharded = copy.deepcopy(reference)
        for layer in sharded:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(sharded)
        local_rows = [p.to_local().shape[0] for p in sharded.parameters()]
        assert local_rows[0] == (3 if dist.get_rank() == 0 else 2), local_rows  # the 5-row weight is split
        assert 0 in local_rows or dist.get_rank() == 0, local_rows  # rank 1 holds no row of the 1-row weight
        reference_losses = run(reference, copy.deepcopy(net), weight_decay)
        sharded_losses = run(sharded, copy.deepcopy(net), weight_decay)
        diffs.append((sharded_losses - reference_losses).abs().max().item())
        diffs += [
            (p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), reference.parameters())
        ]
    if dist.get_rank() == 0:
        print("max_abs_diff", max(diffs), flush=True)
    dist.barrier()  # no rank tears its gloo group down while the other may still be using it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
