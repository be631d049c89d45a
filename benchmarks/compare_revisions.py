"""Step cost before and after a change: ``step_speed.py`` run alternately on two git revisions.

    python benchmarks/compare_revisions.py --base 752f288 --alternations 3 -- --models plain transformer tiny --sizes 10M

Each alternation runs ``benchmarks/step_speed.py`` (with the arguments after ``--``) once on the
base revision (checked out into a temporary worktree) and once on this working tree, in that
order. Every Celo row's cost is a ratio to AdamW measured in the same run (``x AdamW-foreach``),
so machine noise between runs mostly cancels; the table gives, per model and contender, the median
ratio over the alternations for each revision and their quotient (after / before: above 1 is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_step_speed(tree: Path, args: list[str], out: Path) -> list[dict]:
    """The rows of one ``step_speed.py`` run in ``tree`` (its own ``celo_hf`` on the path)."""
    subprocess.run(
        [sys.executable, "benchmarks/step_speed.py", *args, "--json", str(out)],
        cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)},
    )
    return json.loads(out.read_text())["rows"]


def median_ratios(runs: list[list[dict]]) -> dict[tuple[str, str], float]:
    """``(model, optimizer) -> median over runs of its ratio to AdamW-foreach`` (Celo rows only)."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for rows in runs:
        for row in rows:
            if row["optimizer"].startswith("Celo"):
                ratios.setdefault((row["model"], row["optimizer"]), []).append(row["vs_foreach"])
    return {key: statistics.median(values) for key, values in ratios.items()}


def table(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> str:
    rows = ["| model | contender | x AdamW-foreach before | after | after / before |", "|---|---|---:|---:|---:|"]
    for key in sorted(before.keys() & after.keys()):
        rows.append(f"| {key[0]} | {key[1]} | {before[key]:.2f} | {after[key]:.2f} | {after[key] / before[key]:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, passed = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(ours)
    with tempfile.TemporaryDirectory() as scratch:
        base_tree = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base], cwd=REPO, check=True)
        try:
            runs: dict[str, list[list[dict]]] = {"before": [], "after": []}
            for i in range(args.alternations):
                runs["before"].append(run_step_speed(base_tree, passed, Path(scratch) / f"before{i}.json"))
                runs["after"].append(run_step_speed(REPO, passed, Path(scratch) / f"after{i}.json"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=True)
    result = table(median_ratios(runs["before"]), median_ratios(runs["after"]))
    header = f"Base {args.base}, {args.alternations} alternations, step_speed.py {' '.join(passed)}\n\n"
    if args.out:
        args.out.write_text(header + result + "\n")
    print(header + result)


if __name__ == "__main__":
    main()
