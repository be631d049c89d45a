"""Score candidate settings of the embedded default on the held-in checks and apply a fixed rule.

    python -m meta_training.select_gain --round tensor --out meta_training/results/gain_selection
    python -m meta_training.select_gain --round model_start --out meta_training/results/gain_selection_model_start
    python -m meta_training.select_gain --round model_start_power --out meta_training/results/gain_selection_model_start_power
    python -m meta_training.select_gain --round param_scale_floor --out meta_training/results/param_scale_floor_selection
    python -m meta_training.select_gain --round model_start_dropout --out meta_training/results/gain_selection_dropout
    python -m meta_training.select_gain --round lm_schedule --out meta_training/results/lm_schedule_adoption
    python -m meta_training.select_gain --round classify --out meta_training/results/classify_adoption
    python -m meta_training.select_gain --round classify_focus --out meta_training/results/classify_focus_adoption
    python -m meta_training.select_gain --round classify_wide --out meta_training/results/classify_wide_adoption
    python -m meta_training.select_gain --round fresh_head --out meta_training/results/fresh_head_adoption
    python -m meta_training.select_gain --round fresh_gain --out meta_training/results/fresh_gain_selection
    python -m meta_training.select_gain --round fresh_tensor_gain --out meta_training/results/fresh_tensor_gain_selection

Each round's rule and candidates (:data:`ROUNDS`) are in its folder's ``RULE.md``, written before
any of its scores was seen. The gain rounds put a ``gain_signal`` and candidate ``(gain_threshold,
gain_power)`` pairs on the CPU run's weights calibrated for zero drift (``model_start_dropout``: on
the embedded default); the ``param_scale_floor`` round puts candidate floors on the embedded
default. A candidate is eligible if every from-scratch held-in loss of the round (digits; and a d16
LM from the ``model_start`` rounds on) is at most 1.1x the base's and, in the floor round, the
MiniLM-L6 full fine-tune scores at most 1.02x the base's; the pick is the eligible candidate with
the lowest score on the round's fine-tune (MiniLM-L6, comedy vs tragedy, 100 steps of 16, mean
training loss of the last 10 steps; every tensor, or, in the floor round, LoRA adapters, or, in
``model_start_dropout``, every tensor with dropout on), if it beats the base's. The ``lm_schedule`` round
scores other trained weights (``meta_training/runs/lm_schedule/phase1/best``) against the embedded
default on the MiniLM-L6 fine-tunes alone: its candidate is adopted if both are within 1.02x
(``meta_training/runs/lm_schedule/RULE.md``). The ``classify`` round scores
``meta_training/runs/classify/phase1/best`` against the embedded default: eligible with the
from-scratch losses within 1.1x and the LoRA fine-tune within 1.02x, adopted if its every-tensor
fine-tune with dropout on, over three seeds, is lower (``meta_training/runs/classify/RULE.md``);
``classify_focus`` and ``classify_wide`` do the same for its stages 2 and 3 (``.../focus/best``,
``.../wide/best``; trained weights may differ from the base in ``mlp_hidden_size``). The
``fresh_head`` round keeps the embedded default's weights and scores building Celo as
:func:`celo_hf.create` does, the fine-tune's newly initialised head marked fresh (no gain): the
LoRA fine-tune within 1.02x, adopted if the dropout-on fine-tune over three seeds not scored
before (3-5) is lower (``meta_training/results/fresh_head_adoption/RULE.md``); ``fresh_gain``
then puts thresholds on the embedded default with every fine-tune built that way
(``meta_training/results/fresh_gain_selection/RULE.md``); ``fresh_tensor_gain`` puts candidate
``fresh_gain`` values (the fresh head's steps while the body is slowed) on it, picked by the
dropout-on fine-tune over seeds 6-8 (``meta_training/results/fresh_tensor_gain_selection/RULE.md``);
``body_gain`` puts smaller gains (larger thresholds) on that default, the head still fresh, picked by
the dropout-on fine-tune over seeds 9-11 (``meta_training/results/body_gain_selection/RULE.md``). Writes
``scores.json``, ``scores.md`` and
the chosen weights, if any, to ``<out>/chosen``. ``--from_scores`` re-applies the rule to a written
``scores.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from celo_hf import CeloNet, load_celo_net
from celo_hf.diagnostics import calibrate_zero_gradient_, zero_gradient_drift

from .finetune_probe import (
    FINAL_SEEDS,
    LATER_SEEDS,
    dropout_finetune_score,
    finetune_score,
    lora_finetune_score,
    seeded_dropout_finetune_score,
    unseen_seeds_dropout_finetune_score,
)
from .held_in import held_in_loss, lm_loss

FROM_SCRATCH_TOLERANCE = 1.1
REPO = Path(__file__).resolve().parents[1]
#: The CPU meta-training run's pick: the gain rounds' base, calibrated (the embedded default before them).
CPU_RUN_BEST = REPO / "meta_training" / "runs" / "cpu" / "phase2_decay" / "best"
#: Settings that are part of trained weights, not put on them: a :attr:`Round.weights` candidate may differ in them.
ARCHITECTURE = ("mlp_hidden_size",)
#: A ``kept`` fine-tuning check may be at most this much worse than the base's.
KEPT_TOLERANCE = 1.02


@dataclass(frozen=True)
class Round:
    """One selection round: candidate settings of :class:`celo_hf.CeloNet` put on the base weights
    (``"none"``, the base as it is, is always scored too), the from-scratch held-in checks, the
    fine-tuning checks that must stay within :data:`KEPT_TOLERANCE` of the base's (``kept``), and
    the fine-tuning check the pick minimises (``pick_by``). ``base``: ``"calibrated"``, the CPU
    run's weights (:data:`CPU_RUN_BEST`) calibrated for zero drift, no gain (the gain rounds);
    ``"embedded"``, the embedded default as it is now; else a folder of weights (relative to the
    repository): the embedded default as the round found it, so that it scores the same base later."""

    candidates: dict[str, dict[str, Any]]
    from_scratch: tuple[str, ...]
    #: ``None``: no check to beat; the first eligible candidate is picked.
    pick_by: str | None = "finetune"
    kept: tuple[str, ...] = ()
    base: str = "calibrated"
    #: What a candidate's key names, for the table's first column.
    varies: str = "gain_threshold"
    #: Candidates that are other trained weights: key -> their folder (relative to the repository),
    #: whose settings must be the base's (their :data:`ARCHITECTURE` may differ).
    weights: dict[str, str] = field(default_factory=dict)
    #: Candidates whose fine-tunes build Celo as :func:`celo_hf.create` does, the tensors
    #: ``from_pretrained`` initialised marked fresh (:mod:`celo_hf.fresh_tensors`); the others
    #: (and ``"none"``) put every trainable tensor in one unmarked group.
    fresh_marked: tuple[str, ...] = ()

    def keyed(self) -> dict[str, dict[str, Any]]:
        """Score keys -> the settings put on the base: ``"none"`` first."""
        none = {"gain_threshold": None} if self.base == "calibrated" else {}
        return {"none": none, **self.candidates}

    def checks(self) -> tuple[str, ...]:
        """Every held-in check the round scores, besides the drift."""
        return (*self.from_scratch, *self.kept, *([self.pick_by] if self.pick_by else []))

    def candidate_net(self, base: CeloNet, key: str) -> CeloNet:
        """The meta-model a key stands for: trained weights from :attr:`weights`, or the base with
        the key's settings."""
        if key not in self.weights:
            return configured_net(base, **self.keyed()[key])
        net = load_celo_net(REPO / self.weights[key])
        if settings_of(net) != settings_of(base):
            raise ValueError(f"candidate {key!r} ({self.weights[key]}) has settings {net._hub_mixin_config}, "
                             f"expected the base's {base._hub_mixin_config}")
        return net


