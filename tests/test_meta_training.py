"""Meta-training: exact resume, one process equals two, push-then-load through the Hub, mixed
inner models, the zero-gradient projection and the held-in selection rule."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from population_setup import stepped_together
from safetensors.torch import load_file

from celo_hf import Celo, load_celo_net
from celo_hf.diagnostics import zero_gradient_drift
from meta_training import held_in, inner
from meta_training.pes import antithetic_population
from meta_training.tasks import families_by_name, pretrained_digits_mlp
from meta_training.train import MetaTrainConfig, MetaTrainer, calibrated_rows, main, publish, run, unflatten

REPO = Path(__file__).resolve().parents[1]
# Two slots, trajectories of 3-8 steps inside truncations of 4: resets happen mid-truncation.
TINY = MetaTrainConfig(
    iterations=4, slots_per_family=1, truncation=4, min_unroll=3, max_unroll=8,
    families=["teacher", "permuted_digits"], checkpoint_every=1, held_in_every=0, warm_start_gain=10.0,
)
# Three inner models: the MLP, rank-4 adapters on a pretrained MLP, a tiny transformer LM.
MIXED_FAMILIES = ["teacher", "ft_digits_lora", "lm_d16_l1_t16", "ft_digits_full"]
MIXED = replace(TINY, families=MIXED_FAMILIES, zero_gradient_calibrated=True)
MIXED_ARGS = [
    "--iterations", "4", "--slots_per_family", "1", "--truncation", "4", "--min_unroll", "3", "--max_unroll", "8",
    "--families", *MIXED_FAMILIES, "--checkpoint_every", "1", "--held_in_every", "0",
    "--warm_start_gain", "10", "--zero_gradient_calibrated",
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("config", [TINY, MIXED], ids=["mlp", "mixed"])
def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, config):
    families = families_by_name(config.families)
    straight = run(config, families, tmp_path / "straight")
    run(replace(config, iterations=2), families, tmp_path / "resumed")
    resumed = run(config, families, tmp_path / "resumed")
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
    iterations = "10"  # killed after 3: 7 left to resume, with a checkpoint each
    command = [sys.executable, "-m", "meta_training.train", *MIXED_ARGS, "--iterations", iterations, "--out", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(metrics.read_text().splitlines()) < int(iterations), "the run finished before it could be killed"
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    main([*MIXED_ARGS, "--iterations", iterations, "--out", str(tmp_path / "straight")])  # the same command, in this process
    a, b = _weights(tmp_path / "killed" / "final"), _weights(tmp_path / "straight" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    main([*MIXED_ARGS, "--out", str(tmp_path / "one")])  # one process: this one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "meta_training.train", *MIXED_ARGS, "--out", str(tmp_path / "two")]
    result = subprocess.run(double, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoint-rank1.pt").exists()  # really two processes
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_decaying_schedule_phase_one_trains_the_mlp_under_a_frozen_linear_decay():
    from celo_hf.features import LossBuffer, loss_buffer_decays, scheduler_inputs

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


def test_zero_noise_mixed_population_steps_as_celo_on_each_member():
    """With std 0 every "+" and "-" member of every slot group, stepped together, follows exactly
    what ``celo_hf.Celo`` does on that member alone (here with the embedded scheduler applied)."""
    config = replace(MIXED, std=0.0, min_unroll=50, max_unroll=50, apply_schedule=True)
    steps = 3
    trainer, members = stepped_together(config, steps, init=load_celo_net(None))
    net = trainer.current_net()
    assert net.learned_schedule
    for member in members:
        group, j, family = member.group, member.j, member.family
        params = {k: torch.nn.Parameter(v[j].clone()) for k, v in member.start.items()}
        optimizer = Celo(params.values(), total_steps=int(trainer.length[member.slot]), weights=copy.deepcopy(net),
                         backend="eager")
        for _ in range(steps):
            batch = tuple(t[None] for t in family.sample_batch(group.tasks[j], member.generator, family.batch_size))
            scales = {k: v[j : j + 1] for k, v in group.scales.items()}
            loss = inner.model_losses(group.model, {k: p[None] for k, p in params.items()}, scales, batch)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(loss=loss.detach())
        assert any(not torch.equal(p.detach(), member.start[k][j]) for k, p in params.items()), "it trained"
        for key, p in params.items():
            for row in (j, member.m + j):
                torch.testing.assert_close(group.params[key][row], p.detach(), rtol=1e-5, atol=1e-7,
                                           msg=f"{family.name} {key} row {row}")


def test_the_projection_keeps_every_member_and_theta_still_at_zero_gradient():
    tensors = list(pretrained_digits_mlp().values())
    for calibrated in (True, False):
        trainer = MetaTrainer(replace(MIXED, std=0.05, lr=1e-2, zero_gradient_calibrated=calibrated),
                              families_by_name(MIXED.families))
        eps = torch.randn(3, trainer.theta.numel(), generator=torch.Generator().manual_seed(0)) * 0.05
        members = trainer._project(antithetic_population(trainer.theta, eps))
        for _ in range(2):
            trainer.outer_step()
        drifts = [zero_gradient_drift(tensors, trainer.current_net())]
        for row in members:
            net = trainer.current_net()
            net.load_state_dict({k: v[0] for k, v in unflatten(row[None], trainer.template).items()})
            drifts.append(zero_gradient_drift(tensors, net))
        if calibrated:
            assert max(drifts) <= 1e-6, drifts
        else:
            assert min(drifts) > 1e-4, drifts  # the warm start drifts; so does anything PES makes of it
    rows = calibrated_rows(members, trainer.template, trainer.current_net())
    assert not torch.equal(rows, members)
    torch.testing.assert_close(calibrated_rows(rows, trainer.template, trainer.current_net()), rows, rtol=0, atol=1e-7,
                               msg="a projection: calibrating twice changes nothing (up to rounding)")


def test_trainer_suite_selection_rule():
    first = held_in.scored({"held_in_loss": 0.01, "finetune_loss": 2.0, "lm_loss": 3.0, "zero_gradient_drift": 1e-9}, [])
    assert first["held_in_score"] == 1.0 and first["held_in_eligible"] and held_in.is_best(first, [])
    better = held_in.scored({"held_in_loss": 0.01, "finetune_loss": 1.0, "lm_loss": 3.0, "zero_gradient_drift": 1e-9}, [first])
    assert better["held_in_score"] == pytest.approx(5 / 6) and held_in.is_best(better, [first])
    drifting = held_in.scored({"held_in_loss": 0.001, "finetune_loss": 0.5, "lm_loss": 1.0, "zero_gradient_drift": 2e-4},
                              [first, better])
    assert drifting["held_in_score"] < better["held_in_score"] and not drifting["held_in_eligible"]
    assert not held_in.is_best(drifting, [first, better]), "ineligible: drift above 1e-4"
    worse = held_in.scored({"held_in_loss": 0.02, "finetune_loss": 1.0, "lm_loss": 3.0, "zero_gradient_drift": 0.0},
                           [first, better, drifting])
    assert not held_in.is_best(worse, [first, better, drifting])
    digits = held_in.scored({"held_in_loss": 0.05}, [])
    assert digits["held_in_score"] == 0.05 and held_in.is_best(digits, [{"held_in_loss": 0.06}])  # old records count too
    with pytest.raises(ValueError, match="held_in_suite must be one of"):
        MetaTrainConfig(held_in_suite="imagenet")


def test_lm_suite_scores_the_language_models_and_guards_the_digits():
    """Suite ``lm``: the score is the mean of the fine-tune and LM ratios alone; a digits loss above
    1.1x the first check's makes a record ineligible however good its score."""
    record = {"held_in_loss": 0.01, "finetune_loss": 2.0, "lm_loss": 3.0, "zero_gradient_drift": 1e-9}
    first = held_in.scored(record, [], "lm")
    lower_lm = held_in.scored(record | {"held_in_loss": 0.0109, "lm_loss": 2.7}, [first], "lm")
    assert lower_lm["held_in_score"] == pytest.approx(0.95) and held_in.is_best(lower_lm, [first])
    digits_up = held_in.scored(record | {"held_in_loss": 0.0111, "lm_loss": 2.4}, [first, lower_lm], "lm")
    assert digits_up["held_in_score"] == pytest.approx(0.9) and not digits_up["held_in_eligible"]
    digits_down = held_in.scored(record | {"held_in_loss": 0.001}, [first], "lm")
    assert digits_down["held_in_score"] == 1.0, "the digits ratio is not scored"


