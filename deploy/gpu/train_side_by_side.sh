#!/usr/bin/env bash
# Several models of the demo recipe trained from scratch side by side on one lent GPU for the same time,
# for a session that has the GPU for a few minutes (issue 15). Scoring happens afterwards on a CPU
# (synthperf evaluate on held-out NIfTI cases, too large to send).
#
# The GPU machine has no phantom generator (no nilearn, no atlas package) and takes 64 MiB a call, so
# the training cases travel as packs (`synthperf dataset pack`: the model grid, 8-bit, ~66 KB a case
# at grid 64).
# usage: bash deploy/gpu/train_side_by_side.sh OUT NAME=PACK[,PACK...][@GRID] ...
#   e.g. geometric=.gpu/train-geometric.npz mixed=.gpu/a.npz,.gpu/b.npz big=.gpu/a96.npz@96
#   OUT gets model-NAME.tar.gz (exported weights, history, loss curve, log) and log.txt, refreshed
#   every minute so a cut-off call still returns what was trained.
# env: TRAIN_MINUTES (5), CALIBRATE_SECONDS (40), BATCH (64), LOADER_WORKERS (4 per model), DEVICE (cuda),
#      PYTHON (python3), WORK (/tmp/side-by-side)
# Steps are set from a short calibration run of all models together, so each cosine schedule ends inside
# the time it is given; a run slower than calibrated still stops on time with a checkpoint.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${1:?OUT}" && cd "$1" && pwd); shift
[ $# -ge 1 ] || { echo "usage: $0 OUT NAME=PACK[,PACK...][@GRID] ..." >&2; exit 2; }
minutes=${TRAIN_MINUTES:-5}
calibrate=${CALIBRATE_SECONDS:-40}
batch=${BATCH:-64}
workers=${LOADER_WORKERS:-4}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
work=${WORK:-/tmp/side-by-side}
say() { printf '[side-by-side %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/log.txt"; }
cd "$repo"
rm -rf "$work"; mkdir -p "$work/data"
declare -A data grid
names=()
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}; packs=${rest%@*}
  grid[$name]=$([ "$rest" != "$packs" ] && echo "${rest##*@}" || echo 64)
  mkdir -p "$work/data/$name"
  IFS=, read -ra list <<< "$packs"
  for p in "${list[@]}"; do
    [ -f "$p" ] || { say "$name: missing pack $p"; exit 2; }
    ln -s "$(cd "$(dirname "$p")" && pwd)/$(basename "$p")" "$work/data/$name/$(basename "$p")"
  done
  data[$name]=$work/data/$name  # a folder of packs: synthperf train reads all of them
  names+=("$name")
done

say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
"$py" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available(), 'cpu', torch.backends.cpu.get_cpu_capability(), 'cores', __import__('os').cpu_count())" | tee -a "$out/log.txt"

snapshot() {  # each run's exported weights and history so far -> OUT (what comes back if the call is cut off)
  local n r f files
  for n in "${names[@]}"; do
    r=$work/run-$n
    [ -f "$r/export/model.safetensors" ] || continue
    files=(export)
    for f in history.json loss.png train.log; do [ -f "$r/$f" ] && files+=("$f"); done
    tar -czf "$out/model-$n.tar.gz.tmp" -C "$r" "${files[@]}" 2>/dev/null \
      && mv "$out/model-$n.tar.gz.tmp" "$out/model-$n.tar.gz" || say "snapshot of $n failed"
  done
  return 0
}

write_config() {  # $1 file, $2 steps, $3 grid: demo architecture, loss and augmentation
  "$py" - "$1" "$2" "$3" "$batch" "$workers" <<'EOF'
import json, sys
cfg = json.load(open("models/weights/demo/config.json"))
cfg["model"]["grid"] = int(sys.argv[3])
cfg["train"].update(steps=int(sys.argv[2]), batch_size=int(sys.argv[4]), loader_workers=int(sys.argv[5]),
                    checkpoint_minutes=1.0, log_every=50, num_threads=1, seed=0)
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
EOF
}

train_all() {  # $1: run-folder prefix, $2: max minutes; config per name in $work/config-<name>.json
  local pids=() n p rc=0
  for n in "${names[@]}"; do
    "$py" -m cli.main train "${data[$n]}" --out "$work/$1-$n" --config "$work/config-$n.json" \
      --device "$device" --max-minutes "$2" --no-progress > "$work/$1-$n.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return $rc
}

say "calibration: ${names[*]} side by side for ${calibrate} s, batch $batch, $workers loader workers each"
for n in "${names[@]}"; do write_config "$work/config-$n.json" 1000000 "${grid[$n]}"; done
train_all calib "$(awk -v s="$calibrate" 'BEGIN{print s/60}')" \
  || { say "calibration failed"; tail -n 20 "$work"/calib-*.log | tee -a "$out/log.txt"; exit 1; }
for n in "${names[@]}"; do
  steps=$("$py" - "$work/calib-$n/history.json" "$minutes" <<'EOF'
import json, sys
h = json.load(open(sys.argv[1]))
rate = h["step"] / max(h["train_seconds"], 1e-6)
print(max(500, int(rate * float(sys.argv[2]) * 60 * 0.93)))
EOF
)
  say "$n (grid ${grid[$n]}): $(cut -c1-60 < "$work/calib-$n/history.json") -> $steps steps in $minutes min"
  write_config "$work/config-$n.json" "$steps" "${grid[$n]}"
done

say "training: ${names[*]} side by side, at most $minutes min each"
( while sleep 60; do
    say "load: GPU $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || echo -), CPU $(cut -d' ' -f1-3 /proc/loadavg)"
    snapshot
  done ) & snap=$!
rc=0; train_all run "$(awk -v m="$minutes" 'BEGIN{print m + 0.5}')" || rc=$?
kill "$snap" 2>/dev/null || true
for n in "${names[@]}"; do cp "$work/run-$n.log" "$work/run-$n/train.log" 2>/dev/null || true; done
snapshot
for n in "${names[@]}"; do
  say "$n: $(tr -d '\n ' < "$work/run-$n/export/info.json" 2>/dev/null | cut -c1-400)"
  tail -n 3 "$work/run-$n.log" | tee -a "$out/log.txt"
done
say "done (training exit status $rc)"
exit $rc
