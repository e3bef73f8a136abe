#!/bin/bash
# One sitting of the carried long runs on a lent GPU, in one prepared device call.
#
# Here, once a session:   bash carried/gpu_sitting.sh --prepare
#   copies the Omniglot zips ($METALOOP_DATA/omniglot) and the decoded cache
#   ($METALOOP_CACHE/omniglot-28-*.pt) into .gpu/ (git-ignored, 39 MB), so the device machine
#   neither decodes nor downloads anything.
# On the device:          run(command="bash carried/gpu_sitting.sh SECONDS RUN [RUN ...]",
#                             carry=[".gpu"], timeout_s=SECONDS + 120)
#   resumes each carried/RUN at once on the GPU (--device cuda, no time budget), stops them all with
#   SIGINT after SECONDS (each writes last.pt at the step it stops after; nothing is tested) and packs
#   the run folders, without their step-*.pt, into $OUT/gpu_runs.tgz: one file comes back.
# Back here:              tar -xzf FILES_AT/gpu_runs.tgz -C runs/   then   bash carried/carry.sh RUN
#   (this replaces runs/RUN: stop a CPU run of it first; test a run on the CPU with metaloop eval,
#   resume it on the CPU with --device cpu). DEVICE=cpu makes a dry run of the device call here.
set -euo pipefail

if [ "${1:-}" = "--prepare" ]; then
  : "${METALOOP_DATA:?set METALOOP_DATA to the folder holding omniglot/}"
  : "${METALOOP_CACHE:?set METALOOP_CACHE to the folder holding omniglot-28-*.pt}"
  mkdir -p .gpu/data/omniglot .gpu/cache
  cp -r "$METALOOP_DATA"/omniglot/*.zip "$METALOOP_DATA"/omniglot/splits .gpu/data/omniglot/
  cp "$METALOOP_CACHE"/omniglot-28-*.pt .gpu/cache/
  du -sh .gpu
  exit 0
fi

if [ $# -lt 2 ]; then
  echo "usage: bash carried/gpu_sitting.sh SECONDS RUN [RUN ...]   (or --prepare, here)" >&2
  exit 2
fi
SECONDS_ON_GPU=$1; shift
[ -d .gpu/data/omniglot ] || { echo ".gpu/data/omniglot is missing: run --prepare here and carry .gpu" >&2; exit 2; }
export PYTHONPATH=$PWD/src METALOOP_DATA=$PWD/.gpu/data METALOOP_CACHE=$PWD/.gpu/cache
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_sitting}; mkdir -p "$OUT" runs/gpu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

for run in "$@"; do
  [ -f "carried/$run/last.pt" ] || { echo "carried/$run/last.pt does not exist" >&2; exit 2; }
  rm -rf "runs/gpu/$run"; cp -r "carried/$run" "runs/gpu/$run"
  timeout -s INT "$SECONDS_ON_GPU" python3 -m metaloop train --resume "runs/gpu/$run" --device "${DEVICE:-cuda}" \
      --no-progress --set train.max_minutes=null > "runs/gpu/$run/gpu_sitting.log" 2>&1 &
done
wait || true

for run in "$@"; do
  rm -f runs/gpu/"$run"/step-*.pt
  echo "$run: $(tail -n 1 "runs/gpu/$run/gpu_sitting.log")"
done
tar -C runs/gpu -czf "$OUT/gpu_runs.tgz" "$@"
ls -la "$OUT"
