#!/usr/bin/env bash
# The project's test command (README, CI): set-up, format and lint checks, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
# The tests start real launchers (mpirun, srun) and compare BLAS and candle products: they need the
# cluster features. The default build (no features) is checked too, since it is the README's first command.
cargo clippy --all-targets --locked --features mpi,openblas -- -D warnings
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --features mpi,openblas
