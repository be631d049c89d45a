"""The inner problems of meta-training: populations of small models trained by a population of Celos.

An inner model (:class:`InnerModel`) says which tensors the optimizer trains (names and shapes),
how one member's are initialised, and how the losses of ``P`` members are computed at once from
their weights ``(P, *shape)`` and batches ``(P, ...)``. Every member is reparameterised by scales
``s`` (``docs/meta-training.md`` §3.1): the optimizer holds ``phi = theta0 / s`` and the model
computes with ``s * phi``.

Celo's own tasks all share one model (``docs/meta-training.md`` §3), :data:`MLP`: an MLP
64 -> 32 -> 10 with ReLU on flattened 8x8 images, mean softmax cross-entropy, evaluated with batched
matrix products. Other models live in :mod:`meta_training.transformer` (causal LMs) and
:mod:`meta_training.finetune` (pretrained models fine-tuned in full, with a fresh head, or through
low-rank adapters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

Weights = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, ...]

LAYER_SIZES = (64, 32, 10)
#: Names and shapes of the MLP's tensors (inputs x outputs for weights).
PARAM_SHAPES = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}


class InnerModel(Protocol):
    """A model trained in the inner loop. ``name`` identifies it: families whose models have one
    name share shapes, and their slots advance together through one population update."""

    name: str
    #: Trainable tensors: ``name -> shape`` (the optimizer's parameters).
    shapes: Mapping[str, tuple[int, ...]]
    #: Loss normaliser's class count: a step's meta-loss is clipped to ``1.5 ln(num_classes)``.
    num_classes: int

    def init(self, generator: torch.Generator) -> Weights:
        """One member's initial trainable tensors ``theta0``: ``name -> shape``."""

    def losses_of_weights(self, weights: Weights, batch: Batch) -> torch.Tensor:
        """``(P,)`` mean losses from the computed-with trainable weights ``name -> (P, *shape)``
        (``s * phi``) and a batch whose tensors each have a leading ``P`` axis."""


def init_params(population: int, generators: list[torch.Generator]) -> Weights:
    """Haiku-style init of the MLP: truncated normal weights (std ``1/sqrt(fan_in)``, cut at 2 std),
    zero biases. One generator per member; returns ``name -> (P, *shape)``."""
    params = {name: torch.zeros(population, *shape) for name, shape in PARAM_SHAPES.items()}
    for i, generator in enumerate(generators):
        for name in ("w1", "w2"):
            params[name][i] = truncated_normal(PARAM_SHAPES[name], generator)
    return params


def truncated_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A ``(fan_in, ...)`` weight with std ``1/sqrt(fan_in)`` cut at 2 std (Haiku's default)."""
    std = shape[0] ** -0.5
    sample = torch.empty(shape)
    torch.nn.init.trunc_normal_(sample, std=std, a=-2 * std, b=2 * std, generator=generator)
    return sample


def mlp_losses_of_weights(w: Weights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(P,)`` mean cross-entropy of MLPs ``w`` (``name -> (P, *shape)``) on ``x`` ``(P, batch, 64)``,
    labels ``y`` ``(P, batch)``."""
    hidden = torch.relu(torch.baddbmm(w["b1"][:, None], x, w["w1"]))
    logits = torch.baddbmm(w["b2"][:, None], hidden, w["w2"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


@dataclass(frozen=True)
class MLPClassifier:
    """Celo's meta-training model: MLP 64 -> 32 -> 10, ReLU, batch ``(x (P, B, 64), y (P, B))``."""

    name: str = "mlp"
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: dict(PARAM_SHAPES))
    num_classes: int = LAYER_SIZES[-1]

    def init(self, generator: torch.Generator) -> Weights:
        return {name: value[0] for name, value in init_params(1, [generator]).items()}

    def losses_of_weights(self, weights: Weights, batch: Batch) -> torch.Tensor:
        return mlp_losses_of_weights(weights, *batch)


#: The MLP every image-classification family trains.
MLP = MLPClassifier()


def model_losses(model: InnerModel, params: Weights, scales: Weights, batch: Batch) -> torch.Tensor:
    """``(P,)`` losses of ``model`` at the optimizer's view ``params`` (``name -> (P, *shape)``)
    under reparameterisation ``scales`` (same shapes)."""
    return model.losses_of_weights({name: scales[name] * p for name, p in params.items()}, batch)


def model_losses_and_grads(model: InnerModel, params: Weights, scales: Weights, batch: Batch) -> tuple[torch.Tensor, Weights]:
    """Losses ``(P,)`` and their gradients with respect to ``params`` (each member's own)."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with torch.enable_grad():
        loss = model_losses(model, leaves, scales, batch)
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def losses(params: Weights, scales: Weights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each MLP member on its batch.

    Args:
        params: ``name -> (P, *shape)`` the optimizer's view ``phi``.
        scales: ``name -> (P, *shape)`` reparameterisation scales ``s``; the model computes with
            ``s * phi``.
        x: ``(P, batch, 64)`` inputs; y: ``(P, batch)`` labels.

    Returns: ``(P,)`` losses.
    """
    return model_losses(MLP, params, scales, (x, y))


def losses_and_grads(params: Weights, scales: Weights, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Weights]:
    """The MLP's losses ``(P,)`` and their gradients with respect to ``params``."""
    return model_losses_and_grads(MLP, params, scales, (x, y))


def normalise_loss(loss: torch.Tensor, num_classes: int = LAYER_SIZES[-1]) -> torch.Tensor:
    """The meta-loss of one step: clipped into ``[0, 1.5 ln(num_classes)]``; NaN/inf -> the maximum."""
    top = 1.5 * math.log(num_classes)
    return torch.where(torch.isfinite(loss), loss.clamp(0.0, top), torch.full_like(loss, top))
