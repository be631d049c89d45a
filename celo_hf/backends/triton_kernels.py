"""Triton versions of the two per-element kernels (``backend="triton"``).

Same contract and maths as :func:`celo_hf.backends.eager.accumulate_` and
:func:`celo_hf.backends.eager.mlp_step_` (pass 0 and the factored moments stay eager), each fused
into one pass over a chunk flattened to ``(B, n)``: every element is read once and written once
(the preconditioner and first-layer factors are multiplied out beforehand). The constants, the
number of decays and the channel offsets reach the kernels as ``tl.constexpr`` arguments from
:mod:`celo_hf.layout`; the MLP is written for :data:`HIDDEN` hidden units and one hidden layer after
the first (the paper's). The first kernel writes per-block partial sums that torch then adds up, so
results do not depend on the order blocks run in.

On a GPU they run natively; with ``TRITON_INTERPRET=1`` set before this module is imported they run
on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import (
    CELO_CONSTANTS,
    ELEMENT_GROUPS,
    FEATURE_GRAD_CLIP,
    GRAD_CLIP,
    RMS_EPS,
    Decays,
    Factors,
    FoldedMlp,
    Grid,
    Kernels,
    Preconditioners,
    RuleConfig,
    UpdateWeights,
    kernel_channel_offsets,
    product,
    total,
)
from . import eager

BLOCK = 1024
#: Hidden units the step kernel's MLP is written for (one hidden layer after the first).
HIDDEN = 4


def _constexprs(num_decays: int) -> dict[str, object]:
    """The layout the kernels are specialised for, as their ``tl.constexpr`` arguments."""
    offsets = kernel_channel_offsets(num_decays)
    return {
        "K": num_decays, "C": offsets["channels"], "GRAD_CLIP": GRAD_CLIP, "FEATURE_GRAD_CLIP": FEATURE_GRAD_CLIP,
        "RMS_EPS": RMS_EPS, **{f"CH_{name.upper()}": offsets[name] for name in ELEMENT_GROUPS},
    }


def prepare(config: RuleConfig) -> None:
    """Check that the kernels cover ``config`` (Triton compiles them on first launch)."""
    if config.constants != CELO_CONSTANTS or not config.vector_factored_groups:
        raise ValueError("the triton kernels implement Celo's rule only (not Celo2's); use backend='compile' or 'eager'")
    if config.hidden != HIDDEN or config.hidden_layers != 1:
        raise ValueError(
            f"the triton kernels support the paper's MLP ({HIDDEN} hidden units, one hidden layer after the first), "
            f"got {config.hidden} hidden units and {config.hidden_layers} hidden layer(s) after the first; "
            "use backend='compile'"
        )


def kernels(weights: UpdateWeights) -> Kernels:
    """The Triton kernels (pass 0 and the factored moments eager)."""
    prepare(weights.config)
    return KERNELS


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
def _into_hidden(h0, h1, h2, h3, x, w_ptr):
    """Add ``x`` times the four first-layer weights at ``w_ptr`` to the hidden pre-activations."""
    return (
        h0 + x * tl.load(w_ptr + 0), h1 + x * tl.load(w_ptr + 1),
        h2 + x * tl.load(w_ptr + 2), h3 + x * tl.load(w_ptr + 3),
    )


@triton.jit
def _dense4(h0, h1, h2, h3, w_ptr, b_ptr, row):
    """``b[row] + W[row, :] @ h`` for a 4-wide row-major weight."""
    return (
        tl.load(b_ptr + row) + h0 * tl.load(w_ptr + row * 4 + 0) + h1 * tl.load(w_ptr + row * 4 + 1)
        + h2 * tl.load(w_ptr + row * 4 + 2) + h3 * tl.load(w_ptr + row * 4 + 3)
    )


@triton.jit
def _step_kernel(
    p_ptr, g_ptr, m_ptr, rms_ptr, qg_ptr, qm_ptr, hid_ptr, first_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr,
    n, p_sb, g_sb, m_sb, m_sk, rms_sb, qg_sb, qg_sk, qm_sb, qm_sk, hid_sb, hid_sk, exp_mult,
    BLOCK: tl.constexpr, K: tl.constexpr, C: tl.constexpr, GRAD_CLIP: tl.constexpr, FEATURE_GRAD_CLIP: tl.constexpr,
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
    w = first_ptr + b * C * 4  # (C, H) row-major for this batch row
    h0 = tl.load(hid_ptr + b * hid_sb + 0 * hid_sk + offs, mask=mask, other=0.0)
    h1 = tl.load(hid_ptr + b * hid_sb + 1 * hid_sk + offs, mask=mask, other=0.0)
    h2 = tl.load(hid_ptr + b * hid_sb + 2 * hid_sk + offs, mask=mask, other=0.0)
    h3 = tl.load(hid_ptr + b * hid_sb + 3 * hid_sk + offs, mask=mask, other=0.0)
    clipped = tl.minimum(tl.maximum(g, -FEATURE_GRAD_CLIP), FEATURE_GRAD_CLIP)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, g, w + CH_GRAD * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, clipped, w + CH_CLIPPED_GRAD * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, p, w + CH_PARAM * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, rms, w + CH_RMS * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, r, w + CH_RSQRT_RMS * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, g * r, w + CH_GRAD_OVER_RMS * 4)
    for j in tl.static_range(K):
        m = tl.load(m_ptr + b * m_sb + j * m_sk + offs, mask=mask, other=0.0).to(tl.float32)
        qg = tl.load(qg_ptr + b * qg_sb + j * qg_sk + offs, mask=mask, other=0.0)
        qm = tl.load(qm_ptr + b * qm_sb + j * qm_sk + offs, mask=mask, other=0.0)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, m, w + (CH_MOMENTUM + j) * 4)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, m * r, w + (CH_MOMENTUM_OVER_RMS + j) * 4)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, g * qg, w + (CH_FACTORED_GRAD + j) * 4)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, m * qm, w + (CH_FACTORED_MOMENTUM + j) * 4)
    h0, h1, h2, h3 = tl.maximum(h0, 0.0), tl.maximum(h1, 0.0), tl.maximum(h2, 0.0), tl.maximum(h3, 0.0)
    w1, b1 = w1_ptr + b * 16, b1_ptr + b * 4
    k0 = tl.maximum(_dense4(h0, h1, h2, h3, w1, b1, 0), 0.0)
    k1 = tl.maximum(_dense4(h0, h1, h2, h3, w1, b1, 1), 0.0)
    k2 = tl.maximum(_dense4(h0, h1, h2, h3, w1, b1, 2), 0.0)
    k3 = tl.maximum(_dense4(h0, h1, h2, h3, w1, b1, 3), 0.0)
    direction = _dense4(k0, k1, k2, k3, w2_ptr + b * 8, b2_ptr + b * 2, 0)
    magnitude = _dense4(k0, k1, k2, k3, w2_ptr + b * 8, b2_ptr + b * 2, 1)
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


def accumulate_(grid: Grid, pre: Preconditioners, decays: Decays) -> torch.Tensor:
    """Pass 1 (contract of :func:`celo_hf.backends.eager.accumulate_`)."""
    q_g, q_m = _multiplied_out(pre.q_g, grid.m), _multiplied_out(pre.q_m, grid.m)
    p, g, m, rms = (_flat_grid(t) for t in grid)
    batch, n = p.shape
    _check_layout(p, g, m, rms, q_g, q_m)
    layout = _constexprs(m.shape[1])
    blocks = max(1, triton.cdiv(n, BLOCK))
    partial = torch.zeros(batch, blocks, layout["C"], dtype=torch.float32, device=p.device)
    if n > 0:
        _accumulate_kernel[(batch, blocks)](
            p, g, m, rms, q_g, q_m, decays.momentum.contiguous(), partial,
            n, blocks, p.stride(0), g.stride(0), m.stride(0), m.stride(1), rms.stride(0),
            q_g.stride(0), q_g.stride(1), q_m.stride(0), q_m.stride(1), float(decays.rms), BLOCK=BLOCK, **layout,
        )
    return partial.sum(1)


def mlp_step_(grid: Grid, pre: Preconditioners, hidden_in: Factors, mlp: FoldedMlp) -> None:
    """Pass 2 (contract of :func:`celo_hf.backends.eager.mlp_step_`)."""
    batch = grid.p.shape[0]
    hidden_in = _flat_grid(total(hidden_in).expand(batch, HIDDEN, *grid.p.shape[1:]).contiguous())
    q_g, q_m = _multiplied_out(pre.q_g, grid.m), _multiplied_out(pre.q_m, grid.m)
    p, g, m, rms = (_flat_grid(t) for t in grid)
    n = p.shape[1]
    _check_layout(p, g, m, rms, q_g, q_m, hidden_in)
    (w1, b1), (w2, b2) = mlp.hidden_layers[0], mlp.last
    dense = [t.contiguous() for t in (mlp.first, w1, b1, w2, b2, mlp.step_scale)]
    if n > 0:
        _step_kernel[(batch, triton.cdiv(n, BLOCK))](
            p, g, m, rms, q_g, q_m, hidden_in, *dense,
            n, p.stride(0), g.stride(0), m.stride(0), m.stride(1), rms.stride(0),
            q_g.stride(0), q_g.stride(1), q_m.stride(0), q_m.stride(1), hidden_in.stride(0), hidden_in.stride(1),
            float(mlp.exp_mult), BLOCK=BLOCK, **_constexprs(m.shape[1]),
        )


KERNELS = Kernels(square_sums=eager.square_sums, factored_statistics=None, accumulate_=accumulate_, mlp_step_=mlp_step_)
