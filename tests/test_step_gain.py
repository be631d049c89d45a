"""The gradient-scale gain: each tensor's step times min(1, (||g|| / ||p||) / threshold) ** power."""

import copy

import pytest
import torch

from celo_hf import Celo, CeloNet, load_celo_net
from celo_hf.step_gain import step_gain


def test_step_gain_values():
    grad_norm = torch.tensor([1.0, 0.01, 0.5, 0.0, 3.0])
    param_norm = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0])
    gain = step_gain(grad_norm, param_norm, threshold=0.1, power=2.0)
    torch.testing.assert_close(gain, torch.tensor([1.0, 0.01, 1.0, 0.0, 1.0]))


def _gain_net(threshold: float | None, power: float = 1.0) -> CeloNet:
    base = load_celo_net(None)
    net = CeloNet(**{**base._hub_mixin_config, "gain_threshold": threshold, "gain_power": power})
    net.load_state_dict(base.state_dict())
    return net


@pytest.mark.parametrize("backend", ["eager", "cpp", "reference"])
def test_gain_scales_each_tensors_step_as_an_lr_would(backend):
    """One step with the gain equals a step without it whose per-tensor lr is the expected gain."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (3, 3, 4)]
    values = [torch.randn(s, generator=generator) for s in shapes]
    grads = [scale * torch.randn(s, generator=generator) for s, scale in zip(shapes, (1e-3, 1.0, 3e-2))]
    threshold, power = 0.1, 0.5
    expected = [min(1.0, float(g.norm() / v.norm()) / threshold) ** power for g, v in zip(grads, values)]
    assert min(expected) < 0.2 and max(expected) == 1.0

    def one_step(net: CeloNet, lrs: list[float]) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(v.clone()) for v in values]
        groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs)]
        optimizer = Celo(groups, total_steps=10, weights=copy.deepcopy(net), backend=backend)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step(loss=1.0)
        return [p.detach() for p in params]

    with_gain = one_step(_gain_net(threshold, power), [1.0, 1.0, 1.0])
    as_lr = one_step(_gain_net(None), expected)
    for a, b in zip(with_gain, as_lr):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gain_settings_round_trip_through_the_project_format(tmp_path):
    net = _gain_net(0.03, 2.0)
    net.save_pretrained(tmp_path)
    loaded = load_celo_net(tmp_path)
    assert (loaded.gain_threshold, loaded.gain_power) == (0.03, 2.0)
    assert load_celo_net(None).gain_threshold is None  # Celo v1 weights: no gain


@pytest.mark.parametrize("kwargs", [{"gain_threshold": 0.0}, {"gain_threshold": -1.0}, {"gain_power": -0.5}])
def test_bad_gain_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="gain_"):
        CeloNet(**kwargs)


def test_selection_rule_takes_the_best_fine_tune_among_candidates_near_the_base_on_digits():
    from meta_training.select_gain import choose

    base = {"digits": 0.010, "finetune": 0.70}
    assert choose({"none": base, "0.01": {"digits": 0.0105, "finetune": 0.65},
                   "0.1": {"digits": 0.02, "finetune": 0.50}}) == "0.01"
    assert choose({"none": base, "0.1": {"digits": 0.02, "finetune": 0.50}}) is None
