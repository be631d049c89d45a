"""The per-element kernels as torch operations (``backend="eager"``; compiled by ``"compile"``).

The contract is :class:`celo_hf.layout.Kernels`: pass 0 :func:`square_sums`, pass 1
:func:`accumulate_`, pass 2 :func:`mlp_step_`, each on a chunk's ``(B, a, b)`` grids (maths of
``docs/celo-algorithm.md`` §4, §7, §8, with the tensor-wide normalisers folded into the first layer
by the driver). Eagerly the MLP runs as batched matrix products (fewest operations); with
``unrolled=True`` as explicit multiply-adds per unit, which ``torch.compile`` fuses into one loop
with every intermediate inlined (:mod:`celo_hf.backends.compiled`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..layout import (
    CELO_CONSTANTS,
    Decays,
    Factors,
    FoldedMlp,
    Grid,
    Kernels,
    Preconditioners,
    RuleConfig,
    RuleConstants,
    UpdateWeights,
    product,
    total,
)

#: Pass 1 sums squares over stacked channels up to this many elements, per channel above.
_STACKED_SUM_ELEMENTS = 8192


def prepare(config: RuleConfig) -> None:
    """Nothing to build."""


def kernels(weights: UpdateWeights) -> Kernels:
    """The eager kernels (any configuration, any device) with the rule's constants."""
    return kernels_for(weights.config.constants)


@functools.cache
def kernels_for(constants: RuleConstants) -> Kernels:
    """The eager kernels bound to ``constants`` (every function below takes them as ``constants=``)."""
    bind = lambda f: functools.partial(f, constants=constants)  # noqa: E731
    return Kernels(
        square_sums=bind(square_sums),
        factored_statistics=None,
        accumulate_=bind(accumulate_),
        mlp_step_=bind(mlp_step_),
        whole_batch=(bind(stacked_channels_), mlp_step_on_channels_),
    )


