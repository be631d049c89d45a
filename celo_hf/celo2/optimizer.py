"""``Celo2``: Celo2 and Celo2-base as a ``torch.optim.Optimizer`` (a thin shell over the maths).

The learned branch is :mod:`celo_hf.celo2.update` (batched over same-shape tensors), the routing and
axis order :mod:`celo_hf.celo2.routing`; this class owns the state, reads the param groups and hands
each step to them. No loss, no ``total_steps``: Celo2 is used like AdamW, with the caller's learning
rate and schedule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from .. import backends
from ..layout import UpdateWeights, init_tensor_state, numel
from ..optim_contract import Copyable, check_lr
from ..optimizer import trainer_parameter_groups
from .hub import load_celo2_net
from .network import Celo2Net
from .routing import DEFAULT_ADAM_REGEX, LAYOUTS, Layout, Route, module_kinds, route
from .update import (
    adam_update_,
    apply_step_,
    directions_,
    init_adam_state,
    steps_from_directions,
)

#: Learned-branch tensors up to this many elements are stacked with the others of their shape for
#: the MLP stage; larger ones run alone (every same-shape group is stacked for Newton-Schulz).
SMALL_TENSOR_ELEMENTS = 1 << 16


class _Work(NamedTuple):
    """One parameter to update this step: ``param`` (the state key), ``full`` / ``grad`` the whole
    tensor and gradient in the rule's axis order (gathered when FSDP2 shards it), ``route``, the
    group's ``lr`` and ``weight_decay``."""

    param: torch.Tensor
    full: torch.Tensor
    grad: torch.Tensor
    route: Route
    lr: float
    weight_decay: float


