"""Celo's per-tensor update: accumulators, features, MLP and step, as plain functions.

Two implementations of the same maths (``docs/celo-algorithm.md`` §4, §7, §8) live side by side:

* :func:`reference_update` transcribes the specification literally: it builds the full
  ``(*shape, 30)`` feature array, normalises it and runs the MLP. It is pure (returns new tensors)
  and exists to be read and to check the fast one against.
* :func:`update_batch_` is what :class:`celo_hf.Celo` and meta-training run. It updates a *batch* of
  ``B`` same-shaped tensors in place, each with its own meta-weights: the optimizer batches small
  tensors of equal shape (weights shared); meta-training batches a population of perturbed
  meta-models. It never builds a ``(numel, 30)`` array: it streams over chunks, folds each feature's
  tensor-wide normaliser into the first-layer weights, and computes the factored row / column
  features on their own small grids. The per-element work is three "kernels" on ``(B, a, b)``
  grids (:func:`factored_square_sums`, :func:`accumulate_and_square_sums_`, :func:`mlp_step_`);
  a matrix's row and column factors are combined inside them, never expanded outside.
  ``torch.compile`` runs them as explicit multiply-adds with every intermediate inlined (no
  full-size buffers); eagerly they take batched matrix products instead (fewer operations).
  ``backend="triton"`` swaps in hand-written Triton kernels with the same contract
  (:mod:`celo_hf.triton_kernels`), ``backend="cpp"`` hand-written C++ ones for CPUs
  (:mod:`celo_hf.cpu_kernels`). Nothing synchronises with the host.

State of one tensor of shape ``S`` (scalars count as ``S = (1,)``), float32 (``m`` and ``rms`` may
be stored in bfloat16), ``k`` decays, the decay axis *first* so that each decay's plane is
contiguous: ``m`` ``(k, *S)`` momenta, ``rms`` ``S`` second moment; for rank >= 2 ``v_row`` ``(k, *S without d0)`` and ``v_col``
``(k, *S without d1)``; for rank < 2 ``v_diag`` ``(k, *S)``. A batch stacks these on a new axis 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

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
#: Default number of parameter elements processed at once, per backend (bounds temporary memory;
#: eager runs fastest on cache-sized chunks, compiled kernels amortise their call cost on larger ones;
#: the C++ kernels allocate nothing per chunk except float32 copies of other dtypes).
DEFAULT_CHUNK_ELEMENTS = {"eager": 1 << 16, "compile": 1 << 22, "triton": 1 << 20, "cpp": 1 << 22}
#: Eager pass 1 sums squares over stacked channels up to this many elements, per channel above.
_STACKED_SUM_ELEMENTS = 8192
#: Tensors up to this many elements are stacked with others of the same shape and updated together.
SMALL_TENSOR_ELEMENTS = 1 << 14

TensorState = dict[str, torch.Tensor]
#: Tensors whose product (preconditioners) or sum (first-layer input) a kernel forms element by element.
Factors = tuple[torch.Tensor, ...]
Backend = Literal["eager", "compile", "triton", "cpp"]


def state_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape Celo computes with: the parameter's, with scalars as ``(1,)``."""
    return tuple(shape) or (1,)