def settings_of(net: CeloNet) -> dict[str, Any]:
    """``net``'s settings (``CeloNet``'s arguments) apart from its :data:`ARCHITECTURE`."""
    return {k: v for k, v in net._hub_mixin_config.items() if k not in ARCHITECTURE}


def gain_round(signal: str, pairs: tuple[tuple[float, float], ...], from_scratch: tuple[str, ...], **rule: Any) -> Round:
    """A round of ``(gain_threshold, gain_power)`` pairs of ``signal``, keyed ``"0.01"`` (power 1) or
    ``"0.01^1.5"``; ``rule``: the other :class:`Round` fields."""
    keys = {(f"{threshold:g}" if power == 1 else f"{threshold:g}^{power:g}"):
            {"gain_threshold": threshold, "gain_power": power, "gain_signal": signal} for threshold, power in pairs}
    return Round(keys, from_scratch, varies=f"gain_threshold ({signal})", **rule)


#: The embedded defaults the later rounds were scored against, in turn: the CPU run calibrated with
#: the model-start gain; that with the param-scale floor; the LM-aimed run's pick (from 067dd03
#: until round ``fresh_tensor_gain`` gave it a ``fresh_gain``).
GAIN_PICK = "meta_training/results/gain_selection_model_start_power/chosen"
FLOOR_PICK = "meta_training/results/param_scale_floor_selection/chosen"
LM_RUN_PICK = "meta_training/runs/lm_schedule/phase1/best"
#: The embedded default since round ``fresh_tensor_gain`` (``LM_RUN_PICK`` with ``fresh_gain=3``).
FRESH_GAIN_PICK = "meta_training/results/fresh_tensor_gain_selection/chosen"
ROUNDS = {
    "tensor": gain_round("tensor", ((0.01, 1.0), (0.03, 1.0), (0.1, 1.0)), ("digits",)),
    "model_start": gain_round("model_start", ((0.003, 1.0), (0.01, 1.0), (0.03, 1.0)), ("digits", "lm")),
    "model_start_power": gain_round("model_start", ((0.01, 1.5), (0.01, 2.0), (0.005, 2.0)), ("digits", "lm")),
    "param_scale_floor": Round({f"{c:g}": {"param_scale_floor": c} for c in (0.03, 0.1, 0.3)}, ("digits", "lm"),
                               pick_by="finetune_lora", kept=("finetune",), base=GAIN_PICK, varies="param_scale_floor"),
    "model_start_dropout": gain_round("model_start", ((0.0035, 2.0), (0.007, 2.0), (0.01, 2.0)), ("digits", "lm"),
                                      pick_by="finetune_dropout", base=FLOOR_PICK),
    "lm_schedule": Round({"phase1/best": {}}, (), pick_by=None, kept=("finetune", "finetune_lora"), base=FLOOR_PICK,
                         varies="lm_schedule run", weights={"phase1/best": "meta_training/runs/lm_schedule/phase1/best"}),
    "classify": Round({"phase1/best": {}}, ("digits", "lm"), pick_by="finetune_dropout_seeds", kept=("finetune_lora",),
                      base=LM_RUN_PICK, varies="classify run", weights={"phase1/best": "meta_training/runs/classify/phase1/best"}),
}
ROUNDS["classify_focus"] = replace(ROUNDS["classify"], candidates={"focus/best": {}}, varies="classify run, stage 2",
                                   weights={"focus/best": "meta_training/runs/classify/focus/best"})
