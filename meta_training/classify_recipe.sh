#!/usr/bin/env bash
# Meta-training of the update MLP aimed at fine-tuning a pretrained transformer with a fresh
# classification head (what Trainer users do with AutoModelForSequenceClassification), from the
# embedded default (its learned scheduler applied and frozen, its model-start gain and param-scale
# floor kept), on ONE CPU core, in two stages that each start from the embedded default:
#
#   1. phase 1, 600 iterations of about 3-4 s, on the families below;
#   2. phase 1, 400 iterations at a meta-learning rate of 1e-3 (stage 1: the default 3e-4), on fewer
#      families, six of its eleven slots fine-tuning pretrained models (run after stage 1's
#      outcome: meta_training/runs/classify/outcome.md);
#   3. the embedded default with its update MLP widened from 4 to 8 hidden units per layer
#      (meta_training.warm_start.widened: the same update to start with), then phase 1, 300
#      iterations at a meta-learning rate of 1e-3 on stage 1's families (run after stage 2's outcome).
#
#   * Stage 1 families: those of meta_training/trainer_families.sh (one slot each), and the comedies LM's
#     body with a fresh 4-way head telling the Roman plays apart, every tensor (ft_cls_full) and
#     rank-4 adapters with the head (ft_cls_lora), each listed twice, so two slots each.
#   * Stage 2 families: digits, permuted digits, the MLP with a fresh head, two LMs from scratch, the
#     fine-tuned LM, ft_cls_full three times and ft_cls_lora twice.
#   * Every member and every new theta projected back onto "update exactly 0 at zero gradient".
#   * PES: truncations of 25 steps, trajectories of 50-1000 steps.
#
# Held-in checks and selection, fixed before the run (meta_training/held_in.py, suite "classify"),
# every 50 iterations and at the start: the digits MLP, the comedies LM fine-tuned on the romances,
# a d16 LM from scratch on the romances, the comedies LM's body with a fresh head telling the five
# problem plays apart, the zero-gradient drift. Eligible: drift <= 1e-4, digits <= 1.1x, both LM
# losses <= 1.02x the start's; score: the classifier's loss over the start's; best/ keeps the
# lowest. What then becomes the embedded default: meta_training/runs/classify/RULE.md.
#
# Rerunning the same command resumes from the last checkpoint and ends where an uninterrupted run would.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-meta_training/runs/classify}
source meta_training/trainer_families.sh
python -m meta_training.train --phase 1 --iterations 600 "${shared[@]}" ft_cls_full ft_cls_full ft_cls_lora ft_cls_lora \
    --max_unroll 1000 --init celo_hf/default_weights --apply_schedule --zero_gradient_calibrated \
    --held_in_suite classify --out "$out/phase1"
python -m meta_training.train --phase 1 --iterations 400 --lr 1e-3 "${pes[@]}" \
    --families digits permuted_digits ft_digits_head lm_d16_l1_t16 lm_d32_l1_t32 ft_lm_full \
    ft_cls_full ft_cls_full ft_cls_full ft_cls_lora ft_cls_lora \
    --max_unroll 1000 --init celo_hf/default_weights --apply_schedule --zero_gradient_calibrated \
    --held_in_suite classify --out "$out/focus"
python -m meta_training.warm_start --widen 8 --weights celo_hf/default_weights --out "$out/wide_init"
python -m meta_training.train --phase 1 --iterations 300 --lr 1e-3 "${shared[@]}" ft_cls_full ft_cls_full ft_cls_lora ft_cls_lora \
    --max_unroll 1000 --init "$out/wide_init" --apply_schedule --zero_gradient_calibrated \
    --held_in_suite classify --out "$out/wide"
