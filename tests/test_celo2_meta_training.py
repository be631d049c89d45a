"""Meta-training Celo2 (``--rule celo2``): the population is ``Celo2`` on every member, a tiny run
resumes exactly, PES's gradient on the Celo2 weights is finite, the inner tensors are routed as a
PyTorch module's would be, and the held-in checks run with ``Celo2``."""

import math
from dataclasses import replace

import pytest
import torch
from population_setup import stepped_together
from torch import nn

from celo_hf import Celo2
from celo_hf.celo2.network import Celo2Net
from celo_hf.celo2.routing import DEFAULT_ADAM_REGEX, route
from meta_training import held_in, inner, rules
from meta_training.evaluate import evaluate
from meta_training.tasks import digits_family, families_by_name, lm_model
from meta_training.train import MetaTrainConfig, MetaTrainer, publish, run
from meta_training.trainer_tasks import TRAINER_TASKS, train_through_trainer

CELO2 = rules.RULES["celo2"]
# Three inner models (the MLP, rank-4 adapters on a pretrained MLP, a tiny transformer LM), the MLP
# twice; trajectories of 3-8 steps inside truncations of 4: resets happen mid-truncation.
TINY = MetaTrainConfig(
    rule="celo2", iterations=3, slots_per_family=1, truncation=4, min_unroll=3, max_unroll=8,
    families=["teacher", "ft_digits_lora", "lm_d16_l1_t16", "ft_digits_full"], checkpoint_every=1, held_in_every=0,
)


def test_zero_noise_population_steps_as_celo2_on_each_member():
    """With std 0 every "+" and "-" member of every slot group, stepped together, follows what
    ``Celo2`` (its defaults, lr 1e-3) does on that member alone, given the module names and
    orientation of :class:`meta_training.rules.ModuleView`: bit for bit. Both run the same
    functions of :mod:`celo_hf.celo2.update` on the same float32 inputs, the population with the
    members stacked along a leading axis, ``Celo2`` with one model's same-shape tensors stacked; on
    CPU each row of those batched products rounds as it would alone. (A BLAS that split batched
    products differently would leave float32 rounding differences, which Newton-Schulz amplifies to
    about 1e-5 relative, ``docs/celo2-algorithm.md`` §10.)"""
    config = replace(TINY, std=0.0, min_unroll=50, max_unroll=50)
    steps = 3
    trainer, members = stepped_together(config, steps)
    net = trainer.current_net()
    for member in members:
        group, j, family = member.group, member.j, member.family
        params = CELO2.parameters({k: v[j].clone() for k, v in member.start.items()})
        optimizer = CELO2.optimizer(net, params, steps)
        assert isinstance(optimizer, Celo2)
        for _ in range(steps):
            batch = tuple(t[None] for t in family.sample_batch(group.tasks[j], member.generator, family.batch_size))
            scales = {k: v[j : j + 1] for k, v in group.scales.items()}
            loss = inner.model_losses(group.model, CELO2.inner_weights(params), scales, batch)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        alone = {k: v[0].detach() for k, v in CELO2.inner_weights(params).items()}
        assert any(not torch.equal(alone[k], member.start[k][j]) for k in alone), "it trained"
        for key, value in alone.items():
            for row in (j, member.m + j):
                assert torch.equal(group.params[key][row], value), f"{family.name} {key} row {row}"


