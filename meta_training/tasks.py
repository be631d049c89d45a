"""Meta-training task families: 10-way classification of 8x8 grey images (``docs/meta-training.md`` §3).

A family turns a generator into a task and a (task, generator) pair into training batches, and
names the model that trains on them (:mod:`meta_training.inner`). Every draw
comes from the generator it is handed, so a PES slot that owns one generator gets one reproducible
stream of tasks and batches, which its "+" and "-" copies share.

Families (``FAMILIES``):

* offline (§7.4): ``digits`` (scikit-learn's digits, 80% split, pixels / 16), ``permuted_digits``
  (the same with a random pixel and label permutation per task), ``patches`` (8x8 grey patches of
  ``china.jpg`` labelled by 10-way k-means, 80% split), ``teacher`` (Gaussian inputs labelled by a
  random teacher MLP per task, 5% label noise);
* the paper's (§3, need the network or a local copy): ``mnist``, ``fashion_mnist``, ``cifar10``,
  ``svhn``: the first 80% of the official train split at 8x8 grey.

* Trainer-like (ours): ``lm_*`` tiny causal transformers trained from scratch on Shakespeare's
  histories (characters, :func:`meta_training.data.shakespeare`) at several widths, depths and
  contexts; ``ft_digits_{full,head,lora}`` an MLP pretrained by AdamW on digits 0-4 fine-tuned on
  digits 5-9 (every tensor / a fresh head / low-rank adapters); ``ft_lm_{full,lora}`` a tiny LM
  pretrained on the comedies fine-tuned on the tragedies; ``ft_cls_{full,lora}`` that LM's body
  with a fresh classification head fine-tuned to tell which Roman play a window comes from (every
  tensor / low-rank adapters and the head), as ``Trainer`` users fine-tune a pretrained transformer
  for sequence classification.

Each family names the inner model it trains (``family.model``, :class:`meta_training.inner.InnerModel`)
and its batch size. Task augmentation (§3.1) draws reparameterisation scales with :func:`sample_scales`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from . import data, finetune, inner
from .transformer import (
    SequenceClassifier,
    TransformerConfig,
    TransformerLM,
    matrix_names,
)

NUM_CLASSES = 10
INPUTS = data.IMAGE_SIDE * data.IMAGE_SIDE
TRAIN_FRACTION = 0.8
BATCH_SIZE = 64

Task = dict[str, torch.Tensor]
ReparamLevel = Literal["global", "tensor", "parameter"]


@dataclass(frozen=True)
class DatasetFamily:
    """One fixed labelled set: every sampled task is the same; batches are drawn uniformly with
    replacement (the reference reshuffles per epoch; for batches of 64 from thousands of
    examples the difference is immaterial)."""

    name: str
    train: data.Labelled
    num_classes: int = NUM_CLASSES
    model: inner.InnerModel = inner.MLP
    batch_size: int = BATCH_SIZE

    def sample_task(self, generator: torch.Generator) -> Task:
        return {}

    def sample_batch(self, task: Task, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(batch_size, 64)`` float32, ``y`` ``(batch_size,)`` int64."""
        index = torch.randint(len(self.train), (batch_size,), generator=generator)
        return self.train.inputs[index], self.train.labels[index]


