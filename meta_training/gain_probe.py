"""What the model-start gain sees: the median over tensors of ``||g|| / ||p||`` at the first step.

    python -m meta_training.gain_probe --out meta_training/results/gain_probe

For each Trainer task of the evaluation (:data:`meta_training.trainer_tasks.TRAINER_TASKS`, seed 0)
and for the held-in MiniLM fine-tune (:mod:`meta_training.finetune_probe`): one forward and backward
on a first batch of the training data, then the median over the trainable tensors (those with
``||g|| > 0`` and ``||p|| > 0``; the others are counted) of ``||g|| / ||p||``, and the gain the
embedded default's settings give it (:func:`celo_hf.step_gain.model_start_gain`). Writes
``median_ratios.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from celo_hf import load_celo_net
from celo_hf.step_gain import model_start_gain

from .finetune_probe import genre_batches, minilm, write_report
from .trainer_tasks import TRAINER_TASKS, trainable_parameters


def first_step_norms(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||g||, ||p||)`` of ``model``'s trainable tensors after one backward of ``batch``'s loss, float32 ``(n,)`` each."""
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    params = trainable_parameters(model)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return (torch.stack([g.detach().float().norm() for g in grads]), torch.stack([p.detach().float().norm() for p in params]))


def probes() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each workload's first-step norms: the Trainer tasks, then the held-in MiniLM fine-tune."""
    norms = {}
    for name, task in TRAINER_TASKS.items():
        workload = task.build(0)
        loader = DataLoader(workload.train, batch_size=task.batch_size, collate_fn=workload.collator or default_collate)
        norms[f"{name} (Trainer task)"] = first_step_norms(workload.model, dict(next(iter(loader))))
    model, tokenize = minilm()
    texts, labels = next(genre_batches(1))
    norms["MiniLM comedy vs tragedy (held-in fine-tune)"] = first_step_norms(model, {**tokenize(texts), "labels": labels})
    return norms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    net = load_celo_net(None)
    assert net.gain_threshold is not None
    rows = ["| workload | trainable tensors | left out (a zero norm) | median ||g|| / ||p|| | gain (threshold "
            f"{net.gain_threshold:g}, power {net.gain_power:g}) |", "|---|---:|---:|---:|---:|"]
    for name, (grad_norm, param_norm) in probes().items():
        informative = (grad_norm > 0) & (param_norm > 0)
        median = (grad_norm[informative] / param_norm[informative]).median() if informative.any() else float("nan")
        gain = model_start_gain(grad_norm, param_norm, net.gain_threshold, net.gain_power)
        rows.append(f"| {name} | {len(grad_norm)} | {int((~informative).sum())} | {float(median):.2e} | {float(gain):.3g} |")
    write_report(args.out / "median_ratios.md",
                 "First-step statistics of the model-start gain (`python -m meta_training.gain_probe`; seed 0, one batch).", rows)


if __name__ == "__main__":
    main()
