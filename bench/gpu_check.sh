#!/usr/bin/env bash
# One prepared GPU check for the device machine (torch + transformers, no vLLM, no network): the 0.5B preset's
# training throughput, MFU, KD/CE, fused head and packing, each mode in its own process. Writes JSON lines and the
# log under $OUT (default ./gpu-out). About 3-6 minutes on an H100/H200; run as:
#   bash bench/gpu_check.sh            (device tool: command "bash bench/gpu_check.sh", timeout_s 540)
set -euo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
# KD vs CE, fused head and packing (varied lengths) at vocabulary 152k, bf16 autocast; the last line is the summary.
timeout 480 python bench/train.py --preset gpu-0.5b --modes ce,kd_offline,ce_fused,kd_fused,packing \
  > "$OUT/train_gpu_0.5b.jsonl" 2> "$OUT/train_gpu_0.5b.log" || echo "bench/train.py exit $?" >> "$OUT/env.txt"
tail -n 1 "$OUT/train_gpu_0.5b.jsonl" || true
