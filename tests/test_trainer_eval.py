"""The Trainer workloads of the evaluation (tiny configuration), the grid's selection rule, the
``--tasks`` switch, and the main job (recipes/main.py) in its tiny mode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from meta_training import eval_metrics as metrics
from meta_training.evaluate import TINY_TASKS, evaluate, resolve_tasks
from meta_training.eval_tasks import TASKS
from meta_training.trainer_tasks import GENRES, TRAINER_TASKS, genre_speeches, train_through_trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
import main as main_job  # noqa: E402

LN_256 = math.log(256)


def test_grid_selection_takes_the_lowest_final_loss_and_the_smaller_lr_on_a_tie():
    assert metrics.best_learning_rate({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.7}) == 3e-3
    assert metrics.best_learning_rate({1e-3: 2.0, 3e-3: 1.5, 1e-2: float("nan")}) == 3e-3  # a blow-up never wins
    assert metrics.best_learning_rate({3e-3: 1.0, 1e-3: 1.0}) == 1e-3
    assert metrics.best_learning_rate({1e-3: float("inf"), 1e-2: float("nan")}) == 1e-3
    with pytest.raises(ValueError, match="no learning rates"):
        metrics.best_learning_rate({})


def test_final_loss_is_the_mean_of_the_last_steps():
    assert metrics.final_mean(np.array([9.0, 9.0, 1.0, 3.0]), 2) == 2.0
    assert metrics.final_mean(np.array([1.0, np.nan, 1.0]), 2) == math.inf
    assert metrics.final_window(100) == 10 and metrics.final_window(1000) == 50
    with pytest.raises(ValueError, match="window"):
        metrics.final_mean(np.array([1.0]), 0)


def test_tasks_switch_selects_the_suite_the_trainer_tasks_or_single_tasks():
    assert resolve_tasks(["all"]) == (list(TASKS), list(TRAINER_TASKS))
    assert resolve_tasks(["trainer"]) == ([], list(TRAINER_TASKS))
    assert resolve_tasks(["suite"]) == (list(TASKS), [])
    assert resolve_tasks(["suite"], tiny=True) == (list(TINY_TASKS), [])
    assert resolve_tasks(["gpt2_long", "cnn", "gpt2_long"]) == (["cnn"], ["gpt2_long"])
    with pytest.raises(ValueError, match="bogus"):
        resolve_tasks(["bogus"])


def test_genre_split_is_balanced_and_held_out_speeches_are_not_trained_on():
    (train_texts, train_labels), (held_texts, held_labels) = genre_speeches()
    assert np.bincount(held_labels).tolist() == [32] * len(GENRES)
    assert len(set(np.bincount(train_labels).tolist())) == 1
    assert not set(held_texts) & set(train_texts)


def test_a_run_is_reproducible_from_its_seed_and_another_seed_differs():
    task = TRAINER_TASKS["llama_ga"]
    first, again, other = (train_through_trainer(task, task.build(seed, tiny=True), 1e-2, seed, steps=3) for seed in (0, 0, 1))
    assert first.losses == again.losses and first.held_out_loss == again.held_out_loss
    assert first.losses != other.losses


def test_tiny_trainer_evaluation_gives_sane_numbers_and_writes_table_png_json(tmp_path):
    steps = 6
    report = evaluate(None, tmp_path, task_names=[], trainer_task_names=list(TRAINER_TASKS), trainer_steps=steps,
                      tiny_trainer=True)
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.md", "trainer_curves.png"}
    assert json.loads((tmp_path / "results.json").read_text())["trainer"]["tiny"] is True
    results = {t["name"]: t for t in report["trainer"]["tasks"]}
    assert list(results) == list(TRAINER_TASKS)
    for name, r in results.items():
        runs = r["adamw"] + r["celo"]
        assert len(r["lr_sweep"]) == len(TRAINER_TASKS[name].learning_rates)
        assert f"{r['best_lr']:g}" == min(r["lr_sweep"], key=r["lr_sweep"].get)
        assert [run["learning_rate"] for run in runs] == [r["best_lr"], None]
        assert all(len(run["losses"]) == steps and all(math.isfinite(v) for v in run["losses"]) for run in runs)
        assert math.isfinite(r["final_loss_ratio"]) and r["final_loss_ratio"] > 0
        assert math.isfinite(r["zero_gradient_drift"]) and r["zero_gradient_drift"] >= 0
        if name.startswith("genre"):  # 4-way cross-entropy, not scaled by anything
            assert all(abs(run["losses"][0] - math.log(4)) < 0.1 for run in runs)
            assert all(0.0 <= run["held_out_accuracy"] <= 1.0 for run in runs)
        else:  # bytes from scratch: starts at ln 256 (also with gradient accumulation), and tuned AdamW learns
            assert all(run["held_out_accuracy"] is None and abs(run["losses"][0] - LN_256) < 0.2 for run in runs)
            adamw = r["adamw"][0]
            assert r["adamw_final"] < adamw["losses"][0] - 0.1 and adamw["held_out_loss"] < LN_256 - 0.2
    table = (tmp_path / "results.md").read_text()
    assert "TINY models" in table and all(f"| {name} | {steps} |" in table for name in TRAINER_TASKS)
    assert (tmp_path / "trainer_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_job_tiny_mode_writes_png_and_table_with_the_committed_tuned_lr(tmp_path):
    main_job.main(["--tiny", "--max_steps", "3", "--output_dir", str(tmp_path)])
    assert (tmp_path / "main.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "main.md").read_text()
    assert table.startswith("`python recipes/main.py --tiny --max_steps 3")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6
    for _, name in main_job.WORKLOADS:
        tuned = main_job.read_tuning(main_job.DEFAULT_TUNING, name).learning_rate
        task_rows = [row for row in rows if row.startswith(f"| {name} |")]
        assert [cell.split(" | ")[1] for cell in task_rows] == [
            "Celo (lr 1, untuned)", "AdamW lr=5e-05 (Trainer default)", f"AdamW lr={tuned:g} (tuned)"]
    written = json.loads((tmp_path / "main.json").read_text())
    assert all(len(run["losses"]) == 3 for w in written["workloads"] for run in w["runs"].values())


def test_main_job_names_the_command_that_makes_a_missing_grid_search(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"trainer": {"tasks": []}}))
    with pytest.raises(SystemExit, match="python -m meta_training.evaluate --tasks llama_ga"):
        main_job.read_tuning(tmp_path / "results.json", "llama_ga")


def test_reused_trainer_adamw_runs_are_extended_by_the_seeds_they_lack(tmp_path):
    """``adamw_from`` with fewer saved seeds than asked: the saved runs are kept as they are, the
    missing seeds run at the saved tuned lr (no new sweep); other steps are refused."""
    settings = {"task_names": [], "trainer_task_names": ["llama_ga"], "trainer_steps": 3, "tiny_trainer": True}
    first = evaluate(None, tmp_path / "first", **settings)["trainer"]["tasks"][0]
    more = evaluate(None, tmp_path / "more", trainer_seeds=2, adamw_from=[tmp_path / "first" / "results.json"],
                    **settings)["trainer"]["tasks"][0]
    assert more["lr_sweep"] == first["lr_sweep"] and more["adamw"][0] == first["adamw"][0]
    assert [run["learning_rate"] for run in more["adamw"]] == [first["best_lr"]] * 2
    assert more["adamw"][1]["losses"] != more["adamw"][0]["losses"], "seed 1 is a new run"
    with pytest.raises(ValueError, match="3 steps, expected 4"):
        evaluate(None, tmp_path / "bad", adamw_from=[tmp_path / "first" / "results.json"], **(settings | {"trainer_steps": 4}))
