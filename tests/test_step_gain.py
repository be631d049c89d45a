"""The gradient-scale gain: steps times min(1, r / threshold) ** power, with r each tensor's
||g|| / ||p|| ("tensor") or the median of it over tensors at the first step ("model_start")."""

import copy
from pathlib import Path

import pytest
import torch
from optimizer_setup import steps_in_own_groups

from celo_hf import Celo, CeloNet, load_celo_net
from celo_hf.step_gain import model_start_gain, step_gain


def test_step_gain_values():
    grad_norm = torch.tensor([1.0, 0.01, 0.5, 0.0, 3.0])
    param_norm = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0])
    gain = step_gain(grad_norm, param_norm, threshold=0.1, power=2.0)
    torch.testing.assert_close(gain, torch.tensor([1.0, 0.01, 1.0, 0.0, 1.0]))


def test_model_start_gain_takes_the_median_over_informative_tensors():
    """Tensors with ||g|| = 0 or ||p|| = 0 are left out; the median of an even count is the lower
    middle value; a row with no informative tensor gets gain 1."""
    grad_norm = torch.tensor([[1e-3, 0.0, 0.5, 2e-3, 3.0], [1e-3, 4e-3, 3e-3, 2e-3, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    param_norm = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0]])
    gain = model_start_gain(grad_norm, param_norm, threshold=0.01, power=2.0)
    torch.testing.assert_close(gain, torch.tensor([0.2**2, 0.3**2, 1.0]))
    one = model_start_gain(grad_norm[1], param_norm[1], threshold=0.01, power=2.0)
    assert torch.equal(one, gain[1])  # one optimizer's tensors give the bits of a population's row


def _gain_net(threshold: float | None, power: float = 1.0, signal: str = "tensor") -> CeloNet:
    from meta_training.select_gain import configured_net

    return configured_net(load_celo_net(None), gain_threshold=threshold, gain_power=power, gain_signal=signal)


def _steps(net: CeloNet, lrs: list[float], grads: list[list[torch.Tensor]], values: list[torch.Tensor],
           backend: str) -> tuple[list[torch.Tensor], Celo]:
    """Parameters after one step per entry of ``grads``, tensor ``i`` in its own group at lr ``lrs[i]``; and the optimizer."""
    return steps_in_own_groups(net, values, grads, [{"lr": lr} for lr in lrs], backend)


