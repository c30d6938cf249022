#!/usr/bin/env bash
# The runs behind docs/results.md (issue 6, scaled to one 2-core session): two lanes of
# `mnm-rl train`, one process each (torch_threads 1), every run with a held-out evaluation every
# 10k env steps (eval/success_rate in TensorBoard) and the preset's final held-out eval.json.
#
#   bash benchmarks/results_runs.sh            # both lanes in the background; logs in $LOGS
#
# Lane A: KeyValueRecall-Hard, lane B: DelayedCueRecall-Long; mnm-p, lstm, gru x seeds 0-2 at an
# equal 100k env-step budget; then mnm-g (seed 0) on KeyValueRecall-Hard, and the default
# MiniGrid-Memory preset (1.2M steps) for lstm (lane A) and gru (lane B), seed 0.
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
STEPS=${STEPS:-100000}
mkdir -p "$LOGS"
EVAL=(--set train.eval_every=10000 --set train.eval_every_episodes=100)

run() {  # env agent seed timesteps
    local log="$LOGS/$1-$2-$3.log" start
    start=$(date +%s)
    "$MNM" train --env "$1" --agent "$2" --seed "$3" --timesteps "$4" --no-progress "${EVAL[@]}" \
        >"$log" 2>&1
    echo "$1 $2 seed=$3 steps=$4 rc=$? wall_s=$(($(date +%s) - start))" >>"$LOGS/lanes.txt"
}

lane() {  # env, then the tail of the lane
    local env=$1 seed agent
    for seed in 0 1 2; do
        for agent in mnm-p lstm gru; do
            run "$env" "$agent" "$seed" "$STEPS"
        done
    done
}

(lane KeyValueRecall-Hard; run KeyValueRecall-Hard mnm-g 0 "$STEPS";
 run MiniGrid-Memory lstm 0 1200000) &
(lane DelayedCueRecall-Long; run MiniGrid-Memory gru 0 1200000) &
wait
