"""Every registered backend computes what the literal reference computes: one matrix over the
registry's backends x meta-model configurations x chunk sizes x dtypes (like torch's ``optim_db``).

The backends that run on this machine's CPU take part directly; ``"compile"`` once (its compile
costs tens of seconds; dtypes and configurations share the eager source); ``"triton"`` in Triton's
interpreter (``test_triton.py``, a fresh interpreter per check).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import run_celo

from celo_hf import CeloNet, population
from celo_hf.backends import REGISTRY

#: Stacked small tensors, a scalar, matrices factored either way round and with a size-1 axis,
#: rank-4 tensors, a long vector, matrices whose rows are not a multiple of the SIMD width, one
#: tensor above the stacking threshold, and empty tensors.
SHAPES = [(), (5,), (5,), (3, 4), (3, 4), (4, 4), (16, 1), (1, 8), (3, 3, 4, 8), (16, 3, 3, 16), (2100,), (70, 40),
          (37, 53), (130, 130), (0,), (2, 0, 3)]
#: The compile case's shapes: stacked vectors, stacked matrices and a chunked large matrix. Every
#: structural variant (rank, stacking, chunk views) is one inductor compile, about 13 s on a cold
#: cache here; compile shares eager's source, and the golden replays run it on the recorded tensors.
COMPILE_SHAPES = [(5,), (5,), (3, 4), (3, 4), (130, 130)]
#: Backends that run here, on CPU tensors.
ON_CPU = [name for name, backend in REGISTRY.items() if backend.runs_on(torch.device("cpu"))]
#: Backends with their own per-element code (the reference is the oracle; compile shares eager's source).
OWN_KERNELS = [name for name in ON_CPU if name not in ("reference", "compile")]
# Float32 everywhere, summed in different orders: a few float32 ulps of the step apart.
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-7
STATE_RTOL, STATE_ATOL = 1e-5, 1e-12

CONFIGURATIONS = {
    "two-decays-six-wide": {"mlp_hidden_size": 6, "momentum_decays": (0.5, 0.9), "factored_decays": (0.8, 0.95)},
    "no-hidden-layer": {"mlp_hidden_layers": 1},
    "three-hidden-layers": {"mlp_hidden_layers": 3, "mlp_hidden_size": 8},
    # binds where a shape's shorter sides are small ((3, 4), (16, 1), (1, 8)), not on (70, 40)
    "param-scale-floor": {"param_scale_floor": 2.0},
}


def _assert_runs_close(got, expected, rtol=PARAM_RTOL, atol=PARAM_ATOL, state_rtol=STATE_RTOL) -> None:
    (params, optimizer), (ref_params, ref_optimizer) = got, expected
    for p, rp in zip(params, ref_params):
        where = f"{tuple(p.shape)} {p.dtype}"
        assert p.dtype == rp.dtype and p.shape == rp.shape, where
        torch.testing.assert_close(p.float(), rp.float(), rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
        if p.numel() == 0:
            assert p not in optimizer.state
            continue
        assert optimizer.state[p].keys() == ref_optimizer.state[rp].keys(), where
        for key, value in ref_optimizer.state[rp].items():
            mine = optimizer.state[p][key]
            assert mine.dtype == value.dtype, (where, key)
            torch.testing.assert_close(mine.float(), value.float(), rtol=state_rtol, atol=STATE_ATOL,
                                       msg=lambda m, k=key: f"{where} {k}: {m}")


def _random_net(**config) -> CeloNet:
    """Random meta-weights: larger MLP weights than the paper's, every feature matters."""
    torch.manual_seed(0)
    return CeloNet(**config)


@pytest.fixture(scope="module")
def random_net() -> CeloNet:
    return _random_net()


