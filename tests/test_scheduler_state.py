"""The scheduler state as one object: batched equals one at a time, round trips, and checkpoints
written before it (``tests/data/legacy_checkpoints.pt``, see ``make_legacy_checkpoints.py``) still load."""

from pathlib import Path

import pytest
import torch
from optimizer_setup import assert_identical, make_params, run_steps
from test_meta_training import TINY

from celo_hf import Celo, CeloNet
from celo_hf.scheduler_state import SchedulerState
from meta_training.tasks import families_by_name
from meta_training.train import MetaTrainer

LEGACY = torch.load(Path(__file__).with_name("data") / "legacy_checkpoints.pt", weights_only=True)


def _net() -> CeloNet:
    torch.manual_seed(0)
    return CeloNet(lstm_hidden_size=8)


def test_a_batch_of_states_steps_as_each_alone():
    net, losses = _net(), torch.tensor([[3.0, 1.0, 2.5], [2.0, 1.1, 2.4], [1.5, 0.9, 2.6]])
    total = torch.tensor([10, 4, 30])
    hidden, cell = (t.expand(3, 1, -1).clone() for t in net.initial_state())
    batched = SchedulerState.init((hidden, cell), torch.zeros(3, dtype=torch.int64))
    alone = [SchedulerState.init(net.initial_state()) for _ in range(3)]

    def each_member(inputs, lstm):
        results = [net.schedule(inputs[i], (lstm[0][i], lstm[1][i])) for i in range(inputs.shape[0])]
        stack = lambda j: torch.stack([r[1][j] for r in results])  # noqa: E731
        return torch.cat([r[0] for r in results]), (stack(0), stack(1))

    for loss in losses:
        lr_mult, batched = batched.update(loss, total, each_member)
        for i in range(3):
            single, alone[i] = alone[i].update(loss[i], int(total[i]), net.schedule)
            assert torch.equal(single, lr_mult[i : i + 1])
    for i, state in enumerate(alone):
        assert state.iteration == len(losses) == int(batched.iteration[i])
        assert torch.equal(state.hidden, batched.hidden[i]) and torch.equal(state.cell, batched.cell[i])
        assert torch.equal(state.loss_buffer.means, batched.loss_buffer.means[i])


def test_without_a_schedule_the_lstm_state_stays_and_lr_mult_is_one():
    net = _net()
    start = SchedulerState.init(net.initial_state())
    lr_mult, state = start.update(torch.tensor(2.0), 10, None)
    assert torch.equal(lr_mult, torch.ones(1)) and state.iteration == 1 and int(state.loss_buffer.count) == 1
    assert state.hidden is start.hidden and state.cell is start.cell


def test_to_dict_from_dict_round_trip_and_names_what_is_missing():
    net = _net()
    _, state = SchedulerState.init(net.initial_state()).update(torch.tensor(2.0), 10, net.schedule)
    saved = state.to_dict()
    assert list(saved) == ["iteration", "loss_means", "loss_running_min", "loss_count", "lstm_hidden", "lstm_cell"]
    assert_identical(SchedulerState.from_dict(saved).to_dict(), saved)
    with pytest.raises(ValueError, match=r"lacks \['loss_count'\]"):
        SchedulerState.from_dict({k: v for k, v in saved.items() if k != "loss_count"})


def test_a_celo_checkpoint_written_before_loads_and_resumes_exactly():
    params = make_params()
    net = CeloNet(lstm_hidden_size=8)
    net.load_state_dict(LEGACY["net"])
    optimizer = Celo(params, total_steps=10, weights=net, backend="eager")
    saved = LEGACY["optimizer_after_3_steps"]
    with torch.no_grad():  # the parameters as they were after step 3: replay from the same start
        run_steps(Celo(params, total_steps=10, weights=net, backend="eager"), params, range(3))
    optimizer.load_state_dict(saved)
    assert optimizer.iteration == 3
    assert_identical(optimizer.state_dict()["celo"], saved["celo"])
    run_steps(optimizer, params, range(3, 5))
    assert_identical([p.detach() for p in params], LEGACY["params_after_5_steps"])


def test_a_meta_training_checkpoint_written_before_loads():
    saved = LEGACY["meta_training_after_2_iterations"]
    trainer = MetaTrainer(TINY, families_by_name(TINY.families))
    trainer.load_state_dict(saved)
    state, old = trainer.state_dict()["groups"][0]["state"], saved["state"]  # one slot group then
    renamed = {"hidden": "lstm_hidden", "cell": "lstm_cell"}
    assert torch.equal(state.pop("run_gain"), torch.ones(len(state["total_steps"])))  # not saved then: gains of 1
    assert_identical(state, {renamed.get(k, k): v for k, v in old.items()})
    trainer.outer_step()  # and it continues
    assert trainer.iteration == 3
