"""backend="compile": the same kernels through torch.compile compute what eager computes."""

import copy

import pytest
import torch
from helpers import PAPER_WEIGHTS

from celo_hf import Celo
from celo_hf.hub import load_celo_net

pytestmark = pytest.mark.reference  # every test reads the paper's checkpoint
SHAPES = [(), (7,), (7,), (3, 4), (20000,), (150, 130), (60, 5, 40)]


def _run(backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Parameters after three steps from the same start and gradients."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    optimizer = Celo(params, total_steps=8, weights=load_celo_net(PAPER_WEIGHTS), backend=backend, chunk_elements=5000)
    for t in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape) * 10.0 ** (t - 1)).to(dtype)
        optimizer.step(loss=1.5 - 0.3 * t)
    return [p.detach().float() for p in params]


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    """Stacked small tensors, a scalar, unfactored tensors, matrices factored either way round and a
    rank-3 tensor, over several chunks.
    (One dtype: each compiled variant costs tens of seconds; dtypes share the kernel source.)"""
    eager, compiled = _run("eager", torch.float32), _run("compile", torch.float32)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
