"""``Celo``: the learned optimizer as a ``torch.optim.Optimizer``.

A thin shell: it owns the state, picks the loss, runs the learned scheduler once per step and calls
the per-tensor update of :mod:`celo_hf.update` for every parameter that has a gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.lr_scheduler import LambdaLR

from . import cpu_kernels
from .features import LossBuffer, loss_buffer_decays, scheduler_inputs
from .hub import load_celo_net
from .network import CeloNet
from .step_gain import row_norms, step_gain
from .update import (
    DEFAULT_CHUNK_ELEMENTS,
    SMALL_TENSOR_ELEMENTS,
    RowSharding,
    TensorState,
    UpdateWeights,
    init_tensor_state,
    reference_update,
    state_shape,
    update_batch_,
)

Backend = Literal["auto", "eager", "compile", "triton", "cpp", "reference"]
BACKENDS = ("auto", "eager", "compile", "triton", "cpp", "reference")
LossLike = float | int | torch.Tensor

_NO_LOSS = (
    "Celo.step() needs the current training loss (its learned scheduler reads it every step). "
    "Pass it as step(loss=loss), return it from the closure in step(closure), or call "
    "optimizer.set_loss(loss) before step(). With transformers.Trainer, build it as celo_hf.CeloTrainer(...) "
    "or call celo_hf.attach(trainer) before trainer.train()."
)


class Celo(torch.optim.Optimizer):
    """Celo (Moudgil et al., TMLR 2025): a learned update rule with a learned learning-rate schedule.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        total_steps: the planned number of optimizer steps. Celo's scheduler reads
            ``step / total_steps``; it may be set later (``opt.total_steps = n``) but must be a
            positive int by the first step.
        weights: the learned weights: ``None`` (embedded default), a ``CeloNet``, a local file or
            folder, or a Hub model id; see :func:`celo_hf.hub.load_celo_net`.
        lr: per-group multiplier of Celo's step (default 1.0: Celo's own schedule, untouched), so
            that external schedules compose.
        revision, token, cache_dir: Hub download options for ``weights``.
        backend: how the per-element work runs: ``"auto"`` (default: ``"cpp"`` for CPU tensors
            when the C++ kernels build on this machine, else ``"eager"``), ``"eager"`` (torch
            operations), ``"cpp"`` (hand-written C++ kernels for CPU tensors, the fastest on CPU:
            about 6x eager; compiled for this machine on first use, a few seconds once, then
            cached; needs a C++ compiler), ``"compile"`` (the eager kernels through
            ``torch.compile``, after a one-off compilation of tens of seconds), ``"triton"``
            (hand-written fused kernels for CUDA tensors; needs ``triton``), or ``"reference"``
            (the literal transcription of the specification, one tensor at a time; slow, for
            checking).
        chunk_elements: parameter elements the batched update processes at once (bounds the
            temporary memory; ``None``: the backend's default).
        moment_dtype: storage dtype of the per-element accumulators (momenta and second moment):
            ``torch.float32`` (default) or ``torch.bfloat16`` (16 -> 8 bytes of state per
            parameter; arithmetic stays float32; see the README for the accuracy cost).

    The training loss must reach every step: ``step(loss=...)``, a closure, or ``set_loss()``.
    Parameters whose ``.grad`` is ``None`` are left alone (the reference fed zeros instead). A step
    whose loss or gradients are not finite is skipped entirely and counted in ``skipped_steps``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        total_steps: int | None = None,
        weights: CeloNet | str | Path | None = None,
        lr: float = 1.0,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        backend: Backend = "auto",
        chunk_elements: int | None = None,
        moment_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16, got {moment_dtype}")
        if chunk_elements is not None and not (isinstance(chunk_elements, int) and chunk_elements > 0):
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        super().__init__(params, {"lr": lr})
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            if not p.is_floating_point():
                raise TypeError(f"Celo optimizes floating-point parameters, got one of dtype {p.dtype}")
        self.net = load_celo_net(weights, revision=revision, token=token, cache_dir=cache_dir)
        self.net.float().eval().requires_grad_(False)
        if backend == "cpp":
            cpu_kernels.prepare(self.net)  # a missing compiler shows here, not in the first step
        self.backend = backend
        self._cpp_unavailable: str | None = None  # why "auto" cannot use the C++ kernels ("" if it can)
        self.chunk_elements = chunk_elements
        self.moment_dtype = moment_dtype
        self.total_steps = total_steps
        self.iteration = 0
        self.skipped_steps = 0
        self._pending_loss: LossLike | None = None
        self._loss_buffer: LossBuffer | None = None
        self._lstm_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._decays: tuple[int, torch.Tensor] | None = None
        self._update_weights: dict[tuple[torch.device, int], UpdateWeights] = {}
        self._stacks: dict[tuple[int, ...], tuple[TensorState, list[TensorState]]] = {}
        self._warned_past_end = False

    # ---- configuration -------------------------------------------------------------------------

    @property
    def total_steps(self) -> int | None:
        """The planned number of steps (``None`` until known)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"total_steps must be a positive int (the planned number of optimizer steps), got {value!r}")
        self._total_steps = value

    def set_loss(self, loss: LossLike) -> None:
        """Hand over the training loss for the next ``step()`` (used once, then forgotten)."""
        self._pending_loss = _check_loss(loss)

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, loss: LossLike | None = None) -> Any:  # type: ignore[override]
        """One Celo step. The loss is taken from ``loss``, else the closure's return value, else
        :meth:`set_loss`. Returns the closure's loss (``None`` without a closure)."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        fed = loss if loss is not None else closure_loss if closure_loss is not None else self._pending_loss
        self._pending_loss = None
        if fed is None:
            raise RuntimeError(_NO_LOSS)
        fed = _check_loss(fed)
        if self.total_steps is None:
            raise RuntimeError(
                "Celo.total_steps is not set: give Celo(..., total_steps=N) or set optimizer.total_steps = N "
                "(the planned number of optimizer steps) before the first step"
            )

        work = [
            _work_item(p, group["lr"]) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        work = [item for item in work if item.param.numel() > 0]
        if not work:
            return closure_loss
        device = work[0].local.device
        loss_t = torch.as_tensor(fed, dtype=torch.float32).to(device).reshape(())
        if not _all_finite([item.grad for item in work], loss_t, _process_group(work)):
            self.skipped_steps += 1
            warnings.warn(
                f"Celo skipped step {self.iteration}: the loss or a gradient is NaN or infinite "
                f"(parameters and optimizer state left unchanged; {self.skipped_steps} step(s) skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            return closure_loss

        lr_mult = self._schedule(loss_t, device)
        num_decays = len(self.net.momentum_decays)
        for item in work:
            if not self.state[item.param]:
                self.state[item.param].update(
                    init_tensor_state(
                        item.local.shape, num_decays, item.local.device, item.param.shape, self.moment_dtype
                    )
                )
        gains = _gradient_scale_gains(work, self.net)
        backend = self._backend_on(device)
        if backend == "reference":
            for item in work:
                if item.sharding is not None:
                    raise RuntimeError("backend='reference' does not support sharded (FSDP2) parameters; use 'eager'")
                state = self.state[item.param]
                scale = lr_mult.to(device) * item.lr * (gains[item.param] if gains is not None else 1.0)
                new_p, new_state = reference_update(item.local, item.grad, state, scale, self.net)
                item.local.copy_(new_p)
                for key, value in new_state.items():
                    state[key].copy_(value)
        else:
            for batch in _batches(work, self.chunk_elements or DEFAULT_CHUNK_ELEMENTS[backend]):
                self._update(batch, lr_mult, gains)
        self.iteration += 1
        return closure_loss

    def _update(self, batch: list[_Work], lr_mult: torch.Tensor, gains: dict[torch.Tensor, torch.Tensor] | None) -> None:
        """Update tensors of one shape together: a large contiguous (or sharded) tensor through views
        of itself, small ones stacked (parameters copied in and back; their state stays stacked).
        ``gains``: each parameter's gradient-scale gain (0-d), if the meta-model has one."""
        locals_ = [item.local for item in batch]
        shape = state_shape(locals_[0].shape)
        device = locals_[0].device
        lrs = {item.lr for item in batch}
        if len(lrs) == 1:  # the usual case: one multiply, broadcast
            lr_scale = (lr_mult.to(device) * lrs.pop()).expand(len(batch))
        else:
            lr_scale = lr_mult.to(device) * torch.tensor([item.lr for item in batch], dtype=torch.float32, device=device)
        if gains is not None:
            lr_scale = lr_scale * torch.stack([gains[item.param] for item in batch]).to(device)
        weights = self._weights_on(device, len(batch))
        backend = self._backend_on(device)
        if len(batch) == 1 and locals_[0].is_contiguous():
            item = batch[0]
            state = {key: value.unsqueeze(0) for key, value in self.state[item.param].items()}
            update_batch_(
                item.local.view(1, *shape), item.grad.reshape(1, *shape), state, lr_scale, weights,
                backend, self.chunk_elements, item.sharding,
            )
            return
        p = torch.stack([t.reshape(shape) for t in locals_])
        g = torch.stack([item.grad.reshape(shape) for item in batch])
        update_batch_(p, g, self._stacked_state(batch), lr_scale, weights, backend, self.chunk_elements)
        torch._foreach_copy_(locals_, [row.view_as(t) for row, t in zip(p.unbind(0), locals_)])

    def _stacked_state(self, batch: list[_Work]) -> TensorState:
        """The state of a batch of small tensors, stacked ``(B, ...)``. It is kept from step to step
        and each parameter's state entries are views of its rows, so the update writes them in
        place; it is rebuilt (copying the entries in) when the batch or any entry changed, e.g.
        after :meth:`load_state_dict`."""
        key = tuple(id(item.param) for item in batch)
        states = [self.state[item.param] for item in batch]
        held = self._stacks.get(key)
        if held is not None and all(s[k] is view for s, views in zip(states, held[1]) for k, view in views.items()):
            return held[0]
        stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        views = [{k: v[i] for k, v in stacked.items()} for i in range(len(batch))]
        for s, row in zip(states, views):
            s.update(row)
        members = set(key)
        self._stacks = {other: v for other, v in self._stacks.items() if members.isdisjoint(other)}
        self._stacks[key] = (stacked, views)
        return stacked

    def _schedule(self, loss: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Update the loss buffer and the LSTM; return ``lr_mult`` ``(1,)`` on ``device``."""
        total = self.total_steps
        assert total is not None
        if self.iteration >= total and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"Celo is running past total_steps={total} (step {self.iteration}); it continues as the "
                "reference does, with its progress feature above 1",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._loss_buffer is None or self._lstm_state is None:
            self._loss_buffer = LossBuffer.init((), device)
            self._lstm_state = tuple(t.to(device) for t in self.net.to(device).initial_state())  # type: ignore[assignment]
        if self._decays is None or self._decays[0] != total:
            self._decays = (total, loss_buffer_decays(torch.tensor(total)).to(device))
        decays = self._decays[1]
        self._loss_buffer = self._loss_buffer.update(loss, decays)
        if not self.net.learned_schedule:
            return torch.ones(1, device=device)
        fraction = torch.tensor(self.iteration / total, dtype=torch.float32, device=device)
        inputs = scheduler_inputs(self._loss_buffer, fraction, decays)
        lr_mult, self._lstm_state = self.net.schedule(inputs[None], self._lstm_state)
        return lr_mult

    def _backend_on(self, device: torch.device) -> str:
        """The backend that updates tensors on ``device``: the one asked for, or for ``"auto"`` the
        C++ kernels on CPU (if they build here; else a warning, once, and eager) and eager elsewhere."""
        if self.backend != "auto":
            return self.backend
        if device.type != "cpu":
            return "eager"
        if self._cpp_unavailable is None:
            try:
                cpu_kernels.prepare(self.net)
                self._cpp_unavailable = ""
            except (RuntimeError, OSError) as err:  # no compiler, a failed build, an unwritable cache
                self._cpp_unavailable = str(err) or type(err).__name__
                warnings.warn(
                    f"Celo(backend='auto') falls back to the eager kernels, several times slower on CPU: {err}",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return "eager" if self._cpp_unavailable else "cpp"

    def _weights_on(self, device: torch.device, batch: int) -> UpdateWeights:
        """The meta-model's weights on ``device`` for a batch of ``batch`` tensors (cached)."""
        key = (device, batch)
        if key not in self._update_weights:
            self._update_weights[key] = UpdateWeights.from_net(self.net, device).expand(batch)
        return self._update_weights[key]

    # ---- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``"celo"`` entry with the global state.

        Only tensors, ints and lists: it loads with ``torch.load(weights_only=True)``.
        """
        state = super().state_dict()
        # Small tensors' entries are views of a shared stacked buffer (_stacked_state): save copies.
        state["state"] = {
            index: {k: v.clone() if v._base is not None else v for k, v in entries.items()}
            for index, entries in state["state"].items()
        }
        celo: dict[str, Any] = {
            "iteration": self.iteration,
            "total_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
        }
        if self._loss_buffer is not None and self._lstm_state is not None:
            celo.update(
                loss_means=self._loss_buffer.means.clone(),
                loss_running_min=self._loss_buffer.running_min.clone(),
                loss_count=self._loss_buffer.count.clone(),
                lstm_hidden=self._lstm_state[0].clone(),
                lstm_cell=self._lstm_state[1].clone(),
            )
        state["celo"] = celo
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Per-parameter state keeps Celo's dtypes (float32, or
        ``moment_dtype`` for the momenta) whatever the parameter dtype (torch's loader would cast it
        to bf16 / fp16 parameters)."""
        celo = state_dict.get("celo")
        if not isinstance(celo, dict):
            raise ValueError("not a Celo optimizer state dict: it has no 'celo' entry")
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        num_decays = len(self.net.momentum_decays)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            local = p.to_local() if isinstance(p, DTensor) else p
            expected = init_tensor_state(local.shape, num_decays, "meta", p.shape, self.moment_dtype)
            got = {k: tuple(v.shape) for k, v in saved.items()}
            if got != {k: tuple(v.shape) for k, v in expected.items()}:
                raise ValueError(
                    f"saved Celo state for a parameter of shape {tuple(p.shape)} has entries {got}, "
                    f"expected {{{', '.join(f'{k!r}: {tuple(v.shape)}' for k, v in expected.items())}}}"
                )
            self.state[p] = {k: v.to(device=local.device, dtype=expected[k].dtype) for k, v in saved.items()}
        self.total_steps = celo["total_steps"]
        self.iteration = int(celo["iteration"])
        self.skipped_steps = int(celo["skipped_steps"])
        self._warned_past_end = False
        if "lstm_hidden" in celo:
            device = next(chain.from_iterable(g["params"] for g in self.param_groups)).device
            f32 = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
            count = torch.as_tensor(celo["loss_count"], dtype=torch.int64, device=device)
            self._loss_buffer = LossBuffer(f32(celo["loss_means"]), f32(celo["loss_running_min"]), count)
            self._lstm_state = (f32(celo["lstm_hidden"]), f32(celo["lstm_cell"]))
            self.net.to(device)
        else:
            self._loss_buffer = None
            self._lstm_state = None


class _Work(NamedTuple):
    """One parameter to update: ``param`` (the state key; a DTensor under FSDP2), the tensors to
    compute with (``local``, ``grad``: this process's rows when sharded), its group ``lr``."""

    param: torch.Tensor
    local: torch.Tensor
    grad: torch.Tensor
    lr: float
    sharding: RowSharding | None


def _work_item(param: torch.Tensor, lr: float) -> _Work:
    """Unwrap a parameter for the update; FSDP2's row-sharded DTensors become their local rows."""
    grad = param.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError("Celo does not support sparse gradients")
    if not isinstance(param, DTensor):
        return _Work(param, param, grad, lr, None)
    local_grad = grad.to_local() if isinstance(grad, DTensor) else grad
    mesh, placements = param.device_mesh, tuple(param.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return _Work(param, param.to_local(), local_grad, lr, None)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise RuntimeError(
            f"Celo supports DTensor parameters sharded on their first axis over a 1-D mesh (FSDP2's default), "
            f"got placements {placements} on a {mesh.ndim}-D mesh for a parameter of shape {tuple(param.shape)}"
        )
    return _Work(param, param.to_local(), local_grad, lr, RowSharding(param.shape[0], mesh.get_group()))


def _gradient_scale_gains(work: list[_Work], net: CeloNet) -> dict[torch.Tensor, torch.Tensor] | None:
    """Each parameter's gradient-scale gain (:mod:`celo_hf.step_gain`), 0-d float32 on its device,
    or ``None`` when ``net`` has none. Sharded tensors' norms are completed across their group."""
    if net.gain_threshold is None:
        return None
    squares = []
    for item in work:
        pair = torch.cat([row_norms(t.reshape(1, -1)) for t in (item.grad, item.local)]).square()
        if item.sharding is not None:
            torch.distributed.all_reduce(pair, group=item.sharding.group)
        squares.append(pair)
    norms = torch.stack([pair.to(work[0].local.device) for pair in squares]).sqrt()
    gains = step_gain(norms[:, 0], norms[:, 1], net.gain_threshold, net.gain_power)
    return {item.param: gain.to(item.local.device) for item, gain in zip(work, gains)}


def _process_group(work: list[_Work]) -> object | None:
    """The group whose processes must agree on skipping a step: the sharding group, if any."""
    return next((item.sharding.group for item in work if item.sharding is not None), None)


def _batches(work: list[_Work], chunk_elements: int) -> list[list[_Work]]:
    """Group work for :func:`update_batch_`: each large or sharded tensor alone, small ones with
    others of the same shape, dtype and device (at most ``chunk_elements`` in all)."""
    batches: list[list[_Work]] = []
    open_batches: dict[tuple[Any, ...], list[_Work]] = {}
    for item in work:
        p = item.local
        if item.sharding is not None or (p.numel() > SMALL_TENSOR_ELEMENTS and p.is_contiguous()):
            batches.append([item])
            continue
        key = (tuple(p.shape), p.dtype, p.device)
        batch = open_batches.get(key)
        if batch is None or (len(batch) + 1) * p.numel() > max(chunk_elements, p.numel()):
            batch = open_batches[key] = []
            batches.append(batch)
        batch.append(item)
    return batches


def _check_loss(loss: Any) -> LossLike:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"Celo needs the scalar training loss, got a tensor of shape {tuple(loss.shape)}")
        return loss.detach()
    try:
        return float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"Celo needs the training loss as a number or a 1-element tensor, got {type(loss).__name__}") from None


def _all_finite(grads: list[torch.Tensor], loss: torch.Tensor, group: object | None) -> bool:
    """Whether the loss and every gradient are finite (on every process of ``group``): the step's
    one host synchronisation.

    A fast 2-norm per tensor decides; only when one is not finite (NaN, inf, or a finite gradient
    so large its squares overflow) does an exact element-wise check run.
    """
    def check(exact: bool) -> bool:
        flags = [torch.isfinite(loss)]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for group_grads in by_device.values():
            if exact:
                flags += [torch.isfinite(g).all().to(loss.device) for g in group_grads]
            else:
                flags.append(torch.isfinite(torch.stack(torch._foreach_norm(group_grads))).all().to(loss.device))
        finite = torch.stack(flags).all().to(torch.int32)
        if group is not None:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=group)
        return bool(finite)

    return check(exact=False) or check(exact=True)


def create(
    model: torch.nn.Module, total_steps: int | None = None, weights: CeloNet | str | Path | None = None, **kwargs: Any
) -> tuple[Celo, LambdaLR]:
    """``(optimizer, scheduler)`` for ``transformers.Trainer(..., optimizers=create(model, total_steps))``.

    The optimizer is :class:`Celo` over the model's trainable parameters (``kwargs`` go to it); the
    scheduler is a constant ``LambdaLR`` so that nothing rescales Celo's own learned schedule.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
    optimizer = Celo(params, total_steps=total_steps, weights=weights, **kwargs)
    return optimizer, LambdaLR(optimizer, lambda _: 1.0)
