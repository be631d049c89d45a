"""Train tiny models with a *plain* ``transformers.Trainer`` and a plain Accelerate loop fed by
``celo_hf.create``; save what each process saw. Run alone or under torchrun:

    torchrun --standalone --nproc_per_node 2 tests/scripts/plain_loops.py OUT_DIR
    python tests/scripts/plain_loops.py OUT_DIR

The global batch is the same either way (per-device batch 2 x 2 processes, or 4 x 1).

Writes ``OUT_DIR/{case}-rank{r}.pt`` for each of ``TRAINER_CASES`` (the losses fed to Celo, the
losses Trainer logged, the final parameters in float64) and ``OUT_DIR/accelerate-rank{r}.pt`` for
the Accelerate loop (the losses fed, every process's training-forward losses of each step, the
final parameters).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_setup import (  # noqa: E402
    collate,
    logged_losses,
    parameter_vector,
    ragged_examples,
    recording_create,
    script_setup,
    tiny_model,
    training_args,
)

import celo_hf  # noqa: E402


class TrainerCase(NamedTuple):
    kind: str
    accumulation: int
    average_tokens: bool
    callback: bool

    @property
    def name(self) -> str:
        tokens = "avgtok" if self.average_tokens else "localtok"
        return f"{self.kind}-ga{self.accumulation}-{tokens}-{'callback' if self.callback else 'nocallback'}"


TRAINER_CASES = (
    TrainerCase("gpt2", 1, True, True),
    TrainerCase("gpt2", 2, True, True),
    TrainerCase("gpt2", 2, False, True),
    TrainerCase("bert", 2, True, True),
    TrainerCase("gpt2", 2, True, False),
    TrainerCase("bert", 2, True, False),
)
#: Examples per micro-batch over all processes (the per-device batch is this / world size).
GLOBAL_BATCH = 4
#: Accumulated micro-batches per optimizer step in the Accelerate loop, and its optimizer steps.
LOOP_ACCUMULATION, LOOP_STEPS = 2, 4


def train_plain_trainer(case: TrainerCase, out_dir: Path, world_size: int) -> dict[str, Any]:
    """4 steps of a plain Trainer, evaluating every 2; ``total_steps`` given to ``create`` only
    without the callback."""
    model = tiny_model(case.kind)
    optimizer, scheduler = recording_create(model, total_steps=None if case.callback else 4)
    trainer = Trainer(
        model,
        training_args(out_dir / "trainer", per_device_train_batch_size=GLOBAL_BATCH // world_size,
                      gradient_accumulation_steps=case.accumulation,
                      average_tokens_across_devices=case.average_tokens, eval_strategy="steps", eval_steps=2),
        train_dataset=ragged_examples(case.kind),
        eval_dataset=ragged_examples(case.kind, count=8, seed=1),
        data_collator=collate,
        optimizers=(optimizer, scheduler),
        callbacks=[celo_hf.CeloCallback()] if case.callback else None,
    )
    if trainer.args.world_size != world_size:
        raise SystemExit(f"launched {world_size} processes, but Trainer runs {trainer.args.world_size}")
    trainer.train()
    return {"fed": optimizer.fed, "logged": logged_losses(trainer), "params": parameter_vector(model)}


def train_accelerate_loop(world_size: int) -> dict[str, Any]:
    """The README's Accelerate loop: the loss reaches Celo through ``create``'s forward hook alone."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=LOOP_ACCUMULATION)
    if accelerator.num_processes != world_size:
        raise SystemExit(f"launched {world_size} processes, but Accelerate runs {accelerator.num_processes}")
    model = tiny_model("gpt2")
    optimizer, _ = recording_create(model, total_steps=LOOP_STEPS)
    examples = ragged_examples("gpt2", count=GLOBAL_BATCH * LOOP_ACCUMULATION * LOOP_STEPS)
    loader = DataLoader(examples, batch_size=GLOBAL_BATCH // world_size, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    forward_losses: list[float] = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        forward_losses.append(loss.item())
    celo = optimizer.optimizer
    every_process = accelerator.gather(torch.tensor(forward_losses)).reshape(world_size, LOOP_STEPS, LOOP_ACCUMULATION)
    return {"fed": celo.fed, "iteration": celo.iteration, "forward_losses": every_process,
            "params": parameter_vector(accelerator.unwrap_model(model))}


def run(out_dir: Path, world_size: int) -> None:
    """Every case of ``TRAINER_CASES`` and the Accelerate loop on ``world_size`` processes, into ``out_dir``."""
    rank = int(os.environ.get("RANK", "0"))
    for case in TRAINER_CASES:
        torch.save(train_plain_trainer(case, out_dir, world_size), out_dir / f"{case.name}-rank{rank}.pt")
    torch.save(train_accelerate_loop(world_size), out_dir / f"accelerate-rank{rank}.pt")


def main() -> None:
    run(*script_setup())


if __name__ == "__main__":
    main()
