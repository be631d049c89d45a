"""The embedded default weights: present in the package, the committed LM-aimed meta-training run's
pick with the fresh-tensor gain and the gain threshold its last two selection rounds chose; that run
started from the previous default, which is produced from the committed CPU run by the committed
calibration and selection rounds."""

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
#: The body_gain round's pick: the LM-aimed run's pick with fresh_gain=3 and gain threshold 0.0071.
CHOSEN = REPO / "meta_training" / "results" / "body_gain_selection" / "chosen"
#: The fresh_tensor_gain round's pick (threshold 0.005), the default before that round (still loadable by this path).
FRESH_GAIN_PICK = REPO / "meta_training" / "results" / "fresh_tensor_gain_selection" / "chosen"
#: The LM-aimed run's pick, the default before round fresh_tensor_gain (still loadable by this path).
LM_RUN_BEST = REPO / "meta_training" / "runs" / "lm_schedule" / "phase1" / "best"
#: The default before the LM-aimed run, its starting point (still loadable by this path).
PREVIOUS = REPO / "meta_training" / "results" / "param_scale_floor_selection" / "chosen"


def test_weights_none_loads_the_adopted_round_pick_byte_for_byte():
    for name in ("config.json", "model.safetensors"):
        assert (DEFAULT_WEIGHTS_DIR / name).read_bytes() == (CHOSEN / name).read_bytes(), name
    assert (CHOSEN / "model.safetensors").read_bytes() == (LM_RUN_BEST / "model.safetensors").read_bytes()
    net, run_pick = celo_hf.load_celo_net(None), celo_hf.load_celo_net(LM_RUN_BEST)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in load_file(str(CHOSEN / "model.safetensors")).items())
    assert (net.gain_signal, net.gain_threshold, net.gain_power) == ("model_start", 0.0071, 2.0)
    assert net.param_scale_floor == 0.1
    assert net._hub_mixin_config == run_pick._hub_mixin_config | {"fresh_gain": 3.0, "gain_threshold": 0.0071}
    fresh_gain_pick = celo_hf.load_celo_net(FRESH_GAIN_PICK)
    assert fresh_gain_pick._hub_mixin_config == net._hub_mixin_config | {"gain_threshold": 0.005}
    assert all(torch.equal(v, fresh_gain_pick.state_dict()[k]) for k, v in net.state_dict().items())


def test_the_lm_run_pick_differs_from_its_start_in_the_update_mlp_alone_and_stays_calibrated():
    """The LM-aimed run trained the update MLP (phase 1), kept zero-gradient-calibrated, from the
    default before it: the scheduler is the same, the MLP moved, a zero gradient still moves nothing."""
    from celo_hf.diagnostics import calibrate_zero_gradient_
    from meta_training.select_gain import configured_net

    run_pick, previous = celo_hf.load_celo_net(LM_RUN_BEST), celo_hf.load_celo_net(PREVIOUS)
    assert run_pick._hub_mixin_config == previous._hub_mixin_config
    changed = {k for k, v in run_pick.state_dict().items() if not torch.equal(v, previous.state_dict()[k])}
    assert changed and all(k.startswith("mlp.") for k in changed), sorted(changed)
    recalibrated = calibrate_zero_gradient_(configured_net(run_pick))
    assert all(torch.allclose(v, run_pick.state_dict()[k], rtol=0, atol=1e-6) for k, v in recalibrated.state_dict().items())


def test_the_previous_default_is_the_meta_trained_run_calibrated_with_the_chosen_gain_and_floor():
    """Rebuilt from the CPU run's best checkpoint by the committed code: the same weights exactly."""
    from celo_hf.diagnostics import calibrate_zero_gradient_
    from meta_training.select_gain import configured_net

    rebuilt = configured_net(calibrate_zero_gradient_(celo_hf.load_celo_net(RUN_BEST)), gain_threshold=0.005, gain_power=2.0,
                             gain_signal="model_start", param_scale_floor=0.1)
    previous = celo_hf.load_celo_net(PREVIOUS)
    assert rebuilt._hub_mixin_config == previous._hub_mixin_config
    assert all(torch.equal(v, previous.state_dict()[k]) for k, v in rebuilt.state_dict().items())


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
