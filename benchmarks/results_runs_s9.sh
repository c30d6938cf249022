#!/usr/bin/env bash
# The MiniGrid-MemoryS9 grid behind docs/results.md (issue 6): 1M env steps per run, held-out
# evaluation every 100k env steps (100 episodes) and the preset's final 400-episode eval.
# Each AGENT:SEED argument is one `mnm-rl train` process in the background (torch_threads 1), in
# its own folder runs/s9/AGENT-seedSEED; a folder that exists already is resumed from its latest
# checkpoint, so an interrupted run (SIGINT/SIGTERM save a checkpoint) goes on where it stopped.
#
#   bash benchmarks/results_runs_s9.sh mnm-p:0 mnm-p:1       # two processes, logs in $LOGS
#   CPUS="4 5" bash benchmarks/results_runs_s9.sh lstm:0 lstm:1  # pin each to one core (taskset)
#   DEVICE=cpu ...                      # --device for new runs (default: the preset's, auto)
#   SETS="agent.ppo.mem_coef=0.1" TAG=mem0.1 ...   # a variant: --set items, folder AGENT-TAG-seedS
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
STEPS=${STEPS:-1000000}
read -r -a cpus <<<"${CPUS:-}"
mkdir -p "$LOGS" runs/s9

run() {  # agent seed [cpu]
    local name="$1${TAG:+-$TAG}" start rc pin=() sets=() item
    local dir="runs/s9/$name-seed$2" log="$LOGS/MiniGrid-MemoryS9-$name-$2.log"
    [ -n "${3:-}" ] && pin=(taskset -c "$3")
    for item in ${SETS:-}; do sets+=(--set "$item"); done
    start=$(date +%s)
    if [ -d "$dir" ]; then
        "${pin[@]}" "$MNM" train --resume "$dir" --no-progress >>"$log" 2>&1
    else
        "${pin[@]}" "$MNM" train --env MiniGrid-MemoryS9 --agent "$1" --seed "$2" \
            --timesteps "$STEPS" --run-dir "$dir" --no-progress ${DEVICE:+--device "$DEVICE"} \
            --set train.eval_every=100000 --set train.eval_every_episodes=100 "${sets[@]}" \
            >"$log" 2>&1
    fi
    rc=$?
    echo "MiniGrid-MemoryS9 $name seed=$2 steps=$STEPS rc=$rc wall_s=$(($(date +%s) - start))" \
        >>"$LOGS/lanes.txt"
}

i=0
for spec in "$@"; do
    run "${spec%%:*}" "${spec##*:}" "${cpus[$i]:-}" &
    i=$((i + 1))
done
wait
