#!/usr/bin/env bash
# The CPU meta-training recipe that produced celo_hf's embedded default weights
# (docs/meta-training.md §7.4): phase 1 trains the update MLP from the Adam-like warm start,
# phase 2 the learned scheduler with the MLP frozen, starting from a neutral schedule (lr_mult = 1). Rerunning the same command resumes a run
# that was interrupted, from its last checkpoint, and ends where an uninterrupted run would.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-meta_training/runs/cpu}
python -m meta_training.train --phase 1 --iterations 2000 --warm_start_gain 10 --out "$out/phase1"
python -m meta_training.train --phase 2 --iterations 500 --neutral_schedule --init "$out/phase1/best" --out "$out/phase2"
