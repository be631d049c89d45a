"""Meta-training's inner models beyond the MLP: tiny transformer LMs and classifiers, AdamW-pretrained
fine-tuning (full, fresh head, low-rank adapters), the text data and the pretraining cache."""

import math

import pytest
import torch

from meta_training import data, finetune, inner, tasks
from meta_training.transformer import CLASSIFIER_STD, SequenceClassifier, TransformerConfig, TransformerLM, hidden_states, logits

NEW_FAMILIES = [*tasks.LM_FAMILIES, *tasks.FINETUNE_FAMILIES]


def _members(family, count: int, seed: int = 0):
    """``count`` members of ``family``: stacked parameters, per-tensor scales and batches."""
    generator = torch.Generator().manual_seed(seed)
    inits, scales, batches = [], [], []
    for _ in range(count):
        inits.append(family.model.init(generator))
        scales.append(tasks.sample_scales(family.model.shapes, "tensor", generator, 0.5, 2.0))
        batches.append(family.sample_batch(family.sample_task(generator), generator, family.batch_size))
    stack = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    phi = {k: v / s for (k, v), s in zip(stack(inits).items(), stack(scales).values())}
    return phi, stack(scales), tuple(torch.stack(parts) for parts in zip(*batches))


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_batched_loss_and_gradients_equal_a_loop_over_members(name):
    family = tasks.family(name)
    phi, scales, batch = _members(family, 3)
    loss, grads = inner.model_losses_and_grads(family.model, phi, scales, batch)
    assert loss.shape == (3,) and bool(torch.isfinite(loss).all())
    for m in range(3):
        one = lambda d: {k: v[m : m + 1] for k, v in d.items()}  # noqa: E731
        alone, alone_grads = inner.model_losses_and_grads(family.model, one(phi), one(scales), tuple(t[m : m + 1] for t in batch))
        torch.testing.assert_close(loss[m : m + 1], alone, rtol=1e-5, atol=1e-6)
        for key, value in alone_grads.items():
            torch.testing.assert_close(grads[key][m : m + 1], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert len(set(loss.tolist())) == 3, "members have their own weights and batches"


@pytest.mark.parametrize("tied", [True, False])
def test_transformer_is_causal_starts_near_uniform_and_ties_its_head(tied):
    config = TransformerConfig(vocab=data.TEXT_VOCAB, width=16, depth=2, context=12, tied=tied)
    model = TransformerLM(config)
    weights = {k: v[None] for k, v in model.init(torch.Generator().manual_seed(0)).items()}
    assert ("head" in model.shapes) != tied
    tokens = torch.randint(data.TEXT_VOCAB, (1, 3, 12), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[..., 7] = (changed[..., 7] + 1) % data.TEXT_VOCAB
    before, after = logits(config, weights, tokens), logits(config, weights, changed)
    assert torch.equal(before[..., :7, :], after[..., :7, :]), "a token must not influence earlier positions"
    assert not torch.allclose(before[..., 7:, :], after[..., 7:, :])
    windows = torch.cat([tokens, tokens[..., :1]], dim=-1)
    excess = float(model.losses_of_weights(weights, (windows,))[0]) - math.log(data.TEXT_VOCAB)
    # tied: logits are 0.02-scale embeddings, nearly uniform; a separate 1/sqrt(d) head gives logits of std ~1
    assert abs(excess) < 0.05 if tied else 0.1 < excess < 1.0


def test_char_ids_and_text_windows():
    ids = data.char_ids(b"To be,\nor not\xe2!")
    assert ids.tolist()[:7] == [ord(c) - 31 for c in "To be,"] + [0]
    assert ids.tolist()[-3:] == [ord("t") - 31, data.TEXT_VOCAB - 1, ord("!") - 31]
    family = tasks.family("lm_d16_l1_t16")
    (windows,) = family.sample_batch({}, torch.Generator().manual_seed(0), family.batch_size)
    assert windows.shape == (family.batch_size, family.context + 1) and windows.dtype == torch.int64
    assert int(windows.min()) >= 0 and int(windows.max()) < data.TEXT_VOCAB
    pieces = family.text.unfold(0, family.context + 1, 1)
    for row in windows:  # every window is a contiguous piece of the histories
        assert bool((pieces == row).all(1).any())
    (again,) = family.sample_batch({}, torch.Generator().manual_seed(0), family.batch_size)
    assert torch.equal(windows, again)


def test_low_rank_adapters_start_at_the_pretrained_function_and_only_they_train():
    family = tasks.family("ft_lm_lora")
    model = family.model
    assert isinstance(model, finetune.LowRankAdapted)
    assert set(model.shapes) == {f"{m}.{ab}" for m in model.adapted for ab in "AB"} and len(model.adapted) == 4
    pretrained = {k: v.clone() for k, v in model.weights.items()}
    phi, scales, batch = _members(family, 2)
    full = finetune.FullFineTune(model.base, model.weights)
    plain = {k: v.expand(2, *v.shape) for k, v in model.weights.items()}
    ones = {k: torch.ones_like(v) for k, v in plain.items()}
    torch.testing.assert_close(inner.model_losses(model, phi, scales, batch), inner.model_losses(full, plain, ones, batch))
    _, grads = inner.model_losses_and_grads(model, phi, scales, batch)
    assert all(not grads[f"{m}.A"].any() and grads[f"{m}.B"].abs().sum() > 0 for m in model.adapted), "B = 0: only B moves first"
    for _ in range(3):  # a few plain gradient steps on A and B
        _, grads = inner.model_losses_and_grads(model, phi, scales, batch)
        phi = {k: v - 0.5 * grads[k] for k, v in phi.items()}
    assert all(torch.equal(pretrained[k], model.weights[k]) for k in pretrained), "the base stays frozen"
    assert all(phi[f"{m}.A"].ne(_members(family, 2)[0][f"{m}.A"]).any() for m in model.adapted)
    assert not torch.allclose(inner.model_losses(model, phi, scales, batch), inner.model_losses(full, plain, ones, batch))


def test_fine_tuning_starts_from_the_pretrained_weights_and_a_fresh_head_is_redrawn():
    weights = tasks.pretrained_digits_mlp()
    generator = torch.Generator().manual_seed(0)
    full = tasks.family("ft_digits_full").model.init(generator)
    head = tasks.family("ft_digits_head").model.init(generator)
    assert all(torch.equal(full[k], weights[k]) for k in weights)
    assert torch.equal(head["w1"], weights["w1"]) and not torch.equal(head["w2"], weights["w2"]) and not head["b2"].any()
    target = tasks.family("ft_digits_full")
    assert int(target.train.labels.min()) == tasks.DIGITS_CUT
    # the pretrained MLP has learned digits 0-4: near-perfect there
    source = tasks.digits_below(tasks.DIGITS_CUT, below=True)
    loss = inner.mlp_losses_of_weights({k: v[None] for k, v in weights.items()}, source.inputs[None], source.labels[None])
    assert float(loss) < 0.1


def test_a_classifier_on_the_pretrained_lm_keeps_its_body_draws_a_fresh_head_and_starts_at_chance():
    family = tasks.family("ft_cls_full")
    model = family.model
    assert isinstance(model.base, SequenceClassifier) and model.num_classes == len(data.shakespeare_plays("roman")) == 4
    pretrained = tasks.pretrained_lm()
    init = model.init(torch.Generator().manual_seed(0))
    assert set(init) == set(pretrained) | {"cls.weight", "cls.bias"}, "the LM is tied: no LM head to drop"
    assert all(torch.equal(init[k], pretrained[k]) for k in pretrained)
    assert not init["cls.bias"].any() and abs(float(init["cls.weight"].std()) / CLASSIFIER_STD - 1) < 0.2
    tokens, labels = family.sample_batch({}, torch.Generator().manual_seed(1), 64)
    weights = {k: v[None] for k, v in init.items()}
    loss = float(model.losses_of_weights(weights, (tokens[None], labels[None])))
    assert abs(loss - math.log(4)) < 0.02, "a 0.02-scale head on LayerNormed features: near-uniform"
    pooled = hidden_states(model.base.config, weights, tokens[None]).mean(2)
    by_hand = torch.nn.functional.cross_entropy(pooled[0] @ init["cls.weight"] + init["cls.bias"], labels)
    torch.testing.assert_close(torch.tensor(loss), by_hand)
    with pytest.raises(ValueError, match="at least 2 classes"):
        SequenceClassifier(model.base.config, 1)


def test_adapted_classifier_trains_adapters_and_the_head_and_starts_as_the_full_fine_tune():
    family = tasks.family("ft_cls_lora")
    model = family.model
    assert set(model.shapes) == {f"{m}.{ab}" for m in model.adapted for ab in "AB"} | {"cls.weight", "cls.bias"}
    full = tasks.family("ft_cls_full").model
    generator = torch.Generator().manual_seed(0)
    adapters, whole = model.init(generator), full.init(torch.Generator().manual_seed(0))
    assert torch.equal(adapters["cls.weight"], whole["cls.weight"]), "the same fresh head from the same seed"
    batch = tuple(t[None] for t in family.sample_batch({}, torch.Generator().manual_seed(1), 16))
    ones = lambda w: {k: torch.ones(1, *v.shape) for k, v in w.items()}  # noqa: E731
    phi = {k: v[None] for k, v in adapters.items()}
    torch.testing.assert_close(inner.model_losses(model, phi, ones(adapters), batch),
                               inner.model_losses(full, {k: v[None] for k, v in whole.items()}, ones(whole), batch))
    _, grads = inner.model_losses_and_grads(model, phi, ones(adapters), batch)
    assert grads["cls.weight"].abs().sum() > 0 and grads["cls.bias"].abs().sum() > 0
    assert all(grads[f"{m}.B"].abs().sum() > 0 and not grads[f"{m}.A"].any() for m in model.adapted)


def test_fine_tunes_name_what_their_pretrained_weights_lack_or_hold_extra():
    classifier = tasks.family("ft_cls_full").model.base
    body = tasks.pretrained_lm()
    with pytest.raises(ValueError, match=r"lack \['cls.bias', 'cls.weight'\]"):
        finetune.FullFineTune(classifier, body)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        finetune.FullFineTune(classifier, body | {"extra": torch.zeros(1)}, fresh=("cls.weight", "cls.bias"))
    with pytest.raises(ValueError, match="not its tensors"):
        finetune.FullFineTune(classifier, body, fresh=("cls.weight", "cls.bias", "head"))
    with pytest.raises(ValueError, match="frozen matrices"):
        finetune.LowRankAdapted(classifier, body, ("cls.weight",), 2, "comedies", fresh=("cls.weight", "cls.bias"))


def test_play_windows_come_from_the_labelled_play_and_every_play_is_drawn():
    family = tasks.family("ft_cls_full")
    tokens, labels = family.sample_batch({}, torch.Generator().manual_seed(0), 64)
    assert tokens.shape == (64, family.context) and labels.shape == (64,) and set(labels.tolist()) == {0, 1, 2, 3}
    pieces = [text.unfold(0, family.context, 1) for text in family.texts]
    for row, label in zip(tokens[:16], labels[:16]):
        assert bool((pieces[label] == row).all(1).any()), "the window is a piece of its label's play"
    again = family.sample_batch({}, torch.Generator().manual_seed(0), 64)
    assert torch.equal(tokens, again[0]) and torch.equal(labels, again[1])
    with pytest.raises(ValueError, match="longer than the context 32"):
        tasks.TextClassFamily("short", (torch.zeros(100, dtype=torch.long), torch.zeros(20, dtype=torch.long)), 32,
                              family.model, 4)


def _tiny_spec(steps: int = 5) -> finetune.Pretraining:
    source = tasks.digits_family()
    return finetune.Pretraining(inner.MLP, "digits", lambda g: source.sample_batch({}, g, 16), steps=steps, lr=1e-2)


def test_pretraining_is_deterministic_and_the_cache_is_reused(tmp_path):
    first = finetune.pretrained(_tiny_spec(), tmp_path / "a")
    second = finetune.pretrained(_tiny_spec(), tmp_path / "b")  # built again, elsewhere
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["w1"], inner.MLP.init(torch.Generator().manual_seed(0))["w1"]), "it trained"
    from safetensors.torch import save_file

    (cached,) = (tmp_path / "a").glob("*.safetensors")
    marker = {k: torch.full_like(v, 7.0) for k, v in first.items()}
    save_file(marker, str(cached))
    assert all(torch.equal(v, marker[k]) for k, v in finetune.pretrained(_tiny_spec(), tmp_path / "a").items()), \
        "a second call reads the cache instead of training"
    assert _tiny_spec(steps=6).key != _tiny_spec().key


def test_classify_probe_rows_and_the_head_lr_reaches_the_head_alone():
    from meta_training import classify_probe

    family = tasks.family("ft_cls_full")
    plain = classify_probe.final_loss(family, classify_probe.celo(1.0), steps=21)
    assert classify_probe.final_loss(family, classify_probe.celo(1.0, head_lr=1.0), steps=21) == plain
    assert classify_probe.final_loss(family, classify_probe.celo(1.0, head_lr=10.0), steps=21) != plain
    assert math.isfinite(classify_probe.final_loss(family, classify_probe.adamw(3e-3), steps=21))
    rows = classify_probe.probe_rows(steps=21)
    expected = len(classify_probe.ADAMW_LRS) + len(classify_probe.CELO_LRS) + len(classify_probe.HEAD_LRS)
    assert len(rows) == 3 + expected and all(row.count("|") == 5 for row in rows)
    ratio = classify_probe.first_step_ratio(family)
    assert 0 < ratio < 1 and ratio != classify_probe.first_step_ratio(family, seed=1)


def test_fine_tunes_mark_what_they_initialise_fresh_as_create_does():
    """A new head (full fine-tune), every adapter and head (LoRA), nothing from scratch; Celo's
    held-in optimizer puts them in a param group marked fresh."""
    from celo_hf.fresh_tensors import FRESH
    from meta_training.rules import RULES

    marks = {name: finetune.newly_initialised(tasks.family(name).model)
             for name in ("ft_cls_full", "ft_cls_lora", "ft_digits_head", "ft_lm_full", "digits", "lm_d16_l1_t16")}
    assert marks["ft_cls_full"] == ("cls.weight", "cls.bias") and marks["ft_digits_head"] == ("w2", "b2")
    assert set(marks["ft_cls_lora"]) == set(tasks.family("ft_cls_lora").model.shapes) and "0.qkv.B" in marks["ft_cls_lora"]
    assert marks["ft_lm_full"] == marks["digits"] == marks["lm_d16_l1_t16"] == ()
    model = tasks.family("ft_digits_head").model
    rule = RULES["celo"]
    params = rule.parameters(model.init(torch.Generator().manual_seed(0)))
    optimizer = rule.optimizer(rule.load_net(None), params, 10, fresh=marks["ft_digits_head"])
    held = [([id(p) for p in g["params"]], g[FRESH]) for g in optimizer.param_groups]
    assert held == [([id(params["w1"]), id(params["b1"])], False), ([id(params["w2"]), id(params["b2"])], True)]
