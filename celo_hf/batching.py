"""From an optimizer's parameters to the driver's batches.

:class:`celo_hf.Celo` turns each parameter with a gradient into a :class:`WorkItem` (FSDP2's
row-sharded DTensors become their local rows), groups them (:func:`batches`: each large tensor
alone, small tensors of one shape together) and updates each group with :func:`update_work_`
through :func:`celo_hf.driver.update_batch_`. Small tensors' state is kept stacked from step to
step (:class:`StateStacks`), each parameter's entries being views of its rows. Also here: what
the parameters add to the step's inputs, the weight-decay loss term and the gradient-scale gains.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from .driver import SMALL_TENSOR_ELEMENTS, update_batch_
from .layout import RowSharding, TensorState, UpdateWeights, state_shape
from .network import CeloNet
from .step_gain import model_start_gain, row_norms, step_gain


class WorkItem(NamedTuple):
    """One parameter to update: ``param`` (the state key; a DTensor under FSDP2), the tensors to
    compute with (``local``, ``grad``: this process's rows when sharded), its group's ``lr`` and
    ``weight_decay``, how its rows are sharded (``None``: not sharded), and whether its group is
    ``fresh`` (newly initialised on a pretrained model: no gradient-scale gain, :mod:`celo_hf.fresh_tensors`)."""

    param: torch.Tensor
    local: torch.Tensor
    grad: torch.Tensor
    lr: float
    weight_decay: float
    sharding: RowSharding | None
    fresh: bool = False


def work_item(param: torch.Tensor, lr: float, weight_decay: float, fresh: bool = False) -> WorkItem:
    """Unwrap a parameter (with a gradient) for the update; FSDP2's row-sharded DTensors become their local rows."""
    grad = param.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError("Celo does not support sparse gradients")
    if not isinstance(param, DTensor):
        return WorkItem(param, param, grad, lr, weight_decay, None, fresh)
    local_grad = grad.to_local() if isinstance(grad, DTensor) else grad
    mesh, placements = param.device_mesh, tuple(param.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return WorkItem(param, param.to_local(), local_grad, lr, weight_decay, None, fresh)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise RuntimeError(
            f"Celo supports DTensor parameters sharded on their first axis over a 1-D mesh (FSDP2's default), "
            f"got placements {placements} on a {mesh.ndim}-D mesh for a parameter of shape {tuple(param.shape)}"
        )
    sharding = RowSharding(param.shape[0], mesh.get_group())
    return WorkItem(param, param.to_local(), local_grad, lr, weight_decay, sharding, fresh)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This process's part of ``param`` (itself unless a DTensor)."""
    return param.to_local() if isinstance(param, DTensor) else param


def process_group(work: list[WorkItem]) -> object | None:
    """The group whose processes must agree on skipping a step: the sharding group, if any."""
    return next((item.sharding.group for item in work if item.sharding is not None), None)


def weight_decay_penalty(work: list[WorkItem], device: torch.device) -> torch.Tensor:
    """``sum(weight_decay * sum(p**2))`` over ``work`` (float32 scalar on ``device``), the L2 term
    the original's wrapper adds to the loss; row-sharded tensors' sums are completed across
    processes (one all-reduce), so that every process feeds its scheduler the same loss."""

    def penalty(items: list[WorkItem]) -> torch.Tensor:
        terms = [item.weight_decay * item.local.detach().float().square().sum().to(device) for item in items]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=device)

    sharded = [item for item in work if item.sharding is not None]
    if not sharded:
        return penalty(work)
    shards = penalty(sharded)
    torch.distributed.all_reduce(shards, group=sharded[0].sharding.group)
    return penalty([item for item in work if item.sharding is None]) + shards


def tensor_norms(work: list[WorkItem]) -> torch.Tensor:
    """``(len(work), 2)`` float32 on the first item's device: each parameter's ``||g||`` and
    ``||p||``; sharded tensors' norms are completed across their group."""
    squares = []
    for item in work:
        pair = torch.cat([row_norms(t.reshape(1, -1)) for t in (item.grad, item.local)]).square()
        if item.sharding is not None:
            torch.distributed.all_reduce(pair, group=item.sharding.group)
        squares.append(pair)
    return torch.stack([pair.to(work[0].local.device) for pair in squares]).sqrt()


def gradient_scale_gains(work: list[WorkItem], net: CeloNet) -> dict[torch.Tensor, torch.Tensor] | None:
    """Each parameter's ``"tensor"``-signal gradient-scale gain (:mod:`celo_hf.step_gain`; 1 for
    ``fresh`` items), 0-d float32 on its device, or ``None`` when ``net`` has none of that signal."""
    if not net.gain_in_use("tensor"):
        return None
    norms = tensor_norms(work)
    gains = step_gain(norms[:, 0], norms[:, 1], net.gain_threshold, net.gain_power)
    gains = torch.where(torch.tensor([item.fresh for item in work], device=gains.device), torch.ones_like(gains), gains)
    return {item.param: gain.to(item.local.device) for item, gain in zip(work, gains)}


def first_step_gain(work: list[WorkItem], net: CeloNet) -> torch.Tensor:
    """The ``"model_start"`` gain (:func:`celo_hf.step_gain.model_start_gain`) of ``work`` at the
    run's first step, ``fresh`` items left out (they carry no evidence of pretraining; 1 when every
    item is fresh): ``(1,)`` float32 on the first item's device."""
    assert net.gain_threshold is not None
    evidence = [item for item in work if not item.fresh]
    if not evidence:
        return torch.ones(1, device=work[0].local.device)
    norms = tensor_norms(evidence)
    return model_start_gain(norms[:, 0], norms[:, 1], net.gain_threshold, net.gain_power).reshape(1)


def batches(work: list[WorkItem], chunk_elements: int) -> list[list[WorkItem]]:
    """Group work for :func:`update_work_`: each large or sharded tensor alone, small ones with
    others of the same shape, dtype and device (at most ``chunk_elements`` in all)."""
    grouped: list[list[WorkItem]] = []
    open_batches: dict[tuple[Any, ...], list[WorkItem]] = {}
    for item in work:
        p = item.local
        if item.sharding is not None or (p.numel() > SMALL_TENSOR_ELEMENTS and p.is_contiguous()):
            grouped.append([item])
            continue
        key = (tuple(p.shape), p.dtype, p.device)
        batch = open_batches.get(key)
        if batch is None or (len(batch) + 1) * p.numel() > max(chunk_elements, p.numel()):
            batch = open_batches[key] = []
            grouped.append(batch)
        batch.append(item)
    return grouped


class StateStacks:
    """The state of batches of small tensors, stacked ``(B, ...)`` and kept from step to step;
    each parameter's state entries are views of its rows, so the update writes them in place."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, ...], tuple[TensorState, list[TensorState]]] = {}

    def stacked(self, batch: list[WorkItem], states: list[TensorState]) -> TensorState:
        """The stacked state of ``batch`` (``states``: its parameters' state dicts, in order). It is
        rebuilt (copying the entries in, and making them views) when the batch or any entry changed,
        e.g. after ``load_state_dict``."""
        key = tuple(id(item.param) for item in batch)
        held = self._held.get(key)
        if held is not None and all(s[k] is view for s, views in zip(states, held[1]) for k, view in views.items()):
            return held[0]
        stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        views = [{k: v[i] for k, v in stacked.items()} for i in range(len(batch))]
        for s, row in zip(states, views):
            s.update(row)
        members = set(key)
        self._held = {other: v for other, v in self._held.items() if members.isdisjoint(other)}
        self._held[key] = (stacked, views)
        return stacked


def unshared(entries: Any) -> Any:
    """A parameter's state entries as independent tensors: those that are views of a stacked
    buffer (:class:`StateStacks`) are copied. Other values (torch allows any in
    ``optimizer.state``) pass through."""
    if not isinstance(entries, dict):
        return entries
    return {k: v.clone() if isinstance(v, torch.Tensor) and v._base is not None else v for k, v in entries.items()}


def update_work_(
    batch: list[WorkItem],
    states: list[TensorState],
    stacks: StateStacks,
    scale: torch.Tensor,
    weights: UpdateWeights,
    backend: str,
    chunk_elements: int | None,
) -> None:
    """Update the same-shaped tensors of ``batch`` together (``states``: their state dicts):
    a large contiguous (or sharded) tensor through views of itself, small ones stacked (parameters
    copied in and back; their state stays stacked in ``stacks``). ``scale``: ``(B,)`` each
    tensor's step multiplier; ``weights``: the meta-model's, expanded to ``B`` rows."""
    locals_ = [item.local for item in batch]
    shape = state_shape(locals_[0].shape)
    if len(batch) == 1 and locals_[0].is_contiguous():
        item = batch[0]
        state = {key: value.unsqueeze(0) for key, value in states[0].items()}
        update_batch_(
            item.local.view(1, *shape), _gradient(item).reshape(1, *shape), state, scale, weights,
            backend, chunk_elements, item.sharding,
        )
        return
    p = torch.stack([t.reshape(shape) for t in locals_])
    g = torch.stack([_gradient(item).reshape(shape) for item in batch])
    update_batch_(p, g, stacks.stacked(batch, states), scale, weights, backend, chunk_elements)
    torch._foreach_copy_(locals_, [row.view_as(t) for row, t in zip(p.unbind(0), locals_)])


def _gradient(item: WorkItem) -> torch.Tensor:
    """The gradient the update sees: ``grad + weight_decay * param`` (the original's L2 wrapper)."""
    return item.grad if item.weight_decay == 0 else torch.add(item.grad, item.local, alpha=item.weight_decay)


def step_scales(
    batch: list[WorkItem], fresh_mult: torch.Tensor, gained: torch.Tensor, gains: dict[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Each tensor's step multiplier ``(B,)`` float32 on the batch's device: ``fresh_mult`` for the
    ``fresh`` items, ``gained`` for the others (both ``(1,)``: the scheduler's ``lr_mult`` times
    :func:`celo_hf.step_gain.model_start_scales`' gains, if any), times its group's ``lr``, times
    its ``"tensor"`` gain if any."""
    device = batch[0].local.device
    kinds = {(item.lr, item.fresh) for item in batch}
    if len(kinds) == 1:  # the usual case: one multiply, broadcast
        lr, fresh = kinds.pop()
        scale = ((fresh_mult if fresh else gained).to(device) * lr).expand(len(batch))
    else:
        mults = torch.cat([fresh_mult if item.fresh else gained for item in batch]).to(device)
        scale = mults * torch.tensor([item.lr for item in batch], dtype=torch.float32, device=device)
    if gains is not None:
        scale = scale * torch.stack([gains[item.param] for item in batch]).to(device)
    return scale
