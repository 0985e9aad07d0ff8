#!/usr/bin/env bash
# Trains and evaluates recipe-ablation arms one after another, each a job file of a folder that
# includes the folder's base.yaml (jobs/ablations/ml100k/):
#   scripts/ablate.sh jobs/ablations/ml100k [ARM ...]      (default: every arm, in name order)
# Each arm trains under mpirun with --auto-resume (a stopped series continues where it was), then is
# evaluated on the test split with its BEST checkpoint. The numbers stay in each run's report folder
# (fit.json, valid-log.jsonl, eval-test.json); scripts/ablation-table.py prints the table.
# ILLMREC_BIN (default target/release/illmrec), NP (ranks, default 2) and MODELS (the models each arm
# trains, space-separated, default "illmrec"; e.g. "illmrec illmrec:title" compares prompt variants on
# the same job) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${ILLMREC_BIN:-target/release/illmrec}"
np="${NP:-2}"
read -r -a models <<< "${MODELS:-illmrec}"
dir="$1"
shift
if [ $# -gt 0 ]; then
  arms=("$@")
else
  mapfile -t arms < <(ls "$dir" | grep -v '^base' | sed 's/\.yaml$//' | sort)
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for arm in "${arms[@]}"; do
  job="$dir/$arm.yaml"
  for model in "${models[@]}"; do
    echo "== $arm $model ($(date -u +%H:%M:%S))"
    # A run that fails (a rank killed, a timeout on a loaded machine) continues from its last
    # checkpoint, up to three tries.
    for try in 1 2 3; do
      if mpirun --oversubscribe -np "$np" "$bin" train --job "$job" --model "$model" --auto-resume; then
        break
      fi
      [ "$try" -lt 3 ] || { echo "== $arm $model failed three times" >&2; exit 1; }
      echo "== $arm $model: try $try failed; resuming"
    done
    "$bin" eval --job "$job" --model "$model" --protocol sampled:100 --protocol full
  done
done
