"""A plain ``transformers.Trainer`` and a plain Accelerate loop train with ``celo_hf.create``: the loss
comes from the model's training forwards (celo_hf.loss_recording), exactly Trainer's logged loss with
``CeloCallback``, that times one constant without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from scripts.plain_loops import TRAINER_CASES, train_accelerate_loop, train_plain_trainer
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutput
from trainer_setup import (
    PAPER_WEIGHTS,
    VOCAB,
    collate,
    logged_losses,
    parameter_vector,
    ragged_examples,
    recording_create,
    tiny_model,
    training_args,
)

import celo_hf
from celo_hf.loss_recording import recorder_for


pytestmark = pytest.mark.reference  # every Celo here runs with the paper's checkpoint


def plain_trainer(model: torch.nn.Module, kind: str, optimizers: Any, output_dir: Path, callback: bool = True,
                  trainer_class: type[Trainer] = Trainer, compute_loss_func: Any = None, **args: Any) -> Trainer:
    return trainer_class(
        model, training_args(output_dir, **args), train_dataset=ragged_examples(kind), data_collator=collate,
        optimizers=optimizers, callbacks=[celo_hf.CeloCallback()] if callback else None,
        compute_loss_func=compute_loss_func,
    )


def batch(kind: str = "gpt2", start: int = 0) -> dict[str, torch.Tensor]:
    return collate(ragged_examples(kind)[start:start + 2])


class TaggerLM(torch.nn.Module):
    """A tiny token tagger returning a ``ModelOutput`` with its loss: the sum of the token
    cross-entropies over ``num_items_in_batch`` when given (as Trainer gives it), else their mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutput:
        logits = self.head(self.embed(input_ids))
        if labels is None:
            return CausalLMOutput(logits=logits)
        num_items = kwargs.get("num_items_in_batch")
        reduction = "mean" if num_items is None else "sum"
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction)
        return CausalLMOutput(loss=loss if num_items is None else loss / num_items, logits=logits)


@pytest.mark.parametrize("case", TRAINER_CASES, ids=lambda case: case.name)
def test_plain_trainer_feeds_the_logged_loss(tmp_path, case):
    """One process, evaluating every 2 steps: with the callback exactly the logged loss; without it
    too (the constant is the world size's inverse for token-normalised losses: here 1)."""
    result = train_plain_trainer(case, tmp_path, world_size=1)
    assert len(result["fed"]) == 4
    assert result["fed"] == result["logged"]


@pytest.mark.parametrize("callback", [True, False])
@pytest.mark.parametrize("precision", ["bf16 autocast", "bf16 parameters"])
def test_bf16(tmp_path, callback, precision):
    model = tiny_model("llama")
    if precision == "bf16 parameters":
        model = model.to(torch.bfloat16)
    optimizer, scheduler = recording_create(model, total_steps=4)
    trainer = plain_trainer(model, "llama", (optimizer, scheduler), tmp_path, callback, gradient_accumulation_steps=2,
                            bf16=precision == "bf16 autocast")
    trainer.train()
    assert optimizer.fed == logged_losses(trainer)


