"""Train tiny models with CeloTrainer and save what each process saw; run alone or under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/scripts/ddp_trainer.py OUT_DIR
    python tests/scripts/ddp_trainer.py OUT_DIR

The global batch is the same either way (per-device batch 2 x 2 processes, or 4 x 1).

For each case of ``CASES`` it writes ``OUT_DIR/{case}-rank{r}.pt``: the losses fed to Celo, the
losses Trainer logged, and the final parameters (float64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_setup import (  # noqa: E402
    collate,
    logged_losses,
    parameter_vector,
    ragged_examples,
    recording_celo,
    script_setup,
    tiny_model,
    training_args,
)

import celo_hf  # noqa: E402

#: (model kind, gradient accumulation steps)
CASES = (("gpt2", 1), ("gpt2", 2), ("bert", 2))
#: Examples per micro-batch over all processes (the per-device batch is this / world size).
GLOBAL_BATCH = 4


def run(out_dir: Path, world_size: int) -> None:
    """Every case of ``CASES`` on ``world_size`` processes (this one among them), into ``out_dir``."""
    batch = GLOBAL_BATCH // world_size
    for kind, accumulation in CASES:
        model = tiny_model(kind)
        optimizer, scheduler = recording_celo(model)
        trainer = celo_hf.CeloTrainer(
            model,
            training_args(out_dir / "trainer", per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation),
            train_dataset=ragged_examples(kind),
            data_collator=collate,
            optimizers=(optimizer, scheduler),
        )
        if trainer.args.world_size != world_size:
            raise SystemExit(f"launched {world_size} processes, but Trainer runs {trainer.args.world_size}")
        trainer.train()
        rank = trainer.args.process_index
        result = {"fed": optimizer.fed, "logged": logged_losses(trainer), "params": parameter_vector(model)}
        torch.save(result, out_dir / f"{kind}-ga{accumulation}-rank{rank}.pt")


def main() -> None:
    run(*script_setup())


if __name__ == "__main__":
    main()
