#!/usr/bin/env bash
# MiniGrid-MemoryS9 runs at ent_coef 0.05 with a checkpoint every 100k env steps, for
# benchmarks/probe_detour.py on the plateau (docs/results.md), one after the other in one lane.
# By default short and without held-out evaluation; EVAL_EPISODES=400 adds the preset's final
# evaluation and one of 100 episodes every 100k steps, as in results_runs_s9.sh:
#
#   STEPS=400000 bash benchmarks/results_runs_plateau.sh 14 15 16      # seeds
#   AGENT=mnm-g STEPS=1000000 EVAL_EPISODES=400 bash benchmarks/results_runs_plateau.sh 3 4
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
mkdir -p "$LOGS"
evals=(--set train.eval_episodes=0)
if [ "${EVAL_EPISODES:-0}" -gt 0 ]; then
    evals=(--set train.eval_episodes="$EVAL_EPISODES" --set train.eval_every=100000
        --set train.eval_every_episodes=100)
fi
for seed in "$@"; do
    "$MNM" train --env MiniGrid-MemoryS9 --agent "${AGENT:-mnm-p}" --seed "$seed" \
        --timesteps "${STEPS:-400000}" --run-dir "runs/plateau/${AGENT:-mnm-p}-ent0.05-seed$seed" \
        --no-progress --set agent.ppo.ent_coef=0.05 --set train.checkpoint_every=100000 \
        "${evals[@]}" >"$LOGS/plateau-${AGENT:-mnm-p}-$seed.log" 2>&1
done
