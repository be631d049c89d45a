"""Judge Celo weights on the held-out CPU suite against AdamW with a tuned learning rate.

    python -m meta_training.evaluate --weights ../shared/reference/celo_theta.state --seeds 3 --out eval/paper
    python -m meta_training.evaluate --weights runs/phase2/final --out eval/ours
    python -m meta_training.evaluate --tiny --weights PATH --out /tmp/eval   # smoke test, < 1 min

For every task of :mod:`meta_training.eval_tasks` (``docs/meta-training.md`` §7.5): AdamW (weight
decay 0) runs once per learning rate of the grid; the lr with the lowest smoothed final training
loss is re-run with every seed; Celo runs with every seed and ``total_steps`` = the task's steps.
Seed ``s`` gives both optimizers the same initialisation and batches. Then the metrics of §6.3
(:mod:`meta_training.eval_metrics`): final-loss ratio and speedup per task, their IQM over tasks
with a stratified bootstrap CI over seeds, and divergence flags.

Writes ``results.json`` (everything, curves included), ``results.md`` (the table) and
``curves.png`` (training loss per task, Celo vs tuned AdamW) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from celo_hf import Celo, CeloNet
from celo_hf.hub import load_celo_net

from . import eval_metrics as metrics
from .extras import require_meta_extra
from .eval_tasks import TASKS, EvalTask, Problem

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: The ``--tiny`` configuration: a few fast tasks, few steps, one seed.
TINY_TASKS = ("ill_conditioned_softmax", "wide_deep_mlp", "gru_lm")
TINY_STEPS = 30

OptimizerFactory = Callable[[list[torch.nn.Parameter], int], torch.optim.Optimizer]


@dataclass
class Run:
    """One training run: ``losses`` ``(steps,)`` training loss before each step (``nan`` after the
    run blew up), the held-out loss at the end, and wall-clock seconds per step."""

    losses: list[float]
    held_out_loss: float
    seconds_per_step: float


def train(problem: Problem, optimizer: torch.optim.Optimizer, steps: int) -> Run:
    """Run ``steps`` steps in a plain loop; stops early (padding with ``nan``) once the loss is not finite."""
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        loss = problem.train_loss()
        value = loss.detach().item()
        losses.append(value)
        if not np.isfinite(value):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if isinstance(optimizer, Celo):
            optimizer.step(loss=loss)
        else:
            optimizer.step()
    seconds = (time.perf_counter() - start) / len(losses)
    losses += [float("nan")] * (steps - len(losses))
    return Run(losses, problem.held_out_loss(), seconds)


class ExampleStream(torch.utils.data.IterableDataset):
    """A problem's training batches (dicts of tensors), ``steps`` of them, yielded example by
    example: Trainer's default collator re-stacks them into the very same batches."""

    def __init__(self, next_batch: Callable[[], dict[str, torch.Tensor]], steps: int):
        self.next_batch = next_batch
        self.steps = steps

    def __iter__(self):
        for _ in range(self.steps):
            batch = self.next_batch()
            for i in range(next(iter(batch.values())).shape[0]):
                yield {key: value[i] for key, value in batch.items()}


def train_with_trainer(problem: Problem, optimizer: torch.optim.Optimizer, steps: int, batch_size: int) -> Run:
    """Run ``steps`` steps through ``celo_hf.CeloTrainer`` (``transformers.Trainer`` with Celo's
    integration; with another optimizer it is a plain Trainer): constant lr, no gradient clipping,
    the loss logged every step. Batches must be dicts of tensors and ``problem.loss(batch)`` the
    model's own ``model(**batch).loss``."""
    import tempfile

    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from celo_hf import CeloTrainer

    class LossLog(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, D102
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    log = LossLog()
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size, logging_steps=1,
            logging_nan_inf_filter=False, max_grad_norm=0.0, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        )
        trainer = CeloTrainer(
            problem.model, args, train_dataset=ExampleStream(problem.next_batch, steps),
            optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)), callbacks=[log],
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = (time.perf_counter() - start) / steps
    return Run(log.losses, problem.held_out_loss(), seconds)


def adamw(lr: float) -> OptimizerFactory:
    return lambda params, steps: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def celo(net: CeloNet) -> OptimizerFactory:
    return lambda params, steps: Celo(params, total_steps=steps, weights=net)


