"""The population form of Celo (meta-training's inner optimizer) runs the optimizer's own maths."""

import copy

import pytest
import torch

from celo_hf import Celo, population
from celo_hf.fresh_tensors import FRESH
from meta_training.pes import antithetic_population
from meta_training.train import flatten, unflatten

pytestmark = pytest.mark.reference  # every test reads the paper's checkpoint
SHAPES = {"w1": (8, 16), "b1": (16,), "w2": (16, 16), "scale": (), "kernel": (3, 3, 4, 8)}


@pytest.mark.parametrize("learned_schedule, gain_threshold, gain_signal, floor, fresh",
                         [(True, None, "tensor", None, ()), (False, None, "tensor", None, ()), (True, 2.0, "tensor", None, ()),
                          (True, 2.0, "model_start", None, ()), (True, None, "tensor", 5.0, ()),
                          (True, 2.0, "model_start", None, ("w2", "scale")), (True, 2.0, "tensor", None, ("b1",))])
def test_zero_noise_population_step_equals_celo(learned_schedule, gain_threshold, gain_signal, floor, fresh, paper_net):
    """A population of theta +/- 0 perturbations steps exactly as ``celo_hf.Celo`` does (also with
    the gradient-scale gain: threshold 2 puts these tensors' ``||g|| / ||p||`` of about 1 below it;
    with a param-scale floor of 5, above the RMS of ``w1`` and ``w2``, below the kernel's; and with
    ``fresh`` tensors, in a param group marked fresh for Celo, under a fresh gain of 3)."""
    net = copy.deepcopy(paper_net)
    net.learned_schedule = learned_schedule
    net.gain_threshold, net.gain_signal = gain_threshold, gain_signal
    net.param_scale_floor = floor
    net.fresh_gain = 3.0 if fresh else None
    generator = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
    steps = [({n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}, 2.0 - 0.1 * t) for t in range(6)]

    params = [torch.nn.Parameter(init[n].clone()) for n in SHAPES]
    groups = [{"params": [p for p, n in zip(params, SHAPES) if (n in fresh) == marked], FRESH: marked}
              for marked in (False, True)]
    optimizer = Celo([g for g in groups if g["params"]], total_steps=20, weights=copy.deepcopy(net),
                     backend="eager")  # as population.update
    for grads, loss in steps:
        for p, n in zip(params, SHAPES):
            p.grad = grads[n]
        optimizer.step(loss=loss)

    members = 4
    theta = flatten(net.state_dict())
    meta_weights = unflatten(antithetic_population(theta, torch.zeros(members // 2, theta.numel())), net.state_dict())
    stacked = {n: init[n].expand(members, *init[n].shape).contiguous() for n in SHAPES}
    state = population.init(stacked, torch.full((members,), 20), meta_weights, net)
    for grads, loss in steps:
        member_grads = {n: g.expand(members, *g.shape) for n, g in grads.items()}
        state = population.update(state, stacked, member_grads, torch.full((members,), loss), meta_weights, net,
                                  fresh=fresh)

    for p, n in zip(params, SHAPES):
        for member in range(members):
            assert torch.equal(stacked[n][member], p.detach()), n
    assert torch.equal(state.scheduler.iteration, torch.full((members,), len(steps)))


def test_reset_members_restarts_only_the_selected_members(paper_net):
    net = paper_net
    theta = flatten(net.state_dict())
    meta_weights = unflatten(theta.expand(3, -1), net.state_dict())
    params = {"w": torch.randn(3, 4, 5)}
    state = population.init(params, torch.full((3,), 10), meta_weights, net)
    state = population.update(state, params, {"w": torch.randn(3, 4, 5)}, torch.ones(3), meta_weights, net)
    reset = population.reset_members(state, torch.tensor([False, True, False]), torch.tensor([7, 8, 9]), meta_weights)
    assert reset.scheduler.iteration.tolist() == [1, 0, 1]
    assert reset.total_steps.tolist() == [10, 8, 10]
    assert reset.scheduler.loss_buffer.count.tolist() == [1, 0, 1]
    assert torch.equal(reset.scheduler.hidden[1], meta_weights["init_hidden"][1])
    assert not torch.equal(reset.scheduler.hidden[0], meta_weights["init_hidden"][0])
    for key, value in reset.tensors["w"].items():
        assert torch.count_nonzero(value[1]) == 0, key
        assert torch.equal(value[0], state.tensors["w"][key][0]), key


def test_a_reset_member_takes_a_new_model_start_gain_at_its_own_first_step(paper_net):
    """Only members at their first step read the gain from their gradients; the others keep theirs."""
    net = copy.deepcopy(paper_net)
    net.gain_threshold, net.gain_signal = 1.0, "model_start"
    theta = flatten(net.state_dict())
    meta_weights = unflatten(theta.expand(3, -1), net.state_dict())
    params = {"w": torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) + 1.0}
    state = population.init(params, torch.full((3,), 10), meta_weights, net)
    state = population.update(state, params, {"w": torch.full((3, 4, 5), 1e-2)}, torch.ones(3), meta_weights, net)
    first = state.run_gain.clone()
    assert torch.all(first < 0.1)
    state = population.reset_members(state, torch.tensor([False, True, False]), torch.tensor([7, 8, 9]), meta_weights)
    state = population.update(state, params, {"w": torch.full((3, 4, 5), 1e-1)}, torch.ones(3), meta_weights, net)
    assert torch.equal(state.run_gain[[0, 2]], first[[0, 2]])
    assert state.run_gain[1] > 5 * first[1]  # ten times the gradient at its new first step


def test_fresh_tensors_leave_the_model_start_gain_and_must_be_parameters(paper_net):
    """Every tensor fresh: gain 1; a fresh name that is not a parameter is an error naming it."""
    net = copy.deepcopy(paper_net)
    net.gain_threshold, net.gain_signal = 1.0, "model_start"
    meta_weights = unflatten(flatten(net.state_dict()).expand(2, -1), net.state_dict())
    params = {"w": torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0)) + 1.0}
    grads = {"w": torch.full((2, 4, 5), 1e-2)}
    state = population.init(params, torch.full((2,), 10), meta_weights, net)
    assert torch.equal(population.update(state, params, grads, torch.ones(2), meta_weights, net, fresh=("w",)).run_gain,
                       torch.ones(2))
    with pytest.raises(ValueError, match=r"fresh names \['head'\] are not among the parameters \['w'\]"):
        population.update(state, params, grads, torch.ones(2), meta_weights, net, fresh=("head",))
