"""An Adam-like starting point for meta-training (``docs/meta-training.md`` §7.4, "warm start").

With a few thousand outer steps on a CPU, PES cannot move a random update rule far. Instead of
the spec's regression fit, the update MLP is *set* so that its direction output is exactly
``gain`` times the normalised ``momentum(0.9) / sqrt(rms)`` feature (Adam's direction, normalised
over the tensor) and its log-magnitude output is 0: with ReLU units, ``x = relu(x) - relu(-x)``.
All other first-layer weights are small random numbers, so PES sees every input from the start.
A deviation from the reference, which starts from a random MLP.
"""

from __future__ import annotations

import torch

from celo_hf import CeloNet

#: Index of the ``momentum(0.9) * rsqrt(rms)`` channel among the 30 MLP inputs (group 5, first decay).
ADAM_DIRECTION_FEATURE = 7


def adam_like(net: CeloNet, gain: float, noise: float = 1e-3, seed: int = 0) -> CeloNet:
    """``net`` with its update MLP replaced by the Adam-mimicking rule (in place; returned).

    Requires the paper's MLP shape (two hidden layers of width >= 2).
    """
    layers = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    if len(layers) != 3 or layers[0].out_features < 2:
        raise ValueError(f"adam_like needs an MLP with 2 hidden layers of width >= 2, got {net.mlp}")
    first, hidden, last = layers
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * noise)
            layer.bias.zero_()
        first.weight[0, ADAM_DIRECTION_FEATURE] = 1.0  # unit 0: relu(x)
        first.weight[1, ADAM_DIRECTION_FEATURE] = -1.0  # unit 1: relu(-x)
        hidden.weight[:2, :2] = torch.eye(2)
        last.weight[0, :2] = torch.tensor([gain, -gain])  # direction = gain * x
        last.weight[1:, :] = 0.0  # log-magnitude 0
    return net
