"""Tiny causal transformer language models for meta-training, batched over a population.

A GPT-style decoder (token + position embeddings, pre-LayerNorm blocks of multi-head causal
self-attention and a GELU MLP, a final LayerNorm, a tied or separate output head) written with
batched einsums: every tensor has a leading population axis ``P``, so ``P`` members with their own
weights run in one pass. The batch is one tensor of token windows ``(P, B, T + 1)``; the loss is the
mean next-token cross-entropy over the ``B * T`` predictions.

:class:`SequenceClassifier` is the same decoder without its LM head: the mean over positions of the
final LayerNorm's output goes through a linear classification head (a fresh head on a pretrained LM,
as ``AutoModelForSequenceClassification`` puts one on a pretrained body).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .inner import Batch, Weights, truncated_normal

#: Standard deviation of the embeddings at initialisation (GPT-2's).
EMBEDDING_STD = 0.02
HEAD_WIDTH = 8
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class TransformerConfig:
    """``vocab`` tokens, ``width`` d (a multiple of :data:`HEAD_WIDTH`), ``depth`` blocks,
    ``context`` T predictions per window; ``tied``: the head is the token embedding's transpose."""

    vocab: int
    width: int
    depth: int
    context: int
    tied: bool

    def __post_init__(self) -> None:
        if self.width % HEAD_WIDTH or self.width <= 0:
            raise ValueError(f"width must be a positive multiple of {HEAD_WIDTH}, got {self.width}")
        if self.depth < 1 or self.context < 1 or self.vocab < 2:
            raise ValueError(f"need depth >= 1, context >= 1, vocab >= 2, got {self}")

    @property
    def name(self) -> str:
        return f"lm_v{self.vocab}_d{self.width}_l{self.depth}_t{self.context}_{'tied' if self.tied else 'untied'}"