@pytest.mark.parametrize("callback", [True, False])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_does_not_double_count(tmp_path, callback, use_reentrant):
    model = tiny_model("gpt2")
    optimizer, scheduler = recording_create(model, total_steps=4)
    trainer = plain_trainer(model, "gpt2", (optimizer, scheduler), tmp_path, callback, gradient_accumulation_steps=2,
                            activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    trainer.train()
    assert optimizer.fed == logged_losses(trainer)


def test_forward_recomputed_inside_backward_is_not_recorded():
    """The whole model checkpointed, recomputed to the end (no early stop), two accumulated
    micro-batches: each forward runs again during backward, and is not recorded."""
    model = tiny_model("gpt2").train()
    recorder = recorder_for(model)
    losses = []
    with set_checkpoint_early_stop(False):
        for start in (0, 2):
            losses.append(checkpoint(lambda inputs: model(**inputs).loss, batch(start=start), use_reentrant=False))
            losses[-1].backward()
    assert [record.loss for record in recorder.records] == [loss.detach() for loss in losses]


@pytest.mark.slow
@pytest.mark.parametrize("callback", [True, False])
def test_compiled_model_does_not_double_count(tmp_path, callback):
    """``torch_compile=True`` (dynamo with its eager backend: the compilation Trainer does, without
    code generation), gradient accumulation, a loss normalised by ``num_items_in_batch``."""
    model = TaggerLM()
    optimizer, scheduler = recording_create(model, total_steps=4)
    trainer = plain_trainer(model, "gpt2", (optimizer, scheduler), tmp_path, callback, gradient_accumulation_steps=2,
                            torch_compile=True, torch_compile_backend="eager")
    trainer.train()
    assert trainer.model_accepts_loss_kwargs and trainer.model_wrapped is not model  # normalised, and compiled
    assert optimizer.fed == logged_losses(trainer)


@pytest.mark.parametrize("callback", [True, False])
def test_resume_continues_exactly(tmp_path, callback):
    def run(resume: bool) -> tuple[torch.Tensor, list[float]]:
        model = tiny_model("gpt2")
        optimizer, scheduler = recording_create(model, total_steps=None if callback else 6)
        trainer = plain_trainer(model, "gpt2", (optimizer, scheduler), tmp_path, callback, max_steps=6,
                                gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3") if resume else None)
        assert optimizer.iteration == 6
        return parameter_vector(model), optimizer.fed

    straight, straight_fed = run(resume=False)
    resumed, resumed_fed = run(resume=True)
    assert resumed_fed == straight_fed[3:]
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("callback", [True, False])
@pytest.mark.parametrize("outside_the_model", ["compute_loss_func", "label_smoothing"])
def test_loss_computed_outside_the_model_fails_at_the_first_step(tmp_path, callback, outside_the_model):
    model = tiny_model("gpt2")
    before = parameter_vector(model)
    optimizer, scheduler = recording_create(model, total_steps=4)
    if outside_the_model == "compute_loss_func":
        options = {"compute_loss_func": lambda outputs, labels, num_items_in_batch: outputs.logits.square().mean()}
    else:
        options = {"label_smoothing_factor": 0.1}
    trainer = plain_trainer(model, "gpt2", (optimizer, scheduler), tmp_path, callback, **options)
    with pytest.raises(RuntimeError, match=r"returned no 'loss'.*celo_hf\.CeloTrainer\(\.\.\.\).*celo_hf\.attach"):
        trainer.train()
    assert torch.equal(parameter_vector(model), before)


def test_attach_feeds_a_loss_the_model_does_not_return(tmp_path):
    """A custom ``compute_loss`` changes the model's loss: the mixin's recorded loss wins over the forward's."""

    class OffsetTrainer(Trainer):
        def compute_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return super().compute_loss(*args, **kwargs) + 1.0

    model = tiny_model("gpt2")
    optimizer, scheduler = recording_create(model)
    trainer = celo_hf.attach(plain_trainer(model, "gpt2", (optimizer, scheduler), tmp_path, callback=False,
                                           trainer_class=OffsetTrainer, gradient_accumulation_steps=2))
    trainer.train()
    assert optimizer.fed == logged_losses(trainer)
    assert all(loss > 4.0 for loss in optimizer.fed)  # the model's own loss is about 3.7


def test_without_total_steps_or_callback_the_first_step_fails(tmp_path):
    model = tiny_model("gpt2")
    before = parameter_vector(model)
    trainer = plain_trainer(model, "gpt2", celo_hf.create(model, weights=PAPER_WEIGHTS), tmp_path, callback=False)
    with pytest.raises(RuntimeError, match=r"celo_hf\.create\(model, total_steps=N\).*celo_hf\.CeloCallback\(\)"):
        trainer.train()
    assert torch.equal(parameter_vector(model), before)


def test_total_steps_given_to_create_is_used_without_callback(tmp_path):
    model = tiny_model("gpt2")
    optimizer, scheduler = recording_create(model, total_steps=10)
    plain_trainer(model, "gpt2", (optimizer, scheduler), tmp_path, callback=False).train()
    assert (optimizer.total_steps, optimizer.iteration) == (10, 4)


def train_steps(model: torch.nn.Module, optimizer: celo_hf.Celo, step: Any, steps: int = 3) -> torch.Tensor:
    """A plain loop of ``steps`` steps (``step(optimizer, loss)`` takes each); the final parameters."""
    model.train()
    for i in range(steps):
        loss = model(**batch(start=2 * i)).loss
        loss.backward()
        step(optimizer, loss)
        optimizer.zero_grad()
    return parameter_vector(model)


@pytest.mark.parametrize("way", ["step(loss=)", "set_loss", "closure"])
def test_a_loss_given_to_the_step_wins_over_the_recorded_one(way):
    """Given 1 / loss (Celo's scheduler ignores affine changes of the loss, not this), Celo runs as one
    given 1 / loss without any recording, and not as one fed the recorded loss."""
    steps = {
        "step(loss=)": lambda opt, loss: opt.step(loss=1 / loss.detach()),
        "set_loss": lambda opt, loss: (opt.set_loss(1 / loss.detach()), opt.step()),
        "closure": lambda opt, loss: opt.step(lambda: 1 / loss.detach()),
    }
    model = tiny_model("gpt2")
    given = train_steps(model, celo_hf.create(model, 3, weights=PAPER_WEIGHTS)[0], steps[way])
    model = tiny_model("gpt2")
    unrecorded = train_steps(model, celo_hf.Celo(model.parameters(), 3, weights=PAPER_WEIGHTS), steps["step(loss=)"])
    model = tiny_model("gpt2")
    recorded = train_steps(model, celo_hf.create(model, 3, weights=PAPER_WEIGHTS)[0], lambda opt, loss: opt.step())
    assert torch.equal(given, unrecorded)
    assert not torch.equal(given, recorded)


def test_recorded_loss_is_the_forwards_loss():
    model = tiny_model("gpt2")
    optimizer, _ = recording_create(model, total_steps=2)
    losses: list[float] = []
    train_steps(model, optimizer, lambda opt, loss: (losses.append(loss.item()), opt.step()))
    assert optimizer.fed == losses


def test_forwards_of_a_step_that_never_ran_are_dropped():
    """As after a step ``GradScaler`` skips: backward, ``zero_grad()``, no ``step()``."""
    model = tiny_model("gpt2").train()
    optimizer, _ = recording_create(model, total_steps=2)
    model(**batch(start=0)).loss.backward()
    optimizer.zero_grad()
    loss = model(**batch(start=2)).loss
    loss.backward()
    optimizer.step()
    assert optimizer.fed == [loss.item()]


def test_only_training_forwards_are_recorded():
    model = tiny_model("gpt2")
    recorder = recorder_for(model)
    inputs = batch()
    with torch.no_grad():
        model.train()(**inputs)
    model.eval()(**inputs)
    model.generate(inputs["input_ids"][:1, :3], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert recorder.records == [] and recorder.lossless_forwards == 0
    model.train()(**{key: value for key, value in inputs.items() if key != "labels"})
    assert recorder.records == [] and recorder.lossless_forwards == 1
    loss = model(**inputs).loss
    assert [(record.loss, record.normalised) for record in recorder.records] == [(loss.detach(), False)]
    assert recorder_for(model) is recorder


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_parameter_groups_are_trainers_decay_split(tmp_path, kind):
    model = tiny_model(kind)
    optimizer, _ = celo_hf.create(model, weights=PAPER_WEIGHTS)
    decay_names = set(Trainer(model, training_args(tmp_path)).get_decay_parameter_names(model))
    names = {id(p): name for name, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in group["params"]] for group in optimizer.param_groups)
    assert decay == [name for name in names.values() if name in decay_names]
    assert no_decay == [name for name in names.values() if name not in decay_names] and no_decay
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.0]


@pytest.mark.parametrize("route", ["create", "create(weight_decay=0.05)", "CeloFactory"])
def test_weight_decay_reaches_the_decay_group(tmp_path, route):
    """``TrainingArguments.weight_decay`` is set on the decay group at train begin; an explicit value wins.
    (What a group's ``weight_decay`` does in the step is ``Celo``'s.)"""
    model = tiny_model("gpt2")
    args = {"weight_decay": 0.1, "max_steps": 1}
    if route == "CeloFactory":
        trainer = celo_hf.CeloTrainer(model, training_args(tmp_path, **args), train_dataset=ragged_examples("gpt2"),
                                      data_collator=collate,
                                      optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {"weights": PAPER_WEIGHTS}))
    else:
        explicit = {"weight_decay": 0.05} if route != "create" else {}
        trainer = plain_trainer(model, "gpt2", celo_hf.create(model, weights=PAPER_WEIGHTS, **explicit), tmp_path, **args)
    trainer.train()
    expected = 0.05 if route == "create(weight_decay=0.05)" else 0.1
    assert [group["weight_decay"] for group in trainer.optimizer.optimizer.param_groups] == [expected, 0.0]


