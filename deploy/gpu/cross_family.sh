#!/usr/bin/env bash
# Issue 15's cross-family models on a lent GPU: geometric only, template only and both (mixed), trained
# from scratch side by side for the same time (train_side_by_side.sh, which says how and what comes back).
# usage: bash deploy/gpu/cross_family.sh PACKS_DIR OUT   (PACKS_DIR: train-geometric.npz, train-template.npz,
#        made here by `synthperf dataset pack`). Run 2026-12-04 on an H200: docs/model-card.md, "Cross-family".
set -euo pipefail
packs=${1:?PACKS_DIR}
exec bash "$(dirname "$0")/train_side_by_side.sh" "${2:?OUT}" \
  geometric="$packs/train-geometric.npz" template="$packs/train-template.npz" \
  mixed="$packs/train-geometric.npz,$packs/train-template.npz"
