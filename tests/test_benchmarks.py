"""benchmarks/step_speed.py: its memory measurement on known cases, and a --quick run end to end."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import celo_hf.celo2.hub

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "step_speed.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("step_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


step_speed = _load_benchmark()
CPU = torch.device("cpu")


def test_step_memory_counts_temporaries_and_what_is_kept():
    kept = []

    def step():
        temporary = torch.ones(1000)  # 4,000 bytes, freed on return
        kept.append(temporary + temporary)  # 4,000 bytes, kept
        torch.ones(500).neg_()  # 2,000 bytes, freed at once
        torch.ones(250).neg_()  # 1,000 bytes, allocated once those 2,000 are freed

    memory = step_speed.measure_step_memory(step, CPU)
    assert memory == step_speed.StepMemory(peak=10_000, retained=4000)


def test_step_memory_ignores_memory_that_existed_before():
    existing = torch.zeros(10_000)
    memory = step_speed.measure_step_memory(lambda: existing.add_(existing), CPU)
    assert memory == step_speed.StepMemory(peak=0, retained=0)


@pytest.mark.parametrize(
    "name, options, peak_per_param", [("foreach", {"foreach": True}, 12), ("fused", {"fused": True}, 8)]
)
def test_adamw_keeps_two_float32_moments(name, options, peak_per_param):
    params = [torch.nn.Parameter(torch.randn(300, 200)), torch.nn.Parameter(torch.randn(200))]
    for p in params:
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in params)
    contender = step_speed.adamw_contender(name, **options)
    state, peak = step_speed.optimizer_memory(contender, list(zip("wb", params)), torch.tensor(1.0), CPU)
    assert state / numel == pytest.approx(8, abs=0.01)  # exp_avg + exp_avg_sq (+ a step counter per tensor)
    assert peak / numel == pytest.approx(peak_per_param, abs=0.01)  # foreach: one float32 temporary on top


@pytest.mark.reference
def test_celo2_state_is_four_floats_per_matrix_element_and_two_per_adam_element():
    """A (300, 200) matrix on the learned branch (momenta 3 + second moment 1 per element, factored
    rows / columns 3 x (200 + 300)) and its bias on the Adam branch (m1 + v1), float32; plus the
    meta-model's 347 weights laid out once for the kernels (under 2 KB)."""
    from helpers import REFERENCE

    named = [("w", torch.nn.Parameter(torch.randn(300, 200))), ("w.bias", torch.nn.Parameter(torch.randn(200)))]
    for _, p in named:
        p.grad = torch.randn_like(p)
    net = celo_hf.celo2.hub.load_celo2_net(REFERENCE / "celo2" / "theta_random.state")
    state, _ = step_speed.optimizer_memory(step_speed.celo2_contender(net), named, torch.tensor(1.0), CPU)
    expected = 4 * (4 * 300 * 200 + 3 * (200 + 300) + 2 * 200)
    assert expected <= state <= expected + 2048


@pytest.mark.parametrize("text, count", [("50M", 50_000_000), ("250k", 250_000), ("1.5M", 1_500_000), ("123", 123)])
def test_parse_count(text, count):
    assert step_speed.parse_count(text) == count


@pytest.mark.parametrize("text", ["", "ten", "5X", "0"])
def test_parse_count_rejects(text):
    with pytest.raises(Exception, match=repr(text)):
        step_speed.parse_count(text)


def test_model_shapes():
    assert len(step_speed.transformer_model().shapes) == 40
    assert 5e6 <= step_speed.transformer_model().numel <= 10e6
    assert len(step_speed.tiny_model().shapes) == 40
    assert all(math.prod(shape) <= 1024 for _, shape in step_speed.tiny_model().shapes)
    for target in (10**6, 10**7, 5 * 10**7):
        assert step_speed.plain_model(target).numel == pytest.approx(target, rel=0.01)


@pytest.mark.slow
def test_quick_run_prints_the_table(tmp_path):
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--markdown", "--json", str(out), "--celo-backends", "eager", "cpp"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    split = next(i for i, line in enumerate(table) if line.startswith("| population step"))
    table, population = table[:split], table[split:]
    header, rows = table[0], table[2:]
    assert len(population) == 4 and population[2].startswith("| Celo[eager] | 32 |")
    assert population[3].startswith("| Celo[cpp] | 32 |")
    assert all(float(line.split("|")[3].replace(",", "")) > 0 for line in population[2:])  # task-steps per second
    assert "x AdamW-foreach" in header and "peak B/param" in header
    models = ["plain-20K", "plain-100K", "transformer", "tiny40"]
    optimizers = ["Celo[eager]", "Celo[cpp]", "Celo2", "AdamW-foreach", "AdamW-fused"]
    assert [tuple(cell.strip() for cell in row.split("|")[1:5:3]) for row in rows] == [
        (m, o) for m in models for o in optimizers
    ]

    report = json.loads(out.read_text())
    assert report["environment"]["threads"] == 1
    for row in report["rows"]:
        ranges = row["vs_foreach_range"] + row["vs_fused_range"]
        numbers = [v for v in row.values() if isinstance(v, float)] + ranges
        assert all(math.isfinite(x) and x >= 0 for x in numbers), row
        assert row["ms_per_step"] > 0 and row["timed_steps"] == 4
        if row["optimizer"] == "AdamW-foreach":
            assert row["vs_foreach"] == 1.0
        if row["optimizer"].startswith("Celo["):
            assert row["state_bytes_per_param"] >= 16  # 3 momenta and the RMS, float32
            assert row["peak_bytes_per_param"] >= row["state_bytes_per_param"]
        if row["optimizer"] == "Celo2":  # per element: Adam's 2 floats (biases, embeddings), 4 (matrices: 3
            assert 8 <= row["state_bytes_per_param"] <= 28  # momenta, the RMS) or 7 (gains: and v_diag)


def test_compare_revisions_tabulates_both_trees(tmp_path):
    """Against HEAD itself (a revision every clone has): every Celo row appears with both ratios."""
    out = tmp_path / "compare.md"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare_revisions.py"), "--base", "HEAD", "--alternations", "1",
         "--out", str(out), "--", "--quick", "--models", "tiny", "--population", "0", "--celo-backends", "eager"],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| tiny40")]
    assert [row[2].strip() for row in rows] == ["Celo2", "Celo[eager]"]
    before, after, quotient = (float(cell) for cell in rows[1][3:6])
    assert before > 0 and after > 0 and math.isclose(quotient, after / before, rel_tol=0.01)