ROUNDS["classify_wide"] = replace(ROUNDS["classify"], candidates={"wide/best": {}}, varies="classify run, stage 3",
                                  weights={"wide/best": "meta_training/runs/classify/wide/best"})
ROUNDS["fresh_head"] = Round({"fresh_head": {}}, (), pick_by="finetune_dropout_unseen", kept=("finetune_lora",),
                             base=LM_RUN_PICK, varies="fresh tensors", fresh_marked=("fresh_head",))
ROUNDS["fresh_gain"] = gain_round("model_start", ((0.0035, 2.0), (0.007, 2.0)), ("digits", "lm"),
                                  pick_by="finetune_dropout_unseen", base=LM_RUN_PICK,
                                  fresh_marked=("none", "0.0035^2", "0.007^2"))
ROUNDS["fresh_tensor_gain"] = Round({f"{k:g}": {"fresh_gain": k} for k in (2.0, 3.0)}, (),
                                    pick_by="finetune_dropout_later", base=LM_RUN_PICK, varies="fresh_gain",
                                    fresh_marked=("none", "2", "3"))
ROUNDS["body_gain"] = gain_round("model_start", ((0.0071, 2.0), (0.01, 2.0)), ("digits", "lm"),
                                 pick_by="finetune_dropout_final", base=FRESH_GAIN_PICK,
                                 fresh_marked=("none", "0.0071^2", "0.01^2"))
#: The checks that fine-tune a pretrained model (they take ``mark_fresh``).
FINETUNE_CHECKS = ("finetune", "finetune_lora", "finetune_dropout", "finetune_dropout_seeds", "finetune_dropout_unseen",
                   "finetune_dropout_later", "finetune_dropout_final")


def configured_net(base: CeloNet, **settings: Any) -> CeloNet:
    """``base``'s weights with some of its settings (``gain_threshold``, ``param_scale_floor``, ...) replaced."""
    net = CeloNet(**{**base._hub_mixin_config, **settings})
    net.load_state_dict(base.state_dict())
    return net


def _limits(scores: dict[str, dict[str, float]], selection: Round) -> dict[str, float]:
    """Each guarded check's largest eligible score: from scratch 1.1x, kept fine-tunes ``KEPT_TOLERANCE`` x the base's."""
    base = scores["none"]
    limits = {check: FROM_SCRATCH_TOLERANCE * base[check] for check in selection.from_scratch if check in base}
    return limits | {check: KEPT_TOLERANCE * base[check] for check in selection.kept}


