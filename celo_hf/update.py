"""Celo's per-tensor update: accumulators, features, MLP and step, as plain functions.

Two implementations of the same maths (``docs/celo-algorithm.md`` §4, §7, §8) live side by side:

* :func:`reference_update` transcribes the specification literally: it builds the full
  ``(*shape, 30)`` feature array, normalises it and runs the MLP. It is pure (returns new tensors)
  and exists to be read and to check the fast one against.
* :func:`fused_update_` is what :class:`celo_hf.Celo` runs. It updates the state and the parameter
  in place, streams over chunks of at most ``chunk_elements`` parameters so no
  ``(numel, 30)`` array is ever built, folds each feature's tensor-wide normaliser into the MLP's
  first-layer weights, and computes the factored row / column features on their own small grids.
  It never synchronises with the host.

State of one tensor of shape ``S`` (scalars count as ``S = (1,)``), all float32, ``k`` decays:
``m`` ``S + (k,)`` momenta; ``rms`` ``S`` second moment; for rank >= 2 ``v_row`` (``S`` without axis
``d0``) ``+ (k,)`` and ``v_col`` (``S`` without ``d1``) ``+ (k,)``; for rank < 2 ``v_diag`` ``S + (k,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .features import factored_dims
from .network import CeloNet

GRAD_CLIP = 1000.0
FEATURE_GRAD_CLIP = 0.1
RMS_EPS = 1e-6
FACTORED_EPS = 1e-30
FACTOR_FLOOR = 1e-9
ROW_COL_EPS = 1e-8
NORMALISER_EPS = 1e-5
PARAM_SCALE_EPS = 1e-9
#: Default number of parameter elements processed at once by the fused update.
DEFAULT_CHUNK_ELEMENTS = 1 << 16

TensorState = dict[str, torch.Tensor]


def state_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape Celo computes with: the parameter's, with scalars as ``(1,)``."""
    return tuple(shape) or (1,)


def init_tensor_state(shape: torch.Size | tuple[int, ...], num_decays: int, device: torch.device | None = None) -> TensorState:
    """Zero accumulators for a parameter of ``shape`` (see the module docstring for the layout)."""
    shape = state_shape(shape)
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
    state = {"m": zeros(*shape, num_decays), "rms": zeros(*shape)}
    dims = factored_dims(shape)
    if dims is None:
        state["v_diag"] = zeros(*shape, num_decays)
    else:
        d0, d1 = dims
        state["v_row"] = zeros(*_drop(shape, d0), num_decays)
        state["v_col"] = zeros(*_drop(shape, d1), num_decays)
    return state


