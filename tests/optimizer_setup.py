"""A toy problem for the optimizer tests: a few tensors of assorted shapes, deterministic gradients
and losses, and bitwise comparisons of parameters and optimizer state."""

from __future__ import annotations

import copy
from typing import Any

import torch
from helpers import PAPER_WEIGHTS

from celo_hf import Celo

#: The toy parameters' shapes: a matrix, a vector, a scalar and a rank-4 kernel.
SHAPES = {"w": (4, 6), "b": (6,), "scale": (), "kernel": (2, 3, 1, 4)}


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """One parameter per :data:`SHAPES` entry, standard-normal (drawn in float32, then cast)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES.values()]


def set_grads(params: list[torch.Tensor], seed: int) -> None:
    """Deterministic gradients that depend on the parameters' current values (as real ones do)."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        noise = torch.randn(p.shape, generator=generator)
        p.grad = (p.detach().float() + noise).to(p.dtype)


def toy_loss(t: int) -> float:
    """The training loss handed over at step ``t``: decreasing, ``3 / (1 + 0.3 t)``."""
    return 3.0 / (1.0 + 0.3 * t)


def run_steps(optimizer: Celo, params: list[torch.Tensor], steps: range) -> None:
    """Steps ``steps`` of the toy problem: gradients from :func:`set_grads`, loss from :func:`toy_loss`."""
    for t in steps:
        set_grads(params, seed=100 + t)
        optimizer.step(loss=toy_loss(t))


def snapshot(params: list[torch.Tensor], optimizer: Celo) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Copies of the parameters, their optimizer state and the ``"celo"`` state-dict entry."""
    state = {
        i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params) if p in optimizer.state
    }
    celo = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state_dict()["celo"].items()}
    return [p.detach().clone() for p in params], {"state": state, "celo": celo}


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested lists / dicts of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max difference {(a.float() - b.float()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def paper_celo(params: Any, **kwargs: Any) -> Celo:
    """Celo with the paper's weights, ``total_steps=10`` unless given."""
    kwargs.setdefault("total_steps", 10)
    return Celo(params, weights=PAPER_WEIGHTS, **kwargs)


def steps_in_own_groups(net: Any, values: list[torch.Tensor], grads: list[list[torch.Tensor]],
                        options: list[dict[str, Any]], backend: str = "eager") -> tuple[list[torch.Tensor], Celo]:
    """Parameters (copies of ``values``) after one Celo step (``net`` copied, 10 planned steps, loss
    1) per entry of ``grads`` (each a gradient per tensor), tensor ``i`` in its own param group
    with ``options[i]`` (``lr``, ``fresh``, ...); and the optimizer."""
    params = [torch.nn.Parameter(v.clone()) for v in values]
    groups = [{"params": [p], **o} for p, o in zip(params, options)]
    optimizer = Celo(groups, total_steps=10, weights=copy.deepcopy(net), backend=backend)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step(loss=1.0)
    return [p.detach() for p in params], optimizer