_MATRIX = [
    pytest.param(backend, net, chunk, id=f"{backend}-{net}-chunk{chunk}")
    for backend in OWN_KERNELS
    for net in ("paper", "random")
    for chunk in (None, 100)
] + [pytest.param("compile", "paper", 5000, id="compile-paper-chunk5000", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("backend", "net_name", "chunk"), _MATRIX)
def test_backend_equals_reference(backend, net_name, chunk, paper_net, random_net):
    """A mixed model (stacked small tensors, large ones as views, scalars, empty tensors), step after
    step, in one chunk per tensor and in chunks of 100 elements."""
    net = paper_net if net_name == "paper" else random_net
    shapes = COMPILE_SHAPES if backend == "compile" else SHAPES
    _assert_runs_close(run_celo(net, backend, shapes, chunk=chunk), run_celo(net, "reference", shapes))


@pytest.mark.slow
def test_each_compiled_kernel_has_its_own_dynamo_cache(paper_net):
    """The compile backend compiles the eager kernels themselves: each keeps its variants (ranks,
    layouts) in its own dynamo cache. (Compiled as functools.partials, all three went through one
    wrapper frame and shared its cache: every call checked the other kernels' entries, and the
    recompile limit, 8 variants, held for the three together.) Same run as the matrix's compile case."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from celo_hf.backends import eager

    run_celo(paper_net, "compile", COMPILE_SHAPES, chunk=5000)
    variants = {kernel.__name__: len(_debug_get_cache_entry_list(kernel.__code__))
                for kernel in (eager.square_sums, eager.accumulate_, eager.mlp_step_)}
    assert all(variants.values()), variants
    assert sum(variants.values()) > torch._dynamo.config.recompile_limit, variants


@pytest.mark.parametrize("backend", [b for b in OWN_KERNELS if b != "eager"])
@pytest.mark.parametrize(
    ("dtype", "moment_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-params", "fp16-params", "bf16-moments"],
)
def test_backend_equals_eager_in_lower_precision(backend, dtype, moment_dtype, paper_net):
    """Other dtypes go through float32 arithmetic, rounded to the storage dtype as eager rounds them:
    at most one unit in the last place apart."""
    options = {"dtype": dtype, "moment_dtype": moment_dtype, "chunk": 1500}
    _assert_runs_close(run_celo(paper_net, backend, SHAPES, **options), run_celo(paper_net, "eager", SHAPES, **options),
                       rtol=2**-7, atol=1e-6, state_rtol=2**-7)


@pytest.mark.parametrize("backend", OWN_KERNELS)
@pytest.mark.parametrize("config", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_backend_follows_the_configuration(backend, config):
    """The rule's configuration (decays, hidden width, hidden layers, the param-scale floor) is data every backend reads."""
    net = _random_net(**config)
    _assert_runs_close(run_celo(net, backend, SHAPES[:13]), run_celo(net, "reference", SHAPES[:13]))


@pytest.mark.parametrize("backend", OWN_KERNELS)
def test_backend_takes_large_exponents(backend, paper_net):
    """Mutation check: a meta-model whose magnitude output is far from 0 (``exp_mult * magnitude``
    around 0.3 +- 0.3, outside the C++ kernels' short path for ``|x| <= 1/16``)."""
    net = copy.deepcopy(paper_net)
    with torch.no_grad():
        net.mlp[-1].weight[1] *= 300.0
        net.mlp[-1].bias[1] = 300.0
    # Steps of order 1e-2 here: float32 rounding of p - step.
    _assert_runs_close(run_celo(net, backend, SHAPES[:13]), run_celo(net, "reference", SHAPES[:13]), atol=1e-6)


@pytest.mark.parametrize("backend", OWN_KERNELS)
def test_population_step_equals_reference(backend, paper_net):
    """Meta-training's population step: one meta-model per member (distinct weights per batch row)."""
    generator = torch.Generator().manual_seed(0)
    meta_weights = {
        key: value.detach()[None] + 0.05 * torch.randn(4, *value.shape, generator=generator)
        for key, value in paper_net.state_dict().items()
    }
    shapes = {"w": (8, 16), "b": (16,), "k": (3, 3, 4, 8)}
    results = {}
    for name in (backend, "reference"):
        generator = torch.Generator().manual_seed(1)
        params = {n: torch.randn(4, *s, generator=generator) for n, s in shapes.items()}
        state = population.init(params, torch.full((4,), 20), meta_weights, paper_net)
        for t in range(3):
            grads = {n: torch.randn(4, *s, generator=generator) for n, s in shapes.items()}
            state = population.update(state, params, grads, torch.full((4,), 2.0 - 0.1 * t), meta_weights, paper_net,
                                      name)
        results[name] = params
    for n in shapes:
        torch.testing.assert_close(results[backend][n], results["reference"][n], rtol=PARAM_RTOL, atol=PARAM_ATOL)
        assert not torch.equal(results[backend][n][0], results[backend][n][1])  # the members differ
