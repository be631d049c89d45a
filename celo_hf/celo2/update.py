"""Celo2's learned branch, batched: the form the optimizer and meta-training both run.

A learned-branch step of ``B`` same-shape tensors has three stages:

1. :func:`directions_`: the accumulators (in place) and the MLP's direction of every element.
   Vectors and matrices (rank <= 2: one normalisation slice per tensor) go through the driver
   (:func:`celo_hf.driver.update_batch_` with ``direction_out``) and so through any registered
   kernel backend (``eager``, ``compile``, ``cpp``), with Celo2's constants and without the factored
   groups for vectors (``Celo2Net.rule_config()``). Higher ranks, normalised per matrix of the last
   two axes (which the driver's tensor-wide normalisers cannot express), run here in torch: each
   group's normaliser per slice is found from its own values, folded into the first layer, and the
   features are rebuilt block by block for the MLP. ``"reference"`` runs the literal
   :mod:`celo_hf.celo2.reference` tensor by tensor.
2. :func:`steps_from_directions`: Newton-Schulz over every matrix of the batch in one chain of
   batched products, then RMS 1 per slice.
3. :func:`apply_step_`: ``p <- (p - lr u) - (wd p) lr``.

Each batch row may have its own MLP (a meta-training population) or share one (the optimizer:
:meth:`celo_hf.layout.UpdateWeights.expand`). Shapes: parameters ``(B, *S)`` (scalars as ``S =
(1,)``), the state of :func:`celo_hf.layout.init_tensor_state` with a leading ``B`` axis; ``k``
decays, ``F`` features, ``H`` hidden units; a tensor's *slices* are its matrices over the last two
axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..driver import update_batch_
from ..layout import RuleConfig, TensorState, UpdateWeights, factored_dims, numel
from ..reference import factor_scales
from . import reference
from .newton_schulz import orthogonalize
from .rule import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, CONSTANTS

#: Elements (per batch row times rows) whose features one MLP chunk builds at a time.
CHUNK_ELEMENTS = 1 << 16


def _decays(values: Sequence[float], like: torch.Tensor, rank: int) -> torch.Tensor:
    """``values`` as a ``(1, k, 1, ...)`` float32 tensor that broadcasts over ``(B, k, *S)`` of ``rank``."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, *([1] * rank))


class _Features:
    """The feature groups of a batch at this step, built on demand for any block of leading rows.

    Holds the clipped gradient, the parameters, the new accumulators and the factored statistics;
    :meth:`groups` returns the groups in :data:`celo_hf.layout.FEATURE_GROUP_NAMES` order (the first
    nine for rank < 2), each ``(B, width, *S_block)``, for the block ``rows`` of axis 0 of ``S``.
    """

    def __init__(self, p: torch.Tensor, g: torch.Tensor, state: TensorState, config: RuleConfig):
        self.p, self.g, self.m, self.rms = p, g, state["m"], state["rms"]
        self.constants = c = config.constants
        self.dims = factored_dims(p.shape[1:])
        assert self.dims is not None and p.dim() >= 4, "rank >= 3 tensors only (lower ranks go through the driver)"
        fac_b = _decays(config.factored_decays, g, p.dim() - 2)
        gsq = (g * g + c.factored_eps).unsqueeze(1)
        d0, d1 = self.dims
        v_row, v_col = state["v_row"], state["v_col"]
        v_row.mul_(fac_b).add_((1 - fac_b) * gsq.mean(dim=2 + d0))
        v_col.mul_(fac_b).add_((1 - fac_b) * gsq.mean(dim=2 + d1))
        row_scale, col_scale = factor_scales(v_row, v_col, d0, d1, lead=2, floor=c.factor_floor)
        self.scale = row_scale * col_scale
        self.row = v_row.unsqueeze(2 + d0)
        self.col = v_col.unsqueeze(2 + d1)

    def groups(self, rows: slice) -> list[torch.Tensor]:
        block = lambda t, axis=1: t if t.shape[axis] == 1 else t.narrow(axis, rows.start, rows.stop - rows.start)  # noqa: E731
        c = self.constants
        g, p = block(self.g).unsqueeze(1), block(self.p).unsqueeze(1)
        m, scale = block(self.m, 2), block(self.scale, 2)
        s = torch.rsqrt(block(self.rms).unsqueeze(1) + c.rms_eps)
        full = (*m.shape[:2], *g.shape[2:])
        row, col = block(self.row, 2).expand(full), block(self.col, 2).expand(full)
        clip = c.feature_grad_clip
        return [
            g, g.clamp(-clip, clip), p, m, block(self.rms).unsqueeze(1), m * s, s, g * scale, g * s,
            row, col, torch.rsqrt(row + c.row_col_eps), torch.rsqrt(col + c.row_col_eps), m * scale,
        ]