def choose(scores: dict[str, dict[str, float]], selection: Round = ROUNDS["model_start"]) -> str | None:
    """The rule: among candidates whose guarded checks (from-scratch losses scored: ``digits``,
    ``lm``; the round's ``kept`` fine-tunes) are within their limits of the base's (key ``"none"``),
    the lowest ``pick_by`` score if it is below the base's (no ``pick_by``: the first); ``None`` otherwise."""
    limits = _limits(scores, selection)
    pick = selection.pick_by
    eligible = {name: s for name, s in scores.items()
                if name != "none" and all(s[check] <= limit for check, limit in limits.items())}
    if pick is None:
        return next(iter(eligible), None)
    best = min(eligible, key=lambda name: eligible[name][pick]) if eligible else None
    return best if best is not None and eligible[best][pick] < scores["none"][pick] else None


def report(scores: dict[str, dict[str, float]], base: CeloNet, out: Path, selection: Round = ROUNDS["tensor"]) -> str:
    """Apply the rule; write ``scores.md`` (and ``chosen/`` if a candidate wins); return the table."""
    chosen = choose(scores, selection)
    limits = _limits(scores, selection)
    names = {"digits": "digits held-in loss", "lm": "LM held-in loss", "finetune": "fine-tune score",
             "finetune_lora": "LoRA fine-tune score", "finetune_dropout": "fine-tune score, dropout on",
             "finetune_dropout_seeds": "fine-tune score, dropout on, 3 seeds",
             "finetune_dropout_unseen": "fine-tune score, dropout on, seeds 3-5",
             "finetune_dropout_later": "fine-tune score, dropout on, seeds 6-8",
             "finetune_dropout_final": "fine-tune score, dropout on, seeds 9-11"}
    shown = [check for check in selection.checks() if check in limits or check == selection.pick_by]
    rows = [f"| {selection.varies} | " + " | ".join(names[c] for c in shown) + " | zero-gradient drift | eligible |",
            "|---|" + "---:|" * (len(shown) + 1) + "---|"]
    for name, s in scores.items():
        over = [f"{check} > {limit:.4f}" for check, limit in limits.items() if s[check] > limit]
        eligible = "base" if name == "none" else (f"no ({', '.join(over)})" if over else "yes")
        mark = " (chosen)" if name == chosen else ""
        values = " | ".join(f"{s[check]:.4f}" for check in shown)
        rows.append(f"| {name}{mark} | {values} | {s['drift']:.1e} | {eligible} |")
    verdict = f"chosen: {selection.varies}={chosen}" if chosen else "no candidate is eligible and better: none is chosen"
    table = "\n".join(rows) + f"\n\n{verdict}\n"
    (out / "scores.md").write_text(table)
    if chosen is not None and (selection.keyed()[chosen] or chosen in selection.weights):  # else: the base's own
        selection.candidate_net(base, chosen).save_pretrained(out / "chosen")
    return table


def base_net(selection: Round) -> CeloNet:
    """The weights a round's settings are put on (:attr:`Round.base`)."""
    if selection.base == "calibrated":
        return calibrate_zero_gradient_(load_celo_net(CPU_RUN_BEST))
    return load_celo_net(None if selection.base == "embedded" else REPO / selection.base)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--round", choices=sorted(ROUNDS), default="tensor", help="the selection round (default tensor)")
    parser.add_argument("--from_scores", action="store_true", help="re-apply the rule to <out>/scores.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    selection = ROUNDS[args.round]
    base = base_net(selection)
    if args.from_scores:
        print(report(json.loads((args.out / "scores.json").read_text()), base, args.out, selection))
        return
    drift_tensors = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.full((32,), 0.1)]
    checks = {"digits": held_in_loss, "lm": lm_loss, "finetune": finetune_score, "finetune_lora": lora_finetune_score,
              "finetune_dropout": dropout_finetune_score, "finetune_dropout_seeds": seeded_dropout_finetune_score,
              "finetune_dropout_unseen": unseen_seeds_dropout_finetune_score,
              "finetune_dropout_later": functools.partial(seeded_dropout_finetune_score, seeds=LATER_SEEDS),
              "finetune_dropout_final": functools.partial(seeded_dropout_finetune_score, seeds=FINAL_SEEDS)}
    scores: dict[str, dict[str, float]] = {}
    for key in tqdm(selection.keyed(), desc="candidates"):
        net = selection.candidate_net(base, key)
        marked = {"mark_fresh": True} if key in selection.fresh_marked else {}
        scores[key] = {name: checks[name](net, **(marked if name in FINETUNE_CHECKS else {})) for name in selection.checks()}
        scores[key]["drift"] = zero_gradient_drift(drift_tensors, net)
        (args.out / "scores.json").write_text(json.dumps(scores, indent=2))
    print(report(scores, base, args.out, selection))


if __name__ == "__main__":
    main()