def run_task(task: EvalTask, make_optimizer: OptimizerFactory, seed: int, steps: int) -> Run:
    """One run of ``task`` from ``seed``, in a plain loop or through Trainer (``task.through_trainer``)."""
    problem = task.build(seed)
    optimizer = make_optimizer([p for p in problem.model.parameters() if p.requires_grad], steps)
    if task.through_trainer:
        if task.batch_size is None:
            raise ValueError(f"task {task.name!r} is full batch; only minibatch tasks run through Trainer")
        return train_with_trainer(problem, optimizer, steps, task.batch_size)
    return train(problem, optimizer, steps)


@dataclass
class TaskResult:
    """Everything measured on one task (curves are per seed)."""

    name: str
    description: str
    steps: int
    batch_size: int | None
    lr_sweep: dict[str, float]
    best_lr: float
    adamw: list[Run]
    celo: list[Run]
    final_loss_ratio: float
    speedup: float
    speedup_fell_back: bool
    adamw_diverged: bool
    celo_diverged: bool


def evaluate_task(
    task: EvalTask, net: CeloNet, seeds: int, steps: int, learning_rates: Sequence[float], bar: tqdm
) -> TaskResult:
    """Tune AdamW's lr on seed 0, re-run it on every seed, run Celo on every seed, compare."""
    sweep: dict[float, Run] = {}
    for lr in learning_rates:
        bar.set_postfix_str(f"{task.name}: AdamW lr={lr:g}")
        sweep[lr] = run_task(task, adamw(lr), 0, steps)
        bar.update()
    sweep_final = {lr: float(metrics.summary_curve(np.array(run.losses))[-1]) for lr, run in sweep.items()}
    best_lr = min(learning_rates, key=lambda lr: (sweep_final[lr], lr))
    adam_runs = [sweep[best_lr]]
    for seed in range(1, seeds):
        bar.set_postfix_str(f"{task.name}: AdamW lr={best_lr:g} seed {seed}")
        adam_runs.append(run_task(task, adamw(best_lr), seed, steps))
        bar.update()
    celo_runs = []
    for seed in range(seeds):
        bar.set_postfix_str(f"{task.name}: Celo seed {seed}")
        celo_runs.append(run_task(task, celo(net), seed, steps))
        bar.update()
    adam_curve = metrics.summary_curve(np.array([r.losses for r in adam_runs]))
    celo_curve = metrics.summary_curve(np.array([r.losses for r in celo_runs]))
    sp, fell_back = metrics.speedup(adam_curve, celo_curve)
    return TaskResult(
        name=task.name,
        description=task.description,
        steps=steps,
        batch_size=task.batch_size,
        lr_sweep={f"{lr:g}": final for lr, final in sweep_final.items()},
        best_lr=best_lr,
        adamw=adam_runs,
        celo=celo_runs,
        final_loss_ratio=metrics.final_loss_ratio(adam_curve, celo_curve),
        speedup=sp,
        speedup_fell_back=fell_back,
        adamw_diverged=any(metrics.diverged(np.array(r.losses)) for r in adam_runs),
        celo_diverged=any(metrics.diverged(np.array(r.losses)) for r in celo_runs),
    )


def aggregate(results: Sequence[TaskResult]) -> dict[str, object]:
    """IQM over tasks of both metrics, their bootstrap CIs over seeds, and the diverged tasks."""
    ci = metrics.bootstrap_iqm_ci(
        [np.array([r.losses for r in result.adamw]) for result in results],
        [np.array([r.losses for r in result.celo]) for result in results],
    )
    return {
        "iqm_final_loss_ratio": metrics.iqm([r.final_loss_ratio for r in results]),
        "iqm_speedup": metrics.iqm([r.speedup for r in results]),
        "iqm_final_loss_ratio_ci95": ci["final_loss_ratio"],
        "iqm_speedup_ci95": ci["speedup"],
        "celo_diverged_tasks": [r.name for r in results if r.celo_diverged],
        "adamw_diverged_tasks": [r.name for r in results if r.adamw_diverged],
    }


