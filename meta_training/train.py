"""Meta-train Celo (two phases) or Celo2 (one) with truncated PES on small inner problems.

    python -m meta_training.train --phase 1 --iterations 2000 --out runs/phase1
    python -m meta_training.train --phase 2 --iterations 500 --init runs/phase1/final --out runs/phase2
    python -m meta_training.train --rule celo2 --iterations 500 --out runs/celo2

One outer iteration: draw a perturbation per slot, run every slot's "+" and "-" inner problem for
``truncation`` steps under ``theta +/- eps`` (all ``2N`` inner problems advance together through
:mod:`celo_hf.population`), turn the loss differences into a PES gradient
(:mod:`meta_training.pes`) and take one AdamW step on the trainable meta-parameters: the update MLP
in phase 1, the learned scheduler and its initial state in phase 2. With ``--rule celo2`` the
meta-model is a ``Celo2Net`` and its population :mod:`celo_hf.celo2.population` (one phase: the
update MLP; the inner lr is fixed, :data:`meta_training.rules.CELO2_LR`); what differs between the
rules is in :mod:`meta_training.rules`.

Slots whose families train the same inner model (:attr:`InnerModel.name`: same tensors, same loss)
form a group that advances with one :func:`celo_hf.population.update` call; different groups (an
MLP, a transformer LM, low-rank adapters, ...) run one after the other within each inner step.

With ``--zero_gradient_calibrated`` every perturbed member and every new ``theta`` is projected by
:func:`celo_hf.diagnostics.calibrate_zero_gradient_` (the update is exactly zero at zero gradient):
the two constrained coordinate sets (the ``param`` feature's first-layer column, the direction
bias) are then set by the projection, and PES's estimate for them has no effect.

Every random draw of slot ``i`` comes from its own generator, so a run gives the same result on
one process or split over several (``torchrun --nproc_per_node K -m meta_training.train ...``), and
a run killed and restarted with the same command continues from its last checkpoint exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from celo_hf import CeloNet
from celo_hf.diagnostics import calibrate_zero_gradient_

from . import finetune, held_in, inner, report
from .extras import require_meta_extra
from .pes import antithetic_population, pes_gradient, sample_perturbations
from .rules import RULES, Rule
from .tasks import families_by_name, sample_scales
from .warm_start import decaying_schedule


class TaskFamily(Protocol):
    """A source of tasks for one inner model: batches are tuples of tensors (e.g. ``(x, y)``)."""

    name: str
    model: inner.InnerModel
    batch_size: int

    def sample_task(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-task data (e.g. a permutation); ``{}`` if the family has one task."""

    def sample_batch(self, task: dict[str, torch.Tensor], generator: torch.Generator, batch_size: int) -> inner.Batch:
        """A training batch of the task (no population axis)."""


@dataclass
class MetaTrainConfig:
    """Settings of one meta-training phase (defaults: the CPU recipe of ``docs/meta-training.md`` §7.4)."""

    #: The update rule: a key of :data:`meta_training.rules.RULES` (``"celo"``, ``"celo2"``).
    rule: str = "celo"
    phase: int = 1
    iterations: int = 2000
    slots_per_family: int = 4
    truncation: int = 50
    min_unroll: int = 50
    max_unroll: int = 1000
    std: float = 0.01
    lr: float = 3e-4
    weight_decay: float = 1e-4
    reparam_level: str = "global"
    reparam_min: float = 1e-3
    reparam_max: float = 1e3
    seed: int = 0
    warm_start_gain: float = 0.0
    neutral_schedule: bool = False
    decaying_schedule: bool = False
    #: Phase 1 applies the starting weights' learned scheduler, frozen.
    apply_schedule: bool = False
    #: Keep every member's update exactly zero at zero gradient (see the module docstring).
    zero_gradient_calibrated: bool = False
    checkpoint_every: int = 50
    held_in_every: int = 250
    #: The held-in checks that choose ``best/``: ``meta_training.held_in.SUITES``.
    held_in_suite: str = "digits"
    families: list[str] = field(default_factory=lambda: ["digits", "permuted_digits", "patches", "teacher"])

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)}, got {self.rule!r}")
        if self.phase not in RULES[self.rule].phases:
            raise ValueError(f"phase must be one of {RULES[self.rule].phases} for rule {self.rule!r} "
                             f"(1: update MLP, 2: learned scheduler), got {self.phase}")
        celo_only = {"warm_start_gain": self.warm_start_gain, "neutral_schedule": self.neutral_schedule,
                     "decaying_schedule": self.decaying_schedule, "apply_schedule": self.apply_schedule,
                     "zero_gradient_calibrated": self.zero_gradient_calibrated}
        if self.rule != "celo" and any(celo_only.values()):
            raise ValueError(f"{sorted(k for k, v in celo_only.items() if v)} apply to rule 'celo' only, "
                             f"not {self.rule!r} (which has no schedule and no zero-gradient fixed point)")
        if not 0 < self.min_unroll <= self.max_unroll:
            raise ValueError(f"need 0 < min_unroll <= max_unroll, got {self.min_unroll}, {self.max_unroll}")
        if self.held_in_suite not in held_in.SUITES:
            raise ValueError(f"held_in_suite must be one of {held_in.SUITES}, got {self.held_in_suite!r}")


