#!/usr/bin/env bash
# A queue of `mnm-rl train` runs on LANES lanes (default 2, one process per core), each lane
# taking the next run when its previous one ends. Every run evaluates on held-out seeds every
# EVAL_EVERY env steps (100 episodes) and ends with the preset's final held-out eval.json.
# Runs go to runs/$GROUP/ENV-AGENT[-TAG]-seedS; a folder that exists is resumed (to STEPS if
# given: that extends a finished run).
#
#   ENV=MiniGrid-Memory STEPS=3000000 GROUP=long SETS="agent.ppo.seq_len=64" TAG=seq64 \
#       bash benchmarks/results_runs_lanes.sh mnm-p:0 mnm-p:1 lstm:0     # AGENT:SEED ...
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
ENV=${ENV:-MiniGrid-Memory}
GROUP=${GROUP:-lanes}
LANES=${LANES:-2}
EVAL_EVERY=${EVAL_EVERY:-250000}
mkdir -p "$LOGS" "runs/$GROUP"

run() {  # agent seed
    local name="$ENV-$1${TAG:+-$TAG}-seed$2" start rc sets=() item steps=()
    local dir="runs/$GROUP/$name" log="$LOGS/$GROUP-$name.log"
    for item in ${SETS:-}; do sets+=(--set "$item"); done
    [ -n "${STEPS:-}" ] && steps=(--timesteps "$STEPS")
    start=$(date +%s)
    if [ -d "$dir" ]; then
        "$MNM" train --resume "$dir" "${steps[@]}" --no-progress >>"$log" 2>&1
    else
        "$MNM" train --env "$ENV" --agent "$1" --seed "$2" "${steps[@]}" --run-dir "$dir" \
            --no-progress --set train.eval_every="$EVAL_EVERY" \
            --set train.eval_every_episodes=100 "${sets[@]}" >"$log" 2>&1
    fi
    rc=$?
    echo "$GROUP $name steps=${STEPS:-preset} rc=$rc wall_s=$(($(date +%s) - start))" \
        >>"$LOGS/lanes.txt"
}

lane() {  # lane index: runs the specs whose position modulo LANES is this index
    local i=0 spec
    for spec in "${specs[@]}"; do
        [ $((i % LANES)) -eq "$1" ] && run "${spec%%:*}" "${spec##*:}"
        i=$((i + 1))
    done
}

specs=("$@")
for ((l = 0; l < LANES; l++)); do lane "$l" & done
wait