def parameter_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor; weights are ``(inputs, outputs)``."""
    d, hidden = config.width, MLP_RATIO * config.width
    shapes: dict[str, tuple[int, ...]] = {"tokens": (config.vocab, d), "positions": (config.context, d)}
    for layer in range(config.depth):
        shapes |= {
            f"{layer}.ln1.gain": (d,), f"{layer}.ln1.bias": (d,), f"{layer}.qkv": (d, 3 * d), f"{layer}.proj": (d, d),
            f"{layer}.ln2.gain": (d,), f"{layer}.ln2.bias": (d,), f"{layer}.fc1": (d, hidden), f"{layer}.fc1.bias": (hidden,),
            f"{layer}.fc2": (hidden, d), f"{layer}.fc2.bias": (d,),
        }
    shapes |= {"lnf.gain": (d,), "lnf.bias": (d,)}
    if not config.tied:
        shapes["head"] = (d, config.vocab)
    return shapes


def matrix_names(config: TransformerConfig) -> tuple[str, ...]:
    """The block and head matrices (what low-rank adapters adapt; embeddings excluded)."""
    return tuple(name for name, shape in parameter_shapes(config).items()
                 if len(shape) == 2 and name not in ("tokens", "positions"))


def init_weights(config: TransformerConfig, generator: torch.Generator) -> Weights:
    """Embeddings ``N(0, 0.02^2)``, matrices truncated normal with std ``1/sqrt(fan_in)``, LayerNorm
    gains 1, biases 0."""
    weights = {}
    for name, shape in parameter_shapes(config).items():
        if name in ("tokens", "positions"):
            weights[name] = torch.randn(shape, generator=generator) * EMBEDDING_STD
        elif len(shape) == 2:
            weights[name] = truncated_normal(shape, generator)
        else:
            weights[name] = torch.ones(shape) if name.endswith("gain") else torch.zeros(shape)
    return weights


def layer_norm(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis of ``x`` ``(P, ..., d)`` with per-member ``gain``/``bias`` ``(P, d)``."""
    view = (gain.shape[0],) + (1,) * (x.dim() - 2) + (gain.shape[1],)
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * gain.view(view) + bias.view(view)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(P, B, T, i)`` times per-member ``weight`` ``(P, i, o)`` (+ ``bias`` ``(P, o)``)."""
    out = torch.einsum("pbti,pio->pbto", x, weight)
    return out if bias is None else out + bias[:, None, None]


def causal_attention(x: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Multi-head causal self-attention of ``x`` ``(P, B, T, d)``, heads of :data:`HEAD_WIDTH`."""
    p, b, t, d = x.shape
    q, k, v = linear(x, qkv).view(p, b, t, 3, d // HEAD_WIDTH, HEAD_WIDTH).unbind(3)
    scores = torch.einsum("pbqhe,pbkhe->pbhqk", q, k) * HEAD_WIDTH**-0.5
    future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    attention = scores.masked_fill(future, float("-inf")).softmax(-1)
    mixed = torch.einsum("pbhqk,pbkhe->pbqhe", attention, v).reshape(p, b, t, d)
    return linear(mixed, proj)


def hidden_states(config: TransformerConfig, w: Weights, inputs: torch.Tensor) -> torch.Tensor:
    """``(P, B, T, d)`` outputs of the final LayerNorm of members ``w`` (``name -> (P, *shape)``) on
    token ids ``inputs`` ``(P, B, T)``."""
    p, b, t = inputs.shape
    members = torch.arange(p, device=inputs.device)[:, None, None]
    x = w["tokens"][members, inputs] + w["positions"][:, None, :t]
    for layer in range(config.depth):
        h = layer_norm(x, w[f"{layer}.ln1.gain"], w[f"{layer}.ln1.bias"])
        x = x + causal_attention(h, w[f"{layer}.qkv"], w[f"{layer}.proj"])
        h = layer_norm(x, w[f"{layer}.ln2.gain"], w[f"{layer}.ln2.bias"])
        h = F.gelu(linear(h, w[f"{layer}.fc1"], w[f"{layer}.fc1.bias"]))
        x = x + linear(h, w[f"{layer}.fc2"], w[f"{layer}.fc2.bias"])
    return layer_norm(x, w["lnf.gain"], w["lnf.bias"])


def logits(config: TransformerConfig, w: Weights, inputs: torch.Tensor) -> torch.Tensor:
    """``(P, B, T, vocab)`` next-token logits of members ``w`` on token ids ``inputs`` ``(P, B, T)``."""
    head = w["tokens"].transpose(1, 2) if config.tied else w["head"]
    return linear(hidden_states(config, w, inputs), head)


def next_token_losses(config: TransformerConfig, w: Weights, windows: torch.Tensor) -> torch.Tensor:
    """``(P,)`` mean next-token cross-entropy on ``windows`` ``(P, B, T + 1)``."""
    out = logits(config, w, windows[..., :-1])
    targets = windows[..., 1:]
    return F.cross_entropy(out.flatten(0, 2), targets.flatten(), reduction="none").view(targets.shape).flatten(1).mean(1)


@dataclass(frozen=True)
class TransformerLM:
    """An :class:`~meta_training.inner.InnerModel` trained from scratch: every tensor trainable."""

    config: TransformerConfig
    shapes: Mapping[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", parameter_shapes(self.config))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return self.config.vocab

    def init(self, generator: torch.Generator) -> Weights:
        return init_weights(self.config, generator)

    def losses_of_weights(self, weights: Weights, batch: Batch) -> torch.Tensor:
        (windows,) = batch
        return next_token_losses(self.config, weights, windows)


#: Standard deviation of a fresh classification head's weight (``transformers``' ``initializer_range``).
CLASSIFIER_STD = 0.02


def body_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """:func:`parameter_shapes` without the LM head: what a classifier keeps of a pretrained LM."""
    return {name: shape for name, shape in parameter_shapes(config).items() if name != "head"}


@dataclass(frozen=True)
class SequenceClassifier:
    """An :class:`~meta_training.inner.InnerModel`: the decoder of ``config`` (no LM head) with a
    linear head ``"cls.weight"`` ``(d, classes)`` + ``"cls.bias"`` ``(classes,)`` on the mean over
    positions of its final hidden states. Batch: token ids ``(P, B, T)`` and labels ``(P, B)``; the
    loss is the mean cross-entropy."""

    config: TransformerConfig
    classes: int
    shapes: Mapping[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        if self.classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.classes}")
        head = {"cls.weight": (self.config.width, self.classes), "cls.bias": (self.classes,)}
        object.__setattr__(self, "shapes", body_shapes(self.config) | head)

    @property
    def name(self) -> str:
        return f"cls{self.classes}_{self.config.name}"

    @property
    def num_classes(self) -> int:
        return self.classes

    def init(self, generator: torch.Generator) -> Weights:
        """The body as :func:`init_weights`; the head's weight ``N(0, CLASSIFIER_STD^2)``, its bias 0."""
        body = {name: value for name, value in init_weights(self.config, generator).items() if name in self.shapes}
        weight = torch.randn(self.shapes["cls.weight"], generator=generator) * CLASSIFIER_STD
        return body | {"cls.weight": weight, "cls.bias": torch.zeros(self.classes)}

    def losses_of_weights(self, weights: Weights, batch: Batch) -> torch.Tensor:
        tokens, labels = batch
        pooled = hidden_states(self.config, weights, tokens).mean(2)
        out = torch.baddbmm(weights["cls.bias"][:, None], pooled, weights["cls.weight"])
        return F.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)
