#!/usr/bin/env python
"""Where one training step's time goes: the cached-code step of bench_throughput.py under torch.profiler.

    python scripts/profile_step.py --llm qwen2.5-0.5b --capacity 4096 --micro-batch-tokens 32768 \\
        --loss-impl fused --compile [--trace runs/profile/trace.json]

Prints the forward / backward / optimizer-step split (device-synchronised wall times) and the
operators with the most device (or CPU, without CUDA) time; --trace writes a Chrome trace.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="tiny")
    ap.add_argument("--viq", default="viq-tiny")
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--micro-batch-tokens", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--loss-impl", choices=["chunked", "fused"], default="chunked")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = ap.parse_args()
    try:
        profile_step(args)
    except (ValueError, FileNotFoundError) as e:  # an unknown preset or path, a bad size: one line
        sys.exit(f"profile_step: error: {str(e).strip().splitlines()[0]}")


def profile_step(args):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mllm.bench.throughput import BenchTrainer, StepSettings, bench_config, spec_for

    settings = StepSettings(micro_batch_packs=max(1, args.micro_batch_tokens // args.capacity),
                            gradient_checkpointing=args.gradient_checkpointing, loss_impl=args.loss_impl,
                            compile_layers=args.compile, zero_stage=args.zero_stage)
    spec = spec_for(args.llm, args.capacity, viq=args.viq, image_size=args.image_size, steps=1, warmup=args.warmup,
                    settings=settings)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = BenchTrainer(bench_config(spec, "codes", run_dir), spec, "codes")
        batch = trainer.bench_batches[0]
        for _ in range(args.warmup):
            trainer.train_step([batch])
        # the step's three phases, each closed by a device sync
        engine, phases = trainer.engine, {}
        sync()
        t0 = time.perf_counter()
        out = engine(trainer.prepare_batch(batch))
        sync()
        phases["forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.backward(out["loss_sum"] / max(int(batch["n_supervised"]), 1), scale_wrt_gas=False)
        sync()
        phases["backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.step()
        sync()
        phases["optimizer step"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.train_step([batch])
        whole = time.perf_counter() - t0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            trainer.train_step([batch])
            sync()
    tokens = int(batch["n_real_tokens"])
    print(f"{args.llm} at {args.capacity} x {settings.micro_batch_packs} packs ({tokens} real tokens), "
          f"{'compiled' if args.compile else 'eager'}, loss {args.loss_impl}, checkpointing {args.gradient_checkpointing}")
    for name, seconds in phases.items():
        print(f"  {name:15s} {seconds * 1e3:8.1f} ms")
    print(f"  {'train_step':15s} {whole * 1e3:8.1f} ms  ({tokens / whole:,.0f} tokens/s)")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
