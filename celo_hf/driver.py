"""The driver: one update of a batch of same-shaped tensors, on any registered backend.

:func:`update_batch_` is what :class:`celo_hf.Celo` and meta-training (:mod:`celo_hf.population`)
run. It updates ``B`` same-shaped tensors in place, each with its own meta-weights (the optimizer
batches small tensors of equal shape, weights shared; meta-training batches a population of
perturbed meta-models). Same maths as :func:`celo_hf.reference.reference_step`, row by row, but it
never builds a ``(numel, 30)`` array: it streams over chunks of the tensors' first axis, folds each
feature's tensor-wide normaliser into the first-layer weights, computes the factored row / column
features on their own small grids, completes every statistic across processes when the tensors are
row-sharded (FSDP2), and hands the per-element work to a backend's kernels
(:class:`celo_hf.layout.Kernels`, chosen in :mod:`celo_hf.backends`). Nothing synchronises with the
host. Layout, constants and types: :mod:`celo_hf.layout`. The rule's configuration
(``w.config``) gives the constants; for Celo2 the driver returns the MLP's directions of vectors and
matrices (``direction_out``), from which :mod:`celo_hf.celo2.update` makes the step.
"""

from __future__ import annotations

import torch

from . import backends
from .layout import (
    VECTORLESS_GROUPS,
    Decays,
    FactoredStatistics,
    Factors,
    FoldedMlp,
    Grid,
    Kernels,
    Preconditioners,
    RowSharding,
    RuleConstants,
    TensorState,
    UpdateWeights,
    drop_axis,
    factored_dims,
    kernel_channel_offsets,
    numel,
    param_scale_floor,
    product,
    row_mean_axis,
    total,
)
from .reference import factor_scales

#: Tensors up to this many elements are stacked with others of the same shape and updated together.
SMALL_TENSOR_ELEMENTS = 1 << 14


def _sum_over_rows(t: torch.Tensor, sharding: RowSharding | None) -> torch.Tensor:
    """Complete a partial sum over the sharded first axis (identity when not sharded)."""
    if sharding is not None:
        torch.distributed.all_reduce(t, group=sharding.group)
    return t


def _normaliser(sum_sq: torch.Tensor, count: int, constants: RuleConstants) -> torch.Tensor:
    return torch.rsqrt(constants.normaliser_eps + sum_sq / count)


