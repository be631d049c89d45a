"""Score the gradient-scale gain's candidates on the held-in checks and apply the fixed rule.

    python -m meta_training.select_gain --round tensor --out meta_training/results/gain_selection
    python -m meta_training.select_gain --round model_start --out meta_training/results/gain_selection_model_start
    python -m meta_training.select_gain --round model_start_power --out meta_training/results/gain_selection_model_start_power

Each round's rule and candidates (:data:`ROUNDS`) are in its folder's ``RULE.md``, written before
any of its scores was seen: calibrated embedded weights with a ``gain_signal`` and candidate
``(gain_threshold, gain_power)`` pairs; eligible if every from-scratch held-in loss of the round
(digits; and a d16 LM for the ``model_start`` rounds) is at most 1.1x the calibrated base's; pick
the lowest score on a MiniLM-L6 fine-tune (comedy vs tragedy, 100 steps of 16, mean training loss
of the last 10 steps), if it beats the base's. Writes ``scores.json``, ``scores.md`` and the chosen
weights, if any, to ``<out>/chosen``. ``--from_scores`` re-applies the rule to a written ``scores.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from celo_hf import CeloNet, load_celo_net
from celo_hf.diagnostics import calibrate_zero_gradient_, zero_gradient_drift

from .finetune_probe import finetune_score
from .held_in import held_in_loss, lm_loss

FROM_SCRATCH_TOLERANCE = 1.1


@dataclass(frozen=True)
class Round:
    """One selection round: the gain's ``signal``, the candidate ``(threshold, power)`` pairs (the
    base, no gain, is always scored too) and the from-scratch held-in checks."""

    signal: str
    candidates: tuple[tuple[float, float], ...]
    from_scratch: tuple[str, ...]

    def keyed(self) -> dict[str, tuple[float | None, float]]:
        """Score keys -> ``(threshold, power)``: ``"none"``, ``"0.01"`` (power 1), ``"0.01^1.5"``."""
        keys: dict[str, tuple[float | None, float]] = {"none": (None, 1.0)}
        for threshold, power in self.candidates:
            keys[f"{threshold:g}" if power == 1 else f"{threshold:g}^{power:g}"] = (threshold, power)
        return keys


ROUNDS = {
    "tensor": Round("tensor", ((0.01, 1.0), (0.03, 1.0), (0.1, 1.0)), ("digits",)),
    "model_start": Round("model_start", ((0.003, 1.0), (0.01, 1.0), (0.03, 1.0)), ("digits", "lm")),
    "model_start_power": Round("model_start", ((0.01, 1.5), (0.01, 2.0), (0.005, 2.0)), ("digits", "lm")),
}


def gain_net(base: CeloNet, threshold: float | None, power: float = 1.0, signal: str = "tensor") -> CeloNet:
    """``base``'s weights with the gradient-scale gain set to ``threshold`` / ``power`` / ``signal``."""
    settings = {"gain_threshold": threshold, "gain_power": power, "gain_signal": signal}
    net = CeloNet(**{**base._hub_mixin_config, **settings})
    net.load_state_dict(base.state_dict())
    return net


def _from_scratch_limits(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    base = scores["none"]
    return {check: FROM_SCRATCH_TOLERANCE * base[check] for check in ("digits", "lm") if check in base}


def choose(scores: dict[str, dict[str, float]]) -> str | None:
    """The rule: among candidates whose from-scratch losses (those scored: ``digits``, ``lm``) are
    within ``FROM_SCRATCH_TOLERANCE`` of the base's (key ``"none"``), the lowest fine-tuning score if
    it is below the base's; ``None`` otherwise."""
    limits = _from_scratch_limits(scores)
    eligible = {name: s for name, s in scores.items()
                if name != "none" and all(s[check] <= limit for check, limit in limits.items())}
    best = min(eligible, key=lambda name: eligible[name]["finetune"]) if eligible else None
    return best if best is not None and eligible[best]["finetune"] < scores["none"]["finetune"] else None


def report(scores: dict[str, dict[str, float]], base: CeloNet, out: Path, selection: Round = ROUNDS["tensor"]) -> str:
    """Apply the rule; write ``scores.md`` (and ``chosen/`` if a candidate wins); return the table."""
    signal = selection.signal
    chosen = choose(scores)
    limits = _from_scratch_limits(scores)
    names = {"digits": "digits held-in loss", "lm": "LM held-in loss"}
    rows = [f"| gain_threshold ({signal}) | " + " | ".join(names[c] for c in limits)
            + " | fine-tune score | zero-gradient drift | eligible |", "|---|" + "---:|" * (len(limits) + 2) + "---|"]
    for name, s in scores.items():
        over = [f"{check} > {limit:.4f}" for check, limit in limits.items() if s[check] > limit]
        eligible = "base" if name == "none" else (f"no ({', '.join(over)})" if over else "yes")
        mark = " (chosen)" if name == chosen else ""
        losses = " | ".join(f"{s[check]:.4f}" for check in limits)
        rows.append(f"| {name}{mark} | {losses} | {s['finetune']:.4f} | {s['drift']:.1e} | {eligible} |")
    verdict = f"chosen: gain_threshold={chosen}" if chosen else "no candidate is eligible and better: no gain is chosen"
    table = "\n".join(rows) + f"\n\n{verdict}\n"
    (out / "scores.md").write_text(table)
    if chosen is not None:
        gain_net(base, *selection.keyed()[chosen], signal=signal).save_pretrained(out / "chosen")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--round", choices=sorted(ROUNDS), default="tensor", help="the selection round (default tensor)")
    parser.add_argument("--from_scores", action="store_true", help="re-apply the rule to <out>/scores.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = calibrate_zero_gradient_(load_celo_net(None))
    if args.from_scores:
        print(report(json.loads((args.out / "scores.json").read_text()), base, args.out, ROUNDS[args.round]))
        return
    selection = ROUNDS[args.round]
    drift_tensors = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.full((32,), 0.1)]
    checks = {"digits": held_in_loss, "lm": lm_loss, "finetune": finetune_score}
    scores: dict[str, dict[str, float]] = {}
    for key, (threshold, power) in tqdm(selection.keyed().items(), desc="candidates"):
        net = gain_net(base, threshold, power, selection.signal)
        wanted = (*selection.from_scratch, "finetune")
        scores[key] = {name: checks[name](net) for name in wanted} | {"drift": zero_gradient_drift(drift_tensors, net)}
        (args.out / "scores.json").write_text(json.dumps(scores, indent=2))
    print(report(scores, base, args.out, selection))


if __name__ == "__main__":
    main()
