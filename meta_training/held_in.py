"""Cheap held-in checks of a meta-model, used to pick checkpoints during meta-training
(``docs/meta-training.md`` §7.4), and the rule that picks them.

Checks (each trains with the rule's real optimizer, :class:`celo_hf.Celo` or :class:`celo_hf.Celo2`
(:meth:`meta_training.rules.Rule.optimizer`), no reparameterisation; a loss is the average
training loss over the last 20 steps, mean over seeds; lower is better):

* ``held_in_loss``: the 64 -> 32 -> 10 MLP on scikit-learn's digits, 3 seeds x 300 steps;
* ``finetune_loss``: the LM pretrained on the comedies (:func:`meta_training.tasks.pretrained_lm`)
  fine-tuned, every tensor, on Shakespeare's romances (a genre no family trains on), 2 seeds x 200
  steps (the MLP fine-tuned on held-out digits 5-9 fits its 180 examples to a loss of 1e-6 whatever
  the meta-model, so it would not rank them);
* ``lm_loss``: the ``lm_d16_l1_t16`` transformer from scratch on the romances, 2 seeds x 200 steps;
* ``classify_loss``: that pretrained LM's body with a fresh head fine-tuned, every tensor, to tell
  which of the five problem plays a window comes from (:func:`meta_training.tasks.play_classifier_family`;
  the ``ft_cls_*`` families tell the Roman plays apart), 3 seeds x 300 steps;
* ``zero_gradient_drift``: :func:`celo_hf.diagnostics.zero_gradient_drift` on the pretrained MLP's
  and the pretrained LM's tensors (the larger of the two). Celo only: Celo2's step is
  RMS-normalised, so a zero gradient moves every tensor by ``lr`` by design
  (:attr:`meta_training.rules.Rule.zero_gradient_fixed_point`).

Suites (``SUITES``) and their selection rule (:func:`scored`, :func:`is_best`):

* ``"digits"``: ``held_in_loss`` alone; score = ``held_in_loss``.
* ``"trainer"``: all four (Celo2: the three losses). A meta-model is eligible only if
  ``zero_gradient_drift <= 1e-4`` (Celo2: always); its score is the mean over the three losses of ``loss / (the same loss of the run's first check)``
  (the warm start: score 1.0); ``best/`` keeps the eligible meta-model with the lowest score.
* ``"lm"``: the same four checks, for runs aimed at the language models: the score is the mean of
  the ``finetune_loss`` and ``lm_loss`` ratios alone, and the digits loss is a guard (eligible only
  if also ``held_in_loss <= 1.1 x`` the first check's). On the ``"trainer"`` score the digits ratio,
  which moves by tens of percent, drowns the LM ratios, which move by about 1%.
* ``"classify"``: the four checks and ``classify_loss``, for runs aimed at fine-tuning a pretrained
  transformer with a fresh head: the score is the ``classify_loss`` ratio alone; eligible only if
  also ``held_in_loss <= 1.1 x``, ``finetune_loss <= 1.02 x`` and ``lm_loss <= 1.02 x`` the first
  check's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from celo_hf import CeloNet
from celo_hf.diagnostics import zero_gradient_drift

from . import finetune, inner, tasks
from .rules import RULES, Rule

SUITES = ("digits", "trainer", "lm", "classify")
#: Eligibility bound of the ``trainer`` and ``lm`` suites: relative change per step under zero gradients.
MAX_DRIFT = 1e-4
LOSS_CHECKS = ("held_in_loss", "finetune_loss", "lm_loss")
#: The losses each multi-check suite scores (mean of ratios to the run's first check).
SCORED_CHECKS = {"trainer": LOSS_CHECKS, "lm": ("finetune_loss", "lm_loss"), "classify": ("classify_loss",)}
#: Each suite's guards: check -> the largest eligible ratio to the run's first check.
GUARDS = {"trainer": {}, "lm": {"held_in_loss": 1.1},
          "classify": {"held_in_loss": 1.1, "finetune_loss": 1.02, "lm_loss": 1.02}}
HELD_IN_TEXT = "romances"
HELD_IN_LM = "lm_d16_l1_t16"
#: The genre whose plays ``classify_loss`` tells apart.
HELD_IN_PLAYS = "problems"
TAIL = 20


def final_loss(net: nn.Module, family: tasks.TaskFamily, seeds: int, steps: int, rule: Rule = RULES["celo"]) -> float:
    """Mean over seeds of the average training loss of ``family``'s model over the last
    :data:`TAIL` steps of ``steps`` steps of ``rule``'s optimizer (initialisation, task and
    batches from one generator per seed)."""
    finals = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        init = family.model.init(generator)
        params = rule.parameters(init)
        ones = {name: torch.ones(1, *value.shape) for name, value in init.items()}
        task = family.sample_task(generator)
        optimizer = rule.optimizer(net, params, steps, fresh=finetune.newly_initialised(family.model))
        tail = []
        for step in range(steps):
            batch = tuple(t[None] for t in family.sample_batch(task, generator, family.batch_size))
            loss = inner.model_losses(family.model, rule.inner_weights(params), ones, batch)[0]
            optimizer.zero_grad()
            loss.backward()
            rule.step(optimizer, loss)
            if step >= steps - TAIL:
                tail.append(loss.item())
        finals.append(sum(tail) / len(tail))
    return sum(finals) / len(finals)


def held_in_loss(net: nn.Module, seeds: int = 3, steps: int = 300, rule: Rule = RULES["celo"]) -> float:
    """The MLP on digits (the 80% training split)."""
    return final_loss(net, tasks.digits_family(), seeds, steps, rule)


def finetune_loss(net: nn.Module, seeds: int = 2, steps: int = 200, rule: Rule = RULES["celo"]) -> float:
    """The comedies LM fine-tuned on the romances."""
    model = finetune.FullFineTune(tasks.lm_model(tasks.FINETUNE_LM), tasks.pretrained_lm())
    family = tasks.text_family("held_in_finetune", model, HELD_IN_TEXT, tasks.FINETUNE_LM)
    return final_loss(net, family, seeds, steps, rule)


def lm_loss(net: nn.Module, seeds: int = 2, steps: int = 200, rule: Rule = RULES["celo"]) -> float:
    """A tiny transformer from scratch on the romances."""
    family = tasks.text_family("held_in_lm", tasks.lm_model(HELD_IN_LM), HELD_IN_TEXT, HELD_IN_LM)
    return final_loss(net, family, seeds, steps, rule)


def classify_loss(net: nn.Module, seeds: int = 3, steps: int = 300, rule: Rule = RULES["celo"]) -> float:
    """The comedies LM's body with a fresh head fine-tuned to tell the problem plays apart."""
    family = tasks.play_classifier_family("held_in_classify", HELD_IN_PLAYS, lora=False)
    return final_loss(net, family, seeds, steps, rule)


