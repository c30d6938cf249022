#!/usr/bin/env bash
# Second phase of the runs behind docs/results.md: the default MiniGrid-Memory preset (1.2M env
# steps, the budget of the mnm-p default runs) for lstm and gru, seed 0, with a held-out
# evaluation every 100k env steps. Each starts when a lane of benchmarks/results_runs.sh has
# finished (its mnm-g run is logged), so no more than two training processes run at once.
#
#   bash benchmarks/results_runs_minigrid.sh
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}

after() {  # the lanes.txt line to wait for, then: agent
    until grep -q "^$1 mnm-g seed=0" "$LOGS/lanes.txt" 2>/dev/null; do sleep 10; done
    local start rc
    start=$(date +%s)
    "$MNM" train --env MiniGrid-Memory --agent "$2" --seed 0 --no-progress \
        --set train.eval_every=100000 --set train.eval_every_episodes=100 \
        >"$LOGS/MiniGrid-Memory-$2-0.log" 2>&1
    rc=$?
    echo "MiniGrid-Memory $2 seed=0 steps=1200000 rc=$rc wall_s=$(($(date +%s) - start))" \
        >>"$LOGS/lanes.txt"
}

after KeyValueRecall lstm &
after KeyValueRecall-Hard gru &
wait
