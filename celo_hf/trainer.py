"""Celo with ``transformers.Trainer``: the step's training loss and step count reach the optimizer.

Trainer hands an optimizer neither the loss nor the planned number of steps, and Celo's learned
scheduler reads both every step. The pieces here close that gap:

* :class:`CeloTrainerMixin` records, on every process, the loss ``training_step`` returns for each
  micro-batch (already scaled for gradient accumulation, as Trainer logs it);
* :class:`CeloCallback` sums those over the micro-batches of one optimizer step, averages the sum
  over processes and hands it to Celo just before ``optimizer.step()``: exactly the loss Trainer
  logs with ``logging_steps=1``, the same value on every rank. At train begin it sets Celo's
  ``total_steps`` to Trainer's ``state.max_steps``.

Three ways in, all running the same code::

    trainer = celo_hf.CeloTrainer(model, args, train_dataset=ds, optimizers=celo_hf.create(model))
    trainer = celo_hf.attach(SomeTrainer(model, args, ..., optimizers=celo_hf.create(model)))
    class MyTrainer(celo_hf.CeloTrainerMixin, SomeTrainer): ...

Under FSDP Trainer refuses ``optimizers=``; let it build Celo after sharding instead:
``CeloTrainer(..., optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {"weights": ...}))``.
DeepSpeed ZeRO flattens parameters across tensor boundaries, which a per-tensor optimizer cannot
work with: it is refused.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, TypeVar

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import reduce
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import SchedulerType

from .optimizer import Celo, create

TrainerT = TypeVar("TrainerT", bound=Trainer)

_HOW_TO_RECORD = (
    "build the Trainer as celo_hf.CeloTrainer(...), mix celo_hf.CeloTrainerMixin into your Trainer class, "
    "or call celo_hf.attach(trainer) before trainer.train()"
)
_DEEPSPEED = (
    "Celo cannot run under DeepSpeed: ZeRO hands the optimizer flat 1-D partitions that cut across "
    "parameter tensors, and Celo's update is per tensor (tensor RMS, row/column moments). "
    "Use DDP or FSDP2 (optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {...})) instead."
)


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer inside Accelerate's ``AcceleratedOptimizer`` wrapper(s)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def find_celo(optimizer: torch.optim.Optimizer | None) -> Celo | None:
    """The :class:`Celo` behind ``optimizer`` (possibly wrapped by Accelerate), else ``None``."""
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, Celo) else None


def refuse_deepspeed(trainer: Trainer) -> None:
    """Raise if ``trainer`` runs under DeepSpeed (see the module docstring)."""
    if trainer.is_deepspeed_enabled:
        raise RuntimeError(_DEEPSPEED)


def set_total_steps(celo: Celo, max_steps: int) -> None:
    """Make Trainer's ``max_steps`` Celo's ``total_steps``, warning if Celo was told otherwise."""
    if celo.total_steps is not None and celo.total_steps != max_steps:
        warnings.warn(
            f"Celo was created with total_steps={celo.total_steps}, but Trainer will run "
            f"state.max_steps={max_steps} optimizer steps: using Trainer's {max_steps} "
            "(Celo's learned schedule reads step / total_steps)",
            UserWarning,
            stacklevel=2,
        )
    celo.total_steps = max_steps


class CeloCallback(TrainerCallback):
    """Hands Celo the step's loss (summed over micro-batches, mean over processes) and the step count.

    The loss comes from :meth:`record`, called by :class:`CeloTrainerMixin` for every micro-batch;
    added alone to a plain Trainer this callback receives nothing, and the first optimizer step
    fails saying what to add. It does nothing when the optimizer is not Celo.

    Trainer's ``logging_nan_inf_filter`` replaces a non-finite micro-batch loss in its *log*; Celo
    is handed the true value and skips that step (see ``Celo.skipped_steps``).
    """

    def __init__(self) -> None:
        self._step_loss: torch.Tensor | None = None

    def record(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (a scalar tensor, as ``training_step`` returns it).

        Summed in float32 from zero, in micro-batch order: the same arithmetic as Trainer's log.
        """
        if self._step_loss is None:
            self._step_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        self._step_loss += loss.detach()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        celo = find_celo(kwargs.get("optimizer"))
        if celo is not None:
            set_total_steps(celo, state.max_steps)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step_loss = None

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        celo = find_celo(kwargs.get("optimizer"))
        if celo is None:
            return
        if self._step_loss is None:
            raise RuntimeError(
                f"CeloCallback received no training loss for optimizer step {state.global_step}: "
                f"Trainer does not pass the loss to callbacks; to record it, {_HOW_TO_RECORD}"
            )
        celo.set_loss(reduce(self._step_loss, reduction="mean"))
        self._step_loss = None


