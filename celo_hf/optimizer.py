"""``Celo``: the learned optimizer as a ``torch.optim.Optimizer``.

A thin shell: it owns the state and calls the pieces that do the work: the step's loss and finite
check (:mod:`celo_hf.loss_intake`), the learned scheduler once per step
(:mod:`celo_hf.scheduler_state`), and the update of every parameter that has a gradient, in
batches (:mod:`celo_hf.batching`, through the driver :mod:`celo_hf.driver`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Iterable
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.optim.lr_scheduler import LambdaLR

from . import backends
from .batching import (
    StateStacks,
    WorkItem,
    batches,
    first_step_gain,
    gradient_scale_gains,
    local_tensor,
    process_group,
    step_scales,
    unshared,
    update_work_,
    weight_decay_penalty,
    work_item,
)
from .features import loss_buffer_decays
from .fresh_tensors import FRESH, newly_initialised
from .hub import load_celo_net
from .layout import RuleConfig, UpdateWeights, init_tensor_state
from .loss_intake import LossLike, PendingLoss, all_finite, step_loss
from .loss_recording import recorder_for
from .network import CeloNet
from .optim_contract import Copyable, check_lr, hooks_set_aside
from .scheduler_state import SchedulerState
from .step_gain import model_start_scales

Backend = str  #: one of BACKENDS
BACKENDS = backends.NAMES



class Celo(Copyable, torch.optim.Optimizer):
    """Celo (Moudgil et al., TMLR 2025): a learned update rule with a learned learning-rate schedule.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        total_steps: the planned number of optimizer steps. Celo's scheduler reads
            ``step / total_steps``; it may be set later (``opt.total_steps = n``) but must be a
            positive int by the first step.
        weights: the learned weights: ``None`` (embedded default), a ``CeloNet``, a local file or
            folder, or a Hub model id; see :func:`celo_hf.hub.load_celo_net`.
        lr: per-group multiplier of Celo's step (default 1.0: Celo's own schedule, untouched), so
            that external schedules compose: a number or a 1-element tensor.
        weight_decay: per-group L2 coefficient ``wd`` (default 0.0: none), the original's optional
            wrapper: the update sees the gradient ``g + wd * p`` and the scheduler the loss
            ``loss + wd * sum(p**2)`` (summed over the tensors the step updates, of each group with
            its own ``wd``).
        revision, token, cache_dir: Hub download options for ``weights``.
        backend: how the per-element work runs: ``"auto"`` (default: ``"cpp"`` for CPU tensors
            when the C++ kernels build on this machine, else ``"eager"``), ``"eager"`` (torch
            operations), ``"cpp"`` (hand-written C++ kernels for CPU tensors, the fastest on CPU:
            about 6x eager; compiled for this machine on first use, a few seconds once, then
            cached; needs a C++ compiler), ``"compile"`` (the eager kernels through
            ``torch.compile``, after a one-off compilation of tens of seconds), ``"triton"``
            (hand-written fused kernels for CUDA tensors; needs ``triton``), or ``"reference"``
            (the literal transcription of the specification, one tensor at a time; slow, for
            checking).
        chunk_elements: parameter elements the batched update processes at once (bounds the
            temporary memory; ``None``: the backend's default).
        moment_dtype: storage dtype of the per-element accumulators (momenta and second moment):
            ``torch.float32`` (default) or ``torch.bfloat16`` (16 -> 8 bytes of state per
            parameter; arithmetic stays float32; see the README for the accuracy cost).

    A param group may set ``"fresh": True`` (default ``False``) for tensors newly initialised on a
    pretrained model, such as a new classifier head: they take no gradient-scale gain and do not
    count towards it (:mod:`celo_hf.fresh_tensors`); :func:`create` sets it for a ``transformers``
    model's newly initialised tensors.

    The training loss must reach every step: ``step(loss=...)``, a closure, or ``set_loss()``.
    Parameters whose ``.grad`` is ``None`` are left alone (the reference fed zeros instead). A step
    whose loss or gradients are not finite is skipped entirely and counted in ``skipped_steps``.

    The ``torch.optim`` contract holds (tests/test_optim_contract.py): hooks, ``state_dict`` round
    trips, ``copy.deepcopy`` / pickling, ``torch.compile``d training steps (``step`` runs eagerly, a
    graph break). Parameters are updated with float32 arithmetic whatever their dtype; complex
    parameters are refused; a zero gradient still moves a parameter (as in the original).
    """

    #: Rebuilt on first use, never copied or pickled: per-device weights, stacked state, and a pending
    #: ``set_loss()`` value (it belongs to the original's gradients).
    _caches: ClassVar[dict[str, Callable[[], Any]]] = {"_update_weights": dict, "_stacks": StateStacks, "_pending_loss": lambda: None}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        total_steps: int | None = None,
        weights: CeloNet | str | Path | None = None,
        lr: float | torch.Tensor = 1.0,
        weight_decay: float = 0.0,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        backend: Backend = "auto",
        chunk_elements: int | None = None,
        moment_dtype: torch.dtype = torch.float32,
    ) -> None:
        check_lr(lr, "Celo's lr multiplies its learned step")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (expected a finite number >= 0)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16, got {moment_dtype}")
        if chunk_elements is not None and not (isinstance(chunk_elements, int) and chunk_elements > 0):
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        super().__init__(params, {"lr": lr, "weight_decay": float(weight_decay), FRESH: False})
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            if not p.is_floating_point():
                raise TypeError(f"Celo optimizes floating-point parameters, got one of dtype {p.dtype}")
        self.net = load_celo_net(weights, revision=revision, token=token, cache_dir=cache_dir)
        self.net.float().eval().requires_grad_(False)
        if backend != "auto":
            backends.get(backend).prepare(RuleConfig.of(self.net))  # a missing compiler shows here, not in the first step
        self.backend = backend
        self._auto_backends: dict[str, str] = {}  # what "auto" runs, by device type
        self.chunk_elements = chunk_elements
        self.moment_dtype = moment_dtype
        self.total_steps = total_steps
        self.skipped_steps = 0
        self._scheduler: SchedulerState | None = None  # from the first step on
        self._run_gain: torch.Tensor | None = None  # a "model_start" gradient-scale gain, from the first step on
        self._decays: tuple[int, torch.Tensor] | None = None  # (total_steps, the loss buffer's decays)
        self._pending_loss: PendingLoss | None = None
        self._update_weights: dict[tuple[torch.device, int], UpdateWeights] = {}
        self._stacks = StateStacks()
        self._warned_past_end = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, with the group's ``fresh`` checked to be a bool (also for the constructor's groups)."""
        super().add_param_group(param_group)
        fresh = self.param_groups[-1][FRESH]
        if not isinstance(fresh, bool):
            self.param_groups.pop()
            raise TypeError(f"a param group's {FRESH!r} must be True or False, got {fresh!r}")

    # ---- copies and pickles ----------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        """:class:`~celo_hf.optim_contract.Copyable`'s, and param groups saved before ``weight_decay``
        or ``fresh`` existed get the defaults."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_decay", self.defaults["weight_decay"])
            group.setdefault(FRESH, False)

    # ---- configuration -------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        """Steps taken (skipped steps not counted)."""
        return 0 if self._scheduler is None else self._scheduler.iteration

    @property
    def total_steps(self) -> int | None:
        """The planned number of steps (``None`` until known)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"total_steps must be a positive int (the planned number of optimizer steps), got {value!r}")
        self._total_steps = value

    @torch.compiler.disable
    def set_loss(self, loss: LossLike) -> None:
        """Hand over the training loss for the step about to be taken on the current gradients.

        The next ``step()`` uses it once. It is dropped by :meth:`zero_grad` and when the
        parameters' gradients are replaced (set to ``None`` or recomputed into new tensors), so that
        a step which GradScaler or Accelerate skipped (``step()`` never called) cannot hand its
        loss to a later step.
        """
        self._pending_loss = PendingLoss.of(loss, self._params())

    @torch.compiler.disable
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; it also drops a :meth:`set_loss` value (it went with those gradients)."""
        self._pending_loss = None
        super().zero_grad(set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ---- the step ------------------------------------------------------------------------------

    # Under torch.compile the step runs eagerly (a graph break): dynamo would drop the scheduler
    # state the step assigns, and the step synchronises with the host once anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, loss: LossLike | None = None) -> Any:  # type: ignore[override]
        """One Celo step. The loss is taken from ``loss``, else the closure's return value, else
        :meth:`set_loss`. Returns the closure's loss (``None`` without a closure)."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        pending, self._pending_loss = self._pending_loss, None
        fed = step_loss(loss, closure_loss, pending, self._params())
        if self.total_steps is None:
            raise RuntimeError(
                "Celo.total_steps is not set: give Celo(..., total_steps=N) or set optimizer.total_steps = N "
                "(the planned number of optimizer steps) before the first step"
            )

        work: list[WorkItem] = []
        for group in self.param_groups:
            lr = float(group["lr"])  # a tensor lr (torch's convention) is read once per group and step
            work += [
                work_item(p, lr, group["weight_decay"], group.get(FRESH, False))
                for p in group["params"]
                if p.grad is not None and p.numel() > 0
            ]
        if not work:
            return closure_loss
        device = work[0].local.device
        loss_t = torch.as_tensor(fed, dtype=torch.float32).to(device).reshape(())
        decayed = [item for item in work if item.weight_decay != 0]
        if decayed:
            loss_t = loss_t + weight_decay_penalty(decayed, device)
        if not all_finite([item.grad for item in work], loss_t, process_group(work)):
            self.skipped_steps += 1
            warnings.warn(
                f"Celo skipped step {self.iteration}: the loss or a gradient is NaN or infinite "
                f"(parameters and optimizer state left unchanged; {self.skipped_steps} step(s) skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            return closure_loss

        lr_mult = self._schedule(loss_t, device)
        gained = fresh_mult = lr_mult  # the multipliers of the tensors not marked fresh and of the fresh ones
        if self.net.gain_in_use("model_start"):
            if self._run_gain is None:
                self._run_gain = first_step_gain(work, self.net)
            gained, fresh_mult = model_start_scales(lr_mult, self._run_gain.to(device), self.net.fresh_gain)
        num_decays = len(self.net.momentum_decays)
        for item in work:
            if not self.state[item.param]:
                self.state[item.param].update(
                    init_tensor_state(
                        item.local.shape, num_decays, item.local.device, item.param.shape, self.moment_dtype
                    )
                )
        gains = gradient_scale_gains(work, self.net)
        chunk_elements = self.chunk_elements or backends.get(self._backend_on(device)).chunk_elements
        for batch in batches(work, chunk_elements):
            on = batch[0].local.device
            update_work_(
                batch, [self.state[item.param] for item in batch], self._stacks, step_scales(batch, fresh_mult, gained, gains),
                self._weights_on(on, len(batch)), self._backend_on(on), self.chunk_elements,
            )
        return closure_loss

    def _schedule(self, loss: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Take in the step's loss (the scheduler state is created on the first step); return
        ``lr_mult`` ``(1,)`` on ``device``."""
        total = self.total_steps
        assert total is not None
        if self.iteration >= total and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"Celo is running past total_steps={total} (step {self.iteration}); it continues as the "
                "reference does, with its progress feature above 1",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._scheduler is None:
            self._scheduler = SchedulerState.init(tuple(t.to(device) for t in self.net.to(device).initial_state()))
        if self._decays is None or self._decays[0] != total:
            self._decays = (total, loss_buffer_decays(torch.tensor(total)).to(device))
        schedule = self.net.schedule if self.net.learned_schedule else None
        lr_mult, self._scheduler = self._scheduler.update(loss, total, schedule, self._decays[1])
        return lr_mult

    def _backend_on(self, device: torch.device) -> str:
        """The backend that updates tensors on ``device``: the one asked for, or for ``"auto"``
        :func:`celo_hf.backends.auto`'s choice (once per device type; a warning if it passed over
        a faster one, e.g. the C++ kernels when they do not build here)."""
        if self.backend != "auto":
            return self.backend
        chosen = self._auto_backends.get(device.type)
        if chosen is None:
            chosen, passed_over = backends.auto(device, RuleConfig.of(self.net))
            if passed_over:
                warnings.warn(
                    f"Celo(backend='auto') falls back to the {chosen} kernels, several times slower on "
                    f"{device.type}: {'; '.join(passed_over)}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._auto_backends[device.type] = chosen
        return chosen

    def _weights_on(self, device: torch.device, batch: int) -> UpdateWeights:
        """The meta-model's weights on ``device`` for a batch of ``batch`` tensors (cached)."""
        key = (device, batch)
        if key not in self._update_weights:
            self._update_weights[key] = UpdateWeights.from_net(self.net, device).expand(batch)
        return self._update_weights[key]

    # ---- checkpointing -------------------------------------------------------------------------

    @torch.compiler.disable
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``"celo"`` entry with the global state.

        Only tensors, ints and lists: it loads with ``torch.load(weights_only=True)``. State-dict
        post-hooks see (and may change) the ``"celo"`` entry.
        """
        with hooks_set_aside(self, "_optimizer_state_dict_post_hooks") as (post_hooks,):
            state_dict = super().state_dict()  # runs the pre-hooks
        state_dict["state"] = {index: unshared(entries) for index, entries in state_dict["state"].items()}
        state_dict["celo"] = self._global_state()
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch.compiler.disable
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the one a load-state-dict pre-hook returns, if any; the
        post-hooks run once everything is restored). Per-parameter state keeps Celo's dtypes
        (float32, or ``moment_dtype`` for the momenta) whatever the parameter dtype (torch's loader
        would cast it to bf16 / fp16 parameters)."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        celo = state_dict.get("celo")
        if not isinstance(celo, dict):
            raise ValueError("not a Celo optimizer state dict: it has no 'celo' entry")
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        saved = {p: state_dict["state"][i] for i, p in zip(saved_ids, self._params()) if i in state_dict["state"]}
        dtypes = {p: self._saved_state_dtypes(p, entries) for p, entries in saved.items()}
        hooks = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
        with hooks_set_aside(self, *hooks) as (_, post_hooks):
            super().load_state_dict(state_dict)
        for p, entries in saved.items():
            device = local_tensor(p).device
            self.state[p] = {k: v.to(device=device, dtype=dtypes[p][k]) for k, v in entries.items()}
        self._restore_global_state(celo)
        for hook in post_hooks.values():
            hook(self)

    def _saved_state_dtypes(self, p: torch.Tensor, saved: Any) -> dict[str, torch.dtype]:
        """The dtype of each entry of Celo's state for ``p``; raises unless ``saved`` has exactly
        those entries with their shapes (or none: no step taken yet)."""
        if isinstance(saved, dict) and not saved:
            return {}
        local = local_tensor(p)
        expected = init_tensor_state(local.shape, len(self.net.momentum_decays), "meta", p.shape, self.moment_dtype)
        want = {k: tuple(v.shape) for k, v in expected.items()}
        got = {k: tuple(v.shape) for k, v in saved.items()} if isinstance(saved, dict) else saved
        if got != want:
            raise ValueError(
                f"saved Celo state for a parameter of shape {tuple(p.shape)} has entries {got}, "
                f"expected {{{', '.join(f'{k!r}: {v}' for k, v in want.items())}}}"
            )
        return {k: v.dtype for k, v in expected.items()}

    def _global_state(self) -> dict[str, Any]:
        """The state dict's ``"celo"`` entry: step counts, and the scheduler's state once it has one."""
        celo: dict[str, Any] = {
            "iteration": self.iteration,
            "total_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
        }
        if self._scheduler is not None:
            celo.update(self._scheduler.to_dict())
        if self._run_gain is not None:
            celo["run_gain"] = self._run_gain.clone()
        return celo

    def _restore_global_state(self, celo: dict[str, Any]) -> None:
        self.total_steps = celo["total_steps"]
        self.skipped_steps = int(celo["skipped_steps"])
        self._warned_past_end = False
        run_gain = celo.get("run_gain")
        self._run_gain = None if run_gain is None else torch.as_tensor(run_gain, dtype=torch.float32).to(self._params()[0].device)
        if "lstm_hidden" in celo:
            device = self._params()[0].device
            self._scheduler = SchedulerState.from_dict(celo, device)
            self.net.to(device)
        elif int(celo["iteration"]) == 0:
            self._scheduler = None
        else:
            raise ValueError(
                f"Celo state dict at iteration {celo['iteration']} has no scheduler state "
                "(loss_means, ..., lstm_cell): expected it after the first step"
            )


#: A param-group key :func:`create` sets on the decay group when ``weight_decay`` is left to
#: Trainer: ``CeloCallback`` then sets the group's ``weight_decay`` to ``TrainingArguments.weight_decay``.
WEIGHT_DECAY_FROM_ARGS = "weight_decay_from_args"
#: Parameter names ``transformers.Trainer`` (5.x) exempts from weight decay (with LayerNorm modules).
_NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def create(
    model: torch.nn.Module,
    total_steps: int | None = None,
    weights: CeloNet | str | Path | None = None,
    weight_decay: float | None = None,
    fresh: Iterable[str] | None = None,
    **kwargs: Any,
) -> tuple[Celo, LambdaLR]:
    """``(optimizer, scheduler)`` for ``transformers.Trainer(..., optimizers=create(model, total_steps))``.

    The optimizer is :class:`Celo` over the model's trainable parameters (``kwargs`` go to it) in
    Trainer's two groups: weights with ``weight_decay``, and biases and norm weights with none.
    ``weight_decay=None`` means 0 unless :class:`celo_hf.CeloCallback` is in the Trainer, which then
    applies ``TrainingArguments.weight_decay``; a number is used as given. The scheduler is a
    constant ``LambdaLR`` so that nothing rescales Celo's own learned schedule.

    ``fresh``: names of parameters newly initialised on a pretrained model (a new head), put in
    groups of their own marked ``"fresh"`` (no gradient-scale gain, :mod:`celo_hf.fresh_tensors`);
    ``None`` (default): the tensors ``from_pretrained`` initialised
    (:func:`celo_hf.fresh_tensors.newly_initialised`; none for a model built from a config).

    The optimizer records the model's training losses itself (a forward hook,
    :mod:`celo_hf.loss_recording`), so a training loop need not hand it the loss. When ``step()``
    gets none (no ``loss=``, closure or ``set_loss()``), the step's loss is, on each process, the
    sum over the training forwards since the previous step of their ``loss`` output: as it is for a
    forward given ``num_items_in_batch`` (normalised over the accumulated batch), else divided by
    the number of those forwards; then averaged over processes when ``torch.distributed`` is
    initialised. That is Trainer's logged loss, divided by the world size for a model normalising by
    ``num_items_in_batch`` with ``average_tokens_across_devices`` (Trainer's defaults for causal
    LMs); Celo's scheduler reads ratios of loss differences, which one constant factor leaves
    unchanged. With :class:`celo_hf.CeloCallback` in the Trainer the loss fed is exactly Trainer's
    logged loss.
    """
    fresh_names = newly_initialised(model) if fresh is None else set(fresh)
    groups = trainer_parameter_groups(model, weight_decay, fresh=fresh_names)
    optimizer = Celo(groups, total_steps=total_steps, weights=weights, **kwargs)
    recorder = recorder_for(model)
    optimizer.register_step_pre_hook(recorder.feed)
    optimizer.register_step_post_hook(recorder.clear_after_step)
    return optimizer, LambdaLR(optimizer, lambda _: 1.0)


def trainer_parameter_groups(
    model: torch.nn.Module, weight_decay: float | None, named: bool = False, fresh: Collection[str] = ()
) -> list[dict[str, Any]]:
    """The trainable parameters in ``Trainer.create_optimizer``'s groups: decay (``weight_decay``;
    ``None``: 0 and marked :data:`WEIGHT_DECAY_FROM_ARGS`), then no decay; empty groups left out.
    ``named``: each group's ``params`` as ``(name, parameter)`` pairs (torch's named parameters).
    ``fresh``: parameter names split off into groups of their own (after the others, decay then
    no decay) marked ``"fresh": True``; a name that is not a trainable parameter is an error."""
    from torch.nn import LayerNorm
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = set(get_parameter_names(model, [LayerNorm], list(_NO_DECAY_NAME_PATTERNS)))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
    unknown = set(fresh) - {name for name, _ in trainable}
    if unknown:
        raise ValueError(f"fresh names {sorted(unknown)} are not trainable parameters of {type(model).__name__}")
    decay_options: dict[str, Any] = (
        {"weight_decay": 0.0, WEIGHT_DECAY_FROM_ARGS: True} if weight_decay is None else {"weight_decay": weight_decay}
    )
    groups = []
    for is_fresh in (False, True):
        for decays, options in ((True, decay_options), (False, {"weight_decay": 0.0})):
            members = [
                (name, p) if named else p
                for name, p in trainable
                if (name in decay_names) == decays and (name in fresh) == is_fresh
            ]
            if members:
                groups.append({"params": members, **options, **({FRESH: True} if is_fresh else {})})
    return groups
