#!/usr/bin/env bash
# GPU check of the geometry benchmarks at GPT-2-small size (12 layers, width 768, 12 heads).
# Usage: bash benchmarks/gpu_check.sh            (from the repository root, venv active; < 5 min on one GPU)
# Fails (exit 2) with a clear message if jax sees no GPU. The same entry point runs on CPU at tiny
# size: python benchmarks/bench_geometry.py --layers 1 --width 32 --pairs 4 --resp-len 4
#
# Vocabulary 8192 instead of 50257: the layer-wise path touches the token embedding only through its
# gather structure, so V enters only through the read-out (T x V logits); a 50257 vocabulary would add
# 2 x 38.6M parameters to the per-token Jacobian of (b) (64 x 163M floats = 42 GB) without changing what
# is measured. Pass VOCAB=50257 to override.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || { echo "gpu_check: FAILED — no GPU visible to jax (install jax[cuda12] and check nvidia-smi)" >&2; exit 2; }
import jax, sys
sys.exit(0 if jax.default_backend() == "gpu" else 1)
PY
mkdir -p out
VOCAB="${VOCAB:-8192}"
PAIRS="${PAIRS:-64}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# 12 x 768 GPT-2-small body, T = 32 response tokens after an 8-token prompt; chunks of 16 pairs keep the
# vmap path at 2 x 16 x |theta| floats; the baseline loop (128 backward passes) is kept for the ratio.
timeout 280 python benchmarks/bench_geometry.py --require-gpu \
  --layers 12 --width 768 --heads 12 --vocab "$VOCAB" --prompt-len 8 --resp-len 32 \
  --pairs "$PAIRS" --chunk 16 --mem-pairs 64,512 --mem-chunk 16 --repeats 2 --peak-n 8192 --json \
  | tee out/gpu_check.json
python - <<'PY'
import json
r = json.load(open("out/gpu_check.json"))
pairs = r["config"]["pairs"]
for k, v in r.get("a_sequence_gram", {}).items():
    print(f"(a) {k:14s} {pairs / v['seconds']:9.1f} pairs/s  {100 * v['fraction_of_matmul_peak']:5.1f}% of matmul peak"
          + (f"  x{v['speedup_vs_baseline']:.1f} vs baseline" if "speedup_vs_baseline" in v else ""))
for k, v in r.get("b_token_gram", {}).items():
    print(f"(b) {k:14s} {1 / v['seconds']:9.2f} token maps/s" + (f"  x{v['speedup_vs_baseline']:.1f}" if "speedup_vs_baseline" in v else ""))
PY
