#!/usr/bin/env bash
# Measures the README's two commands as a new user meets them: it REMOVES Open MPI, OpenBLAS, libclang
# and llama-cpp-python from this machine (what scripts/setup.sh installs), turns pip's cache off, then
# runs each command from its own clean clone of this repository's HEAD next to the repository:
#   scripts/fresh-machine.sh --remove-packages     (about 40 min on 2 cores)
# `cargo run -- run` must pass without the packages; `.ci/run` (which calls scripts/test.sh) installs
# them again. Prints each command's status and wall seconds; the logs land beside the clones.
set -uo pipefail
[ "${1:-}" = "--remove-packages" ] || { echo "usage: $0 --remove-packages (it uninstalls system packages)" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
parent="$(dirname "$repo")"
as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
"${as_root[@]}" apt-get remove -y -q openmpi-bin libopenmpi-dev libopenmpi3 openmpi-common libclang-dev \
  libclang-14-dev libclang1-14 libopenblas-dev libopenblas-pthread-dev libopenblas0 libopenblas0-pthread \
  libcoarrays-openmpi-dev libcaf-openmpi-3 >/dev/null
python3 -m pip uninstall -y -q llama-cpp-python
export PIP_NO_CACHE_DIR=1
command -v mpirun >/dev/null && echo "mpirun is still here" >&2
for step in first ci; do
  dir="$parent/illmrec-fresh-$step"
  rm -rf "$dir" && git clone -q "$repo" "$dir" && cd "$dir" || exit 1
  start=$(date +%s)
  if [ "$step" = first ]; then cargo run -- run > "$dir.log" 2>&1; else bash .ci/run > "$dir.log" 2>&1; fi
  echo "$step: status $?, $(( $(date +%s) - start )) s (log: $dir.log)"
done
