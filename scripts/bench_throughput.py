#!/usr/bin/env python
"""Training-step throughput of cached codes vs an encoder in the loop; prints JSON.

    python scripts/bench_throughput.py                                   # tiny + viq-tiny on CPU
    python scripts/bench_throughput.py --llm qwen2.5-0.5b --viq viq-1.3b --capacity 4096 --image-size 448
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="tiny", help="LLM preset or local checkpoint")
    ap.add_argument("--viq", default="viq-tiny", help="ViQ preset or directory (its ViT is the continuous encoder)")
    ap.add_argument("--capacity", type=int, default=4096, help="packed sequence length")
    ap.add_argument("--image-size", type=int, default=448, help="square image side in pixels (multiple of 28)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--arms", default="codes,online_viq,continuous_frozen,continuous_trainable")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    from mllm.bench import run_throughput_benchmark

    try:
        result = run_throughput_benchmark(
            args.llm, args.viq, args.capacity, args.image_size, args.steps, args.warmup, args.device, args.dtype,
            tuple(a for a in args.arms.split(",") if a), args.gradient_checkpointing,
        )
    except ValueError as e:
        sys.exit(f"bench_throughput: error: {e}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
