"""Fidelity of Celo2 and Celo2-base: replay the golden vectors recorded from the original JAX code.

``../shared/reference/celo2/celo2_golden.npz`` (format and replay protocol in its README) with the
random test checkpoint ``theta_random.state``: the literal reference (every recorded intermediate,
re-synced each step), the batched learned branch against the reference on every golden tensor and
on extra shapes, chunk sizes and per-row meta-models, and ``Celo2`` itself, free-running.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import REFERENCE

from celo_hf.celo2 import reference
from celo_hf.celo2.network import Celo2Net
from celo_hf.celo2.update import adam_update_, learned_update_
from celo_hf.layout import UpdateWeights
from celo_hf.layout import factored_dims, init_tensor_state
from celo_hf.weight_files import read_flax_msgpack

pytestmark = pytest.mark.reference
CELO2 = REFERENCE / "celo2"
CONFIG = Celo2Net().rule_config()
#: Tolerances of reference/celo2/README.md (max |x - ref| / max |ref| per tensor and step).
STEP_RTOL = 5e-4
INTERMEDIATE_RTOL = 1e-5
ACCUMULATOR_RTOL = 1e-5


@functools.cache
def golden() -> dict[str, np.ndarray]:
    with np.load(CELO2 / "celo2_golden.npz") as archive:
        return {key: archive[key] for key in archive.files}


@functools.cache
def checkpoint_layers() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The test checkpoint's MLP as ``[(weight (out, in), bias), ...]``, decoded independently of
    ``celo_hf``'s Celo2 reader (numeric order of the first layer's groups)."""
    tree = read_flax_msgpack(CELO2 / "theta_random.state")["ff_mod_stack"]["~"]
    first = np.concatenate([tree[f"w0__{i}"] for i in range(14)])
    pairs = ((first, "b0"), (tree["w1"], "b1"), (tree["w2"], "b2"))
    return tuple((torch.tensor(w.T.copy()), torch.tensor(tree[b])) for w, b in pairs)


SCENARIOS = ("celo2", "celo2base", "celo2_clip", "celo2base_clip")


class Replay:
    """One scenario's arrays by key, and per-step helpers."""

    def __init__(self, name: str):
        self.name = name
        self.names = [str(n) for n in golden()[f"{name}/param_names"]]
        self.branch = dict(zip(self.names, (str(b) for b in golden()[f"{name}/branch"])))
        self.steps = int(golden()[f"{name}/n_updates"])
        self.lr = float(golden()[f"{name}/step_mult"])
        self.weight_decay = float(golden()[f"{name}/weight_decay"])
        self.orthogonalize = not name.startswith("celo2base")

    def __getitem__(self, key: str) -> np.ndarray:
        return golden()[f"{self.name}/{key}"]

    def before(self, param: str, t: int) -> torch.Tensor:
        return torch.tensor(self[f"init/{param}"] if t == 0 else self[f"params/{param}"][t - 1])

    def grad(self, param: str, t: int) -> torch.Tensor:
        return torch.tensor(self[f"grads/{param}"][t])

    def param_error(self, param: str, t: int, value: torch.Tensor) -> float:
        """Largest element-wise error over the README's parameter tolerance (<= 1 passes)."""
        ref = self[f"params/{param}"][t]
        change = np.abs(ref - self.before(param, t).numpy()).max()
        tol = 5e-4 * change + 4 * np.spacing(np.abs(ref))
        return float((np.abs(value.detach().numpy().reshape(ref.shape) - ref) / tol).max())


def relative_error(value: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(value.detach().numpy().reshape(ref.shape) - ref).max() / max(np.abs(ref).max(), 1e-30))


def test_factored_dims_match_the_recording():
    for name in SCENARIOS:
        replay = Replay(name)
        for param, dims in zip(replay.names, replay["factored_dims"]):
            expected = None if tuple(dims) == (-1, -1) else tuple(int(d) for d in dims)
            assert factored_dims(replay[f"init/{param}"].shape) == expected, (name, param)


@pytest.mark.parametrize("name", SCENARIOS)
def test_reference_reproduces_every_recorded_quantity(name):
    replay = Replay(name)
    worst: dict[str, float] = {}

    def check(key: str, value: torch.Tensor, param: str, t: int) -> None:
        worst[key] = max(worst.get(key, 0.0), relative_error(value, replay[f"{key}/{param}"][t]))

    for param in replay.names:
        learned = replay.branch[param] == "celo2"
        shape = replay[f"init/{param}"].shape
        state = init_tensor_state(shape, 3) if learned else {"m1": torch.zeros(shape), "v1": torch.zeros(shape)}
        for t in range(replay.steps):
            p, g = replay.before(param, t), replay.grad(param, t)
            if learned:
                out = reference.learned_step(p, g, state, checkpoint_layers(), CONFIG, replay.orthogonalize)
                state = out.state
                for key, value in (("inter/features_raw", out.features_raw), ("inter/features", out.features),
                                   ("inter/hidden1", out.hidden[0]), ("inter/hidden2", out.hidden[1]),
                                   ("inter/direction", out.direction), ("inter/step", out.step),
                                   ("acc/mom", state["m"].movedim(0, -1)), ("acc/rms", state["rms"])):
                    check(key, value, param, t)
                if out.orthogonalized is not None:
                    check("inter/ns_out", out.orthogonalized, param, t)
                else:
                    assert replay[f"inter/ns_out/{param}"].size == 0
                factored = ("v_row", "v_col") if "v_row" in state else ("v_diag",)
                for key in factored:
                    check(f"acc/fac_{key}", state[key].movedim(0, -1), param, t)
                new = reference.apply_step(p, out.step, replay.lr, replay.weight_decay)
            else:
                step, state = reference.adam_step(g, state)
                check("inter/adam_step", step, param, t)
                check("acc/adam_m", state["m1"], param, t)
                check("acc/adam_v", state["v1"], param, t)
                lr = float(np.float32(replay.lr) * np.float32(20.0))
                new = reference.apply_step(p, step, lr, replay.weight_decay)
            worst["params"] = max(worst.get("params", 0.0), replay.param_error(param, t, new))
    tolerance = {"inter/step": STEP_RTOL, "inter/ns_out": STEP_RTOL, "params": 1.0}
    failed = {k: v for k, v in worst.items() if v > tolerance.get(k, INTERMEDIATE_RTOL)}
    assert not failed, f"{name}: errors over tolerance {failed} (all: {worst})"
    assert "inter/ns_out" in worst or not replay.orthogonalize