class Celo2(Copyable, torch.optim.Optimizer):
    """Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026): a learned per-element update rule whose matrix
    steps are orthogonalised with Newton-Schulz; biases and embeddings take an Adam branch.

    Args:
        params: the model itself (its trainable parameters, named, with ``model`` set to it), or
            parameters or param groups as torch takes them; give names (``model.named_parameters()``,
            or groups with ``param_names``) for the routing, or ``model``.
        lr: the original's ``step_mult`` (default 1e-3): every learned step has RMS ``lr`` per slice;
            the Adam branch runs at ``mult_1d * lr``. A number or a 1-element tensor; per group.
        weight_decay: decoupled, ``p <- p - wd * lr * p`` with the branch's ``lr`` (the original
            applies it to every tensor; per group here).
        weights: the meta-model: ``None`` (embedded default), a ``Celo2Net``, a local ``theta.state``
            / folder, or a Hub model id such as ``"amoudgl/celo2"`` (:func:`celo_hf.celo2.hub.load_celo2_net`).
        orthogonalize: Newton-Schulz on the learned steps of tensors of rank >= 2 (Celo2); ``False``
            with ``adam_regex=None`` is Celo2-base (every tensor through the learned rule).
        adam_regex: names ``re.search``-matching it take the Adam branch (:data:`DEFAULT_ADAM_REGEX`;
            the original's class default is ``".*bias.*|.*embed.*"``); ``None``: none do.
        mult_1d: the Adam branch's learning-rate multiplier (20).
        layout: ``"jax"`` (default): weights are seen in the axis order flax would store them in
            (Linear ``(out, in)`` transposed, convolutions ``(out, in, *k)`` as ``(*k, in, out)``), as in
            meta-training; ``"as_given"``: arrays as they are (:mod:`celo_hf.celo2.routing`).
        model: the module the parameters belong to (optional): names for unnamed parameters, layout
            from the module types (GPT-2's ``Conv1D`` is already ``(in, out)``), and ``nn.Embedding``
            weights to the Adam branch whatever their name.
        revision, token, cache_dir: Hub download options for ``weights``.
        backend: how the learned branch's per-element work runs for vectors and matrices (higher
            ranks always in torch): ``"auto"`` (default: ``"cpp"`` on CPU when the C++ kernels build
            here, else ``"eager"``), ``"eager"``, ``"cpp"``, ``"compile"``, ``"triton"`` (fused kernels for
            CUDA tensors; needs ``triton``), or ``"reference"`` (the literal specification, tensor by
            tensor; slow).
        chunk_elements: elements whose features are built at once (bounds temporary memory;
            ``None``: the backend's default).

    Parameters whose ``.grad`` is ``None`` are left alone (the original fed zeros: a zero gradient
    still moves a learned-branch tensor by ``lr`` per element). Under FSDP2 each sharded tensor is
    gathered whole for the update (Newton-Schulz and the normalisations need whole matrices).
    """

    #: Rebuilt on first use, never copied or pickled: the meta-model's weights per device.
    _caches: ClassVar[dict[str, Callable[[], Any]]] = {"_weights": dict}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.0,
        *,
        weights: Celo2Net | str | Path | None = None,
        orthogonalize: bool = True,
        adam_regex: str | None = DEFAULT_ADAM_REGEX,
        mult_1d: float = 20.0,
        layout: Layout = "jax",
        model: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        backend: str = "auto",
        chunk_elements: int | None = None,
    ) -> None:
        check_lr(lr, "Celo2's lr is the RMS of its learned steps")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (expected a finite number >= 0)")
        if not (isinstance(mult_1d, (int, float)) and math.isfinite(mult_1d) and mult_1d >= 0):
            raise ValueError(f"mult_1d must be a finite number >= 0, got {mult_1d!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if chunk_elements is not None and not (isinstance(chunk_elements, int) and chunk_elements > 0):
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        if backend not in backends.NAMES:
            raise ValueError(f"backend must be one of {backends.NAMES}, got {backend!r}")
        if isinstance(params, nn.Module):
            model, params = params, [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "weight_decay": float(weight_decay)})
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(f"Celo2 optimizes real floating-point parameters, got one of dtype {p.dtype}")
        self.net = load_celo2_net(weights, revision=revision, token=token, cache_dir=cache_dir)
        self.net.float().eval().requires_grad_(False)
        self.config = self.net.rule_config()
        if backend not in ("auto", "reference"):
            backends.get(backend).prepare(self.config)  # a missing compiler or package shows here
        self.backend = backend
        self.orthogonalize = bool(orthogonalize)
        self.adam_regex = adam_regex
        self.mult_1d = float(mult_1d)
        self.layout = layout
        self.chunk_elements = chunk_elements
        self._model_names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._kinds, self._embeddings = module_kinds(model) if model is not None else (None, set())
        self.routes = {p: self._route(p, name) for p, name in self._named_params()}
        self._weights: dict[torch.device, UpdateWeights] = {}
        self._auto_backends: dict[str, str] = {}  # what "auto" runs, by device type

    def _named_params(self) -> Iterable[tuple[torch.Tensor, str | None]]:
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                yield p, name if name is not None else self._model_names.get(id(p))

    def _route(self, p: torch.Tensor, name: str | None) -> Route:
        return route(name, p, self.adam_regex, self.layout, self._kinds, self._embeddings)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "routes"):
            self.routes.update({p: self._route(p, name) for p, name in self._named_params() if p not in self.routes})

    # ---- the step ------------------------------------------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Celo2 step of every parameter with a gradient. Returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            _work(p, self.routes[p], float(group["lr"]), group["weight_decay"])
            for group in self.param_groups for p in group["params"] if p.grad is not None and p.numel() > 0
        ]
        learned: dict[tuple, list[_Work]] = defaultdict(list)
        for item in work:
            state = self.state[item.param]
            if not state:
                state.update(
                    init_adam_state(item.full.shape, item.full.device) if item.route.adam
                    else init_tensor_state(item.full.shape, self.config.num_decays, item.full.device)
                )
            if item.route.adam:
                lr = torch.tensor(item.lr, dtype=torch.float32) * torch.tensor(self.mult_1d, dtype=torch.float32)
                adam_update_(item.full, item.grad, state, lr.to(item.full.device), _f32(item.weight_decay, item.full))
            else:
                learned[(tuple(item.full.shape), item.full.device)].append(item)
        for (shape, device), items in learned.items():
            self._learned_step(items, self._weights_on(device))
        for item in work:
            _write_back(item)
        return loss

    def _learned_step(self, items: list[_Work], w: UpdateWeights) -> None:
        """The learned branch for same-shape tensors: directions (small ones stacked), Newton-Schulz
        and the output normalisation on the whole group at once, then each tensor's step."""
        small = numel(items[0].full.shape) <= SMALL_TENSOR_ELEMENTS
        backend = self._backend_on(items[0].full.device)
        directions = []
        for batch in ([items] if small else [[item] for item in items]):
            states = [self.state[item.param] for item in batch]
            tensors = [item.full for item in batch], [item.grad for item in batch]
            views = len(batch) == 1 and all(t[0].is_contiguous() for t in tensors)  # a large tensor: no copies
            if views:
                p, g = (t[0].unsqueeze(0) for t in tensors)
                stacked = {key: value.unsqueeze(0) for key, value in states[0].items()}
            else:
                p, g = (torch.stack(t) for t in tensors)
                stacked = {key: torch.stack([s[key] for s in states]) for key in states[0]}
            directions.append(directions_(p, g, stacked, w.expand(len(batch)), backend, self.chunk_elements))
            if not views:  # the stacked copies' new state back into each tensor's own
                for i, s in enumerate(states):
                    for key, value in stacked.items():
                        s[key].copy_(value[i])
        steps = steps_from_directions(torch.cat(directions), self.orthogonalize)
        for item, step in zip(items, steps):
            apply_step_(item.full, step, _f32(item.lr, step), _f32(item.weight_decay, step))

    def _weights_on(self, device: torch.device) -> UpdateWeights:
        if device not in self._weights:
            self._weights[device] = UpdateWeights.from_net(self.net, device)
        return self._weights[device]

    def _backend_on(self, device: torch.device) -> str:
        """The backend for tensors on ``device`` (``"auto"``: decided once per device type)."""
        if self.backend != "auto":
            return self.backend
        if device.type not in self._auto_backends:
            self._auto_backends[device.type] = backends.auto(device, self.config)[0]
        return self._auto_backends[device.type]

    # ---- checkpointing -------------------------------------------------------------------------

    @torch.compiler.disable
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that the state stays float32 whatever the parameters' dtype (torch's
        loader would cast it to bf16 / fp16 parameters)."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        saved = {p: state_dict["state"][i] for i, p in zip(saved_ids, self._params()) if i in state_dict["state"]}
        super().load_state_dict(state_dict)
        for p, entries in saved.items():
            device = (p.to_local() if isinstance(p, DTensor) else p).device
            self.state[p] = {k: v.to(device=device, dtype=torch.float32) for k, v in entries.items()}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d float32 tensor on ``like``'s device."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _work(param: torch.Tensor, route: Route, lr: float, weight_decay: float) -> _Work:
    """The tensors to compute with for ``param``: in the rule's axis order, whole (an FSDP2 shard is
    gathered; :func:`_write_back` stores this process's part again)."""
    grad = param.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError("Celo2 does not support sparse gradients")
    if isinstance(param, DTensor):
        full = param.full_tensor() if not all(isinstance(pl, Replicate) for pl in param.placements) else param.to_local()
        grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
    else:
        full = param
    if route.axes is not None:
        full, grad = full.permute(route.axes), grad.permute(route.axes)
    elif full.dim() == 0:  # a scalar is computed as shape (1,)
        full, grad = full.view(1), grad.view(1)
    return _Work(param, full, grad, route, lr, weight_decay)


def _write_back(item: _Work) -> None:
    """Store a gathered FSDP2 tensor's new rows in this process's shard (others were updated in place)."""
    param = item.param
    if not isinstance(param, DTensor) or all(isinstance(pl, Replicate) for pl in param.placements):
        return
    full = item.full.permute(_inverse(item.route.axes)) if item.route.axes is not None else item.full
    shard = distribute_tensor(full.reshape(param.shape), param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())


def _inverse(axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(axes)), key=axes.__getitem__))


def create(model: nn.Module, lr: float | torch.Tensor = 1e-3, weight_decay: float = 0.0, **kwargs: Any) -> Celo2:
    """``Celo2`` over ``model``'s trainable parameters in ``transformers.Trainer``'s two groups, as
    AdamW gets them there: weights with ``weight_decay``, biases and norm weights with none.

    The parameters are named and ``model`` is known, so routing and layout use the module types
    (``nn.Embedding`` tables to the Adam branch, GPT-2's ``Conv1D`` kept ``(in, out)``). ``kwargs``
    go to :class:`Celo2`.
    """
    return Celo2(trainer_parameter_groups(model, weight_decay, named=True), lr, weight_decay, model=model, **kwargs)
