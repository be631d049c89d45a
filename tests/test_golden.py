"""Fidelity: replay the golden vectors of the original JAX Celo through ``celo_hf.Celo``.

Every scenario of ``celo_golden.npz`` is fed step by step (its gradients and losses) to ``Celo``
loaded from the paper's ``theta.state``, with the batched update (default chunks, and tiny chunks so
the multi-chunk code runs) and with the literal reference update. After every step the parameters,
accumulators, loss buffer, scheduler inputs, LSTM state and ``lr_mult`` are compared with the
recording, with the tolerances of ``shared/reference/README.md``. Parameters are re-synced to the
golden ones after each compare (the replay protocol), so each step's change is checked on its own.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import PAPER_WEIGHTS, Scenario, scenario, scenario_names

from celo_hf import Celo
from celo_hf.backends import REGISTRY
from celo_hf.features import LossBuffer, loss_buffer_decays, progress_features, scheduler_inputs
from celo_hf.layout import factored_dims

pytestmark = pytest.mark.reference  # every test replays the golden vectors with the paper's checkpoint
SCENARIOS = scenario_names()
#: (backend, chunk_elements): every registered backend that runs on CPU (``"triton"``: in
#: ``test_triton.py``) with its default chunks (small same-shaped tensors stacked), and those with
#: their own kernels also with 7-element chunks (every tensor split into several chunks);
#: ``"compile"`` costs about two minutes of compiling.
IMPLEMENTATIONS = {
    **{name: (name, None) for name, backend in REGISTRY.items() if backend.runs_on(torch.device("cpu"))},
    **{f"{name}-chunk7": (name, 7) for name in ("eager", "cpp")},
}

# Tolerances of shared/reference/README.md (observed between two independent float32 ports).
PARAM_CHANGE_RTOL = 1e-3  # of max |delta p_ref| ...
PARAM_CHANGE_ATOL = 1e-6  # ... plus this times max |p|
ACCUMULATOR_RTOL = 1e-5
LR_MULT_RTOL = 1e-3
LOSS_FEATURES_ATOL = 5e-3
FRAC_EMBED_ATOL = 1e-6


@dataclass
class Step:
    """What the optimizer held around golden update ``t``."""

    celo_before: dict[str, Any]  # state_dict()["celo"] before the step
    celo_after: dict[str, Any]  # ... and after it
    params: dict[str, torch.Tensor]  # parameters after the step, before re-syncing
    state: dict[str, dict[str, torch.Tensor]]  # per-parameter accumulators after the step


@dataclass
class Replay:
    steps: list[Step]
    warnings: list[str]


@functools.cache
def replay(name: str, implementation: str) -> Replay:
    """Run scenario ``name`` through ``Celo`` (once per session per implementation)."""
    golden = scenario(name)
    backend, chunk = IMPLEMENTATIONS[implementation]
    params = {n: torch.nn.Parameter(golden.tensor(f"init/{n}").clone()) for n in golden.param_names}
    options = {} if chunk is None else {"chunk_elements": chunk}
    optimizer = Celo(params.values(), total_steps=golden.num_steps, weights=PAPER_WEIGHTS, backend=backend, **options)
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(golden.n_updates):
            for n, p in params.items():
                p.grad = golden.tensor(f"grads/{n}")[t].clone()
            before = optimizer.state_dict()["celo"]
            optimizer.step(loss=torch.tensor(golden["loss"][t]))
            steps.append(
                Step(
                    celo_before=before,
                    celo_after=optimizer.state_dict()["celo"],
                    params={n: p.detach().clone() for n, p in params.items()},
                    state={n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in params.items()},
                )
            )
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(golden.tensor(f"params/{n}")[t])
    # torch's own deprecation notices (torch.compile's first run emits some) are not Celo's warnings.
    ours = [w for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return Replay(steps, [str(w.message) for w in ours])


def _golden_before(golden: Scenario, param: str, t: int) -> torch.Tensor:
    return golden.tensor(f"init/{param}") if t == 0 else golden.tensor(f"params/{param}")[t - 1]


scenarios = pytest.mark.parametrize("name", SCENARIOS)
implementations = pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))


@scenarios
@implementations
def test_parameter_change_matches_every_step(name, implementation):
    golden, run = scenario(name), replay(name, implementation)
    for t, step in enumerate(run.steps):
        for param in golden.param_names:
            before = _golden_before(golden, param, t)
            after = golden.tensor(f"params/{param}")[t]
            port = step.params[param]
            assert port.shape == after.shape and port.dtype == torch.float32, (param, port.shape, port.dtype)
            ref_change, port_change = after - before, port - before
            bound = PARAM_CHANGE_RTOL * ref_change.abs().max() + PARAM_CHANGE_ATOL * after.abs().max()
            error = (port_change - ref_change).abs().max()
            assert error <= bound, f"step {t} {param}: |dp_port - dp_ref| = {error:.3g} > {bound:.3g}"


@scenarios
@implementations
def test_accumulators_match_every_step(name, implementation):
    golden, run = scenario(name), replay(name, implementation)
    for t, step in enumerate(run.steps):
        for param in golden.param_names:
            expected = golden.accumulators(param, t, num_decays=3)
            got = step.state[param]
            assert set(got) == set(expected), f"step {t} {param}: state keys {sorted(got)}, golden {sorted(expected)}"
            for key, value in expected.items():
                torch.testing.assert_close(
                    got[key], value, rtol=ACCUMULATOR_RTOL, atol=ACCUMULATOR_RTOL * value.abs().max().item(),
                    msg=lambda m, t=t, param=param, key=key: f"step {t} {param} {key}: {m}",
                )


@scenarios
@implementations
def test_loss_buffer_matches_every_step(name, implementation):
    golden, run = scenario(name), replay(name, implementation)
    for t, step in enumerate(run.steps):
        celo = step.celo_after
        assert celo["iteration"] == t + 1 and celo["loss_count"].item() == t + 1
        torch.testing.assert_close(celo["loss_means"], golden.tensor("loss_means")[t], rtol=1e-5, atol=0)
        torch.testing.assert_close(celo["loss_running_min"], golden.tensor("loss_running_min")[t], rtol=1e-5, atol=0)


@scenarios
@implementations
def test_scheduler_matches_every_step(name, implementation, paper_net):
    """Progress and loss features, the LSTM input and state, and ``lr_mult``.

    The optimizer keeps ``lr_mult`` internal, so it is recomputed from the optimizer's own pieces:
    its loss buffer after the step and its LSTM state before it, through ``CeloNet.schedule``. The
    recomputed LSTM state must equal the one the optimizer stored, which shows the optimizer ran
    exactly this computation.
    """
    golden, run = scenario(name), replay(name, implementation)
    net = paper_net
    decays = loss_buffer_decays(torch.tensor(golden.num_steps))
    for t, step in enumerate(run.steps):
        before, after = step.celo_before, step.celo_after
        assert before["total_steps"] == golden.num_steps
        fraction = torch.tensor(before["iteration"] / before["total_steps"], dtype=torch.float32)
        torch.testing.assert_close(fraction, golden.tensor("fraction_trained")[t], rtol=0, atol=1e-7)
        embedding = progress_features(fraction)
        torch.testing.assert_close(embedding, golden.tensor("frac_embed")[t], rtol=0, atol=FRAC_EMBED_ATOL)

        buffer = LossBuffer(after["loss_means"], after["loss_running_min"], after["loss_count"])
        loss_features = buffer.features(decays)
        torch.testing.assert_close(loss_features, golden.tensor("loss_features")[t], rtol=0, atol=LOSS_FEATURES_ATOL)
        inputs = scheduler_inputs(buffer, fraction, decays)
        torch.testing.assert_close(inputs, golden.tensor("lstm_input")[t], rtol=0, atol=LOSS_FEATURES_ATOL)

        state = net.initial_state() if t == 0 else (before["lstm_hidden"], before["lstm_cell"])
        with torch.no_grad():
            lr_mult, (hidden, cell) = net.schedule(inputs[None], state)
        torch.testing.assert_close(hidden, after["lstm_hidden"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cell, after["lstm_cell"], rtol=1e-6, atol=1e-7)
        golden_lr = golden.tensor("lr_mult")[t]
        torch.testing.assert_close(lr_mult.expand_as(golden_lr), golden_lr, rtol=LR_MULT_RTOL, atol=0, msg=f"step {t}")
        torch.testing.assert_close(hidden[0], golden.tensor("lstm_hidden")[t], rtol=0, atol=1e-3, msg=f"step {t}")
        torch.testing.assert_close(cell[0], golden.tensor("lstm_cell")[t], rtol=1e-3, atol=1e-3, msg=f"step {t}")

        # The golden LSTM input through CeloNet.schedule from the golden previous state: the scheduler
        # alone, free of any drift in the optimizer's own features.
        golden_state = net.initial_state() if t == 0 else tuple(
            golden.tensor(key)[t - 1][None] for key in ("lstm_hidden", "lstm_cell")
        )
        with torch.no_grad():
            lr_mult, (hidden, cell) = net.schedule(golden.tensor("lstm_input")[t][None], golden_state)
        torch.testing.assert_close(lr_mult.expand_as(golden_lr), golden_lr, rtol=1e-5, atol=0)
        torch.testing.assert_close(hidden[0], golden.tensor("lstm_hidden")[t], rtol=0, atol=1e-5)
        torch.testing.assert_close(cell[0], golden.tensor("lstm_cell")[t], rtol=1e-5, atol=1e-5)

    past_end = [m for m in run.warnings if "past total_steps" in m]
    assert len(past_end) == (1 if golden.n_updates > golden.num_steps else 0), run.warnings
    assert len(run.warnings) == len(past_end), run.warnings


@scenarios
def test_loss_buffer_decays_and_factored_dims(name):
    golden = scenario(name)
    torch.testing.assert_close(
        loss_buffer_decays(torch.tensor(golden.num_steps)), golden.tensor("loss_decays"), rtol=1e-6, atol=0
    )
    for param in golden.param_names:
        assert factored_dims(golden.shape(param)) == golden.factored_dims(param), (param, golden.shape(param))
