"""What the model-start gain sees: the median over tensors of ``||g|| / ||p||`` at the first step.

    python -m meta_training.gain_probe --out meta_training/results/gain_probe

For each Trainer task of the evaluation (:data:`meta_training.trainer_tasks.TRAINER_TASKS`): the
gradients Celo's first step receives in a real run through ``Trainer`` (seeds 0-2: Trainer's
shuffled first batch, its gradient accumulation and its clipping to norm 1, dropout on), read by a
callback just before the optimizer steps (:class:`FirstStepNorms`). For the held-in MiniLM
fine-tune (:mod:`meta_training.finetune_probe`): its first batch as each of its checks trains it
(dropout off, and on). Then the median over the trainable tensors (those with
``||g|| > 0`` and ``||p|| > 0``; the others are counted) of ``||g|| / ||p||``
(:func:`celo_hf.step_gain.median_ratio`), the gradient's norm over all tensors (through
``Trainer``: after its clipping to 1), and the gain the
embedded default's settings give it (:func:`celo_hf.step_gain.model_start_gain`, the function the
optimizer calls). Writes ``median_ratios.md``.

    python -m meta_training.gain_probe --families --out meta_training/results/gain_probe

The same statistic on the meta-training fine-tune families (:func:`family_first_step_norms`: one
member per seed, no task augmentation, the fresh tensors left out as the population leaves them
out), to tell which of them meta-training sees in the regime of a pretrained model (gain below 1).
Writes ``family_ratios.md``. ``--suite``: the held-out suite's tasks
(:func:`suite_first_step_norms`), ``suite_ratios.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from celo_hf import CeloNet, load_celo_net
from celo_hf.step_gain import median_ratio, model_start_gain

from .finetune_probe import first_step_parameters, write_report
from .trainer_tasks import (
    TRAINER_TASKS,
    TrainerTask,
    train_through_trainer,
    trainable_parameters,
)

Norms = tuple[torch.Tensor, torch.Tensor]
SEEDS = (0, 1, 2)


def parameter_norms(params: list[torch.Tensor]) -> Norms:
    """``(||g||, ||p||)`` of ``params`` (a missing gradient counts as zero), float32 ``(n,)`` each."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return (torch.stack([g.detach().float().norm() for g in grads]), torch.stack([p.detach().float().norm() for p in params]))


class FirstStepNorms(TrainerCallback):
    """Records :func:`parameter_norms` of the trainable tensors just before Trainer's first optimizer
    step (after accumulation and clipping: what the optimizer receives) in ``norms``."""

    def __init__(self) -> None:
        self.norms: Norms | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                              **kwargs: Any) -> None:
        if self.norms is None:
            self.norms = parameter_norms(trainable_parameters(model))


def trainer_first_step_norms(task: TrainerTask, seed: int) -> Norms:
    """The first step's norms of ``task`` (seed ``seed``) in a one-step run of the embedded Celo through Trainer."""
    recorder = FirstStepNorms()
    train_through_trainer(task, task.build(seed), None, seed, steps=1, callbacks=[recorder])
    assert recorder.norms is not None
    return recorder.norms


def family_first_step_norms(name: str, seed: int) -> Norms:
    """The first step's norms of meta-training task family ``name`` (:func:`meta_training.tasks.family`)
    on one member drawn from a generator seeded with ``seed`` (its init, task and first batch; no
    task augmentation), over the tensors the population's model-start gain reads: those not newly
    initialised (:func:`meta_training.finetune.newly_initialised`)."""
    from .finetune import newly_initialised
    from .tasks import family

    tasks_family = family(name)
    model = tasks_family.model
    generator = torch.Generator().manual_seed(seed)
    weights = {n: t[None].clone().requires_grad_(True) for n, t in model.init(generator).items()}
    task = tasks_family.sample_task(generator)
    batch = tuple(t[None] for t in tasks_family.sample_batch(task, generator, tasks_family.batch_size))
    model.losses_of_weights(weights, batch)[0].backward()
    return parameter_norms([w for n, w in weights.items() if n not in newly_initialised(model)])


def suite_first_step_norms(name: str, seed: int) -> Norms:
    """The first step's norms of the held-out suite task ``name`` (:data:`meta_training.eval_tasks.TASKS`,
    seed ``seed``): its first training batch, every trainable tensor, as ``Celo(model.parameters())`` reads them."""
    from .eval_tasks import TASKS

    problem = TASKS[name].build(seed)
    problem.train_loss().backward()
    return parameter_norms([p for p in problem.model.parameters() if p.requires_grad])


def ratio_rows(probes: dict[str, Callable[[], Norms]], net: CeloNet) -> list[str]:
    """The markdown table of each probe's first-step norms: tensors, those left out, the gradient's
    norm, the median ``||g|| / ||p||`` and the gain ``net``'s settings give it."""
    header = ("| workload | trainable tensors | left out (a zero norm) | gradient norm, all tensors | median ||g|| / ||p|| | "
              f"gain (threshold {net.gain_threshold:g}, power {net.gain_power:g}) |")
    rows = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, probe in probes.items():
        grad_norm, param_norm = probe()
        left_out = int((~((grad_norm > 0) & (param_norm > 0))).sum())
        gain = model_start_gain(grad_norm, param_norm, net.gain_threshold, net.gain_power)
        rows.append(f"| {name} | {len(grad_norm)} | {left_out} | {float(grad_norm.norm()):.3g} | "
                    f"{float(median_ratio(grad_norm, param_norm)):.2e} | {float(gain):.3g} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", action="store_true",
                        help="write only family_ratios.md: the meta-training fine-tune families' first step")
    parser.add_argument("--suite", action="store_true", help="write only suite_ratios.md: the held-out suite's first step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    net = load_celo_net(None)
    assert net.gain_threshold is not None
    probes: dict[str, Callable[[], Norms]]
    if args.suite:
        from .eval_tasks import TASKS

        probes = {f"{name} (seed {seed})": lambda name=name, seed=seed: suite_first_step_norms(name, seed)
                  for name in TASKS for seed in SEEDS}
        write_report(args.out / "suite_ratios.md", "First-step statistics of the model-start gain on the held-out "
                     "suite's tasks, trained from scratch in a plain loop (`python -m meta_training.gain_probe --suite`).",
                     ratio_rows(probes, net))
        return
    if args.families:
        from .tasks import FINETUNE_FAMILIES

        probes = {f"{name} (seed {seed})": lambda name=name, seed=seed: family_first_step_norms(name, seed)
                  for name in FINETUNE_FAMILIES if not name.endswith("_lora") for seed in SEEDS}
        write_report(args.out / "family_ratios.md", "First-step statistics of the model-start gain on the meta-training "
                     "fine-tune families, one member each, no task augmentation, the fresh tensors left out as the "
                     "population leaves them out (`python -m meta_training.gain_probe --families`; LoRA families: every "
                     "tensor fresh, nothing read).", ratio_rows(probes, net))
        return
    probes = {
        f"{name} (Trainer task, seed {seed})": lambda task=task, seed=seed: trainer_first_step_norms(task, seed)
        for name, task in TRAINER_TASKS.items() for seed in SEEDS}
    probes["MiniLM comedy vs tragedy (held-in fine-tune, dropout off)"] = lambda: parameter_norms(first_step_parameters())
    probes["MiniLM comedy vs tragedy (held-in fine-tune, dropout on)"] = lambda: parameter_norms(first_step_parameters(True))
    write_report(args.out / "median_ratios.md",
                 "First-step statistics of the model-start gain (`python -m meta_training.gain_probe`).", ratio_rows(probes, net))


if __name__ == "__main__":
    main()