def drift(net: CeloNet) -> float:
    """The larger zero-gradient drift on the pretrained MLP's and the pretrained LM's tensors."""
    return max(zero_gradient_drift(list(w.values()), net) for w in (tasks.pretrained_digits_mlp(), tasks.pretrained_lm()))


#: The loss checks each suite runs (every suite but ``digits`` adds the drift, for rules with a
#: zero-gradient fixed point).
SUITE_LOSSES = {"digits": ("held_in_loss",), "trainer": LOSS_CHECKS, "lm": LOSS_CHECKS,
                "classify": (*LOSS_CHECKS, "classify_loss")}


def run_checks(net: nn.Module, suite: str, rule: Rule = RULES["celo"]) -> dict[str, float]:
    """The checks of ``suite`` (one of :data:`SUITES`) with ``rule``'s optimizer: ``name -> value``."""
    if suite not in SUITES:
        raise ValueError(f"unknown held-in suite {suite!r}; expected one of {SUITES}")
    checks = {"held_in_loss": held_in_loss, "finetune_loss": finetune_loss, "lm_loss": lm_loss, "classify_loss": classify_loss}
    losses = {name: checks[name](net, rule=rule) for name in SUITE_LOSSES[suite]}
    drifts = suite != "digits" and rule.zero_gradient_fixed_point
    return losses | ({"zero_gradient_drift": drift(net)} if drifts else {})


def scored(record: Mapping[str, Any], previous: Sequence[Mapping[str, Any]], suite: str = "trainer") -> dict[str, Any]:
    """``record`` (one :func:`run_checks` result of ``suite``) with ``held_in_score`` and
    ``held_in_eligible`` added; ``previous``: the run's earlier records, oldest first (the first is
    the reference)."""
    if not all(key in record for key in LOSS_CHECKS):
        return {**record, "held_in_score": record["held_in_loss"], "held_in_eligible": True}
    reference = previous[0] if previous else record
    ratios = [record[key] / reference[key] for key in SCORED_CHECKS[suite]]
    eligible = record.get("zero_gradient_drift", 0.0) <= MAX_DRIFT and all(
        record[check] <= bound * reference[check] for check, bound in GUARDS[suite].items())
    return {**record, "held_in_score": sum(ratios) / len(ratios), "held_in_eligible": eligible}


def is_best(record: Mapping[str, Any], previous: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a :func:`scored` record beats every earlier eligible one (records from before scores
    existed count by ``held_in_loss``)."""
    if not record["held_in_eligible"]:
        return False
    earlier = [r.get("held_in_score", r["held_in_loss"]) for r in previous if r.get("held_in_eligible", True)]
    return not earlier or record["held_in_score"] < min(earlier)
