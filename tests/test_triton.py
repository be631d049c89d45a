"""The Triton kernels (backend="triton") compute what the eager kernels compute, for Celo (4 hidden
units, bit for bit in half precision) and Celo2 (8 hidden units, its constants, directions out).

CI has no GPU: the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
read when the kernels are defined, hence a fresh interpreter per check).
"""

from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.reference  # every check reads the paper's checkpoint (and Celo2's test one)

TESTS = Path(__file__).resolve().parent

CHECK = f"""
import sys
import torch
sys.path.insert(0, {str(TESTS)!r})
from helpers import PAPER_WEIGHTS, REFERENCE, run_celo
from celo_hf import Celo, Celo2, CeloNet

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



def run_celo2(backend):  # every tensor in the learned branch, Newton-Schulz on; 3 steps from one start
    torch.manual_seed(1)
    params = [(f"layer{{i}}.weight", torch.nn.Parameter(torch.randn(s))) for i, s in enumerate(shapes)]
    optimizer = Celo2(params, lr=1e-2, weights=REFERENCE / "celo2" / "theta_random.state", adam_regex=None,
                      layout="as_given", backend=backend, chunk_elements=1500)
    for t in range(3):
        for _, p in params:
            p.grad = torch.randn(p.shape) * 10.0 ** (2 * t - 2)
        optimizer.step()
    return [p for _, p in params], optimizer


(eager, eager_opt), (triton, triton_opt) = run_celo2("eager"), run_celo2("triton")
for a, b in zip(eager, triton):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for key, value in eager_opt.state[a].items():
        torch.testing.assert_close(triton_opt.state[b][key], value, rtol=1e-6, atol=1e-12)
print("celo2 agrees")

not_a_power_of_two = CeloNet(mlp_hidden_size=6)
try:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    Celo([p], total_steps=2, weights=not_a_power_of_two, backend="triton").step(loss=1.0)
except ValueError as err:
    print("refused:", err)
"""


@pytest.mark.slow
def test_triton_kernels_match_eager_in_the_interpreter(run_python):
    result = run_python(CHECK, {"TRITON_INTERPRET": "1"}, timeout=600)
    assert "kernels agree" in result.stdout
    assert "two decays agree" in result.stdout  # the number of decays is a constexpr, not a literal
    assert "celo2 agrees" in result.stdout  # hidden width 8, Celo2's constants, directions instead of steps
    assert "refused: the triton kernels support MLPs with a power-of-two hidden width" in result.stdout
    assert "got 6 hidden units" in result.stdout
