#!/usr/bin/env bash
# The frozen LLM's forward + input-gradient backward (SmolLM2-135M-Instruct, random input embeddings,
# loss = sum(hidden * fixed random)), illmrec against PyTorch, back to back on this machine, and the
# ratio table the README shows:
#   scripts/bench-vs-torch.sh [THREADS ...]          (default: 1 2)
# illmrec: `bench llm` with f32 products and with bf16 products; PyTorch: scripts/reference/torch_step.py
# (sdpa attention, f32; python3 -m pip install -r scripts/reference/requirements-torch.txt).
# ILLMREC_BIN (default target/release/illmrec), SHAPES (default 4x128,1x512,2x537) and REPS (PyTorch
# timed steps, default 2) can be set. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${ILLMREC_BIN:-target/release/illmrec}"
shapes="${SHAPES:-4x128,1x512,2x537}"
job=jobs/ml100k-smollm2.yaml
out="$(mktemp)"
for threads in "${@:-1 2}"; do
  for threads1 in $threads; do
    for matmul in f32 bf16; do
      RAYON_NUM_THREADS=$threads1 "$bin" bench llm --job "$job" --shapes "$shapes" --matmul "$matmul" 2>/dev/null |
        sed "s/^{/{\"side\":\"illmrec-$matmul\",/" >> "$out"
    done
    python3 scripts/reference/torch_step.py --shapes "$shapes" --threads "$threads1" --reps "${REPS:-2}" 2>/dev/null |
      sed 's/^{/{"side":"torch",/' >> "$out"
  done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def key(r):
    return (r.get("batch"), r.get("tokens", r.get("T")), r["threads"])
by = {}
for r in rows:
    by.setdefault(key(r), {})[r["side"]] = r
print("| batch x tokens | threads | illmrec f32 ms/token | illmrec bf16 ms/token | PyTorch ms/token | f32 vs PyTorch | bf16 vs PyTorch | peak RSS illmrec f32 / bf16 / PyTorch |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for (b, t, th), s in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][0] * kv[0][1])):
    f, h, p = s.get("illmrec-f32"), s.get("illmrec-bf16"), s.get("torch")
    ms = lambda r: r["ms_per_token"] if r else float("nan")
    ratio = lambda r: p["ms_per_token"] / r["ms_per_token"] if r and p else float("nan")
    rss = lambda r, k: f"{r[k] / 1024:.1f}" if r and r.get(k) else "-"
    print(f"| {b} x {t} | {th} | {ms(f):.2f} | {ms(h):.2f} | {ms(p):.2f} | {ratio(f):.2f}x | {ratio(h):.2f}x | "
          f"{rss(f, 'step_peak_rss_mib')} / {rss(h, 'step_peak_rss_mib')} / {rss(p, 'step_peak_rss_mb')} GiB |")
PY
rm -f "$out"
