"""Judge Celo (or Celo2) weights against AdamW with a tuned learning rate: the held-out CPU suite and the Trainer tasks.

    python -m meta_training.evaluate --weights ../shared/reference/celo_theta.state --seeds 3 --out eval/paper
    python -m meta_training.evaluate --weights runs/phase2/final --tasks suite --out eval/ours   # suite only
    python -m meta_training.evaluate --tasks trainer --out eval/trainer   # Trainer tasks only, embedded weights
    python -m meta_training.evaluate --tiny --weights PATH --out /tmp/eval   # smoke test, < 1 min
    python -m meta_training.evaluate --rule celo2 --adamw_from eval/ours/results.json eval/trainer/results.json --out eval/celo2

``--tasks`` takes ``suite``, ``trainer``, ``all`` (default) and/or single task names. ``--rule``:
which learned optimizer (:data:`meta_training.rules.RULES`; ``celo2``: :class:`celo_hf.Celo2` at lr
1e-3, its default, nothing tuned). ``--adamw_from``: reuse the AdamW runs (lr sweep, tuned lr, every
seed) of earlier ``results.json`` files made with the same steps and grids instead of
re-running them: AdamW's runs do not depend on the learned optimizer, and they are deterministic given
the seed (repeated evaluations give bit-identical AdamW curves). The suite needs at least as many
saved seeds; a Trainer task's missing seeds run at the saved tuned lr.

The suite: every task of :mod:`meta_training.eval_tasks` (``docs/meta-training.md`` §7.5): AdamW
(weight decay 0) runs once per learning rate of the grid; the lr with the lowest smoothed final
training loss is re-run with every seed; Celo runs with every seed and ``total_steps`` = the task's
steps. Seed ``s`` gives both optimizers the same initialisation and batches. Then the metrics of
§6.3 (:mod:`meta_training.eval_metrics`): final-loss ratio and speedup per task, their IQM over
tasks with a stratified bootstrap CI over seeds, and divergence flags.

The Trainer tasks (:mod:`meta_training.trainer_tasks`, judged by :mod:`meta_training.trainer_eval`):
fine-tuning pretrained MiniLM-L6 (full and LoRA), a Llama from scratch with gradient accumulation
and a 1000-step GPT-2, each through a real ``transformers.Trainer``: Trainer's AdamW with its
default linear schedule and a grid-tuned lr against Celo at lr 1; one seed by default
(``--trainer_seeds``), since they are slow on CPU.

Writes ``results.json`` (everything, curves included), ``results.md`` (the tables),
``curves.png`` (suite) and ``trainer_curves.png`` (Trainer tasks; training loss per task, Celo vs
tuned AdamW) to ``--out``.
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
from torch import nn
from tqdm import tqdm

from celo_hf import Celo, CeloNet

from . import eval_metrics as metrics
from .eval_tasks import TASKS, EvalTask, Problem
from .extras import require_meta_extra
from .rules import RULES, Rule
from .trainer_eval import (
    TrainerTaskResult,
    evaluate_trainer_task,
    trainer_markdown_table,
)
from .trainer_tasks import TINY_STEPS as TRAINER_TINY_STEPS
from .trainer_tasks import TRAINER_TASKS

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: The ``--tiny`` configuration: a few fast tasks, few steps, one seed.
TINY_TASKS = ("ill_conditioned_softmax", "wide_deep_mlp", "gru_lm")
TINY_STEPS = 30

#: An optimizer for a model's trainable parameters and a number of steps.
OptimizerFactory = Callable[[nn.Module, int], torch.optim.Optimizer]


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
    return lambda model, steps: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def learned(rule: Rule, net: nn.Module) -> OptimizerFactory:
    """``rule``'s optimizer with meta-model ``net`` (:meth:`meta_training.rules.Rule.module_optimizer`)."""
    return lambda model, steps: rule.module_optimizer(net, model, steps)


def celo(net: CeloNet) -> OptimizerFactory:
    return learned(RULES["celo"], net)


def run_task(task: EvalTask, make_optimizer: OptimizerFactory, seed: int, steps: int) -> Run:
    """One run of ``task`` from ``seed``, in a plain loop or through Trainer (``task.through_trainer``)."""
    problem = task.build(seed)
    optimizer = make_optimizer(problem.model, steps)
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


@dataclass
class AdamWRuns:
    """AdamW's side of one task: final loss per lr of the sweep, the tuned lr, a run per seed."""

    sweep_final: dict[float, float]
    best_lr: float
    runs: list[Run]


