"""Meta-training task families: 10-way classification of 8x8 grey images (``docs/meta-training.md`` §3).

A family turns a generator into a task and a (task, generator) pair into training batches; the
model, loss and normaliser are the same for all of them (:mod:`meta_training.inner`). Every draw
comes from the generator it is handed, so a PES slot that owns one generator gets one reproducible
stream of tasks and batches, which its "+" and "-" copies share.

Families (``FAMILIES``):

* offline (§7.4): ``digits`` (scikit-learn's digits, 80% split, pixels / 16), ``permuted_digits``
  (the same with a random pixel and label permutation per task), ``patches`` (8x8 grey patches of
  ``china.jpg`` labelled by 10-way k-means, 80% split), ``teacher`` (Gaussian inputs labelled by a
  random teacher MLP per task, 5% label noise);
* the paper's (§3, need the network or a local copy): ``mnist``, ``fashion_mnist``, ``cifar10``,
  ``svhn``: the first 80% of the official train split at 8x8 grey.

Task augmentation (§3.1) draws reparameterisation scales with :func:`sample_scales`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from . import data

NUM_CLASSES = 10
INPUTS = data.IMAGE_SIDE * data.IMAGE_SIDE
TRAIN_FRACTION = 0.8

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


TaskFamily = DatasetFamily | PermutedFamily | TeacherFamily


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


FAMILIES = ("digits", "permuted_digits", "patches", "teacher", *data.HF_IMAGE_DATASETS)


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
