"""Celo with ``transformers.Trainer``: the step's training loss and step count reach the optimizer.

Trainer hands an optimizer neither the loss nor the planned number of steps, and Celo's learned
scheduler reads both every step. The pieces here close that gap:

* :class:`CeloCallback`, added to any Trainer, hands Celo just before ``optimizer.step()`` exactly
  the loss Trainer logs with ``logging_steps=1``, the same value on every rank: it reads each
  training forward's ``loss`` (:mod:`celo_hf.loss_recording`) and reduces the step's micro-batches
  and processes as Trainer does. At train begin it sets Celo's ``total_steps`` to Trainer's
  ``state.max_steps`` and ``TrainingArguments.weight_decay`` on the decay group of
  :func:`celo_hf.create`;
* :class:`CeloTrainerMixin` records instead the loss ``training_step`` returns, whatever computed
  it (``compute_loss_func``, label smoothing, a custom ``compute_loss``: losses the model's forward
  does not return); it adds the callback.

The ways in::

    trainer = Trainer(model, args, ..., optimizers=celo_hf.create(model, total_steps))  # loss up to a constant
    trainer = Trainer(model, args, ..., optimizers=celo_hf.create(model), callbacks=[celo_hf.CeloCallback()])
    trainer = celo_hf.CeloTrainer(model, args, ..., optimizers=celo_hf.create(model))  # any loss
    trainer = celo_hf.attach(SomeTrainer(model, args, ..., optimizers=celo_hf.create(model)))
    class MyTrainer(celo_hf.CeloTrainerMixin, SomeTrainer): ...

Under FSDP Trainer refuses ``optimizers=``; let it build Celo after sharding instead:
``CeloTrainer(..., optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {"weights": ...}))``.
DeepSpeed ZeRO flattens parameters across tensor boundaries, which a per-tensor optimizer cannot
work with: it is refused.

Celo2 needs none of this (no loss, no step count): ``Trainer(..., optimizers=(Celo2(model.named_parameters(),
lr=...), None))`` or, under FSDP too, ``optimizer_cls_and_kwargs=(celo_hf.Celo2Factory, {"lr": ..., "weight_decay": ...})``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, TypeVar

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import SchedulerType

from .celo2.optimizer import Celo2
from .celo2.optimizer import create as create_celo2
from .loss_recording import (
    HOW_TO_FEED_ANY_LOSS,
    NO_LOSS_IN_OUTPUT,
    LossRecorder,
    mean_over_processes,
    recorder_for,
    step_loss,
)
from .optimizer import WEIGHT_DECAY_FROM_ARGS, Celo, create

TrainerT = TypeVar("TrainerT", bound=Trainer)

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


def set_weight_decay(celo: Celo, weight_decay: float) -> None:
    """Give the param groups :func:`celo_hf.create` left to Trainer (``weight_decay=None``) Trainer's
    ``weight_decay``; groups with an explicit value keep it."""
    for group in celo.param_groups:
        if group.get(WEIGHT_DECAY_FROM_ARGS):
            group["weight_decay"] = weight_decay


class CeloCallback(TrainerCallback):
    """Hands Celo the step's loss, exactly as Trainer logs it, and the planned number of steps.

    The loss is, per process, the sum over the step's micro-batches of the loss ``training_step``
    returns (scaled for gradient accumulation), then the mean over processes. It comes from
    :meth:`record` when :class:`CeloTrainerMixin` calls it, else from the model's training forwards
    (:func:`celo_hf.loss_recording.recorder_for`, hooked on the model at train begin), scaled as
    ``Trainer.compute_loss`` and ``training_step`` scale them: a loss normalised by
    ``num_items_in_batch`` times the world size when ``average_tokens_across_devices``, any other
    divided by the step's number of micro-batches. When neither gives a loss (the model returns none)
    the first optimizer step fails saying what works. It does nothing when the optimizer is not Celo.

    Trainer's ``logging_nan_inf_filter`` replaces a non-finite micro-batch loss in its *log*; Celo
    is handed the true value and skips that step (see ``Celo.skipped_steps``).
    """

    def __init__(self) -> None:
        self._step_loss: torch.Tensor | None = None
        self._recorder: LossRecorder | None = None
        self._normalised_scale = 1

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
        if celo is None:
            return
        set_total_steps(celo, state.max_steps)
        set_weight_decay(celo, args.weight_decay)
        self._recorder = recorder_for(kwargs["model"])
        self._normalised_scale = args.world_size if args.average_tokens_across_devices else 1

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step_loss = None
        if self._recorder is not None:
            self._recorder.clear()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        celo = find_celo(kwargs.get("optimizer"))
        if celo is None:
            return
        assert self._recorder is not None, "on_train_begin found the Celo optimizer"
        records = self._recorder.take()
        loss = self._step_loss
        self._step_loss = None
        if loss is None:
            if not records:
                raise RuntimeError(
                    f"CeloCallback received no training loss for optimizer step {state.global_step}: "
                    f"{NO_LOSS_IN_OUTPUT}; {HOW_TO_FEED_ANY_LOSS}"
                )
            loss = step_loss(records, self._normalised_scale)
        celo.set_loss(mean_over_processes(loss))


class CeloTrainerMixin:
    """Mix into any ``transformers.Trainer`` class (first among the bases) to train with Celo.

    It records the loss ``training_step`` returns for each micro-batch, whatever computed it, for
    :class:`CeloCallback` (added if not already among the callbacks), refuses DeepSpeed, and, when
    Trainer builds the scheduler for a Celo optimizer (the :class:`CeloFactory` route), makes it
    constant: Celo learns its own schedule.
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
    are :func:`celo_hf.create`'s (``weights``, ``weight_decay``, ``backend``, ...); ``total_steps``
    may be left out. Use it with :class:`CeloTrainer` or :func:`attach`: they keep Trainer's
    learning-rate schedule, which this route builds, constant.
    """

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> Celo:
        optimizer, _ = create(model, **kwargs)
        return optimizer


class Celo2Factory:
    """Trainer's optimizer-factory route for Celo2: ``optimizer_cls_and_kwargs=(Celo2Factory, kwargs)``.

    Trainer calls ``Celo2Factory()(model, **kwargs)`` after wrapping or sharding the model (the only
    route under FSDP). ``kwargs`` are :func:`celo_hf.celo2.optimizer.create`'s; Trainer passes none
    of its own, so give ``lr=args.learning_rate`` and ``weight_decay=args.weight_decay`` (Trainer's
    learning-rate schedule then applies as for AdamW). A plain ``Trainer`` suffices.
    """

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> Celo2:
        return create_celo2(model, **kwargs)


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
