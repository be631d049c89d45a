"""Triton versions of the two per-element kernels of :mod:`celo_hf.update` (``backend="triton"``).

Same inputs, outputs and maths as :func:`celo_hf.update.accumulate_and_square_sums_` and
:func:`celo_hf.update.mlp_step_`, each fused into one pass over a chunk flattened to ``(B, n)``:
every element is read once and written once (the preconditioner and first-layer factors are
multiplied out beforehand). They cover the paper's configuration (3 decays, first layer into 4
hidden units, one 4 -> 4 hidden layer). The first kernel writes per-block partial sums that torch
then adds up, so results do not depend on the order blocks run in.

On a GPU they run natively; with ``TRITON_INTERPRET=1`` set before this module is imported they run
on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .update import Factors, _product, _total

BLOCK = 1024
NUM_DECAYS, HIDDEN, CHANNELS = 3, 4, 18


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
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    block = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + b * p_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * g_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(tl.maximum(g, -1000.0), 1000.0)
    rms = tl.load(rms_ptr + b * rms_sb + offs, mask=mask, other=0.0).to(tl.float32)
    rms = rms * rms_decay + (1.0 - rms_decay) * g * g
    tl.store(rms_ptr + b * rms_sb + offs, _rounded_for(rms, rms_ptr), mask=mask)
    r = 1.0 / tl.sqrt(rms + 1e-6)
    out = out_ptr + (b * num_blocks + block) * 18
    tl.store(out + 0, _square_sum(g, mask))
    tl.store(out + 1, _square_sum(tl.minimum(tl.maximum(g, -0.1), 0.1), mask))
    tl.store(out + 2, _square_sum(p, mask))
    tl.store(out + 6, _square_sum(rms, mask))
    tl.store(out + 10, _square_sum(r, mask))
    tl.store(out + 14, _square_sum(g * r, mask))
    for j in tl.static_range(3):
        beta = tl.load(beta_ptr + j)
        m_at = m_ptr + b * m_sb + j * m_sk + offs
        m = tl.load(m_at, mask=mask, other=0.0).to(tl.float32) * beta + (1.0 - beta) * g
        tl.store(m_at, _rounded_for(m, m_ptr), mask=mask)
        qg = tl.load(qg_ptr + b * qg_sb + j * qg_sk + offs, mask=mask, other=0.0)
        qm = tl.load(qm_ptr + b * qm_sb + j * qm_sk + offs, mask=mask, other=0.0)
        tl.store(out + 3 + j, _square_sum(m, mask))
        tl.store(out + 7 + j, _square_sum(m * r, mask))
        tl.store(out + 11 + j, _square_sum(g * qg, mask))
        tl.store(out + 15 + j, _square_sum(m * qm, mask))


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
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + b * p_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * g_sb + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(tl.maximum(g, -1000.0), 1000.0)
    rms = tl.load(rms_ptr + b * rms_sb + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(rms + 1e-6)
    w = first_ptr + b * 18 * 4  # (C, H) row-major for this batch row
    h0 = tl.load(hid_ptr + b * hid_sb + 0 * hid_sk + offs, mask=mask, other=0.0)
    h1 = tl.load(hid_ptr + b * hid_sb + 1 * hid_sk + offs, mask=mask, other=0.0)
    h2 = tl.load(hid_ptr + b * hid_sb + 2 * hid_sk + offs, mask=mask, other=0.0)
    h3 = tl.load(hid_ptr + b * hid_sb + 3 * hid_sk + offs, mask=mask, other=0.0)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, g, w + 0 * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, tl.minimum(tl.maximum(g, -0.1), 0.1), w + 1 * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, p, w + 2 * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, rms, w + 6 * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, r, w + 10 * 4)
    h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, g * r, w + 14 * 4)
    for j in tl.static_range(3):
        m = tl.load(m_ptr + b * m_sb + j * m_sk + offs, mask=mask, other=0.0).to(tl.float32)
        qg = tl.load(qg_ptr + b * qg_sb + j * qg_sk + offs, mask=mask, other=0.0)
        qm = tl.load(qm_ptr + b * qm_sb + j * qm_sk + offs, mask=mask, other=0.0)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, m, w + (3 + j) * 4)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, m * r, w + (7 + j) * 4)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, g * qg, w + (11 + j) * 4)
        h0, h1, h2, h3 = _into_hidden(h0, h1, h2, h3, m * qm, w + (15 + j) * 4)
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
    return _flat_grid(_product(factors).expand(like.shape).contiguous())


def accumulate_and_square_sums_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor, q_g: Factors, q_m: Factors,
    momentum_decays: torch.Tensor, rms_decay: float,
) -> torch.Tensor:
    """Triton form of :func:`celo_hf.update.accumulate_and_square_sums_` (same contract)."""
    q_g, q_m = _multiplied_out(q_g, m), _multiplied_out(q_m, m)
    p, g, m, rms = (_flat_grid(t) for t in (p, g, m, rms))
    batch, n = p.shape
    if m.shape[1] != NUM_DECAYS:
        raise ValueError(f"the triton kernels support {NUM_DECAYS} decays, got {m.shape[1]}")
    _check_layout(p, g, m, rms, q_g, q_m)
    blocks = max(1, triton.cdiv(n, BLOCK))
    partial = torch.zeros(batch, blocks, CHANNELS, dtype=torch.float32, device=p.device)
    if n > 0:
        _accumulate_kernel[(batch, blocks)](
            p, g, m, rms, q_g, q_m, momentum_decays.contiguous(), partial,
            n, blocks, p.stride(0), g.stride(0), m.stride(0), m.stride(1), rms.stride(0),
            q_g.stride(0), q_g.stride(1), q_m.stride(0), q_m.stride(1), float(rms_decay), BLOCK=BLOCK,
        )
    return partial.sum(1)


def mlp_step_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor, q_g: Factors, q_m: Factors,
    hidden_in: Factors, first: torch.Tensor,
    hidden_layers: Sequence[tuple[torch.Tensor, torch.Tensor]], last: tuple[torch.Tensor, torch.Tensor],
    exp_mult: float, step_scale: torch.Tensor,
) -> None:
    """Triton form of :func:`celo_hf.update.mlp_step_` (same contract)."""
    if first.shape[1:] != (CHANNELS, HIDDEN) or len(hidden_layers) != 1:
        raise ValueError(
            f"the triton kernels support the paper's MLP ({CHANNELS} kernel channels -> {HIDDEN} -> {HIDDEN} -> 2), "
            f"got first layer {tuple(first.shape[1:])} and {len(hidden_layers)} hidden layer(s); use backend='compile'"
        )
    hidden_in = _flat_grid(_total(hidden_in).expand(p.shape[0], HIDDEN, *p.shape[1:]).contiguous())
    q_g, q_m = _multiplied_out(q_g, m), _multiplied_out(q_m, m)
    p, g, m, rms = (_flat_grid(t) for t in (p, g, m, rms))
    batch, n = p.shape
    _check_layout(p, g, m, rms, q_g, q_m, hidden_in)
    (w1, b1), (w2, b2) = hidden_layers[0], last
    dense = [t.contiguous() for t in (first, w1, b1, w2, b2, step_scale)]
    if n > 0:
        _step_kernel[(batch, triton.cdiv(n, BLOCK))](
            p, g, m, rms, q_g, q_m, hidden_in, *dense,
            n, p.stride(0), g.stride(0), m.stride(0), m.stride(1), rms.stride(0),
            q_g.stride(0), q_g.stride(1), q_m.stride(0), q_m.stride(1), hidden_in.stride(0), hidden_in.stride(1),
            float(exp_mult), BLOCK=BLOCK,
        )