def _slices(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(number of slices, elements per slice)`` of a tensor of ``shape`` (rank >= 1)."""
    return numel(shape[:-2]), numel(shape[-2:])


def _to_slices(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S_block)`` -> ``(B, L_block, C, E)``: the channels of each slice of a block."""
    batch, channels, *shape = t.shape
    lead, elements = _slices(tuple(shape))
    return t.reshape(batch, channels, lead, elements).transpose(1, 2)


def _slice_directions(features: _Features, w: UpdateWeights, chunk_elements: int) -> torch.Tensor:
    """The MLP's direction ``(B, *S)``, float32, on features normalised over each slice (rank >= 3).

    The normalisers (``(B, L, F)``: one per slice and channel) are folded into the first layer; the
    features are then built again for blocks of axis 0 of ``S`` of about ``chunk_elements`` in all
    (for rank >= 3 blocks of whole leading indices, so each block holds whole slices).
    """
    p = features.p
    batch, shape = p.shape[0], tuple(p.shape[1:])
    mean_sq = torch.cat([_to_slices(x * x).mean(dim=-1) for x in features.groups(slice(0, shape[0]))], dim=2)
    normaliser = torch.rsqrt(features.constants.normaliser_eps + mean_sq)
    first = w.first.transpose(1, 2)[:, None] * normaliser[:, :, None, :]  # (B, L, H, F)
    slices_per_row = _slices(shape)[0] // shape[0] if len(shape) >= 3 else 0  # (B, L, H, F) rows per index of axis 0
    rows_per_block = max(1, chunk_elements // (batch * numel(shape[1:])))
    direction = torch.empty(batch, *shape, dtype=torch.float32, device=p.device)
    for start in range(0, shape[0], rows_per_block):
        rows = slice(start, min(shape[0], start + rows_per_block))
        x = torch.cat([_to_slices(group) for group in features.groups(rows)], dim=2)  # (B, L_block, F, E)
        block_first = first[:, rows.start * slices_per_row : rows.stop * slices_per_row] if slices_per_row else first
        h = torch.relu(block_first @ x + w.first_bias[:, None, :, None])  # (B, L_block, H, E)
        for weight, bias in w.hidden_layers:
            h = torch.relu(weight[:, None] @ h + bias[:, None, :, None])
        weight, bias = w.last[0][:, 0], w.last[1][:, 0]  # the direction output
        d = (weight[:, None, None, :] @ h).squeeze(2) + bias[:, None, None]  # (B, L_block, E)
        direction[:, rows] = d.reshape(batch, rows.stop - rows.start, *shape[1:])
    return direction


def directions_(
    p: torch.Tensor, g: torch.Tensor, state: TensorState, w: UpdateWeights, backend: str = "eager",
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Stage 1 of a learned-branch step of ``B`` same-shape tensors: update the accumulators in
    place and return the MLP's direction ``(B, *S)`` float32.

    Args:
        p: parameters ``(B, *S)``, before the step (any float dtype; read in float32; contiguous).
        g: their unclipped gradients ``(B, *S)``.
        state: their accumulators (:func:`celo_hf.layout.init_tensor_state` of ``S`` with a leading
            ``B`` axis; float32), updated in place.
        w: the MLP of each row (or one, expanded), with Celo2's configuration.
        backend: a registered kernel backend for ranks <= 2, or ``"reference"``.
        chunk_elements: bound on the features built at once (``None``: the backend's default).
    """
    if backend == "reference":
        return _reference_directions_(p, g, state, w)
    if p.dim() <= 3:
        direction = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        ones = torch.ones(p.shape[0], dtype=torch.float32, device=p.device)
        update_batch_(p, g, state, ones, w, backend, chunk_elements, direction_out=direction)
        return direction
    constants = w.config.constants
    gf = g.float().clamp(-constants.grad_clip, constants.grad_clip)
    rank = p.dim() - 1
    mom_b = _decays(w.config.momentum_decays, gf, rank)
    state["m"].mul_(mom_b).add_((1 - mom_b) * gf.unsqueeze(1))
    state["rms"].mul_(w.config.rms_decay).add_((1 - w.config.rms_decay) * gf * gf)
    features = _Features(p.detach().float(), gf, state, w.config)
    return _slice_directions(features, w, chunk_elements or CHUNK_ELEMENTS)


def _reference_directions_(p: torch.Tensor, g: torch.Tensor, state: TensorState, w: UpdateWeights) -> torch.Tensor:
    """:func:`directions_` by the literal reference, one batch row at a time."""
    directions = []
    for row in range(p.shape[0]):
        layers = [(w.first[row].T, w.first_bias[row]), *((weight[row], bias[row]) for weight, bias in w.hidden_layers),
                  (w.last[0][row], w.last[1][row])]
        out = reference.learned_step(p[row], g[row], {k: v[row] for k, v in state.items()}, layers, w.config, False)
        for key, value in out.state.items():
            state[key][row].copy_(value)
        directions.append(out.direction.reshape(p.shape[1:]))
    return torch.stack(directions)


def steps_from_directions(direction: torch.Tensor, orthogonalize_matrices: bool) -> torch.Tensor:
    """Stage 2: the steps ``u`` ``(B, *S)`` of directions ``(B, *S)``: Newton-Schulz on every
    matrix of the batch when ``orthogonalize_matrices`` and rank >= 2 (one chain of batched
    products), then RMS 1 over each slice."""
    rank = direction.dim() - 1
    step = orthogonalize(direction) if orthogonalize_matrices and rank >= 2 else direction
    mean_sq = (step * step).mean(dim=tuple(range(max(1, rank - 1), rank + 1)), keepdim=True)
    return step * torch.rsqrt(CONSTANTS.normaliser_eps + mean_sq)


def apply_step_(p: torch.Tensor, step: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
    """Stage 3: ``p <- (p - lr step) - (wd p) lr`` in place, float32 arithmetic, ``lr`` and
    ``weight_decay`` float32 tensors broadcastable to ``p`` (per batch row: ``(B, 1, ...)``)."""
    pf = p.detach().float()
    p.copy_((pf - lr * step) - (weight_decay * pf) * lr)


def learned_update_(
    p: torch.Tensor,
    g: torch.Tensor,
    state: TensorState,
    w: UpdateWeights,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    orthogonalize_matrices: bool,
    backend: str = "eager",
    chunk_elements: int | None = None,
) -> None:
    """A whole learned-branch step of ``B`` same-shape tensors, in place (the three stages);
    ``lr``, ``weight_decay`` ``(B,)`` float32; other arguments as :func:`directions_`."""
    direction = directions_(p, g, state, w, backend, chunk_elements)
    step = steps_from_directions(direction, orthogonalize_matrices)
    shape = (-1, *([1] * (p.dim() - 1)))
    apply_step_(p, step, lr.view(shape), weight_decay.view(shape))


def init_adam_state(shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None) -> TensorState:
    """Zero ``m1`` and ``v1`` (float32, each of ``shape``) for the Adam branch."""
    return {key: torch.zeros(tuple(shape), dtype=torch.float32, device=device) for key in ("m1", "v1")}


def adam_update_(p: torch.Tensor, g: torch.Tensor, state: TensorState, lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
    """The Adam branch on one tensor (or a batch, ``lr`` / ``weight_decay`` broadcastable), in place:
    ``m1``, ``v1`` from the raw gradient, ``p <- (p - lr a) - (wd p) lr`` with ``a = m1 rsqrt(v1 + 1e-8)``;
    ``lr`` is already the branch's (``mult_1d`` times the learning rate)."""
    gf = g.float()
    state["m1"].mul_(ADAM_BETA1).add_((1 - ADAM_BETA1) * gf)
    state["v1"].mul_(ADAM_BETA2).add_((1 - ADAM_BETA2) * gf * gf)
    apply_step_(p, state["m1"] * torch.rsqrt(state["v1"] + ADAM_EPS), lr, weight_decay)
