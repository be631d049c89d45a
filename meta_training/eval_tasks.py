"""The held-out CPU evaluation tasks (``docs/meta-training.md`` §7.5).

Eight small problems unlike the meta-training tasks (new architectures, losses and data), all built
from data that ships with scikit-learn. ``TASKS[name].build(seed)`` returns a :class:`Problem`: a
freshly initialised model and its data stream. The data itself does not depend on the seed (it is
the same task for every run); the initialisation and the order of the batches do, so two
optimizers run with the same seed see the same init and the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import data

#: Whether the HF model task trains through ``transformers.Trainer`` (with celo_hf's Trainer
#: integration) instead of the plain loop the other tasks use. Both give the same curves.
LLAMA_THROUGH_TRAINER = False
#: Context length (tokens) of the byte-level language-model tasks.
CONTEXT = 64
#: Share of the byte text used for training; the rest is held out.
TEXT_TRAIN_FRACTION = 0.9
#: At most this many held-out windows (of ``CONTEXT`` tokens) score a language model.
HELD_OUT_WINDOWS = 64
#: Seed of the fixed data transforms (splits, feature scalings): the same task for every run.
DATA_SEED = 0

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Problem:
    """A model and its data.

    ``next_batch()`` draws the next training batch (from the run's own generator); ``loss(batch)``
    is the model's loss on a batch, a scalar with a graph to the parameters; ``held_out`` is one
    batch holding the task's held-out data. When batches are dicts of tensors and ``loss(batch)``
    is ``model(**batch).loss``, the problem can also run through ``transformers.Trainer``.
    """

    model: nn.Module
    next_batch: Callable[[], Any]
    loss: Callable[[Any], torch.Tensor]
    held_out: Any

    def train_loss(self) -> torch.Tensor:
        """The loss on the next training batch."""
        return self.loss(self.next_batch())

    def held_out_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.held_out))


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: ``steps`` optimizer steps at ``batch_size`` (``None``: full batch);
    ``build(seed)`` makes a fresh problem; ``through_trainer``: train it with
    ``transformers.Trainer`` instead of a plain loop."""

    name: str
    description: str
    steps: int
    batch_size: int | None
    make: Callable[[int, int | None], Problem]
    through_trainer: bool = False

    def build(self, seed: int) -> Problem:
        torch.manual_seed(seed)
        return self.make(seed, self.batch_size)


# ---- shared problem shapes -------------------------------------------------------------------------


def supervised_problem(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train: Pair,
    held_out: Pair,
    batch_size: int | None,
    seed: int,
) -> Problem:
    """Minibatches ``(x, y)`` drawn uniformly (with replacement) from ``train`` with a generator
    seeded by ``seed``, or the whole of ``train`` every step when ``batch_size`` is ``None``."""
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = train

    def next_batch() -> Pair:
        if batch_size is None:
            return train
        index = torch.randint(x_train.shape[0], (batch_size,), generator=generator)
        return x_train[index], y_train[index]

    return Problem(model, next_batch, lambda batch: loss_fn(model(batch[0]), batch[1]), held_out)


def _labelled_split(labelled: data.Labelled) -> tuple[Pair, Pair]:
    train, held_out = data.split(labelled, 0.8, seed=DATA_SEED)
    return (train.inputs, train.labels), (held_out.inputs, held_out.labels)


def text_windows(batch_size: int, seed: int) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Byte windows of ``CONTEXT + 1`` tokens of scikit-learn's dataset descriptions:
    ``(next_windows, held_out)``. ``next_windows()`` draws ``(batch_size, CONTEXT + 1)`` windows at
    random offsets in the first ``TEXT_TRAIN_FRACTION`` of the text; ``held_out`` holds up to
    ``HELD_OUT_WINDOWS`` consecutive windows of the rest."""
    text = data.description_text()
    cut = int(TEXT_TRAIN_FRACTION * text.numel())
    train_text, held_out_text = text[:cut], text[cut:]
    generator = torch.Generator().manual_seed(seed)
    windows = min(HELD_OUT_WINDOWS, (held_out_text.numel() - 1) // CONTEXT)

    def next_windows() -> torch.Tensor:
        starts = torch.randint(train_text.numel() - CONTEXT - 1, (batch_size,), generator=generator)
        return train_text[starts[:, None] + torch.arange(CONTEXT + 1)]

    return next_windows, held_out_text[: windows * CONTEXT + 1].unfold(0, CONTEXT + 1, CONTEXT)


def language_model_problem(model: nn.Module, batch_size: int, seed: int) -> Problem:
    """Next-byte prediction with a model mapping tokens ``(B, T)`` to logits ``(B, T, 256)``:
    the mean cross-entropy of the predictions of tokens ``1..CONTEXT`` of each window."""
    next_windows, held_out = text_windows(batch_size, seed)

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return Problem(model, next_windows, loss, held_out)


# ---- models -----------------------------------------------------------------------------------------


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: causal multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` -> ``(B, T, dim)``."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformerLM(nn.Module):
    """Byte-level decoder-only Transformer: token + learned position embeddings, pre-LN blocks,
    final LayerNorm, untied output layer."""

    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, context: int = CONTEXT):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(context, dim))
        self.blocks = nn.Sequential(*(CausalSelfAttentionBlock(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, T)`` -> logits ``(B, T, vocab)``."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


class GRULanguageModel(nn.Module):
    """Byte-level recurrent LM: embedding -> one GRU layer -> output layer."""

    def __init__(self, vocab: int = 256, embedding: int = 64, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, T)`` -> logits ``(B, T, vocab)``."""
        return self.head(self.gru(self.embed(tokens))[0])


class ResidualMLP(nn.Module):
    """``inputs -> width``, ``blocks`` residual blocks ``x + W2 gelu(W1 LayerNorm(x))``, then
    LayerNorm and a linear classifier."""

    def __init__(self, inputs: int = 64, width: int = 128, blocks: int = 4, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class TwoSoftmaxRegressions(nn.Module):
    """One linear softmax classifier per dataset: ``name -> (features, classes)``."""

    def __init__(self, sizes: dict[str, tuple[int, int]]):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(features, classes) for name, (features, classes) in sizes.items()})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: head(inputs[name]) for name, head in self.heads.items()}


