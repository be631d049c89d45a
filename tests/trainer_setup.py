"""Tiny models, data and a recording Celo for the Trainer tests (also imported by tests/scripts/).

Models are built from configs with a few thousand parameters and no dropout; data are random token
sequences of ragged length, so padding and token-count normalisation are exercised.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import PAPER_WEIGHTS
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

import celo_hf

VOCAB = 64
PAD = 0


class RecordingCelo(celo_hf.Celo):
    """A real Celo that also keeps every loss handed to it (``fed``, Python floats)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fed: list[float] = []

    def set_loss(self, loss: Any) -> None:
        self.fed.append(float(loss))
        super().set_loss(loss)


def tiny_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """``"gpt2"`` / ``"llama"`` (causal LM) or ``"bert"`` (2-label classifier), a few thousand params."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
                            bos_token_id=1, eos_token_id=1)
        return GPT2LMHeadModel(config)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=PAD)
        return LlamaForCausalLM(config)
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD)
        model = BertForSequenceClassification(config)
        model.accepts_loss_kwargs = False  # its forward takes **kwargs but ignores num_items_in_batch
        return model
    raise ValueError(f"unknown tiny model {kind!r}, expected 'gpt2', 'llama' or 'bert'")


def ragged_examples(kind: str, count: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` examples of 4 to 12 tokens; causal-LM labels are the inputs, classifier labels are
    whether the first token is even (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(4, 13, (), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        label: Any = ids if kind in ("gpt2", "llama") else int(ids[0] % 2 == 0)
        examples.append({"input_ids": ids, "labels": label})
    return examples


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded label positions are -100."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], PAD) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
    }
    if isinstance(examples[0]["labels"], list):
        batch["labels"] = torch.tensor([pad(e["labels"], -100) for e in examples])
    else:
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


def training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """CPU, ``logging_steps=1``, 4 steps of batch 2, sequential data, no saving unless asked."""
    defaults: dict[str, Any] = dict(
        output_dir=str(output_dir), use_cpu=True, max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    return TrainingArguments(**(defaults | overrides))


def recording_celo(model: torch.nn.Module, **kwargs: Any) -> tuple[RecordingCelo, torch.optim.lr_scheduler.LambdaLR]:
    """``celo_hf.create``'s pair, with a :class:`RecordingCelo` and the paper's weights."""
    optimizer = RecordingCelo([p for p in model.parameters() if p.requires_grad], weights=PAPER_WEIGHTS, **kwargs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def recording_create(model: torch.nn.Module, **kwargs: Any) -> tuple[RecordingCelo, torch.optim.lr_scheduler.LambdaLR]:
    """``celo_hf.create(model, weights=PAPER_WEIGHTS, **kwargs)``, its Celo made a :class:`RecordingCelo`
    (the class swapped, keeping the param groups and the loss-recording hooks ``create`` installed)."""
    optimizer, scheduler = celo_hf.create(model, weights=PAPER_WEIGHTS, **kwargs)
    optimizer.__class__ = RecordingCelo
    optimizer.fed = []
    return optimizer, scheduler  # type: ignore[return-value]


def logged_losses(trainer: Trainer) -> list[float]:
    """The per-step training losses Trainer logged (``logging_steps=1``)."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parameter_vector(model: torch.nn.Module) -> torch.Tensor:
    """All parameters, flattened, in float64 (for exact comparisons and checksums)."""
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def script_setup() -> tuple[Path, int]:
    """For a tests/scripts/ Trainer run: its ``out_dir`` argument and the world size (1 or 2,
    anything else refused), with torch on one thread."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    return parser.parse_args().out_dir, process_setup()


@contextlib.contextmanager
def process_group(world_size: int) -> Iterator[None]:
    """The gloo process group of a 2-process tests/scripts/ launch, joined for the block (nothing for
    one process); torn down after a barrier, so no rank closes it while the other still uses it."""
    if world_size == 1:
        yield
        return
    dist.init_process_group("gloo")
    yield
    dist.barrier()
    dist.destroy_process_group()


def process_setup() -> int:
    """The world size of a tests/scripts/ process (1 or 2, anything else refused), with torch on one thread."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size not in (1, 2):
        raise SystemExit(f"run with 1 or 2 processes, got WORLD_SIZE={world_size}")
    torch.set_num_threads(1)
    return world_size
