"""Recording and drawing training-loss curves (shared by finetune.py and compare.py)."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402


@dataclass
class LossCurve:
    """Training loss per optimizer step and the wall-clock seconds each step took."""

    label: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    def smoothed(self, window: int) -> list[float]:
        """Trailing mean over ``window`` logged losses (shorter at the start)."""
        sums = [0.0]
        for loss in self.losses:
            sums.append(sums[-1] + loss)
        return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(self.losses))]

    def seconds_per_step(self) -> float:
        """Median wall-clock seconds of one optimizer step (forward, backward and update)."""
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2] if ordered else float("nan")

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss", "step_seconds"])
            writer.writerows(zip(self.steps, self.losses, self.step_seconds))


class LossCurveCallback(TrainerCallback):
    """Fills a :class:`LossCurve` from Trainer's logs (``logging_steps=1`` gives every step)."""

    def __init__(self, label: str) -> None:
        self.curve = LossCurve(label)
        self._step_start = 0.0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step_start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.curve.step_seconds.append(time.perf_counter() - self._step_start)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.curve.steps.append(state.global_step)
            self.curve.losses.append(float(logs["loss"]))


def plot_curves(curves: list[LossCurve], path: Path, title: str, window: int = 10) -> None:
    """Raw losses (faint) and their ``window``-step trailing mean, one colour per curve."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, curve in enumerate(curves):
        colour = f"C{index}"
        ax.plot(curve.steps, curve.losses, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(curve.steps, curve.smoothed(window), color=colour, linewidth=1.8, label=curve.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss ({window}-step mean; raw faint)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
