#!/usr/bin/env bash
# Third phase of the runs behind docs/results.md: more seeds of lstm and gru on the default
# MiniGrid-Memory preset (as benchmarks/results_runs_minigrid.sh), each lane starting when the
# previous run of the same agent is logged, so no more than two training processes run at once.
#
#   bash benchmarks/results_runs_minigrid_more.sh 1 2      # seeds, in order
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}

lane() {  # agent, then seeds
    local agent=$1 previous=0 seed start rc
    shift
    for seed in "$@"; do
        until grep -q "^MiniGrid-Memory $agent seed=$previous " "$LOGS/lanes.txt" 2>/dev/null; do
            sleep 10
        done
        start=$(date +%s)
        "$MNM" train --env MiniGrid-Memory --agent "$agent" --seed "$seed" --no-progress \
            --set train.eval_every=100000 --set train.eval_every_episodes=100 \
            >"$LOGS/MiniGrid-Memory-$agent-$seed.log" 2>&1
        rc=$?
        echo "MiniGrid-Memory $agent seed=$seed steps=1200000 rc=$rc wall_s=$(($(date +%s) - start))" \
            >>"$LOGS/lanes.txt"
        previous=$seed
    done
}

lane lstm "$@" &
lane gru "$@" &
wait
