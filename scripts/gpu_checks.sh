#!/usr/bin/env bash
# The checks a CPU cannot make, as one short run on a CUDA machine (about 10 minutes on an
# H100/H200): GPU tests, tokenizer encode MFU, training-step throughput of cached codes vs an
# encoder in the loop at real sizes, and a short bf16 DeepSpeed run with FlexAttention.
# Needs torch (CUDA), transformers >= 5 and deepspeed importable; writes JSON under $OUT_DIR.
#   OUT_DIR=/tmp/gpu bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/gpu_checks}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"

echo "== GPU tests"
$PY -m pytest tests/gpu -q 2>&1 | tee "$OUT_DIR/tests_gpu.log" | tail -3

echo "== tokenizer encode (viq-1.3b, bf16)"
timeout 180 $PY scripts/bench_viq.py --preset viq-1.3b --images 64 --repeats 3 --out "$OUT_DIR/bench_viq_1.3b.json" | tail -25

echo "== training step: codes vs encoder in the loop (qwen2.5-0.5b + viq-1.3b, 4k)"
timeout 240 $PY scripts/bench_throughput.py --llm qwen2.5-0.5b --viq viq-1.3b --capacity 4096 --image-size 448 \
    --steps 5 --warmup 2 --out "$OUT_DIR/bench_throughput_0.5b_4k.json" | tail -30

echo "== bf16 DeepSpeed run with FlexAttention (tiny, synthetic)"
timeout 240 deepspeed --num_gpus 1 scripts/train_mllm.py --max-steps 30 --run-dir "$OUT_DIR/train_tiny" \
    --set trainer.progress=false --set model.attn_implementation=flex_attention --set data.pad_to_capacity=true \
    2>&1 | grep -E "^\[train\]|error" | tail -8
tail -1 "$OUT_DIR/train_tiny/metrics.jsonl" 2>/dev/null
