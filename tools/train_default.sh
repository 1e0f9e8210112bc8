#!/usr/bin/env bash
# The default model's long CPU run (recipe cpu-duts on DUTS-TR train, validated on 200 DUTS-TR val pairs and ECSSD
# val), niced, in the background; it resumes the run when its folder holds a state.pt. Usage:
#   tools/train_default.sh [RUN_FOLDER]            (default /work/runs/cpu-duts; log in RUN_FOLDER/train.log)
#   INIT=pfanet/weights/pfanet_duts.safetensors tools/train_default.sh   (run folder lost: start from shipped weights)
#   NICE=0 VAL_STEPS=150 tools/train_default.sh   (priority; validation every N steps, a mechanics option: changes on resume)
# Stop it with SIGTERM (kill PID): it writes a checkpoint at the end of the step and exits; run this again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-/work/runs/cpu-duts}
DATA=${DATA:-../shared/data}
mkdir -p "$RUN"
args=(train --recipe cpu-duts --data "$DATA/duts-tr/train.txt" --val "$DATA/duts-tr/val.txt" "$DATA/ecssd/val.txt"
      --val-limit 200 --val-steps "${VAL_STEPS:-600}" --save-steps 100 --save-every 1 --workers 1 --no-progress -o "$RUN")
if [[ -f "$RUN/state.pt" ]]; then
  args+=(--resume); what=resumed
elif [[ -n "${INIT:-}" ]]; then
  args+=(--init "$INIT"); what="started from $INIT"
else
  what=started
fi
nohup nice -n "${NICE:-10}" .venv/bin/pfanet "${args[@]}" >> "$RUN/train.log" 2>&1 &
echo "$what $RUN (pid $!, log $RUN/train.log)"
