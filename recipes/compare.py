"""Run the same fine-tune (recipes/finetune.py) with several optimizers; draw and tabulate the result.

    python recipes/compare.py                                  # the default fine-tune: Celo vs AdamW
    python recipes/compare.py --optimizers celo adamw_torch sgd --learning_rates 1e-5 3e-5 1e-4
    python recipes/compare.py --task causal-lm --max_steps 30  # any finetune.py argument

Every optimizer runs once per learning rate of its grid (for Celo: multipliers of its own steps,
1.0 being Celo as meta-trained); its best run (lowest final loss) counts as its tuned run. Writes
to ``--output_dir`` (default ``runs/compare``): ``compare.png`` (every Celo run and each other
optimizer's tuned run),
``compare.md`` (a table of every run) and each run's own folder (finetune.py's outputs).

In the table a run's final loss is the mean of its last ``FINAL_WINDOW`` losses, and its "steps to
reach" the tuned AdamW's final loss is the first step at which the mean of its last ``FINAL_WINDOW``
losses is at most that (``steps_to_reach``; full windows only, so one lucky early mini-batch never counts).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

import finetune
from loss_curve import LossCurve, plot_curves

#: Steps averaged for a run's "final loss" and for "steps to reach" (per mini-batch losses are noisy).
FINAL_WINDOW = 10


def window_means(losses: Sequence[float], window: int) -> list[float]:
    """Mean of every full run of ``window`` consecutive losses: entry ``i`` averages ``losses[i : i + window]``
    (``len(losses) - window + 1`` entries; a curve shorter than ``window`` gives the one mean of all of it)."""
    if not losses or window < 1:
        raise ValueError(f"window_means needs at least one loss and a window of at least 1, got {len(losses)} "
                         f"losses and window {window}")
    window = min(window, len(losses))
    return [sum(losses[i : i + window]) / window for i in range(len(losses) - window + 1)]


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float,
                   window: int = FINAL_WINDOW) -> int | None:
    """The first step at which the mean of the last ``window`` losses (full windows only, so never one noisy
    early loss) is at most ``target``, e.g. another run's final loss; ``None`` if it never is. ``steps`` and
    ``losses`` are parallel (one loss per logged step); a curve shorter than ``window`` is one window."""
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses must be parallel, got {len(steps)} steps and {len(losses)} losses")
    means = window_means(losses, window)
    ends = steps[len(steps) - len(means):]  # the step that closes each window
    return next((step for step, mean in zip(ends, means) if mean <= target), None)


@dataclass
class CompareArguments:
    optimizers: list[str] = field(default_factory=lambda: ["celo", "adamw_torch"],
                                  metadata={"help": "'celo' and/or transformers optimizer names"})
    learning_rates: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4, 1e-3],
                                        metadata={"help": "grid tried for every optimizer but Celo"})
    celo_lrs: list[float] = field(default_factory=lambda: [1.0, 0.3, 0.1, 0.03],
                                  metadata={"help": "multipliers of Celo's steps tried (1.0: as meta-trained)"})
    output_dir: str = "runs/compare"


@dataclass
class Run:
    name: str
    optim: str
    learning_rate: float
    curve: LossCurve
    metrics: dict[str, float]

    @property
    def final_loss(self) -> float:
        """Mean of the last ``FINAL_WINDOW`` losses."""
        return window_means(self.curve.losses, FINAL_WINDOW)[-1]


def tuned(runs: list[Run]) -> list[Run]:
    """For every optimizer, its run with the lowest final loss."""
    best: dict[str, Run] = {}
    for run in runs:
        if run.optim not in best or run.final_loss < best[run.optim].final_loss:
            best[run.optim] = run
    return list(best.values())


def markdown_table(runs: list[Run], reference: Run | None) -> str:
    """One row per run; "steps to reach" is ``steps_to_reach`` against ``reference``'s final loss (tuned AdamW):
    the first step at which the run's mean loss over the last ``FINAL_WINDOW`` steps is at most it."""
    target = f"{reference.name}'s final loss" if reference else "the reference's final loss"
    metric_names = sorted({k for run in runs for k in run.metrics if k in ("eval_loss", "eval_accuracy")})
    header = ["optimizer", f"final loss (last {FINAL_WINDOW} steps)",
              f"steps to reach {target} (first step whose last-{FINAL_WINDOW}-step mean is at most it)",
              "seconds / step", *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        reached = steps_to_reach(run.curve.steps, run.curve.losses, reference.final_loss) if reference else None
        cells = [run.name, f"{run.final_loss:.4f}", "never" if reached is None else str(reached),
                 f"{run.curve.seconds_per_step():.2f}", *(f"{run.metrics.get(m, float('nan')):.4f}" for m in metric_names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_one(finetune_argv: list[str], optim: str, learning_rate: float, out: Path) -> Run:
    """Fine-tune with ``optim`` at ``learning_rate`` (for Celo: the multiplier of its steps)."""
    lr_flag = "--celo_lr" if optim == "celo" else "--learning_rate"
    extra = ["--optim", optim, lr_flag, str(learning_rate), "--output_dir", str(out / f"{optim}_lr{learning_rate:g}")]
    curve, summary = finetune.train_and_evaluate(*finetune.parse_args(finetune_argv + extra))
    return Run(summary["optimizer"], optim, learning_rate, curve, summary)


def main(argv: list[str]) -> list[Run]:
    compare_args, finetune_argv = HfArgumentParser(CompareArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    out = Path(compare_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [
        run_one(finetune_argv, optim, lr, out)
        for optim in compare_args.optimizers
        for lr in (compare_args.celo_lrs if optim == "celo" else compare_args.learning_rates)
    ]
    best = tuned(runs)
    reference = next((run for run in best if run.optim.startswith("adamw")), None)
    plotted = [run for run in runs if run.optim == "celo"] + [run for run in best if run.optim != "celo"]
    plot_curves([run.curve for run in plotted], out / "compare.png", "fine-tuning: Celo vs tuned baselines")
    table = markdown_table(runs, reference)
    command = " ".join(["python recipes/compare.py", *argv])
    (out / "compare.md").write_text(f"`{command}`\n\n{table}")
    print(table, f"\nwrote {out / 'compare.png'} and {out / 'compare.md'}")
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
