"""The embedded default weights: present in the package, produced by the committed meta-training run."""

import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import celo_hf
from celo_hf.hub import DEFAULT_WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
RUN_BEST = REPO / "meta_training" / "runs" / "cpu" / "phase2_decay" / "best"


def test_weights_none_loads_the_meta_trained_run_byte_for_byte():
    for name in ("config.json", "model.safetensors"):
        assert (DEFAULT_WEIGHTS_DIR / name).read_bytes() == (RUN_BEST / name).read_bytes(), name
    net = celo_hf.load_celo_net(None)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in load_file(str(RUN_BEST / "model.safetensors")).items())


def test_the_default_optimizer_trains():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = celo_hf.Celo(model.parameters(), total_steps=100)
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.detach())
    assert loss.item() < 0.5 * first  # measured: 9.81 -> 2.76 (the paper weights: 3.09)


def test_the_wheel_carries_the_default_weights(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("celo_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"celo_hf/default_weights/config.json", "celo_hf/default_weights/model.safetensors"} <= names
