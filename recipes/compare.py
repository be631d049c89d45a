"""Run the same fine-tune (recipes/finetune.py) with several optimizers; draw and tabulate the result.

    python recipes/compare.py                                  # the default fine-tune: Celo vs AdamW
    python recipes/compare.py --optimizers celo adamw_torch sgd --learning_rates 1e-5 3e-5 1e-4
    python recipes/compare.py --task causal-lm --max_steps 30  # any finetune.py argument

Every optimizer runs once per learning rate of its grid (for Celo: multipliers of its own steps,
1.0 being Celo as meta-trained); its best run (lowest final loss) counts as its tuned run. Writes
to ``--output_dir`` (default ``runs/compare``): ``compare.png`` (every Celo run and each other
optimizer's tuned run),
``compare.md`` (a table of every run) and each run's own folder (finetune.py's outputs).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

import finetune
from loss_curve import LossCurve, plot_curves

#: Steps averaged for a run's "final loss" (its training loss is per mini-batch, hence noisy).
FINAL_WINDOW = 10


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
        tail = self.curve.losses[-FINAL_WINDOW:]
        return sum(tail) / len(tail)


def steps_to_reach(curve: LossCurve, target: float) -> int | None:
    """First step at which the ``FINAL_WINDOW``-step trailing mean loss is at most ``target``."""
    return next((step for step, loss in zip(curve.steps, curve.smoothed(FINAL_WINDOW)) if loss <= target), None)


def tuned(runs: list[Run]) -> list[Run]:
    """For every optimizer, its run with the lowest final loss."""
    best: dict[str, Run] = {}
    for run in runs:
        if run.optim not in best or run.final_loss < best[run.optim].final_loss:
            best[run.optim] = run
    return list(best.values())


def markdown_table(runs: list[Run], reference: Run | None) -> str:
    """One row per run; "steps to reach" counts against ``reference``'s final loss (tuned AdamW)."""
    target = f"{reference.name}'s final loss" if reference else "the reference's final loss"
    metric_names = sorted({k for run in runs for k in run.metrics if k in ("eval_loss", "eval_accuracy")})
    header = ["optimizer", f"final loss (last {FINAL_WINDOW} steps)", f"steps to reach {target}", "seconds / step",
              *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        reached = steps_to_reach(run.curve, reference.final_loss) if reference else None
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
