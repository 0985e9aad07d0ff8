#!/usr/bin/env bash
# The GPU check: does I-LLMRec train the same on the GPU as on the CPU, and how fast is the frozen LLM
# there? One command, on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc), Open MPI and libclang:
#   scripts/gpu-check.sh
# 1. Builds `--features cuda` (candle's CUDA kernels and NCCL; CUDA_COMPUTE_CAP as candle reads it).
# 2. The demo's synthetic catalog (jobs/demo.yaml: synth, prepare, features), then 20 training steps of
#    the tiny job (tiny random Llama) and 20 of jobs/demo-smollm2.yaml (SmolLM2-135M-Instruct, L_RERI +
#    L_RISA), each once with `model.device: cpu` and once with `model.device: cuda`, from the same seed;
#    every step's loss must agree within a relative 1e-3 (the script fails otherwise).
# 3. `illmrec bench llm --device cuda` (forward + input-gradient backward of SmolLM2, f32) and, where
#    python3's torch sees a GPU, scripts/reference/torch_step.py --device cuda on the same shapes.
# It prints one table and leaves the logs in target/gpu-check/. Set ILLMREC_BIN to use a binary built
# elsewhere (no build then), FEATURES for other build features (default: cuda), STEPS for another step
# count, SHAPES for bench llm (default 4x128,1x512,2x537), and DEVICE=cpu to run every part on the CPU
# (a check of the script itself on a machine without a GPU: both sides then agree exactly).
# Needs .cache/assets/smollm2 (scripts/fetch-assets.sh smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
device="${DEVICE:-cuda}"
steps="${STEPS:-20}"
shapes="${SHAPES:-4x128,1x512,2x537}"
work="$root/target/gpu-check"
mkdir -p "$work"

if [ "$device" != cpu ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
    { echo "gpu-check: no nvidia-smi: this machine has no NVIDIA GPU (DEVICE=cpu checks the script)" >&2; exit 1; }
fi
if [ -n "${ILLMREC_BIN:-}" ]; then
  bin="$ILLMREC_BIN"
else
  features="${FEATURES:-cuda}"
  [ "$device" = cpu ] && features="${FEATURES:-}"
  echo "gpu-check: cargo build --release --features '$features'"
  cargo build --release --locked --features "$features" 2>&1 | tail -n 3
  bin="$root/target/release/illmrec"
fi
[ -e .cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-assets.sh smollm2

echo "gpu-check: the demo catalog (jobs/demo.yaml)"
"$bin" synth --job jobs/demo.yaml > "$work/synth.log" 2>&1
"$bin" prepare --job jobs/demo.yaml > "$work/prepare.log" 2>&1
"$bin" features --job jobs/demo.yaml > "$work/features.log" 2>&1

# One job per (base job, device): the base job's data and features, its own run name.
overlay() {  # BASE NAME DEVICE
  cat > "$work/$2.yaml" <<YAML
include: [$root/jobs/$1]
name: $2
data: {dataset: demo}
model: {device: "$3"}
YAML
  echo "$work/$2.yaml"
}
pairs=()
: > "$work/wall.txt"
for base in demo.yaml demo-smollm2.yaml; do
  tag="${base%.yaml}"
  # Side "cpu" is the reference, side "dev" the device under test.
  for side in cpu dev; do
    name="gpucheck-$tag-$side"
    on=cpu
    [ "$side" = dev ] && on="$device"
    job="$(overlay "$base" "$name" "$on")"
    echo "gpu-check: $steps steps of $base on $on"
    start=$(date +%s)
    "$bin" train --job "$job" --model illmrec --stop-after "$steps" > "$work/$name.log" 2>&1 ||
      { tail -n 20 "$work/$name.log" >&2; exit 1; }
    echo "$name $(( $(date +%s) - start ))" >> "$work/wall.txt"
  done
  pairs+=("$tag")
done

echo "gpu-check: bench llm on $device ($shapes)"
"$bin" bench llm --job jobs/demo-smollm2.yaml --shapes "$shapes" --matmul f32 --device "$device" \
  2>/dev/null | sed 's/^{/{"side":"illmrec",/' > "$work/bench.jsonl"
if [ "$device" != cpu ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  python3 scripts/reference/torch_step.py --shapes "$shapes" --device cuda --reps 3 2>/dev/null |
    sed 's/^{/{"side":"torch",/' >> "$work/bench.jsonl" || true
else
  echo "gpu-check: no PyTorch with a GPU here: the PyTorch column stays empty"
fi

python3 - "$work" "$device" "${pairs[@]}" <<'PY'
import json, os, sys
work, device, tags = sys.argv[1], sys.argv[2], sys.argv[3:]
store = "illmrec-demo/store"  # jobs/demo.yaml's storage root
wall = dict(l.split() for l in open(os.path.join(work, "wall.txt")))
def log(name):
    path = os.path.join(store, "runs", f"{name}-illmrec", "report", "train-log.jsonl")
    return [json.loads(l) for l in open(path)]
ok = True
print(f"| job | steps | loss at step 1 (cpu / {device}) | loss at the last step | worst relative difference (step) | wall s cpu / {device} |")
print("|---|---:|---|---|---|---|")
for tag in tags:
    a, b = log(f"gpucheck-{tag}-cpu"), log(f"gpucheck-{tag}-dev")
    if len(a) != len(b) or not a:
        print(f"| {tag} | {len(a)} vs {len(b)} | steps differ | | | |"); ok = False; continue
    rel = [(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12), x["step"]) for x, y in zip(a, b)]
    worst = max(rel)
    ok &= worst[0] <= 1e-3
    print(f"| {tag} | {len(a)} | {a[0]['loss']:.6f} / {b[0]['loss']:.6f} | {a[-1]['loss']:.6f} / {b[-1]['loss']:.6f} "
          f"| {worst[0]:.2e} ({worst[1]}) | {wall[f'gpucheck-{tag}-cpu']} / {wall[f'gpucheck-{tag}-dev']} |")
rows = [json.loads(l) for l in open(os.path.join(work, "bench.jsonl")) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault((r["batch"], r.get("tokens", r.get("T"))), {})[r["side"]] = r
print()
print(f"| batch x tokens | illmrec ms/token ({device}) | PyTorch ms/token | illmrec vs PyTorch |")
print("|---|---:|---:|---:|")
for (bt, t), s in sorted(by.items(), key=lambda kv: kv[0][0] * kv[0][1]):
    i, p = s.get("illmrec"), s.get("torch")
    ratio = f"{p['ms_per_token'] / i['ms_per_token']:.2f}x" if i and p else "-"
    print(f"| {bt} x {t} | {i['ms_per_token']:.3f} | {p['ms_per_token'] if p else '-'} | {ratio} |" if i else
          f"| {bt} x {t} | - | {p['ms_per_token']} | - |")
print("gpu-check:", "losses agree (relative difference <= 1e-3 at every step)" if ok else "LOSSES DIFFER beyond 1e-3")
sys.exit(0 if ok else 1)
PY
