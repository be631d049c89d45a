"""The gradient-scale gain: smaller steps for tensors whose gradients are tiny next to their values.

Celo v1's step is relative to each tensor's RMS and its features are normalised over the tensor, so
the update MLP cannot tell a freshly initialised tensor from a pretrained one: it takes steps of
about 1-2% of the tensor's norm in both. Training from scratch wants that; a pretrained model
fine-tuned with it forgets what it knew. What does tell them apart is the size of the gradient
next to the tensor itself, ``r = ||g|| / ||p||`` (the same as the ratio of their RMS): at the first
step of a fine-tune, a median of 6e-4 over MiniLM-L6's pretrained matrices against 0.2 for its fresh
classifier head (``python -m meta_training.finetune_probe``).

The gain multiplies steps by ``min(1, r / threshold) ** power``: 1 (Celo v1 unchanged) where the
relative gradient is at least ``threshold``, smaller below. It is an option of the meta-model
(:class:`celo_hf.CeloNet`'s ``gain_threshold``, ``gain_power``, ``gain_signal``), off (``None``) in
the paper's checkpoint. Which ``r`` it reads is the ``gain_signal``:

* ``"tensor"``: each tensor's own ``r`` at every step (:func:`step_gain`); a tensor that is all zeros
  gets gain 1. A tensor next to a fresh head (MiniLM's pooler: ``r`` 0.08-0.33) still takes full
  steps, and from-scratch runs slow down late as their gradients shrink.
* ``"model_start"``: one gain per run for every tensor, from the median over tensors of ``r`` at the
  first step (:func:`model_start_gain`): "was this model trained before?" is a property of the
  model, not of each tensor. Tensors with ``||g|| = 0`` or ``||p|| = 0`` at that step (zero-initialised
  adapters, parts the loss does not reach yet) carry no evidence and are left out.

Tensors in a param group marked ``"fresh"`` (newly initialised on a pretrained model, such as a new
head: :mod:`celo_hf.fresh_tensors`) take no gain of either signal and are left out of the median.
With ``CeloNet(fresh_gain=k)`` they step faster while the body is slowed (:func:`fresh_tensor_gain`).
"""

from __future__ import annotations

import torch


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row of ``(n, d)`` (any float dtype), float32 ``(n,)``. The optimizer
    (one tensor, ``n = 1``) and the population (``n`` members) both use it, so both get the same bits."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)


def step_gain(grad_norm: torch.Tensor, param_norm: torch.Tensor, threshold: float, power: float) -> torch.Tensor:
    """``min(1, (||g|| / ||p||) / threshold) ** power`` element-wise over tensors of norms (any
    shape, float32 result); 1 where ``||p|| = 0``."""
    ratio = grad_norm.float() / (param_norm.float() * threshold)
    gain = torch.clamp(ratio, max=1.0).pow(power)
    return torch.where(param_norm > 0, gain, torch.ones_like(gain))


#: The values of ``CeloNet(gain_signal=...)``: see the module docstring.
GAIN_SIGNALS = ("tensor", "model_start")


def median_ratio(grad_norm: torch.Tensor, param_norm: torch.Tensor) -> torch.Tensor:
    """The (lower) median of ``||g|| / ||p||`` over the last axis of norms ``(..., n)``, over the
    tensors where both norms are positive: float32 ``(...)``, nan where there is none."""
    informative = (grad_norm > 0) & (param_norm > 0)
    ratio = grad_norm.float() / param_norm.float()
    return torch.where(informative, ratio, torch.full_like(ratio, float("nan"))).nanmedian(dim=-1).values


def model_start_gain(grad_norm: torch.Tensor, param_norm: torch.Tensor, threshold: float, power: float) -> torch.Tensor:
    """The ``"model_start"`` gain from the first step's norms ``(..., n)`` of ``n`` tensors: float32
    ``(...)``, ``min(1, median_r / threshold) ** power`` with ``median_r`` the :func:`median_ratio`;
    1 where there is none."""
    median = median_ratio(grad_norm, param_norm)
    gain = torch.clamp(median / threshold, max=1.0).pow(power)
    return torch.where(median.isnan(), torch.ones_like(gain), gain)


def fresh_tensor_gain(run_gain: torch.Tensor, fresh_gain: float) -> torch.Tensor:
    """The step multiplier of fresh tensors under a ``"model_start"`` gain ``run_gain`` ``G``
    (any shape): ``min(fresh_gain, 1 / G)``, float32. A fresh head on a pretrained body whose steps
    are slowed (``G < 1``) steps up to ``fresh_gain`` times Celo's own step; with ``G = 1``
    (nothing slowed) it steps as every other tensor."""
    return torch.clamp(run_gain.float().reciprocal(), max=fresh_gain)


def model_start_scales(lr_mult: torch.Tensor, run_gain: torch.Tensor, fresh_gain: float | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step multipliers under a ``"model_start"`` gain ``run_gain``: ``(lr_mult * run_gain``
    for the tensors not marked fresh, ``lr_mult`` times :func:`fresh_tensor_gain` for the fresh ones
    (``lr_mult`` itself without a ``fresh_gain``)``)``. Shapes broadcast: ``(1,)`` in the optimizer,
    ``(P,)`` in the population."""
    fresh = lr_mult if fresh_gain is None else lr_mult * fresh_tensor_gain(run_gain, fresh_gain)
    return lr_mult * run_gain, fresh
