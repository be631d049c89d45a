#!/usr/bin/env bash
# Optimizer step cost and Newton-Schulz precision on a CUDA GPU, in one command:
#
#   bash benchmarks/gpu_benchmark.sh            # writes benchmarks/results/gpu/{step_speed.md,step_speed.json,newton_schulz_precision.md}
#
# Celo (eager, compile, triton) and Celo2 (eager, compile; Newton-Schulz in float32) against AdamW
# foreach and fused, on plain models of 10M and 100M parameters, the transformer-like and the tiny-tensor
# model (benchmarks/step_speed.py); then how TF32 and bfloat16 change Newton-Schulz's result
# (benchmarks/newton_schulz_precision.py). Needs torch with CUDA, and triton for Celo's triton rows.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu
mkdir -p "$out"
python benchmarks/step_speed.py --device cuda --models plain transformer tiny --sizes 10M 100M \
    --celo-backends eager compile triton --celo2-backends eager compile --markdown \
    --json "$out/step_speed.json" | tee "$out/step_speed.md"
python benchmarks/newton_schulz_precision.py --device cuda --out "$out/newton_schulz_precision.md"