def _chunks(rows: int, elements_per_row: int, chunk_elements: int) -> list[slice]:
    step = max(1, chunk_elements // max(1, elements_per_row))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _flat(t: torch.Tensor, rows: slice, lead: int) -> torch.Tensor:
    """Rows ``rows`` of axis ``lead`` of ``t``, flattened from there on: a view, so writes land in ``t``."""
    return t[(slice(None),) * lead + (rows,)].view(*t.shape[:lead], -1)


def _grid(t: torch.Tensor, rows: slice, lead: int, matrix: bool) -> torch.Tensor:
    """Rows ``rows`` of axis ``lead`` of ``t`` as the kernels' grid: ``(..., r, cols)`` for a matrix,
    else flattened to ``(..., 1, n)``. A view, so writes land in ``t``."""
    part = t[(slice(None),) * lead + (rows,)]
    return part if matrix else part.view(*t.shape[:lead], 1, -1)


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of axis 2 of a tensor that is full-size or broadcast (size 1) along it."""
    return t if t.shape[2] == 1 else t[:, :, rows]


def _first_layer_part(
    v: torch.Tensor, value_w: torch.Tensor, rsqrt_v: torch.Tensor, rsqrt_w: torch.Tensor
) -> torch.Tensor:
    """``value_w^T v + rsqrt_w^T rsqrt_v`` per batch row: ``(B, k, n)`` features and ``(B, k, H)``
    weights give ``(B, H, n)``."""
    return torch.baddbmm(torch.bmm(value_w.transpose(1, 2), v), rsqrt_w.transpose(1, 2), rsqrt_v)


def _grid_hidden(
    v: torch.Tensor, value_w: torch.Tensor, rsqrt_w: torch.Tensor, count: int, sharding: RowSharding | None,
    constants: RuleConstants,
) -> torch.Tensor:
    """First-layer contribution of a factored accumulator ``v (B, k, *grid)`` on its own grid.

    A broadcast feature's tensor-wide mean square equals its mean square over the grid (``count``
    cells in all; ``sharding`` when this process holds only some rows of it), so its normaliser is
    computed here. ``value_w``/``rsqrt_w`` ``(B, k, H)``. Returns ``(B, H, *grid)``.
    """
    flat = v.flatten(2)
    rsqrt_flat = torch.rsqrt(flat + constants.row_col_eps)
    sums = _sum_over_rows(torch.stack([(flat * flat).sum(2), (rsqrt_flat * rsqrt_flat).sum(2)]), sharding)
    value_w = value_w * _normaliser(sums[0], count, constants)[..., None]
    rsqrt_w = rsqrt_w * _normaliser(sums[1], count, constants)[..., None]
    hidden = _first_layer_part(flat, value_w, rsqrt_flat, rsqrt_w)
    return hidden.view(*hidden.shape[:2], *v.shape[2:])


def factored_statistics(
    g: torch.Tensor, state: TensorState, w: UpdateWeights, dims: tuple[int, int], chunks: list[slice],
    full: tuple[int, ...], sharding: RowSharding | None, kernels: Kernels,
) -> FactoredStatistics:
    """Update a rank >= 2 batch's ``v_row`` / ``v_col`` in place (pass 0 on ``kernels``, chunk by
    chunk) and return what the per-element passes need from them (:class:`FactoredStatistics`).

    ``g`` ``(B, *S)``; ``full`` the tensors' whole shape (``S`` unless ``sharding``).
    """
    d0, d1 = dims
    batch, shape = g.shape[0], tuple(g.shape[1:])
    beta = w.factored_decays.view(1, -1, *([1] * (len(shape) - 1)))
    if len(chunks) == 1:
        row_sum, col_sum = kernels.square_sums(g, d0, d1)
    else:
        row_sum = torch.zeros(batch, *drop_axis(shape, d0), dtype=torch.float32, device=g.device)
        col_sum = torch.zeros(batch, *drop_axis(shape, d1), dtype=torch.float32, device=g.device)
        for rows in chunks:
            for part_total, part, axis in zip((row_sum, col_sum), kernels.square_sums(g[:, rows], d0, d1), dims):
                if axis == 0:
                    part_total += part
                else:
                    part_total[:, rows] = part
    # Reductions over the first axis are partial when it is sharded; the others are local.
    row_sum = _sum_over_rows(row_sum, sharding) if d0 == 0 else row_sum
    col_sum = _sum_over_rows(col_sum, sharding) if d1 == 0 else col_sum
    v_row, v_col = state["v_row"], state["v_col"]
    v_row.mul_(beta).add_((row_sum / full[d0]).unsqueeze(1) * (1 - beta))
    v_col.mul_(beta).add_((col_sum / full[d1]).unsqueeze(1) * (1 - beta))
    row_total = v_row.sum(dim=2 + row_mean_axis(d0, d1), keepdim=True)
    row_mean = (_sum_over_rows(row_total, sharding) if d1 == 0 else row_total) / full[d1]
    constants = w.config.constants
    row_scale, col_scale = factor_scales(v_row, v_col, d0, d1, lead=2, row_mean=row_mean, floor=constants.factor_floor)
    count = numel(full)
    bias = w.first_bias.view(*w.first_bias.shape, *([1] * (len(shape) - 1)))
    row_hidden = _grid_hidden(
        v_row, w.group("row"), w.group("rsqrt_row"), count // full[d0], sharding if d0 != 0 else None, constants
    )
    col_hidden = _grid_hidden(
        v_col, w.group("col"), w.group("rsqrt_col"), count // full[d1], sharding if d1 != 0 else None, constants
    )
    return FactoredStatistics(
        row_scale, col_scale, (row_hidden + bias).unsqueeze(2 + d0), col_hidden.unsqueeze(2 + d1), matrix=len(shape) == 2
    )


class _FactoredMoments:
    """Row / column second moments of rank >= 2 tensors (``v_row``, ``v_col``), prepared up front."""

    def __init__(self, statistics: FactoredStatistics, batch: int):
        self.statistics = statistics
        self.batch = batch

    def accumulate(self, g: torch.Tensor, rows: slice) -> None:
        """Nothing per chunk: the factored moments were updated up front."""

    def finish_statistics(self) -> None:
        """Nothing to complete: the grid statistics were computed up front."""

    def preconditioners(self, rows: slice) -> Preconditioners:
        """A matrix's row and column factors, left for the kernels to multiply; for higher ranks
        their product, flattened."""
        s = self.statistics
        factors = _row_factor_first(_rows(s.row_scale, rows), _rows(s.col_scale, rows))
        if not s.matrix:
            q = product(factors)
            factors = (q.view(self.batch, q.shape[1], 1, -1),)
        return Preconditioners(factors, factors)

    def hidden_input(self, rows: slice) -> Factors:
        s = self.statistics
        terms = _row_factor_first(_rows(s.row_hidden, rows), _rows(s.col_hidden, rows))
        if s.matrix:
            return terms
        hidden = total(terms)
        return (hidden.view(self.batch, hidden.shape[1], 1, -1),)


class _DiagonalMoments:
    """Per-element second moments of rank < 2 tensors (``v_diag``); its row and col features are
    both ``v_diag``, so their first-layer weights are summed."""

    def __init__(self, g: torch.Tensor, state: TensorState, w: UpdateWeights, count: int, sharding: RowSharding | None):
        self.constants = w.config.constants
        self.v_diag = state["v_diag"]
        self.beta = w.factored_decays.view(1, -1, 1)
        self.sum_sq = torch.zeros(2, g.shape[0], self.beta.shape[1], dtype=torch.float32, device=g.device)
        self.value_w = w.group("row") + w.group("col")
        self.rsqrt_w = w.group("rsqrt_row") + w.group("rsqrt_col")
        self.bias = w.first_bias[:, :, None]
        self.count = count
        self.sharding = sharding

    def accumulate(self, g: torch.Tensor, rows: slice) -> None:
        """Update this chunk of ``v_diag`` and add its features' sums of squares."""
        c = self.constants
        gc = g[:, rows].float().clamp(-c.grad_clip, c.grad_clip)
        v = _flat(self.v_diag, rows, 2)
        v.mul_(self.beta).add_((gc * gc + c.factored_eps).view(gc.shape[0], 1, -1) * (1 - self.beta))
        rsqrt_v = torch.rsqrt(v + c.row_col_eps)
        self.sum_sq += torch.stack([(v * v).sum(2), (rsqrt_v * rsqrt_v).sum(2)])

    def finish_statistics(self) -> None:
        """Complete the sums of squares across processes and turn them into normalisers."""
        self.norm = _normaliser(_sum_over_rows(self.sum_sq, self.sharding), self.count, self.constants)[..., None]

    def preconditioners(self, rows: slice) -> Preconditioners:
        v = _flat(self.v_diag, rows, 2).unsqueeze(2)
        floor = self.constants.factor_floor
        return Preconditioners((torch.rsqrt(torch.clamp(v + floor, min=floor)),), (v.rsqrt(),))

    def hidden_input(self, rows: slice) -> Factors:
        v = _flat(self.v_diag, rows, 2)
        rsqrt_v = torch.rsqrt(v + self.constants.row_col_eps)
        hidden = _first_layer_part(v, self.value_w * self.norm[0], rsqrt_v, self.rsqrt_w * self.norm[1])
        return ((hidden + self.bias).unsqueeze(2),)