@dataclass(frozen=True)
class PermutedFamily:
    """Tasks made from a base family by a fixed random permutation of the input pixels and of the
    labels, drawn per task (a new input statistic for every task)."""

    name: str
    base: DatasetFamily
    num_classes: int = NUM_CLASSES
    model: inner.InnerModel = inner.MLP
    batch_size: int = BATCH_SIZE

    def sample_task(self, generator: torch.Generator) -> Task:
        return {
            "pixels": torch.randperm(INPUTS, generator=generator),
            "labels": torch.randperm(self.num_classes, generator=generator),
        }

    def sample_batch(self, task: Task, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.sample_batch({}, generator, batch_size)
        return x[:, task["pixels"]], task["labels"][y]


@dataclass(frozen=True)
class TeacherFamily:
    """Synthetic tasks: standard-normal inputs in 64-D labelled by ``argmax`` of a random teacher
    MLP ``64 -> hidden -> 10`` (tanh, no biases, drawn per task); a fraction ``label_noise`` of the
    labels is replaced by uniform random classes. Fresh inputs every batch (infinite data)."""

    name: str = "teacher"
    hidden: int = 32
    label_noise: float = 0.05
    num_classes: int = NUM_CLASSES
    model: inner.InnerModel = inner.MLP
    batch_size: int = BATCH_SIZE

    def sample_task(self, generator: torch.Generator) -> Task:
        return {
            "w1": torch.randn(INPUTS, self.hidden, generator=generator) / math.sqrt(INPUTS),
            "w2": torch.randn(self.hidden, self.num_classes, generator=generator) / math.sqrt(self.hidden),
        }

    def sample_batch(self, task: Task, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, INPUTS, generator=generator)
        y = (torch.tanh(x @ task["w1"]) @ task["w2"]).argmax(1)
        noisy = torch.rand(batch_size, generator=generator) < self.label_noise
        random_labels = torch.randint(self.num_classes, (batch_size,), generator=generator)
        return x, torch.where(noisy, random_labels, y)


@dataclass(frozen=True)
class TextFamily:
    """Language modelling on one text: batches of ``batch_size`` windows of ``context + 1`` token
    ids at uniform random offsets, as ``((batch_size, context + 1),)``."""

    name: str
    text: torch.Tensor
    context: int
    model: inner.InnerModel
    batch_size: int

    def sample_task(self, generator: torch.Generator) -> Task:
        return {}

    def sample_batch(self, task: Task, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor]:
        starts = torch.randint(len(self.text) - self.context, (batch_size,), generator=generator)
        return (self.text[starts[:, None] + torch.arange(self.context + 1)],)


@dataclass(frozen=True)
class TextClassFamily:
    """Which text a window comes from: class ``c`` is ``texts[c]``. A batch draws ``batch_size``
    labels uniformly, then for each a window of ``context`` token ids at a uniform random offset
    in its text: ``(ids (batch_size, context), labels (batch_size,))``."""

    name: str
    texts: tuple[torch.Tensor, ...]
    context: int
    model: inner.InnerModel
    batch_size: int
    #: The texts end to end, each text's length and where it starts there (made once, not per batch).
    joined: torch.Tensor = field(init=False, repr=False)
    lengths: torch.Tensor = field(init=False, repr=False)
    offsets: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        short = [len(t) for t in self.texts if len(t) <= self.context]
        if len(self.texts) < 2 or short:
            raise ValueError(f"{self.name}: need at least 2 texts longer than the context {self.context}, "
                             f"got {len(self.texts)} (too short: {short})")
        lengths = torch.tensor([len(t) for t in self.texts])
        for name, value in (("joined", torch.cat(self.texts)), ("lengths", lengths), ("offsets", lengths.cumsum(0) - lengths)):
            object.__setattr__(self, name, value)

    def sample_task(self, generator: torch.Generator) -> Task:
        return {}

    def sample_batch(self, task: Task, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(self.texts), (batch_size,), generator=generator)
        room = self.lengths[labels] - self.context + 1
        starts = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * room).long()
        return self.joined[(self.offsets[labels] + starts)[:, None] + torch.arange(self.context)], labels


TaskFamily = DatasetFamily | PermutedFamily | TeacherFamily | TextFamily | TextClassFamily

#: From-scratch language models: ``name -> (width, depth, context, tied head, batch size)``.
LM_FAMILIES = {
    "lm_d16_l1_t16": (16, 1, 16, True, 8),
    "lm_d16_l2_t32": (16, 2, 32, False, 4),
    "lm_d32_l1_t32": (32, 1, 32, True, 4),
}
#: The fine-tuned LM's shape (that of ``lm_d32_l1_t32``) and its pretraining genre.
FINETUNE_LM = "lm_d32_l1_t32"
LM_TEXT, LM_PRETRAIN_TEXT, LM_FINETUNE_TEXT = "histories", "comedies", "tragedies"
#: Digits fine-tuning: pretrain on labels below the cut, fine-tune on the rest.
DIGITS_CUT = 5
LORA_RANK = 4
#: The comedies LM fine-tuned with a fresh head to tell which play of a genre a window comes from
#: (``ft_cls_*``: the Roman plays; the held-in check: the problem plays), batches of 16 windows.
CLASSIFY_PLAYS_OF, CLASSIFY_BATCH = "roman", 16


