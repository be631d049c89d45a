"""The C++ kernels (backend="cpp") compute what the eager kernels compute, for every configuration,
dtype and layout the optimizer hands them; their build is cached and fails clearly."""

import copy
import subprocess

import pytest
import torch

from celo_hf import Celo, CeloNet, cpu_kernels, population
from meta_training.pes import antithetic_population
from meta_training.train import flatten, unflatten

#: Stacked small tensors, a scalar, matrices factored either way round and with a size-1 axis, a
#: rank-4 tensor, a long vector and matrices whose rows are not a multiple of the SIMD width.
SHAPES = [(), (5,), (5,), (3, 4), (3, 4), (4, 4), (16, 1), (1, 8), (3, 3, 4, 8), (2100,), (70, 40), (37, 53)]


def _run(net: CeloNet, backend: str, dtype=torch.float32, moment_dtype=torch.float32, chunk=None, scale=1.0):
    """Parameters and optimizer after three steps from the same start and gradients."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    optimizer = Celo(params, total_steps=10, weights=copy.deepcopy(net), backend=backend, chunk_elements=chunk,
                     moment_dtype=moment_dtype)
    for t in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape) * scale * 10.0 ** (2 * t - 2)).to(dtype)
        optimizer.step(loss=2.0 - 0.5 * t)
    return params, optimizer


def _assert_same_run(net: CeloNet, rtol: float = 1e-5, atol: float = 1e-7, **options) -> None:
    (eager, eager_opt), (cpp, cpp_opt) = _run(net, "eager", **options), _run(net, "cpp", **options)
    for a, b, shape in zip(eager, cpp, SHAPES):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert not torch.equal(a.detach().float(), torch.zeros_like(a, dtype=torch.float32))
        if a.dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, s=shape: f"{s}: {m}")
        else:  # rounded to the parameter dtype: at most one unit in the last place apart
            torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -7, atol=1e-6, msg=lambda m, s=shape: f"{s}: {m}")
        for key, value in eager_opt.state[a].items():
            got = cpp_opt.state[b][key]
            assert got.dtype == value.dtype, (shape, key)
            state_rtol = 1e-5 if value.dtype == torch.float32 else 2 ** -7
            torch.testing.assert_close(got.float(), value.float(), rtol=state_rtol, atol=1e-12,
                                       msg=lambda m, s=shape, k=key: f"{s} {k}: {m}")


@pytest.mark.parametrize("chunk", [None, 1500], ids=["one-chunk", "chunks-of-1500"])
def test_cpp_matches_eager(paper_net, chunk):
    _assert_same_run(paper_net, chunk=chunk)


@pytest.mark.parametrize(
    ("dtype", "moment_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-params", "fp16-params", "bf16-moments"],
)
def test_cpp_matches_eager_in_lower_precision(paper_net, dtype, moment_dtype):
    """Other dtypes go through float32 copies of each chunk, rounded back by torch."""
    _assert_same_run(paper_net, dtype=dtype, moment_dtype=moment_dtype, chunk=1500)


@pytest.mark.parametrize(
    "config",
    [
        {"mlp_hidden_size": 6, "momentum_decays": (0.5, 0.9), "factored_decays": (0.8, 0.95)},
        {"mlp_hidden_layers": 1},
        {"mlp_hidden_layers": 3, "mlp_hidden_size": 8},
    ],
    ids=["two-decays-six-wide", "no-hidden-layer", "three-hidden-layers"],
)
def test_cpp_builds_for_other_configurations(config):
    torch.manual_seed(0)
    _assert_same_run(CeloNet(**config))


def test_cpp_takes_large_exponents_exactly(paper_net):
    """The step's exp(0.001 * magnitude) has a short path for arguments within +-1/16; a meta-model
    whose magnitude output is far outside (0.001 * magnitude around 0.3 +- 0.3) takes the general one."""
    net = copy.deepcopy(paper_net)
    with torch.no_grad():
        net.mlp[-1].weight[1] *= 300.0
        net.mlp[-1].bias[1] = 300.0
    _assert_same_run(net, atol=1e-6)  # steps of order 1e-2 here: float32 rounding of p - step


def test_cpp_population_matches_eager(paper_net):
    """Meta-training's population step: one meta-model per member (distinct weights per batch row)."""
    theta = flatten(paper_net.state_dict())
    noise = torch.randn(2, theta.numel(), generator=torch.Generator().manual_seed(0)) * 0.05
    meta_weights = unflatten(antithetic_population(theta, noise), paper_net.state_dict())
    shapes = {"w": (8, 16), "b": (16,), "k": (3, 3, 4, 8)}
    results = {}
    for backend in ("eager", "cpp"):
        generator = torch.Generator().manual_seed(1)
        params = {n: torch.randn(4, *s, generator=generator) for n, s in shapes.items()}
        state = population.init(params, torch.full((4,), 20), meta_weights, paper_net)
        for t in range(3):
            grads = {n: torch.randn(4, *s, generator=generator) for n, s in shapes.items()}
            state = population.update(state, params, grads, torch.full((4,), 2.0 - 0.1 * t), meta_weights, paper_net,
                                      backend)
        results[backend] = params
    for name in shapes:
        torch.testing.assert_close(results["cpp"][name], results["eager"][name], rtol=1e-5, atol=1e-7)
        assert not torch.equal(results["cpp"][name][0], results["cpp"][name][1])


