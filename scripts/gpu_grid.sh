#!/usr/bin/env bash
# The paper's full grid on a GPU machine: five methods x four labelled fractions x two seeds,
# ResNet-50-FPN at native 256 px with the paper's proposal counts (--full-heads), CoNSeP split
# 7:1:2 by source tile. Resumable: rerun the same command after an interruption.
#
#   bash scripts/gpu_grid.sh [OUT_DIR] [ITERATIONS]
#
# Not run in CI. Add --weights FILE (a local torchvision ResNet-50 state dict) to start from
# ImageNet weights as the paper does.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/exp/consep-gpu}
ITERS=${2:-6000}
.venv/bin/napari-rmt experiment \
  --coco ../shared/data/consep/annotations.json --group-key source_tile \
  --fractions 0.02 0.05 0.1 0.2 --methods supervised stac ubt rmt rmt-noreg --seeds 0 1 \
  --iterations "$ITERS" --burn-in $((ITERS / 3)) --batch 4 --backbone resnet50 --full-heads \
  --threshold 0.7 --device cuda --checkpoint-every 500 --out "$OUT"
