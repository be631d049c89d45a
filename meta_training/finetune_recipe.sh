#!/usr/bin/env bash
# Meta-training aimed at transformers.Trainer workloads (fine-tuning as well as from scratch), on ONE
# CPU core: a phase-1 stage (about 50-80 minutes; 3-13 s per iteration as the shared machine's load
# varies), then a short phase-2 stage that trains the learned scheduler from stage 1's best/.
#
#   * Start: the embedded default (celo_hf/default_weights/), zero-gradient-calibrated
#     (celo_hf.diagnostics.calibrate_zero_gradient_), its learned scheduler applied and frozen.
#   * Constraint: --zero_gradient_calibrated projects every perturbed member and every new theta
#     back onto "update exactly 0 at zero gradient" (Celo v1's code unchanged, only its weights).
#   * Families (one slot each; slots that train the same model step together): the four MLP image
#     families; MLP fine-tuning from digits 0-4 to 5-9 (every tensor, fresh head, rank-4 adapters);
#     tiny causal transformers from scratch on the histories (d16 1 layer T16 tied, d16 2 layers T32
#     untied, d32 1 layer T32 tied); the d32 LM pretrained on the comedies fine-tuned on the
#     tragedies (every tensor, rank-4 adapters). Reparameterisation as in the CPU recipe.
#   * PES: truncations of 25 steps (more outer steps in the same time), trajectories of 50-500 steps.
#   * Stage 2 (phase 2): the scheduler and its initial state trained, the update MLP frozen (still
#     calibrated), same families and checks; its score is relative to stage 1's best/.
#
# Held-in checks and the selection rule, fixed before the run (meta_training/held_in.py, suite
# "trainer"), every 50 iterations and at the start:
#   digits MLP from scratch (held_in_loss), the comedies LM fine-tuned on the romances
#   (finetune_loss), a d16 LM from scratch on the romances (lm_loss), and the zero-gradient drift on
#   the pretrained MLP's and LM's tensors. A checkpoint is eligible only if drift <= 1e-4; its score is
#   the mean over the three losses of loss / the warm start's loss; best/ keeps the lowest score.
#
# Rerunning the same command resumes an interrupted stage from its last checkpoint and ends where an
# uninterrupted run would; a finished stage is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-meta_training/runs/finetune}
source meta_training/trainer_families.sh
python -m meta_training.train --phase 1 --iterations 500 "${shared[@]}" --max_unroll 500 \
    --init celo_hf/default_weights --apply_schedule --zero_gradient_calibrated --held_in_suite trainer \
    --out "$out/phase1"
python -m meta_training.train --phase 2 --iterations 200 "${shared[@]}" --max_unroll 500 \
    --init "$out/phase1/best" --zero_gradient_calibrated --held_in_suite trainer \
    --out "$out/phase2"