def run_adamw(task: EvalTask, seeds: int, steps: int, learning_rates: Sequence[float], bar: tqdm) -> AdamWRuns:
    """Tune AdamW's lr on seed 0 (lowest smoothed final loss) and re-run it on every other seed."""
    sweep: dict[float, Run] = {}
    for lr in learning_rates:
        bar.set_postfix_str(f"{task.name}: AdamW lr={lr:g}")
        sweep[lr] = run_task(task, adamw(lr), 0, steps)
        bar.update()
    sweep_final = {lr: float(metrics.summary_curve(np.array(run.losses))[-1]) for lr, run in sweep.items()}
    best_lr = metrics.best_learning_rate(sweep_final)
    adam_runs = [sweep[best_lr]]
    for seed in range(1, seeds):
        bar.set_postfix_str(f"{task.name}: AdamW lr={best_lr:g} seed {seed}")
        adam_runs.append(run_task(task, adamw(best_lr), seed, steps))
        bar.update()
    return AdamWRuns(sweep_final, best_lr, adam_runs)


def saved_adamw(saved: dict[str, object], seeds: int, steps: int, learning_rates: Sequence[float]) -> AdamWRuns:
    """AdamW's runs of one task from an earlier ``results.json`` (its ``tasks`` entry), checked to
    have been made with these ``steps`` and lr grid and at least ``seeds`` seeds (run ``i`` is
    seed ``i``; the first ``seeds`` are taken)."""
    grid = [f"{lr:g}" for lr in learning_rates]
    found = (saved["steps"], list(saved["lr_sweep"]))
    if found != (steps, grid) or len(saved["adamw"]) < seeds:
        raise ValueError(f"task {saved['name']!r}: the saved AdamW runs have (steps, lr grid) {found} and "
                         f"{len(saved['adamw'])} seed(s), expected {(steps, grid)} and at least {seeds}")
    return AdamWRuns({float(lr): final for lr, final in saved["lr_sweep"].items()}, saved["best_lr"],
                     [Run(**run) for run in saved["adamw"][:seeds]])


