#!/usr/bin/env bash
# Fourth phase of the runs behind docs/results.md: lstm and gru on the default MiniGrid-Memory
# preset for one more seed, one after the other (a single lane), starting once the seed-1 gru run
# of benchmarks/results_runs_minigrid_more.sh is logged.
#
#   bash benchmarks/results_runs_minigrid_seq.sh 2
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
LOGS=${LOGS:-/tmp/mnm6/logs}
seed=$1
until grep -q "^MiniGrid-Memory gru seed=1 " "$LOGS/lanes.txt" 2>/dev/null; do sleep 5; done
for agent in lstm gru; do
    start=$(date +%s)
    "$MNM" train --env MiniGrid-Memory --agent "$agent" --seed "$seed" --no-progress \
        --set train.eval_every=100000 --set train.eval_every_episodes=100 \
        >"$LOGS/MiniGrid-Memory-$agent-$seed.log" 2>&1
    rc=$?
    echo "MiniGrid-Memory $agent seed=$seed steps=1200000 rc=$rc wall_s=$(($(date +%s) - start))" \
        >>"$LOGS/lanes.txt"
done
