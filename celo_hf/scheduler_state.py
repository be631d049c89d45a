"""The learned scheduler's per-step state, as data: what turns each step's loss into ``lr_mult``.

One :class:`SchedulerState` per optimizer (no batch axis) or per population of meta-models (a
leading ``(P,)`` axis). Each step takes in one loss: the loss buffer is updated, its features and the
progress features (:mod:`celo_hf.features`) go through the LSTM scheduler, and ``lr_mult`` comes
out. :class:`celo_hf.Celo` and :mod:`celo_hf.population` both run :meth:`SchedulerState.update`
and both save the state through :meth:`SchedulerState.to_dict` / :meth:`SchedulerState.from_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .features import LossBuffer, loss_buffer_decays, scheduler_inputs

#: The LSTM scheduler's state ``(hidden, cell)``.
LstmState = tuple[torch.Tensor, torch.Tensor]
#: One scheduler step: ``(inputs (..., 1, 18), (hidden, cell)) -> (lr_mult, (hidden, cell))``, e.g.
#: :meth:`celo_hf.CeloNet.schedule`; ``lr_mult`` is ``(1,)`` without a batch axis, else ``(...)``.
Schedule = Callable[[torch.Tensor, LstmState], tuple[torch.Tensor, LstmState]]

#: Names of the saved entries: those of Celo's ``"celo"`` state-dict entry.
_BUFFER_KEYS = ("loss_means", "loss_running_min", "loss_count")
_LSTM_KEYS = ("lstm_hidden", "lstm_cell")
#: Older names of the LSTM entries (meta-training checkpoints written before this module), still read.
_LEGACY_LSTM_KEYS = ("hidden", "cell")


@dataclass(frozen=True)
class SchedulerState:
    """Steps taken, the loss buffer and the LSTM state, batched over leading axes ``...``.

    ``iteration``: a Python int for one optimizer (read on the host without a synchronisation),
    ``(...)`` int64 for a population. ``loss_buffer``: :class:`celo_hf.features.LossBuffer`.
    ``hidden``, ``cell``: ``(..., 1, H)`` float32.
    """

    iteration: int | torch.Tensor
    loss_buffer: LossBuffer
    hidden: torch.Tensor
    cell: torch.Tensor

    @classmethod
    def init(cls, initial_lstm: LstmState, iteration: int | torch.Tensor = 0) -> SchedulerState:
        """A fresh state from the learned initial LSTM state ``(hidden, cell)`` (``(..., 1, H)``,
        used as given, not copied); the batch axes ``...`` and the device are those of ``hidden``."""
        hidden, cell = initial_lstm
        return cls(iteration, LossBuffer.init(tuple(hidden.shape[:-2]), hidden.device), hidden, cell)

    def update(
        self, loss: torch.Tensor, total_steps: int | torch.Tensor, schedule: Schedule | None, decays: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SchedulerState]:
        """Take in one step's ``loss`` (``(...)`` float32, on the state's device); returns
        ``(lr_mult, new state)``, ``self`` unchanged.

        ``total_steps``: the planned number of steps (an int, or ``(...)`` int64). ``schedule``:
        the LSTM step; ``None`` (the meta-model has no learned schedule) leaves the LSTM state as it
        is and gives ``lr_mult = 1``. ``decays``: ``loss_buffer_decays(total_steps)`` on the
        state's device, when the caller keeps it (else it is computed here).
        """
        if decays is None:
            decays = loss_buffer_decays(torch.as_tensor(total_steps)).to(loss.device)
        buffer = self.loss_buffer.update(loss, decays)
        hidden, cell = self.hidden, self.cell
        if schedule is None:
            lr_mult = torch.ones(loss.shape or (1,), dtype=torch.float32, device=loss.device)
        else:
            inputs = scheduler_inputs(buffer, _fraction_trained(self.iteration, total_steps, loss.device), decays)
            lr_mult, (hidden, cell) = schedule(inputs[..., None, :], (hidden, cell))
        return lr_mult, SchedulerState(self.iteration + 1, buffer, hidden, cell)

    def to_dict(self) -> dict[str, Any]:
        """The state as a flat dict of copies (``iteration``, ``loss_means``, ``loss_running_min``,
        ``loss_count``, ``lstm_hidden``, ``lstm_cell``); loads with ``torch.load(weights_only=True)``."""
        iteration = self.iteration.clone() if isinstance(self.iteration, torch.Tensor) else self.iteration
        buffer = (self.loss_buffer.means, self.loss_buffer.running_min, self.loss_buffer.count)
        tensors = dict(zip(_BUFFER_KEYS + _LSTM_KEYS, (*buffer, self.hidden, self.cell)))
        return {"iteration": iteration} | {key: value.clone() for key, value in tensors.items()}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], device: torch.device | str | None = None) -> SchedulerState:
        """The state :meth:`to_dict` saved (or a checkpoint of before, whose LSTM entries are named
        ``hidden`` / ``cell``), on ``device`` (``None``: where the tensors are); float32 and int64
        whatever they were saved as."""
        lstm_keys = _LSTM_KEYS if _LSTM_KEYS[0] in saved else _LEGACY_LSTM_KEYS
        missing = [key for key in ("iteration", *_BUFFER_KEYS, *lstm_keys) if key not in saved]
        if missing:
            raise ValueError(
                f"saved scheduler state lacks {missing}: expected the entries iteration, "
                f"{', '.join(_BUFFER_KEYS + _LSTM_KEYS)} (got {sorted(saved)})"
            )
        f32 = lambda key: torch.as_tensor(saved[key]).to(device=device, dtype=torch.float32)  # noqa: E731
        iteration = saved["iteration"]
        if isinstance(iteration, torch.Tensor):
            iteration = iteration.to(device=device, dtype=torch.int64)
        else:
            iteration = int(iteration)
        count = torch.as_tensor(saved["loss_count"]).to(device=device, dtype=torch.int64)
        buffer = LossBuffer(f32("loss_means"), f32("loss_running_min"), count)
        return cls(iteration, buffer, f32(lstm_keys[0]), f32(lstm_keys[1]))


def _fraction_trained(iteration: int | torch.Tensor, total_steps: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``iteration / total_steps`` in float64, then float32 (``(...)`` on ``device``): the same
    bits whether the counts are ints or int64 tensors."""
    if isinstance(iteration, int) and isinstance(total_steps, int):
        return torch.tensor(iteration / total_steps, dtype=torch.float32, device=device)
    return (torch.as_tensor(iteration).double() / torch.as_tensor(total_steps).double()).float().to(device)