def test_the_mlp_population_steps_as_celo2_on_the_torch_module():
    """The inner MLP (``x @ w1 + b1``, ``(in, out)`` weights) stepped by the population equals
    ``Celo2(model.named_parameters())`` with every default on the same network built from
    ``nn.Linear`` layers (``(out, in)`` weights, ``*.bias`` on the Adam branch): what is
    meta-trained is what users run."""
    generator = torch.Generator().manual_seed(0)
    weights = inner.MLP.init(generator)
    weights = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in weights.items()}  # nonzero biases
    x, y = digits_family().sample_batch({}, generator, 64)
    net = Celo2Net()
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        for layer, i in ((module[0], 1), (module[2], 2)):
            layer.weight.copy_(weights[f"w{i}"].T)
            layer.bias.copy_(weights[f"b{i}"])
    optimizer = Celo2(module.named_parameters(), lr=rules.CELO2_LR, weights=net)
    params = {k: v[None].clone() for k, v in weights.items()}
    stacked = {k: v[None] for k, v in net.state_dict().items()}
    state = CELO2.init(net, params, torch.tensor([5]), stacked)
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    for _ in range(3):
        loss = nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _, grads = inner.model_losses_and_grads(inner.MLP, params, ones, (x[None], y[None]))
        state = CELO2.update(net, state, params, grads, loss[None], stacked)
    for layer, i in ((module[0], 1), (module[2], 2)):
        torch.testing.assert_close(params[f"w{i}"][0], layer.weight.detach().T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(params[f"b{i}"][0], layer.bias.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(params["w1"][0], weights["w1"]), "it trained"


def test_inner_tensors_take_the_routes_of_the_equivalent_module():
    """Biases and embedding tables go to Celo2's Adam branch, LayerNorm gains and every matrix
    (adapters included) to the learned rule, which sees each square matrix ``(in, out)`` as the
    inner model stores it (``layout="jax"`` on the module's ``(out, in)``) and a non-square one as
    the module holds it (the same step, transposed)."""
    shapes = dict(lm_model("lm_d16_l1_t16").shapes) | {"w1.A": (64, 4), "w1.B": (4, 32), "b1": (32,)}
    view = rules.ModuleView.of(shapes)
    params = view.to_module({name: torch.zeros(1, *shape) for name, shape in shapes.items()})
    inner_names = {module: name for name, module in view.names.items()}
    adam = {inner_names[m] for m, p in params.items() if route(m, p[0], DEFAULT_ADAM_REGEX, "jax").adam}
    assert adam == {"tokens", "positions", "b1"} | {n for n in shapes if n.endswith(".bias")}, sorted(adam)
    for module_name, p in params.items():
        name = inner_names[module_name]
        r = route(module_name, p[0], DEFAULT_ADAM_REGEX, "jax")
        if not r.adam and len(shapes[name]) == 2:
            square = shapes[name][0] == shapes[name][1]
            seen = p[0].permute(*r.axes) if r.axes is not None else p[0].T
            assert (r.axes is not None) == square and tuple(seen.shape) == shapes[name], name
    assert view.names["0.ln1.gain"] == "0.ln1.weight" and view.names["tokens"] == "embed_tokens.weight"


def test_a_resumed_celo2_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    families = families_by_name(TINY.families)
    straight = run(TINY, families, tmp_path / "straight")
    run(replace(TINY, iterations=1), families, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoint-rank0.pt").exists()
    resumed = run(TINY, families, tmp_path / "resumed")
    assert isinstance(straight, Celo2Net) and (tmp_path / "straight" / "final" / "model.safetensors").exists()
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    strip = lambda line: line.split(', "seconds"')[0]
    lines = [[strip(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("straight", "resumed")]
    assert lines[0] == lines[1] and len(lines[0]) == TINY.iterations


def test_pes_gradient_on_celo2_weights_is_finite_and_trains_every_mlp_entry():
    trainer = MetaTrainer(replace(TINY, iterations=1), families_by_name(TINY.families))
    before = trainer.current_net().state_dict()
    assert all(key.startswith("mlp.") for key in before) and bool(trainer.trainable.all())
    metrics = trainer.outer_step()
    grad = trainer.param.grad
    assert grad.shape == (sum(v.numel() for v in before.values()),)
    assert bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0, metrics
    assert metrics["meta_loss"] < 20.0, "no member blew up"
    after = trainer.current_net().state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "every mlp.* tensor moved"


def test_celo2_refuses_what_only_celo_has():
    with pytest.raises(ValueError, match="phase must be one of \\(1,\\) for rule 'celo2'"):
        replace(TINY, phase=2)
    with pytest.raises(ValueError, match="zero_gradient_calibrated.*rule 'celo' only"):
        replace(TINY, zero_gradient_calibrated=True)
    with pytest.raises(ValueError, match="rule must be one of"):
        replace(TINY, rule="celo3")


def gradient_direction_net() -> Celo2Net:
    """A ``Celo2Net`` whose direction is its gradient feature (``relu(g) - relu(-g)``): Celo2 then
    steps along the orthogonalised, RMS-normalised gradient (Muon-like) on matrices."""
    net = Celo2Net()
    (first, _), (middle, _), (last, _) = layers = net.mlp_layers()
    with torch.no_grad():
        for tensor in (t for layer in layers for t in layer):
            tensor.zero_()
        first[0, 0], first[1, 0] = 1.0, -1.0
        middle[0, 0], middle[1, 1] = 1.0, 1.0
        last[0, 0], last[0, 1] = 1.0, -1.0
    return net


def test_held_in_checks_train_with_celo2_and_a_record_without_drift_is_eligible():
    fresh = held_in.final_loss(CELO2.fresh_net(seed=0, warm_start_gain=0.0), digits_family(), seeds=1, steps=30, rule=CELO2)
    descent = held_in.final_loss(gradient_direction_net(), digits_family(), seeds=1, steps=30, rule=CELO2)
    assert math.isfinite(fresh) and 0.0 < descent < min(fresh, math.log(10)) - 0.15, (fresh, descent)
    assert not CELO2.zero_gradient_fixed_point and rules.RULES["celo"].zero_gradient_fixed_point
    first = held_in.scored({"held_in_loss": 0.5, "finetune_loss": 2.0, "lm_loss": 3.0}, [])
    better = held_in.scored({"held_in_loss": 0.25, "finetune_loss": 2.0, "lm_loss": 3.0}, [first])
    assert first["held_in_eligible"] and better["held_in_eligible"]
    assert better["held_in_score"] == pytest.approx(5 / 6) and held_in.is_best(better, [first])


# ---- evaluation --------------------------------------------------------------------------------------


def test_celo2_evaluation_and_reusing_the_adamw_runs_of_an_earlier_one(tmp_path):
    """``evaluate(rule="celo2")`` runs ``Celo2`` from the same init as AdamW; ``adamw_from`` gives
    the very AdamW numbers the first evaluation measured, without re-running them."""
    net = gradient_direction_net()
    settings = {"seeds": 2, "task_names": ["ill_conditioned_softmax"], "steps": 6, "learning_rates": (1e-2, 3e-2)}
    first = evaluate(net, tmp_path / "first", rule="celo2", **settings)
    again = evaluate(net, tmp_path / "again", rule="celo2", adamw_from=[tmp_path / "first" / "results.json"], **settings)
    (task,), (reused,) = first["tasks"], again["tasks"]
    assert task["adamw"][0]["losses"][0] == task["celo"][0]["losses"][0], "same seed, same init"
    assert task["celo"][0]["losses"][-1] < task["celo"][0]["losses"][0], "Celo2 trains"
    assert reused["adamw"] == task["adamw"] and reused["lr_sweep"] == task["lr_sweep"]
    assert [r["losses"] for r in reused["celo"]] == [r["losses"] for r in task["celo"]]
    assert "| ill_conditioned_softmax | 6 |" in (tmp_path / "again" / "results.md").read_text()
    assert "Celo2 train" in (tmp_path / "again" / "results.md").read_text()
    assert (tmp_path / "again" / "results.md").read_text().startswith("AdamW runs reused from")
    one_seed = evaluate(net, tmp_path / "one", rule="celo2", adamw_from=[tmp_path / "first" / "results.json"],
                        **(settings | {"seeds": 1}))
    assert one_seed["tasks"][0]["adamw"] == task["adamw"][:1]
    with pytest.raises(ValueError, match="expected \\(8, "):
        evaluate(net, tmp_path / "bad", rule="celo2", adamw_from=[tmp_path / "first" / "results.json"],
                 **(settings | {"steps": 8}))


def test_celo2_through_trainer_at_a_constant_lr(tmp_path):
    task = TRAINER_TASKS["llama_ga"]
    workload = task.build(0, tiny=True)
    optimizer, scheduler = CELO2.trainer_optimizers(gradient_direction_net(), workload.model)
    assert isinstance(optimizer, Celo2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [rules.CELO2_LR] * len(optimizer.param_groups)
    run_ = train_through_trainer(task, task.build(0, tiny=True), None, 0, steps=4, weights=gradient_direction_net(), rule=CELO2)
    assert run_.optimizer == "Celo2" and len(run_.losses) == 4 and all(math.isfinite(x) for x in run_.losses)
    assert run_.losses[-1] < run_.losses[0]


def test_push_to_hub_then_celo2_loads_it(tmp_path, hub, hf_cache):
    trained = run(replace(TINY, iterations=2), families_by_name(TINY.families), tmp_path)
    publish(tmp_path, "celo-org/celo2-meta-trained", replace(TINY, iterations=2), None)
    files = hub.files("celo-org/celo2-meta-trained")
    assert {"config.json", "model.safetensors", "README.md", "curves.png"} <= set(files)
    assert b"# Celo2 meta-model" in files["README.md"] and b"celo_hf.Celo2(model.named_parameters()" in files["README.md"]
    optimizer = Celo2([("w", nn.Parameter(torch.ones(2, 2)))], weights="celo-org/celo2-meta-trained", cache_dir=hf_cache)
    assert all(torch.equal(v, optimizer.net.state_dict()[k]) for k, v in trained.state_dict().items())