def test_classify_suite_scores_the_classifier_and_guards_the_others():
    """Suite ``classify``: the score is the classifier's ratio alone; digits above 1.1x, or either LM
    loss above 1.02x the first check's, makes a record ineligible."""
    record = {"held_in_loss": 0.01, "finetune_loss": 2.0, "lm_loss": 3.0, "classify_loss": 1.6, "zero_gradient_drift": 1e-9}
    first = held_in.scored(record, [], "classify")
    better = held_in.scored(record | {"classify_loss": 1.2, "held_in_loss": 0.0109, "lm_loss": 3.06}, [first], "classify")
    assert better["held_in_score"] == pytest.approx(0.75) and held_in.is_best(better, [first])
    for guard, value in (("held_in_loss", 0.0111), ("finetune_loss", 2.041), ("lm_loss", 3.061)):
        over = held_in.scored(record | {"classify_loss": 0.8, guard: value}, [first], "classify")
        assert over["held_in_score"] == pytest.approx(0.5) and not over["held_in_eligible"], guard
    lm_down = held_in.scored(record | {"lm_loss": 1.0}, [first], "classify")
    assert lm_down["held_in_score"] == 1.0, "only the classifier is scored"


def test_held_in_checks_run_and_see_the_drift():
    from celo_hf.diagnostics import calibrate_zero_gradient_

    cpu_run = load_celo_net(Path(__file__).parents[1] / "meta_training" / "runs" / "cpu" / "phase2_decay" / "best")
    calibrated = calibrate_zero_gradient_(copy.deepcopy(cpu_run))
    assert held_in.drift(cpu_run) > 1e-3 and held_in.drift(calibrated) < 1e-6
    lm = held_in.lm_loss(calibrated, seeds=1, steps=20)
    assert 1.0 < lm < math.log(97), "a fresh LM starts at ln 97 and Celo lowers it"
    assert 0.5 < held_in.finetune_loss(calibrated, seeds=1, steps=20) < 3.5
    assert 1.0 < held_in.classify_loss(calibrated, seeds=1, steps=20) < math.log(5) + 0.1, "five plays: ln 5 at chance"


