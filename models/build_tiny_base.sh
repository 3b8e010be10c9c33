#!/usr/bin/env bash
# Rebuilds models/tiny-base, stage 1 of the paper's recipe on the CPU, with the project's own commands:
# refinevla collect (scripted experts in ManiSkill3) -> refinevla train (config/train_tiny_base.yaml, action-only,
# everything trained) -> refinevla eval (closed loop through sim_bridge_node + policy_node) -> models/tiny-base.
#   source .venv/refinevla_env.sh && models/build_tiny_base.sh [WORK_DIR]      (~45 min on 2 idle cores)
# Data: 330 multi-task episodes (PushCube / PickCube / StackCube cycled, varied instructions, DART noise of 1 cm on
# 30 % of them) + 600 clean PushCube episodes with the canonical instruction (the target task is part of the
# pretraining mixture, as Bridge is part of the Open X-Embodiment mixture SpatialVLA was pretrained on). Seeds 20000+
# and 30000+: the demo collects 0-299 and evaluates 1000+.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$ROOT/runs/tiny_base_build}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1
collect() { refinevla collect --image-size 112 --no-progress "$@"; }
collect --task PushCube-v1 PickCube-v1 StackCube-v1 --episodes 165 --seed 20000 --out "$WORK/multi_0" \
  --instruction-mode varied --noise-fraction 0.3 --noise-std-m 0.01 &
collect --task PushCube-v1 PickCube-v1 StackCube-v1 --episodes 165 --seed 20300 --out "$WORK/multi_1" \
  --instruction-mode varied --noise-fraction 0.3 --noise-std-m 0.01 &
wait
collect --task PushCube-v1 --episodes 150 --seed 30000 --out "$WORK/push_0" --instruction-mode canonical &
collect --task PushCube-v1 --episodes 150 --seed 30150 --out "$WORK/push_1" --instruction-mode canonical &
wait
collect --task PushCube-v1 --episodes 150 --seed 30300 --out "$WORK/push_2" --instruction-mode canonical &
collect --task PushCube-v1 --episodes 150 --seed 30450 --out "$WORK/push_3" --instruction-mode canonical &
wait
refinevla collect --merge "$WORK/multi_0" "$WORK/multi_1" "$WORK/push_0" "$WORK/push_1" "$WORK/push_2" "$WORK/push_3" \
  --out "$WORK/data"
refinevla train --config "$ROOT/config/train_tiny_base.yaml" dataset="$WORK/data" output_dir="$WORK/run"
refinevla eval --checkpoint "$WORK/run/final" --via ros-policy-node --tasks PushCube-v1 --episodes 30 --seed 1000 \
  --instruction-mode canonical --rationale-mode action_only --out "$WORK/eval" --name tiny-base
rm -rf "$ROOT/models/tiny-base.new" && cp -r "$WORK/run/final" "$ROOT/models/tiny-base.new"
rm -rf "$ROOT/models/tiny-base" && mv "$ROOT/models/tiny-base.new" "$ROOT/models/tiny-base"
echo "models/tiny-base rebuilt; update models/README.md with $WORK/run/metrics.json and $WORK/eval"