def flatten(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A state dict as one float32 vector (keys in the dict's order)."""
    return torch.cat([value.detach().float().reshape(-1) for value in state.values()])


def unflatten(vectors: torch.Tensor, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(P, D)`` rows back to a stacked state dict ``name -> (P, *shape)``."""
    sizes = [value.numel() for value in template.values()]
    return {
        key: chunk.reshape(vectors.shape[0], *value.shape).contiguous()
        for (key, value), chunk in zip(template.items(), vectors.split(sizes, dim=1))
    }


def calibrated_rows(vectors: torch.Tensor, template: dict[str, torch.Tensor], net: CeloNet) -> torch.Tensor:
    """``(P, D)`` meta-parameter rows projected by :func:`calibrate_zero_gradient_`; ``net`` (of
    ``template``'s configuration) is used as scratch space."""
    rows = []
    for i in range(vectors.shape[0]):
        net.load_state_dict({k: v[0] for k, v in unflatten(vectors[i : i + 1], template).items()})
        rows.append(flatten(calibrate_zero_gradient_(net).state_dict()))
    return torch.stack(rows) if rows else vectors.clone()


@dataclass
class SlotGroup:
    """This process's slots whose families share one inner model, and their ``2m`` inner problems
    (rows ``j`` and ``m + j`` are slot ``local[j]``'s "+" and "-" copies)."""

    model: inner.InnerModel
    #: Positions of the group's slots in ``MetaTrainer.slots``, ascending.
    local: list[int]
    tasks: list[dict[str, torch.Tensor]]
    scales: inner.Weights
    params: inner.Weights
    #: The rule's population state (:meth:`meta_training.rules.Rule.init`).
    state: Any = None

    def rows(self, n: int) -> torch.Tensor:
        """Indices of the group's ``2m`` members among all ``2n`` population members."""
        return torch.tensor(self.local + [n + i for i in self.local], dtype=torch.int64)


class SlotRandom:
    """The random draws of one slot: task, scale, init, batches, unroll lengths and noise."""

    def __init__(self, seed: int, slot: int):
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + slot)

    def unroll_length(self, config: MetaTrainConfig) -> int:
        """A trajectory length, log-uniform in ``[min_unroll, max_unroll]``."""
        u = torch.rand((), generator=self.generator, dtype=torch.float64).item()
        low, high = math.log(config.min_unroll), math.log(config.max_unroll)
        return int(round(math.exp(low + u * (high - low))))


class MetaTrainer:
    """Truncated-PES meta-training of a meta-model (one phase of ``config.rule``), on this
    process's share of slots."""

    def __init__(self, config: MetaTrainConfig, families: list[TaskFamily], init: nn.Module | None = None):
        self.config = config
        self.rule: Rule = RULES[config.rule]
        self.families = families
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        base = init if init is not None else self.rule.fresh_net(config.seed, config.warm_start_gain)
        applies_schedule = config.phase == 2 or config.decaying_schedule or config.apply_schedule
        self.net = self.rule.configured(base, applies_schedule)
        if config.neutral_schedule:
            neutral_schedule(self.net)
        if config.decaying_schedule:
            decaying_schedule(self.net)
        self.template = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.scratch = type(self.net)(**self.net._hub_mixin_config)
        keys = self.rule.trainable_keys(self.net, config.phase)
        self.trainable = torch.cat([
            torch.full((value.numel(),), key in keys, dtype=torch.bool) for key, value in self.template.items()
        ])
        self.theta = self._project(flatten(self.template)[None])[0]
        self.param = torch.nn.Parameter(self.theta[self.trainable].clone())
        self.outer = torch.optim.AdamW(
            [self.param], lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
        )
        self.num_slots = config.slots_per_family * len(families)
        self.slots = list(range(self.rank, self.num_slots, self.world))
        self.random = [SlotRandom(config.seed, slot) for slot in self.slots]
        self.iteration = 0
        self._init_inner()

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(P, D)`` rows, calibrated when the run keeps the zero-gradient constraint."""
        return calibrated_rows(vectors, self.template, self.scratch) if self.config.zero_gradient_calibrated else vectors

    # ---- inner problems ------------------------------------------------------------------------

    def _family(self, local: int) -> TaskFamily:
        return self.families[self.slots[local] % len(self.families)]

    def _sample_problem(self, local: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A new task, reparameterisation scales and initial parameters ``phi = theta0 / s`` for one slot."""
        rng, family = self.random[local], self._family(local)
        task = family.sample_task(rng.generator)
        c = self.config
        scales = sample_scales(family.model.shapes, c.reparam_level, rng.generator, c.reparam_min, c.reparam_max)
        params = family.model.init(rng.generator)
        return task, scales, {name: value / scales[name] for name, value in params.items()}

    def _init_inner(self) -> None:
        n = len(self.slots)
        problems = [self._sample_problem(i) for i in range(n)]
        self.length = torch.tensor([rng.unroll_length(self.config) for rng in self.random], dtype=torch.int64)
        self.counter = torch.tensor(
            [int(torch.randint(self.config.max_unroll, (), generator=rng.generator)) for rng in self.random],
            dtype=torch.int64,
        )
        self.done = self.counter >= self.length
        members: dict[str, list[int]] = {}
        for i in range(n):
            members.setdefault(self._family(i).model.name, []).append(i)
        both_signs = lambda rows: torch.stack(rows).repeat(2, *([1] * rows[0].dim())).contiguous()  # noqa: E731
        self.groups = []
        for local in members.values():
            model = self._family(local[0]).model
            tasks, scales, inits = zip(*(problems[i] for i in local))
            self.groups.append(SlotGroup(
                model, local, list(tasks),
                scales={name: both_signs([s[name] for s in scales]) for name in model.shapes},
                params={name: both_signs([init[name] for init in inits]) for name in model.shapes},
            ))
        meta_weights = unflatten(self.theta.expand(2 * n, -1), self.template)
        for group in self.groups:
            rows = group.rows(n)
            group.state = self.rule.init(self.net, group.params, self.length[group.local].repeat(2),
                                         {k: v[rows] for k, v in meta_weights.items()})
        self.accumulator = torch.zeros(n, self.theta.numel())

    def _group_step(self, group: SlotGroup, meta_weights: dict[str, torch.Tensor], resetting: torch.Tensor) -> torch.Tensor:
        """One step of a group's inner problems (``meta_weights``: the group's rows); slots flagged in
        ``resetting`` (``(n,)``) then start new problems. Returns the group's raw losses ``(2m,)``."""
        m = len(group.local)
        batches = [self._family(i).sample_batch(group.tasks[j], self.random[i].generator, self._family(i).batch_size)
                   for j, i in enumerate(group.local)]
        batch = tuple(torch.stack(parts).repeat(2, *([1] * parts[0].dim())) for parts in zip(*batches))
        loss, grads = inner.model_losses_and_grads(group.model, group.params, group.scales, batch)
        group.state = self.rule.update(self.net, group.state, group.params, grads, loss, meta_weights,
                                       fresh=finetune.newly_initialised(group.model))
        restarting = resetting[group.local]
        if bool(restarting.any()):
            for j in restarting.nonzero().flatten().tolist():
                group.tasks[j], scales, init = self._sample_problem(group.local[j])
                for name, value in init.items():
                    group.params[name][[j, m + j]] = value
                    group.scales[name][[j, m + j]] = scales[name]
            group.state = self.rule.reset(
                group.state, restarting.repeat(2), self.length[group.local].repeat(2), meta_weights
            )
        return loss

    def _inner_step(self, meta_weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of every inner problem; returns normalised losses ``(2n,)``, mask and done ``(n,)``."""
        n = len(self.slots)
        resetting = self.done.clone()
        normalised = torch.zeros(2 * n)
        for group in self.groups:
            rows = group.rows(n)
            loss = self._group_step(group, {k: v[rows] for k, v in meta_weights.items()}, resetting)
            normalised[rows] = inner.normalise_loss(loss, group.model.num_classes)
        self.counter = torch.where(resetting, torch.zeros_like(self.counter), self.counter + 1)
        mask = ~resetting
        self.done = self.counter >= self.length
        for i in self.done.nonzero().flatten().tolist():
            self.length[i] = self.random[i].unroll_length(self.config)
        return normalised * mask.repeat(2), mask, self.done.clone()

    # ---- outer iterations ----------------------------------------------------------------------

    def outer_step(self) -> dict[str, float]:
        """One PES truncation and AdamW step; returns metrics."""
        n, dim = len(self.slots), self.theta.numel()
        eps = torch.stack([sample_perturbations(1, dim, self.config.std, rng.generator)[0] for rng in self.random]) if n else torch.zeros(0, dim)
        meta_weights = unflatten(self._project(antithetic_population(self.theta, eps)), self.template)
        losses, masks, dones = [], [], []
        for _ in range(self.config.truncation):
            loss, mask, done = self._inner_step(meta_weights)
            losses.append(loss)
            masks.append(mask)
            dones.append(done)
        losses = torch.stack(losses)
        estimate = pes_gradient(
            losses[:, :n], losses[:, n:], torch.stack(masks), torch.stack(dones), eps, self.accumulator, self.config.std
        )
        self.accumulator = estimate.accumulator
        total = torch.cat([estimate.grad * n, estimate.mean_loss.reshape(1) * n])
        if self.world > 1:
            dist.all_reduce(total)
        grad = torch.nan_to_num(total[:-1] / self.num_slots, nan=0.0)
        mean_loss = float(total[-1] / self.num_slots)
        self.param.grad = grad[self.trainable].clone()
        self.outer.step()
        with torch.no_grad():
            self.theta[self.trainable] = self.param.detach()
            self.theta = self._project(self.theta[None])[0]
            self.param.copy_(self.theta[self.trainable])
        self.iteration += 1
        return {"iteration": self.iteration, "meta_loss": 20.0 if math.isnan(mean_loss) else mean_loss,
                "grad_norm": float(grad[self.trainable].norm())}

    def current_net(self) -> nn.Module:
        """The meta-model at the current ``theta`` (a new module)."""
        net = type(self.net)(**self.net._hub_mixin_config)
        net.load_state_dict({k: v[0] for k, v in unflatten(self.theta[None], self.template).items()})
        return net

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (this rank's slots); loads with ``weights_only=True``."""
        return {
            "config": asdict(self.config),
            "iteration": self.iteration,
            "theta": self.theta.clone(),
            "outer": self.outer.state_dict(),
            "accumulator": self.accumulator,
            "generators": [rng.generator.get_state() for rng in self.random],
            "length": self.length,
            "counter": self.counter,
            "done": self.done,
            "groups": [
                {"tasks": g.tasks, "scales": g.scales, "params": g.params, "state": self.rule.state_to_dict(g.state)}
                for g in self.groups
            ],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. The run's length and checkpoint interval may differ;
        every other setting must match."""
        ours = {k: v for k, v in asdict(self.config).items() if k not in _RESUMABLE_CHANGES}
        # Settings added after a checkpoint was written take their defaults.
        saved_config = {**asdict(MetaTrainConfig()), **saved["config"]}
        theirs = {k: v for k, v in saved_config.items() if k not in _RESUMABLE_CHANGES}
        if ours != theirs:
            changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
            raise ValueError(f"the checkpoint was made with different settings (saved, now): {changed}")
        self.iteration = saved["iteration"]
        self.theta = saved["theta"]
        with torch.no_grad():
            self.param.copy_(self.theta[self.trainable])
        self.outer.load_state_dict(saved["outer"])
        self.accumulator = saved["accumulator"]
        for rng, state in zip(self.random, saved["generators"]):
            rng.generator.set_state(state)
        self.length, self.counter, self.done = saved["length"], saved["counter"], saved["done"]
        # Checkpoints from before slot groups held one group (every family trained the MLP).
        groups = saved.get("groups") or [{key: saved[key] for key in ("tasks", "scales", "params", "state")}]
        if len(groups) != len(self.groups):
            raise ValueError(f"the checkpoint has {len(groups)} slot groups, this run {len(self.groups)}")
        for group, g in zip(self.groups, groups):
            group.tasks, group.scales, group.params = g["tasks"], g["scales"], g["params"]
            group.state = self.rule.state_from_dict(g["state"])


_RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "held_in_every")


def neutral_schedule(net: CeloNet) -> CeloNet:
    """Make the scheduler's output exactly 1 (``lr_mult = 0.1 * exp(0 . h + ln 10)``), in place, so
    that phase 2 starts from phase 1's behaviour rather than from a random schedule (which scales
    every step by an arbitrary factor that PES needs many iterations to undo). [ours]"""
    with torch.no_grad():
        net.lr_head.weight.zero_()
        net.lr_head.bias.fill_(math.log(10.0))
    return net


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run(config: MetaTrainConfig, families: list[TaskFamily], out: Path, init: nn.Module | None = None) -> nn.Module:
    """Run (or resume) one phase, writing ``metrics.jsonl``, ``checkpoint-rank{r}.pt``, ``best/``
    (the meta-model with the lowest held-in loss so far, :func:`held_in_loss`, checked every
    ``held_in_every`` iterations; 0: never) and, at the end, ``final/`` (``config.json`` +
    ``model.safetensors`` each). Returns the final meta-model."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = MetaTrainer(config, families, init)
    checkpoint = out / f"checkpoint-rank{trainer.rank}.pt"
    metrics_path = out / "metrics.jsonl"
    if checkpoint.exists():
        trainer.load_state_dict(torch.load(checkpoint, weights_only=True))
        if trainer.rank == 0:
            _truncate_metrics(metrics_path, trainer.iteration)
    elif trainer.rank == 0 and config.held_in_every > 0:
        _record_held_in(trainer, out, metrics_path)
    bar = tqdm(total=config.iterations, initial=trainer.iteration, disable=trainer.rank != 0, desc=f"phase {config.phase}")
    start = time.perf_counter() - _elapsed_seconds(metrics_path)  # wall-clock counts across resumes
    while trainer.iteration < config.iterations:
        metrics = trainer.outer_step()
        metrics["seconds"] = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}")
        if trainer.rank == 0:
            _append(metrics_path, {"phase": config.phase, **metrics})
            if config.held_in_every > 0 and (
                trainer.iteration % config.held_in_every == 0 or trainer.iteration == config.iterations
            ):
                _record_held_in(trainer, out, metrics_path)
        if trainer.iteration % config.checkpoint_every == 0 or trainer.iteration == config.iterations:
            _atomic_save(trainer.state_dict(), checkpoint)
    bar.close()
    net = trainer.current_net()
    if trainer.rank == 0:
        net.save_pretrained(out / "final")
    return net


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _record_held_in(trainer: MetaTrainer, out: Path, metrics_path: Path) -> None:
    """Run the held-in checks on the current meta-model; keep it in ``best/`` if
    :func:`meta_training.held_in.is_best` says so."""
    net = trainer.current_net()
    previous = [json.loads(line) for line in metrics_path.read_text().splitlines()
                if "held_in_loss" in line] if metrics_path.exists() else []
    record = {"phase": trainer.config.phase, "iteration": trainer.iteration,
              **held_in.run_checks(net, trainer.config.held_in_suite, trainer.rule)}
    record = held_in.scored(record, previous, trainer.config.held_in_suite)
    _append(metrics_path, record)
    if held_in.is_best(record, previous):
        net.save_pretrained(out / "best")


def _elapsed_seconds(path: Path) -> float:
    """The wall-clock seconds recorded by the last outer step in ``path`` (0 for a new run)."""
    if not path.exists():
        return 0.0
    seconds = [json.loads(line).get("seconds") for line in path.read_text().splitlines()]
    return next((s for s in reversed(seconds) if s is not None), 0.0)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines written after the checkpoint being resumed from."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
        path.write_text("".join(line + "\n" for line in lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = MetaTrainConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, list):
            parser.add_argument(f"--{name}", nargs="+", default=value)
        elif isinstance(value, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--init", default=None, help="starting weights (phase 2: the phase-1 result)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--push_to_hub", default=None, metavar="REPO",
                        help="upload the best meta-model with a model card (command, budget, curves, evaluation)")
    args = vars(parser.parse_args(argv))
    require_meta_extra("python -m meta_training.train")
    out, init, repo = args.pop("out"), args.pop("init"), args.pop("push_to_hub")
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
    config = MetaTrainConfig(**args)
    run(config, families_by_name(config.families), out, RULES[config.rule].load_net(init) if init else None)
    if repo is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        publish(out, repo, config, init)
    if dist.is_initialized():
        dist.destroy_process_group()


def publish(out: Path, repo_id: str, config: MetaTrainConfig, init: str | None) -> None:
    """Upload ``out/best`` (``out/final`` without held-in checks) with curves and a model card; the
    previous phase's curves are included when ``init`` is the ``best``/``final`` folder of another run."""
    folder = out / "best" if (out / "best").exists() else out / "final"
    runs = [Path(init).parent / "metrics.jsonl"] if init and (Path(init).parent / "metrics.jsonl").exists() else []
    runs.append(out / "metrics.jsonl")
    per_iteration = config.truncation * 2 * config.slots_per_family * len(config.families)
    report.plot_curves(runs, folder / "curves.png")
    evaluation = out / "evaluation.md"
    report.write_model_card(
        folder, repo_id, report.current_command(),
        report.budget_lines(runs, [per_iteration] * len(runs)),
        evaluation.read_text() if evaluation.exists() else "", config.rule,
    )
    report.push_folder(folder, repo_id)


if __name__ == "__main__":
    main()
