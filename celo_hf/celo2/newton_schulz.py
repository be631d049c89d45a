"""Newton-Schulz orthogonalisation of Celo2's matrix steps (``docs/celo2-algorithm.md`` §10).

Pure and batched: every matrix formed by the last two axes is orthogonalised on its own, in one
chain of batched matrix products over all leading axes (a batch of same-shape tensors, the slices
of a 3-D or 4-D tensor). Float32 by default; see :func:`orthogonalize` for other precisions.
"""

from __future__ import annotations

import torch

from .rule import NEWTON_SCHULZ_COEFFICIENTS, NEWTON_SCHULZ_EPS, NEWTON_SCHULZ_STEPS


def orthogonalize(x: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """The quintic Newton-Schulz iteration on each matrix of ``x`` ``(..., m, n)``, ``m, n >= 1``.

    Each matrix is scaled to unit Frobenius norm (plus ``1e-8``), tall ones are transposed so that
    the Gram matrix is the smaller one, and ``X <- a X + (b A + (c A) A) X`` with ``A = X X^T`` is
    applied ``steps`` times. Returns a new tensor of ``x``'s shape and dtype. The arithmetic runs
    in ``x``'s dtype; on CUDA, TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) or bfloat16
    inputs change the result well beyond float32 rounding (the iteration amplifies differences along
    small singular directions).
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NEWTON_SCHULZ_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + (c * gram) @ gram) @ x
    return x.mT if tall else x
