#!/usr/bin/env bash
# Short MiniGrid-MemoryS9 runs of mnm-p at ent_coef 0.05 with a checkpoint every 100k env steps
# and no held-out evaluation, for benchmarks/probe_detour.py on the plateau (docs/results.md),
# one after the other in one lane:
#
#   STEPS=400000 bash benchmarks/results_runs_plateau.sh 14 15 16      # seeds
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
mkdir -p "$LOGS"
for seed in "$@"; do
    "$MNM" train --env MiniGrid-MemoryS9 --agent "${AGENT:-mnm-p}" --seed "$seed" \
        --timesteps "${STEPS:-400000}" --run-dir "runs/plateau/${AGENT:-mnm-p}-ent0.05-seed$seed" \
        --no-progress --set agent.ppo.ent_coef=0.05 --set train.checkpoint_every=100000 \
        --set train.eval_episodes=0 >"$LOGS/plateau-${AGENT:-mnm-p}-$seed.log" 2>&1
done
