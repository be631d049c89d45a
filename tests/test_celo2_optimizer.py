"""``celo_hf.Celo2`` as a torch optimizer: the golden scenarios through the optimizer, routing and
layout on real ``transformers`` models, state dicts, exact resume, copies, groups and errors."""

from __future__ import annotations

import copy
import io
import pickle
import re

import numpy as np
import pytest
import torch
from helpers import REFERENCE
from torch import nn
from trainer_setup import tiny_model

from celo_hf import Celo2
from celo_hf.celo2 import reference
from celo_hf.celo2.optimizer import create
from celo_hf.celo2.routing import DEFAULT_ADAM_REGEX
from celo_hf.layout import init_tensor_state

pytestmark = pytest.mark.reference
WEIGHTS = REFERENCE / "celo2" / "theta_random.state"


@pytest.fixture(scope="module")
def golden():
    with np.load(REFERENCE / "celo2" / "celo2_golden.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("name", ["celo2", "celo2base", "celo2_clip", "celo2base_clip"])
def test_optimizer_replays_the_golden_scenarios_free_running(golden, name, backend):
    """Every tensor of a scenario in one ``Celo2`` (same-shape tensors stacked), routed by its
    regex on the names, arrays as given; never re-synced."""
    names = [str(n) for n in golden[f"{name}/param_names"]]
    base = name.startswith("celo2base")
    params = {n: nn.Parameter(torch.tensor(golden[f"{name}/init/{n}"])) for n in names}
    opt = Celo2(list(params.items()), lr=float(golden[f"{name}/step_mult"]),
                weight_decay=float(golden[f"{name}/weight_decay"]), weights=WEIGHTS, orthogonalize=not base,
                adam_regex=None if base else str(golden[f"{name}/regex_1d"]), layout="as_given", backend=backend)
    expected_branch = [str(b) for b in golden[f"{name}/branch"]]
    assert ["adam" if opt.routes[params[n]].adam else "celo2" for n in names] == expected_branch
    for t in range(int(golden[f"{name}/n_updates"])):
        for n in names:
            params[n].grad = torch.tensor(golden[f"{name}/grads/{n}"][t])
        opt.step()
        for n in names:
            ref = golden[f"{name}/params/{n}"][t]
            before = golden[f"{name}/init/{n}"] if t == 0 else golden[f"{name}/params/{n}"][t - 1]
            tol = 5e-4 * np.abs(ref - before).max() + 4 * np.spacing(np.abs(ref))
            assert (np.abs(params[n].detach().numpy() - ref) <= tol).all(), (n, t)


def _routes(opt: Celo2, model: nn.Module) -> dict[str, tuple[bool, tuple[int, ...] | None]]:
    return {name: tuple(opt.routes[p]) for name, p in model.named_parameters()}


def test_default_routing_on_gpt2_llama_and_bert():
    """Biases and embedding tables (GPT-2's wte / wpe, Llama's embed_tokens, BERT's embeddings.*)
    take the Adam branch by name alone; norm gains and matrices the learned rule. GPT-2's head is
    tied to wte (the same tensor): it follows it."""
    gpt2 = tiny_model("gpt2")
    routes = _routes(Celo2(gpt2.named_parameters(), weights=WEIGHTS), gpt2)
    adam = {name for name, (is_adam, _) in routes.items() if is_adam}
    assert adam == {"transformer.wte.weight", "transformer.wpe.weight"} | {n for n in routes if n.endswith(".bias")}
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and "lm_head.weight" not in routes
    llama = tiny_model("llama")
    routes = _routes(Celo2(llama.named_parameters(), weights=WEIGHTS), llama)
    assert {n for n, (a, _) in routes.items() if a} == {"model.embed_tokens.weight"}
    assert routes["model.norm.weight"] == (False, None) and routes["lm_head.weight"] == (False, None)  # not square
    assert routes["model.layers.0.self_attn.q_proj.weight"] == (False, (1, 0))  # square: transposed
    bert = tiny_model("bert")
    routes = _routes(Celo2(bert.named_parameters(), weights=WEIGHTS), bert)
    adam = {n for n, (a, _) in routes.items() if a}
    assert adam == {n for n in routes if n.startswith("bert.embeddings.") or n.endswith(".bias")}


def test_model_gives_layout_by_module_type_and_embeddings_whatever_their_name():
    """With the model known, GPT-2's Conv1D (already (in, out)) is kept, nn.Linear transposed,
    convolutions permuted to (*kernel, in, out), and an nn.Embedding called 'table' is sent to Adam."""
    gpt2 = tiny_model("gpt2")
    for opt in (create(gpt2, weights=WEIGHTS), Celo2(gpt2, weights=WEIGHTS)):
        routes = _routes(opt, gpt2)
        assert routes["transformer.h.0.attn.c_attn.weight"] == (False, None)
        assert routes["lm_head.weight" if "lm_head.weight" in routes else "transformer.wte.weight"][0]
    model = nn.ModuleDict({"table": nn.Embedding(10, 4), "linear": nn.Linear(4, 4), "conv": nn.Conv2d(3, 5, 3)})
    routes = _routes(Celo2(model.parameters(), model=model, weights=WEIGHTS), model)
    assert routes["table.weight"] == (True, None)
    assert routes["linear.weight"] == (False, (1, 0)) and routes["conv.weight"] == (False, (2, 3, 1, 0))
    assert routes["linear.bias"][0] and routes["conv.bias"][0]


def test_jax_layout_applies_the_rule_to_the_flax_arrays():
    """A square Linear weight and an OIHW convolution: the step equals the reference's on W.T and on
    the HWIO kernel, and differs from the one on the arrays as given (the choice matters, §15). A
    non-square Linear weight is not transposed, and its step still equals the reference's on W.T."""
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "linear": nn.Linear(6, 6, bias=False), "conv": nn.Conv2d(4, 6, 3, bias=False), "rect": nn.Linear(6, 4, bias=False),
    })
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    steps = {}
    for layout in ("jax", "as_given"):
        trained = copy.deepcopy(model)
        opt = Celo2(trained.named_parameters(), lr=0.01, weights=WEIGHTS, model=trained, layout=layout)
        for n, p in trained.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        steps[layout] = {n: (dict(model.named_parameters())[n] - p).detach() / 0.01 for n, p in trained.named_parameters()}
    assert opt.routes[trained.rect.weight].axes is None
    layers = [(w.detach(), b.detach()) for w, b in opt.net.mlp_layers()]
    flax = {"linear.weight": (1, 0), "conv.weight": (2, 3, 1, 0), "rect.weight": (1, 0)}
    for name, axes in flax.items():
        p = dict(model.named_parameters())[name].detach().permute(axes)
        g = grads[name].permute(axes)
        out = reference.learned_step(p, g, init_tensor_state(p.shape, 3), layers, opt.config, True)
        inverse = tuple(np.argsort(axes))
        torch.testing.assert_close(steps["jax"][name], out.step.permute(inverse), rtol=0, atol=2e-4)
        difference = (steps["jax"][name] - steps["as_given"][name]).norm() / steps["jax"][name].norm()
        assert (difference > 0.1) if name != "rect.weight" else (difference < 1e-4), (name, difference)


