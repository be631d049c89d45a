"""The Triton kernels (backend="triton") compute what the eager kernels compute.

CI has no GPU: the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
read when the kernels are defined, hence a fresh interpreter per check).
"""

import pytest
from helpers import PAPER_WEIGHTS

pytest.importorskip("triton")
pytestmark = pytest.mark.reference  # every check reads the paper's checkpoint

CHECK = f"""
import copy
import torch
from celo_hf import Celo, CeloNet

net = CeloNet.from_pretrained({str(PAPER_WEIGHTS)!r})
shapes = [(), (5,), (5,), (3, 4), (3, 4), (4, 4), (16, 1), (1, 8), (3, 3, 4, 8), (2100,), (70, 40)]


def run(backend, dtype, moment_dtype=torch.float32):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    optimizer = Celo(params, total_steps=10, weights=copy.deepcopy(net), backend=backend, chunk_elements=1500,
                     moment_dtype=moment_dtype)
    for t in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape) * 10.0 ** (2 * t - 2)).to(dtype)
        optimizer.step(loss=2.0 - 0.5 * t)
    return params, optimizer


for dtype in (torch.float32, torch.bfloat16, torch.float16):
    (eager, eager_opt), (triton, triton_opt) = run("eager", dtype), run("triton", dtype)
    for a, b in zip(eager, triton):
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b), (dtype, a.shape, (a.float() - b.float()).abs().max())
        for key, value in eager_opt.state[a].items():
            torch.testing.assert_close(triton_opt.state[b][key], value, rtol=1e-6, atol=1e-12)
(eager, eager_opt), (triton, triton_opt) = run("eager", torch.float32, torch.bfloat16), run("triton", torch.float32, torch.bfloat16)
for a, b in zip(eager, triton):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for key, value in eager_opt.state[a].items():
        assert triton_opt.state[b][key].dtype == value.dtype
        torch.testing.assert_close(triton_opt.state[b][key].float(), value.float(), rtol=1e-2, atol=1e-12)
print("kernels agree")

wide = CeloNet(mlp_hidden_size=6)
try:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    Celo([p], total_steps=2, weights=wide, backend="triton").step(loss=1.0)
except ValueError as err:
    print("refused:", err)
"""


@pytest.mark.slow
def test_triton_kernels_match_eager_in_the_interpreter(run_python):
    result = run_python(CHECK, {"TRITON_INTERPRET": "1"}, timeout=600)
    assert "kernels agree" in result.stdout
    assert "refused: the triton kernels support the paper's MLP" in result.stdout