def _final(runs: Sequence[Run]) -> float:
    return float(metrics.summary_curve(np.array([r.losses for r in runs]))[-1])


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def markdown_table(
    results: Sequence[TaskResult], summary: dict[str, object], weights: str, seeds: int, learning_rates: Sequence[float]
) -> str:
    """The results as a markdown table with the aggregate below it."""
    lines = [
        f"Celo weights: `{weights}`; {seeds} seed(s); AdamW lr tuned on seed 0 over {{{', '.join(f'{lr:g}' for lr in learning_rates)}}}.",
        "Train loss: seed-mean, smoothed, at the last step. FL = AdamW / Celo final train loss, SP = speedup "
        "(* = fallback: Celo never reached AdamW's final loss). >1 favours Celo.",
        "",
        "| task | steps | AdamW lr | AdamW train | Celo train | FL | SP | AdamW held-out | Celo held-out | AdamW ms/step | Celo ms/step | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        diverged = ", ".join(name for name, flag in (("AdamW", r.adamw_diverged), ("Celo", r.celo_diverged)) if flag) or "-"
        lines.append(
            f"| {r.name} | {r.steps} | {r.best_lr:g} | {_final(r.adamw):.4f} | {_final(r.celo):.4f} | "
            f"{r.final_loss_ratio:.3f} | {r.speedup:.2f}{'*' if r.speedup_fell_back else ''} | "
            f"{_mean([x.held_out_loss for x in r.adamw]):.4f} | {_mean([x.held_out_loss for x in r.celo]):.4f} | "
            f"{1e3 * _mean([x.seconds_per_step for x in r.adamw]):.1f} | {1e3 * _mean([x.seconds_per_step for x in r.celo]):.1f} | {diverged} |"
        )
    fl_low, fl_high = summary["iqm_final_loss_ratio_ci95"]
    sp_low, sp_high = summary["iqm_speedup_ci95"]
    lines += [
        "",
        f"**IQM final-loss ratio {summary['iqm_final_loss_ratio']:.3f}** (95% bootstrap CI over seeds {fl_low:.3f}-{fl_high:.3f}); "
        f"**IQM speedup {summary['iqm_speedup']:.2f}** (CI {sp_low:.2f}-{sp_high:.2f}); "
        f"Celo diverged on: {', '.join(summary['celo_diverged_tasks']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(results: Sequence[TaskResult], path: Path) -> None:
    """One panel per task: every seed's training loss (thin) and the summary curve (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = min(4, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        for label, runs, color in ((f"AdamW lr={r.best_lr:g}", r.adamw, "tab:blue"), ("Celo", r.celo, "tab:red")):
            curves = np.array([run.losses for run in runs])
            steps = np.arange(1, curves.shape[1] + 1)
            for curve in curves:
                ax.plot(steps, curve, color=color, alpha=0.2, linewidth=0.6)
            ax.plot(steps, metrics.summary_curve(curves), color=color, linewidth=1.6, label=label)
        ax.set_yscale("log")
        ax.set_title(f"{r.name}  FL {r.final_loss_ratio:.2f}", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    weights: str | CeloNet | None,
    out: Path,
    seeds: int = 3,
    task_names: Sequence[str] = tuple(TASKS),
    steps: int | None = None,
    learning_rates: Sequence[float] = LEARNING_RATES,
) -> dict[str, object]:
    """Run the suite and write ``results.json``, ``results.md`` and ``curves.png`` into ``out``.

    Args:
        weights: Celo weights as :class:`celo_hf.Celo` takes them (``None``, a path, a Hub id, a
            ``CeloNet``).
        seeds: seeds per optimizer (AdamW's lr is tuned on seed 0 alone).
        task_names: which tasks of :data:`meta_training.eval_tasks.TASKS`.
        steps: override every task's step count (``None``: each task's own).

    Returns the contents of ``results.json``.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; expected some of {list(TASKS)}")
    net = load_celo_net(weights)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    with tqdm(total=len(task_names) * (len(learning_rates) + 2 * seeds - 1), desc="evaluate", unit="run") as bar:
        for name in task_names:
            task = TASKS[name]
            results.append(evaluate_task(task, net, seeds, steps or task.steps, learning_rates, bar))
    summary = aggregate(results)
    report = {
        "weights": str(weights),
        "seeds": seeds,
        "learning_rates": list(learning_rates),
        "seconds": time.perf_counter() - start,
        "summary": summary,
        "tasks": [asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown_table(results, summary, str(weights), seeds, learning_rates))
    plot_curves(results, out / "curves.png")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="Celo weights: a file, folder or Hub id (default: the embedded default)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS), help="subset of tasks (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="override every task's number of steps")
    parser.add_argument("--tiny", action="store_true", help=f"smoke test: tasks {TINY_TASKS}, {TINY_STEPS} steps, 1 seed")
    args = parser.parse_args(argv)
    require_meta_extra("python -m meta_training.evaluate")
    torch.set_num_threads(1)
    if args.tiny:
        tasks, steps, seeds = args.tasks or TINY_TASKS, args.steps or TINY_STEPS, 1
    else:
        tasks, steps, seeds = args.tasks or tuple(TASKS), args.steps, args.seeds
    report = evaluate(args.weights, args.out, seeds=seeds, task_names=tasks, steps=steps)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, curves.png in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