@pytest.mark.parametrize("backend", ["eager", "cpp", "reference"])
def test_gain_scales_each_tensors_step_as_an_lr_would(backend):
    """One step with the gain equals a step without it whose per-tensor lr is the expected gain."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (3, 3, 4)]
    values = [torch.randn(s, generator=generator) for s in shapes]
    grads = [scale * torch.randn(s, generator=generator) for s, scale in zip(shapes, (1e-3, 1.0, 3e-2))]
    threshold, power = 0.1, 0.5
    expected = [min(1.0, float(g.norm() / v.norm()) / threshold) ** power for g, v in zip(grads, values)]
    assert min(expected) < 0.2 and max(expected) == 1.0

    with_gain, _ = _steps(_gain_net(threshold, power), [1.0, 1.0, 1.0], [grads], values, backend)
    as_lr, _ = _steps(_gain_net(None), expected, [grads], values, backend)
    for a, b in zip(with_gain, as_lr):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _model_start_case() -> tuple[list[torch.Tensor], list[list[torch.Tensor]], float]:
    """Three tensors and four steps of gradients whose scale grows 100x after the first step (a
    per-step gain would follow it; the run's gain must not), and the gain expected for them."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(16, 8), (8,), (3, 3, 4)]
    values = [torch.randn(s, generator=generator) for s in shapes]
    scales = (1e-3, 3e-3, 1e-2)
    grads = [[scale * (100.0 if t else 1.0) * torch.randn(s, generator=generator) for s, scale in zip(shapes, scales)]
             for t in range(4)]
    ratios = sorted(float(g.norm() / v.norm()) for g, v in zip(grads[0], values))
    return values, grads, min(1.0, ratios[1] / 0.1) ** 1.5


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_model_start_gain_is_the_first_steps_and_scales_every_step_as_an_lr_would(backend):
    values, grads, expected = _model_start_case()
    assert 1e-3 < expected < 0.1
    with_gain, optimizer = _steps(_gain_net(0.1, 1.5, "model_start"), [1.0] * 3, grads, values, backend)
    as_lr, _ = _steps(_gain_net(None), [expected] * 3, grads, values, backend)
    for a, b in zip(with_gain, as_lr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(optimizer.state_dict()["celo"]["run_gain"], torch.tensor([expected]))
    assert "run_gain" not in _steps(_gain_net(None), [1.0] * 3, grads, values, backend)[1].state_dict()["celo"]


def test_model_start_gain_resumes_exactly(tmp_path):
    """Saved after two steps and loaded into a fresh optimizer, the run continues bit for bit with
    the first step's gain (not one recomputed from the resumed step's gradients)."""
    values, grads, _ = _model_start_case()
    net = _gain_net(0.1, 1.5, "model_start")
    straight, _ = _steps(net, [1.0] * 3, grads, values, "eager")
    first, optimizer = _steps(net, [1.0] * 3, grads[:2], values, "eager")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    params = [torch.nn.Parameter(v.clone()) for v in first]
    resumed = Celo([{"params": [p], "lr": 1.0} for p in params], total_steps=10, weights=copy.deepcopy(net), backend="eager")
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for step_grads in grads[2:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        resumed.step(loss=1.0)
    for a, b in zip(straight, params):
        assert torch.equal(a, b.detach())


def test_gain_settings_round_trip_through_the_project_format(tmp_path):
    net = _gain_net(0.03, 2.0, "model_start")
    net.save_pretrained(tmp_path)
    loaded = load_celo_net(tmp_path)
    assert (loaded.gain_threshold, loaded.gain_power, loaded.gain_signal) == (0.03, 2.0, "model_start")
    assert load_celo_net(Path(__file__).parents[1] / "meta_training" / "runs" / "cpu" / "phase2_decay" / "best").gain_threshold is None  # a run checkpoint: no gain


@pytest.mark.parametrize("kwargs", [{"gain_threshold": 0.0}, {"gain_threshold": -1.0}, {"gain_power": -0.5},
                                    {"gain_signal": "per_layer"}])
def test_bad_gain_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="gain_"):
        CeloNet(**kwargs)


def test_selection_rule_takes_the_best_fine_tune_among_candidates_near_the_base_on_digits():
    from meta_training.select_gain import choose

    base = {"digits": 0.010, "finetune": 0.70}
    assert choose({"none": base, "0.01": {"digits": 0.0105, "finetune": 0.65},
                   "0.1": {"digits": 0.02, "finetune": 0.50}}) == "0.01"
    assert choose({"none": base, "0.1": {"digits": 0.02, "finetune": 0.50}}) is None
    assert choose({"none": base, "0.01": {"digits": 0.0105, "finetune": 0.71}}) is None  # no better than the base
    with_lm = {"digits": 0.010, "lm": 2.0, "finetune": 0.70}
    assert choose({"none": with_lm, "0.01": {"digits": 0.0105, "lm": 2.3, "finetune": 0.60},
                   "0.003": {"digits": 0.0100, "lm": 2.1, "finetune": 0.65}}) == "0.003"


def test_selection_rounds_key_their_candidates_and_save_the_pick_with_its_power(tmp_path):
    from meta_training.select_gain import ROUNDS, report

    keyed = ROUNDS["model_start_power"].keyed()
    assert keyed["none"] == {"gain_threshold": None}
    assert keyed["0.01^1.5"] == {"gain_threshold": 0.01, "gain_power": 1.5, "gain_signal": "model_start"}
    assert list(ROUNDS["tensor"].keyed()) == ["none", "0.01", "0.03", "0.1"]  # the keys of its committed scores
    scores = {"none": {"digits": 0.01, "lm": 2.0, "finetune": 0.70, "drift": 0.0},
              "0.01^1.5": {"digits": 0.01, "lm": 2.0, "finetune": 0.62, "drift": 0.0}}
    table = report(scores, load_celo_net(None), tmp_path, ROUNDS["model_start_power"])
    assert "0.01^1.5 (chosen)" in table
    chosen = load_celo_net(tmp_path / "chosen")
    assert (chosen.gain_threshold, chosen.gain_power, chosen.gain_signal) == (0.01, 1.5, "model_start")


def test_floor_round_picks_the_best_lora_fine_tune_that_keeps_the_full_fine_tune():
    """The param_scale_floor round: candidates are floors on the embedded default; a candidate whose
    full fine-tune is more than 2% worse than the base's is not eligible, whatever its LoRA score."""
    from meta_training.select_gain import ROUNDS, choose

    selection = ROUNDS["param_scale_floor"]
    assert selection.keyed() == {"none": {}, "0.03": {"param_scale_floor": 0.03}, "0.1": {"param_scale_floor": 0.1},
                                 "0.3": {"param_scale_floor": 0.3}}
    base = {"digits": 0.01, "lm": 3.0, "finetune": 0.64, "finetune_lora": 0.69}
    assert choose({"none": base, "0.1": {**base, "finetune": 0.66, "finetune_lora": 0.60},
                   "0.03": {**base, "finetune": 0.65, "finetune_lora": 0.67}}, selection) == "0.03"
    assert choose({"none": base, "0.1": {**base, "finetune": 0.66, "finetune_lora": 0.60}}, selection) is None
    assert choose({"none": base, "0.1": {**base, "lm": 3.5, "finetune_lora": 0.60}}, selection) is None


def test_dropout_round_puts_thresholds_on_the_embedded_default_and_picks_by_the_dropout_fine_tune(tmp_path):
    """The model_start_dropout round: power-2 thresholds on the embedded default (its floor and
    weights kept), picked by the fine-tune with dropout on alone, guarded by digits and the LM."""
    from meta_training.select_gain import ROUNDS, choose, configured_net, report

    selection = ROUNDS["model_start_dropout"]
    assert selection.checks() == ("digits", "lm", "finetune_dropout")
    assert list(selection.keyed()) == ["none", "0.0035^2", "0.007^2", "0.01^2"] and selection.keyed()["none"] == {}
    base = {"digits": 0.01, "lm": 3.0, "finetune_dropout": 0.66}
    scores = {"none": base, "0.0035^2": {**base, "finetune_dropout": 0.60, "lm": 3.4},
              "0.007^2": {**base, "finetune_dropout": 0.64}, "0.01^2": {**base, "finetune_dropout": 0.65}}
    assert choose(scores, selection) == "0.007^2"
    assert choose({"none": base, "0.01^2": {**base, "finetune_dropout": 0.67}}, selection) is None
    report({name: s | {"drift": 0.0} for name, s in scores.items()}, load_celo_net(None), tmp_path, selection)
    chosen, default = load_celo_net(tmp_path / "chosen"), load_celo_net(None)
    assert (chosen.gain_threshold, chosen.gain_power, chosen.param_scale_floor) == (0.007, 2.0, default.param_scale_floor)
    assert all(torch.equal(a, b) for a, b in zip(chosen.state_dict().values(), configured_net(default).state_dict().values()))


def test_a_round_can_score_other_trained_weights_with_the_base_settings(tmp_path):
    """A :attr:`Round.weights` candidate is loaded from its folder (its settings must be the base's);
    with no ``pick_by`` the rule takes the first candidate whose kept fine-tunes stay within 1.02x."""
    from meta_training.select_gain import ROUNDS, Round, choose, configured_net

    default = load_celo_net(None)
    trained = configured_net(default)
    with torch.no_grad():
        trained.lr_head.bias.add_(0.5)
    trained.save_pretrained(tmp_path / "trained")
    configured_net(default, param_scale_floor=0.3).save_pretrained(tmp_path / "other")
    selection = Round({"run": {}, "other": {}}, (), pick_by=None, kept=("finetune",), base="embedded",
                      weights={"run": str(tmp_path / "trained"), "other": str(tmp_path / "other")})
    net = selection.candidate_net(default, "run")
    assert torch.equal(net.lr_head.bias, trained.lr_head.bias) and not torch.equal(net.lr_head.bias, default.lr_head.bias)
    with pytest.raises(ValueError, match="settings"):
        selection.candidate_net(default, "other")
    from meta_training.warm_start import widened

    widened(default, 8).save_pretrained(tmp_path / "wide")
    wider = Round({"wide": {}}, (), pick_by=None, base="embedded", weights={"wide": str(tmp_path / "wide")})
    assert wider.candidate_net(default, "wide").mlp_layers()[0][0].shape == (8, 30), "a wider MLP is the weights' own"
    assert selection.checks() == ("finetune",)
    base = {"finetune": 0.60}
    assert choose({"none": base, "run": {"finetune": 0.612}}, selection) == "run"
    assert choose({"none": base, "run": {"finetune": 0.613}}, selection) is None
    assert ROUNDS["lm_schedule"].checks() == ("finetune", "finetune_lora")


def test_classify_round_guards_from_scratch_and_lora_and_picks_by_the_three_seed_dropout_fine_tune():
    from meta_training.select_gain import ROUNDS, choose

    selection = ROUNDS["classify"]
    assert selection.checks() == ("digits", "lm", "finetune_lora", "finetune_dropout_seeds")
    assert selection.weights == {"phase1/best": "meta_training/runs/classify/phase1/best"}
    focus = ROUNDS["classify_focus"]
    assert focus.checks() == selection.checks() and focus.weights == {"focus/best": "meta_training/runs/classify/focus/best"}
    assert ROUNDS["classify_wide"].checks() == selection.checks()
    base = {"digits": 0.01, "lm": 3.0, "finetune_lora": 0.64, "finetune_dropout_seeds": 0.67}
    assert choose({"none": base, "phase1/best": {**base, "digits": 0.0109, "finetune_dropout_seeds": 0.66}}, selection) == "phase1/best"
    assert choose({"none": base, "phase1/best": {**base, "finetune_dropout_seeds": 0.67}}, selection) is None, "must be lower"
    for check, value in (("digits", 0.0111), ("lm", 3.31), ("finetune_lora", 0.6529)):
        assert choose({"none": base, "phase1/best": {**base, check: value, "finetune_dropout_seeds": 0.5}}, selection) is None, check


def test_fresh_head_round_keeps_the_weights_guards_lora_and_picks_by_unseen_seeds(tmp_path):
    """The candidate is the base's weights built as celo_hf.create builds them; adopted only with
    the LoRA fine-tune within 1.02x and a lower dropout-on score over seeds 3-5; no weights saved."""
    from meta_training.finetune_probe import UNSEEN_SEEDS
    from meta_training.select_gain import ROUNDS, choose, report

    selection = ROUNDS["fresh_head"]
    assert selection.checks() == ("finetune_lora", "finetune_dropout_unseen") and UNSEEN_SEEDS == (3, 4, 5)
    assert selection.fresh_marked == ("fresh_head",) and selection.keyed() == {"none": {}, "fresh_head": {}}
    base = {"finetune_lora": 0.64, "finetune_dropout_unseen": 0.67, "drift": 1e-10}
    better = {**base, "finetune_dropout_unseen": 0.65}
    assert choose({"none": base, "fresh_head": better}, selection) == "fresh_head"
    assert choose({"none": base, "fresh_head": {**better, "finetune_lora": 0.6529}}, selection) is None
    assert choose({"none": base, "fresh_head": {**base}}, selection) is None
    table = report({"none": base, "fresh_head": better}, load_celo_net(None), tmp_path, selection)
    assert "fresh_head (chosen)" in table and not (tmp_path / "chosen").exists()


def test_fresh_tensor_gain_round_puts_fresh_gains_on_the_default_and_picks_by_later_seeds(tmp_path):
    """Candidates fresh_gain 2 and 3 on the embedded default, every fine-tune (the base's too) built
    with the head marked; the lowest dropout-on score over seeds 6-8 wins if below the base's, and
    its settings are saved."""
    from meta_training.finetune_probe import LATER_SEEDS, UNSEEN_SEEDS
    from meta_training.select_gain import ROUNDS, choose, report

    selection = ROUNDS["fresh_tensor_gain"]
    assert selection.checks() == ("finetune_dropout_later",) and LATER_SEEDS == (6, 7, 8)
    assert set(LATER_SEEDS).isdisjoint(UNSEEN_SEEDS) and set(LATER_SEEDS).isdisjoint((0, 1, 2))
    assert selection.keyed() == {"none": {}, "2": {"fresh_gain": 2.0}, "3": {"fresh_gain": 3.0}}
    assert set(selection.fresh_marked) == set(selection.keyed())
    base = {"finetune_dropout_later": 0.66, "drift": 1e-10}
    scores = {"none": base, "2": {**base, "finetune_dropout_later": 0.65}, "3": {**base, "finetune_dropout_later": 0.64}}
    assert choose(scores, selection) == "3"
    assert choose({**scores, "2": base, "3": base}, selection) is None
    table = report(scores, load_celo_net(None), tmp_path, selection)
    assert "| 3 (chosen) |" in table and load_celo_net(tmp_path / "chosen").fresh_gain == 3.0


def test_each_round_scores_the_default_it_was_run_against():
    """A round's base is the embedded default as the round found it, not as it is now: re-running a
    round scores the same base (the fresh rounds' has no fresh_gain, which the last of them added)."""
    from meta_training.select_gain import ROUNDS, base_net

    bases = {name: base_net(selection) for name, selection in ROUNDS.items()}
    assert all(bases[name].gain_threshold is None for name in ("tensor", "model_start", "model_start_power"))
    floorless = bases["param_scale_floor"]
    assert (floorless.gain_threshold, floorless.param_scale_floor) == (0.005, None)
    assert bases["model_start_dropout"].param_scale_floor == bases["lm_schedule"].param_scale_floor == 0.1
    for name in ("classify", "classify_focus", "classify_wide", "fresh_head", "fresh_gain", "fresh_tensor_gain"):
        assert bases[name].fresh_gain is None and bases[name].param_scale_floor == 0.1, name
        assert torch.equal(bases[name].mlp_layers()[0][0], load_celo_net(None).mlp_layers()[0][0]), name
    assert bases["body_gain"].fresh_gain == 3.0 and bases["body_gain"].gain_threshold == 0.005


def test_body_gain_round_puts_smaller_gains_on_the_default_and_picks_by_the_final_seeds(tmp_path):
    """Thresholds 0.0071 and 0.01 (power 2: about 1/2 and 1/4 of the body's steps) on the default
    since fresh_tensor_gain, the head marked in every fine-tune; guarded by digits and the LM from
    scratch (1.1x), picked by the dropout-on score over seeds 9-11, seeds no other round used."""
    from meta_training.finetune_probe import FINAL_SEEDS, LATER_SEEDS, UNSEEN_SEEDS
    from meta_training.select_gain import ROUNDS, choose, report

    selection = ROUNDS["body_gain"]
    assert selection.checks() == ("digits", "lm", "finetune_dropout_final") and FINAL_SEEDS == (9, 10, 11)
    assert not set(FINAL_SEEDS) & {*LATER_SEEDS, *UNSEEN_SEEDS, 0, 1, 2}
    assert set(selection.fresh_marked) == set(selection.keyed())
    assert selection.keyed()["0.01^2"] == {"gain_threshold": 0.01, "gain_power": 2.0, "gain_signal": "model_start"}
    base = {"digits": 0.01, "lm": 2.0, "finetune_dropout_final": 0.64, "drift": 1e-10}
    scores = {"none": base, "0.0071^2": {**base, "finetune_dropout_final": 0.63},
              "0.01^2": {**base, "lm": 2.3, "finetune_dropout_final": 0.62}}
    assert choose(scores, selection) == "0.0071^2"  # the lower score breaks the from-scratch guard
    table = report(scores, load_celo_net(None), tmp_path, selection)
    chosen = load_celo_net(tmp_path / "chosen")
    assert "| 0.0071^2 (chosen) |" in table and (chosen.gain_threshold, chosen.fresh_gain) == (0.0071, 3.0)


def test_the_family_probe_reads_the_tensors_the_population_gain_reads():
    """A fresh head (ft_digits_head's w2, b2) is left out of the first step's norms, as the
    population leaves it out of the gain's median; the same member from the same seed; the MLP
    pretrained on digits 0-4 and fine-tuned on 5-9 in full is far above the gain's threshold."""
    from meta_training.gain_probe import family_first_step_norms
    from celo_hf.step_gain import median_ratio

    head_grads, head_params = family_first_step_norms("ft_digits_head", seed=0)
    full_grads, full_params = family_first_step_norms("ft_digits_full", seed=0)
    assert len(head_grads) == 2 and len(full_grads) == 4
    assert torch.equal(head_grads, family_first_step_norms("ft_digits_head", seed=0)[0])
    net = load_celo_net(None)
    assert float(median_ratio(full_grads, full_params)) > net.gain_threshold
    assert float(model_start_gain(full_grads, full_params, net.gain_threshold, net.gain_power)) == 1.0


def test_the_suite_probe_reads_every_trainable_tensor_and_finds_the_wide_mlp_below_the_threshold():
    """The held-out suite's wide MLP from scratch reads a first-step statistic below the embedded
    default's threshold (the model-start gain slows it, as README's suite note says); the CNN's is above."""
    from meta_training.eval_tasks import TASKS
    from meta_training.gain_probe import suite_first_step_norms
    from celo_hf.step_gain import median_ratio

    net = load_celo_net(None)
    wide, cnn = (suite_first_step_norms(name, seed=0) for name in ("wide_deep_mlp", "cnn"))
    assert len(wide[0]) == sum(1 for p in TASKS["wide_deep_mlp"].build(0).model.parameters() if p.requires_grad)
    assert float(median_ratio(*wide)) < net.gain_threshold < float(median_ratio(*cnn))
    assert float(model_start_gain(*wide, net.gain_threshold, net.gain_power)) < 0.5
