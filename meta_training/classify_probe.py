"""Probe of step size on the tiny pretrained classifier (``ft_cls_*``), Celo's lr against AdamW's.

    python -m meta_training.classify_probe --out meta_training/results/classify_probe

Each row trains one family's model (seed 0: head, adapters and batches) for ``steps`` steps and
reports the mean training loss of the last :data:`meta_training.held_in.TAIL` steps: AdamW
(weight decay 0, ``Trainer``'s linear decay to 0) over a grid of learning rates, and Celo (the
embedded default) with its lr multiplier over a grid, on every tensor or on the head alone. Families:
the Roman plays (``ft_cls_full``, ``ft_cls_lora``, what meta-training trains on) and the problem plays
(the held-in check ``classify_loss``). Also each family's first-step median ``||g|| / ||p||``
(:func:`celo_hf.step_gain.median_ratio`, what the model-start gain reads). A probe: no selection
rule reads it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from celo_hf import Celo, load_celo_net
from celo_hf.step_gain import median_ratio

from . import tasks
from .finetune_probe import write_report
from .held_in import HELD_IN_PLAYS, TAIL

ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
CELO_LRS = (0.3, 1.0, 3.0)
#: Celo's lr on the head alone (every other tensor at lr 1).
HEAD_LRS = (3.0, 10.0)
HEAD = ("cls.weight", "cls.bias")


def families() -> dict[str, tasks.TaskFamily]:
    """The probed families by label."""
    return {"Roman plays, every tensor": tasks.family("ft_cls_full"),
            "Roman plays, adapters + head": tasks.family("ft_cls_lora"),
            "problem plays, every tensor": tasks.play_classifier_family("held_in_classify", HELD_IN_PLAYS, lora=False)}


def first_step_ratio(family: tasks.TaskFamily, seed: int = 0) -> float:
    """The median over tensors of ``||g|| / ||p||`` at :func:`final_loss`'s first step (same seed)."""
    generator = torch.Generator().manual_seed(seed)
    params = {name: torch.nn.Parameter(value) for name, value in family.model.init(generator).items()}
    batch = tuple(t[None] for t in family.sample_batch({}, generator, family.batch_size))
    family.model.losses_of_weights({n: p[None] for n, p in params.items()}, batch)[0].backward()
    norms = torch.stack([torch.stack([p.grad.norm(), p.detach().norm()]) for p in params.values()])
    return float(median_ratio(norms[:, 0], norms[:, 1]))


def final_loss(family: tasks.TaskFamily, make: Callable[[dict[str, torch.nn.Parameter], int], torch.optim.Optimizer],
               steps: int, seed: int = 0) -> float:
    """Mean training loss over the last :data:`TAIL` of ``steps`` steps of ``make(params, steps)``
    on ``family``'s model (one generator, seeded, for the init and the batches)."""
    generator = torch.Generator().manual_seed(seed)
    params = {name: torch.nn.Parameter(value) for name, value in family.model.init(generator).items()}
    optimizer = make(params, steps)
    decay = None if isinstance(optimizer, Celo) else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / steps)
    tail = []
    for step in range(steps):
        batch = tuple(t[None] for t in family.sample_batch({}, generator, family.batch_size))
        loss = family.model.losses_of_weights({n: p[None] for n, p in params.items()}, batch)[0]
        optimizer.zero_grad()
        loss.backward()
        if decay is None:
            optimizer.step(loss=loss.detach())
        else:
            optimizer.step()
            decay.step()
        if step >= steps - TAIL:
            tail.append(loss.item())
    return sum(tail) / len(tail)


def adamw(lr: float) -> Callable[[dict[str, torch.nn.Parameter], int], torch.optim.Optimizer]:
    return lambda params, steps: torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)


def celo(lr: float, head_lr: float | None = None) -> Callable[[dict[str, torch.nn.Parameter], int], torch.optim.Optimizer]:
    """Celo at ``lr``, or at 1 with the head at ``head_lr``."""
    def make(params: dict[str, torch.nn.Parameter], steps: int) -> Celo:
        groups = [{"params": [p], "lr": head_lr if head_lr is not None and name in HEAD else lr} for name, p in params.items()]
        return Celo(groups, total_steps=steps, weights=load_celo_net(None))
    return make


def probe_rows(steps: int = 500) -> list[str]:
    """The table's rows: one per optimizer setting, one column per family."""
    probed = families()
    settings = {**{f"AdamW lr {lr:g}": adamw(lr) for lr in ADAMW_LRS},
                **{f"Celo lr {lr:g}": celo(lr) for lr in CELO_LRS},
                **{f"Celo lr 1, head lr {lr:g}": celo(1.0, lr) for lr in HEAD_LRS}}
    rows = ["| optimizer | " + " | ".join(probed) + " |", "|---|" + "---:|" * len(probed)]
    for label, make in settings.items():
        rows.append(f"| {label} | " + " | ".join(f"{final_loss(f, make, steps):.4f}" for f in probed.values()) + " |")
    rows.append("| (first step's median ‖g‖ / ‖p‖) | " + " | ".join(f"{first_step_ratio(f):.4f}" for f in probed.values()) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    write_report(args.out / "lr_probe.md", f"Mean training loss of the last {TAIL} of {args.steps} steps, seed 0 "
                 "(chance: ln 4 = 1.386 on the Roman plays, ln 5 = 1.609 on the problem plays).", probe_rows(args.steps))


if __name__ == "__main__":
    main()
