"""The update rule being meta-trained: Celo (v1) or Celo2, behind one interface (:class:`Rule`).

:mod:`meta_training.train` runs the same truncated antithetic PES for either rule (same slots,
families, checkpoints, held-in checks and ``best/`` selection); what differs is collected here:

* the meta-model (``CeloNet`` or ``Celo2Net``), how a fresh one is made, and which of its entries a
  phase trains;
* the population calls (:mod:`celo_hf.population` or :mod:`celo_hf.celo2.population`): init, one
  step, restarting members, and the state as a checkpoint entry;
* the optimizer that runs one meta-model on one model (:class:`celo_hf.Celo` or
  :class:`celo_hf.Celo2`), used by the held-in checks (:mod:`meta_training.held_in`), by the
  evaluation's plain loop (:mod:`meta_training.evaluate`) and through ``transformers.Trainer``
  (:mod:`meta_training.trainer_tasks`).

Celo2's tensors are routed by name and its rule is not invariant to axis order
(``docs/celo2-algorithm.md`` §3, §15). The inner models (:mod:`meta_training.inner`) name their
tensors ``w1``, ``b1``, ``tokens``, ... and store matrices ``(in, out)``; :class:`ModuleView` gives
them the names and the orientation a PyTorch module of the same model would have (``w1.weight``
``(out, in)``, ``w1.bias``, ``embed_tokens.weight``, a LayerNorm's ``weight``), so that Celo2 with
its defaults (``adam_regex=DEFAULT_ADAM_REGEX``, ``layout="jax"``) treats an inner model exactly as
``Celo2(module.named_parameters())`` treats that module: biases and embeddings on the Adam branch,
every other tensor on the learned rule, matrices handed to the rule as ``(in, out)``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from celo_hf import Celo, CeloNet, population
from celo_hf.celo2 import population as celo2_population
from celo_hf.celo2.routing import DEFAULT_ADAM_REGEX
from celo_hf.fresh_tensors import FRESH
from celo_hf.hub import load_celo_net
from celo_hf.layout import TensorState

from .inner import Weights
from .warm_start import adam_like

#: Celo2's inner learning rate (the original's ``step_mult`` default), fixed: Celo2 has no
#: learned schedule and reads neither the loss nor the number of steps.
CELO2_LR = 1e-3
#: Celo2's population state: module name -> that tensor's stacked accumulators.
Celo2State = dict[str, TensorState]
#: Inner tensors stored as embedding tables ``(rows, dim)`` (:mod:`meta_training.transformer`).
EMBEDDINGS = ("tokens", "positions")


class Rule(Protocol):
    """What the meta-trainer and the held-in checks need to know about an update rule.

    ``State`` is the population's optimizer state (every tensor with a leading member axis ``P``);
    ``params`` / ``grads`` are inner-model tensors ``name -> (P, *shape)``; ``meta_weights`` a
    stacked state dict of the meta-model (``key -> (P, *shape)``).
    """

    #: The name ``--rule`` takes.
    name: str
    #: The optimizer's name in tables and plots.
    label: str
    #: How the evaluation runs it, for the tables (the learning rate, what is tuned).
    setting: str
    #: The phases the rule has (Celo: 1 the update MLP, 2 the learned scheduler).
    phases: tuple[int, ...]
    #: Whether the zero-gradient drift is a meaningful held-in criterion for the rule.
    zero_gradient_fixed_point: bool

    def fresh_net(self, seed: int, warm_start_gain: float) -> nn.Module:
        """The meta-model a run starts from without ``--init`` (seeded)."""

    def load_net(self, weights: str | nn.Module | None) -> nn.Module:
        """A meta-model from a path or Hub id (``--init``), a module as is, ``None``: the embedded default."""

    def configured(self, base: nn.Module, learned_schedule: bool) -> nn.Module:
        """A new meta-model with ``base``'s weights, set up for the phase."""

    def trainable_keys(self, net: nn.Module, phase: int) -> list[str]:
        """The state-dict entries of ``net`` that ``phase`` trains."""

    def init(self, net: nn.Module, params: Weights, total_steps: torch.Tensor, meta_weights: Weights) -> Any:
        """Fresh state for ``P`` members (``total_steps`` ``(P,)``: each one's planned length)."""

    def update(self, net: nn.Module, state: Any, params: Weights, grads: Weights, loss: torch.Tensor,
               meta_weights: Weights, fresh: Collection[str] = ()) -> Any:
        """One step of every member (``params`` in place); ``loss`` ``(P,)``; ``fresh``: the tensors
        a fine-tune newly initialised (:func:`meta_training.finetune.newly_initialised`), stepped as
        the optimizer steps param groups marked fresh. Returns the new state."""

    def reset(self, state: Any, members: torch.Tensor, total_steps: torch.Tensor, meta_weights: Weights) -> Any:
        """The state with the members flagged in the ``(P,)`` bool mask ``members`` started afresh."""

    def state_to_dict(self, state: Any) -> dict[str, Any]:
        """The state as a checkpoint entry (loads with ``weights_only=True``)."""

    def state_from_dict(self, saved: dict[str, Any]) -> Any:
        """The state :meth:`state_to_dict` saved."""

    def parameters(self, weights: Weights) -> dict[str, nn.Parameter]:
        """One model's tensors (``name -> shape``) as the optimizer holds them (new leaves)."""

    def inner_weights(self, params: Mapping[str, torch.Tensor]) -> Weights:
        """:meth:`parameters`' tensors back as the inner model computes with them, ``name -> (1, *shape)``."""

    def optimizer(self, net: nn.Module, params: dict[str, nn.Parameter], total_steps: int,
                  fresh: Collection[str] = ()) -> torch.optim.Optimizer:
        """The rule's optimizer on one model's :meth:`parameters`, for ``total_steps`` steps, the
        ``fresh`` ones (as in :meth:`update`) marked so."""

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One optimizer step after ``loss.backward()``."""

    def module_optimizer(self, net: nn.Module, model: nn.Module, total_steps: int) -> torch.optim.Optimizer:
        """The optimizer on ``model``'s trainable parameters (a plain training loop)."""

    def trainer_optimizers(self, net: nn.Module | None, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """``Trainer(optimizers=...)``'s pair for ``model`` (``net`` ``None``: the embedded weights)."""


class CeloRule:
    """Celo v1: ``CeloNet``, :mod:`celo_hf.population`, :class:`celo_hf.Celo`; two phases."""

    name = "celo"
    label = "Celo"
    setting = "at lr 1, nothing tuned"
    phases = (1, 2)
    zero_gradient_fixed_point = True

    def fresh_net(self, seed: int, warm_start_gain: float) -> CeloNet:
        """The reference's random initialisation, or the Adam-like warm start when ``warm_start_gain > 0``."""
        torch.manual_seed(seed)
        net = CeloNet()
        return adam_like(net, warm_start_gain, seed=seed) if warm_start_gain > 0 else net

    def load_net(self, weights: str | nn.Module | None) -> CeloNet:
        return load_celo_net(weights)

    def configured(self, base: nn.Module, learned_schedule: bool) -> CeloNet:
        net = CeloNet(**{**base._hub_mixin_config, "learned_schedule": learned_schedule})
        net.load_state_dict(base.state_dict())
        return net

    def trainable_keys(self, net: nn.Module, phase: int) -> list[str]:
        """The MLP (phase 1), or the scheduler and its initial state (phase 2)."""
        return [key for key in net.state_dict() if key.startswith("mlp.") == (phase == 1)]

    def init(self, net: nn.Module, params: Weights, total_steps: torch.Tensor,
             meta_weights: Weights) -> population.PopulationState:
        return population.init(params, total_steps, meta_weights, net)

    def update(self, net: nn.Module, state: population.PopulationState, params: Weights, grads: Weights,
               loss: torch.Tensor, meta_weights: Weights, fresh: Collection[str] = ()) -> population.PopulationState:
        return population.update(state, params, grads, loss, meta_weights, net, fresh=fresh)

    def reset(self, state: population.PopulationState, members: torch.Tensor, total_steps: torch.Tensor,
              meta_weights: Weights) -> population.PopulationState:
        return population.reset_members(state, members, total_steps, meta_weights)

    def state_to_dict(self, state: population.PopulationState) -> dict[str, Any]:
        return state.to_dict()

    def state_from_dict(self, saved: dict[str, Any]) -> population.PopulationState:
        return population.PopulationState.from_dict(saved)

    def parameters(self, weights: Weights) -> dict[str, nn.Parameter]:
        return {name: nn.Parameter(value) for name, value in weights.items()}

    def inner_weights(self, params: Mapping[str, torch.Tensor]) -> Weights:
        return {name: p[None] for name, p in params.items()}

    def optimizer(self, net: nn.Module, params: dict[str, nn.Parameter], total_steps: int,
                  fresh: Collection[str] = ()) -> Celo:
        groups = [{"params": [p for name, p in params.items() if (name in fresh) == marked], FRESH: marked}
                  for marked in (False, True)]
        return Celo([g for g in groups if g["params"]], total_steps=total_steps, weights=copy.deepcopy(net))

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.step(loss=loss.detach())

    def module_optimizer(self, net: nn.Module, model: nn.Module, total_steps: int) -> Celo:
        return Celo([p for p in model.parameters() if p.requires_grad], total_steps=total_steps, weights=net)

    def trainer_optimizers(self, net: nn.Module | None, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """:func:`celo_hf.create` (its constant scheduler; ``total_steps`` from Trainer)."""
        from celo_hf import create

        return create(model, weights=net)


@dataclass(frozen=True)
class ModuleView:
    """The names (and orientation) a PyTorch module of an inner model gives its tensors.

    ``names``: inner name -> module name; ``transposed``: the inner names of matrices stored
    ``(in, out)`` that a module stores ``(out, in)`` (``nn.Linear``). Views share storage, so an
    in-place update of a view updates the inner tensor.
    """

    names: dict[str, str]
    transposed: frozenset[str]

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]]) -> ModuleView:
        """From an inner model's ``name -> shape``: embedding tables ``tokens`` / ``positions`` ->
        ``embed_<name>.weight``; other matrices ``m`` -> ``m.weight`` (a Linear's); vectors named
        ``*gain`` -> ``*weight`` (a LayerNorm's); other vectors -> a bias (``*bias`` kept, ``b1`` ->
        ``b1.bias``)."""
        names, transposed = {}, set()
        for name, shape in shapes.items():
            if len(shape) == 2 and name in EMBEDDINGS:
                names[name] = f"embed_{name}.weight"
            elif len(shape) == 2:
                names[name], _ = f"{name}.weight", transposed.add(name)
            elif len(shape) == 1 and name.endswith("gain"):
                names[name] = name.removesuffix("gain") + "weight"
            elif len(shape) == 1:
                names[name] = name if name.endswith("bias") else f"{name}.bias"
            else:
                raise ValueError(f"inner tensor {name!r} has shape {tuple(shape)}; expected a matrix or a vector")
        return cls(names, frozenset(transposed))

    def oriented(self, weights: Mapping[str, torch.Tensor]) -> Weights:
        """``name -> (P, *shape)`` with the :attr:`transposed` matrices swapped between ``(in, out)``
        and ``(out, in)`` (views; its own inverse). Keys stay the inner names."""
        return {n: w.transpose(1, 2) if n in self.transposed else w for n, w in weights.items()}

    def to_module(self, weights: Mapping[str, torch.Tensor]) -> Weights:
        """Inner tensors ``name -> (P, *shape)`` as the module holds them: module names, ``(out, in)`` matrices (views)."""
        return {self.names[n]: w for n, w in self.oriented(weights).items()}


