#!/usr/bin/env bash
# A run folder written by an earlier version of the code resumes after a change exactly (issue 22): the earlier code
# trains a tiny run of the campaign's recipe (bf16, channels_last, --cache, EMA, validation) and is stopped
# mid-epoch; this tree resumes it; its weights, moving average and best score must equal those of an uninterrupted
# run of the earlier code, and so must an uninterrupted run of this tree's. Usage:
#   git worktree add /tmp/old COMMIT && tools/resume_across_versions.sh /tmp/old [PROCS]   (PROCS 1 or 2, torchrun)
# Prints max |difference| per comparison (0.0 when exact) and exits 1 if any is not.
set -euo pipefail
OLD=$(realpath "${1:?usage: tools/resume_across_versions.sh OLD_TREE [PROCS]}")
PROCS=${2:-1}
NEW=$(realpath "$(dirname "$0")/..")
PY=${PY:-$NEW/.venv/bin/python}
DATA=${DATA:-$(realpath "$NEW/../shared/data")}
WEIGHTS=${WEIGHTS:-$NEW/pfanet/weights/pfanet_duts.safetensors}
W=$(mktemp -d)
common=(train --recipe cpu-duts-iou --init "$WEIGHTS" --ema 0.99 --size 32 --batch-size 2 --epochs 2 --limit 16
        --data "$DATA/duts-tr/train.txt" --val "$DATA/duts-tr/val.txt" --val-limit 4 --val-steps 3 --workers 1
        --no-progress --bf16 --channels-last --cache --save-steps 100 --device cpu)
launch() {  # TREE RUN_FOLDER [extra flags]: that tree's pfanet, imported from the tree itself
  local tree=$1 out=$2; shift 2
  if [[ $PROCS == 1 ]]; then
    (cd "$tree" && PYTHONPATH=$tree "$PY" -m pfanet "${common[@]}" -o "$out" "$@")
  else
    (cd "$tree" && PYTHONPATH=$tree OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone \
       --nproc-per-node "$PROCS" -m pfanet "${common[@]}" -o "$out" "$@")
  fi > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
}
launch "$OLD" "$W/old"
launch "$OLD" "$W/mixed" --max-steps 3
launch "$NEW" "$W/mixed" --resume
launch "$NEW" "$W/new"
"$PY" - "$W" <<'PY'
import sys
import torch
from safetensors.torch import load_file

def diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

w = sys.argv[1]
ref = torch.load(f"{w}/old/state.pt", weights_only=True)
exact = True
for run in ("mixed", "new"):
    s = torch.load(f"{w}/{run}/state.pt", weights_only=True)
    d = {"model": diff(ref["model"], s["model"]), "ema": diff(ref["ema"], s["ema"]),
         "last.safetensors": diff(load_file(f"{w}/old/last.safetensors"), load_file(f"{w}/{run}/last.safetensors"))}
    same = all(v == 0 for v in d.values()) and s["global_step"] == ref["global_step"] and s["best"] == ref["best"]
    exact &= same
    print(f"{run}: {s['global_step']} steps, max|diff| " + ", ".join(f"{k} {v}" for k, v in d.items())
          + f", best max F {s['best']:.6f} vs {ref['best']:.6f}: {'exact' if same else 'NOT EXACT'}")
sys.exit(0 if exact else 1)
PY
echo "runs in $W"