def square_sums(g: torch.Tensor, d0: int, d1: int, constants: RuleConstants = CELO_CONSTANTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 0: ``clip(g)^2 + eps`` summed over parameter axis ``d0`` and over ``d1``.

    ``g`` ``(B, *S)`` (a chunk of rows of a rank >= 2 tensor); returns float32 ``(B, *S without
    d0)`` and ``(B, *S without d1)``.
    """
    gsq = g.float().clamp(-constants.grad_clip, constants.grad_clip).square() + constants.factored_eps
    return gsq.sum(1 + d0), gsq.sum(1 + d1)


def _element_channels(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor, q_g: torch.Tensor, q_m: torch.Tensor,
    constants: RuleConstants,
) -> list[torch.Tensor]:
    """The per-element feature channels (groups ``layout.ELEMENT_GROUPS``), un-normalised, each
    ``(B, a, b)``.

    ``p`` is the old parameter, ``g`` the clipped gradient, ``m (B, k, a, b)`` and ``rms`` the new
    accumulators; ``q_g``/``q_m`` (broadcastable to ``m``) the factored preconditioners of the
    gradient and of the momentum.
    """
    r = torch.rsqrt(rms + constants.rms_eps)
    ms = m.unbind(1)
    clip = constants.feature_grad_clip
    return [
        g, g.clamp(-clip, clip), p, *ms, rms, *(mj * r for mj in ms), r,
        *(g * qj for qj in q_g.unbind(1)), g * r, *(mj * qj for mj, qj in zip(ms, q_m.unbind(1))),
    ]


def _moving_average_(average: torch.Tensor, decay: torch.Tensor | float, value: torch.Tensor) -> torch.Tensor:
    """``average <- decay * average + (1 - decay) * value`` in place, computed in float32 whatever
    ``average``'s storage dtype; returns the new average in float32."""
    if average.dtype == torch.float32:
        return average.mul_(decay).add_((1 - decay) * value)
    new = average.float() * decay + (1 - decay) * value
    average.copy_(new)
    return new


def channels_(
    grid: Grid, pre: Preconditioners, decays: Decays, constants: RuleConstants = CELO_CONSTANTS
) -> list[torch.Tensor]:
    """Update ``m`` and ``rms`` in place; return the per-element channels at the new accumulators."""
    g = grid.g.float().clamp(-constants.grad_clip, constants.grad_clip)
    m32 = _moving_average_(grid.m, decays.momentum.view(-1, 1, 1), g[:, None])
    rms32 = _moving_average_(grid.rms, decays.rms, g * g)
    return _element_channels(grid.p.float(), g, m32, rms32, product(pre.q_g), product(pre.q_m), constants)


def stacked_channels_(
    grid: Grid, pre: Preconditioners, decays: Decays, constants: RuleConstants = CELO_CONSTANTS
) -> torch.Tensor:
    """:func:`channels_` stacked ``(B, C, a, b)``."""
    return torch.stack(channels_(grid, pre, decays, constants), dim=1)


def accumulate_(
    grid: Grid, pre: Preconditioners, decays: Decays, unrolled: bool | None = None,
    constants: RuleConstants = CELO_CONSTANTS,
) -> torch.Tensor:
    """Pass 1: :func:`channels_`, then each channel's sum of squares ``(B, C)``.

    ``unrolled``: one reduction per channel (what ``torch.compile`` fuses best, and faster eagerly
    on large chunks) instead of one reduction over the stacked channels (fewest eager operations,
    faster on small chunks); ``None`` chooses by size.
    """
    channels = channels_(grid, pre, decays, constants)
    if unrolled or (unrolled is None and grid.p.numel() > _STACKED_SUM_ELEMENTS):
        return torch.stack([(c * c).sum((-2, -1)) for c in channels], dim=1)
    x = torch.stack(channels, dim=1)
    return (x * x).sum((-2, -1))


def _affine(inputs: Sequence[torch.Tensor], weight: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``start + sum_i weight[:, i] * inputs[i]`` for ``(B, a, b)`` inputs, ``(B, len)`` weights and
    ``start`` broadcastable to ``(B, a, b)``."""
    out = start
    for i, x in enumerate(inputs):
        out = out + weight[:, i, None, None] * x
    return out


def mlp_step_(
    grid: Grid, pre: Preconditioners, hidden_in: Factors, mlp: FoldedMlp, unrolled: bool = False,
    constants: RuleConstants = CELO_CONSTANTS,
) -> None:
    """Pass 2: features, MLP and ``p <- p - step``, in place on ``grid.p`` (or the direction into
    ``mlp.direction_out``).

    ``unrolled``: the MLP as explicit multiply-adds per unit (one fused loop under ``torch.compile``)
    instead of batched matrix products (fewest eager operations).
    """
    p = grid.p
    clip = constants.grad_clip
    channels = _element_channels(
        p.float(), grid.g.float().clamp(-clip, clip), grid.m.float(), grid.rms.float(),
        product(pre.q_g), product(pre.q_m), constants,
    )
    if not unrolled:
        mlp_step_on_channels_(p, torch.stack(channels, dim=1), hidden_in, mlp)
        return
    start = total(hidden_in)
    first = mlp.first
    hidden = [torch.relu(_affine(channels, first[:, :, j], start[:, j])) for j in range(first.shape[2])]
    for weight, bias in mlp.hidden_layers:
        hidden = [torch.relu(_affine(hidden, weight[:, i], bias[:, i, None, None])) for i in range(weight.shape[1])]
    weight, bias = mlp.last
    direction, magnitude = (_affine(hidden, weight[:, i], bias[:, i, None, None]) for i in range(2))
    _take_step_(p, direction, magnitude, mlp)


def mlp_step_on_channels_(p: torch.Tensor, channels: torch.Tensor, hidden_in: Factors, mlp: FoldedMlp) -> None:
    """:func:`mlp_step_` as batched matrix products, from the stacked channels ``(B, C, a, b)``."""
    batch, width = p.shape[0], mlp.first.shape[2]
    start = total(hidden_in).expand(batch, width, *p.shape[1:]).reshape(batch, width, -1)
    hidden = torch.relu(torch.baddbmm(start, mlp.first.transpose(1, 2), channels.flatten(2)))
    for weight, bias in mlp.hidden_layers:
        hidden = torch.relu(torch.baddbmm(bias[:, :, None], weight, hidden))
    weight, bias = mlp.last
    direction, magnitude = (t.view_as(p) for t in torch.baddbmm(bias[:, :, None], weight, hidden).unbind(1))
    _take_step_(p, direction, magnitude, mlp)


def _take_step_(p: torch.Tensor, direction: torch.Tensor, magnitude: torch.Tensor, mlp: FoldedMlp) -> None:
    if mlp.direction_out is not None:
        mlp.direction_out.copy_(direction)
        return
    p.copy_(p.float() - direction * torch.exp(mlp.exp_mult * magnitude) * mlp.step_scale[:, None, None])


#: The kernels with Celo's constants.
KERNELS = kernels_for(CELO_CONSTANTS)
