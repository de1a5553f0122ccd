#!/usr/bin/env bash
# Issue 15's missing figure, for a session that is lent a CUDA GPU for a few minutes: train one model per
# phantom family (geometric only, template only; both randomised) side by side on the one GPU, each for
# at most TRAIN_MINUTES, then score each on held-out randomised cases of the *other* family (and its
# own), with both baselines in the same run. Everything it makes goes under OUT ($OUT on the device
# machine), so the checkpoints come back even if a later step runs out of time.
#
# usage: bash deploy/gpu/cross_family.sh [OUT]      env: CASES (per family, 300), TRAIN_MINUTES (6),
#        HELDOUT (per family, 16), WORKERS (phantom processes, all CPUs), DEVICE (cuda)
# Not yet run on a GPU (written 2026-12-03 without one); each piece is a tested CLI command. Expect to
# fix paths or timings on its first run: give it a timeout that leaves room for a second try.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-${OUT:-$repo/runs/cross-family}}
cases=${CASES:-300}
minutes=${TRAIN_MINUTES:-6}
heldout=${HELDOUT:-16}
workers=${WORKERS:-$(nproc)}
device=${DEVICE:-cuda}
py=${PYTHON:-$repo/.venv/bin/python}
sp() { "$py" -m cli.main "$@"; }
say() { printf '[cross-family %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/log.txt"; }
mkdir -p "$out"
cd "$repo"
say "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo none)"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/log.txt"

data=$out/data
for fam in geometric template; do
  say "phantom: $cases randomised $fam training cases, $heldout held-out"
  sp phantom --out "$data/train-$fam" --cases "$cases" --seed 0 --family "$fam" --randomise --training-only \
     --workers "$workers" > "$out/phantom-$fam.log" 2>&1
  sp phantom --out "$data/heldout-$fam" --cases "$heldout" --seed 300000 --family "$fam" --randomise \
     --training-only --workers "$workers" >> "$out/phantom-$fam.log" 2>&1
done

# The demo config (architecture, loss, augmentation), from scratch: a single-family model must not
# start from the demo weights, which have seen both families.
"$py" - "$out/config.json" <<'EOF'
import json, sys
cfg = json.load(open("models/weights/demo/config.json"))
cfg["train"]["steps"] = 16000
cfg["train"]["checkpoint_minutes"] = 1.0
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
EOF

say "train both families side by side for at most $minutes min each"
pids=()
for fam in geometric template; do
  sp train "$data/train-$fam" --out "$out/run-$fam" --config "$out/config.json" --device "$device" \
     --max-minutes "$minutes" --no-progress > "$out/train-$fam.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || say "a training process exited $?"; done

for fam in geometric template; do
  info=$out/run-$fam/export/info.json
  [ -f "$info" ] && say "$fam model: $(tr -d '\n' < "$info" | head -c 300)"
done

say "evaluate: each model on both families' held-out cases (baselines in the same run)"
for model in geometric template; do
  for test in geometric template; do
    sp evaluate "$out/run-$model/export" "$data/heldout-$test" --device "$device" \
       --out "$out/eval/$model-on-$test" > "$out/eval-$model-on-$test.log" 2>&1 \
      || say "evaluate $model on $test exited $?"
  done
done
"$py" - "$out" <<'EOF' | tee -a "$out/log.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| trained on -> tested on | model Dice>6 mean (median) | core baseline | territory baseline | DEFUSE-3 agreement | no-stroke false T>6 median mL |")
print("|---|---|---|---|---|---|")
for p in sorted((out / "eval").glob("*/summary.json")):
    s = json.loads(p.read_text())
    m, c, t = s["model"], s["core"], s["territory"]
    ns = (s.get("no_stroke") or {}).get("model", {}).get("false_tmax6_ml_median")
    print(f"| {p.parent.name} | {m['dice6_mean']:.3f} ({m['dice6_median']:.3f}) | {c['dice6_mean']:.3f} | "
          f"{t['dice6_mean']:.3f} | {m['defuse3_agreement']:.2f} | {ns if ns is None else round(ns, 1)} |")
EOF
say "done"
