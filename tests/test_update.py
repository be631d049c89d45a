"""The driver's batched, chunked update (``update_batch_``) computes what the literal reference does,
for every kind of tensor shape, chunk size and batch, over several steps, on each backend with its own
kernels; and the factored-axes rule."""

from __future__ import annotations

import pytest
import torch

from celo_hf import CeloNet
from celo_hf.driver import update_batch_
from celo_hf.layout import TensorState, UpdateWeights, factored_dims, init_tensor_state
from celo_hf.reference import reference_update

SHAPES = [(), (1,), (5,), (3, 4), (4, 4), (16, 1), (1, 8), (3, 3, 4, 8), (16, 3, 3, 16), (2, 3, 4, 5)]
CHUNKS = [1, 7, 300, 1 << 18]
STEPS = 4
# Both implementations run in float32 but sum in different orders (the normalisers, the first
# layer); observed differences are a few float32 ulps of the step.
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-7
STATE_RTOL, STATE_ATOL = 1e-6, 1e-12


@pytest.fixture(scope="module", params=[pytest.param("paper", marks=pytest.mark.reference), "random"])
def net(request) -> CeloNet:
    if request.param == "paper":
        return request.getfixturevalue("paper_net")
    torch.manual_seed(0)
    return CeloNet()  # random meta-weights: larger MLP weights than the paper's, every feature matters


def _gradients(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients of mixed scales: ordinary, tiny, beyond the +-1000 clip, and exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(steps):
        scale = (1.0, 1e-4, 3000.0, 0.05)[t % 4]
        g = torch.randn(shape, generator=generator) * scale
        if g.numel() > 1:
            g.view(-1)[:: 3] = 0.0
        grads.append(g)
    return grads


def _fused_step(
    p: torch.Tensor, g: torch.Tensor, state: TensorState, lr_mult: float, net: CeloNet, chunk: int, backend: str
) -> None:
    """One in-place batched update of a single tensor (a batch of one)."""
    shape = p.shape or (1,)
    batch_state = {key: value.unsqueeze(0) for key, value in state.items()}
    weights = UpdateWeights.from_net(net, p.device).expand(1)
    lr_scale = torch.tensor([lr_mult])
    update_batch_(p.view(1, *shape), g.reshape(1, *shape), batch_state, lr_scale, weights, backend, chunk)


def _assert_state_close(got: TensorState, expected: TensorState, where: str) -> None:
    assert set(got) == set(expected), where
    for key in expected:
        torch.testing.assert_close(
            got[key], expected[key], rtol=STATE_RTOL, atol=STATE_ATOL, msg=lambda m: f"{where} {key}: {m}"
        )


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_update_equals_reference(net, shape, chunk, backend):
    generator = torch.Generator().manual_seed(1)
    p_ref = torch.randn(shape, generator=generator)
    p_fused = p_ref.clone()
    state_ref = init_tensor_state(shape, len(net.momentum_decays))
    state_fused = {key: value.clone() for key, value in state_ref.items()}
    for t, g in enumerate(_gradients(shape, STEPS, seed=2)):
        lr_mult = 0.3 + 0.2 * t
        p_ref, state_ref = reference_update(p_ref, g, state_ref, torch.tensor([lr_mult]), net)
        _fused_step(p_fused, g, state_fused, lr_mult, net, chunk, backend)
        torch.testing.assert_close(p_fused, p_ref, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=lambda m: f"step {t}: {m}")
        _assert_state_close(state_fused, state_ref, f"step {t}")
    assert p_fused.shape == torch.Size(shape)


def test_steps_move_the_parameters(net):
    """Guard for the comparison above: the updates are not no-ops."""
    p = torch.randn(3, 4)
    new, _ = reference_update(p, torch.randn(3, 4), init_tensor_state((3, 4), 3), torch.tensor([1.0]), net)
    assert (new - p).abs().max() > 1e-6


@pytest.mark.parametrize("chunk", [5, 1 << 18])
@pytest.mark.parametrize("shape", [(6,), (4, 5), (3, 3, 2)], ids=str)
def test_batch_rows_update_like_separate_tensors(net, shape, chunk):
    """A batch of same-shaped tensors (as the optimizer stacks small ones), each with its own state
    and lr, updates every row exactly as the reference updates that tensor alone."""
    batch, num_decays = 3, len(net.momentum_decays)
    generator = torch.Generator().manual_seed(3)
    p = torch.randn(batch, *shape, generator=generator)
    lrs = torch.tensor([1.0, 0.25, 2.0])
    rows = [(p[i].clone(), init_tensor_state(shape, num_decays)) for i in range(batch)]
    state = {key: torch.stack([s[key] for _, s in rows]) for key in rows[0][1]}
    weights = UpdateWeights.from_net(net, "cpu").expand(batch)
    for t in range(STEPS):
        g = torch.randn(batch, *shape, generator=generator)
        update_batch_(p, g, state, lrs, weights, "eager", chunk)
        rows = [reference_update(rp, g[i], rs, lrs[i : i + 1], net) for i, (rp, rs) in enumerate(rows)]
        for i, (rp, rs) in enumerate(rows):
            where = f"step {t} row {i}"
            torch.testing.assert_close(p[i], rp, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=lambda m: f"{where}: {m}")
            _assert_state_close({key: value[i] for key, value in state.items()}, rs, where)


@pytest.mark.parametrize(
    ("shape", "dims"),
    [
        ((), None),
        ((7,), None),
        ((8, 16), (1, 0)),
        ((16, 8), (0, 1)),
        ((16, 16), (1, 0)),
        ((4, 4), (1, 0)),
        ((16, 1), (0, 1)),
        ((1, 8), (1, 0)),
        ((1, 1), (1, 0)),
        ((8, 5), (0, 1)),
        ((7, 7), (1, 0)),
        ((3, 3, 4, 8), (3, 2)),
        ((3, 3, 16, 16), (3, 2)),
        ((16, 3, 3, 16), (3, 0)),
        ((2, 3, 4, 5), (3, 2)),
        ((5, 5, 5), (2, 1)),
    ],
    ids=str,
)
def test_factored_dims_tie_breaking(shape, dims):
    """Largest axis, then second largest; among equal sizes the later axis counts as larger
    (``docs/celo-algorithm.md`` §2); size-1 axes are factored."""
    assert factored_dims(shape) == dims
    assert factored_dims(torch.Size(shape)) == dims
