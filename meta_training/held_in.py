"""A cheap held-in check of a meta-model: the meta-training MLP on digits, trained by Celo.

Used to pick checkpoints during meta-training (``docs/meta-training.md`` §7.4): 3 seeds x 300 steps
of the 64 -> 32 -> 10 MLP on scikit-learn's digits (no reparameterisation), final training loss.
"""

from __future__ import annotations

import copy

import torch

from celo_hf import Celo, CeloNet

from . import inner
from .tasks import digits_family


def held_in_loss(net: CeloNet, seeds: int = 3, steps: int = 300, batch_size: int = 64) -> float:
    """Mean over seeds of the average training loss over the last 20 steps (lower is better)."""
    family = digits_family()
    finals = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        init = inner.init_params(1, [generator])
        params = {name: torch.nn.Parameter(value[0]) for name, value in init.items()}
        ones = {name: torch.ones(1, *value.shape) for name, value in params.items()}
        optimizer = Celo(params.values(), total_steps=steps, weights=copy.deepcopy(net))
        tail = []
        for step in range(steps):
            x, y = family.sample_batch({}, generator, batch_size)
            loss = inner.losses({n: p[None] for n, p in params.items()}, ones, x[None], y[None])[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(loss=loss.detach())
            if step >= steps - 20:
                tail.append(loss.item())
        finals.append(sum(tail) / len(tail))
    return sum(finals) / len(finals)
