"""Weight decay in Celo's step: the original's optional L2 wrapper, per param group.

With ``wd`` a group's ``weight_decay``, the update sees ``g + wd * p`` and the scheduler the loss
``loss + sum over groups of wd * sum(p**2)``. ``weight_decay=0`` (the default) changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from optimizer_setup import assert_identical, make_params, paper_celo, run_steps, set_grads, snapshot, toy_loss

from celo_hf import Celo

pytestmark = pytest.mark.reference  # the tests build Celo from the paper's checkpoint

STEPS = 6
#: Per-group weight decay of the decayed runs: params[:2] in one group, params[2:] in the other.
DECAYS = (0.1, 0.02)


def _outcome(params: list[torch.Tensor], optimizer: Celo) -> list[torch.Tensor]:
    """The parameters, then the scheduler's loss buffer (the losses it was fed) and LSTM state."""
    celo = optimizer.state_dict()["celo"]
    return [p.detach() for p in params] + [celo[k] for k in ("loss_means", "loss_running_min", "lstm_hidden")]


def _decayed_run() -> list[torch.Tensor]:
    params = make_params()
    optimizer = paper_celo(
        [{"params": params[:2], "weight_decay": DECAYS[0]}, {"params": params[2:]}], weight_decay=DECAYS[1]
    )
    run_steps(optimizer, params, range(STEPS))
    return _outcome(params, optimizer)


def _by_hand(decay_gradient: bool, decay_loss: bool) -> list[torch.Tensor]:
    """A ``weight_decay=0`` Celo fed the wrapper's gradient and / or loss, computed here."""
    params = make_params()
    optimizer = paper_celo(params)
    decays = [DECAYS[0]] * 2 + [DECAYS[1]] * (len(params) - 2)
    for t in range(STEPS):
        set_grads(params, seed=100 + t)
        loss = torch.tensor(toy_loss(t))
        if decay_loss:
            loss = loss + sum(wd * p.detach().square().sum() for wd, p in zip(decays, params))
        if decay_gradient:
            for wd, p in zip(decays, params):
                p.grad = p.grad + wd * p.detach()
        optimizer.step(loss=loss)
    return _outcome(params, optimizer)


def test_weight_decay_is_the_originals_l2_wrapper():
    """The decayed run (parameters, and the losses its scheduler took in) is a plain Celo fed
    ``g + wd p`` and ``loss + sum(wd * sum(p**2))``, to float32 rounding (the sums run in another
    order); leaving out either term gives a different run."""
    decayed, wrapped = _decayed_run(), _by_hand(decay_gradient=True, decay_loss=True)
    for a, b in zip(decayed, wrapped):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for partial in (_by_hand(decay_gradient=True, decay_loss=False), _by_hand(decay_gradient=False, decay_loss=True)):
        assert max((a - b).abs().max() for a, b in zip(decayed, partial)) > 1e-3


def test_zero_weight_decay_is_bit_identical_to_no_weight_decay():
    """``weight_decay`` left out, 0 for the optimizer, or 0 in a group: the same bits."""
    runs = []
    for build in (
        lambda params: paper_celo(params),
        lambda params: paper_celo(params, weight_decay=0.0),
        lambda params: paper_celo([{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:]}]),
    ):
        params = make_params()
        optimizer = build(params)
        run_steps(optimizer, params, range(STEPS))
        runs.append(snapshot(params, optimizer))
    assert_identical(runs[0], runs[1])
    assert_identical(runs[0], runs[2])


def test_parameters_without_a_gradient_are_neither_decayed_nor_counted_in_the_loss():
    params = make_params()
    optimizer = paper_celo(params, weight_decay=0.1)
    others = [torch.nn.Parameter(p.detach().clone()) for p in params[1:]]
    alone = paper_celo(others, weight_decay=0.1)
    initial = params[0].detach().clone()
    for t in range(STEPS):
        set_grads(params, seed=100 + t)
        params[0].grad = None
        for p, q in zip(params[1:], others):
            q.grad = p.grad.clone()
        optimizer.step(loss=toy_loss(t))
        alone.step(loss=toy_loss(t))
    assert_identical(params[0].detach(), initial)
    assert_identical([p.detach() for p in params[1:]], [p.detach() for p in others])


def test_groups_without_the_key_get_the_default_and_old_checkpoints_load():
    """A group that does not set ``weight_decay`` gets the optimizer's; a state dict saved before
    ``weight_decay`` existed (no such key in its groups) loads with the loading optimizer's default
    and resumes bit for bit."""
    params = make_params()
    optimizer = paper_celo([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert optimizer.param_groups[2]["weight_decay"] == 0.1

    straight_params = make_params()
    straight = paper_celo(straight_params)
    run_steps(straight, straight_params, range(STEPS))

    first_params = make_params()
    first = paper_celo(first_params)
    run_steps(first, first_params, range(3))
    old = first.state_dict()
    for group in old["param_groups"]:
        del group["weight_decay"]
    resumed = paper_celo(first_params)
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["weight_decay"] == 0.0
    run_steps(resumed, first_params, range(3, STEPS))
    assert_identical(snapshot(first_params, resumed), snapshot(straight_params, straight))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1"])
def test_weight_decay_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: .*expected a finite number >= 0"):
        Celo(make_params(), total_steps=3, weight_decay=bad)
