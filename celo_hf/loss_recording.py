"""The training loss read from the model's own forward, so that a plain training loop feeds Celo.

Celo's learned scheduler reads the training loss every step, but neither ``transformers.Trainer``
nor Accelerate hands an optimizer the loss. :class:`LossRecorder` is a forward hook on the model
that keeps the ``loss`` of every *training* forward: the module is in training mode, autograd is
recording (``torch.is_grad_enabled()``) and no backward pass is running. Evaluation, prediction and
generation forwards (``eval()`` or ``no_grad``) are never recorded, nor are the forwards that
gradient checkpointing recomputes during backward. Each record also says whether the forward was
given ``num_items_in_batch`` (the loss was then normalised over the whole accumulated batch).

Two users of the records, one recorder per model (:func:`recorder_for`):

* :func:`celo_hf.create` registers :meth:`LossRecorder.feed` as a step pre-hook of its Celo, which
  hands the step's loss over when none was given (:func:`step_loss` with scale 1, mean over
  processes);
* :class:`celo_hf.CeloCallback` reduces the records exactly as ``Trainer`` does, knowing its
  arguments (:func:`step_loss` with the world size as scale when Trainer rescales by it).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from .optimizer import Celo

#: What works when the loss is computed outside the model's forward (the model returns no ``loss``).
HOW_TO_FEED_ANY_LOSS = (
    "for a loss computed outside the model (Trainer's compute_loss_func, label_smoothing_factor, a custom "
    "compute_loss), build the Trainer as celo_hf.CeloTrainer(...), mix celo_hf.CeloTrainerMixin into its "
    "class, or call celo_hf.attach(trainer) before trainer.train(); in your own loop pass the loss: "
    "optimizer.step(loss=loss), optimizer.set_loss(loss) or a closure"
)


#: What the recorder saw when no training forward gave it a loss.
NO_LOSS_IN_OUTPUT = "the model's training forwards returned no 'loss' (an entry of its ModelOutput or dict output)"


class RecordedLoss(NamedTuple):
    """One training forward's loss: ``loss`` (a detached copy, shape ``()``, the model's dtype) and
    ``normalised``: whether the forward received ``num_items_in_batch`` (the model then divided by the
    token count of the whole accumulated batch, so the step's losses add up instead of averaging)."""

    loss: torch.Tensor
    normalised: bool


class LossRecorder:
    """A forward hook on ``model`` keeping the loss of each training forward since the last step.

    Records start afresh at a forward that finds no gradient on any trainable parameter (the
    gradients were cleared with ``zero_grad()``, as Trainer and Accelerate do after every step, even
    one that ``GradScaler`` skipped) and when taken (:meth:`take`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.records: list[RecordedLoss] = []
        #: Training forwards since the last step whose output had no ``loss``.
        self.lossless_forwards = 0
        model.register_forward_hook(self._record, with_kwargs=True)

    @torch.compiler.disable
    def _record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or torch._C._current_graph_task_id() != -1:
            return  # evaluation, no_grad, or a forward recomputed inside backward (gradient checkpointing)
        if all(p.grad is None for p in module.parameters() if p.requires_grad):
            self.clear()
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None:
            self.lossless_forwards += 1
            return
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ValueError(f"the model's output 'loss' must be a 1-element tensor, got {loss!r:.80}")
        normalised = kwargs.get("num_items_in_batch") is not None
        # A copy: Trainer scales the returned loss in place (loss *= world size).
        self.records.append(RecordedLoss(loss.detach().clone().reshape(()), normalised))

    def take(self) -> list[RecordedLoss]:
        """The records since the last step, forgetting them."""
        records = self.records
        self.clear()
        return records

    def clear(self) -> None:
        self.records = []
        self.lossless_forwards = 0

    def feed(self, optimizer: Celo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Step pre-hook: hand the optimizer the recorded step loss when the step got none.

        The loss given to ``step(loss=...)``, returned by a closure, or set with ``set_loss()`` wins;
        otherwise the step's loss is :func:`step_loss` of the records with scale 1, averaged over
        processes. Raises if the step has no loss at all and no ``total_steps``.
        """
        if optimizer.total_steps is None:
            raise RuntimeError(
                "Celo.total_steps is not set: give celo_hf.create(model, total_steps=N) (the planned number of "
                "optimizer steps), set optimizer.total_steps = N, or add celo_hf.CeloCallback() to the Trainer's "
                "callbacks (it takes Trainer's state.max_steps)"
            )
        # torch passes step's own arguments, ``self`` first: step(self, closure=None, loss=None).
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        loss = args[2] if len(args) > 2 else kwargs.get("loss")
        # A set_loss() value waiting for this step (Celo's own attribute: same package).
        given = closure is not None or loss is not None or optimizer._pending_loss is not None
        lossless_forwards = self.lossless_forwards
        records = self.take()
        if given:
            return
        if records:
            optimizer.set_loss(mean_over_processes(step_loss(records, normalised_scale=1)))
        elif lossless_forwards:
            raise RuntimeError(f"Celo got no training loss: {NO_LOSS_IN_OUTPUT}; {HOW_TO_FEED_ANY_LOSS}")

    def clear_after_step(self, optimizer: Celo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Step post-hook: forget forwards run inside the step (by a closure); they were its own."""
        self.clear()


_RECORDERS: weakref.WeakKeyDictionary[torch.nn.Module, LossRecorder] = weakref.WeakKeyDictionary()


def recorder_for(model: torch.nn.Module) -> LossRecorder:
    """The model's :class:`LossRecorder`, installed on first use (one per model, shared)."""
    recorder = _RECORDERS.get(model)
    if recorder is None:
        recorder = _RECORDERS[model] = LossRecorder(model)
    return recorder


def step_loss(records: list[RecordedLoss], normalised_scale: int) -> torch.Tensor:
    """One process's loss for an optimizer step, shape ``()`` float32, from its training forwards
    (at least one).

    A normalised loss (the forward got ``num_items_in_batch``) counts times ``normalised_scale``;
    any other counts divided by the number of forwards (the step's micro-batches). Added in float32
    from zero in forward order, each term in the loss's own dtype: ``Trainer.training_step``'s
    arithmetic, so with Trainer's scale (its world size when ``average_tokens_across_devices``, else
    1) this is what Trainer adds to its logged loss.
    """
    total = torch.zeros((), dtype=torch.float32, device=records[0].loss.device)
    for record in records:
        total += record.loss * normalised_scale if record.normalised else record.loss / len(records)
    return total


def mean_over_processes(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` averaged over all processes when ``torch.distributed`` is initialised (sum, then
    divide: the arithmetic of Trainer's logged mean), else ``loss`` itself."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss
    total = loss.clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()
