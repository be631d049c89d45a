"""Which Celo2 branch each parameter takes, and the axis order the learned rule sees it in.

Routing is by name (``docs/celo2-algorithm.md`` §3): a parameter whose name ``re.search``-matches
``adam_regex`` takes the Adam branch, every other one the learned rule. Layout (§15): the rule is
not invariant to axis order, and it was meta-trained on JAX arrays, so by default (``layout="jax"``)
each weight is handed to it in the axis order flax / haiku would store the same layer in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import nn

#: The default routing: the original class default (names containing ``bias`` or ``embed``: biases,
#: ``embed_tokens``, BERT's ``embeddings.*``), plus GPT-2's embedding tables ``wte`` / ``wpe``, whose
#: names contain neither. A tied output head shares its embedding's tensor, so it follows it.
DEFAULT_ADAM_REGEX = r".*bias.*|.*embed.*|(^|\.)(wte|wpe)\."

Layout = Literal["jax", "as_given"]
LAYOUTS = ("jax", "as_given")

#: How a module type stores its weight, for ``layout="jax"`` when the model is known.
_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Route(NamedTuple):
    """One parameter's branch (``adam``: the Adam branch, else the learned rule) and ``axes``: the
    permutation that turns it into the array the rule sees (``None``: as it is)."""

    adam: bool
    axes: tuple[int, ...] | None


def torch_to_jax_axes(shape: tuple[int, ...], kind: str | None) -> tuple[int, ...] | None:
    """The permutation from a PyTorch weight of ``shape`` to the flax / haiku layout of that layer,
    or ``None`` where none is needed.

    ``kind``: ``"linear"`` (``(out, in)`` -> ``(in, out)``), ``"conv"`` (``(out, in, *spatial)`` ->
    ``(*spatial, in, out)``), ``"other"`` (kept: GPT-2's ``Conv1D`` is already ``(in, out)``, embeddings
    are ``(vocab, dim)`` in both), or ``None`` when the module is unknown: rank 2 is taken as a Linear
    weight and rank >= 3 as a convolution's, PyTorch's usual layers. A non-square matrix is not
    transposed: the rule gives its transpose's update transposed (the factored axes follow the
    sizes, the normalisations cover both axes, Newton-Schulz commutes with transposition), up to
    float32 rounding, without the copy.
    """
    rank = len(shape)
    if kind is None:
        kind = "linear" if rank == 2 else "conv" if rank >= 3 else "other"
    if kind == "linear" and rank == 2:
        return (1, 0) if shape[0] == shape[1] else None
    if kind == "conv" and rank >= 3:
        return (*range(2, rank), 1, 0)
    return None


def module_kinds(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """For ``model``'s parameters: each name's kind for :func:`torch_to_jax_axes`, and the names of
    embedding tables (``nn.Embedding`` weights, whatever they are called)."""
    kinds, embeddings = {}, set()
    for module_name, module in model.named_modules():
        kind = "linear" if isinstance(module, _LINEAR) else "conv" if isinstance(module, _CONV) else "other"
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            kinds[full] = kind if name == "weight" else "other"
            if isinstance(module, nn.Embedding):
                embeddings.add(full)
    return kinds, embeddings


def route(
    name: str | None, param: torch.Tensor, adam_regex: str | None, layout: Layout,
    kinds: Mapping[str, str] | None = None, embeddings: set[str] = frozenset(),  # type: ignore[assignment]
) -> Route:
    """The route of one parameter. ``name`` is needed unless ``adam_regex`` is ``None``; ``kinds`` /
    ``embeddings`` (:func:`module_kinds`) when the model is known."""
    if adam_regex is None:
        adam = False
    elif name is None:
        raise ValueError(
            f"Celo2 routes parameters by name (adam_regex={adam_regex!r}) but got a parameter of shape "
            f"{tuple(param.shape)} without one: pass model.named_parameters() (or param groups with "
            "'param_names'), or model=the module, or adam_regex=None to send every tensor through the learned rule"
        )
    else:
        adam = re.search(adam_regex, name) is not None or name in embeddings
    axes = None if adam or layout == "as_given" else torch_to_jax_axes(tuple(param.shape), (kinds or {}).get(name or ""))
    return Route(adam, axes)