def lm_model(name: str) -> TransformerLM:
    """The model of the from-scratch LM family ``name`` (a key of :data:`LM_FAMILIES`)."""
    width, depth, context, tied, _ = LM_FAMILIES[name]
    return TransformerLM(TransformerConfig(data.TEXT_VOCAB, width, depth, context, tied))


def text_family(name: str, model: inner.InnerModel, genre: str, shape: str) -> TextFamily:
    """LM ``model`` (of the shape of LM family ``shape``) trained on ``genre``'s text."""
    _, _, context, _, batch_size = LM_FAMILIES[shape]
    return TextFamily(name, data.shakespeare(genre), context, model, batch_size)


def digits_below(cut: int, below: bool) -> data.Labelled:
    """The digits training split restricted to labels ``< cut`` (``below``) or ``>= cut``."""
    train = digits_family().train
    return train.subset((train.labels < cut) == below)


def pretrained_digits_mlp() -> inner.Weights:
    """The MLP pretrained by AdamW on digits ``< DIGITS_CUT`` (500 steps of 64, lr 3e-3; cached)."""
    source = DatasetFamily("digits_below", digits_below(DIGITS_CUT, below=True))
    return finetune.pretrained(finetune.Pretraining(
        inner.MLP, f"digits_below{DIGITS_CUT}", lambda g: source.sample_batch({}, g, BATCH_SIZE), steps=500, lr=3e-3,
    ))


def pretrained_lm() -> inner.Weights:
    """The :data:`FINETUNE_LM` model pretrained by AdamW on the comedies (400 steps of 16, lr 3e-3; cached)."""
    source = text_family("pretrain", lm_model(FINETUNE_LM), LM_PRETRAIN_TEXT, FINETUNE_LM)
    return finetune.pretrained(finetune.Pretraining(
        source.model, LM_PRETRAIN_TEXT, lambda g: source.sample_batch({}, g, 16), steps=400, lr=3e-3,
    ))


def play_classifier_family(name: str, genre: str, lora: bool) -> TextClassFamily:
    """The :func:`pretrained_lm` body with a fresh head (:class:`SequenceClassifier`) fine-tuned to
    tell which play of ``genre`` a window of the LM's context comes from: every tensor, or
    (``lora``) rank-:data:`LORA_RANK` adapters on the block matrices and the head in full."""
    plays = data.shakespeare_plays(genre)
    config = lm_model(FINETUNE_LM).config
    classifier = SequenceClassifier(config, len(plays))
    weights = {n: w for n, w in pretrained_lm().items() if n in classifier.shapes}
    head = ("cls.weight", "cls.bias")
    model = (finetune.LowRankAdapted(classifier, weights, matrix_names(config), LORA_RANK, LM_PRETRAIN_TEXT, fresh=head)
             if lora else finetune.FullFineTune(classifier, weights, fresh=head))
    return TextClassFamily(name, plays, config.context, model, CLASSIFY_BATCH)


def finetune_family(name: str) -> TaskFamily:
    """One of the ``ft_*`` families."""
    if name.startswith("ft_cls_"):
        return play_classifier_family(name, CLASSIFY_PLAYS_OF, lora=name == "ft_cls_lora")
    if name.startswith("ft_digits_"):
        weights, target = pretrained_digits_mlp(), digits_below(DIGITS_CUT, below=False)
        variant = name.removeprefix("ft_digits_")
        models = {
            "full": lambda: finetune.FullFineTune(inner.MLP, weights),
            "head": lambda: finetune.FullFineTune(inner.MLP, weights, fresh=("w2", "b2")),
            "lora": lambda: finetune.LowRankAdapted(inner.MLP, weights, ("w1", "w2"), LORA_RANK, f"digits_below{DIGITS_CUT}"),
        }
        return DatasetFamily(name, target, model=models[variant]())
    base = lm_model(FINETUNE_LM)
    weights = pretrained_lm()
    model = (finetune.FullFineTune(base, weights) if name == "ft_lm_full" else
             finetune.LowRankAdapted(base, weights, matrix_names(base.config), LORA_RANK, LM_PRETRAIN_TEXT))
    return text_family(name, model, LM_FINETUNE_TEXT, FINETUNE_LM)


