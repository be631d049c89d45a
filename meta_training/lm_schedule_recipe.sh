#!/usr/bin/env bash
# Phase 2 (the learned scheduler) again, from the embedded default, aimed at language models trained
# from scratch: the default's update MLP (zero-gradient-calibrated, with the model-start gain and the
# param-scale floor) is frozen, so every member keeps zero drift; only the LSTM scheduler and its
# initial state train. ONE CPU core, about 2-4 s per iteration.
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
