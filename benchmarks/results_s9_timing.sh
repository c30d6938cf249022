#!/usr/bin/env bash
# Measures what MiniGrid-MemoryS9 would cost: 100k env steps of mnm-p and of lstm on the S9 preset
# (held-out evaluation every 50k), one after the other, after the MiniGrid-Memory seed-1 lstm run
# of benchmarks/results_runs_minigrid_more.sh is logged. docs/results.md extrapolates the wall
# time of a 1M-step run from these.
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
until grep -q "^MiniGrid-Memory lstm seed=1 " "$LOGS/lanes.txt" 2>/dev/null; do sleep 10; done
for agent in mnm-p lstm; do
    start=$(date +%s)
    "$MNM" train --env MiniGrid-MemoryS9 --agent "$agent" --seed 0 --timesteps 100000 \
        --no-progress --set train.eval_every=50000 --set train.eval_every_episodes=100 \
        >"$LOGS/MiniGrid-MemoryS9-$agent-0.log" 2>&1
    rc=$?
    echo "MiniGrid-MemoryS9 $agent seed=0 steps=100000 rc=$rc wall_s=$(($(date +%s) - start))" \
        >>"$LOGS/lanes.txt"
done