def _train(opt: Celo2, params: list[nn.Parameter], steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()


def _mixed_params() -> list[tuple[str, nn.Parameter]]:
    torch.manual_seed(0)
    shapes = {"a.weight": (5, 4), "b.weight": (5, 4), "a.bias": (5,), "gain": (4,), "scalar": (), "big": (300, 260)}
    return [(name, nn.Parameter(torch.randn(shape))) for name, shape in shapes.items()]


def test_state_dict_round_trip_resumes_exactly():
    named = _mixed_params()
    params = [p for _, p in named]
    opt = Celo2(named, lr=1e-2, weight_decay=0.1, weights=WEIGHTS)
    _train(opt, params, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    _train(opt, params, 3, seed=2)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [(name, nn.Parameter(value)) for (name, _), value in zip(named, saved["params"])]
    opt2 = Celo2(resumed, lr=1e-2, weight_decay=0.1, weights=WEIGHTS)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, [p for _, p in resumed], 3, seed=2)
    for (_, p), (_, q) in zip(named, resumed):
        assert torch.equal(p, q)


def test_copies_and_pickles_continue_bit_for_bit():
    named = _mixed_params()
    opt = Celo2(named, lr=1e-2, weights=WEIGHTS)
    _train(opt, [p for _, p in named], 2, seed=1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        clone_params = [p for group in clone.param_groups for p in group["params"]]
        _train(clone, clone_params, 2, seed=3)
        reference_opt = copy.deepcopy(opt)
        ref_params = [p for group in reference_opt.param_groups for p in group["params"]]
        _train(reference_opt, ref_params, 2, seed=3)
        for p, q in zip(clone_params, ref_params):
            assert torch.equal(p, q)


def test_bf16_parameters_keep_float32_state_through_a_state_dict():
    p = nn.Parameter(torch.randn(8, 6, dtype=torch.bfloat16))
    opt = Celo2([("w", p)], weights=WEIGHTS)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert {v.dtype for v in opt.state[p].values()} == {torch.float32}
    assert p.dtype == torch.bfloat16


def test_learned_steps_have_rms_lr_and_follow_the_group_and_scheduler_lr():
    """The learned branch's per-slice RMS is exactly the group's current lr (a scheduler's too),
    even for a zero gradient; Adam-branch tensors move by mult_1d x lr on the first step."""
    w, zero, bias = (nn.Parameter(torch.randn(*s)) for s in ((7, 5), (4, 5), (7,)))
    opt = Celo2([{"params": [("w", w), ("zero", zero)], "lr": 1e-2}, {"params": [("b.bias", bias)], "lr": 1e-3}],
                weights=WEIGHTS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for step in range(2):
        before = [t.detach().clone() for t in (w, zero, bias)]
        w.grad, zero.grad, bias.grad = torch.randn(7, 5), torch.zeros(4, 5), torch.randn(7)
        opt.step()
        scale = 0.5 ** step
        for t, b in zip((w, zero), before):
            rms = (t.detach() - b).square().mean().sqrt()
            torch.testing.assert_close(rms, torch.tensor(1e-2 * scale), rtol=1e-4, atol=0)
        if step == 0:  # a = 0.1 g / sqrt(0.05 g^2) on the first step
            expected = 20 * 1e-3 * 0.1 / 0.05 ** 0.5
            torch.testing.assert_close((bias.detach() - before[2]).abs(), torch.full((7,), expected), rtol=1e-4, atol=0)
        scheduler.step()


def test_parameters_without_gradients_are_left_alone():
    w, frozen = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 4))
    opt = Celo2([("w", w), ("frozen", frozen)], weights=WEIGHTS)
    before = frozen.detach().clone()
    w.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(frozen, before) and not opt.state[frozen]


def test_same_shape_tensors_stacked_equal_each_alone():
    """Small same-shape tensors are updated as one batch; the result is each tensor's own update."""
    torch.manual_seed(0)
    tensors = [torch.randn(6, 5) for _ in range(4)]
    grads = [torch.randn(6, 5) for _ in range(4)]
    together = [nn.Parameter(t.clone()) for t in tensors]
    opt = Celo2([(f"w{i}", p) for i, p in enumerate(together)], weights=WEIGHTS)
    for p, g in zip(together, grads):
        p.grad = g
    opt.step()
    for t, g, p in zip(tensors, grads, together):
        alone = nn.Parameter(t.clone())
        alone.grad = g
        Celo2([("w", alone)], weights=WEIGHTS).step()
        torch.testing.assert_close(p.detach(), alone.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((), {"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0 \(Celo2's lr"),
        ((), {"weight_decay": float("nan")}, ValueError, "weight_decay"),
        ((), {"layout": "hwio"}, ValueError, r"layout must be one of \('jax', 'as_given'\), got 'hwio'"),
        ((), {"mult_1d": -2.0}, ValueError, "mult_1d must be a finite number >= 0, got -2.0"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        Celo2([("w", nn.Parameter(torch.zeros(2, 2)))], *args, weights=WEIGHTS, **kwargs)


def test_unnamed_parameters_need_names_for_the_routing():
    p = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=re.escape("without one: pass model.named_parameters()")):
        Celo2([p], weights=WEIGHTS)
    opt = Celo2([p], weights=WEIGHTS, adam_regex=None)  # Celo2-base style: no names needed
    assert not opt.routes[p].adam
    with pytest.raises(TypeError, match="real floating-point parameters, got one of dtype torch.int64"):
        Celo2([("i", torch.zeros(2, dtype=torch.int64))], weights=WEIGHTS)


def test_default_regex_is_the_originals_plus_gpt2_names():
    assert re.search(DEFAULT_ADAM_REGEX, "h.0.attn.c_attn.bias") and re.search(DEFAULT_ADAM_REGEX, "model.embed_tokens.weight")
    assert re.search(DEFAULT_ADAM_REGEX, "transformer.wte.weight") and not re.search(DEFAULT_ADAM_REGEX, "h.0.ln_1.weight")