def test_default_groups_keep_the_results_of_one_group():
    grouped_model, plain_model = tiny_model("gpt2"), tiny_model("gpt2")
    grouped = celo_hf.create(grouped_model, 3, weights=PAPER_WEIGHTS)[0]
    plain = celo_hf.Celo(plain_model.parameters(), 3, weights=PAPER_WEIGHTS)
    assert len(grouped.param_groups) == 2
    step = lambda opt, loss: opt.step(loss=loss)  # noqa: E731
    assert torch.equal(train_steps(grouped_model, grouped, step), train_steps(plain_model, plain, step))


def test_accelerate_loop_one_process():
    result = train_accelerate_loop(world_size=1)
    assert result["iteration"] == 4
    torch.testing.assert_close(result["fed"], result["forward_losses"].mean(dim=(0, 2)).tolist(), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_two_processes(two_process_runs):
    """2 gloo processes, per-device batch 2 (the one-process tests run 4): the same loss on every rank
    and bit-identical parameters; with the callback the logged loss, without it the logged loss times
    one constant; the Accelerate loop feeds the mean of every process's micro-batch losses
    (tests/scripts/plain_loops.py, run by the conftest fixture ``two_process_runs``)."""
    tmp_path = two_process_runs / "plain_loops"
    for name in [case.name for case in TRAINER_CASES] + ["accelerate"]:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1)]
        assert ranks[0]["fed"] == ranks[1]["fed"] and len(ranks[0]["fed"]) == 4, name
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), name
    for case in TRAINER_CASES:
        fed, logged = (torch.load(tmp_path / f"{case.name}-rank0.pt")[key] for key in ("fed", "logged"))
        if case.callback:
            assert fed == logged, case.name
        else:
            ratios = {f / l for f, l in zip(fed, logged)}
            assert ratios == ({0.5} if case.kind == "gpt2" else {1.0}), case.name  # gpt2: tokens over both processes
    loop = torch.load(tmp_path / "accelerate-rank0.pt")
    torch.testing.assert_close(loop["fed"], loop["forward_losses"].mean(dim=(0, 2)).tolist(), rtol=1e-6, atol=0)
