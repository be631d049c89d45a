"""The literal reference: one Celo update of one tensor, transcribed from the specification.

``docs/celo-algorithm.md`` §4, §7, §8, one step after another: the accumulators, the full
``(*shape, 30)`` feature array, its normalisation over the tensor, the MLP and the step. It is pure
(returns new tensors) and exists to be read and to check every backend against; it is also the
registered backend ``"reference"`` (:mod:`celo_hf.backends`), slow, for checking. Constants, the
feature order and the state layout come from :mod:`celo_hf.layout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .layout import (
    FACTOR_FLOOR,
    FACTORED_EPS,
    FEATURE_GRAD_CLIP,
    GRAD_CLIP,
    NORMALISER_EPS,
    PARAM_SCALE_EPS,
    RMS_EPS,
    ROW_COL_EPS,
    RuleConfig,
    TensorState,
    UpdateWeights,
    factored_dims,
    param_scale_floor,
    row_mean_axis,
    state_shape,
)

if TYPE_CHECKING:
    from .network import CeloNet


def prepare(config: RuleConfig) -> None:
    """Nothing to build."""


def factor_scales(
    v_row: torch.Tensor, v_col: torch.Tensor, d0: int, d1: int, lead: int, row_mean: torch.Tensor | None = None,
    floor: float = FACTOR_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor-style row and column scales, re-expanded so they broadcast against the tensor.

    ``v_row`` / ``v_col`` carry ``lead`` leading axes (decay, or batch and decay) before the
    parameter axes. Returns ``rsqrt(max(v_row / (mean of v_row over the d1 axis + 1e-9), 1e-9))``
    with a size-1 axis re-inserted at ``d0``, and ``rsqrt(max(v_col, 1e-9))`` re-inserted at ``d1``.
    ``row_mean`` (keepdim) may be given when that mean spans several processes; ``floor`` is the
    rule's (``RuleConstants.factor_floor``).
    """
    if row_mean is None:
        row_mean = v_row.mean(dim=lead + row_mean_axis(d0, d1), keepdim=True)
    row = torch.rsqrt(torch.clamp(v_row / (row_mean + floor), min=floor))
    col = torch.rsqrt(torch.clamp(v_col, min=floor))
    return row.unsqueeze(lead + d0), col.unsqueeze(lead + d1)


def _mlp(x: torch.Tensor, w: UpdateWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The update MLP of ``w``'s single row on features ``(..., F)``: direction and log-magnitude."""
    h = torch.relu(x @ w.first[0] + w.first_bias[0])
    for weight, bias in w.hidden_layers:
        h = torch.relu(h @ weight[0].T + bias[0])
    out = h @ w.last[0][0].T + w.last[1][0]
    return out[..., 0], out[..., 1]


def reference_step(
    param: torch.Tensor, grad: torch.Tensor, state: TensorState, lr_mult: torch.Tensor, w: UpdateWeights
) -> tuple[torch.Tensor, TensorState]:
    """One Celo update of one tensor (decay axis last inside), with the meta-model ``w`` (one row).

    Args:
        param, grad: the parameter and its (unclipped) gradient, any float dtype, shape ``S``.
        state: the tensor's accumulators (not modified).
        lr_mult: 0-d or ``(1,)`` multiplier of the step (the scheduler's, times any external lr).
        w: the meta-model's weights, one row (:meth:`UpdateWeights.from_net`).

    Returns:
        The new parameter (float32, shape ``S``) and the new state.
    """
    config = w.config
    shape = state_shape(param.shape)
    last = {key: value.float().movedim(0, -1) for key, value in state.items() if key != "rms"}
    p = param.detach().float().reshape(shape)
    g = grad.float().reshape(shape).clamp(-GRAD_CLIP, GRAD_CLIP)
    mom_b = w.momentum_decays.to(param.device)
    fac_b = w.factored_decays.to(param.device)
    rms_b = config.rms_decay

    m = mom_b * last["m"] + (1 - mom_b) * g[..., None]
    rms = rms_b * state["rms"].float() + (1 - rms_b) * g * g
    gsq = (g * g + FACTORED_EPS)[..., None]
    new = {"m": m}
    dims = factored_dims(shape)
    if dims is None:
        v_diag = fac_b * last["v_diag"] + (1 - fac_b) * gsq
        new["v_diag"] = v_diag
        fac_g = g[..., None] * torch.rsqrt(torch.clamp(v_diag + FACTOR_FLOOR, min=FACTOR_FLOOR))
        row = col = v_diag
        fac_m = m * v_diag.rsqrt()
    else:
        d0, d1 = dims
        v_row = fac_b * last["v_row"] + (1 - fac_b) * gsq.mean(dim=d0)
        v_col = fac_b * last["v_col"] + (1 - fac_b) * gsq.mean(dim=d1)
        new.update(v_row=v_row, v_col=v_col)
        row_scale, col_scale = factor_scales(v_row.movedim(-1, 0), v_col.movedim(-1, 0), d0, d1, lead=1)
        scale = (row_scale * col_scale).movedim(0, -1)
        fac_g = g[..., None] * scale
        full = (*shape, m.shape[-1])
        row = v_row.unsqueeze(d0).expand(full)
        col = v_col.unsqueeze(d1).expand(full)
        fac_m = m * scale

    rsqrt_rms = torch.rsqrt(rms + RMS_EPS)
    groups = [  # in the order of layout.FEATURE_GROUP_NAMES
        g[..., None], g.clamp(-FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP)[..., None], p[..., None], m,
        rms[..., None], m * rsqrt_rms[..., None], rsqrt_rms[..., None], fac_g, (g * rsqrt_rms)[..., None],
        row, col, torch.rsqrt(row + ROW_COL_EPS), torch.rsqrt(col + ROW_COL_EPS), fac_m,
    ]
    x = torch.cat(groups, dim=-1)
    tensor_axes = tuple(range(len(shape)))
    x = x * torch.rsqrt(NORMALISER_EPS + (x * x).mean(dim=tensor_axes, keepdim=True))
    direction, magnitude = _mlp(x, w)
    param_scale = torch.sqrt((p * p).mean() + PARAM_SCALE_EPS).clamp(min=param_scale_floor(shape, config.param_scale_floor))
    step = direction * param_scale * torch.exp(config.exp_mult * magnitude) * config.step_mult * lr_mult.reshape(())
    new_state = {key: value.movedim(-1, 0) for key, value in new.items()}
    new_state["rms"] = rms
    return (p - step).reshape(param.shape), new_state


def reference_update(
    param: torch.Tensor, grad: torch.Tensor, state: TensorState, lr_mult: torch.Tensor, net: CeloNet
) -> tuple[torch.Tensor, TensorState]:
    """:func:`reference_step` with ``net``'s weights."""
    return reference_step(param, grad, state, lr_mult, UpdateWeights.from_net(net, param.device))


def update_tensor_(p: torch.Tensor, g: torch.Tensor, state: TensorState, lr_scale: torch.Tensor, w: UpdateWeights) -> None:
    """The backend ``"reference"``: :func:`reference_step` written back in place (``p``, ``state``
    of one tensor, ``lr_scale`` 0-d)."""
    new_p, new_state = reference_step(p, g, state, lr_scale, w)
    p.copy_(new_p)
    for key, value in new_state.items():
        state[key].copy_(value)
