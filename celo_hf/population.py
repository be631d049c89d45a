"""Celo over a population of meta-models at once: the functional form meta-training runs.

Each of ``P`` members has its own meta-weights (a perturbed ``CeloNet``), its own inner-model
parameters and optimizer state, its own step counter and planned length. One :func:`update` advances
every member by one step. It runs exactly the code :class:`celo_hf.Celo` runs: the scheduler state's
:meth:`celo_hf.scheduler_state.SchedulerState.update` (with ``CeloNet.schedule`` called per member
with its own weights through ``torch.func.functional_call``), and the driver's
:func:`celo_hf.driver.update_batch_` with one row of weights per member.

Meta-weights are a "stacked state dict": ``CeloNet.state_dict()`` keys, each tensor with a leading
``P`` axis.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .driver import update_batch_
from .layout import TensorState, UpdateWeights, init_tensor_state, state_shape
from .network import CeloNet
from .scheduler_state import LstmState, Schedule, SchedulerState
from .step_gain import model_start_gain, model_start_scales, row_norms, step_gain

MetaWeights = dict[str, torch.Tensor]


@dataclass
class PopulationState:
    """Optimizer state of ``P`` members (state as data; every tensor has a leading ``P`` axis).

    ``total_steps``: ``(P,)`` int64; ``scheduler``: the members' scheduler states (``iteration``
    ``(P,)``, LSTM state ``(P, 1, H)``); ``tensors`` maps each inner-model tensor name to its stacked
    accumulators; ``run_gain`` ``(P,)`` float32: each member's ``"model_start"`` gradient-scale gain
    (:mod:`celo_hf.step_gain`), set at its first step (1 before, and for other meta-models).
    """

    total_steps: torch.Tensor
    scheduler: SchedulerState
    tensors: dict[str, TensorState]
    run_gain: torch.Tensor

    def to_dict(self) -> dict[str, object]:
        """The state as a flat dict (the scheduler's entries, ``total_steps``, ``tensors``,
        ``run_gain``) for a checkpoint."""
        return self.scheduler.to_dict() | {"total_steps": self.total_steps, "tensors": self.tensors, "run_gain": self.run_gain}

    @classmethod
    def from_dict(cls, saved: dict[str, object]) -> PopulationState:
        """The state :meth:`to_dict` saved, or a meta-training checkpoint's state written before it
        (without ``run_gain``: gains of 1)."""
        total_steps: torch.Tensor = saved["total_steps"]  # type: ignore[assignment]
        run_gain = saved.get("run_gain", torch.ones(total_steps.shape, device=total_steps.device))
        return cls(total_steps, SchedulerState.from_dict(saved), saved["tensors"], run_gain)  # type: ignore[arg-type]


class _Scheduler(nn.Module):
    """``CeloNet.schedule`` as a module's ``forward``, so ``functional_call`` can swap in weights."""

    def __init__(self, net: CeloNet):
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor):  # noqa: D102
        return self.net.schedule(inputs, (hidden, cell))


def init(
    params: dict[str, torch.Tensor], total_steps: torch.Tensor, meta_weights: MetaWeights, net: CeloNet
) -> PopulationState:
    """Fresh state for ``P`` members with inner parameters ``params`` (``name -> (P, *S)``).

    ``total_steps`` ``(P,)``: each member's planned number of steps. ``net`` supplies the
    configuration (its own weights are not used).
    """
    population = total_steps.shape[0]
    device = total_steps.device
    num_decays = len(net.momentum_decays)
    tensors = {
        name: {key: value.unsqueeze(0).repeat(population, *([1] * value.dim())) for key, value in
               init_tensor_state(p.shape[1:], num_decays, device).items()}
        for name, p in params.items()
    }
    return PopulationState(
        total_steps=total_steps.to(torch.int64),
        scheduler=_fresh_scheduler(meta_weights, population, device),
        tensors=tensors,
        run_gain=torch.ones(population, device=device),
    )


def _fresh_scheduler(meta_weights: MetaWeights, population: int, device: torch.device) -> SchedulerState:
    initial_lstm = (meta_weights["init_hidden"].clone(), meta_weights["init_cell"].clone())
    return SchedulerState.init(initial_lstm, torch.zeros(population, dtype=torch.int64, device=device))