def digits_family() -> DatasetFamily:
    """scikit-learn's digits, the 80% training split (shuffled with seed 0)."""
    return DatasetFamily("digits", data.split(data.digits(), TRAIN_FRACTION)[0])


def patches_family(photo: str = "china.jpg") -> DatasetFamily:
    """k-means-labelled 8x8 grey patches of a sample photo, the 80% training split."""
    return DatasetFamily("patches", data.split(data.patch_clusters(photo), TRAIN_FRACTION)[0])


def hf_family(name: str, path: str | None = None, train_fraction: float = TRAIN_FRACTION) -> DatasetFamily:
    """One of the paper's datasets (``data.HF_IMAGE_DATASETS``): the first ``train_fraction`` of its
    train split, unshuffled, as the reference slices it. ``path``: a local copy to read instead of
    the Hub. (The reference's SVHN slice is the first 1% through a ``min``/``max`` slip; pass
    ``train_fraction=0.01`` to reproduce it.)"""
    return DatasetFamily(name, data.split(data.hf_image_dataset(name, path), train_fraction, seed=None)[0])


FINETUNE_FAMILIES = ("ft_digits_full", "ft_digits_head", "ft_digits_lora", "ft_lm_full", "ft_lm_lora", "ft_cls_full", "ft_cls_lora")
FAMILIES = ("digits", "permuted_digits", "patches", "teacher", *data.HF_IMAGE_DATASETS, *LM_FAMILIES, *FINETUNE_FAMILIES)


def family(name: str, path: str | None = None) -> TaskFamily:
    """The family called ``name`` (one of ``FAMILIES``); ``path`` only for the paper's datasets."""
    if name in data.HF_IMAGE_DATASETS:
        return hf_family(name, path)
    if path is not None:
        raise ValueError(f"a data path only applies to {sorted(data.HF_IMAGE_DATASETS)}, not {name!r}")
    if name == "digits":
        return digits_family()
    if name == "permuted_digits":
        return PermutedFamily("permuted_digits", digits_family())
    if name == "patches":
        return patches_family()
    if name == "teacher":
        return TeacherFamily()
    if name in LM_FAMILIES:
        return text_family(name, lm_model(name), LM_TEXT, name)
    if name in FINETUNE_FAMILIES:
        return finetune_family(name)
    raise ValueError(f"unknown task family {name!r}; expected one of {FAMILIES}")


def families_by_name(names: Sequence[str], paths: Mapping[str, str] | None = None) -> list[TaskFamily]:
    """The families called ``names``, in order; ``paths`` maps a paper dataset name to a local copy."""
    paths = dict(paths or {})
    unused = set(paths) - set(names)
    if unused:
        raise ValueError(f"data paths given for families not requested: {sorted(unused)}")
    return [family(name, paths.get(name)) for name in names]


def sample_scales(
    shapes: Mapping[str, Sequence[int]],
    level: ReparamLevel,
    generator: torch.Generator,
    low: float = 1e-3,
    high: float = 1e3,
) -> dict[str, torch.Tensor]:
    """Reparameterisation scales ``s`` with ``log s ~ U[ln low, ln high]`` (``docs/meta-training.md`` §3.1).

    The optimizer holds ``phi = theta0 / s`` and the model computes with ``s * phi``. ``level``:
    ``"global"``: one draw shared by every tensor (Celo's setting); ``"tensor"``: one draw per
    tensor; ``"parameter"``: one per entry. Returns ``name -> s``, each of shape ``shapes[name]``
    (a constant tensor unless ``level == "parameter"``).
    """
    if level not in get_args(ReparamLevel):
        raise ValueError(f"reparameterisation level must be one of {get_args(ReparamLevel)}, got {level!r}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")

    def draw(shape: Sequence[int]) -> torch.Tensor:
        u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
        return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).float()

    if level == "global":
        shared = draw(())
        return {name: shared.expand(tuple(shape)).clone() for name, shape in shapes.items()}
    if level == "tensor":
        return {name: draw(()).expand(tuple(shape)).clone() for name, shape in shapes.items()}
    return {name: draw(shape) for name, shape in shapes.items()}
