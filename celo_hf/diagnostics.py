"""What a meta-model does when the gradient is zero: the drift measure and the calibration that removes it.

Celo's update MLP reads the parameter itself and has biases, so even with every gradient zero it
moves each tensor a little, always the same way. Trained from scratch that is harmless; on a
pretrained model it slowly erases what was learned. Two tools:

* :func:`zero_gradient_drift` measures it: run Celo on zero gradients and report the relative
  change ``||p_{t+1} - p_t|| / ||p_t||`` per step;
* :func:`calibrate_zero_gradient_` removes it exactly, by changing the weights, not the code: with
  zero gradients (from a fresh state) every element of every tensor sees the same normalised
  features except the parameter's own value (:func:`zero_gradient_features`). Dropping the
  parameter feature's first-layer column and shifting the direction output's bias so that the MLP's
  direction at those features is 0 makes the step exactly 0 there; any gradient still moves the
  tensor as the (slightly changed) MLP says.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from .layout import group_slices
from .network import CeloNet
from .optimizer import Celo

#: Feature groups that are constant 1 after normalisation when every gradient so far was zero:
#: ``rsqrt(rms + eps)`` and ``rsqrt(row/col + eps)`` are the same large value in every element, so
#: normalising over the tensor maps them to 1. Every other group is 0 then, except ``param``.
_ONE_AT_ZERO_GRADIENT = ("rsqrt_rms", "rsqrt_row", "rsqrt_col")


def feature_columns(net: CeloNet, name: str) -> slice:
    """The first-layer input columns of feature group ``name``."""
    return group_slices(len(net.momentum_decays))[name]


def zero_gradient_features(net: CeloNet) -> torch.Tensor:
    """The normalised MLP input ``(F,)`` of every element of a tensor whose gradients have all been
    zero since the optimizer state was created, with the parameter feature left at 0."""
    features = torch.zeros(net.num_features)
    for name in _ONE_AT_ZERO_GRADIENT:
        features[feature_columns(net, name)] = 1.0
    return features


@torch.no_grad()
def calibrate_zero_gradient_(net: CeloNet) -> CeloNet:
    """Make ``net``'s update exactly zero at zero gradient (in place; returns ``net``).

    Zeroes the first-layer weights of the ``param`` feature and subtracts from the last layer's
    direction bias the direction the MLP outputs at :func:`zero_gradient_features`. Idempotent.
    """
    first, last = net.mlp_layers()[0], net.mlp_layers()[-1]
    first[0][:, feature_columns(net, "param")] = 0.0
    x0 = zero_gradient_features(net).to(first[0])
    direction = net.mlp(x0)[0]
    last[1][0] -= direction
    return net


@torch.no_grad()
def zero_gradient_drift(
    params: Iterable[torch.Tensor], weights: CeloNet | str | None = None, steps: int = 5, total_steps: int = 100
) -> float:
    """How far Celo moves parameters that get zero gradients: the largest, over ``steps`` steps from
    a fresh state, of ``||theta_{t+1} - theta_t|| / ||theta_t||`` (all tensors as one vector).

    ``params`` are copied (left unchanged); ``weights`` as for :class:`celo_hf.Celo`. A dimensionless
    fraction per step: the embedded weights before calibration gave about 4e-3.
    """
    copies = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    if not copies:
        raise ValueError("zero_gradient_drift needs at least one parameter tensor")
    net = copy.deepcopy(weights) if isinstance(weights, CeloNet) else weights
    optimizer = Celo(copies, total_steps=total_steps, weights=net, backend="eager")
    worst = 0.0
    for _ in range(steps):
        before = torch.cat([p.detach().reshape(-1).clone() for p in copies])
        for p in copies:
            p.grad = torch.zeros_like(p)
        optimizer.step(loss=1.0)
        after = torch.cat([p.detach().reshape(-1) for p in copies])
        worst = max(worst, float((after - before).norm() / before.norm().clamp_min(1e-30)))
    return worst