def _stacked_state(shape: tuple[int, ...], batch: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(batch, *v.shape).clone() for k, v in init_tensor_state(shape, 3).items()}


#: The learned branch's implementations, scenario by scenario: every registered backend that runs
#: Celo2 on CPU (vectors and matrices through the driver and its kernels; higher ranks through
#: celo2.update's torch path) and the literal reference tensor by tensor; ``compile`` on the scenario
#: with Newton-Schulz, clipped gradients and no rank >= 3, in whole tensors (each structural variant,
#: e.g. every ragged 7-element chunk's view, is an inductor compile of about 13 s on a cold cache).
CHUNK_ELEMENTS = {"compile": None}
IMPLEMENTATIONS = [
    *((name, backend) for name in SCENARIOS for backend in ("eager", "cpp", "reference")), ("celo2_clip", "compile"),
]


@pytest.mark.parametrize(("name", "backend"), IMPLEMENTATIONS)
def test_batched_branches_replay_the_recording_free_running(name, backend):
    """The batched learned branch (one tensor per call, tiny chunks) and the Adam branch, never re-synced."""
    replay = Replay(name)
    weights = UpdateWeights.from_layers(CONFIG, [(w[None], b[None]) for w, b in checkpoint_layers()], "cpu")
    for param in replay.names:
        p = torch.tensor(replay[f"init/{param}"]).reshape(1, *(replay[f"init/{param}"].shape or (1,)))
        learned = replay.branch[param] == "celo2"
        state = _stacked_state(p.shape[1:], 1) if learned else {"m1": torch.zeros_like(p), "v1": torch.zeros_like(p)}
        lr = torch.tensor([replay.lr], dtype=torch.float32)
        wd = torch.tensor([replay.weight_decay], dtype=torch.float32)
        for t in range(replay.steps):
            g = replay.grad(param, t).reshape(p.shape)
            if learned:
                learned_update_(p, g, state, weights, lr, wd, replay.orthogonalize, backend,
                                chunk_elements=CHUNK_ELEMENTS.get(backend, 7))
            else:
                adam_update_(p, g, state, lr * torch.tensor(20.0), wd)
            assert replay.param_error(param, t, p) <= 1.0, (name, param, t)


SHAPES = [(1,), (7,), (6, 6), (7, 5), (4, 9), (6, 1), (1, 6), (3, 8, 4), (3, 3, 4, 6), (6, 4, 3, 3), (40, 33)]


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("orthogonalize", [True, False], ids=["celo2", "celo2base"])
@pytest.mark.parametrize("chunk_elements", [1 << 16, 7])
def test_batched_learned_branch_equals_the_reference(shape, orthogonalize, chunk_elements, backend):
    """Three tensors of one shape, each with its own random meta-model (a population's rows),
    three steps at growing gradient scales, against the reference one tensor at a time."""
    generator = torch.Generator().manual_seed(sum(shape) + chunk_elements)
    rand = lambda *s: torch.randn(*s, generator=generator)
    batch = 3
    layers = [(rand(batch, 8, 30) * 0.3, rand(batch, 8) * 0.1), (rand(batch, 8, 8) * 0.3, rand(batch, 8) * 0.1),
              (rand(batch, 3, 8) * 0.3, rand(batch, 3) * 0.1)]
    p = rand(batch, *shape)
    expected = p.clone()
    state = _stacked_state(shape, batch)
    states = [init_tensor_state(shape, 3) for _ in range(batch)]
    lr, wd = torch.full((batch,), 1e-2), torch.full((batch,), 0.1)
    for scale in (1.0, 10.0, 100.0):
        g = rand(batch, *shape) * scale
        for b in range(batch):
            out = reference.learned_step(expected[b], g[b], states[b], [(w[b], c[b]) for w, c in layers], CONFIG, orthogonalize)
            states[b] = out.state
            expected[b] = reference.apply_step(expected[b], out.step, 1e-2, 0.1)
        learned_update_(p, g, state, UpdateWeights.from_layers(CONFIG, layers, "cpu"), lr, wd, orthogonalize, backend,
                        chunk_elements)
    torch.testing.assert_close(p, expected, rtol=0, atol=2e-6)
    for b in range(batch):
        for key, value in states[b].items():
            torch.testing.assert_close(state[key][b], value, rtol=1e-6, atol=0)