def test_library_is_built_once_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CELO_HF_KERNEL_CACHE", str(tmp_path))
    builds = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        if "-shared" in command:
            builds.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.subprocess, "run", counting_run)
    cpu_kernels.library.cache_clear()
    try:
        cpu_kernels.library(2, 4, 1)
        cpu_kernels.library.cache_clear()  # a new process: finds the file
        cpu_kernels.library(2, 4, 1)
        cpu_kernels.library(3, 4, 1)
    finally:
        cpu_kernels.library.cache_clear()
    assert len(builds) == 2
    assert sorted(p.name.split("_")[1:3] for p in tmp_path.glob("*.so")) == [["k2", "h4"], ["k3", "h4"]]


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CELO_HF_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    cpu_kernels.library.cache_clear()
    p = torch.nn.Parameter(torch.ones(4, 3))
    try:
        with pytest.raises(RuntimeError, match=r"backend='cpp' compiles its kernels on first use and needs a C\+\+ compiler"):
            Celo([p], total_steps=5, backend="cpp")
    finally:
        cpu_kernels.library.cache_clear()


def test_factored_moments_of_whole_float32_matrices_are_prepared_in_cpp(paper_net):
    """The equality checks above cover the C++ preparation: it is what float32 matrices get; other
    batches (a rank-4 tensor, a bfloat16 gradient) get the torch one."""
    from celo_hf.features import factored_dims
    from celo_hf.update import UpdateWeights, _FactoredMoments, init_tensor_state

    weights = UpdateWeights.from_net(paper_net, "cpu").expand(2)
    made = {}
    for name, shape, dtype in [("matrix", (6, 5), torch.float32), ("rank4", (3, 3, 4, 8), torch.float32),
                               ("bf16", (6, 5), torch.bfloat16)]:
        state = {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in init_tensor_state(shape, 3).items()}
        g = torch.randn(2, *shape).to(dtype)
        dims = factored_dims(shape)
        made[name] = cpu_kernels.kernels(weights).factored_moments(
            g, state, weights, dims, [slice(0, shape[0])], shape, None
        )
    assert isinstance(made["matrix"], cpu_kernels.FactoredMomentsInCpp)
    assert type(made["rank4"]) is _FactoredMoments and type(made["bf16"]) is _FactoredMoments
    state = {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in init_tensor_state((6, 5), 3).items()}
    with pytest.raises(ValueError, match=r"v_row of shape \(2, 3, 5\) does not fit gradients \(2, 6, 5\) factored with d0=1"):
        cpu_kernels.FactoredMomentsInCpp(cpu_kernels.library(3, 4, 1), torch.randn(2, 6, 5), state, weights, 1)


@pytest.mark.parametrize("broken", ["no-compiler", "cache-not-writable"])
def test_auto_backend_takes_cpp_on_cpu_and_eager_when_it_cannot_build(tmp_path, monkeypatch, paper_net, broken):
    def stepped(**options):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 30).view(6, 5))
        p.grad = torch.linspace(1, -2, 30).view(6, 5)
        optimizer = Celo([p], total_steps=5, weights=copy.deepcopy(paper_net), **options)
        optimizer.step(loss=1.0)
        return p.detach(), optimizer

    auto, optimizer = stepped()
    assert optimizer.backend == "auto"
    assert optimizer._backend_on(torch.device("cpu")) == "cpp"
    assert optimizer._backend_on(torch.device("meta")) == "eager"  # any other device
    assert torch.equal(auto, stepped(backend="cpp")[0])

    if broken == "no-compiler":
        monkeypatch.setenv("CELO_HF_KERNEL_CACHE", str(tmp_path))
        monkeypatch.setenv("CXX", "no-such-compiler")
        monkeypatch.setenv("PATH", str(tmp_path))
        reason = "needs a C\\+\\+ compiler"
    else:
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("CELO_HF_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
        reason = "a-file"
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"falls back to the eager kernels.*{reason}"):
            fallback, _ = stepped()
    finally:
        cpu_kernels.library.cache_clear()
    assert torch.equal(fallback, stepped(backend="eager")[0])


def test_cpp_refuses_tensors_off_the_cpu(paper_net):
    from celo_hf.update import UpdateWeights

    with pytest.raises(ValueError, match="backend='cpp' updates CPU tensors, got parameters on meta"):
        cpu_kernels.kernels(UpdateWeights.from_net(paper_net, "meta"))


def test_cpp_results_do_not_depend_on_the_number_of_threads(paper_net):
    """The C++ kernels split large tensors into fixed blocks of rows over torch's CPU threads and add
    the blocks' partial sums in block order: one thread and two give the same bits."""
    def run(threads: int) -> list[torch.Tensor]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            generator = torch.Generator().manual_seed(2)
            params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(700, 300), (90, 2000), (70000,)]]
            optimizer = Celo(params, total_steps=10, weights=copy.deepcopy(paper_net), backend="cpp")
            for t in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=generator)
                optimizer.step(loss=1.0 - 0.1 * t)
            return [p.detach() for p in params] + [v for p in params for v in optimizer.state[p].values()]
        finally:
            torch.set_num_threads(previous)

    for one, two in zip(run(1), run(2)):
        assert torch.equal(one, two)
