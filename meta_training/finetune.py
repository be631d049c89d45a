"""Fine-tuning inner problems: a model pretrained once by AdamW, then trained on another task.

* :func:`pretrained`: AdamW pretraining of an inner model on a batch stream, cached on disk
  (``~/.cache/celo_hf/meta_pretrained/``, or ``$CELO_HF_META_PRETRAINED``) and rebuilt if missing;
  deterministic (seeded, one thread).
* :class:`FullFineTune`: every tensor trained from the pretrained values, optionally with some of
  them (a head) drawn afresh; it computes like its base model and shares its name, so its slots
  advance with the base model's from-scratch slots.
* :class:`LowRankAdapted`: the pretrained weights frozen, zero-initialised low-rank adapters trained:
  a matrix ``W`` ``(in, out)`` computes as ``W + A B`` with ``A`` ``(in, r)`` random and ``B``
  ``(r, out)`` zero, so training starts at the pretrained function (apart from a fresh head, which
  is trained in full).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .inner import Batch, InnerModel, Weights, truncated_normal

CACHE_ENV = "CELO_HF_META_PRETRAINED"


@dataclass(frozen=True)
class Pretraining:
    """How a model is pretrained: ``steps`` AdamW steps at ``lr`` (weight decay 0) on batches from
    ``sample_batch(generator)`` (one member, no leading population axis), from ``model.init``;
    everything drawn from one generator seeded with ``seed``. ``data`` names the batch stream
    (part of the cache key)."""

    model: InnerModel
    data: str
    sample_batch: Callable[[torch.Generator], Batch]
    steps: int
    lr: float
    seed: int = 0

    @property
    def key(self) -> str:
        """The cache file's stem: readable, with a hash of every setting."""
        settings = f"{self.model.name}|{sorted(self.model.shapes.items())}|{self.data}|{self.steps}|{self.lr}|{self.seed}"
        return f"{self.model.name}-{self.data}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "celo_hf" / "meta_pretrained"))


def pretrain(spec: Pretraining) -> Weights:
    """Run ``spec`` (no cache): the trained tensors ``name -> shape``."""
    generator = torch.Generator().manual_seed(spec.seed)
    params = {name: torch.nn.Parameter(value) for name, value in spec.model.init(generator).items()}
    optimizer = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(spec.steps):
            batch = tuple(t[None] for t in spec.sample_batch(generator))
            loss = spec.model.losses_of_weights({n: p[None] for n, p in params.items()}, batch)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {name: p.detach().clone() for name, p in params.items()}


def pretrained(spec: Pretraining, directory: Path | None = None) -> Weights:
    """``spec``'s pretrained tensors, read from ``directory`` (default :func:`cache_dir`) or made
    by :func:`pretrain` and written there first."""
    path = (directory or cache_dir()) / f"{spec.key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    weights = pretrain(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, path)
    return weights


def check_pretrained(base: InnerModel, weights: Weights, drawn: tuple[str, ...]) -> None:
    """Raise unless ``drawn`` names tensors of ``base`` and ``weights`` holds every other one (and
    nothing ``base`` lacks)."""
    shapes = set(base.shapes)
    unknown, missing, extra = set(drawn) - shapes, shapes - set(drawn) - set(weights), set(weights) - shapes
    if unknown or missing or extra:
        raise ValueError(f"{base.name}: freshly drawn tensors {sorted(unknown)} are not its tensors, pretrained weights "
                         f"lack {sorted(missing)} or hold unknown {sorted(extra)}; expected names from {sorted(shapes)}")


@dataclass(frozen=True)
class FullFineTune:
    """Fine-tune every tensor of ``base`` from ``weights``; tensors named in ``fresh`` (a new head)
    start from ``base.init`` instead (``weights`` need not hold them)."""

    base: InnerModel
    weights: Weights
    fresh: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_pretrained(self.base, self.weights, self.fresh)

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self.base.shapes

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def init(self, generator: torch.Generator) -> Weights:
        drawn = self.base.init(generator)
        return {name: drawn[name] if name in self.fresh else self.weights[name].clone() for name in self.base.shapes}

    def losses_of_weights(self, weights: Weights, batch: Batch) -> torch.Tensor:
        return self.base.losses_of_weights(weights, batch)


@dataclass(frozen=True)
class LowRankAdapted:
    """``base`` with its ``weights`` frozen and rank-``rank`` adapters on the matrices ``adapted``
    (trainable tensors ``"{name}.A"`` ``(in, r)`` and ``"{name}.B"`` ``(r, out)``). ``fresh``:
    tensors of ``base`` trained in full from ``base.init`` (a new head, as peft's
    ``modules_to_save``; ``weights`` need not hold them). ``tag`` names the pretrained weights (part
    of the model's name)."""

    base: InnerModel
    weights: Weights
    adapted: tuple[str, ...]
    rank: int
    tag: str
    fresh: tuple[str, ...] = ()
    shapes: Mapping[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        bad = [n for n in self.adapted if len(self.base.shapes.get(n, ())) != 2 or n in self.fresh]
        if bad or self.rank < 1:
            raise ValueError(f"adapters need rank >= 1 (got {self.rank}) and frozen matrices of {self.base.name}, not {bad}")
        check_pretrained(self.base, self.weights, self.fresh)
        shapes = {name: self.base.shapes[name] for name in self.fresh}
        for name in self.adapted:
            rows, columns = self.base.shapes[name]
            shapes |= {f"{name}.A": (rows, self.rank), f"{name}.B": (self.rank, columns)}
        object.__setattr__(self, "shapes", shapes)

    @property
    def name(self) -> str:
        return f"lora{self.rank}({self.base.name}@{self.tag})"

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def init(self, generator: torch.Generator) -> Weights:
        """``A`` truncated normal with std ``1/sqrt(in)``, ``B`` zero; the fresh tensors from ``base.init``."""
        drawn = self.base.init(generator) if self.fresh else {}
        init = {name: drawn[name] for name in self.fresh}
        for name in self.adapted:
            init[f"{name}.A"] = truncated_normal(self.shapes[f"{name}.A"], generator)
            init[f"{name}.B"] = torch.zeros(self.shapes[f"{name}.B"])
        return init

    def full_weights(self, adapters: Weights) -> Weights:
        """The base model's weights ``(P, *shape)`` computed with: frozen ``W`` plus ``A B``, and the
        fresh tensors as trained."""
        members = next(iter(adapters.values())).shape[0]
        frozen = (name for name in self.base.shapes if name not in self.fresh)
        full = {name: self.weights[name].expand(members, *self.weights[name].shape) for name in frozen}
        full |= {name: adapters[name] for name in self.fresh}
        for name in self.adapted:
            full[name] = full[name] + adapters[f"{name}.A"] @ adapters[f"{name}.B"]
        return full

    def losses_of_weights(self, weights: Weights, batch: Batch) -> torch.Tensor:
        return self.base.losses_of_weights(self.full_weights(weights), batch)


def newly_initialised(model: InnerModel) -> tuple[str, ...]:
    """The trainable tensors of ``model`` that a fine-tune initialises instead of loading: a
    :class:`FullFineTune`'s ``fresh`` ones (a new head), every tensor of a :class:`LowRankAdapted`
    (the adapters and any head, as :func:`celo_hf.fresh_tensors.newly_initialised` finds peft's);
    none for a model trained from scratch. Meta-training marks them as :func:`celo_hf.create` does."""
    if isinstance(model, FullFineTune):
        return model.fresh
    if isinstance(model, LowRankAdapted):
        return tuple(model.shapes)
    return ()
