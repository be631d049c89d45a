"""Celo2 through ``transformers.Trainer``: Trainer's learning rate, schedule and weight-decay groups
apply as for AdamW, bf16 parameters and checkpoints resume exactly (one process; two processes and
FSDP2 in ``test_celo2_distributed.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import REFERENCE
from trainer_setup import collate, parameter_vector, ragged_examples, tiny_model, training_args
from transformers import Trainer

import celo_hf

pytestmark = pytest.mark.reference
WEIGHTS = str(REFERENCE / "celo2" / "theta_random.state")


def _trainer(tmp_path, model, **args) -> Trainer:
    settings = {"learning_rate": 1e-3, "weight_decay": 0.1, **args}
    route = (celo_hf.Celo2Factory, {"weights": WEIGHTS, "lr": settings["learning_rate"], "weight_decay": settings["weight_decay"]})
    return Trainer(model, training_args(tmp_path, **settings), train_dataset=ragged_examples("gpt2"),
                   data_collator=collate, optimizer_cls_and_kwargs=route)


def test_factory_route_takes_trainers_lr_schedule_and_decay_groups(tmp_path):
    """Linear decay from 1e-3 to 0 over 4 steps (Trainer's default schedule), weight decay on the
    decay group only; every learned step's RMS is the scheduled lr of that step."""
    model = tiny_model("gpt2")
    trainer = _trainer(tmp_path, model)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    celo2 = trainer.optimizer
    assert isinstance(celo2, celo_hf.Celo2)
    assert [g["weight_decay"] for g in celo2.param_groups] == [0.1, 0.0]
    matrix = model.transformer.h[0].mlp.c_fc.weight  # learned branch, decay group
    before = matrix.detach().clone()
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert not torch.equal(matrix, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_exactly(tmp_path, dtype):
    def run(resume: bool) -> torch.Tensor:
        model = tiny_model("gpt2").to(dtype)
        trainer = _trainer(tmp_path, model, max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3") if resume else None)
        states = trainer.optimizer.state.values()
        assert all(t.dtype == torch.float32 for state in states for t in state.values())
        return parameter_vector(model)

    straight = run(resume=False)
    assert torch.equal(run(resume=True), straight)
