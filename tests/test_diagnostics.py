"""Zero-gradient drift: measured, and removed by calibrating the weights (Celo's code unchanged)."""

import copy

import pytest
import torch

from celo_hf import Celo, CeloNet, load_celo_net
from celo_hf.diagnostics import calibrate_zero_gradient_, zero_gradient_drift

from helpers import PAPER_WEIGHTS


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (16, 16, 3), (5, 5), ()]
    return [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]


@pytest.mark.parametrize("weights", ["embedded", pytest.param("paper", marks=pytest.mark.reference), "random"])
def test_calibration_removes_zero_gradient_drift(weights):
    net = {"embedded": lambda: load_celo_net(None), "paper": lambda: load_celo_net(PAPER_WEIGHTS),
           "random": lambda: CeloNet()}[weights]()
    with torch.no_grad():  # give the fresh net non-zero biases, as trained weights have
        for _, bias in net.mlp_layers():
            bias.normal_(0.0, 0.5)
    before = zero_gradient_drift(_tensors(), net)
    calibrated = calibrate_zero_gradient_(copy.deepcopy(net))
    after = zero_gradient_drift(_tensors(), calibrated)
    assert before > 1e-6
    assert after < 1e-4 * before


def test_calibration_is_idempotent_and_keeps_gradient_steps():
    net = calibrate_zero_gradient_(load_celo_net(None))
    again = calibrate_zero_gradient_(copy.deepcopy(net))
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    p = torch.nn.Parameter(torch.randn(8, 4))
    start = p.detach().clone()
    optimizer = Celo([p], total_steps=10, weights=net)
    p.grad = torch.randn(8, 4)
    optimizer.step(loss=1.0)
    assert (p - start).norm() > 1e-4 * start.norm()


def test_drift_leaves_the_given_tensors_alone():
    tensors = _tensors()
    copies = [t.clone() for t in tensors]
    zero_gradient_drift(tensors, None, steps=2)
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c)