def _drop(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def factor_scales(v_row: torch.Tensor, v_col: torch.Tensor, d0: int, d1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor-style row and column scales, expanded so they broadcast against ``S + (k,)``.

    ``row = rsqrt(max(v_row / (mean of v_row over the d1 axis + 1e-9), 1e-9))`` (re-inserted at
    axis ``d0``) and ``col = rsqrt(max(v_col, 1e-9))`` (re-inserted at axis ``d1``).
    """
    d1_in_row = d1 - 1 if d1 > d0 else d1
    row_mean = v_row.mean(dim=d1_in_row, keepdim=True)
    row = torch.rsqrt(torch.clamp(v_row / (row_mean + FACTOR_FLOOR), min=FACTOR_FLOOR))
    col = torch.rsqrt(torch.clamp(v_col, min=FACTOR_FLOOR))
    return row.unsqueeze(d0), col.unsqueeze(d1)


def _decays(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


# ---- the literal reference ------------------------------------------------------------------------


def reference_update(
    param: torch.Tensor, grad: torch.Tensor, state: TensorState, lr_mult: torch.Tensor, net: CeloNet
) -> tuple[torch.Tensor, TensorState]:
    """One Celo update of one tensor, transcribed from the specification.

    Args:
        param, grad: the parameter and its (unclipped) gradient, any float dtype, shape ``S``.
        state: the tensor's accumulators (not modified).
        lr_mult: 0-d or ``(1,)`` multiplier of the step (the scheduler's, times any external lr).
        net: the meta-model.

    Returns:
        The new parameter (float32, shape ``S``) and the new state.
    """
    shape = state_shape(param.shape)
    dev = param.device
    p = param.detach().float().reshape(shape)
    g = grad.float().reshape(shape).clamp(-GRAD_CLIP, GRAD_CLIP)
    mom_b = _decays(net.momentum_decays, dev)
    fac_b = _decays(net.factored_decays, dev)
    rms_b = net.rms_decay

    m = mom_b * state["m"] + (1 - mom_b) * g[..., None]
    rms = rms_b * state["rms"] + (1 - rms_b) * g * g
    gsq = (g * g + FACTORED_EPS)[..., None]
    new_state = {"m": m, "rms": rms}
    dims = factored_dims(shape)
    if dims is None:
        v_diag = fac_b * state["v_diag"] + (1 - fac_b) * gsq
        new_state["v_diag"] = v_diag
        fac_g = g[..., None] * torch.rsqrt(torch.clamp(v_diag + FACTOR_FLOOR, min=FACTOR_FLOOR))
        row = col = v_diag
        fac_m = m * v_diag.rsqrt()
    else:
        d0, d1 = dims
        v_row = fac_b * state["v_row"] + (1 - fac_b) * gsq.mean(dim=d0)
        v_col = fac_b * state["v_col"] + (1 - fac_b) * gsq.mean(dim=d1)
        new_state.update(v_row=v_row, v_col=v_col)
        row_scale, col_scale = factor_scales(v_row, v_col, d0, d1)
        fac_g = g[..., None] * row_scale * col_scale
        full = (*shape, m.shape[-1])
        row = v_row.unsqueeze(d0).expand(full)
        col = v_col.unsqueeze(d1).expand(full)
        fac_m = m * row_scale * col_scale

    rsqrt_rms = torch.rsqrt(rms + RMS_EPS)
    groups = [
        g[..., None], g.clamp(-FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP)[..., None], p[..., None], m,
        rms[..., None], m * rsqrt_rms[..., None], rsqrt_rms[..., None], fac_g, (g * rsqrt_rms)[..., None],
        row, col, torch.rsqrt(row + ROW_COL_EPS), torch.rsqrt(col + ROW_COL_EPS), fac_m,
    ]
    x = torch.cat(groups, dim=-1)
    tensor_axes = tuple(range(len(shape)))
    x = x * torch.rsqrt(NORMALISER_EPS + (x * x).mean(dim=tensor_axes, keepdim=True))
    out = net(x)
    direction, magnitude = out[..., 0], out[..., 1]
    param_scale = torch.sqrt((p * p).mean() + PARAM_SCALE_EPS)
    step = direction * param_scale * torch.exp(net.exp_mult * magnitude) * net.step_mult * lr_mult.reshape(())
    return (p - step).reshape(param.shape), new_state


# ---- the fused, chunked update --------------------------------------------------------------------


@dataclass(frozen=True)
class FusedWeights:
    """The meta-model's weights laid out for :func:`fused_update_`, on one device, float32.

    ``first`` is the first layer's weight ``(30, hidden)`` as ``(in, out)``; ``hidden_layers`` the
    following ``(weight (out, in), bias)`` pairs; ``last`` keeps only the direction and magnitude rows.
    """

    first: torch.Tensor
    first_bias: torch.Tensor
    hidden_layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    last: tuple[torch.Tensor, torch.Tensor]
    momentum_decays: torch.Tensor
    factored_decays: torch.Tensor
    rms_decay: float
    step_mult: float
    exp_mult: float
    group_slices: tuple[slice, ...]

    @classmethod
    def from_net(cls, net: CeloNet, device: torch.device) -> FusedWeights:
        with torch.no_grad():
            layers = [(w.detach().float().to(device), b.detach().float().to(device)) for w, b in net.mlp_layers()]
        (w0, b0), *hidden, (w_last, b_last) = layers
        starts = torch.tensor((0, *net.group_widths)).cumsum(0).tolist()
        return cls(
            first=w0.T.contiguous(),
            first_bias=b0,
            hidden_layers=tuple(hidden),
            last=(w_last[:2], b_last[:2]),
            momentum_decays=_decays(net.momentum_decays, device),
            factored_decays=_decays(net.factored_decays, device),
            rms_decay=net.rms_decay,
            step_mult=net.step_mult,
            exp_mult=net.exp_mult,
            group_slices=tuple(slice(a, b) for a, b in zip(starts[:-1], starts[1:])),
        )

    def rows(self, *groups: int) -> torch.Tensor:
        """First-layer weight rows of the given feature groups, concatenated: ``(width, hidden)``."""
        return torch.cat([self.first[self.group_slices[i]] for i in groups])


# Feature groups computed per element (the others are the row / col groups 9-12).
_ELEMENT_GROUPS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 13)
_PARAM_COLUMN = 2  # column of the parameter value among the element features
_ROW, _COL, _RSQRT_ROW, _RSQRT_COL = 9, 10, 11, 12


def _chunks(rows: int, elements_per_row: int, chunk_elements: int) -> list[slice]:
    step = max(1, chunk_elements // max(1, elements_per_row))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _take_rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """Slice axis 0 of a tensor that is either full-size or broadcast (size 1) along it."""
    return t if t.shape[0] == 1 else t[rows]


def _element_features(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor,
    fac_scale: torch.Tensor, v_diag: torch.Tensor | None,
) -> torch.Tensor:
    """Per-element features of one chunk, un-normalised, as a ``(n, C)`` matrix.

    Columns follow ``_ELEMENT_GROUPS``; for unfactored tensors ``v_diag`` and ``rsqrt(v_diag+1e-8)``
    follow (they stand for groups 9+10 and 11+12, which are equal there). ``fac_scale`` is the
    factored preconditioner, broadcastable to ``m``.
    """
    rsqrt_rms = torch.rsqrt(rms + RMS_EPS)[..., None]
    g1 = g[..., None]
    columns = [
        g1, g1.clamp(-FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP), p[..., None], m, rms[..., None],
        m * rsqrt_rms, rsqrt_rms, g1 * fac_scale, g1 * rsqrt_rms,
    ]
    if v_diag is None:
        columns.append(m * fac_scale)
    else:
        columns += [m * v_diag.rsqrt(), v_diag, torch.rsqrt(v_diag + ROW_COL_EPS)]
    x = torch.cat([c.expand(*m.shape[:-1], c.shape[-1]) for c in columns], dim=-1)
    return x.reshape(-1, x.shape[-1])


def _normaliser(sum_sq: torch.Tensor, count: int) -> torch.Tensor:
    return torch.rsqrt(NORMALISER_EPS + sum_sq / count)


def _grid_contribution(v: torch.Tensor, w: FusedWeights, value_group: int, rsqrt_group: int) -> torch.Tensor:
    """First-layer contribution of a factored row or column accumulator, on its own grid.

    The broadcast feature's tensor-wide mean square equals its mean square over the grid, so the
    normaliser is computed here too. Returns ``(*grid, hidden)``.
    """
    rsqrt_v = torch.rsqrt(v + ROW_COL_EPS)
    grid_axes = tuple(range(v.dim() - 1))
    value_w = w.first[w.group_slices[value_group]] * _normaliser((v * v).sum(grid_axes), v[..., 0].numel())[:, None]
    rsqrt_w = w.first[w.group_slices[rsqrt_group]] * _normaliser((rsqrt_v * rsqrt_v).sum(grid_axes), v[..., 0].numel())[:, None]
    return v @ value_w + rsqrt_v @ rsqrt_w


def fused_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: TensorState,
    lr_scale: torch.Tensor,
    w: FusedWeights,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """One Celo update of one tensor, in place on ``param`` and ``state``.

    Same maths as :func:`reference_update`. Three streaming passes over chunks of rows of the
    parameter (axis 0): (0) factored second moments (rank >= 2 only), (1) accumulators and each
    feature's sum of squares, (2) features, MLP and write-back. A tensor that fits in one chunk
    builds its features once.

    Args:
        param: the parameter, any float dtype, updated in place.
        grad: its gradient (unclipped), same shape.
        state: the tensor's float32 accumulators, updated in place.
        lr_scale: 0-d or ``(1,)`` float32 multiplier of the step (scheduler ``lr_mult`` times the
            group's ``lr``), on ``param``'s device.
        w: the meta-model's weights, see :class:`FusedWeights`.
        chunk_elements: parameter elements per chunk; bounds the temporary memory.
    """
    shape = state_shape(param.shape)
    p_all, g_all = param.view(shape), grad.reshape(shape)
    numel = param.numel()
    chunks = _chunks(shape[0], numel // shape[0], chunk_elements)
    clipped = lambda rows: g_all[rows].float().clamp(-GRAD_CLIP, GRAD_CLIP)  # noqa: E731
    m_all, rms_all, beta, fac_beta = state["m"], state["rms"], w.momentum_decays, w.factored_decays
    dims = factored_dims(shape)

    if dims is None:
        v_diag_all = state["v_diag"]
        grid = None
    else:
        d0, d1 = dims
        row_sum = torch.zeros(_drop(shape, d0), dtype=torch.float32, device=param.device)
        col_sum = torch.zeros(_drop(shape, d1), dtype=torch.float32, device=param.device)
        for rows in chunks:
            gsq = clipped(rows).square_().add_(FACTORED_EPS)
            for total, axis in ((row_sum, d0), (col_sum, d1)):
                if axis == 0:
                    total += gsq.sum(0)
                else:
                    total[rows] = gsq.sum(axis)
        state["v_row"].mul_(fac_beta).add_((row_sum / shape[d0])[..., None] * (1 - fac_beta))
        state["v_col"].mul_(fac_beta).add_((col_sum / shape[d1])[..., None] * (1 - fac_beta))
        row_scale, col_scale = factor_scales(state["v_row"], state["v_col"], d0, d1)
        grid = (
            _grid_contribution(state["v_row"], w, _ROW, _RSQRT_ROW).unsqueeze(d0)
            + _grid_contribution(state["v_col"], w, _COL, _RSQRT_COL).unsqueeze(d1)
        )

    def features(rows: slice) -> torch.Tensor:
        g = clipped(rows)
        if dims is None:
            v_diag = v_diag_all[rows]
            scale = torch.rsqrt(torch.clamp(v_diag + FACTOR_FLOOR, min=FACTOR_FLOOR))
        else:
            v_diag, scale = None, _take_rows(row_scale, rows) * _take_rows(col_scale, rows)
        return _element_features(p_all[rows].float(), g, m_all[rows], rms_all[rows], scale, v_diag)

    sum_sq = None
    x = None
    for rows in chunks:
        g = clipped(rows)
        m_all[rows].mul_(beta).add_(g[..., None] * (1 - beta))
        rms_all[rows].mul_(w.rms_decay).addcmul_(g, g, value=1 - w.rms_decay)
        if dims is None:
            v_diag_all[rows].mul_(fac_beta).add_((g * g + FACTORED_EPS)[..., None] * (1 - fac_beta))
        x = features(rows)
        chunk_sum_sq = (x * x).sum(0)
        sum_sq = chunk_sum_sq if sum_sq is None else sum_sq + chunk_sum_sq

    norm = _normaliser(sum_sq, numel)
    param_scale = torch.sqrt(sum_sq[_PARAM_COLUMN] / numel + PARAM_SCALE_EPS)
    step_scale = (param_scale * w.step_mult * lr_scale).reshape(())
    if dims is None:
        paired = w.first[w.group_slices[_ROW]] + w.first[w.group_slices[_COL]]
        paired_rsqrt = w.first[w.group_slices[_RSQRT_ROW]] + w.first[w.group_slices[_RSQRT_COL]]
        first = torch.cat([w.rows(*_ELEMENT_GROUPS), paired, paired_rsqrt])
    else:
        first = w.rows(*_ELEMENT_GROUPS)
    first = first * norm[:, None]

    for rows in chunks:
        if len(chunks) > 1:
            x = features(rows)
        p = p_all[rows]
        h = (x @ first).view(*p.shape, -1) + w.first_bias
        if grid is not None:
            h = h + _take_rows(grid, rows)
        h = torch.relu(h)
        for weight, bias in w.hidden_layers:
            h = torch.relu(torch.nn.functional.linear(h, weight, bias))
        out = torch.nn.functional.linear(h, *w.last)
        step = out[..., 0] * torch.exp(w.exp_mult * out[..., 1]) * step_scale
        if p.dtype == torch.float32:
            p.sub_(step)
        else:
            p.copy_(p.float() - step)