def evaluate_task(
    task: EvalTask, net: nn.Module, seeds: int, steps: int, learning_rates: Sequence[float], bar: tqdm,
    rule: Rule = RULES["celo"], adamw_runs: AdamWRuns | None = None,
) -> TaskResult:
    """Tune AdamW's lr on seed 0, re-run it on every seed (or take ``adamw_runs``), run ``rule``'s
    optimizer on every seed, compare."""
    adam = adamw_runs or run_adamw(task, seeds, steps, learning_rates, bar)
    sweep_final, best_lr, adam_runs = adam.sweep_final, adam.best_lr, adam.runs
    celo_runs = []
    for seed in range(seeds):
        bar.set_postfix_str(f"{task.name}: {rule.label} seed {seed}")
        celo_runs.append(run_task(task, learned(rule, net), seed, steps))
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
    results: Sequence[TaskResult], summary: dict[str, object], weights: str, seeds: int, learning_rates: Sequence[float],
    rule: Rule = RULES["celo"],
) -> str:
    """The results as a markdown table with the aggregate below it."""
    name = rule.label
    setting = "" if rule.name == "celo" else f" ({name} {rule.setting})"
    lines = [
        f"{name} weights: `{weights}`{setting}; {seeds} seed(s); AdamW lr tuned on seed 0 over {{{', '.join(f'{lr:g}' for lr in learning_rates)}}}.",
        f"Train loss: seed-mean, smoothed, at the last step. FL = AdamW / {name} final train loss, SP = speedup "
        f"(* = fallback: {name} never reached AdamW's final loss). >1 favours {name}.",
        "",
        f"| task | steps | AdamW lr | AdamW train | {name} train | FL | SP | AdamW held-out | {name} held-out | AdamW ms/step | {name} ms/step | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        diverged = ", ".join(label for label, flag in (("AdamW", r.adamw_diverged), (name, r.celo_diverged)) if flag) or "-"
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
        f"{name} diverged on: {', '.join(summary['celo_diverged_tasks']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


Panel = tuple[str, list[tuple[str, str, np.ndarray]]]
"""A panel's title and its curves: ``(label, colour, runs (seeds, steps))`` each."""


def plot_panels(panels: Sequence[Panel], path: Path) -> None:
    """One panel per entry, log-scale loss: every run (thin) and the summary curve (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels):
        for label, color, runs in curves:
            steps = np.arange(1, runs.shape[1] + 1)
            for run in runs:
                ax.plot(steps, run, color=color, alpha=0.2, linewidth=0.6)
            ax.plot(steps, metrics.summary_curve(runs), color=color, linewidth=1.6, label=label)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_panels(results: Sequence[TaskResult | TrainerTaskResult], label: str = "Celo") -> list[Panel]:
    """Per task: tuned AdamW's and the learned optimizer's (``label``) training-loss curves, FL in the title."""
    return [
        (f"{r.name}  FL {r.final_loss_ratio:.2f}", [
            (f"AdamW lr={r.best_lr:g}", "tab:blue", np.array([run.losses for run in r.adamw])),
            (label, "tab:red", np.array([run.losses for run in r.celo])),
        ])
        for r in results
    ]


def evaluate(
    weights: str | nn.Module | None,
    out: Path,
    seeds: int = 3,
    task_names: Sequence[str] = tuple(TASKS),
    steps: int | None = None,
    learning_rates: Sequence[float] = LEARNING_RATES,
    trainer_task_names: Sequence[str] = (),
    trainer_seeds: int = 1,
    trainer_steps: int | None = None,
    tiny_trainer: bool = False,
    rule: str = "celo",
    adamw_from: Sequence[Path] = (),
) -> dict[str, object]:
    """Run the suite and the Trainer tasks; write ``results.json``, ``results.md`` and the curves
    (``curves.png`` for the suite, ``trainer_curves.png`` for the Trainer tasks) into ``out``.

    Args:
        weights: the meta-model as ``rule``'s optimizer takes it (``None``: the embedded default, a
            path, a Hub id, a ``CeloNet`` / ``Celo2Net``).
        seeds: seeds per optimizer on the suite (AdamW's lr is tuned on seed 0 alone).
        task_names: which tasks of :data:`meta_training.eval_tasks.TASKS` (may be empty).
        steps: override every suite task's step count (``None``: each task's own).
        trainer_task_names: which tasks of :data:`meta_training.trainer_tasks.TRAINER_TASKS`.
        trainer_seeds: seeds per optimizer on the Trainer tasks.
        trainer_steps: override every Trainer task's step count.
        tiny_trainer: the Trainer tasks with their tiny models (tests).
        rule: the learned optimizer (a key of :data:`meta_training.rules.RULES`).
        adamw_from: earlier ``results.json`` files whose AdamW runs are reused (:func:`saved_adamw`,
            :func:`meta_training.trainer_eval.saved_adamw`); every requested task must be in one of them.

    Returns the contents of ``results.json``.
    """
    if seeds < 1 or trainer_seeds < 1:
        raise ValueError(f"seeds must be >= 1, got seeds={seeds}, trainer_seeds={trainer_seeds}")
    unknown = [name for name in task_names if name not in TASKS]
    unknown += [name for name in trainer_task_names if name not in TRAINER_TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; expected some of {list(TASKS) + list(TRAINER_TASKS)}")
    if not task_names and not trainer_task_names:
        raise ValueError("no evaluation tasks given")
    learned_rule = RULES[rule]
    net = learned_rule.load_net(weights)
    saved = [json.loads(Path(path).read_text()) for path in adamw_from] or None
    saved_suite, saved_trainer = _saved_tasks(saved, task_names, trainer_task_names, tiny_trainer)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = len(task_names) * seeds + len(trainer_task_names) * trainer_seeds
    if saved is None:
        runs += len(task_names) * (len(learning_rates) + seeds - 1) + sum(
            len(TRAINER_TASKS[name].learning_rates) + trainer_seeds - 1 for name in trainer_task_names
        )
    else:
        runs += sum(max(0, trainer_seeds - len(saved_trainer[name]["adamw"])) for name in trainer_task_names)
    report: dict[str, object] = {"weights": str(weights), "rule": rule, "adamw_from": [str(p) for p in adamw_from]}
    tables = []
    with tqdm(total=runs, desc="evaluate", unit="run") as bar:
        results = []
        for name in task_names:
            task_steps = steps or TASKS[name].steps
            adam = None if saved is None else saved_adamw(saved_suite[name], seeds, task_steps, learning_rates)
            results.append(evaluate_task(TASKS[name], net, seeds, task_steps, learning_rates, bar, learned_rule, adam))
        trainer_results = [
            evaluate_trainer_task(TRAINER_TASKS[name], net, trainer_seeds, trainer_steps, tiny_trainer, bar, learned_rule,
                                  None if saved is None else saved_trainer[name])
            for name in trainer_task_names
        ]
    if results:
        summary = aggregate(results)
        report |= {"seeds": seeds, "learning_rates": list(learning_rates), "summary": summary,
                   "tasks": [asdict(r) for r in results]}
        tables.append(markdown_table(results, summary, str(weights), seeds, learning_rates, learned_rule))
        plot_panels(comparison_panels(results, learned_rule.label), out / "curves.png")
    if trainer_results:
        report["trainer"] = {"seeds": trainer_seeds, "tiny": tiny_trainer, "tasks": [asdict(r) for r in trainer_results]}
        tables.append(trainer_markdown_table(trainer_results, str(weights), trainer_seeds, tiny_trainer, learned_rule))
        plot_panels(comparison_panels(trainer_results, learned_rule.label), out / "trainer_curves.png")
    if adamw_from:
        tables.insert(0, f"AdamW runs reused from {', '.join(f'`{p}`' for p in adamw_from)} (not re-run).\n")
    report["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text("\n".join(tables))
    return report


def _saved_tasks(
    saved: Sequence[dict[str, object]] | None, suite: Sequence[str], trainer: Sequence[str], tiny: bool
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The entries of earlier ``results.json`` contents for the requested tasks: ``(suite,
    trainer)``, each ``task name -> saved entry`` (a later file's entry wins); every requested task
    must be there, Trainer tasks from a file made with the same ``tiny``."""
    if saved is None:
        return {}, {}
    by_name = {t["name"]: t for report in saved for t in report.get("tasks", [])}
    by_trainer_name = {}
    for report in saved:
        if "trainer" in report:
            if report["trainer"]["tiny"] != tiny:
                raise ValueError(f"--adamw_from's Trainer runs have tiny={report['trainer']['tiny']}, expected {tiny}")
            by_trainer_name |= {t["name"]: t for t in report["trainer"]["tasks"]}
    missing = [n for n in suite if n not in by_name] + [n for n in trainer if n not in by_trainer_name]
    if missing:
        raise ValueError(f"--adamw_from has no AdamW runs for task(s) {missing}; it holds "
                         f"{sorted(by_name) + sorted(by_trainer_name)}")
    return by_name, by_trainer_name


