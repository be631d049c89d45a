"""Celo over a population of meta-models at once: the functional form meta-training runs.

Each of ``P`` members has its own meta-weights (a perturbed ``CeloNet``), its own inner-model
parameters and optimizer state, its own step counter and planned length. One :func:`update` advances
every member by one step. It runs exactly the code :class:`celo_hf.Celo` runs: the loss buffer and
progress features of :mod:`celo_hf.features`, ``CeloNet.schedule`` (called per member with its own
weights through ``torch.func.functional_call``), and the driver's :func:`celo_hf.driver.update_batch_`
with one row of weights per member.

Meta-weights are a "stacked state dict": ``CeloNet.state_dict()`` keys, each tensor with a leading
``P`` axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .features import LossBuffer, loss_buffer_decays, scheduler_inputs
from .network import CeloNet
from .driver import update_batch_
from .layout import TensorState, UpdateWeights, init_tensor_state, state_shape
from .step_gain import row_norms, step_gain

MetaWeights = dict[str, torch.Tensor]


@dataclass
class PopulationState:
    """Optimizer state of ``P`` members (state as data; every tensor has a leading ``P`` axis).

    ``iteration`` and ``total_steps`` are ``(P,)`` int64; ``hidden``/``cell`` ``(P, 1, H)``;
    ``tensors`` maps each inner-model tensor name to its stacked accumulators.
    """

    iteration: torch.Tensor
    total_steps: torch.Tensor
    loss_buffer: LossBuffer
    hidden: torch.Tensor
    cell: torch.Tensor
    tensors: dict[str, TensorState]


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
        iteration=torch.zeros(population, dtype=torch.int64, device=device),
        total_steps=total_steps.to(torch.int64),
        loss_buffer=LossBuffer.init((population,), device),
        hidden=meta_weights["init_hidden"].clone(),
        cell=meta_weights["init_cell"].clone(),
        tensors=tensors,
    )


def reset_members(
    state: PopulationState, members: torch.Tensor, total_steps: torch.Tensor, meta_weights: MetaWeights
) -> PopulationState:
    """The state with the members selected by the ``(P,)`` bool mask ``members`` started afresh
    (zero accumulators, step 0, new ``total_steps``, the learned initial LSTM state)."""
    def pick(fresh: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(members.view(-1, *([1] * (old.dim() - 1))), fresh, old)

    fresh_buffer = LossBuffer.init(tuple(members.shape), members.device)
    return PopulationState(
        iteration=pick(torch.zeros_like(state.iteration), state.iteration),
        total_steps=pick(total_steps.to(torch.int64), state.total_steps),
        loss_buffer=LossBuffer(
            pick(fresh_buffer.means, state.loss_buffer.means),
            pick(fresh_buffer.running_min, state.loss_buffer.running_min),
            pick(fresh_buffer.count, state.loss_buffer.count),
        ),
        hidden=pick(meta_weights["init_hidden"], state.hidden),
        cell=pick(meta_weights["init_cell"], state.cell),
        tensors={
            name: {key: pick(torch.zeros_like(value), value) for key, value in accumulators.items()}
            for name, accumulators in state.tensors.items()
        },
    )


def update(
    state: PopulationState,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    loss: torch.Tensor,
    meta_weights: MetaWeights,
    net: CeloNet,
    backend: str = "eager",
) -> PopulationState:
    """One Celo step for every member: ``params`` (``name -> (P, *S)``) and the accumulators in
    ``state.tensors`` are updated in place; the new global state is returned.

    ``loss`` ``(P,)``: each member's training loss at the current parameters. ``net`` supplies the
    configuration and serves as the template module for the members' meta-weights. ``backend``:
    a registered backend's name (:data:`celo_hf.backends.REGISTRY`).
    """
    decays = loss_buffer_decays(state.total_steps)
    loss_buffer = state.loss_buffer.update(loss.float(), decays)
    hidden, cell = state.hidden, state.cell
    if net.learned_schedule:
        fraction = (state.iteration.double() / state.total_steps.double()).float()
        inputs = scheduler_inputs(loss_buffer, fraction, decays)[:, None]
        # One call per member: nn.LSTMCell has no vmap batching rule.
        scheduler = _Scheduler(net)
        results = [
            functional_call(scheduler, {f"net.{k}": v[i] for k, v in meta_weights.items()}, (inputs[i], hidden[i], cell[i]))
            for i in range(loss.shape[0])
        ]
        lr_mult = torch.cat([r[0] for r in results])
        hidden = torch.stack([r[1][0] for r in results])
        cell = torch.stack([r[1][1] for r in results])
    else:
        lr_mult = torch.ones_like(loss, dtype=torch.float32)
    layers = [
        (meta_weights[f"mlp.{i}.weight"], meta_weights[f"mlp.{i}.bias"])
        for i, module in enumerate(net.mlp)
        if isinstance(module, nn.Linear)
    ]
    weights = UpdateWeights.from_mlp_layers(net, layers, loss.device)
    for name, p in params.items():
        shape = (p.shape[0], *state_shape(p.shape[1:]))
        scale = lr_mult
        if net.gain_threshold is not None:
            norms = (row_norms(t.reshape(shape[0], -1)) for t in (grads[name], p))
            scale = lr_mult * step_gain(*norms, net.gain_threshold, net.gain_power)
        update_batch_(p.view(shape), grads[name].reshape(shape), state.tensors[name], scale, weights, backend)
    return PopulationState(state.iteration + 1, state.total_steps, loss_buffer, hidden, cell, state.tensors)
