#!/usr/bin/env bash
# A small tuning sweep of the default MiniGrid-Memory preset's mnm-p (issue 6), on Ray Tune:
# truncated-BPTT length seq_len 64 (= n_steps: a whole rollout, so no episode of the preset's
# 64-step limit is cut by a chunk boundary; the preset uses 16) crossed with the memory loss
# weight mem_coef 1.0 (the preset's) and 0.1, seeds 0 and 1, at the preset's 1.2M steps, with a
# held-out evaluation every 100k env steps. Two trials at a time (2 cores); resumable (--resume).
# A second sweep adds mem_coef 0 (no memory loss at all) at seq_len 64, seeds 0 and 1.
#
#   bash benchmarks/results_sweep_s7.sh [--resume]
#   SWEEP=s7-mnm-p-nomemloss MEM_COEFS=0.0 bash benchmarks/results_sweep_s7.sh [--resume]
set -u
cd "$(dirname "$0")/.."
MNM=${MNM:-.venv/bin/mnm-rl}
"$MNM" sweep --name "${SWEEP:-s7-mnm-p-bptt}" --env MiniGrid-Memory --agent mnm-p --seeds 0 1 \
    --grid agent.ppo.seq_len=64 --grid agent.ppo.mem_coef="${MEM_COEFS:-1.0,0.1}" \
    --set train.eval_every=100000 --set train.eval_every_episodes=100 \
    --num-cpus 2 --max-concurrent 2 "$@"
