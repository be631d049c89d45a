"""The param-scale floor (``CeloNet(param_scale_floor=c)``): a tensor of rank >= 2 steps as if its
RMS were at least ``c / sqrt(k)``, ``k`` its size over all axes but the largest, so that a
zero-initialised matrix (a LoRA ``B``) moves like an initialised one. ``None`` is Celo v1."""

import copy
import math

import pytest
import torch

from celo_hf import Celo, CeloNet, load_celo_net
from celo_hf.layout import PARAM_SCALE_EPS, param_scale_floor


def test_floor_values_read_the_shorter_sides_whatever_the_orientation():
    assert param_scale_floor((384, 8), 0.1) == param_scale_floor((8, 384), 0.1) == 0.1 / math.sqrt(8)
    assert param_scale_floor((16, 3, 3, 16), 0.6) == pytest.approx(0.6 / 12)  # k = 3 * 3 * 16
    assert param_scale_floor((384,), 0.1) == param_scale_floor((), 0.1) == 0.0  # vectors and scalars: none
    assert param_scale_floor((384, 8), None) == 0.0  # Celo v1


def _floored(net: CeloNet, floor: float | None) -> CeloNet:
    net = copy.deepcopy(net)
    net.param_scale_floor = floor
    return net


def _one_step(net: CeloNet, values: list[torch.Tensor], grads: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(v.clone()) for v in values]
    optimizer = Celo(params, total_steps=10, weights=copy.deepcopy(net), backend=backend)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step(loss=1.0)
    return [p.detach() for p in params]


@pytest.mark.parametrize("backend", ["eager", "cpp", "reference"])
def test_a_zero_matrix_steps_at_the_floor_and_an_initialised_one_as_in_celo_v1(backend):
    """A zero-initialised (64, 8) matrix (LoRA's B) moves ``floor / sqrt(1e-9)`` times farther than
    in Celo v1 (the same direction and magnitude: only its scale changes); a random (64, 8) matrix
    whose RMS is above the floor, and a zero vector (rank 1: no floor), step bit for bit as without it."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.zeros(64, 8), torch.randn(64, 8, generator=generator), torch.zeros(8)]
    grads = [torch.randn(v.shape, generator=generator) * 1e-2 for v in values]
    net = load_celo_net(None)
    floor = 0.1
    plain = _one_step(_floored(net, None), values, grads, backend)
    with_floor = _one_step(_floored(net, floor), values, grads, backend)
    scale = (floor / math.sqrt(8)) / math.sqrt(PARAM_SCALE_EPS)
    assert float(plain[0].abs().max()) < 1e-5  # Celo v1: the zero matrix barely moves
    torch.testing.assert_close(with_floor[0], plain[0] * scale, rtol=1e-5, atol=0)
    assert float(with_floor[0].abs().mean()) > 1e-4
    assert torch.equal(with_floor[1], plain[1]) and torch.equal(with_floor[2], plain[2])


def test_floor_round_trips_and_bad_values_are_refused(tmp_path):
    CeloNet(param_scale_floor=0.25).save_pretrained(tmp_path)
    loaded = load_celo_net(tmp_path)
    assert loaded.param_scale_floor == loaded.rule_config().param_scale_floor == 0.25
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="param_scale_floor must be a positive number or None, got"):
            CeloNet(param_scale_floor=bad)
