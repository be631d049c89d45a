"""Shared helpers for the core tests: where the reference data lives, the golden scenarios, and the
mapping from the golden accumulator layout to ``celo_hf.layout``'s state layout."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from celo_hf.layout import state_shape

if TYPE_CHECKING:
    from celo_hf import Celo, CeloNet

#: The root of this checkout (its ``celo_hf`` is the one under test).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The shared reference folder (never copied into the repository): ``$CELO_HF_REFERENCE``, by default
#: ``../shared/reference`` from the repository root.
REFERENCE = Path(os.environ.get("CELO_HF_REFERENCE") or Path(__file__).resolve().parents[2] / "shared" / "reference")
#: The paper's released meta-parameters (flax msgpack).
PAPER_WEIGHTS = REFERENCE / "celo_theta.state"
#: Golden vectors recorded from the original JAX Celo (format in ``REFERENCE / "README.md"``).
GOLDEN = REFERENCE / "celo_golden.npz"
#: Celo2's part of the reference folder (its README describes the files).
CELO2_REFERENCE = REFERENCE / "celo2"
#: A test checkpoint of Celo2 meta-parameters (random values, the original's flax msgpack format).
CELO2_TEST_WEIGHTS = CELO2_REFERENCE / "theta_random.state"
#: Golden vectors recorded from the original JAX Celo2 / Celo2-base with ``CELO2_TEST_WEIGHTS``.
CELO2_GOLDEN = CELO2_REFERENCE / "celo2_golden.npz"
#: What the reference folder must hold, and what each file is.
REFERENCE_FILES = {
    PAPER_WEIGHTS: "the paper's released Celo meta-parameters (flax msgpack)",
    GOLDEN: "golden vectors recorded from the original JAX Celo",
    CELO2_TEST_WEIGHTS: "a test checkpoint of Celo2 meta-parameters (random values, flax msgpack)",
    CELO2_GOLDEN: "golden vectors recorded from the original JAX Celo2 with that checkpoint",
}


def in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as CI services set it), where missing reference data is an error."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require_reference() -> None:
    """Skip the calling test, fixture or (at import) module when the reference folder lacks a file; under
    ``CI=true`` fail instead. Reached through ``@pytest.mark.reference`` (tests/conftest.py), the
    ``paper_net`` fixture and ``golden_archive()``."""
    missing = [path for path in REFERENCE_FILES if not path.is_file()]
    if not missing:
        return
    contents = "; ".join(f"{path.name}: {what}" for path, what in REFERENCE_FILES.items())
    message = (
        f"reference data not found: {', '.join(str(path) for path in missing)}. The folder {REFERENCE} "
        f"(set CELO_HF_REFERENCE to move it; default ../shared/reference from the repository root) should hold "
        f"{contents}"
    )
    if in_ci():
        pytest.fail(f"{message}. CI=true: the reference data is required here.", pytrace=False)
    pytest.skip(message, allow_module_level=True)

#: Golden accumulator key -> key of the same accumulator in ``Celo.state[p]``.
GOLDEN_ACCUMULATORS = {"mom": "m", "rms": "rms", "fac_v_row": "v_row", "fac_v_col": "v_col", "fac_v_diag": "v_diag"}


@functools.cache
def golden_archive() -> dict[str, np.ndarray]:
    """Every array of ``celo_golden.npz``, read once per test session (skips or fails as
    ``require_reference`` does when it is missing, also at collection)."""
    require_reference()
    with np.load(GOLDEN) as archive:
        return {key: archive[key] for key in archive.files}


def scenario_names() -> list[str]:
    return [str(name) for name in golden_archive()["scenarios"]]


@dataclass(frozen=True)
class Scenario:
    """One golden scenario. Per-step arrays have a leading axis of ``n_updates`` (``T``)."""

    name: str
    param_names: tuple[str, ...]
    num_steps: int
    n_updates: int

    def __getitem__(self, key: str) -> np.ndarray:
        """The scenario's array ``key`` (e.g. ``"loss"``, ``"params/l1/w"``, ``"acc/mom/l1/w"``)."""
        return golden_archive()[f"{self.name}/{key}"]

    def tensor(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self[key]))

    def shape(self, param: str) -> tuple[int, ...]:
        return tuple(self[f"init/{param}"].shape)

    def factored_dims(self, param: str) -> tuple[int, int] | None:
        d0, d1 = (int(d) for d in self["factored_dims"][self.param_names.index(param)])
        return None if (d0, d1) == (-1, -1) else (d0, d1)

    def accumulators(self, param: str, step: int, num_decays: int) -> dict[str, torch.Tensor]:
        """The golden accumulators of ``param`` after update ``step``, in ``celo_hf.layout``'s layout:
        decay axis first, ``rms`` without it, scalars as ``(1,)``; empty placeholders dropped."""
        shape = state_shape(self.shape(param))
        out = {}
        for golden_key, key in GOLDEN_ACCUMULATORS.items():
            value = torch.from_numpy(np.array(self[f"acc/{golden_key}/{param}"][step]))
            if value.numel() == 0:
                continue
            if key == "rms":
                out[key] = value.squeeze(-1).reshape(shape)
            else:
                value = value.movedim(-1, 0)
                out[key] = value.reshape(num_decays, *shape) if key in ("m", "v_diag") else value
        return out


def scenario(name: str) -> Scenario:
    archive = golden_archive()
    return Scenario(
        name=name,
        param_names=tuple(str(n) for n in archive[f"{name}/param_names"]),
        num_steps=int(archive[f"{name}/num_steps"]),
        n_updates=int(archive[f"{name}/n_updates"]),
    )


#: ``python -m torch.distributed.run`` with two local processes (prefix of a script's command).
TWO_PROCESSES = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def run_script(script: Path, launcher: tuple[str, ...], out_dir: Path, *args: str) -> None:
    """Run ``python [launcher] script out_dir [args]`` on one thread per process, importing this
    checkout's ``celo_hf`` (not an installed copy); fail with its output."""
    command = [sys.executable, *launcher, str(script), str(out_dir), *args]
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def run_celo(
    net: "CeloNet", backend: str, shapes: list[tuple[int, ...]], *, steps: int = 3, dtype: torch.dtype = torch.float32,
    moment_dtype: torch.dtype = torch.float32, chunk: int | None = None, grad_scale: float = 1.0,
) -> tuple[list[torch.Tensor], "Celo"]:
    """Parameters of ``shapes`` and their ``Celo(backend=...)`` after ``steps`` steps, from the same
    start and gradients for every backend (gradients of scale 1e-2, 1, 1e2, ... times ``grad_scale``:
    tiny, ordinary and beyond the +-1000 clip). ``net`` is copied."""
    import copy

    from celo_hf import Celo

    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    optimizer = Celo(params, total_steps=10, weights=copy.deepcopy(net), backend=backend, chunk_elements=chunk,
                     moment_dtype=moment_dtype)
    for t in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape) * grad_scale * 10.0 ** (2 * t - 2)).to(dtype)
        optimizer.step(loss=2.0 - 0.5 * t)
    return params, optimizer
