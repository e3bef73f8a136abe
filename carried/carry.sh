#!/bin/bash
# Copy a run's resumable state (last.pt, best.pt, the top-*.pt models kept with train.keep_top,
# config.yaml, metrics.jsonl) from runs/RUN into carried/RUN, replacing what was there, refuse a file
# over the 2 MB that carried/ allows, and print where the run stands.
# Usage: bash carried/carry.sh RUN [RUN ...]
set -euo pipefail
LIMIT=$((2 * 1000 * 1000))
FILES="last.pt best.pt config.yaml metrics.jsonl"
for run in "$@"; do
  [ -f "runs/$run/last.pt" ] || { echo "runs/$run/last.pt does not exist" >&2; exit 2; }
  TOP=$(cd "runs/$run" && ls top-*.pt 2>/dev/null || true)
  for f in $FILES $TOP; do
    if [ -f "runs/$run/$f" ] && [ "$(stat -c %s "runs/$run/$f")" -gt $LIMIT ]; then
      echo "runs/$run/$f is $(stat -c %s "runs/$run/$f") bytes, over the 2 MB carried/ allows; nothing copied" >&2
      exit 2
    fi
  done
  mkdir -p "carried/$run"
  rm -f "carried/$run"/top-*.pt
  for f in $FILES $TOP; do
    if [ -f "runs/$run/$f" ]; then cp "runs/$run/$f" "carried/$run/"; fi
  done
  python3 - "carried/$run/last.pt" <<'PY'
import sys

import torch

state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["run_state"]
print(sys.argv[1], {k: v for k, v in state.items() if isinstance(v, (int, float, str))})
PY
done
