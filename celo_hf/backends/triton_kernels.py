"""Triton versions of the two per-element kernels (``backend="triton"``).

Same contract and maths as :func:`celo_hf.backends.eager.accumulate_` and
:func:`celo_hf.backends.eager.mlp_step_` (pass 0 and the factored moments stay eager), each fused
into one pass over a chunk flattened to ``(B, n)``: every element is read once and written once
(the preconditioner and first-layer factors are multiplied out beforehand). Both rules run here,
Celo and Celo2: the rule's constants (``RuleConfig.constants``), the number of decays, the hidden
width ``H`` and the channel offsets reach the kernels as ``tl.constexpr`` arguments from
:mod:`celo_hf.layout`. The MLP takes any power-of-two ``H`` (Celo 4, Celo2 8) and one hidden layer
after the first (what both rules use); its activations are ``(BLOCK, H)`` tiles whose units are
summed in the order of the eager kernels' unrolled form (bias first, then input unit by input unit).
Pass 2 takes the step, or writes the MLP's raw direction to ``FoldedMlp.direction_out`` (Celo2).
The first kernel writes per-block partial sums that torch then adds up, so results do not depend on
the order blocks run in.

On a GPU they run natively; with ``TRITON_INTERPRET=1`` set before this module is imported they run
on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..layout import (
    CELO_CONSTANTS,
    ELEMENT_GROUPS,
    Decays,
    Factors,
    FoldedMlp,
    Grid,
    Kernels,
    Preconditioners,
    RuleConfig,
    RuleConstants,
    UpdateWeights,
    kernel_channel_offsets,
    product,
    total,
)
from . import eager

#: Elements per program of pass 1.
BLOCK = 1024
#: Pass 2's programs hold ``(BLOCK, H)`` activation tiles of about this many elements (a guess for
#: register use on GPUs: its speed there has not been measured).
STEP_TILE = 4096


def _constexprs(num_decays: int, constants: RuleConstants) -> dict[str, object]:
    """The layout and constants the kernels are specialised for, as their ``tl.constexpr`` arguments."""
    offsets = kernel_channel_offsets(num_decays)
    return {
        "K": num_decays, "C": offsets["channels"], "GRAD_CLIP": constants.grad_clip,
        "FEATURE_GRAD_CLIP": constants.feature_grad_clip, "RMS_EPS": constants.rms_eps,
        **{f"CH_{name.upper()}": offsets[name] for name in ELEMENT_GROUPS},
    }


def prepare(config: RuleConfig) -> None:
    """Check that the kernels cover ``config`` (Triton compiles them on first launch). Any rule's
    constants and groups do (Celo2's missing vector groups arrive as zero first-layer rows)."""
    width = config.hidden
    if width < 1 or width & (width - 1) or config.hidden_layers != 1:
        raise ValueError(
            "the triton kernels support MLPs with a power-of-two hidden width (Celo: 4, Celo2: 8) and one hidden "
            f"layer after the first, got {width} hidden units and {config.hidden_layers} hidden layer(s) after "
            "the first; use backend='compile'"
        )


def kernels(weights: UpdateWeights) -> Kernels:
    """The Triton kernels for ``weights``' rule (pass 0 and the factored moments eager)."""
    prepare(weights.config)
    return kernels_for(weights.config.constants)


@functools.cache
def kernels_for(constants: RuleConstants) -> Kernels:
    """The Triton kernels bound to ``constants`` (pass 0 eager with the same constants)."""
    return Kernels(
        square_sums=eager.kernels_for(constants).square_sums,
        factored_statistics=None,
        accumulate_=functools.partial(accumulate_, constants=constants),
        mlp_step_=functools.partial(mlp_step_, constants=constants),
    )


@triton.jit
def _square_sum(x, mask):
    return tl.sum(tl.where(mask, x * x, 0.0), axis=0)


@triton.jit
def _rounded_for(x, ptr):
    """``x`` (float32) in ``ptr``'s element type, rounded to nearest even (done by hand for
    bfloat16 so that the interpreter, which truncates, agrees with the hardware and torch)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _accumulate_kernel(
    p_ptr, g_ptr, m_ptr, rms_ptr, qg_ptr, qm_ptr, beta_ptr, out_ptr,
    n, num_blocks, p_sb, g_sb, m_sb, m_sk, rms_sb, qg_sb, qg_sk, qm_sb, qm_sk, rms_decay,
    BLOCK: tl.constexpr, K: tl.constexpr, C: tl.constexpr, GRAD_CLIP: tl.constexpr, FEATURE_GRAD_CLIP: tl.constexpr,
    RMS_EPS: tl.constexpr, CH_GRAD: tl.constexpr, CH_CLIPPED_GRAD: tl.constexpr, CH_PARAM: tl.constexpr,
    CH_MOMENTUM: tl.constexpr, CH_RMS: tl.constexpr, CH_MOMENTUM_OVER_RMS: tl.constexpr, CH_RSQRT_RMS: tl.constexpr,
    CH_FACTORED_GRAD: tl.constexpr, CH_GRAD_OVER_RMS: tl.constexpr, CH_FACTORED_MOMENTUM: tl.constexpr,
):
    b = tl.program_id(0)
    block = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + b * p_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * g_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(tl.maximum(g, -GRAD_CLIP), GRAD_CLIP)
    rms = tl.load(rms_ptr + b * rms_sb + offs, mask=mask, other=0.0).to(tl.float32)
    rms = rms * rms_decay + (1.0 - rms_decay) * g * g
    tl.store(rms_ptr + b * rms_sb + offs, _rounded_for(rms, rms_ptr), mask=mask)
    r = 1.0 / tl.sqrt(rms + RMS_EPS)
    out = out_ptr + (b * num_blocks + block) * C
    tl.store(out + CH_GRAD, _square_sum(g, mask))
    tl.store(out + CH_CLIPPED_GRAD, _square_sum(tl.minimum(tl.maximum(g, -FEATURE_GRAD_CLIP), FEATURE_GRAD_CLIP), mask))
    tl.store(out + CH_PARAM, _square_sum(p, mask))
    tl.store(out + CH_RMS, _square_sum(rms, mask))
    tl.store(out + CH_RSQRT_RMS, _square_sum(r, mask))
    tl.store(out + CH_GRAD_OVER_RMS, _square_sum(g * r, mask))
    for j in tl.static_range(K):
        beta = tl.load(beta_ptr + j)
        m_at = m_ptr + b * m_sb + j * m_sk + offs
        m = tl.load(m_at, mask=mask, other=0.0).to(tl.float32) * beta + (1.0 - beta) * g
        tl.store(m_at, _rounded_for(m, m_ptr), mask=mask)
        qg = tl.load(qg_ptr + b * qg_sb + j * qg_sk + offs, mask=mask, other=0.0)
        qm = tl.load(qm_ptr + b * qm_sb + j * qm_sk + offs, mask=mask, other=0.0)
        tl.store(out + CH_MOMENTUM + j, _square_sum(m, mask))
        tl.store(out + CH_MOMENTUM_OVER_RMS + j, _square_sum(m * r, mask))
        tl.store(out + CH_FACTORED_GRAD + j, _square_sum(g * qg, mask))
        tl.store(out + CH_FACTORED_MOMENTUM + j, _square_sum(m * qm, mask))


@triton.jit
def _into_hidden(h, x, w_ptr, H: tl.constexpr):
    """``h (BLOCK, H)`` plus ``x (BLOCK,)`` times the ``H`` first-layer weights of one channel at ``w_ptr``."""
    return h + x[:, None] * tl.load(w_ptr + tl.arange(0, H))[None, :]


@triton.jit
def _dense(h, w_ptr, b_ptr, IN: tl.constexpr, OUT: tl.constexpr):
    """``b + h @ W.T`` for ``h (BLOCK, IN)``, a row-major ``(OUT, IN)`` weight and an ``(OUT,)`` bias:
    ``(BLOCK, OUT)``, each unit summed as ``b + h_0 w_0 + h_1 w_1 + ...`` (the eager unrolled order).
    Column ``i`` of ``h`` is taken as a sum whose other terms are zeros (exact); written inline, as
    every call of a helper costs Triton's interpreter milliseconds."""
    rows = tl.arange(0, OUT) * IN
    out = tl.load(b_ptr + tl.arange(0, OUT))[None, :]
    for i in tl.static_range(IN):
        h_i = tl.sum(tl.where(tl.arange(0, IN)[None, :] == i, h, 0.0), axis=1)
        out = out + h_i[:, None] * tl.load(w_ptr + rows + i)[None, :]
    return out


@triton.jit
def _step_kernel(
    p_ptr, g_ptr, m_ptr, rms_ptr, qg_ptr, qm_ptr, hid_ptr, first_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr, dir_ptr,
    n, p_sb, g_sb, m_sb, m_sk, rms_sb, qg_sb, qg_sk, qm_sb, qm_sk, hid_sb, hid_sk, dir_sb, exp_mult,
    BLOCK: tl.constexpr, H: tl.constexpr, DIRECTION_OUT: tl.constexpr,
    K: tl.constexpr, C: tl.constexpr, GRAD_CLIP: tl.constexpr, FEATURE_GRAD_CLIP: tl.constexpr,
    RMS_EPS: tl.constexpr, CH_GRAD: tl.constexpr, CH_CLIPPED_GRAD: tl.constexpr, CH_PARAM: tl.constexpr,
    CH_MOMENTUM: tl.constexpr, CH_RMS: tl.constexpr, CH_MOMENTUM_OVER_RMS: tl.constexpr, CH_RSQRT_RMS: tl.constexpr,
    CH_FACTORED_GRAD: tl.constexpr, CH_GRAD_OVER_RMS: tl.constexpr, CH_FACTORED_MOMENTUM: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + b * p_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * g_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(tl.maximum(g, -GRAD_CLIP), GRAD_CLIP)
    rms = tl.load(rms_ptr + b * rms_sb + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(rms + RMS_EPS)
    w = first_ptr + b * C * H  # (C, H) row-major for this batch row
    units = tl.arange(0, H)
    h = tl.load(hid_ptr + b * hid_sb + units[None, :] * hid_sk + offs[:, None], mask=mask[:, None], other=0.0)
    clipped = tl.minimum(tl.maximum(g, -FEATURE_GRAD_CLIP), FEATURE_GRAD_CLIP)
    h = _into_hidden(h, g, w + CH_GRAD * H, H)
    h = _into_hidden(h, clipped, w + CH_CLIPPED_GRAD * H, H)
    h = _into_hidden(h, p, w + CH_PARAM * H, H)
    h = _into_hidden(h, rms, w + CH_RMS * H, H)
    h = _into_hidden(h, r, w + CH_RSQRT_RMS * H, H)
    h = _into_hidden(h, g * r, w + CH_GRAD_OVER_RMS * H, H)
    for j in tl.static_range(K):
        m = tl.load(m_ptr + b * m_sb + j * m_sk + offs, mask=mask, other=0.0).to(tl.float32)
        qg = tl.load(qg_ptr + b * qg_sb + j * qg_sk + offs, mask=mask, other=0.0)
        qm = tl.load(qm_ptr + b * qm_sb + j * qm_sk + offs, mask=mask, other=0.0)
        h = _into_hidden(h, m, w + (CH_MOMENTUM + j) * H, H)
        h = _into_hidden(h, m * r, w + (CH_MOMENTUM_OVER_RMS + j) * H, H)
        h = _into_hidden(h, g * qg, w + (CH_FACTORED_GRAD + j) * H, H)
        h = _into_hidden(h, m * qm, w + (CH_FACTORED_MOMENTUM + j) * H, H)
    h = tl.maximum(h, 0.0)
    h = tl.maximum(_dense(h, w1_ptr + b * H * H, b1_ptr + b * H, H, H), 0.0)
    direction, magnitude = tl.split(_dense(h, w2_ptr + b * 2 * H, b2_ptr + b * 2, H, 2))
    if DIRECTION_OUT:
        tl.store(dir_ptr + b * dir_sb + offs, direction, mask=mask)
    else:
        step = direction * tl.exp(exp_mult * magnitude) * tl.load(scale_ptr + b)
        tl.store(p_ptr + b * p_sb + offs, _rounded_for(p - step, p_ptr), mask=mask)


def _check_layout(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the triton kernels need the last axis contiguous, got strides {t.stride()}")


def _flat_grid(t: torch.Tensor) -> torch.Tensor:
    """A ``(..., a, b)`` grid view as ``(..., a * b)``, still a view (writes land)."""
    return t.view(*t.shape[:-2], -1)


def _multiplied_out(factors: Factors, like: torch.Tensor) -> torch.Tensor:
    """The product of ``factors`` at ``like``'s full ``(B, k, a, b)`` shape, flattened to ``(B, k, n)``."""
    return _flat_grid(product(factors).expand(like.shape).contiguous())


def accumulate_(
    grid: Grid, pre: Preconditioners, decays: Decays, constants: RuleConstants = CELO_CONSTANTS
) -> torch.Tensor:
    """Pass 1 (contract of :func:`celo_hf.backends.eager.accumulate_`)."""
    q_g, q_m = _multiplied_out(pre.q_g, grid.m), _multiplied_out(pre.q_m, grid.m)
    p, g, m, rms = (_flat_grid(t) for t in grid)
    batch, n = p.shape
    _check_layout(p, g, m, rms, q_g, q_m)
    layout = _constexprs(m.shape[1], constants)
    blocks = max(1, triton.cdiv(n, BLOCK))
    partial = torch.zeros(batch, blocks, layout["C"], dtype=torch.float32, device=p.device)
    if n > 0:
        _accumulate_kernel[(batch, blocks)](
            p, g, m, rms, q_g, q_m, decays.momentum.contiguous(), partial,
            n, blocks, p.stride(0), g.stride(0), m.stride(0), m.stride(1), rms.stride(0),
            q_g.stride(0), q_g.stride(1), q_m.stride(0), q_m.stride(1), float(decays.rms), BLOCK=BLOCK, **layout,
        )
    return partial.sum(1)


def mlp_step_(
    grid: Grid, pre: Preconditioners, hidden_in: Factors, mlp: FoldedMlp, constants: RuleConstants = CELO_CONSTANTS
) -> None:
    """Pass 2 (contract of :func:`celo_hf.backends.eager.mlp_step_`): the step into ``grid.p``, or
    the direction into ``mlp.direction_out`` (float32 ``(B, a, b)``) with ``p`` left alone."""
    batch, width = grid.p.shape[0], mlp.first.shape[2]
    hidden_in = _flat_grid(total(hidden_in).expand(batch, width, *grid.p.shape[1:]).contiguous())
    q_g, q_m = _multiplied_out(pre.q_g, grid.m), _multiplied_out(pre.q_m, grid.m)
    p, g, m, rms = (_flat_grid(t) for t in grid)
    direction = p if mlp.direction_out is None else _flat_grid(mlp.direction_out)  # p: a pointer left unused
    n = p.shape[1]
    _check_layout(p, g, m, rms, q_g, q_m, hidden_in, direction)
    (w1, b1), (w2, b2) = mlp.hidden_layers[0], mlp.last
    dense = [t.contiguous() for t in (mlp.first, w1, b1, w2, b2, mlp.step_scale)]
    block = max(16, min(BLOCK, STEP_TILE // width))
    if n > 0:
        _step_kernel[(batch, triton.cdiv(n, block))](
            p, g, m, rms, q_g, q_m, hidden_in, *dense, direction,
            n, p.stride(0), g.stride(0), m.stride(0), m.stride(1), rms.stride(0),
            q_g.stride(0), q_g.stride(1), q_m.stride(0), q_m.stride(1), hidden_in.stride(0), hidden_in.stride(1),
            direction.stride(0), float(mlp.exp_mult), BLOCK=block, H=width,
            DIRECTION_OUT=mlp.direction_out is not None, **_constexprs(m.shape[1], constants),
        )

