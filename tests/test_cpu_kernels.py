"""The C++ kernels (backend="cpp"): their build is cached and fails clearly, ``"auto"`` takes them on
CPU, they prepare float32 matrices' factored moments in one call, and their results do not depend on
the number of threads. (That they compute what the reference computes: ``test_backends.py``.)"""

import copy
import subprocess

import pytest
import torch

from celo_hf import Celo, driver
from celo_hf.backends import REGISTRY, cpp, eager
from celo_hf.layout import KernelShape, UpdateWeights, factored_dims, init_tensor_state


def test_library_is_built_once_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CELO_HF_KERNEL_CACHE", str(tmp_path))
    builds = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        if "-shared" in command:
            builds.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(cpp.subprocess, "run", counting_run)
    cpp.library.cache_clear()
    try:
        cpp.library(KernelShape(2, 4, 1))
        cpp.library.cache_clear()  # a new process: finds the file
        cpp.library(KernelShape(2, 4, 1))
        cpp.library(KernelShape(3, 4, 1))
    finally:
        cpp.library.cache_clear()
    assert len(builds) == 2
    assert sorted(p.name.split("_")[1:3] for p in tmp_path.glob("*.so")) == [["k2", "h4"], ["k3", "h4"]]


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CELO_HF_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    cpp.library.cache_clear()
    p = torch.nn.Parameter(torch.ones(4, 3))
    try:
        with pytest.raises(RuntimeError, match=r"backend='cpp' compiles its kernels on first use and needs a C\+\+ compiler"):
            Celo([p], total_steps=5, backend="cpp")
    finally:
        cpp.library.cache_clear()


def test_factored_moments_of_whole_float32_matrices_are_prepared_in_cpp(paper_net):
    """Float32 matrices get the C++ preparation, equal to the driver's torch one; other batches (a
    rank-4 tensor, a bfloat16 gradient) are left to the driver."""
    weights = UpdateWeights.from_net(paper_net, "cpu").expand(2)
    kernels = cpp.kernels(weights)

    def stacked_state(shape):
        return {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in init_tensor_state(shape, 3).items()}

    for shape, dtype in [((3, 3, 4, 8), torch.float32), ((6, 5), torch.bfloat16)]:
        g = torch.randn(2, *shape).to(dtype)
        assert kernels.factored_statistics(g, stacked_state(shape), weights, factored_dims(shape)[0]) is None
    g, dims = torch.randn(2, 6, 5), factored_dims((6, 5))
    in_cpp, in_torch = stacked_state((6, 5)), stacked_state((6, 5))
    got = kernels.factored_statistics(g, in_cpp, weights, dims[0])
    expected = driver.factored_statistics(g, in_torch, weights, dims, [slice(0, 6)], (6, 5), None, eager.KERNELS)
    for key in ("v_row", "v_col"):
        torch.testing.assert_close(in_cpp[key], in_torch[key], rtol=1e-6, atol=0)
    torch.testing.assert_close(got.row_scale * got.col_scale, expected.row_scale * expected.col_scale)
    torch.testing.assert_close(got.row_hidden + got.col_hidden, expected.row_hidden + expected.col_hidden)
    with pytest.raises(ValueError, match=r"v_row of shape \(2, 3, 5\) does not fit gradients \(2, 6, 5\) factored with d0=1"):
        kernels.factored_statistics(g, stacked_state((6, 5)), weights, 1)


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
    cpp.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"falls back to the eager kernels.*{reason}"):
            fallback, _ = stepped()
    finally:
        cpp.library.cache_clear()
    assert torch.equal(fallback, stepped(backend="eager")[0])


def test_cpp_refuses_tensors_off_the_cpu(paper_net):
    with pytest.raises(ValueError, match="backend='cpp' updates cpu tensors, got parameters on meta; use backend='auto'"):
        REGISTRY["cpp"].kernels(UpdateWeights.from_net(paper_net, "meta"))


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
