#!/usr/bin/env bash
# GPU benchmark, prepared to run as one command on a CUDA machine (issue 18, item 8):
#   1. `jaxlm plan` for the ~1.1B Llama (jaxlm/configs/models/llama_1b.gin) on this GPU's memory;
#   2. train MFU: that Llama from scratch on synthetic batches (bench/gpu_train.gin: the largest of
#      16, 8, 4, 2 x 2048 tokens that fits, bf16 compute, AdamW, 30 steps), median tokens/s and MFU
#      over the steps after compilation;
#   3. eval throughput vs transformers on the same GPU: bench/score_generate.py (SmolLM2-135M, scoring
#      and greedy generation, batch 8 and 32) with transformers on CUDA.
# Usage: bash bench/gpu.sh [OUT_DIR]     (default $OUT or ./gpu_bench; everything is written there)
# Needs: a Python with this package and jax[cuda12] (or cuda13) installed (PYTHON=..., default
# .venv/bin/python, else python3), the SmolLM2 weight package, torch with CUDA for step 3 (skipped in one
# line when torch sees no GPU). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_bench}}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$OUT_DIR"
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu.log"; }

if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.devices()[0].platform == 'gpu' else 1)" 2>/dev/null; then
  echo "bench/gpu.sh: error: $PY has no JAX GPU backend (install the package with .[cuda12] or .[cuda13])" >&2
  exit 2
fi
"$PY" - <<'EOF' | tee -a "$OUT_DIR/gpu.log"
import jax, jaxlib, platform
d = jax.devices()[0]
print(f"devices: {len(jax.devices())} x {d.device_kind}; jax {jax.__version__}, jaxlib {jaxlib.__version__}, python {platform.python_version()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT_DIR/gpu.log" || true
HBM_GIB="$("$PY" -c "import jax; s = jax.devices()[0].memory_stats() or {}; print(int(s.get('bytes_limit', 80 * 2**30) / 2**30))")"

log "1/3 jaxlm plan (llama_1b, data=-1, ${HBM_GIB} GiB)"
"$PY" -m jaxlm.cli plan --gin_file=bench/gpu_train.gin --platform gpu --hbm_gib "$HBM_GIB" 2>&1 | tee "$OUT_DIR/plan.txt"

# XLA:CPU's memory estimate in `jaxlm plan` is pessimistic for a GPU: try the largest batch first.
for B in ${GPU_BATCHES:-16 8 4 2}; do
  log "2/3 jaxlm train: llama_1b, synthetic $B x 2048 tokens, bf16 compute, 30 steps"
  rm -rf "$OUT_DIR/train"
  if "$PY" -m jaxlm.cli train --gin_file=bench/gpu_train.gin --gin.BATCH_SIZE="$B" --workdir "$OUT_DIR/train" \
      > "$OUT_DIR/train_b$B.log" 2>&1; then
    tail -n 3 "$OUT_DIR/train_b$B.log" | tee -a "$OUT_DIR/gpu.log"; break
  fi
  log "batch $B failed (last line: $(tail -n 1 "$OUT_DIR/train_b$B.log" | cut -c1-160)); trying a smaller one"
done
"$PY" - "$OUT_DIR/train/metrics.jsonl" <<'EOF' | tee -a "$OUT_DIR/gpu.log"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
timed = rows[3:] or rows  # the first steps include compilation
tps = statistics.median(r["tokens_per_s"] for r in timed)
mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
print(f"train llama_1b bf16: median {tps:,.0f} tokens/s over steps {timed[0]['step']}-{timed[-1]['step']}, "
      f"MFU {statistics.median(mfu):.3f}" if mfu else "MFU: unknown device peak (jaxlm.train.metrics.PEAK_FLOPS)")
print(f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
EOF

log "3/3 eval throughput vs transformers (SmolLM2-135M, batch 8 and 32)"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$PY" bench/score_generate.py --batch 8,32 --new_tokens 64 --repeats 3 --torch_device cuda 2>&1 \
    | tee "$OUT_DIR/score_generate.txt" | tail -n 6 | tee -a "$OUT_DIR/gpu.log"
else
  log "skipped: torch sees no CUDA device (install torch with CUDA for the transformers comparison)"
fi
log "done: $OUT_DIR/gpu.log"
