#!/usr/bin/env python
"""Where one training step's time goes: the cached-code step of bench_throughput.py under torch.profiler.

    python scripts/profile_step.py --llm qwen2.5-0.5b --capacity 4096 --micro-batch-tokens 32768 \\
        --loss-impl fused --compile [--trace runs/profile/trace.json]

The steps are bench_throughput.py's own (`mllm.bench.throughput.timed_train_steps`: warm-up,
then timed optimizer steps alternating its two micro-batches), so the profiled step is a
benchmark step: prints each timed step's wall time as the benchmark records it, the forward /
backward / optimizer-step split (device-synchronised), the profiled step's wall time, and the
operators with the most device (or CPU, without CUDA) time; --trace writes a Chrome trace.
"""
import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
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
    ap.add_argument("--optimizer", default="config", help="optim.implementation (mllm/optimizers.py)")
    ap.add_argument("--compile-mode", default="default", help="model.compile_mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--steps", type=int, default=4, help="timed benchmark steps before the profiled one")
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

    from mllm.bench.throughput import BenchTrainer, StepSettings, bench_config, spec_for, timed_train_steps

    settings = StepSettings(micro_batch_packs=max(1, args.micro_batch_tokens // args.capacity),
                            gradient_checkpointing=args.gradient_checkpointing, loss_impl=args.loss_impl,
                            compile_layers=args.compile, zero_stage=args.zero_stage, optimizer=args.optimizer,
                            compile_mode=args.compile_mode)
    spec = spec_for(args.llm, args.capacity, viq=args.viq, image_size=args.image_size, steps=args.steps,
                    warmup=args.warmup, settings=settings)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = BenchTrainer(bench_config(spec, "codes", run_dir), spec, "codes")
        batch = trainer.bench_batches[0]
        bench_steps = [m["seconds"] for m in timed_train_steps(trainer, spec)]
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
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = profile(activities=activities)
        # one benchmark step, then the next one under the profiler (alternating batches, as timed)
        steps = timed_train_steps(trainer, replace(spec, warmup=0, steps=2), profiler=prof)
        whole = steps[0]["seconds"]
    tokens = int(batch["n_real_tokens"])
    print(f"{args.llm} at {args.capacity} x {settings.micro_batch_packs} packs ({tokens} real tokens), "
          f"{'compiled' if args.compile else 'eager'}, loss {args.loss_impl}, checkpointing {args.gradient_checkpointing}")
    print("  benchmark steps " + ", ".join(f"{s * 1e3:.1f}" for s in bench_steps)
          + f" ms (mean {sum(bench_steps) / len(bench_steps) * 1e3:.1f}, as bench_throughput.py reports it)")
    for name, seconds in phases.items():
        print(f"  {name:15s} {seconds * 1e3:8.1f} ms")
    print(f"  {'train_step':15s} {whole * 1e3:8.1f} ms  ({tokens / whole:,.0f} tokens/s; the step before the profiled one)")
    print(f"  {'profiled step':15s} {steps[1]['seconds'] * 1e3:8.1f} ms  (wall, under the profiler)")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
