#!/usr/bin/env bash
# Geometry benchmarks (bench_geometry_scale.py) on one GPU, or the same benchmarks at tiny size anywhere.
#
#   bash benchmarks/gpu_check.sh            GPU: 0.42M-parameter model (T = 32, 64 pairs), GPT-2-small size
#                                           (12 x 768, V 50257, P 16, T 16) and the width-64..768 roofline;
#                                           exits 2 with a clear message if jax sees no GPU
#   bash benchmarks/gpu_check.sh --tiny     the same script, rows and table at tiny size on whatever backend
#                                           jax has (CPU in the tests; seconds)
#
# Results: out/geometry_scale_<size>.json, out/roofline.{json,png} (OUT=dir to change). Each row runs in a
# fresh subprocess; peak memory is that process's VmHWM (host RSS -- on a GPU the device memory is held
# by XLA's allocator, see the JSON's model_bytes_per_pair for the cost model's per-pair working set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
if [[ "${1:-}" == "--tiny" ]]; then
  "$PY" benchmarks/bench_geometry_scale.py --size tiny --repeats 1 --peak-n 256 --out "$OUT"
  exit $?
fi
"$PY" - <<'PY' || { echo "gpu_check: FAILED — no GPU visible to jax (install jax[cuda12] and check nvidia-smi)" >&2; exit 2; }
import jax, sys
sys.exit(0 if jax.default_backend() == "gpu" else 1)
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/bench_geometry_scale.py --require-gpu --size small --peak-n 8192 --out "$OUT"
"$PY" benchmarks/bench_geometry_scale.py --require-gpu --size gpt2 --repeats 2 --peak-n 8192 --out "$OUT"
"$PY" benchmarks/bench_geometry_scale.py --require-gpu --roofline --peak-n 8192 --out "$OUT"
