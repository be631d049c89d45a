"""The literal reference of Celo2 and Celo2-base: one update of one tensor, transcribed from the spec.

``docs/celo2-algorithm.md`` §5-§12, one step after another: the accumulators, the full
``(*S, F)`` feature array, its normalisation over the last two axes, the MLP, Newton-Schulz and
the output normalisation; and the Adam branch. Pure (returns new tensors), float32, slow: it exists
to be read and to hold the batched implementation (:mod:`celo_hf.celo2.update`) to. The state
layout is Celo's (:func:`celo_hf.layout.init_tensor_state`: decay axis first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..layout import RuleConfig, TensorState, factored_dims, state_shape
from ..reference import factor_scales
from .newton_schulz import orthogonalize
from .rule import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, CONSTANTS

#: Celo2's constants (short name for the formulas below).
C = CONSTANTS

#: An MLP as ``[(weight (out, in), bias (out,)), ...]``, first layer first (``Celo2Net.mlp_layers()``).
MlpLayers = Sequence[tuple[torch.Tensor, torch.Tensor]]


class LearnedStep(NamedTuple):
    """One learned-branch update of a tensor of shape ``S`` (scalars computed as ``(1,)``).

    ``step``: ``u``, shape ``S``, RMS 1 over each last-two-axes slice (``p_new = p - lr u - wd lr p``);
    ``state``: the new accumulators; ``features_raw`` / ``features`` ``(*S', F)`` before / after
    normalisation, ``hidden`` the two ReLU outputs ``(*S', H)``, ``direction`` ``S'`` the MLP's first
    output and ``orthogonalized`` its Newton-Schulz image (``None`` without Newton-Schulz), where
    ``S'`` is ``S`` with scalars as ``(1,)``.
    """

    step: torch.Tensor
    state: TensorState
    features_raw: torch.Tensor
    features: torch.Tensor
    hidden: tuple[torch.Tensor, ...]
    direction: torch.Tensor
    orthogonalized: torch.Tensor | None


def normalise_last_two_axes(x: torch.Tensor, lead: int = 0, trail: int = 0) -> torch.Tensor:
    """``x * rsqrt(1e-9 + mean(x^2))`` with the mean over the last two parameter axes (one for a vector).

    ``x`` has ``lead`` axes before the parameter axes and ``trail`` after them (channels), which are
    never reduced.
    """
    rank = x.dim() - lead - trail
    axes = tuple(range(lead + max(rank - 2, 0), lead + rank))
    return x * torch.rsqrt(C.normaliser_eps + (x * x).mean(dim=axes, keepdim=True))


def learned_step(
    param: torch.Tensor, grad: torch.Tensor, state: TensorState, layers: MlpLayers, config: RuleConfig,
    orthogonalize_matrices: bool,
) -> LearnedStep:
    """One learned-branch update of one tensor.

    Args:
        param, grad: the parameter (before the step) and its unclipped gradient, shape ``S``.
        state: the tensor's accumulators (not modified), layout of :func:`~celo_hf.layout.init_tensor_state`.
        layers: the meta-model's MLP.
        config: the rule's configuration (its decays; ``Celo2Net.rule_config()``).
        orthogonalize_matrices: Celo2 (Newton-Schulz on tensors of rank >= 2) rather than Celo2-base.
    """
    shape = state_shape(param.shape)
    last = {key: value.float().movedim(0, -1) for key, value in state.items() if key != "rms"}
    p = param.detach().float().reshape(shape)
    g = grad.float().reshape(shape).clamp(-C.grad_clip, C.grad_clip)
    mom_b = torch.tensor(config.momentum_decays, device=p.device)
    fac_b = torch.tensor(config.factored_decays, device=p.device)

    m = mom_b * last["m"] + (1 - mom_b) * g[..., None]
    rms = config.rms_decay * state["rms"].float() + (1 - config.rms_decay) * g * g
    gsq = (g * g + C.factored_eps)[..., None]
    new = {"m": m}
    s = torch.rsqrt(rms + C.rms_eps)[..., None]
    groups = [g[..., None], g.clamp(-C.feature_grad_clip, C.feature_grad_clip)[..., None], p[..., None], m, rms[..., None], m * s, s]
    dims = factored_dims(param.shape)
    if dims is None:
        v_diag = fac_b * last["v_diag"] + (1 - fac_b) * gsq
        new["v_diag"] = v_diag
        groups += [g[..., None] * torch.rsqrt(torch.clamp(v_diag + C.factor_floor, min=C.factor_floor)), g[..., None] * s]
    else:
        d0, d1 = dims
        v_row = fac_b * last["v_row"] + (1 - fac_b) * gsq.mean(dim=d0)
        v_col = fac_b * last["v_col"] + (1 - fac_b) * gsq.mean(dim=d1)
        new.update(v_row=v_row, v_col=v_col)
        row_scale, col_scale = factor_scales(
            v_row.movedim(-1, 0), v_col.movedim(-1, 0), d0, d1, lead=1, floor=C.factor_floor
        )
        scale = (row_scale * col_scale).movedim(0, -1)
        full = (*shape, m.shape[-1])
        row = v_row.unsqueeze(d0).expand(full)
        col = v_col.unsqueeze(d1).expand(full)
        groups += [
            g[..., None] * scale, g[..., None] * s,
            row, col, torch.rsqrt(row + C.row_col_eps), torch.rsqrt(col + C.row_col_eps), m * scale,
        ]
    features_raw = torch.cat(groups, dim=-1)
    features = normalise_last_two_axes(features_raw, trail=1)

    h, hidden = features, []
    for weight, bias in layers[:-1]:
        h = torch.relu(h @ weight[:, : h.shape[-1]].float().T + bias.float())  # rank < 2: the first 15 inputs
        hidden.append(h)
    weight, bias = layers[-1]
    direction = h @ weight[0].float() + bias[0].float()
    orthogonalized = orthogonalize(direction) if orthogonalize_matrices and dims is not None else None
    step = normalise_last_two_axes(direction if orthogonalized is None else orthogonalized)
    new_state = {key: value.movedim(-1, 0) for key, value in new.items()}
    new_state["rms"] = rms
    return LearnedStep(step.reshape(param.shape), new_state, features_raw, features, tuple(hidden), direction, orthogonalized)


def adam_step(grad: torch.Tensor, state: TensorState) -> tuple[torch.Tensor, TensorState]:
    """The Adam branch's direction ``a = m1 rsqrt(v1 + 1e-8)`` (no bias correction) from the raw
    gradient, and the new ``{"m1", "v1"}`` (each of the gradient's shape)."""
    g = grad.float()
    m1 = ADAM_BETA1 * state["m1"] + (1 - ADAM_BETA1) * g
    v1 = ADAM_BETA2 * state["v1"] + (1 - ADAM_BETA2) * g * g
    return m1 * torch.rsqrt(v1 + ADAM_EPS), {"m1": m1, "v1": v1}


def apply_step(param: torch.Tensor, step: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    """``(p - lr step) - (wd p) lr``, in the original's order of float32 operations."""
    p = param.float()
    return (p - lr * step) - (weight_decay * p) * lr
