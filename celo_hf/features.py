"""Celo's per-step *global* features: training progress and the loss buffer.

These feed the learned scheduler (an LSTM, see :mod:`celo_hf.network`). They do not depend on
gradients or parameters, so they are computed once per optimizer step, not once per tensor.
Everything is float32, as in the reference; the section numbers refer to
``docs/celo-algorithm.md`` (§5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Centres ``tau`` of the nine ``tanh(10 * (fraction_trained - tau))`` progress features.
PROGRESS_CENTRES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
#: Number of exponential moving averages of the loss kept by the loss buffer.
LOSS_BUFFER_SIZE = 10
#: Initial value of the loss buffer's running minimum (the reference's 999999999999.0, in float32).
RUNNING_MIN_INIT = 999999999999.0
#: Width of the scheduler input: 9 progress features followed by 9 loss features.
SCHEDULER_INPUT_SIZE = len(PROGRESS_CENTRES) + LOSS_BUFFER_SIZE - 1


def progress_features(fraction_trained: torch.Tensor) -> torch.Tensor:
    """Nine ``tanh(10 * (fraction_trained - tau))`` features: ``(...,)`` float32 -> ``(..., 9)``.

    ``fraction_trained`` is completed steps / total steps (0 on the first update). Past the end it
    exceeds 1 and is not clamped, as in the reference.
    """
    centres = torch.tensor(PROGRESS_CENTRES, dtype=torch.float32, device=fraction_trained.device)
    return torch.tanh(10.0 * (fraction_trained[..., None] - centres))


def loss_buffer_decays(total_steps: torch.Tensor) -> torch.Tensor:
    """Decays ``exp(-1 / halflife)`` of the loss buffer: ``(...,)`` total steps -> ``(..., 10)`` float32.

    Half-lives are log-spaced from 10 to ``total_steps`` steps (they decrease if ``total_steps < 10``).
    """
    total = total_steps.to(torch.float64)[..., None]
    position = torch.arange(LOSS_BUFFER_SIZE, dtype=torch.float64, device=total.device) / (LOSS_BUFFER_SIZE - 1)
    halflife = 10.0 ** (1.0 + (torch.log10(total) - 1.0) * position)
    return torch.exp(-1.0 / halflife).to(torch.float32)


@dataclass
class LossBuffer:
    """Exponential moving averages of the training loss at ten time scales (state as data).

    Batched over leading axes ``...`` (one buffer per optimizer, or per population member):
    ``means`` and ``running_min`` ``(..., 10)`` float32, ``count`` ``(...)`` int64, the number of
    losses taken in. All updates are tensor arithmetic: no host synchronisation.
    """

    means: torch.Tensor
    running_min: torch.Tensor
    count: torch.Tensor

    @classmethod
    def init(cls, batch_shape: tuple[int, ...] = (), device: torch.device | str | None = None) -> LossBuffer:
        means = torch.zeros(*batch_shape, LOSS_BUFFER_SIZE, dtype=torch.float32, device=device)
        running_min = torch.full_like(means, RUNNING_MIN_INIT)
        return cls(means, running_min, torch.zeros(batch_shape, dtype=torch.int64, device=device))

    def update(self, loss: torch.Tensor, decays: torch.Tensor) -> LossBuffer:
        """Take in one loss per buffer (``(...)`` float32); returns the new buffer, ``self`` unchanged."""
        correction = 1.0 - decays.pow(self.count[..., None] + 1)
        # The first loss has no history to compare with; later ones are clamped against the largest
        # bias-corrected mean so a single spike cannot dominate the buffer.
        approx_max = torch.where(self.count == 0, loss, (self.means / correction).amax(-1))
        loss = torch.minimum(2.0 * approx_max.abs(), loss)[..., None]
        means = decays * self.means + (1.0 - decays) * loss
        running_min = torch.minimum(self.running_min, means / correction)
        return LossBuffer(means, running_min, self.count + 1)

    def features(self, decays: torch.Tensor) -> torch.Tensor:
        """Nine features in ``[-1, 1]``: how far each average sits above its running minimum,
        relative to the next slower average; zero for the first two updates. ``(..., 9)``."""
        corrected = self.means / (1.0 - decays.pow(self.count[..., None]))
        slower, faster, running_min = corrected[..., 1:], corrected[..., :-1], self.running_min[..., :-1]
        ratio = (faster - running_min) / torch.clamp(slower - running_min, min=1e-8)
        features = torch.clamp(ratio - 1.0, -1.0, 1.0)
        return torch.where(self.count[..., None] <= 2, torch.zeros_like(features), features)


def scheduler_inputs(buffer: LossBuffer, fraction_trained: torch.Tensor, decays: torch.Tensor) -> torch.Tensor:
    """The scheduler's input row(s): progress features then loss features, ``(..., 18)``."""
    return torch.cat([progress_features(fraction_trained), buffer.features(decays)], dim=-1)
