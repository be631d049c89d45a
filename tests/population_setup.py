"""Shared set-up of the zero-noise population checks: every member of a meta-trainer's slot groups
stepped together (std 0, so "+" and "-" members are the same), then each member replayed alone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from meta_training.tasks import families_by_name
from meta_training.train import MetaTrainConfig, MetaTrainer, unflatten


@dataclass
class Member:
    """One slot of a group: its ``"+"`` row ``j`` and ``"-"`` row ``j + m`` (``m`` slots in the
    group), its family, a generator in the state its batches were drawn from, its starting tensors."""

    group: object
    j: int
    m: int
    slot: int
    family: object
    generator: torch.Generator
    start: dict[str, torch.Tensor]


def stepped_together(config: MetaTrainConfig, steps: int, init: nn.Module | None = None) -> tuple[MetaTrainer, list[Member]]:
    """A fresh trainer of ``config`` (three slot groups) after ``steps`` inner steps of all its
    members at once, and each member as it was before them."""
    trainer = MetaTrainer(config, families_by_name(config.families), init=init)
    trainer.counter.zero_()
    trainer.done[:] = False
    assert len(trainer.groups) == 3, [g.model.name for g in trainer.groups]
    start = [{k: v.clone() for k, v in g.params.items()} for g in trainer.groups]
    streams = [rng.generator.get_state() for rng in trainer.random]
    meta_weights = unflatten(trainer.theta.expand(2 * len(trainer.slots), -1), trainer.template)
    for _ in range(steps):
        trainer._inner_step(meta_weights)
    return trainer, list(_members(trainer, start, streams))


def _members(trainer: MetaTrainer, start: list[dict[str, torch.Tensor]], streams: list[torch.Tensor]) -> Iterator[Member]:
    for group, params0 in zip(trainer.groups, start):
        for j, slot in enumerate(group.local):
            generator = torch.Generator()
            generator.set_state(streams[slot])
            yield Member(group, j, len(group.local), slot, trainer._family(slot), generator, params0)