def _drop(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def init_tensor_state(
    shape: torch.Size | tuple[int, ...],
    num_decays: int,
    device: torch.device | str | None = None,
    full_shape: torch.Size | tuple[int, ...] | None = None,
    moment_dtype: torch.dtype = torch.float32,
) -> TensorState:
    """Zero accumulators for a parameter of ``shape`` (see the module docstring for the layout).

    ``full_shape``: the whole tensor's shape when ``shape`` is this process's rows of it (FSDP2);
    the factored axes are chosen from it. ``moment_dtype``: storage of the two per-element
    accumulators ``m`` and ``rms`` (arithmetic stays float32; bfloat16 halves their memory).
    """
    shape = state_shape(shape)
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
    state = {
        "m": torch.zeros(num_decays, *shape, dtype=moment_dtype, device=device),
        "rms": torch.zeros(*shape, dtype=moment_dtype, device=device),
    }
    dims = factored_dims(state_shape(full_shape) if full_shape is not None else shape)
    if dims is None:
        state["v_diag"] = zeros(num_decays, *shape)
    else:
        d0, d1 = dims
        state["v_row"] = zeros(num_decays, *_drop(shape, d0))
        state["v_col"] = zeros(num_decays, *_drop(shape, d1))
    return state


def factor_scales(
    v_row: torch.Tensor, v_col: torch.Tensor, d0: int, d1: int, lead: int, row_mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor-style row and column scales, re-expanded so they broadcast against the tensor.

    ``v_row`` / ``v_col`` carry ``lead`` leading axes (decay, or batch and decay) before the
    parameter axes. Returns ``rsqrt(max(v_row / (mean of v_row over the d1 axis + 1e-9), 1e-9))``
    with a size-1 axis re-inserted at ``d0``, and ``rsqrt(max(v_col, 1e-9))`` re-inserted at ``d1``.
    ``row_mean`` (keepdim) may be given when that mean spans several processes.
    """
    if row_mean is None:
        row_mean = v_row.mean(dim=lead + row_mean_axis(d0, d1), keepdim=True)
    row = torch.rsqrt(torch.clamp(v_row / (row_mean + FACTOR_FLOOR), min=FACTOR_FLOOR))
    col = torch.rsqrt(torch.clamp(v_col, min=FACTOR_FLOOR))
    return row.unsqueeze(lead + d0), col.unsqueeze(lead + d1)


def row_mean_axis(d0: int, d1: int) -> int:
    """Position of parameter axis ``d1`` among ``v_row``'s parameter axes (``d0`` removed)."""
    return d1 - 1 if d1 > d0 else d1


def _decays(values: Sequence[float], device: torch.device | str | None) -> torch.Tensor:
    return torch.tensor(tuple(values), dtype=torch.float32, device=device)


# ---- the literal reference ------------------------------------------------------------------------


def reference_update(
    param: torch.Tensor, grad: torch.Tensor, state: TensorState, lr_mult: torch.Tensor, net: CeloNet
) -> tuple[torch.Tensor, TensorState]:
    """One Celo update of one tensor, transcribed from the specification (decay axis last inside).

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
    last = {key: value.movedim(0, -1) for key, value in state.items() if key != "rms"}
    p = param.detach().float().reshape(shape)
    g = grad.float().reshape(shape).clamp(-GRAD_CLIP, GRAD_CLIP)
    mom_b = _decays(net.momentum_decays, dev)
    fac_b = _decays(net.factored_decays, dev)
    rms_b = net.rms_decay

    m = mom_b * last["m"] + (1 - mom_b) * g[..., None]
    rms = rms_b * state["rms"] + (1 - rms_b) * g * g
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
    new_state = {key: value.movedim(-1, 0) for key, value in new.items()}
    new_state["rms"] = rms
    return (p - step).reshape(param.shape), new_state


# ---- weights laid out for the batched update ------------------------------------------------------


@dataclass(frozen=True)
class UpdateWeights:
    """Meta-model weights for a batch of ``B`` tensors (one set per batch row), float32.

    ``first`` is the first layer's weight ``(B, F, hidden)`` as ``(in, out)`` and ``element_first``
    its rows of the per-element channels (groups ``_ELEMENT_GROUPS``); ``hidden_layers`` the
    following ``(weight (B, out, in), bias (B, out))`` pairs; ``last`` keeps only the direction and
    magnitude rows ``((B, 2, hidden), (B, 2))``. Rows may be broadcast views (the optimizer shares
    one meta-model) or distinct (a meta-training population).
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
    element_first: torch.Tensor

    @classmethod
    def from_mlp_layers(
        cls, net: CeloNet, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
    ) -> UpdateWeights:
        """From per-row MLP layers ``[(weight (B, out, in), bias (B, out)), ...]`` and ``net``'s
        hyper-parameters (decays, multipliers, feature layout)."""
        layers = [(w.float().to(device), b.float().to(device)) for w, b in layers]
        (w0, b0), *hidden, (w_last, b_last) = layers
        starts = torch.tensor((0, *net.group_widths)).cumsum(0).tolist()
        group_slices = tuple(slice(a, b) for a, b in zip(starts[:-1], starts[1:]))
        first = w0.transpose(1, 2).contiguous()
        return cls(
            first=first,
            first_bias=b0,
            hidden_layers=tuple(hidden),
            last=(w_last[:, :2], b_last[:, :2]),
            momentum_decays=_decays(net.momentum_decays, device),
            factored_decays=_decays(net.factored_decays, device),
            rms_decay=net.rms_decay,
            step_mult=net.step_mult,
            exp_mult=net.exp_mult,
            group_slices=group_slices,
            element_first=torch.cat([first[:, group_slices[i]] for i in _ELEMENT_GROUPS], dim=1),
        )

    @classmethod
    def from_net(cls, net: CeloNet, device: torch.device | str) -> UpdateWeights:
        """One row holding ``net``'s MLP (expand it with :meth:`expand`)."""
        with torch.no_grad():
            layers = [(w.detach()[None], b.detach()[None]) for w, b in net.mlp_layers()]
        return cls.from_mlp_layers(net, layers, device)

    def expand(self, batch: int) -> UpdateWeights:
        """The same single row broadcast to ``batch`` rows (views, no copies)."""
        grow = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731
        return UpdateWeights(
            grow(self.first), grow(self.first_bias),
            tuple((grow(w), grow(b)) for w, b in self.hidden_layers), (grow(self.last[0]), grow(self.last[1])),
            self.momentum_decays, self.factored_decays, self.rms_decay, self.step_mult, self.exp_mult,
            self.group_slices, grow(self.element_first),
        )

    def group(self, index: int) -> torch.Tensor:
        """First-layer rows of feature group ``index``: ``(B, width, hidden)``."""
        return self.first[:, self.group_slices[index]]


# Feature groups computed per element by the kernels; the row / col groups 9-12 are handled on their
# grids (factored tensors) or folded into the kernels' hidden input (unfactored ones).
_ELEMENT_GROUPS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 13)
_ROW, _COL, _RSQRT_ROW, _RSQRT_COL = 9, 10, 11, 12
_PARAM_CHANNEL = 2  # index of the parameter value among the kernels' channels


# ---- the per-element kernels on (B, a, b) grids ---------------------------------------------------
#
# A chunk reaches the kernels as a 2-D grid per batch row: ``p``, ``g``, ``rms`` ``(B, a, b)`` and
# ``m`` ``(B, k, a, b)``. A matrix keeps its own rows and columns (``a`` rows of the chunk, ``b``
# columns), so its factored preconditioner and first-layer contribution arrive as a row factor and
# a column factor (``(B, k|H, a, 1)`` and ``(B, k|H, 1, b)``) that the kernels combine element by
# element: nothing of full size is built outside them. Other ranks arrive flattened as ``a = 1``
# with full-size factors.


def _product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = factors[0]
    for factor in factors[1:]:
        out = out * factor
    return out


def _total(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def _element_channels(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor, q_g: torch.Tensor, q_m: torch.Tensor
) -> list[torch.Tensor]:
    """The per-element feature channels (groups ``_ELEMENT_GROUPS``), un-normalised, each ``(B, a, b)``.

    ``p`` is the old parameter, ``g`` the clipped gradient, ``m (B, k, a, b)`` and ``rms`` the new
    accumulators; ``q_g``/``q_m`` (broadcastable to ``m``) the factored preconditioners of the
    gradient and of the momentum.
    """
    r = torch.rsqrt(rms + RMS_EPS)
    ms = m.unbind(1)
    return [
        g, g.clamp(-FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP), p, *ms, rms, *(mj * r for mj in ms), r,
        *(g * qj for qj in q_g.unbind(1)), g * r, *(mj * qj for mj, qj in zip(ms, q_m.unbind(1))),
    ]


def factored_square_sums(g: torch.Tensor, d0: int, d1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 0 kernel: ``clip(g)^2 + eps`` summed over parameter axis ``d0`` and over ``d1``.

    ``g`` ``(B, *S)`` (a chunk of rows of a rank >= 2 tensor); returns float32 ``(B, *S without
    d0)`` and ``(B, *S without d1)``.
    """
    gsq = g.float().clamp(-GRAD_CLIP, GRAD_CLIP).square() + FACTORED_EPS
    return gsq.sum(1 + d0), gsq.sum(1 + d1)


def accumulated_channels_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor,
    q_g: Sequence[torch.Tensor], q_m: Sequence[torch.Tensor], momentum_decays: torch.Tensor, rms_decay: float,
) -> list[torch.Tensor]:
    """Update ``m`` and ``rms`` in place; return the per-element channels at the new accumulators.

    ``p``, ``g``: ``(B, a, b)`` in the parameter's dtype; ``m`` ``(B, k, a, b)``; ``rms`` ``(B, a, b)``;
    ``q_g``, ``q_m``: factors whose product is the preconditioner (broadcastable to ``m``).
    """
    g = g.float().clamp(-GRAD_CLIP, GRAD_CLIP)
    m32 = _moving_average_(m, momentum_decays.view(-1, 1, 1), g[:, None])
    rms32 = _moving_average_(rms, rms_decay, g * g)
    return _element_channels(p.float(), g, m32, rms32, _product(q_g), _product(q_m))


def accumulate_and_square_sums_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor,
    q_g: Sequence[torch.Tensor], q_m: Sequence[torch.Tensor],
    momentum_decays: torch.Tensor, rms_decay: float, unrolled: bool | None = None,
) -> torch.Tensor:
    """Pass 1 kernel: :func:`accumulated_channels_`, then each channel's sum of squares ``(B, C)``.

    ``unrolled``: one reduction per channel (what ``torch.compile`` fuses best, and faster eagerly
    on large chunks) instead of one reduction over the stacked channels (fewest eager operations,
    faster on small chunks); ``None`` chooses by size.
    """
    channels = accumulated_channels_(p, g, m, rms, q_g, q_m, momentum_decays, rms_decay)
    if unrolled or (unrolled is None and p.numel() > _STACKED_SUM_ELEMENTS):
        return torch.stack([(c * c).sum((-2, -1)) for c in channels], dim=1)
    x = torch.stack(channels, dim=1)
    return (x * x).sum((-2, -1))


def _moving_average_(average: torch.Tensor, decay: torch.Tensor | float, value: torch.Tensor) -> torch.Tensor:
    """``average <- decay * average + (1 - decay) * value`` in place, computed in float32 whatever
    ``average``'s storage dtype; returns the new average in float32."""
    if average.dtype == torch.float32:
        return average.mul_(decay).add_((1 - decay) * value)
    new = average.float() * decay + (1 - decay) * value
    average.copy_(new)
    return new


def _affine(inputs: Sequence[torch.Tensor], weight: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``start + sum_i weight[:, i] * inputs[i]`` for ``(B, a, b)`` inputs, ``(B, len)`` weights and
    ``start`` broadcastable to ``(B, a, b)``."""
    out = start
    for i, x in enumerate(inputs):
        out = out + weight[:, i, None, None] * x
    return out


def mlp_step_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor,
    q_g: Sequence[torch.Tensor], q_m: Sequence[torch.Tensor], hidden_in: Sequence[torch.Tensor],
    first: torch.Tensor, hidden_layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    last: tuple[torch.Tensor, torch.Tensor], exp_mult: float, step_scale: torch.Tensor, unrolled: bool = False,
) -> None:
    """Pass 2 kernel: features, MLP and ``p <- p - step``, in place on ``p`` ``(B, a, b)``.

    ``first`` ``(B, C, H)`` is the first layer restricted to the kernel's channels with the
    normalisers folded in; ``hidden_in`` terms whose sum (broadcastable to ``(B, H, a, b)``) is the
    rest of the first layer's pre-activation (bias plus row / col features); ``step_scale``
    ``(B,)`` = param RMS x step_mult x lr. ``unrolled``: the MLP as explicit multiply-adds per unit
    (one fused loop under ``torch.compile``) instead of batched matrix products (fewest eager
    operations).
    """
    channels = _element_channels(
        p.float(), g.float().clamp(-GRAD_CLIP, GRAD_CLIP), m.float(), rms.float(), _product(q_g), _product(q_m)
    )
    if not unrolled:
        mlp_step_on_channels_(p, torch.stack(channels, dim=1), hidden_in, first, hidden_layers, last, exp_mult, step_scale)
        return
    start = _total(hidden_in)
    hidden = [torch.relu(_affine(channels, first[:, :, j], start[:, j])) for j in range(first.shape[2])]
    for weight, bias in hidden_layers:
        hidden = [torch.relu(_affine(hidden, weight[:, i], bias[:, i, None, None])) for i in range(weight.shape[1])]
    weight, bias = last
    direction, magnitude = (_affine(hidden, weight[:, i], bias[:, i, None, None]) for i in range(2))
    _take_step_(p, direction, magnitude, exp_mult, step_scale)


def mlp_step_on_channels_(
    p: torch.Tensor, channels: torch.Tensor, hidden_in: Sequence[torch.Tensor], first: torch.Tensor,
    hidden_layers: Sequence[tuple[torch.Tensor, torch.Tensor]], last: tuple[torch.Tensor, torch.Tensor],
    exp_mult: float, step_scale: torch.Tensor,
) -> None:
    """:func:`mlp_step_` as batched matrix products, from the stacked channels ``(B, C, a, b)``."""
    batch, width = p.shape[0], first.shape[2]
    start = _total(hidden_in).expand(batch, width, *p.shape[1:]).reshape(batch, width, -1)
    hidden = torch.relu(torch.baddbmm(start, first.transpose(1, 2), channels.flatten(2)))
    for weight, bias in hidden_layers:
        hidden = torch.relu(torch.baddbmm(bias[:, :, None], weight, hidden))
    weight, bias = last
    direction, magnitude = (t.view_as(p) for t in torch.baddbmm(bias[:, :, None], weight, hidden).unbind(1))
    _take_step_(p, direction, magnitude, exp_mult, step_scale)


def _take_step_(
    p: torch.Tensor, direction: torch.Tensor, magnitude: torch.Tensor, exp_mult: float, step_scale: torch.Tensor
) -> None:
    p.copy_(p.float() - direction * torch.exp(exp_mult * magnitude) * step_scale[:, None, None])


def _accumulate_unrolled_(*args: object) -> torch.Tensor:
    return accumulate_and_square_sums_(*args, unrolled=True)  # type: ignore[arg-type]


def _mlp_step_unrolled_(*args: object) -> None:
    mlp_step_(*args, unrolled=True)  # type: ignore[arg-type]


class Kernels(NamedTuple):
    """One backend's three passes: the preparation of a matrix batch's factored moments (pass 0
    included: :class:`_FactoredMoments` with that backend's :func:`factored_square_sums`, or an
    equivalent), then the two per-element kernels (same contracts as the eager functions)."""

    factored_moments: Callable[..., _FactoredMoments]
    accumulate_and_square_sums_: Callable[..., torch.Tensor]
    mlp_step_: Callable[..., None]


_compiled_kernels: Kernels | None = None


def _without_view_bases(kernel: Callable[..., torch.Tensor | None]) -> Callable[..., torch.Tensor | None]:
    """Call ``kernel`` with every tensor argument ``detach()``-ed: same storage (in-place writes
    still land), but no view ``_base``, so ``torch.compile`` does not re-specialise on the layout of
    whatever tensor a chunk was sliced from."""

    def plain(x: object) -> object:
        if isinstance(x, torch.Tensor):
            return x.detach()
        if isinstance(x, (tuple, list)):
            return type(x)(plain(item) for item in x)
        return x

    return lambda *args: kernel(*(plain(a) for a in args))


#: Inductor settings for the compiled kernels: inline every intermediate (the MLP's hidden units
#: included) into the loop that consumes it instead of writing it to a full-size buffer, which cost
#: 16 bytes per parameter of extra memory and as much traffic.
_FUSE_EVERYTHING = {
    "realize_reads_threshold": 1000, "realize_cpu_opcount_threshold": 100_000, "realize_cpu_acc_reads_threshold": 1000,
}


def kernels(backend: Backend, weights: UpdateWeights) -> Kernels:
    """The per-element kernels for ``weights``: run eagerly, through ``torch.compile`` (same source),
    as hand-written Triton kernels for GPUs (:mod:`celo_hf.triton_kernels`, same maths; pass 0 stays
    eager) or as hand-written C++ kernels for CPUs (:mod:`celo_hf.cpu_kernels`, built for
    ``weights``' configuration)."""
    global _compiled_kernels
    if backend == "eager":
        return Kernels(_FactoredMoments, accumulate_and_square_sums_, mlp_step_)
    if backend == "triton":
        from . import triton_kernels  # imported on demand: triton ships with CUDA builds of torch

        return Kernels(_FactoredMoments, triton_kernels.accumulate_and_square_sums_, triton_kernels.mlp_step_)
    if backend == "compile":
        if _compiled_kernels is None:
            compiled = lambda f: _without_view_bases(torch.compile(f, dynamic=True, options=_FUSE_EVERYTHING))  # noqa: E731
            _compiled_kernels = Kernels(
                functools.partial(_FactoredMoments, square_sums=compiled(factored_square_sums)),
                compiled(_accumulate_unrolled_), compiled(_mlp_step_unrolled_),
            )
        return _compiled_kernels
    if backend == "cpp":
        from . import cpu_kernels  # imported on demand: compiles on first use

        return cpu_kernels.kernels(weights)
    raise ValueError(f"backend must be 'eager', 'compile', 'triton' or 'cpp', got {backend!r}")


# ---- the batched update ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSharding:
    """A batch split across processes along its first parameter axis (FSDP2's ``Shard(0)``).

    This process holds some of the ``rows``; every statistic summed over that axis is summed over
    ``group`` too, so the update equals the unsharded one.
    """

    rows: int
    group: object

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.rows, *local_shape[1:])


def _sum_over_rows(t: torch.Tensor, sharding: RowSharding | None) -> torch.Tensor:
    """Complete a partial sum over the sharded first axis (identity when not sharded)."""
    if sharding is not None:
        torch.distributed.all_reduce(t, group=sharding.group)
    return t


def _normaliser(sum_sq: torch.Tensor, count: int) -> torch.Tensor:
    return torch.rsqrt(NORMALISER_EPS + sum_sq / count)


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


def _grid_hidden(
    v: torch.Tensor, value_w: torch.Tensor, rsqrt_w: torch.Tensor, count: int, sharding: RowSharding | None
) -> torch.Tensor:
    """First-layer contribution of a factored accumulator ``v (B, k, *grid)`` on its own grid.

    A broadcast feature's tensor-wide mean square equals its mean square over the grid (``count``
    cells in all; ``sharding`` when this process holds only some rows of it), so its normaliser is
    computed here. ``value_w``/``rsqrt_w`` ``(B, k, H)``. Returns ``(B, H, *grid)``.
    """
    flat = v.flatten(2)
    rsqrt_flat = torch.rsqrt(flat + ROW_COL_EPS)
    sums = _sum_over_rows(torch.stack([(flat * flat).sum(2), (rsqrt_flat * rsqrt_flat).sum(2)]), sharding)
    value_w = value_w * _normaliser(sums[0], count)[..., None]
    rsqrt_w = rsqrt_w * _normaliser(sums[1], count)[..., None]
    hidden = _first_layer_part(flat, value_w, rsqrt_flat, rsqrt_w)
    return hidden.view(*hidden.shape[:2], *v.shape[2:])


def _first_layer_part(
    v: torch.Tensor, value_w: torch.Tensor, rsqrt_v: torch.Tensor, rsqrt_w: torch.Tensor
) -> torch.Tensor:
    """``value_w^T v + rsqrt_w^T rsqrt_v`` per batch row: ``(B, k, n)`` features and ``(B, k, H)``
    weights give ``(B, H, n)``."""
    return torch.baddbmm(torch.bmm(value_w.transpose(1, 2), v), rsqrt_w.transpose(1, 2), rsqrt_v)


class _FactoredMoments:
    """Row / column second moments of rank >= 2 tensors (``v_row``, ``v_col``)."""

    def __init__(
        self, g: torch.Tensor, state: TensorState, w: UpdateWeights, dims: tuple[int, int],
        chunks: list[slice], full: tuple[int, ...], sharding: RowSharding | None,
        square_sums: Callable[..., tuple[torch.Tensor, torch.Tensor]] = factored_square_sums,
    ):
        d0, d1 = dims
        batch, shape = g.shape[0], tuple(g.shape[1:])
        beta = w.factored_decays.view(1, -1, *([1] * (len(shape) - 1)))
        if len(chunks) == 1:
            row_sum, col_sum = square_sums(g, d0, d1)
        else:
            row_sum = torch.zeros(batch, *_drop(shape, d0), dtype=torch.float32, device=g.device)
            col_sum = torch.zeros(batch, *_drop(shape, d1), dtype=torch.float32, device=g.device)
            for rows in chunks:
                for total, part, axis in zip((row_sum, col_sum), square_sums(g[:, rows], d0, d1), dims):
                    if axis == 0:
                        total += part
                    else:
                        total[:, rows] = part
        # Reductions over the first axis are partial when it is sharded; the others are local.
        row_sum = _sum_over_rows(row_sum, sharding) if d0 == 0 else row_sum
        col_sum = _sum_over_rows(col_sum, sharding) if d1 == 0 else col_sum
        v_row, v_col = state["v_row"], state["v_col"]
        v_row.mul_(beta).add_((row_sum / full[d0]).unsqueeze(1) * (1 - beta))
        v_col.mul_(beta).add_((col_sum / full[d1]).unsqueeze(1) * (1 - beta))
        row_total = v_row.sum(dim=2 + row_mean_axis(d0, d1), keepdim=True)
        row_mean = (_sum_over_rows(row_total, sharding) if d1 == 0 else row_total) / full[d1]
        self.row_scale, self.col_scale = factor_scales(v_row, v_col, d0, d1, lead=2, row_mean=row_mean)
        numel = _prod(full)
        bias = w.first_bias.view(*w.first_bias.shape, *([1] * (len(shape) - 1)))
        row_hidden = _grid_hidden(v_row, w.group(_ROW), w.group(_RSQRT_ROW), numel // full[d0], sharding if d0 != 0 else None)
        col_hidden = _grid_hidden(v_col, w.group(_COL), w.group(_RSQRT_COL), numel // full[d1], sharding if d1 != 0 else None)
        self.row_hidden = (row_hidden + bias).unsqueeze(2 + d0)
        self.col_hidden = col_hidden.unsqueeze(2 + d1)
        self.batch = batch
        self.matrix = len(shape) == 2

    def accumulate(self, g: torch.Tensor, rows: slice) -> None:
        """Nothing per chunk: the factored moments were updated up front."""

    def finish_statistics(self) -> None:
        """Nothing to complete: the grid statistics were computed up front."""

    def preconditioners(self, rows: slice) -> tuple[Factors, Factors]:
        """A matrix's row and column factors, left for the kernels to multiply; for higher ranks
        their product, flattened."""
        factors = _row_factor_first(_rows(self.row_scale, rows), _rows(self.col_scale, rows))
        if not self.matrix:
            q = _product(factors)
            factors = (q.view(self.batch, q.shape[1], 1, -1),)
        return factors, factors

    def hidden_input(self, rows: slice) -> Factors:
        terms = _row_factor_first(_rows(self.row_hidden, rows), _rows(self.col_hidden, rows))
        if self.matrix:
            return terms
        hidden = _total(terms)
        return (hidden.view(self.batch, hidden.shape[1], 1, -1),)


class _DiagonalMoments:
    """Per-element second moments of rank < 2 tensors (``v_diag``); its row and col features are
    both ``v_diag``, so their first-layer weights are summed."""

    def __init__(self, g: torch.Tensor, state: TensorState, w: UpdateWeights, numel: int, sharding: RowSharding | None):
        self.v_diag = state["v_diag"]
        self.beta = w.factored_decays.view(1, -1, 1)
        self.sum_sq = torch.zeros(2, g.shape[0], self.beta.shape[1], dtype=torch.float32, device=g.device)
        self.value_w = w.group(_ROW) + w.group(_COL)
        self.rsqrt_w = w.group(_RSQRT_ROW) + w.group(_RSQRT_COL)
        self.bias = w.first_bias[:, :, None]
        self.numel = numel
        self.sharding = sharding

    def accumulate(self, g: torch.Tensor, rows: slice) -> None:
        """Update this chunk of ``v_diag`` and add its features' sums of squares."""
        gc = g[:, rows].float().clamp(-GRAD_CLIP, GRAD_CLIP)
        v = _flat(self.v_diag, rows, 2)
        v.mul_(self.beta).add_((gc * gc + FACTORED_EPS).view(gc.shape[0], 1, -1) * (1 - self.beta))
        rsqrt_v = torch.rsqrt(v + ROW_COL_EPS)
        self.sum_sq += torch.stack([(v * v).sum(2), (rsqrt_v * rsqrt_v).sum(2)])

    def finish_statistics(self) -> None:
        """Complete the sums of squares across processes and turn them into normalisers."""
        self.norm = _normaliser(_sum_over_rows(self.sum_sq, self.sharding), self.numel)[..., None]

    def preconditioners(self, rows: slice) -> tuple[Factors, Factors]:
        v = _flat(self.v_diag, rows, 2).unsqueeze(2)
        return (torch.rsqrt(torch.clamp(v + FACTOR_FLOOR, min=FACTOR_FLOOR)),), (v.rsqrt(),)

    def hidden_input(self, rows: slice) -> Factors:
        v = _flat(self.v_diag, rows, 2)
        hidden = _first_layer_part(v, self.value_w * self.norm[0], torch.rsqrt(v + ROW_COL_EPS), self.rsqrt_w * self.norm[1])
        return ((hidden + self.bias).unsqueeze(2),)


def _row_factor_first(a: torch.Tensor, b: torch.Tensor) -> Factors:
    """``a`` and ``b`` ordered so that the one varying along the grid's rows ``(..., r, 1)`` comes
    first: the compiled kernels then see one layout whichever axis a matrix factors first (the
    product and the sum of two tensors do not depend on the order)."""
    return (b, a) if a.shape[-1] != 1 and b.shape[-1] == 1 else (a, b)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def update_batch_(
    p: torch.Tensor,
    g: torch.Tensor,
    state: TensorState,
    lr_scale: torch.Tensor,
    w: UpdateWeights,
    backend: Backend = "eager",
    chunk_elements: int | None = None,
    sharding: RowSharding | None = None,
) -> None:
    """One Celo update of ``B`` same-shaped tensors, in place on ``p`` and ``state``.

    Same maths as :func:`reference_update`, row by row. Three streaming passes over chunks of axis 1
    (the tensors' first axis): (0) factored second moments (rank >= 2 only), (1) accumulators and
    each feature's sum of squares, (2) features, MLP and write-back.

    Args:
        p: ``(B, *S)`` parameters, any float dtype, updated in place; must be viewable as
            ``(B, -1)`` chunk by chunk (contiguous). ``S`` is never empty: a scalar is ``(B, 1)``.
        g: ``(B, *S)`` gradients (unclipped).
        state: the batch's float32 accumulators, each with a leading ``B`` axis (module docstring).
        lr_scale: ``(B,)`` multipliers of the step (scheduler ``lr_mult`` times the group ``lr``).
        w: meta-model weights with ``B`` rows.
        backend: which implementation of the per-element kernels runs (:func:`kernels`).
        chunk_elements: elements (over the whole batch) processed at once (``None``: the
            backend's default, ``DEFAULT_CHUNK_ELEMENTS``).
        sharding: set when ``p`` holds only this process's rows of the tensors (FSDP2); every
            statistic is then completed across processes.
    """
    kernel = kernels(backend, w)
    chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS[backend]
    g = g.contiguous()
    shape = tuple(p.shape[1:])
    full = shape if sharding is None else sharding.full_shape(shape)
    numel = _prod(full)
    chunks = _chunks(shape[0], p.shape[0] * _prod(shape[1:]), chunk_elements)
    dims = factored_dims(full)
    moments = (
        _DiagonalMoments(g, state, w, numel, sharding) if dims is None
        else kernel.factored_moments(g, state, w, dims, chunks, full, sharding)
    )
    matrix = len(shape) == 2

    def pieces(rows: slice) -> tuple[torch.Tensor, ...]:
        return (
            _grid(p, rows, 1, matrix), _grid(g, rows, 1, matrix),
            _grid(state["m"], rows, 2, matrix), _grid(state["rms"], rows, 1, matrix),
        )

    # Eagerly, a tensor (or batch) that fits in one chunk keeps its stacked channels for pass 2 (not
    # with low-precision moments: pass 2 must see them as stored, rounded, like every other path).
    full_precision = state["m"].dtype == state["rms"].dtype == torch.float32
    keep_channels = backend == "eager" and len(chunks) == 1 and full_precision
    channels = None
    sum_sq = torch.zeros(w.element_first.shape[:2], dtype=torch.float32, device=p.device)
    for rows in chunks:
        moments.accumulate(g, rows)
        inputs = (*pieces(rows), *moments.preconditioners(rows), w.momentum_decays, w.rms_decay)
        if keep_channels:
            channels = torch.stack(accumulated_channels_(*inputs), dim=1)
            sum_sq += (channels * channels).sum((-2, -1))
        else:
            sum_sq += kernel.accumulate_and_square_sums_(*inputs)
    sum_sq = _sum_over_rows(sum_sq, sharding)
    moments.finish_statistics()

    first = w.element_first * _normaliser(sum_sq, numel)[..., None]
    param_scale = torch.sqrt(sum_sq[:, _PARAM_CHANNEL] / numel + PARAM_SCALE_EPS)
    step_scale = param_scale * w.step_mult * lr_scale
    mlp = (first, w.hidden_layers, w.last, w.exp_mult, step_scale)
    for rows in chunks:
        if channels is not None:
            mlp_step_on_channels_(_grid(p, rows, 1, matrix), channels, moments.hidden_input(rows), *mlp)
        else:
            kernel.mlp_step_(*pieces(rows), *moments.preconditioners(rows), moments.hidden_input(rows), *mlp)
