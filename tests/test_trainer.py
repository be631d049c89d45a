"""Celo inside transformers.Trainer, one process: the fed loss, the step count, resume, the routes in."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer
from trainer_setup import (
    PAPER_WEIGHTS,
    collate,
    logged_losses,
    parameter_vector,
    ragged_examples,
    recording_celo,
    tiny_model,
    training_args,
)

import celo_hf

pytestmark = pytest.mark.reference  # every Trainer here runs Celo with the paper's checkpoint

def make_trainer(kind: str, output_dir, optimizers=(None, None), trainer_class=celo_hf.CeloTrainer, model=None, **args):
    model = model if model is not None else tiny_model(kind)
    return trainer_class(
        model, training_args(output_dir, **args), train_dataset=ragged_examples(kind), data_collator=collate,
        optimizers=optimizers,
    )


@pytest.mark.parametrize("kind, accumulation", [("gpt2", 1), ("gpt2", 2), ("llama", 2), ("bert", 1), ("bert", 2)])
def test_fed_loss_is_the_logged_loss(tmp_path, kind, accumulation):
    model = tiny_model(kind)
    optimizer, scheduler = recording_celo(model)
    trainer = make_trainer(kind, tmp_path, (optimizer, scheduler), model=model, gradient_accumulation_steps=accumulation)
    trainer.train()
    assert len(optimizer.fed) == 4
    assert optimizer.fed == logged_losses(trainer)
    assert optimizer.iteration == 4 and optimizer.skipped_steps == 0
    if kind == "bert":  # the mean cross-entropy of 2 labels, not GA times it (the accepts_loss_kwargs quirk)
        assert all(0.5 < loss < 0.9 for loss in optimizer.fed)


def test_total_steps_taken_from_trainer(tmp_path):
    model = tiny_model("gpt2")
    trainer = make_trainer("gpt2", tmp_path, celo_hf.create(model, weights=PAPER_WEIGHTS), model=model, max_steps=3)
    trainer.train()
    celo = trainer.optimizer.optimizer
    assert isinstance(celo, celo_hf.Celo)
    assert (celo.total_steps, celo.iteration) == (3, 3)


def test_total_steps_given_and_different_warns_and_uses_trainers(tmp_path):
    model = tiny_model("gpt2")
    trainer = make_trainer("gpt2", tmp_path, celo_hf.create(model, 100, weights=PAPER_WEIGHTS), model=model)
    with pytest.warns(UserWarning, match=r"total_steps=100.*state\.max_steps=4"):
        trainer.train()
    assert trainer.optimizer.optimizer.total_steps == 4


def test_attach_gives_any_trainer_subclass_the_pieces(tmp_path):
    class MyTrainer(Trainer):
        pass

    model = tiny_model("gpt2")
    optimizer, scheduler = recording_celo(model)
    trainer = make_trainer("gpt2", tmp_path, (optimizer, scheduler), MyTrainer, model=model, gradient_accumulation_steps=2)
    assert celo_hf.attach(trainer) is trainer
    assert celo_hf.attach(trainer) is trainer  # a second call changes nothing
    assert isinstance(trainer, MyTrainer) and isinstance(trainer, celo_hf.CeloTrainerMixin)
    assert sum(isinstance(cb, celo_hf.CeloCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert optimizer.fed == logged_losses(trainer)


def test_gradient_clipping_and_bf16_autocast(tmp_path):
    model = tiny_model("llama")
    optimizer, scheduler = recording_celo(model)
    trainer = make_trainer("llama", tmp_path, (optimizer, scheduler), model=model, bf16=True, max_grad_norm=0.01,
                           gradient_accumulation_steps=2)
    trainer.train()
    assert optimizer.fed == logged_losses(trainer)
    grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(grad_norms) == 4 and all(norm > 0.01 for norm in grad_norms)  # pre-clipping norms: clipping was active
    assert optimizer.iteration == 4 and optimizer.skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_factory_route_builds_celo_with_a_constant_schedule(tmp_path):
    model = tiny_model("gpt2")
    before = parameter_vector(model)
    trainer = celo_hf.CeloTrainer(
        model, training_args(tmp_path), train_dataset=ragged_examples("gpt2"), data_collator=collate,
        optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {"weights": PAPER_WEIGHTS}),
    )
    with pytest.warns(UserWarning, match="lr_scheduler_type='linear' is not applied"):
        trainer.train()
    celo = trainer.optimizer.optimizer
    assert isinstance(celo, celo_hf.Celo)
    assert (celo.total_steps, celo.iteration) == (4, 4)
    assert [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry] == [1.0] * 4
    assert not torch.equal(parameter_vector(model), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_exactly(tmp_path, dtype):
    def run(resume: bool) -> tuple[torch.Tensor, list[float], celo_hf.Celo]:
        model = tiny_model("gpt2").to(dtype)
        optimizer, scheduler = recording_celo(model)
        trainer = make_trainer("gpt2", tmp_path, (optimizer, scheduler), model=model, max_steps=6,
                               gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3") if resume else None)
        return parameter_vector(model), optimizer.fed, optimizer

    straight, straight_fed, _ = run(resume=False)
    resumed, resumed_fed, optimizer = run(resume=True)
    assert resumed_fed == straight_fed[3:]
    assert torch.equal(resumed, straight)
    assert optimizer.iteration == 6
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values())


def test_deepspeed_is_refused(tmp_path):
    trainer = make_trainer("gpt2", tmp_path, trainer_class=Trainer)
    trainer.is_deepspeed_enabled = True  # what Trainer sets when accelerate runs a DeepSpeed plugin
    with pytest.raises(RuntimeError, match="Celo cannot run under DeepSpeed"):
        celo_hf.attach(trainer)