def reset_members(
    state: PopulationState, members: torch.Tensor, total_steps: torch.Tensor, meta_weights: MetaWeights
) -> PopulationState:
    """The state with the members selected by the ``(P,)`` bool mask ``members`` started afresh
    (zero accumulators, step 0, new ``total_steps``, the learned initial LSTM state)."""
    def pick(fresh: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(members.view(-1, *([1] * (old.dim() - 1))), fresh, old)

    fresh = _fresh_scheduler(meta_weights, members.shape[0], members.device).to_dict()
    old = state.scheduler.to_dict()
    return PopulationState(
        total_steps=pick(total_steps.to(torch.int64), state.total_steps),
        scheduler=SchedulerState.from_dict({key: pick(fresh[key], old[key]) for key in old}),
        tensors={
            name: {key: pick(torch.zeros_like(value), value) for key, value in accumulators.items()}
            for name, accumulators in state.tensors.items()
        },
        run_gain=pick(torch.ones_like(state.run_gain), state.run_gain),
    )


def update(
    state: PopulationState,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    loss: torch.Tensor,
    meta_weights: MetaWeights,
    net: CeloNet,
    backend: str = "eager",
    fresh: Collection[str] = (),
) -> PopulationState:
    """One Celo step for every member: ``params`` (``name -> (P, *S)``) and the accumulators in
    ``state.tensors`` are updated in place; the new global state is returned.

    ``loss`` ``(P,)``: each member's training loss at the current parameters. ``net`` supplies the
    configuration and serves as the template module for the members' meta-weights. ``backend``:
    a registered backend's name (:data:`celo_hf.backends.REGISTRY`). ``fresh``: the names of the
    tensors newly initialised on a pretrained model (a fine-tune's new head, its adapters), which
    step as :class:`celo_hf.Celo` steps param groups marked ``"fresh"`` (:mod:`celo_hf.fresh_tensors`).
    """
    unknown = sorted(set(fresh) - params.keys())
    if unknown:
        raise ValueError(f"fresh names {unknown} are not among the parameters {sorted(params)}")
    schedule = _member_schedules(net, meta_weights) if net.learned_schedule else None
    lr_mult, scheduler = state.scheduler.update(loss.float(), state.total_steps, schedule)
    layers = [
        (meta_weights[f"mlp.{i}.weight"], meta_weights[f"mlp.{i}.bias"])
        for i, module in enumerate(net.mlp)
        if isinstance(module, nn.Linear)
    ]
    weights = UpdateWeights.from_mlp_layers(net, layers, loss.device)
    run_gain = state.run_gain
    gained = fresh_mult = lr_mult  # the scales of the other tensors and of the fresh ones
    if net.gain_in_use("model_start"):
        first = state.scheduler.iteration == 0
        if bool(first.any()):  # only members at their first step need the norms
            run_gain = torch.where(first, _first_step_gains(params, grads, net, fresh), run_gain)
        gained, fresh_mult = model_start_scales(lr_mult, run_gain, net.fresh_gain)
    for name, p in params.items():
        shape = (p.shape[0], *state_shape(p.shape[1:]))
        scale = fresh_mult if name in fresh else gained
        if net.gain_in_use("tensor") and name not in fresh:
            norms = (row_norms(t.reshape(shape[0], -1)) for t in (grads[name], p))
            scale = lr_mult * step_gain(*norms, net.gain_threshold, net.gain_power)
        update_batch_(p.view(shape), grads[name].reshape(shape), state.tensors[name], scale, weights, backend)
    return PopulationState(state.total_steps, scheduler, state.tensors, run_gain)


def _first_step_gains(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], net: CeloNet,
                      fresh: Collection[str]) -> torch.Tensor:
    """Every member's ``"model_start"`` gain were this its first step, the ``fresh`` tensors left
    out (1 when every tensor is fresh): ``(P,)`` float32."""
    assert net.gain_threshold is not None
    evidence = {name: p for name, p in params.items() if name not in fresh}
    if not evidence:
        some = next(iter(params.values()))
        return torch.ones(some.shape[0], device=some.device)
    norms = [torch.stack([row_norms(t.reshape(t.shape[0], -1)) for t in (grads[name], p)]) for name, p in evidence.items()]
    grad_norms, param_norms = torch.stack(norms, dim=-1)  # each (P, tensors)
    return model_start_gain(grad_norms, param_norms, net.gain_threshold, net.gain_power)


def _member_schedules(net: CeloNet, meta_weights: MetaWeights) -> Schedule:
    """The scheduler step of every member with its own meta-weights: ``(P, 1, 18)`` inputs and
    ``(P, 1, H)`` LSTM states -> ``(P,)`` ``lr_mult`` and the new states."""
    scheduler = _Scheduler(net)

    def schedule(inputs: torch.Tensor, lstm: LstmState) -> tuple[torch.Tensor, LstmState]:
        hidden, cell = lstm
        # One call per member: nn.LSTMCell has no vmap batching rule.
        results = [
            functional_call(scheduler, {f"net.{k}": v[i] for k, v in meta_weights.items()}, (inputs[i], hidden[i], cell[i]))
            for i in range(inputs.shape[0])
        ]
        lr_mult = torch.cat([r[0] for r in results])
        return lr_mult, (torch.stack([r[1][0] for r in results]), torch.stack([r[1][1] for r in results]))

    return schedule
