#!/usr/bin/env bash
# The CPU meta-training recipe that produced celo_hf's embedded default weights
# (docs/meta-training.md §7.4), in three stages:
#   1. phase 1 trains the update MLP from the Adam-like warm start, under a constant schedule;
#   2. phase 1 again, from stage 1's best MLP, now under a learned scheduler set to decay the step
#      linearly over training (frozen here), so the MLP adapts to a decaying step;
#   3. phase 2 trains that scheduler (and its initial state) with the MLP frozen.
# The embedded default is stage 3's best/ (lowest held-in loss), copied to celo_hf/default_weights/.
# Rerunning the same command resumes a stage that was interrupted, from its last checkpoint, and
# ends where an uninterrupted run would; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-meta_training/runs/cpu}
python -m meta_training.train --phase 1 --iterations 2000 --warm_start_gain 10 --out "$out/phase1"
python -m meta_training.train --phase 1 --iterations 2000 --decaying_schedule --held_in_every 100 \
    --init "$out/phase1/best" --out "$out/phase1_decay"
python -m meta_training.train --phase 2 --iterations 1000 --held_in_every 100 \
    --init "$out/phase1_decay/best" --out "$out/phase2_decay"
