"""Meta-training: exact resume, one process equals two, and push-then-load through the Hub."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from celo_hf import Celo
from meta_training.tasks import families_by_name
from meta_training.train import MetaTrainConfig, publish, run

REPO = Path(__file__).resolve().parents[1]
# Two slots, trajectories of 3-8 steps inside truncations of 4: resets happen mid-truncation.
TINY = MetaTrainConfig(
    iterations=4, slots_per_family=1, truncation=4, min_unroll=3, max_unroll=8,
    families=["teacher", "permuted_digits"], checkpoint_every=1, held_in_every=0, warm_start_gain=10.0,
)
TINY_ARGS = [
    "--iterations", "4", "--slots_per_family", "1", "--truncation", "4", "--min_unroll", "3", "--max_unroll", "8",
    "--families", "teacher", "permuted_digits", "--checkpoint_every", "1", "--held_in_every", "0",
    "--warm_start_gain", "10",
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    families = families_by_name(TINY.families)
    straight = run(TINY, families, tmp_path / "straight")
    run(replace(TINY, iterations=2), families, tmp_path / "resumed")
    resumed = run(TINY, families, tmp_path / "resumed")
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    lines = lambda name: (tmp_path / name / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda line: line.split(', "seconds"')[0]  # noqa: E731
    assert [strip(x) for x in lines("straight")] == [strip(x) for x in lines("resumed")]
    seconds = [json.loads(x)["seconds"] for x in lines("resumed") if "seconds" in x]
    assert seconds == sorted(seconds), "wall-clock time keeps counting across the resume"


def test_changed_settings_refuse_to_resume(tmp_path):
    families = families_by_name(TINY.families)
    run(replace(TINY, iterations=1), families, tmp_path)
    with pytest.raises(ValueError, match="different settings.*'std': \\(0.01, 0.02\\)"):
        run(replace(TINY, std=0.02), families, tmp_path)


def test_phase_two_trains_only_the_scheduler(tmp_path):
    families = families_by_name(TINY.families)
    phase1 = run(replace(TINY, iterations=1), families, tmp_path / "p1")
    phase2 = run(replace(TINY, phase=2, iterations=2), families, tmp_path / "p2", init=phase1)
    before, after = phase1.state_dict(), phase2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mlp."))
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("mlp."))
    assert phase2.learned_schedule and not phase1.learned_schedule


def test_push_to_hub_then_celo_loads_it(tmp_path, hub, hf_cache):
    families = families_by_name(TINY.families)
    trained = run(replace(TINY, iterations=2), families, tmp_path)
    publish(tmp_path, "celo-org/meta-trained", replace(TINY, iterations=2), None)
    files = hub.files("celo-org/meta-trained")
    assert {"config.json", "model.safetensors", "README.md", "curves.png"} <= set(files)
    assert b"## Training command" in files["README.md"] and b"inner task-steps" in files["README.md"]
    optimizer = Celo([torch.nn.Parameter(torch.ones(2, 2))], total_steps=3, weights="celo-org/meta-trained", cache_dir=hf_cache)
    assert all(torch.equal(v, optimizer.net.state_dict()[k]) for k, v in trained.state_dict().items())


@pytest.mark.slow
def test_kill_and_rerun_the_same_command(tmp_path):
    command = [sys.executable, "-m", "meta_training.train", *TINY_ARGS, "--iterations", "20", "--out", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(metrics.read_text().splitlines()) < 20, "the run finished before it could be killed"
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    straight = [sys.executable, "-m", "meta_training.train", *TINY_ARGS, "--iterations", "20", "--out", str(tmp_path / "straight")]
    subprocess.run(straight, cwd=REPO, check=True, capture_output=True)
    a, b = _weights(tmp_path / "killed" / "final"), _weights(tmp_path / "straight" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    single = [sys.executable, "-m", "meta_training.train", *TINY_ARGS, "--out", str(tmp_path / "one")]
    subprocess.run(single, cwd=REPO, check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "meta_training.train", *TINY_ARGS, "--out", str(tmp_path / "two")]
    result = subprocess.run(double, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoint-rank1.pt").exists()  # really two processes
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_decaying_schedule_phase_one_trains_the_mlp_under_a_frozen_linear_decay():
    from celo_hf.features import LossBuffer, loss_buffer_decays, scheduler_inputs
    from meta_training.train import MetaTrainer

    config = replace(TINY, iterations=1, decaying_schedule=True)
    trainer = MetaTrainer(config, families_by_name(config.families))
    before = {k: v.clone() for k, v in trainer.template.items()}
    trainer.outer_step()
    net = trainer.current_net()
    after = net.state_dict()
    assert net.learned_schedule
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("mlp."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mlp."))

    def schedule(losses: list[float]) -> torch.Tensor:
        total = len(losses)
        decays, buffer, state, out = loss_buffer_decays(torch.tensor(total)), LossBuffer.init(()), net.initial_state(), []
        for step, loss in enumerate(losses):
            buffer = buffer.update(torch.tensor(loss), decays)
            lr_mult, state = net.schedule(scheduler_inputs(buffer, torch.tensor(step / total), decays)[None], state)
            out.append(float(lr_mult))
        return torch.tensor(out)

    falling = schedule([2.3 * 0.98**t + 0.1 for t in range(200)])
    noisy = schedule([5.0 + (t % 7) for t in range(200)])
    assert torch.allclose(falling, noisy), "the fitted schedule must not depend on the loss"
    progress = torch.arange(200) / 200
    inside = progress < 0.9  # near the end the target flattens at the floor
    assert torch.allclose(falling[inside], 1 - progress[inside], rtol=0.2, atol=0.03), falling[::20]
    assert falling[-1] < 0.05 and bool((falling[1:] <= falling[:-1] * 1.1).all()), "decays, up to small wiggles"
