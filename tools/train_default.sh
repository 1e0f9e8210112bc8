#!/usr/bin/env bash
# The default model's long CPU run (since 2026-12 the campaign, recipe cpu-duts-iou, from the shipped model, on
# DUTS-TR train, validated on 200 DUTS-TR val pairs and ECSSD val), in the background; it resumes the run when its
# folder holds a state.pt, and otherwise starts it from the shipped weights (copied into the folder first). Usage:
#   tools/train_default.sh [RUN_FOLDER]            (default /work/runs/cpu-duts-iou; log in RUN_FOLDER/train.log)
#   tools/train_default.sh stop [RUN_FOLDER]       (SIGTERM to its processes: each finishes its step, state.pt is
#                                                   written, they exit; run this script again to resume)
#   INIT=FILE tools/train_default.sh               (a new run starts from FILE; default the shipped weights; INIT=
#                                                   (empty) starts a recipe that needs none, e.g. cpu-duts, from HED)
#   NICE=0 VAL_STEPS=150 tools/train_default.sh   (priority; validation every N steps (default 1250, about 30 minutes
#                                                   at 5.5 images/s), a mechanics option: may change on resume)
#   RESCHEDULE=1 tools/train_default.sh            (resume onto the recipe's schedule as pfanet/recipes.py now defines
#                                                   it, or onto another PROCS: the batch per process follows)
#   PROCS=1 tools/train_default.sh                 (one process of 8 images a step instead of two of 4)
#   CACHE=0 tools/train_default.sh                 (decode every step instead of keeping DUTS-TR decoded in memory)
#   BF16=0 tools/train_default.sh                  (no bf16 autocast/channels_last; default: on where the CPU has
#                                                   AVX512_BF16 or AMX, BF16=1 forces it)
#   RECIPE=cpu-duts INIT= tools/train_default.sh /work/runs/cpu-duts   (another recipe in its own folder: a resume
#                                                  names the recipe the run was started with, or it refuses)
# Starting or resuming, it returns once the run has logged "started"/"resumed" and stayed up 30 s more, and fails
# with the log's tail otherwise.
# PROCS (default 2): processes under torchrun, one thread each, each taking 8/PROCS images of a step -- on two cores
# 1.20x the images/s of one process with two threads (docs/TRAINING.md). BatchNorm statistics are per process.
# CACHE (default 1): --cache, 1.18x on two cores; about 3.3 GB of memory per process for DUTS-TR at 320 px.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == stop ]]; then
  RUN=${2:-/work/runs/cpu-duts-iou}
  pids=()
  for pid in $(pgrep -f "pfanet train .*-o $RUN" || true); do  # the training processes, not torchrun's agent
    grep -q torchrun "/proc/$pid/cmdline" 2>/dev/null || pids+=("$pid")
  done
  [[ ${#pids[@]} -gt 0 ]] || { echo "no training process for $RUN"; exit 1; }
  kill -TERM "${pids[@]}"
  while pgrep -f "pfanet train .*-o $RUN" > /dev/null; do sleep 2; done
  grep "stopped by signal" "$RUN/train.log" | tail -1
  exit 0
fi
RUN=${1:-/work/runs/cpu-duts-iou}
DATA=${DATA:-../shared/data}
PROCS=${PROCS:-2}
mkdir -p "$RUN"
args=(train --recipe "${RECIPE:-cpu-duts-iou}" --data "$DATA/duts-tr/train.txt" --val "$DATA/duts-tr/val.txt" "$DATA/ecssd/val.txt"
      --val-limit 200 --val-steps "${VAL_STEPS:-1250}" --save-steps 100 --save-every 1 --workers 1 --no-progress
      --batch-size $((8 / PROCS)) -o "$RUN")
if [[ -f "$RUN/state.pt" ]]; then
  args+=(--resume); what=resumed
  if [[ -n "${RESCHEDULE:-}" ]]; then args+=(--reschedule); what="resumed and rescheduled"; fi
elif [[ -n "${INIT-pfanet/weights/pfanet_duts.safetensors}" ]]; then
  INIT=${INIT-pfanet/weights/pfanet_duts.safetensors}
  # a copy in the run folder: the run then resumes even after the shipped file it started from has been replaced
  cp "$INIT" "$RUN/init.safetensors"
  args+=(--init "$RUN/init.safetensors"); what="started from $INIT"
else
  what=started
fi
if [[ "${CACHE:-1}" != 0 ]]; then args+=(--cache); fi
# bf16 autocast + channels_last where the CPU computes bfloat16 natively (pfanet.hardware.bf16_instructions): 2.3x at
# 192 on AVX-512 BF16 (docs/TRAINING.md); elsewhere bf16 is emulated and far slower, so it stays off
native_bf16() { .venv/bin/python -c "from pfanet.hardware import bf16_instructions as b; raise SystemExit(b() is None)"; }
if [[ "${BF16:-auto}" == 1 ]] || { [[ "${BF16:-auto}" == auto ]] && native_bf16; }; then
  args+=(--bf16 --channels-last)
fi
if [[ "$PROCS" -gt 1 ]]; then
  launch=(.venv/bin/torchrun --standalone --nproc_per_node "$PROCS" .venv/bin/pfanet)
  export OMP_NUM_THREADS=1
else
  launch=(.venv/bin/pfanet)
fi
logged=$(stat -c %s "$RUN/train.log" 2>/dev/null || echo 0)
nohup nice -n "${NICE:-10}" "${launch[@]}" "${args[@]}" >> "$RUN/train.log" 2>&1 &
pid=$!
# A run that cannot start (bad options, a state one of its processes cannot resume) dies within seconds of saying
# "started" or "resumed": wait for that line and 30 s more, so that a failure shows here, not as a dead background job.
dead() { tail -20 "$RUN/train.log"; echo "FAILED: $RUN did not start (log $RUN/train.log)"; exit 1; }
for _ in $(seq 300); do
  kill -0 "$pid" 2>/dev/null || dead
  tail -c +$((logged + 1)) "$RUN/train.log" | grep -q "INFO \(resumed\|started\) $RUN" && break
  sleep 1
done
sleep 30
kill -0 "$pid" 2>/dev/null || dead
echo "$what $RUN (pid $pid, $PROCS process(es), log $RUN/train.log)"