class Celo2Rule:
    """Celo2: ``Celo2Net``, :mod:`celo_hf.celo2.population`, :class:`celo_hf.Celo2` at lr
    :data:`CELO2_LR` with its default routing and layout; one phase (every ``mlp.*`` entry)."""

    name = "celo2"
    label = "Celo2"
    setting = f"at lr {CELO2_LR:g} (the original's default, fixed before any run), constant, nothing tuned"
    phases = (1,)
    #: Celo2's step is RMS-normalised: a zero gradient still moves a tensor by ``lr``, by design.
    zero_gradient_fixed_point = False

    def fresh_net(self, seed: int, warm_start_gain: float) -> nn.Module:
        """The original's initialisation (``Celo2Net.reset_parameters``), seeded."""
        if warm_start_gain:
            raise ValueError(f"Celo2 has no warm start: got warm_start_gain={warm_start_gain}, expected 0")
        from celo_hf.celo2.network import Celo2Net

        torch.manual_seed(seed)
        return Celo2Net()

    def load_net(self, weights: str | nn.Module | None) -> nn.Module:
        from celo_hf.celo2.hub import load_celo2_net

        return load_celo2_net(weights)

    def configured(self, base: nn.Module, learned_schedule: bool) -> nn.Module:
        if learned_schedule:
            raise ValueError("Celo2 has no learned schedule: the schedule options apply to --rule celo only")
        net = type(base)(**base._hub_mixin_config)
        net.load_state_dict(base.state_dict())
        return net

    def trainable_keys(self, net: nn.Module, phase: int) -> list[str]:
        """Every ``mlp.*`` entry (Celo2 has one phase)."""
        if phase != 1:
            raise ValueError(f"Celo2 has one phase (its update MLP), got phase={phase}")
        return [key for key in net.state_dict() if key.startswith("mlp.")]

    @staticmethod
    def settings(net: nn.Module) -> celo2_population.Settings:
        """The population's settings: ``Celo2``'s defaults at lr :data:`CELO2_LR`, ``net``'s decays."""
        return celo2_population.Settings(net.rule_config(), lr=CELO2_LR, adam_regex=DEFAULT_ADAM_REGEX, layout="jax")

    def init(self, net: nn.Module, params: Weights, total_steps: torch.Tensor, meta_weights: Weights) -> Celo2State:
        """Zero state (Celo2 reads no planned length)."""
        return celo2_population.init(ModuleView.of(_shapes(params)).to_module(params), self.settings(net))

    def update(self, net: nn.Module, state: Celo2State, params: Weights, grads: Weights, loss: torch.Tensor,
               meta_weights: Weights, fresh: Collection[str] = ()) -> Celo2State:
        """One step (Celo2 reads no loss, and has no gain for fresh marks to change)."""
        view = ModuleView.of(_shapes(params))
        celo2_population.update(state, view.to_module(params), view.to_module(grads), meta_weights, self.settings(net))
        return state

    def reset(self, state: Celo2State, members: torch.Tensor, total_steps: torch.Tensor,
              meta_weights: Weights) -> Celo2State:
        """Zero accumulators for the flagged members (Celo2 has no other state)."""
        def pick(value: torch.Tensor) -> torch.Tensor:
            return torch.where(members.view(-1, *([1] * (value.dim() - 1))), torch.zeros_like(value), value)

        return {name: {key: pick(value) for key, value in accumulators.items()} for name, accumulators in state.items()}

    def state_to_dict(self, state: Celo2State) -> dict[str, Any]:
        return {"tensors": state}

    def state_from_dict(self, saved: dict[str, Any]) -> Celo2State:
        return saved["tensors"]

    def parameters(self, weights: Weights) -> dict[str, nn.Parameter]:
        """Inner names, module orientation (``(out, in)`` matrices)."""
        oriented = ModuleView.of(_shapes(_stacked(weights))).oriented(_stacked(weights))
        return {name: nn.Parameter(w[0].contiguous()) for name, w in oriented.items()}

    def inner_weights(self, params: Mapping[str, torch.Tensor]) -> Weights:
        stacked = _stacked(params)
        return ModuleView.of(_shapes(stacked)).oriented(stacked)

    def optimizer(self, net: nn.Module, params: dict[str, nn.Parameter], total_steps: int,
                  fresh: Collection[str] = ()) -> torch.optim.Optimizer:
        """``Celo2`` with its defaults at lr :data:`CELO2_LR`, on the module names (no gain: ``fresh`` changes nothing)."""
        from celo_hf import Celo2

        names = ModuleView.of(_shapes(_stacked(params))).names
        return Celo2([(names[n], p) for n, p in params.items()], lr=CELO2_LR, weights=copy.deepcopy(net))

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.step()

    def module_optimizer(self, net: nn.Module, model: nn.Module, total_steps: int) -> torch.optim.Optimizer:
        """``Celo2(model.named_parameters(), model=model)`` (trainable ones) with its defaults at lr
        :data:`CELO2_LR` (``model``: layout and embeddings from the module types)."""
        from celo_hf import Celo2

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return Celo2(named, lr=CELO2_LR, weights=net, model=model)

    def trainer_optimizers(self, net: nn.Module | None, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """:meth:`module_optimizer` and a constant schedule: the original has none
        (``docs/celo2-algorithm.md`` §16), where Trainer's default would decay lr linearly to 0."""
        optimizer = self.module_optimizer(net, model, 0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _shapes(params: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of one member of a population ``name -> (P, *shape)``."""
    return {name: tuple(p.shape[1:]) for name, p in params.items()}


def _stacked(weights: Mapping[str, torch.Tensor]) -> Weights:
    """One model's tensors with a population axis of one, ``name -> (1, *shape)`` (views)."""
    return {name: w[None] for name, w in weights.items()}


RULES: dict[str, Rule] = {"celo": CeloRule(), "celo2": Celo2Rule()}