def _row_factor_first(a: torch.Tensor, b: torch.Tensor) -> Factors:
    """``a`` and ``b`` ordered so that the one varying along the grid's rows ``(..., r, 1)`` comes
    first: the compiled kernels then see one layout whichever axis a matrix factors first (the
    product and the sum of two tensors do not depend on the order)."""
    return (b, a) if a.shape[-1] != 1 and b.shape[-1] == 1 else (a, b)


def update_batch_(
    p: torch.Tensor,
    g: torch.Tensor,
    state: TensorState,
    lr_scale: torch.Tensor,
    w: UpdateWeights,
    backend: str = "eager",
    chunk_elements: int | None = None,
    sharding: RowSharding | None = None,
    direction_out: torch.Tensor | None = None,
) -> None:
    """One update of ``B`` same-shaped tensors by the rule of ``w.config``, in place on ``p`` and ``state``.

    Three streaming passes over chunks of axis 1 (the tensors' first axis): (0) factored second
    moments (rank >= 2 only), (1) accumulators and each feature's sum of squares, (2) features, MLP
    and write-back.

    Args:
        p: ``(B, *S)`` parameters, any float dtype, updated in place; must be viewable as
            ``(B, -1)`` chunk by chunk (contiguous). ``S`` is never empty: a scalar is ``(B, 1)``.
        g: ``(B, *S)`` gradients (unclipped).
        state: the batch's accumulators, each with a leading ``B`` axis (:mod:`celo_hf.layout`).
        lr_scale: ``(B,)`` multipliers of the step (scheduler ``lr_mult`` times the group ``lr``).
        w: meta-model weights with ``B`` rows.
        backend: a registered backend's name (:data:`celo_hf.backends.REGISTRY`).
        chunk_elements: elements (over the whole batch) processed at once (``None``: the
            backend's default).
        sharding: set when ``p`` holds only this process's rows of the tensors (FSDP2); every
            statistic is then completed across processes.
        direction_out: ``None`` (Celo: the step is taken), or a float32 ``(B, *S)`` tensor that
            receives the MLP's raw direction instead, ``p`` left unchanged (Celo2, which makes its
            step from the whole tensor's directions; rank <= 2 only, normalised over the tensor).
    """
    spec = backends.get(backend)
    if direction_out is not None and spec.per_tensor:
        raise ValueError(f"backend={spec.name!r} updates tensor by tensor and cannot return directions")
    if spec.per_tensor:
        _update_tensor_by_tensor_(spec, p, g, state, lr_scale, w, sharding)
        return
    kernel = spec.kernels(w)
    chunk_elements = chunk_elements or spec.chunk_elements
    g = g.contiguous()
    shape = tuple(p.shape[1:])
    full = shape if sharding is None else sharding.full_shape(shape)
    count = numel(full)
    chunks = _chunks(shape[0], p.shape[0] * numel(shape[1:]), chunk_elements)
    dims = factored_dims(full)
    if dims is None and not w.config.vector_factored_groups:
        w = w.without_groups(VECTORLESS_GROUPS)
    if dims is None:
        moments: _FactoredMoments | _DiagonalMoments = _DiagonalMoments(g, state, w, count, sharding)
    else:
        statistics = (
            kernel.factored_statistics(g, state, w, dims[0])
            if kernel.factored_statistics is not None and sharding is None else None
        )
        if statistics is None:
            statistics = factored_statistics(g, state, w, dims, chunks, full, sharding, kernel)
        moments = _FactoredMoments(statistics, p.shape[0])
    matrix = len(shape) == 2

    def grid(rows: slice) -> Grid:
        return Grid(
            _grid(p, rows, 1, matrix), _grid(g, rows, 1, matrix),
            _grid(state["m"], rows, 2, matrix), _grid(state["rms"], rows, 1, matrix),
        )

    # A batch that fits in one chunk may keep its stacked channels for pass 2, where the backend
    # offers it (not with low-precision moments: pass 2 must see them as stored, rounded, like every
    # other path).
    full_precision = state["m"].dtype == state["rms"].dtype == torch.float32
    whole_batch = kernel.whole_batch if len(chunks) == 1 and full_precision else None
    decays = Decays(w.momentum_decays, w.config.rms_decay)
    channels = None
    sum_sq = torch.zeros(w.element_first.shape[:2], dtype=torch.float32, device=p.device)
    for rows in chunks:
        moments.accumulate(g, rows)
        if whole_batch is not None:
            channels = whole_batch[0](grid(rows), moments.preconditioners(rows), decays)
            sum_sq += (channels * channels).sum((-2, -1))
        else:
            sum_sq += kernel.accumulate_(grid(rows), moments.preconditioners(rows), decays)
    sum_sq = _sum_over_rows(sum_sq, sharding)
    moments.finish_statistics()

    constants = w.config.constants
    first = w.element_first * _normaliser(sum_sq, count, constants)[..., None]
    param_channel = kernel_channel_offsets(w.config.num_decays)["param"]
    param_scale = torch.sqrt(sum_sq[:, param_channel] / count + constants.param_scale_eps)
    floor = param_scale_floor(full, w.config.param_scale_floor)
    if floor > 0:
        param_scale = param_scale.clamp(min=floor)
    mlp = FoldedMlp(first, w.hidden_layers, w.last, w.config.exp_mult, param_scale * w.config.step_mult * lr_scale)
    for rows in chunks:
        if direction_out is not None:
            mlp = mlp._replace(direction_out=_grid(direction_out, rows, 1, matrix))
        if whole_batch is not None:
            whole_batch[1](_grid(p, rows, 1, matrix), channels, moments.hidden_input(rows), mlp)
        else:
            kernel.mlp_step_(grid(rows), moments.preconditioners(rows), moments.hidden_input(rows), mlp)


def _update_tensor_by_tensor_(
    spec: backends.Backend, p: torch.Tensor, g: torch.Tensor, state: TensorState, lr_scale: torch.Tensor,
    w: UpdateWeights, sharding: RowSharding | None,
) -> None:
    """A per-tensor backend (the reference) on each batch row in turn."""
    if sharding is not None:
        raise RuntimeError(f"backend={spec.name!r} does not support sharded (FSDP2) parameters; use 'eager'")
    update_tensor_ = spec.load().update_tensor_
    for row in range(p.shape[0]):
        update_tensor_(p[row], g[row], {key: value[row] for key, value in state.items()}, lr_scale[row], w.row(row))
