"""Judge Celo (or Celo2) weights on the Trainer workloads (:mod:`meta_training.trainer_tasks`) against tuned AdamW.

Per task: Trainer's AdamW (``adamw_torch``, default linear schedule) runs once per learning rate of
the task's grid on seed 0; the lr with the lowest final training loss
(:func:`meta_training.eval_metrics.best_learning_rate`, the rule fixed before any run) is re-run on
every other seed; Celo (lr 1, nothing tuned) or Celo2 (lr 1e-3, constant, nothing tuned;
:mod:`meta_training.rules`) runs on every seed. Final training loss = mean of the
last :func:`~meta_training.eval_metrics.final_window` logged steps, averaged over seeds; FL =
AdamW's / Celo's (> 1 favours Celo). Also the held-out loss and accuracy, and the zero-gradient
drift of the weights on the task's model (:func:`celo_hf.diagnostics.zero_gradient_drift`; Celo
only, ``None`` for Celo2, whose steps are RMS-normalised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn
from tqdm import tqdm

from celo_hf.diagnostics import zero_gradient_drift

from . import eval_metrics as metrics
from .rules import RULES, Rule
from .trainer_tasks import (
    TrainerRun,
    TrainerTask,
    train_through_trainer,
    trainable_parameters,
)


@dataclass
class TrainerTaskResult:
    """Everything measured on one Trainer task (one run per seed for each optimizer)."""

    name: str
    description: str
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    final_window: int
    lr_sweep: dict[str, float]
    best_lr: float
    adamw: list[TrainerRun]
    celo: list[TrainerRun]
    adamw_final: float
    celo_final: float
    final_loss_ratio: float
    zero_gradient_drift: float | None


def final_loss(runs: Sequence[TrainerRun], window: int) -> float:
    """Seed-mean of each run's mean training loss over its last ``window`` steps."""
    return float(np.mean([metrics.final_mean(np.array(run.losses), window) for run in runs]))


def saved_adamw(saved: dict, seeds: int, steps: int) -> tuple[dict[float, float], float, list[TrainerRun]]:
    """``(final loss per lr, tuned lr, runs)`` of AdamW from an earlier ``results.json``'s entry for
    one task, checked to have been made with these ``steps``; its first ``seeds`` runs (fewer if it
    has fewer: the caller runs the missing seeds at the tuned lr)."""
    if saved["steps"] != steps:
        raise ValueError(f"task {saved['name']!r}: the saved AdamW runs have {saved['steps']} steps, expected {steps}")
    return ({float(lr): final for lr, final in saved["lr_sweep"].items()}, saved["best_lr"],
            [TrainerRun(**run) for run in saved["adamw"][:seeds]])


def evaluate_trainer_task(
    task: TrainerTask, net: nn.Module, seeds: int, steps: int | None, tiny: bool, bar: tqdm,
    rule: Rule = RULES["celo"], saved: dict | None = None,
) -> TrainerTaskResult:
    """Tune AdamW's lr on seed 0 and re-run it on the other seeds (or take the tuned lr and the runs
    there are from ``saved``, an earlier ``results.json``'s entry for the task, and run the seeds it
    lacks), run ``rule``'s optimizer on every seed, compare."""
    steps = steps or task.steps
    window = min(metrics.final_window(steps), steps)

    def run(learning_rate: float | None, seed: int) -> TrainerRun:
        bar.set_postfix_str(f"{task.name}: {rule.label if learning_rate is None else f'AdamW lr={learning_rate:g}'} seed {seed}")
        result = train_through_trainer(task, task.build(seed, tiny), learning_rate, seed, steps, weights=net, rule=rule)
        bar.update()
        return result

    if saved is None:
        sweep = {lr: run(lr, 0) for lr in task.learning_rates}
        sweep_final = {lr: final_loss([r], window) for lr, r in sweep.items()}
        best_lr = metrics.best_learning_rate(sweep_final)
        adam_runs = [sweep[best_lr]] + [run(best_lr, seed) for seed in range(1, seeds)]
    else:
        sweep_final, best_lr, adam_runs = saved_adamw(saved, seeds, steps)
        adam_runs += [run(best_lr, seed) for seed in range(len(adam_runs), seeds)]
    celo_runs = [run(None, seed) for seed in range(seeds)]
    adam_final, celo_final = final_loss(adam_runs, window), final_loss(celo_runs, window)
    return TrainerTaskResult(
        name=task.name,
        description=task.description,
        steps=steps,
        batch_size=task.batch_size,
        gradient_accumulation_steps=task.gradient_accumulation_steps,
        final_window=window,
        lr_sweep={f"{lr:g}": final for lr, final in sweep_final.items()},
        best_lr=best_lr,
        adamw=adam_runs,
        celo=celo_runs,
        adamw_final=adam_final,
        celo_final=celo_final,
        final_loss_ratio=metrics.final_loss_ratio(np.array([adam_final]), np.array([celo_final])),
        zero_gradient_drift=zero_gradient_drift(trainable_parameters(task.build(0, tiny).model), net)
        if rule.zero_gradient_fixed_point else None,
    )


def _mean(values: Sequence[float | None]) -> str:
    """The mean as a table cell, ``-`` where the quantity is undefined."""
    if any(v is None for v in values):
        return "-"
    return f"{np.mean(values):.4f}"


def trainer_markdown_table(
    results: Sequence[TrainerTaskResult], weights: str, seeds: int, tiny: bool, rule: Rule = RULES["celo"]
) -> str:
    """The Trainer tasks' results as a markdown table, the learning-rate sweeps below it."""
    name = rule.label
    lines = [
        f"Trainer tasks (through `transformers.Trainer`{'; TINY models, a smoke test' if tiny else ''}); {name} weights: `{weights}` {rule.setting}; "
        f"{seeds} seed(s) per optimizer. AdamW = Trainer's `adamw_torch` with its default linear schedule, lr "
        "tuned on seed 0 over the task's grid (lowest final train loss). Train loss: mean of the last N logged steps. "
        f"FL = AdamW / {name} final train loss (>1 favours {name}). Drift: zero-gradient drift of the {name} weights on the "
        "task's trainable parameters (largest per-step ||dp|| / ||p||; '-': not defined for the rule).",
        "",
        f"| task | steps | batch x GA | N | AdamW lr | AdamW train | {name} train | FL | AdamW held-out | {name} held-out "
        f"| AdamW acc | {name} acc | drift | AdamW s/step | {name} s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.steps} | {r.batch_size} x {r.gradient_accumulation_steps} | {r.final_window} | {r.best_lr:g} | "
            f"{r.adamw_final:.4f} | {r.celo_final:.4f} | {r.final_loss_ratio:.3f} | "
            f"{_mean([x.held_out_loss for x in r.adamw])} | {_mean([x.held_out_loss for x in r.celo])} | "
            f"{_mean([x.held_out_accuracy for x in r.adamw])} | {_mean([x.held_out_accuracy for x in r.celo])} | "
            f"{'-' if r.zero_gradient_drift is None else f'{r.zero_gradient_drift:.1e}'} | {_mean([x.seconds_per_step for x in r.adamw])} | "
            f"{_mean([x.seconds_per_step for x in r.celo])} |"
        )
    lines.append("")
    lines += [
        f"- {r.name}: {r.description}. AdamW final train loss by lr: "
        + ", ".join(f"{lr}: {final:.4f}" for lr, final in r.lr_sweep.items())
        for r in results
    ]
    return "\n".join(lines) + "\n"