# ---- the tasks ----------------------------------------------------------------------------------------


def _cnn(seed: int, batch_size: int | None) -> Problem:
    model = nn.Sequential(
        nn.Unflatten(1, (1, data.IMAGE_SIDE, data.IMAGE_SIDE)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return supervised_problem(model, F.cross_entropy, *_labelled_split(data.digits()), batch_size, seed)


def _wide_deep_mlp(seed: int, batch_size: int | None) -> Problem:
    widths = (64, 256, 256, 256)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10))
    return supervised_problem(model, F.cross_entropy, *_labelled_split(data.digits()), batch_size, seed)


def _autoencoder(seed: int, batch_size: int | None) -> Problem:
    x = data.patches(data.grey_photo("flower.jpg"), side=16, stride=8)
    train, held_out = (x[index] for index in data.split_index(x.shape[0], 0.8, seed=DATA_SEED))
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 256))
    return supervised_problem(model, F.mse_loss, (train, train), (held_out, held_out), batch_size, seed)


def _transformer_lm(seed: int, batch_size: int | None) -> Problem:
    return language_model_problem(TinyTransformerLM(), _required(batch_size), seed)


def _llama(seed: int, batch_size: int | None) -> Problem:
    """Batches are ``{"input_ids", "labels"}`` windows of ``CONTEXT + 1`` bytes and the loss is the
    model's own (labels shifted inside), so the problem runs unchanged through ``Trainer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=CONTEXT + 1, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    next_windows, held_out = text_windows(_required(batch_size), seed)
    as_inputs = lambda tokens: {"input_ids": tokens, "labels": tokens}  # noqa: E731
    return Problem(model, lambda: as_inputs(next_windows()), lambda batch: model(**batch).loss, as_inputs(held_out))


def _gru_lm(seed: int, batch_size: int | None) -> Problem:
    return language_model_problem(GRULanguageModel(), _required(batch_size), seed)


def _ill_conditioned_softmax(seed: int, batch_size: int | None) -> Problem:
    """Wine (13 features, 3 classes) and breast cancer (30 features, 2 classes), standardised on
    their 80% training split, then every feature multiplied by a fixed factor log-uniform in
    [1, 1e3]: a convex problem with condition number ~1e6. Loss: the mean of the two
    cross-entropies, full batch."""
    from sklearn.datasets import load_breast_cancer, load_wine

    if batch_size is not None:
        raise ValueError(f"the ill-conditioned softmax regression is full batch, got batch_size={batch_size}")
    generator = torch.Generator().manual_seed(DATA_SEED)
    train: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    held_out: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    sizes: dict[str, tuple[int, int]] = {}
    for name, loader in (("wine", load_wine), ("breast_cancer", load_breast_cancer)):
        bunch = loader()
        labelled = data.Labelled(torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.int64))
        fit, rest = data.split(labelled, 0.8, seed=DATA_SEED)
        mean, std = fit.inputs.mean(0), fit.inputs.std(0)
        scaling = torch.exp(torch.rand(mean.shape[0], generator=generator) * math.log(1e3))
        for (inputs, labels), part in ((train, fit), (held_out, rest)):
            inputs[name] = (part.inputs - mean) / std * scaling
            labels[name] = part.labels
        sizes[name] = (mean.shape[0], int(labelled.labels.max()) + 1)
    model = TwoSoftmaxRegressions(sizes)

    def loss(batch: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        return sum(F.cross_entropy(logits[name], labels[name]) for name in sizes) / len(sizes)

    return Problem(model, lambda: train, loss, held_out)


def _residual_mlp(seed: int, batch_size: int | None) -> Problem:
    return supervised_problem(ResidualMLP(), F.cross_entropy, *_labelled_split(data.patch_clusters("flower.jpg")), batch_size, seed)


def _required(batch_size: int | None) -> int:
    if batch_size is None:
        raise ValueError("language-model tasks need a batch size")
    return batch_size


TASKS: dict[str, EvalTask] = {
    task.name: task
    for task in (
        EvalTask("cnn", "CNN conv3x3-16, conv3x3-32, global average pool, on digits 8x8", 500, 64, _cnn),
        EvalTask("wide_deep_mlp", "MLP 64-256-256-256-10, GELU, on digits", 500, 128, _wide_deep_mlp),
        EvalTask("autoencoder", "MLP autoencoder 256-64-256, MSE, 16x16 patches of flower.jpg", 500, 64, _autoencoder),
        EvalTask("transformer_lm", "2-layer Transformer LM, d=64, 4 heads, bytes of sklearn docs", 300, 32, _transformer_lm),
        EvalTask("llama_lm", "transformers LlamaForCausalLM, 2 layers, hidden 64, bytes", 300, 16, _llama, LLAMA_THROUGH_TRAINER),
        EvalTask("gru_lm", "1-layer GRU LM, hidden 128, bytes of sklearn docs", 300, 32, _gru_lm),
        EvalTask("ill_conditioned_softmax", "softmax regression, wine + breast cancer, features x1..1e3", 500, None, _ill_conditioned_softmax),
        EvalTask("residual_mlp", "4-block residual MLP with LayerNorm, width 128, k-means flower patches", 500, 64, _residual_mlp),
    )
}
