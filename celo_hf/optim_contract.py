"""The ``torch.optim`` contract pieces ``Celo`` and ``Celo2`` share: copies and pickles that can
step, torch's ``lr`` checks, and running torch's state-dict code with the hooks held back."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

#: torch's hook registries: a copy or pickle of an optimizer leaves them out, as torch's own does.
_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class Copyable:
    """Mixin (before ``torch.optim.Optimizer``) for an optimizer with more than torch's three
    attributes: ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep everything it needs to step.

    torch's own ``__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``. Left out
    here: torch's hooks, the entries of ``_caches`` (name -> factory of the empty value, rebuilt on
    first use) and wrappers other code installed over the class's methods (an LR scheduler's around
    ``step``, which would call the original optimizer).
    """

    _caches: ClassVar[dict[str, Callable[[], Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in _HOOKS and k not in self._caches and not hasattr(type(self), k)
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and torch's ``load_state_dict`` (which passes ``state`` and ``param_groups``):
        empty hooks and caches where absent."""
        super().__setstate__(state)  # type: ignore[misc]
        for name, empty in self._caches.items():
            self.__dict__.setdefault(name, empty())


@contextlib.contextmanager
def hooks_set_aside(optimizer: torch.optim.Optimizer, *names: str) -> Iterator[tuple[OrderedDict, ...]]:
    """Run torch's own state-dict code without the hooks registered under ``names``; yields them,
    for the optimizer to run itself once its own entries are in place."""
    held = tuple(getattr(optimizer, name) for name in names)
    for name in names:
        setattr(optimizer, name, OrderedDict())
    try:
        yield held
    finally:
        for name, hooks in zip(names, held):
            setattr(optimizer, name, hooks)


def check_lr(lr: Any, meaning: str) -> None:
    """torch's checks of ``lr``, with its wording (``torch.optim.Adam``); ``meaning`` says what the
    optimizer's ``lr`` is, in the error for a negative or non-finite value."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got dtype {lr.dtype}")
        value = float(lr)
    elif isinstance(lr, (int, float)):
        value = float(lr)
    else:
        raise TypeError(f"lr must be a number or a 1-element tensor, got {type(lr).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid learning rate: {lr} ({meaning}: expected a finite number >= 0)")
