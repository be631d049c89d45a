#!/usr/bin/env bash
# Meta-training aimed at language models trained from scratch, from the embedded default (its
# model-start gain and param-scale floor kept), on ONE CPU core, in two stages that each start from
# the embedded default:
#
#   1. phase 2 (the learned scheduler; 600 iterations, about 2-4 s each): the update MLP
#      (zero-gradient-calibrated) is frozen, so every member keeps zero drift;
#   2. phase 1 (the update MLP; 400 iterations): the scheduler applied and frozen, every member and
#      every new theta projected back onto "update exactly 0 at zero gradient".
#
#   * Families (one slot each): the four MLP image families; MLP fine-tuning from digits 0-4 to 5-9
#     (every tensor, fresh head, rank-4 adapters); tiny causal transformers from scratch on the
#     histories (d16 1 layer T16 tied, d16 2 layers T32 untied, d32 1 layer T32 tied); the d32 LM
#     pretrained on the comedies fine-tuned on the tragedies (every tensor, rank-4 adapters).
#   * PES: truncations of 25 steps, trajectories of 50-1000 steps (the Trainer LMs run 400-1000).
#
# Held-in checks and selection, fixed before the run (meta_training/held_in.py, suite "lm"), every 50
# iterations and at the start: the digits MLP, the comedies LM fine-tuned on the romances, a d16 LM from
# scratch on the romances, the zero-gradient drift. Eligible: drift <= 1e-4 and the digits loss at most
# 1.1x the start's; score: the mean of the fine-tune and LM losses over the start's; best/ keeps the
# lowest. What then becomes the embedded default: meta_training/runs/lm_schedule/RULE.md.
#
# Rerunning the same command resumes from the last checkpoint and ends where an uninterrupted run would.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-meta_training/runs/lm_schedule}
source meta_training/trainer_families.sh
python -m meta_training.train --phase 2 --iterations 600 "${shared[@]}" --max_unroll 1000 \
    --init celo_hf/default_weights --held_in_suite lm \
    --out "$out/phase2"
python -m meta_training.train --phase 1 --iterations 400 "${shared[@]}" --max_unroll 1000 \
    --init celo_hf/default_weights --apply_schedule --zero_gradient_calibrated --held_in_suite lm \
    --out "$out/phase1"
