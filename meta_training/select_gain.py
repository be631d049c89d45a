"""Score the gradient-scale gain's candidates on the held-in checks and apply the fixed rule.

    python -m meta_training.select_gain --out meta_training/results/gain_selection

The rule and the candidates are in ``meta_training/results/gain_selection/RULE.md`` (written before
any score was seen): calibrated embedded weights, ``gain_threshold`` in {0.01, 0.03, 0.1}; eligible
if the digits held-in loss is at most 1.1x the calibrated base's; pick the lowest score on a MiniLM-L6
fine-tune (comedy vs tragedy, 100 steps of 16, mean training loss of the last 10 steps). Writes
``scores.json``, ``scores.md`` and the chosen weights, if any candidate is eligible, to ``<out>/chosen``.
``--from_scores`` re-applies the rule to a written ``scores.json`` without scoring again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from celo_hf import CeloNet, load_celo_net
from celo_hf.diagnostics import calibrate_zero_gradient_, zero_gradient_drift

from .finetune_probe import finetune_score
from .held_in import held_in_loss

CANDIDATES = (None, 0.01, 0.03, 0.1)
DIGITS_TOLERANCE = 1.1


def gain_net(base: CeloNet, threshold: float | None, power: float = 1.0) -> CeloNet:
    """``base``'s weights with the gradient-scale gain set to ``threshold`` / ``power``."""
    net = CeloNet(**{**base._hub_mixin_config, "gain_threshold": threshold, "gain_power": power})
    net.load_state_dict(base.state_dict())
    return net


def choose(scores: dict[str, dict[str, float]]) -> str | None:
    """The rule: among candidates whose digits loss is within ``DIGITS_TOLERANCE`` of the base's
    (key ``"none"``), the lowest fine-tuning score; ``None`` if no candidate is eligible."""
    limit = DIGITS_TOLERANCE * scores["none"]["digits"]
    eligible = {name: s for name, s in scores.items() if name != "none" and s["digits"] <= limit}
    return min(eligible, key=lambda name: eligible[name]["finetune"]) if eligible else None


def report(scores: dict[str, dict[str, float]], base: CeloNet, out: Path) -> str:
    """Apply the rule; write ``scores.md`` (and ``chosen/`` if a candidate wins); return the table."""
    chosen = choose(scores)
    limit = DIGITS_TOLERANCE * scores["none"]["digits"]
    rows = ["| gain_threshold | digits held-in loss | fine-tune score | zero-gradient drift | eligible |",
            "|---|---:|---:|---:|---|"]
    for name, s in scores.items():
        eligible = "base" if name == "none" else ("yes" if s["digits"] <= limit else f"no (> {limit:.4f})")
        mark = " (chosen)" if name == chosen else ""
        rows.append(f"| {name}{mark} | {s['digits']:.4f} | {s['finetune']:.4f} | {s['drift']:.1e} | {eligible} |")
    verdict = f"chosen: gain_threshold={chosen}" if chosen else "no candidate is eligible: no gain is chosen"
    table = "\n".join(rows) + f"\n\n{verdict}\n"
    (out / "scores.md").write_text(table)
    if chosen is not None:
        gain_net(base, float(chosen)).save_pretrained(out / "chosen")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from_scores", action="store_true", help="re-apply the rule to <out>/scores.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = calibrate_zero_gradient_(load_celo_net(None))
    if args.from_scores:
        print(report(json.loads((args.out / "scores.json").read_text()), base, args.out))
        return
    drift_tensors = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.full((32,), 0.1)]
    scores: dict[str, dict[str, float]] = {}
    for threshold in tqdm(CANDIDATES, desc="candidates"):
        net = gain_net(base, threshold)
        scores[str(threshold).lower()] = {
            "digits": held_in_loss(net),
            "finetune": finetune_score(net),
            "drift": zero_gradient_drift(drift_tensors, net),
        }
        (args.out / "scores.json").write_text(json.dumps(scores, indent=2))
    print(report(scores, base, args.out))


if __name__ == "__main__":
    main()
