#!/usr/bin/env bash
# The runs behind docs/results.md (issue 6, scaled to one session on 2 shared CPU cores): two
# lanes of `mnm-rl train`, one process each (torch_threads 1). Every run evaluates on held-out
# seeds every EVAL_EVERY env steps (eval/success_rate in TensorBoard, 100 episodes) and ends with
# the preset's held-out eval.json.
#
#   bash benchmarks/results_runs.sh            # both lanes in the background; logs in $LOGS
#
# Lane A: KeyValueRecall (4 pairs, no delay), lane B: KeyValueRecall-Hard (8 pairs of 16 keys,
# 4-step delay); mnm-p, lstm, gru x seeds 0-2 at an equal STEPS env-step budget, seed-major so
# that a cut-short session still has every agent on the same seeds; then mnm-g, seed 0, on both.
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
STEPS=${STEPS:-40000}
EVAL_EVERY=${EVAL_EVERY:-4000}
mkdir -p "$LOGS"

run() {  # env agent seed
    local log="$LOGS/$1-$2-$3.log" start rc
    start=$(date +%s)
    "$MNM" train --env "$1" --agent "$2" --seed "$3" --timesteps "$STEPS" --no-progress \
        --set train.eval_every="$EVAL_EVERY" --set train.eval_every_episodes=100 >"$log" 2>&1
    rc=$?
    echo "$1 $2 seed=$3 steps=$STEPS rc=$rc wall_s=$(($(date +%s) - start))" >>"$LOGS/lanes.txt"
}

lane() {  # env
    local seed agent
    for seed in 0 1 2; do
        for agent in mnm-p lstm gru; do
            run "$1" "$agent" "$seed"
        done
    done
    run "$1" mnm-g 0
}

lane KeyValueRecall &
lane KeyValueRecall-Hard &
wait
