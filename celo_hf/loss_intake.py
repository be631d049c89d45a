"""Whether and on what loss a Celo step runs: picking the step's loss, and the finite check.

The learned scheduler reads the training loss every step. It comes from ``step(loss=...)``, else
the closure's return value, else a value handed over with ``set_loss()`` beforehand: that one only
while the gradients it went with are still the parameters' gradients. A step whose loss or
gradients are not finite (on any process) is skipped.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch

LossLike = float | int | torch.Tensor

NO_LOSS = (
    "Celo.step() needs the current training loss (its learned scheduler reads it every step). "
    "Pass it as step(loss=loss), return it from the closure in step(closure), or call "
    "optimizer.set_loss(loss) before step(). With transformers.Trainer, build it as celo_hf.CeloTrainer(...) "
    "or call celo_hf.attach(trainer) before trainer.train()."
)
STALE_LOSS = (
    " (A loss handed over with set_loss() was dropped: the gradients present then have been replaced since, "
    "e.g. after a step that GradScaler or Accelerate skipped; hand over the loss that goes with these gradients.)"
)


class PendingLoss(NamedTuple):
    """A loss handed over with ``set_loss()``, and the parameters' gradients at that moment (weak
    references, ``None`` where a parameter had none): it is for a step on those gradients only."""

    value: LossLike
    grads: tuple[weakref.ref[torch.Tensor] | None, ...]

    @classmethod
    def of(cls, loss: Any, params: list[torch.Tensor]) -> PendingLoss:
        """``loss`` (checked) for a step on ``params``' current gradients."""
        return cls(check_loss(loss), tuple(None if p.grad is None else weakref.ref(p.grad) for p in params))

    def is_for(self, params: list[torch.Tensor]) -> bool:
        """Whether every gradient recorded is still its parameter's ``.grad`` (new gradients where
        there were none are fine: a loss may be handed over before ``backward()``)."""
        return len(self.grads) == len(params) and all(
            ref is None or ref() is p.grad for ref, p in zip(self.grads, params)
        )


def step_loss(
    loss: LossLike | None, closure_loss: Any, pending: PendingLoss | None, params: list[torch.Tensor]
) -> LossLike:
    """The loss a step runs on: ``loss``, else ``closure_loss``, else ``pending`` if it is for
    ``params``' gradients; raises ``RuntimeError`` saying how to provide one when there is none."""
    fed = loss if loss is not None else closure_loss
    if fed is None and pending is not None:
        if not pending.is_for(params):
            raise RuntimeError(NO_LOSS + STALE_LOSS)
        fed = pending.value
    if fed is None:
        raise RuntimeError(NO_LOSS)
    return check_loss(fed)


def check_loss(loss: Any) -> LossLike:
    """``loss`` as a detached 1-element tensor or a float; raises on anything else."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"Celo needs the scalar training loss, got a tensor of shape {tuple(loss.shape)}")
        return loss.detach()
    try:
        return float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"Celo needs the training loss as a number or a 1-element tensor, got {type(loss).__name__}") from None


def all_finite(grads: list[torch.Tensor], loss: torch.Tensor, group: object | None) -> bool:
    """Whether the loss and every gradient are finite (on every process of ``group``): the step's
    one host synchronisation.

    A fast 2-norm per tensor decides; only when one is not finite (NaN, inf, or a finite gradient
    so large its squares overflow) does an exact element-wise check run.
    """
    def check(exact: bool) -> bool:
        flags = [torch.isfinite(loss)]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for group_grads in by_device.values():
            if exact:
                flags += [torch.isfinite(g).all().to(loss.device) for g in group_grads]
            else:
                flags.append(torch.isfinite(torch.stack(torch._foreach_norm(group_grads))).all().to(loss.device))
        finite = torch.stack(flags).all().to(torch.int32)
        if group is not None:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=group)
        return bool(finite)

    return check(exact=False) or check(exact=True)