def test_a_widened_update_mlp_steps_exactly_as_the_narrow_one_and_its_new_units_can_grow(tmp_path):
    """``warm_start.widened``: hidden layers of 4 -> 8 units, the same Celo steps (bit for bit up to
    float rounding) from the same gradients, still calibrated; the new units read their inputs and
    only their outgoing weights are zero. Written by the module's command line."""
    from celo_hf import Celo
    from meta_training import warm_start

    default = load_celo_net(None)
    warm_start.main(["--widen", "8", "--out", str(tmp_path / "wide")])
    wide = load_celo_net(tmp_path / "wide")
    (w0, _), (w1, _), (w2, _) = wide.mlp_layers()
    assert wide._hub_mixin_config["mlp_hidden_size"] == 8 and w0.shape == (8, 30) and w1.shape == (8, 8) and w2.shape == (3, 8)
    assert w0[4:].abs().sum() > 0 and w1[4:].abs().sum() > 0 and not w1[:4, 4:].any() and not w2[:, 4:].any()
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(32, 16, generator=generator), torch.randn(16, generator=generator)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    ends = []
    for net in (default, wide):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = Celo(params, total_steps=10, weights=net, backend="eager")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step(loss=torch.tensor(1.0))
        ends.append([p.detach() for p in params])
    for narrow_end, wide_end, first in zip(*ends, start):
        assert not torch.equal(narrow_end, first)
        torch.testing.assert_close(wide_end, narrow_end, rtol=1e-6, atol=1e-7)
    assert held_in.drift(wide) < 1e-8, "calibrated like the weights it widens"
    with pytest.raises(ValueError, match="narrower than width 4"):
        warm_start.widened(default, 4)
