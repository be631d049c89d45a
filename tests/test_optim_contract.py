"""``celo_hf.Celo`` held to the generic contracts of PyTorch's own optimizer suite (``TestOptimRenewed``
in torch's ``test/test_optim.py``): error inputs, tensor ``lr``, hooks, state-dict determinism and
round trips, copies and pickles, param groups, ``zero_grad``, printing, dtypes, ``torch.compile``d
training steps, and steps that ``GradScaler`` skips.

Differences by design, not held to torch's contracts: a zero gradient still moves a parameter
(Celo's update reads the parameter and its momenta, as in the original); complex parameters are
refused (Celo is defined on real tensors); the flags ``maximize``, ``foreach``, ``fused``,
``capturable`` and ``differentiable`` do not exist; any dtype is updated with float32 arithmetic.

torch's generic error inputs are written out here rather than imported:
``torch.testing._internal.common_optimizers`` imports ``common_utils``, which needs ``expecttest``
and on import changes global torch state (``torch.backends.disable_global_flags()``) for every later
test in the session.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import PAPER_WEIGHTS
from optimizer_setup import (
    SHAPES,
    assert_identical,
    make_params,
    paper_celo,
    run_steps,
    set_grads,
    snapshot,
    toy_loss,
)

from torch.optim.lr_scheduler import LambdaLR

from celo_hf import Celo

pytestmark = pytest.mark.reference  # the tests build Celo from the paper's checkpoint


def _all_params(optimizer: Celo) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _same_shape_params(count: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """Small tensors of one shape: Celo updates them stacked together."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, generator=generator)) for _ in range(count)]


# ---- error inputs ------------------------------------------------------------------------------------


def _sample() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(1, 1))


_A, _B = _sample(), _sample()

#: torch 2.13's ``get_error_inputs_for_all_optims("cpu", ...)``: (params, kwargs, error type, message).
TORCH_ERROR_INPUTS = {
    "invalid param type": (
        _A, {}, TypeError,
        "params argument given to the optimizer should be an iterable of Tensors or dicts, but got torch.FloatTensor",
    ),
    "a param group cannot have duplicate parameters": (
        [_A, _A], {}, UserWarning, "a parameter group with duplicate parameters",
    ),
    "duplicate parameters should not occur across param groups either": (
        [{"params": _A}, {"params": _A}], {}, ValueError, "some parameters appear in more than one parameter group",
    ),
    "Tensor lr must be 1-element": (None, {"lr": torch.tensor([0.001, 0.001])}, ValueError, "Tensor lr must be 1-element"),
    "all optimizer params should be with/without names": (
        [("weight", _A), _B], {}, ValueError,
        r"all optimizer params should be with/without names\. Some param names are missing",
    ),
    "all optimizer param groups should be with/without names.": (
        [{"params": [_A], "lr": 1e-2}, {"params": [("weight", _B)]}], {}, ValueError,
        r"all optimizer param groups should be with/without names\. cannot add param group with names to the optimizer",
    ),
}