#: ``--tasks`` groups: the small-network suite, the Trainer tasks, both.
TASK_GROUPS = {"suite": tuple(TASKS), "trainer": tuple(TRAINER_TASKS), "all": (*TASKS, *TRAINER_TASKS)}


def resolve_tasks(names: Sequence[str], tiny: bool = False) -> tuple[list[str], list[str]]:
    """``--tasks`` names (groups of :data:`TASK_GROUPS` or single tasks) -> ``(suite, trainer)``
    task names in the order given (groups in their own order), without repeats. With ``tiny`` the
    suite group is :data:`TINY_TASKS`."""
    groups = TASK_GROUPS | ({"suite": TINY_TASKS, "all": (*TINY_TASKS, *TRAINER_TASKS)} if tiny else {})
    chosen = list(dict.fromkeys(task for name in names for task in groups.get(name, (name,))))
    unknown = [task for task in chosen if task not in TASKS and task not in TRAINER_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected {list(TASK_GROUPS)} or some of {list(TASK_GROUPS['all'])}")
    return [t for t in chosen if t in TASKS], [t for t in chosen if t in TRAINER_TASKS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="Celo / Celo2 weights: a file, folder or Hub id (default: the embedded default)")
    parser.add_argument("--rule", default="celo", choices=sorted(RULES), help="the learned optimizer (default celo)")
    parser.add_argument("--adamw_from", type=Path, nargs="+", default=(),
                        help="earlier results.json files whose AdamW runs (same steps, seeds, grids) are reused")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer on the suite (default 3)")
    parser.add_argument("--trainer_seeds", type=int, default=1,
                        help="seeds per optimizer on the Trainer tasks (default 1: they are slow on CPU)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--tasks", nargs="+", default=["all"], choices=[*TASK_GROUPS, *TASK_GROUPS["all"]],
                        metavar="TASK", help=f"groups {list(TASK_GROUPS)} and/or task names (default: all); "
                        f"suite: {list(TASKS)}; trainer: {list(TRAINER_TASKS)}")
    parser.add_argument("--steps", type=int, default=None, help="override every task's number of steps")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke test: suite tasks {TINY_TASKS} for {TINY_STEPS} steps, 1 seed; Trainer tasks with "
                        f"tiny models for {TRAINER_TINY_STEPS} steps")
    args = parser.parse_args(argv)
    require_meta_extra("python -m meta_training.evaluate")
    torch.set_num_threads(1)
    suite, trainer = resolve_tasks(args.tasks, tiny=args.tiny)
    report = evaluate(
        args.weights, args.out, seeds=1 if args.tiny else args.seeds, task_names=suite,
        steps=args.steps or (TINY_STEPS if args.tiny else None), trainer_task_names=trainer,
        trainer_seeds=1 if args.tiny else args.trainer_seeds,
        trainer_steps=args.steps or (TRAINER_TINY_STEPS if args.tiny else None), tiny_trainer=args.tiny,
        rule=args.rule, adamw_from=args.adamw_from,
    )
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}: results.json, results.md and the curves in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