class CeloTrainerMixin:
    """Mix into any ``transformers.Trainer`` class (first among the bases) to train with Celo.

    It records each micro-batch's loss for :class:`CeloCallback` (added if not already among the
    callbacks), refuses DeepSpeed, and, when Trainer builds the scheduler for a Celo optimizer
    (the :class:`CeloFactory` route), makes it constant: Celo learns its own schedule.
    """

    celo_callback: CeloCallback

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _install(self)  # type: ignore[arg-type]

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self.celo_callback.record(loss)
        return loss

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:  # type: ignore[attr-defined]
            optimizer = optimizer if optimizer is not None else self.optimizer  # type: ignore[attr-defined]
            if find_celo(optimizer) is not None:
                if self.args.lr_scheduler_type != SchedulerType.CONSTANT:  # type: ignore[attr-defined]
                    warnings.warn(
                        f"Celo learns its own learning-rate schedule: Trainer's lr_scheduler_type="
                        f"{self.args.lr_scheduler_type.value!r} is not applied on top of it "  # type: ignore[attr-defined]
                        "(to multiply Celo's steps by a schedule, pass optimizers=(optimizer, scheduler))",
                        UserWarning,
                        stacklevel=2,
                    )
                self.lr_scheduler = LambdaLR(optimizer, lambda _: 1.0)
        return super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]


class CeloTrainer(CeloTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains Celo correctly: see :class:`CeloTrainerMixin`."""


class CeloFactory:
    """Trainer's optimizer-factory route: ``optimizer_cls_and_kwargs=(CeloFactory, kwargs)``.

    Trainer calls ``CeloFactory()(model, **kwargs)`` when it builds the optimizer, after wrapping
    or sharding the model (the only route under FSDP, where ``optimizers=`` is refused). ``kwargs``
    are :func:`celo_hf.create`'s (``weights``, ``backend``, ...); ``total_steps`` may be left out.
    The Trainer must still record the loss (:class:`CeloTrainer` or :func:`attach`).
    """

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> Celo:
        optimizer, _ = create(model, **kwargs)
        return optimizer


def attach(trainer: TrainerT) -> TrainerT:
    """Give an existing Trainer (any ``Trainer`` subclass) Celo's pieces; returns the same object.

    Its class becomes ``CeloTrainerMixin`` + its own class, so it behaves exactly as if built from
    that class. Call before ``trainer.train()``; calling it again changes nothing.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"attach() takes a transformers.Trainer, got {type(trainer).__name__}")
    if not isinstance(trainer, CeloTrainerMixin):
        trainer.__class__ = _with_celo(type(trainer))
        _install(trainer)  # type: ignore[arg-type]
    return trainer


@functools.cache
def _with_celo(trainer_class: type[Trainer]) -> type[Trainer]:
    return type(f"Celo{trainer_class.__name__}", (CeloTrainerMixin, trainer_class), {})


def _install(trainer: CeloTrainerMixin) -> None:
    """Refuse DeepSpeed and connect the trainer to its :class:`CeloCallback` (adding one if absent)."""
    refuse_deepspeed(trainer)  # type: ignore[arg-type]
    callbacks = trainer.callback_handler.callbacks  # type: ignore[attr-defined]
    existing = [cb for cb in callbacks if isinstance(cb, CeloCallback)]
    if existing:
        trainer.celo_callback = existing[0]
    else:
        trainer.celo_callback = CeloCallback()
        trainer.add_callback(trainer.celo_callback)  # type: ignore[attr-defined]
