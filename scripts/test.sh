#!/usr/bin/env bash
# The project's test command (README, CI): set-up, format and lint checks, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
