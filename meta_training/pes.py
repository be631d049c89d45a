"""Persistent evolution strategies (PES), antithetic and truncated, as in Celo's meta-training.

Pure functions on flat meta-parameter vectors (``docs/meta-training.md`` §2.2). ``N`` slots each
run a "+" copy of an inner problem under ``theta + eps_i`` and a "-" copy under ``theta - eps_i``
that share data and randomness; after each truncation of ``K`` steps the per-step loss differences
give a gradient estimate. The accumulator ``A_i`` holds every perturbation applied since slot
``i``'s current trajectory began, which is what makes the estimate unbiased across truncations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sample_perturbations(num_slots: int, dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """``(N, D)`` isotropic Gaussian perturbations with standard deviation ``std``."""
    return torch.randn(num_slots, dim, generator=generator) * std


def antithetic_population(theta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``(2N, D)`` meta-parameters: rows ``0..N-1`` are ``theta + eps``, rows ``N..2N-1`` ``theta - eps``."""
    return torch.cat([theta + eps, theta - eps])


@dataclass
class PESEstimate:
    """One truncation's result: ``grad`` ``(D,)``, the new accumulators ``(N, D)``, and the mean
    loss over both signs (for logging only)."""

    grad: torch.Tensor
    accumulator: torch.Tensor
    mean_loss: torch.Tensor


def pes_gradient(
    loss_pos: torch.Tensor,
    loss_neg: torch.Tensor,
    mask: torch.Tensor,
    done: torch.Tensor,
    eps: torch.Tensor,
    accumulator: torch.Tensor,
    std: float,
) -> PESEstimate:
    """The PES gradient estimate of one truncation.

    Args:
        loss_pos, loss_neg: ``(K, N)`` normalised per-step losses of the "+" and "-" copies.
        mask: ``(K, N)`` 1 where a step trained (0 on reset steps).
        done: ``(K, N)`` bool, set on the step after which a slot's trajectory ended.
        eps: ``(N, D)`` this truncation's perturbations.
        accumulator: ``(N, D)`` perturbations accumulated since each slot's trajectory began.
        std: the perturbation standard deviation.

    The steps before a slot's trajectory first finished in this truncation depend on every
    perturbation since that trajectory began (the accumulator); the steps after it only on the
    current one. Both parts are averaged over the truncation's masked steps.
    """
    mask = mask.float()
    steps = mask.sum(0).clamp(min=1.0)
    delta = (loss_pos - loss_neg) * mask
    finished = torch.cumsum(done.int(), dim=0) > 0
    before = (delta * ~finished).sum(0) / steps
    after = (delta * finished).sum(0) / steps
    accumulator = accumulator + eps
    grads = (before[:, None] * accumulator + after[:, None] * eps) / (2 * std**2)
    new_accumulator = torch.where(finished[-1][:, None], eps, accumulator)
    pos_mean = (loss_pos * mask).sum(0) / steps
    neg_mean = (loss_neg * mask).sum(0) / steps
    return PESEstimate(grads.mean(0), new_accumulator, ((pos_mean + neg_mean) / 2).mean())
