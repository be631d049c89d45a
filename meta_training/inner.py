"""The inner problems of meta-training: a population of small MLPs trained by a population of Celos.

Celo's meta-training tasks all share one model (``docs/meta-training.md`` §3): an MLP 64 -> 32 -> 10
with ReLU on flattened 8x8 images, mean softmax cross-entropy, batch 64, reparameterised by a
scale ``s`` (the optimizer holds ``phi = theta0 / s``; the forward pass uses ``s * phi``). Here
``P`` such models are evaluated at once with batched matrix products.
"""

from __future__ import annotations

import math

import torch

LAYER_SIZES = (64, 32, 10)
#: Names and shapes of the inner model's tensors (inputs x outputs for weights).
PARAM_SHAPES = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}


def init_params(population: int, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """Haiku-style init: truncated normal weights (std ``1/sqrt(fan_in)``, cut at 2 std), zero
    biases. One generator per member; returns ``name -> (P, *shape)``."""
    params = {name: torch.zeros(population, *shape) for name, shape in PARAM_SHAPES.items()}
    for i, generator in enumerate(generators):
        for name in ("w1", "w2"):
            fan_in = PARAM_SHAPES[name][0]
            std = fan_in**-0.5
            sample = torch.empty(PARAM_SHAPES[name])
            torch.nn.init.trunc_normal_(sample, std=std, a=-2 * std, b=2 * std, generator=generator)
            params[name][i] = sample
    return params


def losses(
    params: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of each member on its batch.

    Args:
        params: ``name -> (P, *shape)`` the optimizer's view ``phi``.
        scales: ``name -> (P, *shape)`` reparameterisation scales ``s``; the model computes with
            ``s * phi``.
        x: ``(P, batch, 64)`` inputs; y: ``(P, batch)`` labels.

    Returns: ``(P,)`` losses.
    """
    w = {name: scales[name] * p for name, p in params.items()}
    hidden = torch.relu(torch.baddbmm(w["b1"][:, None], x, w["w1"]))
    logits = torch.baddbmm(w["b2"][:, None], hidden, w["w2"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def losses_and_grads(
    params: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Losses ``(P,)`` and their gradients with respect to ``params`` (each member's own)."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with torch.enable_grad():
        loss = losses(leaves, scales, x, y)
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def normalise_loss(loss: torch.Tensor, num_classes: int = LAYER_SIZES[-1]) -> torch.Tensor:
    """The meta-loss of one step: clipped into ``[0, 1.5 ln(num_classes)]``; NaN/inf -> the maximum."""
    top = 1.5 * math.log(num_classes)
    return torch.where(torch.isfinite(loss), loss.clamp(0.0, top), torch.full_like(loss, top))
