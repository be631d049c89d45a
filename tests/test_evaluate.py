"""The evaluation suite: metrics on hand-made curves, every task trains, and the --tiny CLI end to end."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from helpers import PAPER_WEIGHTS

from meta_training import eval_metrics as metrics
from meta_training.eval_tasks import TASKS
from celo_hf import CeloNet, load_celo_net
from meta_training.evaluate import adamw, celo, evaluate, main, run_task



# ---- metrics ----------------------------------------------------------------------------------------


def test_trailing_moving_average_and_non_finite_losses():
    np.testing.assert_allclose(metrics.smooth(np.array([4.0, 2.0, 6.0, 0.0]), 2), [4.0, 3.0, 4.0, 3.0])
    np.testing.assert_allclose(metrics.smooth(np.array([1.0, 2.0, 3.0]), 10), [1.0, 1.5, 2.0])
    smoothed = metrics.smooth(np.array([1.0, np.nan, 3.0, 5.0, 7.0]), 2)
    assert smoothed[0] == 1.0 and np.isinf(smoothed[1:3]).all() and smoothed[3] == 4.0 and smoothed[4] == 6.0
    assert metrics.smoothing_window(500) == 25 and metrics.smoothing_window(10) == 1


def test_summary_curve_averages_seeds_before_smoothing():
    runs = np.array([[2.0, 2.0, 2.0, 2.0] * 5, [4.0, 4.0, 0.0, 0.0] * 5])  # 20 steps: window 1
    np.testing.assert_allclose(metrics.summary_curve(runs), [3.0, 3.0, 1.0, 1.0] * 5)


def test_final_loss_ratio():
    adam = np.array([3.0, 2.0, 1.0])
    assert metrics.final_loss_ratio(adam, np.array([3.0, 1.0, 0.5])) == 2.0
    assert metrics.final_loss_ratio(adam, np.array([3.0, 2.5, 4.0])) == 0.25
    assert metrics.final_loss_ratio(adam, np.array([3.0, 2.0, np.nan])) == 0.0
    assert metrics.final_loss_ratio(np.array([3.0, np.inf]), np.array([3.0, 1.0])) == math.inf


def test_speedup_when_reaching_adams_final_loss_and_the_fallback_when_not():
    adam = np.arange(10.0, 0.0, -1.0)  # 10, 9, ..., 1: final loss 1 at step 10
    fast = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # reaches 1 at step 5
    assert metrics.speedup(adam, fast) == (2.0, False)
    assert metrics.speedup(adam, adam) == (1.0, False)
    slow = np.full(10, 5.0)  # ends at 5, which Adam reaches at step 6
    assert metrics.speedup(adam, slow) == (0.6, True)
    blown_up = np.array([5.0] * 5 + [np.nan] * 5)
    assert metrics.speedup(adam, blown_up) == (0.1, True)
    with pytest.raises(ValueError, match="same length"):
        metrics.speedup(adam, fast[:5])


def test_interquartile_mean_matches_scipys_trimmed_mean():
    assert metrics.iqm([8, 1, 7, 2, 6, 3, 5, 4]) == 4.5  # middle four of eight: 3, 4, 5, 6
    assert metrics.iqm([1000.0, 1.0, 2.0, 3.0, -1000.0, 2.0, 2.0, 2.0]) == 2.0
    assert metrics.iqm([1.0, 2.0, 6.0]) == 3.0  # floor(3 / 4) = 0 trimmed
    assert metrics.iqm(list(range(17))) == 8.0  # middle nine: 4..12
    with pytest.raises(ValueError):
        metrics.iqm([])


def test_divergence_is_a_non_finite_loss_or_ending_above_the_start():
    assert not metrics.diverged(np.linspace(3.0, 1.0, 40))
    assert metrics.diverged(np.linspace(1.0, 3.0, 40))
    assert metrics.diverged(np.array([2.0, 1.0, np.nan, 1.0]))


def test_bootstrap_ci_over_seeds():
    steps = np.arange(1, 41)
    adam = [np.stack([2.0 / steps, 2.2 / steps]), np.stack([1.0 / steps, 1.0 / steps])]
    celo = [np.stack([1.0 / steps, 1.1 / steps]), np.stack([1.0 / steps, 1.0 / steps])]
    ci = metrics.bootstrap_iqm_ci(adam, celo, replicates=300)
    low, high = ci["final_loss_ratio"]
    assert 1.4 < low <= high < 2.0  # IQM of two tasks = their mean: (2.0..2.2 / 1.0..1.1 + 1) / 2
    assert low < high  # the seeds differ, so resampling them moves the estimate
    same = metrics.bootstrap_iqm_ci([np.stack([1.0 / steps] * 3)], [np.stack([0.5 / steps] * 3)], replicates=50)
    assert same["final_loss_ratio"] == pytest.approx((2.0, 2.0))


# ---- the tasks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_learns_and_is_deterministic_from_its_seed(name):
    torch.set_num_threads(1)
    task = TASKS[name]
    held_out_at_init = task.build(1).held_out_loss()
    first = run_task(task, adamw(1e-2), seed=1, steps=5)
    again = run_task(task, adamw(1e-2), seed=1, steps=5)
    other = run_task(task, adamw(1e-2), seed=2, steps=5)
    assert all(math.isfinite(v) for v in first.losses) and math.isfinite(first.held_out_loss)
    assert first.losses == again.losses and first.held_out_loss == again.held_out_loss
    assert first.losses != other.losses, "another seed must give another init or other batches"
    assert first.held_out_loss < held_out_at_init


@pytest.mark.reference
def test_hf_model_task_gives_the_same_curve_through_trainer_as_in_the_plain_loop():
    """CeloTrainer feeds Celo the logged loss and max_steps; with the same batches the two paths
    must agree exactly, for AdamW and for Celo."""
    torch.set_num_threads(1)
    plain = TASKS["llama_lm"]
    through_trainer = dataclasses.replace(plain, through_trainer=True)
    for make_optimizer in (adamw(3e-3), celo(load_celo_net(PAPER_WEIGHTS))):
        expected = run_task(plain, make_optimizer, seed=0, steps=4)
        got = run_task(through_trainer, make_optimizer, seed=0, steps=4)
        assert got.losses == expected.losses and got.held_out_loss == expected.held_out_loss
        assert expected.losses[-1] < expected.losses[0]


def test_evaluate_takes_a_celonet_reuses_the_tuning_run_and_runs_every_seed(tmp_path):
    torch.manual_seed(0)
    report = evaluate(
        CeloNet(), tmp_path, seeds=2, task_names=["ill_conditioned_softmax"], steps=8, learning_rates=(1e-2, 3e-2)
    )
    (task,) = report["tasks"]
    assert task["best_lr"] == 3e-2 and list(task["lr_sweep"]) == ["0.01", "0.03"]
    assert len(task["adamw"]) == len(task["celo"]) == 2
    assert task["adamw"][0]["losses"] != task["adamw"][1]["losses"]  # seeds 0 and 1
    assert task["adamw"][0]["losses"][0] == task["celo"][0]["losses"][0]  # same seed, same init
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.md", "curves.png"}


# ---- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.reference
def test_tiny_evaluation_writes_table_png_and_json_with_finite_numbers(tmp_path):
    out = tmp_path / "eval"
    # The command line, in this process; the Trainer tasks' tiny configuration: tests/test_trainer_eval.py
    main(["--tiny", "--weights", str(PAPER_WEIGHTS), "--out", str(out), "--tasks", "suite"])
    report = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in report["tasks"]] == ["ill_conditioned_softmax", "wide_deep_mlp", "gru_lm"]
    for task in report["tasks"]:
        assert len(task["adamw"]) == len(task["celo"]) == 1 and len(task["lr_sweep"]) == 6
        assert len(task["celo"][0]["losses"]) == 30
        assert all(math.isfinite(v) for v in task["celo"][0]["losses"] + task["adamw"][0]["losses"])
        assert math.isfinite(task["final_loss_ratio"]) and task["final_loss_ratio"] > 0
        assert math.isfinite(task["speedup"]) and task["speedup"] > 0
        assert f"{task['best_lr']:g}" == min(task["lr_sweep"], key=task["lr_sweep"].get)
    summary = report["summary"]
    assert math.isfinite(summary["iqm_final_loss_ratio"]) and math.isfinite(summary["iqm_speedup"])
    table = (out / "results.md").read_text()
    assert all(f"| {name} | 30 |" in table for name in ("ill_conditioned_softmax", "wide_deep_mlp", "gru_lm"))
    assert "IQM final-loss ratio" in table
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
