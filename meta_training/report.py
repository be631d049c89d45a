"""Curves, model cards and Hub uploads for meta-training runs."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from huggingface_hub import HfApi

CARD_TEMPLATE = """---
library_name: celo_hf
tags:
- learned-optimizer
- {tag}
---
# {name} meta-model trained with celo_hf

Learned optimizer weights for celo_hf, a PyTorch port of {paper}; original JAX code: https://github.com/amoudgl/celo), meta-trained with truncated
PES by celo_hf's `meta_training/` (see its `docs/meta-training.md`).

```python
import celo_hf
optimizer = {usage}
```

## Training command

```
{command}
```

## Budget

{budget}

## Curves

![meta-training curves](curves.png)

{evaluation}
"""


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """``(outer-step records, held-in records)`` of a ``metrics.jsonl``."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "meta_loss" in r], [r for r in records if "held_in_loss" in r]


def held_in_score(record: dict) -> float:
    """The value that picks ``best/`` (``meta_training.held_in.scored``; older runs: the digits loss)."""
    return record.get("held_in_score", record["held_in_loss"])


def plot_curves(metrics_paths: list[Path], png: Path) -> None:
    """Meta-loss (smoothed over 25 iterations) and held-in score against outer iteration, one
    colour per run (labelled by its folder and phase), consecutive runs laid end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    offset = 0
    for index, path in enumerate(metrics_paths):
        steps, held_in = read_metrics(path)
        if not steps:
            continue
        color, label = f"C{index}", f"{path.parent.name} (phase {steps[0]['phase']})"
        x = [offset + r["iteration"] for r in steps]
        y = [r["meta_loss"] for r in steps]
        window = 25
        smooth = [sum(y[max(0, i - window + 1): i + 1]) / len(y[max(0, i - window + 1): i + 1]) for i in range(len(y))]
        top.plot(x, y, alpha=0.25, color=color)
        top.plot(x, smooth, color=color, label=label)
        bottom.plot([offset + r["iteration"] for r in held_in], [held_in_score(r) for r in held_in],
                    "o-", color=color, label=label)
        offset = x[-1]
    top.set_ylabel("PES meta-loss (mean over truncation)")
    bottom.set_ylabel("held-in score (lower is better)")
    bottom.set_yscale("log")
    bottom.set_xlabel("outer iteration")
    top.legend()
    bottom.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def budget_lines(metrics_paths: list[Path], inner_steps_per_iteration: list[int]) -> str:
    """A markdown list: outer iterations, inner task-steps and wall-clock time per phase."""
    lines = []
    for path, per_iteration in zip(metrics_paths, inner_steps_per_iteration):
        steps, held_in = read_metrics(path)
        if not steps:
            continue
        last = steps[-1]
        eligible = [r for r in held_in if r.get("held_in_eligible", True)]
        best = min(eligible, key=held_in_score) if eligible else None
        lines.append(
            f"- phase {last['phase']}: {last['iteration']} outer iterations, "
            f"{last['iteration'] * per_iteration:,} inner task-steps, {last['seconds'] / 60:.0f} min"
            + (f"; best held-in score {held_in_score(best):.4f} at iteration {best['iteration']}" if best else "")
        )
    return "\n".join(lines)


#: Per update rule (``meta_training.rules.RULES``'s keys): the card's name, paper and usage line.
CARD_RULES = {
    "celo": ("Celo", "Celo (Moudgil et al., TMLR 2025,\narXiv 2501.12670",
             'celo_hf.Celo(model.parameters(), total_steps=1000, weights="{repo_id}")'),
    "celo2": ("Celo2", "Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026,\narXiv 2602.19142",
              'celo_hf.Celo2(model.named_parameters(), lr=1e-3, weights="{repo_id}")'),
}


def write_model_card(folder: Path, repo_id: str, command: str, budget: str, evaluation: str, rule: str = "celo") -> None:
    """``folder/README.md``: the card of a meta-model of ``rule`` (a key of :data:`CARD_RULES`)."""
    name, paper, usage = CARD_RULES[rule]
    (folder / "README.md").write_text(CARD_TEMPLATE.format(
        tag=name.lower(), name=name, paper=paper, usage=usage.format(repo_id=repo_id),
        command=command, budget=budget, evaluation=evaluation,
    ))


def push_folder(folder: Path, repo_id: str, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="celo_hf meta-training"))


def current_command() -> str:
    """The command line of this process, as typed."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "meta_training.train", *sys.argv[1:]])
