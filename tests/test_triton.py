"""The Triton kernels (backend="triton") compute what the eager kernels compute.

CI has no GPU: the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
read when the kernels are defined, hence a fresh interpreter per check).
"""

from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.reference  # every check reads the paper's checkpoint

TESTS = Path(__file__).resolve().parent

CHECK = f"""
import sys
import torch
sys.path.insert(0, {str(TESTS)!r})
from helpers import PAPER_WEIGHTS, run_celo
from celo_hf import Celo, CeloNet

net = CeloNet.from_pretrained(PAPER_WEIGHTS)
shapes = [(), (5,), (5,), (3, 4), (3, 4), (4, 4), (16, 1), (1, 8), (3, 3, 4, 8), (2100,), (70, 40)]


def run(backend, dtype, moment_dtype=torch.float32):
    return run_celo(net, backend, shapes, dtype=dtype, moment_dtype=moment_dtype, chunk=1500)


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

two_decays = CeloNet(momentum_decays=(0.5, 0.9), factored_decays=(0.8, 0.95))
(eager, _), (triton, _) = run_celo(two_decays, "eager", shapes), run_celo(two_decays, "triton", shapes)
for a, b in zip(eager, triton):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
print("two decays agree")

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
    assert "two decays agree" in result.stdout  # the number of decays is a constexpr, not a literal
    assert "refused: the triton kernels support the paper's MLP" in result.stdout
