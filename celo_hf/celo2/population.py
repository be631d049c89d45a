"""Celo2 over a population of meta-models at once: the functional form meta-training runs.

Each of ``P`` members has its own meta-weights (a perturbed ``Celo2Net``), its own inner-model
parameters and its own state. One :func:`update` advances every member by one step with exactly
the code :class:`celo_hf.celo2.Celo2` runs: each tensor takes the route ``Celo2`` would give it
(:func:`celo_hf.celo2.routing.route`: branch and axis order), the learned branch is
:func:`celo_hf.celo2.update.learned_update_` with one MLP row per member, the Adam branch
:func:`celo_hf.celo2.update.adam_update_`. Celo2 has no global state: no loss, no step counter.

Meta-weights are a "stacked state dict": ``Celo2Net.state_dict()`` keys, each tensor with a
leading ``P`` axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends
from ..layout import (
    RuleConfig,
    TensorState,
    UpdateWeights,
    init_tensor_state,
    state_shape,
)
from .routing import DEFAULT_ADAM_REGEX, Layout, Route, route
from .update import adam_update_, init_adam_state, learned_update_

MetaWeights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """What a population step needs besides the weights: ``config`` (``Celo2Net.rule_config()``) and
    the optimizer's arguments of the same names, with its defaults."""

    config: RuleConfig
    lr: float = 1e-3
    weight_decay: float = 0.0
    orthogonalize: bool = True
    adam_regex: str | None = DEFAULT_ADAM_REGEX
    mult_1d: float = 20.0
    layout: Layout = "jax"
    backend: str = "auto"


def routes(params: dict[str, torch.Tensor], settings: Settings) -> dict[str, Route]:
    """Each inner tensor's route (``params``: ``name -> (P, *S)``)."""
    return {name: route(name, p[0], settings.adam_regex, settings.layout) for name, p in params.items()}


def _rule_view(t: torch.Tensor, r: Route) -> torch.Tensor:
    """``(P, *S)`` as the rule sees each member's tensor (permuted; scalars as ``(P, 1)``)."""
    if r.axes is not None:
        return t.permute(0, *(1 + a for a in r.axes))
    return t.view(t.shape[0], *state_shape(t.shape[1:]))


def init(params: dict[str, torch.Tensor], settings: Settings) -> dict[str, TensorState]:
    """Zero state for every member (``name -> stacked accumulators``)."""
    state = {}
    for name, r in routes(params, settings).items():
        view = _rule_view(params[name], r)
        members, shape = view.shape[0], view.shape[1:]
        single = init_adam_state(shape, view.device) if r.adam else init_tensor_state(shape, settings.config.num_decays, view.device)
        state[name] = {key: value.expand(members, *value.shape).clone() for key, value in single.items()}
    return state


def mlp_weights(meta_weights: MetaWeights, config: RuleConfig) -> UpdateWeights:
    """The members' MLPs from stacked ``Celo2Net`` weights (keys ``mlp.<i>.weight`` / ``mlp.<i>.bias``)."""
    indices = sorted({int(key.split(".")[1]) for key in meta_weights if key.startswith("mlp.")})
    layers = [(meta_weights[f"mlp.{i}.weight"], meta_weights[f"mlp.{i}.bias"]) for i in indices]
    return UpdateWeights.from_layers(config, layers, layers[0][0].device)


def update(
    state: dict[str, TensorState], params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
    meta_weights: MetaWeights, settings: Settings,
) -> None:
    """One Celo2 step for every member: ``params`` (``name -> (P, *S)``) and ``state`` in place."""
    weights = mlp_weights(meta_weights, settings.config)
    backend = settings.backend
    if backend == "auto":  # what Celo2(backend="auto") runs on this device
        backend = backends.auto(weights.first.device, settings.config)[0]
    for name, r in routes(params, settings).items():
        p, g = _rule_view(params[name], r), _rule_view(grads[name], r)
        members = p.shape[0]
        lr = torch.full((members,), settings.lr, dtype=torch.float32, device=p.device)
        wd = torch.full((members,), settings.weight_decay, dtype=torch.float32, device=p.device)
        if r.adam:
            lr_1d = (lr * torch.tensor(settings.mult_1d, dtype=torch.float32)).view(-1, *([1] * (p.dim() - 1)))
            adam_update_(p, g, state[name], lr_1d, wd.view_as(lr_1d))
        else:
            work = p.contiguous()  # the driver streams over contiguous rows; a permuted view is copied
            learned_update_(work, g.contiguous(), state[name], weights, lr, wd, settings.orthogonalize, backend)
            if work is not p:
                p.copy_(work)
