#!/usr/bin/env bash
# The one prepared batch for a lent GPU machine (16 cores, one H200; see docs/benchmarks.md and
# docs/results.md). It expects the machine's python3 with torch, and the wheels of our other
# dependencies in .whl/ (gymnasium, minigrid, pygame-ce, stable-baselines3, sb3-contrib, pydantic).
#
#   bash benchmarks/gpu_batch.sh      # writes everything under $OUT
#
# 1. a smoke test (imports, CUDA, a 2k-step CPU run); stops here if it fails;
# 2. MiniGrid-MemoryS9 runs of benchmarks/results_runs_s9.sh on cores 6-15, on the CPU;
# 3. benchmarks/throughput.py --device cuda with 64 envs on cores 0-5, meanwhile;
# 4. at TRAIN_S seconds the runs get SIGINT (each saves a checkpoint, to be resumed elsewhere)
#    and runs/s9 plus the logs are packed into $OUT/runs_s9.tgz.part_* (15 MB pieces: the
#    machine sends back files of at most 16 MiB). Here: cat runs_s9.tgz.part_* | tar xzf -
set -u -o pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu_out}
TRAIN_S=${TRAIN_S:-420}
BENCH_S=${BENCH_S:-330}
RUNS=${RUNS:-lstm:0 gru:0 lstm:1 gru:1 lstm:2 gru:2 mnm-p:2 mnm-g:0 mnm-g:1 mnm-g:2}
TRAIN_CPUS=${TRAIN_CPUS:-6 7 8 9 10 11 12 13 14 15}
BENCH_CPUS=${BENCH_CPUS:-0-5}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
python3 -c 'import minigrid, sb3_contrib, pydantic' 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nexec python3 -m mnm_rl "$@"\n' >/tmp/mnm-rl && chmod +x /tmp/mnm-rl
export MNM=/tmp/mnm-rl LOGS=${LOGS:-/tmp/mnm6/logs}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; lscpu | grep -E 'Model name|^CPU\(s\)'
  python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())'
} 2>&1 | tee "$OUT/machine.txt"
/tmp/mnm-rl train --env MiniGrid-MemoryS9 --agent lstm --timesteps 2048 --device cpu --no-progress \
    --root /tmp/smoke --set train.eval_episodes=0 2>&1 | tail -3 || exit 1
echo "smoke done at $(($(date +%s) - start)) s"

# shellcheck disable=SC2086  # RUNS is a list of words
CPUS="$TRAIN_CPUS" DEVICE=cpu setsid bash benchmarks/results_runs_s9.sh $RUNS &
timeout "$BENCH_S" taskset -c "$BENCH_CPUS" python3 benchmarks/throughput.py --device "${BENCH_DEVICE:-cuda}" \
    --n-envs 64 --quick --rollouts 1 --no-scaling 2>&1 | tee "$OUT/throughput_cuda.txt"
echo "benchmark done at $(($(date +%s) - start)) s"
while [ $(($(date +%s) - start)) -lt "$TRAIN_S" ] && pgrep -f "mnm_rl train" >/dev/null; do sleep 5; done
pkill -INT -f "mnm_rl train"
for _ in $(seq 30); do pgrep -f "mnm_rl train" >/dev/null || break; sleep 1; done
tail -n 2 "$LOGS"/*.log >"$OUT/train_tails.txt" 2>&1
tar czf - runs/s9 "$LOGS" | split -b 15M - "$OUT/runs_s9.tgz.part_"
echo "packed at $(($(date +%s) - start)) s"; ls -la "$OUT"