#: Celo's own argument checks, in torch's wording where torch has one.
CELO_ERROR_INPUTS = {
    "negative lr": ([_A], {"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0"),
    "NaN tensor lr": ([_A], {"lr": torch.tensor(float("nan"))}, ValueError, "Invalid learning rate: nan"),
    "integer tensor lr": ([_A], {"lr": torch.tensor(1)}, TypeError, "Tensor lr must be floating point, got dtype torch.int64"),
    "negative weight_decay": ([_A], {"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0\.1"),
    "complex parameters": (
        [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], {}, TypeError,
        "floating-point parameters, got one of dtype torch.complex64",
    ),
}


@pytest.mark.parametrize(
    ("params", "kwargs", "error", "message"),
    list(TORCH_ERROR_INPUTS.values()) + list(CELO_ERROR_INPUTS.values()),
    ids=list(TORCH_ERROR_INPUTS) + list(CELO_ERROR_INPUTS),
)
def test_error_inputs(params, kwargs, error, message):
    build = lambda: Celo(params, total_steps=3, weights=PAPER_WEIGHTS, **kwargs)  # noqa: E731
    if issubclass(error, Warning):
        with pytest.warns(error, match=message):
            build()
    else:
        with pytest.raises(error, match=message):
            build()


def test_named_parameters_are_accepted_and_saved():
    params = make_params()
    optimizer = paper_celo(list(zip(SHAPES, params)))
    run_steps(optimizer, params, range(2))
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == list(SHAPES)
    plain_params = make_params()
    plain = paper_celo(plain_params)
    run_steps(plain, plain_params, range(2))
    assert_identical(snapshot(params, optimizer), snapshot(plain_params, plain))


# ---- tensor lr ---------------------------------------------------------------------------------------


def test_tensor_lr_steps_as_the_same_float_lr_and_may_be_changed_in_place():
    """``Celo(..., lr=torch.tensor(0.5))``: its group and one with a float lr, their small tensors
    stacked together (per-row lr), then the tensor changed in place: as with float lrs throughout."""

    def run(lr: float | torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        params = _same_shape_params(4)
        optimizer = paper_celo([{"params": params[:2]}, {"params": params[2:], "lr": 2.0}], lr=lr)
        run_steps(optimizer, params, range(2))
        if isinstance(lr, torch.Tensor):
            lr.fill_(0.25)
        else:
            optimizer.param_groups[0]["lr"] = 0.25
        run_steps(optimizer, params, range(2, 4))
        return snapshot(params, optimizer)

    lr = torch.tensor(0.5)
    assert_identical(run(lr), run(0.5))
    assert float(lr) == 0.25


# ---- hooks -------------------------------------------------------------------------------------------


def test_step_pre_hook_may_supply_the_loss_and_post_hook_sees_the_step():
    params = make_params()
    optimizer = paper_celo(params)
    seen: list[tuple[str, int]] = []

    def pre_hook(opt: Celo, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        seen.append(("pre", opt.iteration))
        return args, {**kwargs, "loss": toy_loss(opt.iteration)}

    optimizer.register_step_pre_hook(pre_hook)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", opt.iteration)))
    for t in range(3):
        set_grads(params, seed=100 + t)
        optimizer.step()
    assert seen == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("pre", 2), ("post", 3)]

    expected_params = make_params()
    expected = paper_celo(expected_params)
    run_steps(expected, expected_params, range(3))
    assert_identical(snapshot(params, optimizer), snapshot(expected_params, expected))


def _stepped(steps: int = 3) -> tuple[list[torch.nn.Parameter], Celo]:
    params = make_params()
    optimizer = paper_celo(params)
    run_steps(optimizer, params, range(steps))
    return params, optimizer


def test_state_dict_hooks_as_in_torchs_suite():
    """torch's hooks: the pre-hook puts a non-dict entry into ``optimizer.state``, the post-hook
    takes it out of the state dict and marks it; post-hooks see the ``"celo"`` entry, and the dict a
    post-hook returns is the result."""
    _, optimizer = _stepped()

    def pre_hook(opt: Celo) -> None:
        opt.state["test"] = 1

    def post_hook(opt: Celo, state_dict: dict[str, Any]) -> None:
        state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
        state_dict["celo_seen_by_post_hook"] = state_dict["celo"]["iteration"]

    def replacing_post_hook(opt: Celo, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {**state_dict, "replaced": True}

    optimizer.register_state_dict_pre_hook(pre_hook)
    optimizer.register_state_dict_post_hook(post_hook)
    state_dict = optimizer.state_dict()
    assert state_dict["ran_state_dict_pre_hook"] and state_dict["celo_seen_by_post_hook"] == 3
    assert "test" not in state_dict["state"] and optimizer.state["test"] == 1

    optimizer.register_state_dict_post_hook(replacing_post_hook)
    assert optimizer.state_dict()["replaced"] is True


def test_load_state_dict_hooks_as_in_torchs_suite():
    """torch's hooks: a pre-hook edits the dict, a second returns an edited deep copy (which is what
    loads, Celo's entry included); the post-hook runs after Celo's own state is restored and writes
    non-dict entries into ``optimizer.state``, which then saves, loads and steps."""
    params, source = _stepped()
    saved = source.state_dict()
    optimizer = paper_celo(params)

    def edit_in_place(opt: Celo, state_dict: dict[str, Any]) -> None:
        state_dict["param_groups"][0]["lr"] = 0.002

    def return_edited_copy(opt: Celo, state_dict: dict[str, Any]) -> dict[str, Any]:
        edited = copy.deepcopy(state_dict)
        edited["param_groups"][0]["lr"] = 0.003
        edited["celo"]["skipped_steps"] = 5
        return edited

    def post_hook(opt: Celo) -> None:
        opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
        opt.state["iteration_seen_by_post_hook"] = opt.iteration
        opt.state["skipped_seen_by_post_hook"] = opt.skipped_steps

    optimizer.register_load_state_dict_pre_hook(edit_in_place)
    optimizer.register_load_state_dict_pre_hook(return_edited_copy)
    optimizer.register_load_state_dict_post_hook(post_hook)
    optimizer.load_state_dict(saved)
    assert saved["celo"]["skipped_steps"] == 0  # the edited copy loaded, not the caller's dict
    assert optimizer.state["ran_load_state_dict_pre_hook2"] is True
    assert optimizer.state["iteration_seen_by_post_hook"] == 3 and optimizer.state["skipped_seen_by_post_hook"] == 5

    reloaded = paper_celo(params)
    reloaded.load_state_dict(optimizer.state_dict())
    assert reloaded.state["iteration_seen_by_post_hook"] == 3 and reloaded.param_groups[0]["lr"] == 0.003
    run_steps(reloaded, params, range(3, 4))
    assert reloaded.iteration == 4


# ---- state dicts -------------------------------------------------------------------------------------


def _through_torch_save(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_is_deterministic_and_round_trips():
    """Two identical runs save identical state dicts; one loaded (through ``torch.save`` and
    ``torch.load(weights_only=True)``) into a fresh optimizer saves the same dict again, and both
    continue identically."""
    params, optimizer = _stepped()
    twin_params, twin = _stepped()
    assert_identical(optimizer.state_dict(), twin.state_dict())

    loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = paper_celo(loaded_params)
    loaded.load_state_dict(_through_torch_save(optimizer.state_dict()))
    assert_identical(loaded.state_dict(), optimizer.state_dict())
    run_steps(loaded, loaded_params, range(3, 5))
    run_steps(optimizer, params, range(3, 5))
    assert_identical(snapshot(loaded_params, loaded), snapshot(params, optimizer))


# ---- copies and pickles ------------------------------------------------------------------------------


def _pickled(optimizer: Celo) -> Celo:
    return pickle.loads(pickle.dumps(optimizer))


def _torch_saved(optimizer: Celo) -> Celo:
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_steps_exactly_as_the_original(duplicate: Callable[[Celo], Celo]):
    """A copy mid-run (stacked small tensors, scheduler state) continues bit for bit as the original
    does, independently of it; torch's hooks are not copied (as for torch's optimizers), nor is the
    wrapper an LR scheduler puts around the original's ``step``."""
    params = make_params() + _same_shape_params(3)
    optimizer = paper_celo(params)
    LambdaLR(optimizer, lambda _: 1.0)
    run_steps(optimizer, params, range(3))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: None)
    clone = duplicate(optimizer)
    clone_params = _all_params(clone)
    assert all(c is not p and torch.equal(c, p) for c, p in zip(clone_params, params))
    assert not clone._optimizer_step_post_hooks

    run_steps(clone, clone_params, range(3, 6))
    assert optimizer.iteration == 3
    run_steps(optimizer, params, range(3, 6))
    assert_identical(snapshot(clone_params, clone), snapshot(params, optimizer))


# ---- param groups, zero_grad, printing ---------------------------------------------------------------


def test_param_groups_with_different_lr_step_as_separate_optimizers():
    """Celo's scheduler reads only the loss and the step count, so one optimizer with two groups
    does what two optimizers over the groups do (the tensors' shapes differ: none stacked)."""
    params = make_params()
    optimizer = paper_celo([{"params": params[:2], "lr": 0.5}, {"params": params[2:]}])
    run_steps(optimizer, params, range(3))
    first, second = make_params(), make_params()
    separate = [paper_celo(first[:2], lr=0.5), paper_celo(second[2:])]
    for t in range(3):
        set_grads(first, seed=100 + t)
        set_grads(second, seed=100 + t)
        for opt in separate:
            opt.step(loss=toy_loss(t))
    assert_identical([p.detach() for p in params], [p.detach() for p in first[:2] + second[2:]])


def test_add_param_group_mid_training():
    """A group added after two steps gets state on its first step and moves; the tensors already
    there step exactly as in an optimizer that never had the new group; the group gets the
    defaults it does not set."""
    params = make_params()
    optimizer = paper_celo(params[:2])
    run_steps(optimizer, params[:2], range(2))
    optimizer.add_param_group({"params": params[2:], "lr": 0.5})
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    initial = [p.detach().clone() for p in params[2:]]
    for t in range(2, 5):
        set_grads(params, seed=100 + t)
        optimizer.step(loss=toy_loss(t))
    assert all(not torch.equal(p, p0) for p, p0 in zip(params[2:], initial))
    assert all(optimizer.state[p]["rms"].shape == (p.shape or (1,)) for p in params[2:])

    alone_params = make_params()[:2]
    alone = paper_celo(alone_params)
    run_steps(alone, alone_params, range(5))
    assert_identical(snapshot(params[:2], optimizer), snapshot(alone_params, alone))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_resets_the_gradients_and_drops_a_handed_over_loss(set_to_none: bool):
    params, optimizer = _stepped(1)
    set_grads(params, seed=7)
    grads = [p.grad for p in params]
    optimizer.set_loss(1.0)
    optimizer.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert all(p.grad is None for p in params)
    else:
        assert all(p.grad is g and torch.count_nonzero(g) == 0 for p, g in zip(params, grads))
    set_grads(params, seed=8)
    with pytest.raises(RuntimeError, match="needs the current training loss"):
        optimizer.step()


def test_repr_lists_the_param_groups():
    optimizer = paper_celo([{"params": make_params()[:2]}, {"params": make_params()[2:], "lr": 0.5}])
    text = repr(optimizer)
    assert text.startswith("Celo (") and "Parameter Group 1" in text
    assert "lr: 0.5" in text and "weight_decay: 0.0" in text


# ---- dtypes ------------------------------------------------------------------------------------------


def test_float64_parameters_step_with_float32_arithmetic():
    """float64 parameters keep their dtype and float32 state; from float32-representable values the
    run is the float32 run exactly (bf16 / fp16: tests/test_optimizer.py)."""
    params = make_params(torch.float64)
    optimizer = paper_celo(params)
    run_steps(optimizer, params, range(3))
    float32_params = make_params()
    float32 = paper_celo(float32_params)
    run_steps(float32, float32_params, range(3))
    for p, q in zip(params, float32_params):
        assert p.dtype == torch.float64
        assert_identical(p.detach(), q.detach().double())
        assert all(v.dtype == torch.float32 for v in optimizer.state[p].values())


# ---- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hand_over", ["step(loss=...)", "set_loss"])
def test_compiled_training_step_matches_eager(hand_over: str):
    """A ``torch.compile``d function doing forward, backward and the Celo step (the step runs
    eagerly, a graph break) matches eager bit for bit, scheduler state included. Dynamo's own
    ``eager`` backend: what drops state is dynamo's tracing, and forward / backward stay bitwise
    comparable."""

    def train(compiled: bool) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        optimizer = paper_celo(model.parameters())

        def train_step() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if hand_over == "set_loss":
                optimizer.set_loss(loss)
                optimizer.step()
            else:
                optimizer.step(loss=loss)
            return loss

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        for _ in range(4):
            step()
        return snapshot(list(model.parameters()), optimizer)

    torch._dynamo.reset()
    compiled = train(compiled=True)
    assert compiled[1]["celo"]["iteration"] == 4 and "lstm_hidden" in compiled[1]["celo"]
    assert_identical(compiled, train(compiled=False))


# ---- steps GradScaler skips ----------------------------------------------------------------------------


def _scaled_step(model: torch.nn.Module, optimizer: Celo, scaler: torch.amp.GradScaler, overflow: bool) -> None:
    """Forward, scaled backward (an infinite gradient if ``overflow``), loss handed over, scaler step."""
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    if overflow:
        model.weight.grad[0, 0] = float("inf")
    optimizer.set_loss(loss)
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize(
    ("zero_grad", "message"),
    [
        (lambda model, optimizer: optimizer.zero_grad(), ""),
        (lambda model, optimizer: optimizer.zero_grad(set_to_none=False), ""),
        (lambda model, optimizer: model.zero_grad(), r".*set_loss\(\) was dropped.*replaced"),
    ],
    ids=["optimizer.zero_grad()", "optimizer.zero_grad(set_to_none=False)", "model.zero_grad()"],
)
def test_a_step_gradscaler_skipped_leaves_no_stale_loss(zero_grad: Callable[[torch.nn.Module, Celo], None], message):
    """A real ``GradScaler`` skips ``optimizer.step`` on an infinite gradient; the loss handed over
    for that step must not reach the next one, which has new gradients but no loss of its own.
    ``Celo.zero_grad`` drops it; without it, new gradient tensors show that it is stale."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = paper_celo(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    _scaled_step(model, optimizer, scaler, overflow=False)
    assert optimizer.iteration == 1  # set_loss, then GradScaler unscales in place and steps
    zero_grad(model, optimizer)
    _scaled_step(model, optimizer, scaler, overflow=True)
    assert optimizer.iteration == 1 and scaler.get_scale() == 2.0**7  # skipped by the scaler

    zero_grad(model, optimizer)
    model(torch.ones(4, 3)).square().mean().backward()
    with pytest.raises(RuntimeError, match="needs the current training loss" + message):
        optimizer.step()
    assert optimizer.iteration == 1


def test_a_loss_handed_over_before_backward_is_used():
    """``set_loss`` may come before ``backward()``: the gradients then appear, none is replaced."""
    results = []
    for before_backward in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = paper_celo(model.parameters())
        for t in range(3):
            optimizer.zero_grad()
            loss = model(torch.full((4, 3), 0.5 + t)).square().mean()
            if before_backward:
                optimizer.set_loss(loss)
                loss.backward()
                optimizer.step()
            else:
                loss.backward()
                optimizer.step(loss=loss)
        results.append(snapshot(list(model.parameters()), optimizer))
    assert_identical(results[0], results[1])
