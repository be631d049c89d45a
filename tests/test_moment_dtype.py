"""bfloat16 storage of Celo's momenta and second moment (``moment_dtype``)."""

import copy

import pytest
import torch
from helpers import PAPER_WEIGHTS

from celo_hf import Celo
from celo_hf.hub import load_celo_net

pytestmark = pytest.mark.reference  # every test reads the paper's checkpoint


@pytest.fixture(scope="module")
def net():
    return load_celo_net(PAPER_WEIGHTS)


def _train(net, moment_dtype, steps=60):
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = torch.sin(x @ torch.randn(16, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = Celo(model.parameters(), total_steps=steps, weights=copy.deepcopy(net), moment_dtype=moment_dtype)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.detach())
    return model, optimizer, loss.item()


def test_bfloat16_moments_are_stored_in_bfloat16_and_survive_a_round_trip(net):
    model, optimizer, _ = _train(net, torch.bfloat16, steps=3)
    weight = model[0].weight
    assert optimizer.state[weight]["m"].dtype == torch.bfloat16
    assert optimizer.state[weight]["rms"].dtype == torch.bfloat16
    assert optimizer.state[weight]["v_row"].dtype == torch.float32
    fresh = Celo(copy.deepcopy(model).parameters(), total_steps=3, weights=copy.deepcopy(net), moment_dtype=torch.bfloat16)
    fresh.load_state_dict(optimizer.state_dict())
    restored = fresh.state[fresh.param_groups[0]["params"][0]]
    assert restored["m"].dtype == torch.bfloat16
    assert torch.equal(restored["m"], optimizer.state[weight]["m"])


def test_bfloat16_moments_train_almost_like_float32(net):
    _, _, loss32 = _train(net, torch.float32)
    _, _, loss16 = _train(net, torch.bfloat16)
    assert loss16 == pytest.approx(loss32, rel=0.1)


def test_other_moment_dtypes_are_refused():
    with pytest.raises(ValueError, match="moment_dtype must be torch.float32 or torch.bfloat16, got torch.float16"):
        Celo([torch.nn.Parameter(torch.ones(2))], weights=PAPER_WEIGHTS, moment_dtype=torch.float16)


def test_bfloat16_moments_give_the_same_step_whatever_the_chunking():
    """Pass 2 must read the moments as stored (rounded to bfloat16) however a tensor is chunked: a
    single-chunk shortcut that reused pass 1's unrounded values differed by ~1e-5 relative."""

    def run(chunk_elements):
        torch.manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(5,), (5,), (3, 40), (64,)]]
        optimizer = Celo(params, total_steps=10, weights=PAPER_WEIGHTS, moment_dtype=torch.bfloat16, chunk_elements=chunk_elements)
        for t in range(3):
            for p in params:
                p.grad = torch.randn(p.shape) * 10.0 ** (t - 1)
            optimizer.step(loss=2.0 - 0.5 * t)
        return [p.detach() for p in params]

    for whole, chunked in zip(run(None), run(24)):
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-8)
