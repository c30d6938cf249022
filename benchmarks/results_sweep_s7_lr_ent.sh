#!/usr/bin/env bash
# A learning-rate x entropy grid for the default MiniGrid-Memory preset's mnm-p (issue 6), on
# Ray Tune: learning_rate 3e-4, 1e-3 (the preset's), 3e-3 crossed with ent_coef 0.01, 0.02 (the
# preset's), 0.05, seeds 0 and 1, at the preset's 1.2M steps, with a held-out evaluation every
# 100k env steps. Two trials at a time (2 cores); resumable (--resume).
#
#   bash benchmarks/results_sweep_s7_lr_ent.sh [--resume]
#   AGENT=gru bash benchmarks/results_sweep_s7_lr_ent.sh      # the same grid for another agent
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
AGENT=${AGENT:-mnm-p}
"$MNM" sweep --name "s7-$AGENT-lr-ent" --env MiniGrid-Memory --agent "$AGENT" --seeds 0 1 \
    --grid agent.ppo.learning_rate=3e-4,1e-3,3e-3 --grid agent.ppo.ent_coef=0.01,0.02,0.05 \
    --set train.eval_every=100000 --set train.eval_every_episodes=100 \
    --num-cpus 2 --max-concurrent 2 "$@"
