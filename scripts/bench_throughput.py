#!/usr/bin/env python
"""Training throughput of cached ViQ codes vs encoders in the loop, through the real trainer.

    python scripts/bench_throughput.py                      # tiny CPU mode without a GPU, the paper's grid with one
    python scripts/bench_throughput.py --mode paper --llm qwen2.5-0.5b --capacity 4096 \\
        --micro-batch-tokens 32768 --loss-impl fused --compile --sweep-levers --out-dir runs/bench
    deepspeed --num_gpus 8 scripts/bench_throughput.py --mode paper ...   # per-rank packs, global tokens/s
    python scripts/bench_throughput.py --llm qwen2.5-7b --capacity 4096 --gradient-checkpointing \\
        --loss-impl fused --lora-rank 64 --arms codes        # LoRA instead of full training (measured)
    python scripts/bench_throughput.py --estimate --llm qwen2.5-7b --capacity 4096 --gradient-checkpointing \\
        --loss-impl fused --lora-rank 64                     # full vs LoRA without a GPU (estimated)

Arms: codes (cached), online_viq (frozen ViQ encoder in the step), and <encoder>_frozen /
<encoder>_trainable for each continuous encoder: transformers' InternVLVisionModel / SiglipVisionModel
with the released configs (random init) and their stacks' projectors: internvit-300m, siglip-so400m
(both 256 positions per 448 px image, as the ViQ codes), siglip-so400m-llava-ov (LLaVA-OneVision's
729 positions per 384 px crop). Writes bench_throughput.{json,md,png} to --out-dir and prints the JSON.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {
    "tiny": {"llm": "tiny", "capacity": "1024", "viq": "viq-tiny", "encoders": "internvit-tiny,siglip-tiny,siglip-tiny-llava-ov",
             "image_size": 112, "steps": 2, "warmup": 1, "text_tokens": "16,48"},
    "paper": {"llm": "qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b", "capacity": "4096,16384", "viq": "viq-1.3b",
              "encoders": "internvit-300m,siglip-so400m,siglip-so400m-llava-ov", "image_size": 448, "steps": 5, "warmup": 2,
              "text_tokens": "64,192"},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default=None, help="defaults: tiny without CUDA, paper with it")
    ap.add_argument("--llm", help="comma-separated LLM presets or local checkpoints")
    ap.add_argument("--capacity", help="comma-separated packed context lengths")
    ap.add_argument("--viq", help="ViQ preset or directory (the online_viq arm and the code layout)")
    ap.add_argument("--encoders", help="comma-separated continuous encoders (mllm/bench/encoders.py)")
    ap.add_argument("--arms", default="", help="only these arms (default: all)")
    ap.add_argument("--image-size", type=int, help="square image side in pixels (multiple of 28)")
    ap.add_argument("--text-tokens", help="min,max text tokens per sample")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="packed tokens per micro-batch (packs = this // capacity); 0: one pack")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (step times and tokens/s are per optimizer step)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--checkpoint-fraction", type=float, default=1.0)
    ap.add_argument("--loss-impl", choices=["chunked", "fused"], default="chunked")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    ap.add_argument("--attn", default="auto", help="auto | sdpa | flex_attention | flash_attention_2")
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--deepspeed-config", default="", help="DeepSpeed JSON (e.g. configs/deepspeed/zero3_offload.json "
                    "for 7B on one GPU); default configs/deepspeed/zero<stage>.json")
    ap.add_argument("--optimizer", default="config",
                    help="optim.implementation: config (the DeepSpeed JSON's torch AdamW) | torch_foreach | torch_fused | "
                         "deepspeed_fused")
    ap.add_argument("--compile-mode", default="default",
                    help="model.compile_mode with --compile: default | reduce-overhead (CUDA graphs) | max-autotune[-no-cudagraphs]")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="LoRA of this rank on every linear layer (alpha 2 x rank, code rows trained in full); 0: full training")
    ap.add_argument("--estimate", action="store_true",
                    help="no measurement: peak memory and tokens/s of full training vs LoRA (--lora-rank, 64 if 0) on one "
                         "H200, estimated from first principles (mllm/bench/estimate.py), labelled as such")
    ap.add_argument("--sweep-levers", action="store_true",
                    help="also time cached codes from a naive step, adding this run's levers one at a time, then "
                         "the final settings with one more lever each (optimizer implementations, ZeRO 0/1/2, "
                         "2 micro-batches per optimizer step, CUDA graphs)")
    ap.add_argument("--sweep-variants", default="",
                    help="with --sweep-levers: only these one-lever variants of the final settings, by key "
                         "(optimizer_<impl>, zero<stage>, accum2, liger, fp8, cuda_graphs) or none; default: all that apply")
    ap.add_argument("--out-dir", default=None, help="write bench_throughput.{json,md,png} here")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def lever_steps(final):
    """(label, settings) from the naive step (1 pack, checkpointing, chunked CE, eager) to `final`."""
    from dataclasses import replace

    s = replace(final, micro_batch_packs=1, grad_accum=1, gradient_checkpointing=True, checkpoint_fraction=1.0,
                loss_impl="chunked", compile_layers=False)
    out = [("naive: 1 pack, full checkpointing, chunked CE, eager", s)]
    if final.micro_batch_packs > 1:
        s = replace(s, micro_batch_packs=final.micro_batch_packs)
        out.append((f"+ {final.micro_batch_packs} packs per micro-batch", s))
    if final.grad_accum > 1:
        s = replace(s, grad_accum=final.grad_accum)
        out.append((f"+ {final.grad_accum} micro-batches per optimizer step", s))
    if not final.gradient_checkpointing or final.checkpoint_fraction < 1.0:
        s = replace(s, gradient_checkpointing=final.gradient_checkpointing, checkpoint_fraction=final.checkpoint_fraction)
        out.append(("+ no checkpointing" if not final.gradient_checkpointing
                    else f"+ checkpointing {final.checkpoint_fraction:.0%} of layers", s))
    if final.loss_impl == "fused":
        s = replace(s, loss_impl="fused")
        out.append(("+ fused linear cross-entropy", s))
    if final.compile_layers:
        s = replace(s, compile_layers=True)
        out.append(("+ compiled decoder layers", s))
    return out


def lever_variants(final, cuda: bool, only: list[str] | None = None):
    """(label, settings): the final settings with one lever changed each, measured one at a time.
    `only`: keep these variant keys (optimizer_<impl>, zero<stage>, accum2, cuda_graphs)."""
    from dataclasses import replace

    out = {}
    for impl in ("torch_foreach", "torch_fused", *(("deepspeed_fused",) if cuda else ())):
        if impl != final.optimizer:
            out[f"optimizer_{impl}"] = (f"final, optimizer {impl}", replace(final, optimizer=impl))
    for stage in (0, 1, 2):
        if stage != final.zero_stage:
            out[f"zero{stage}"] = (f"final, ZeRO stage {stage}", replace(final, zero_stage=stage))
    if final.grad_accum == 1:
        out["accum2"] = ("final, 2 micro-batches per optimizer step", replace(final, grad_accum=2))
    if cuda and final.kernels == "none":
        out["liger"] = ("final, liger-kernel RMSNorm + SwiGLU", replace(final, kernels="liger"))
    if cuda and not final.fp8:
        out["fp8"] = ("final, torchao float8 linears (MFU against the bf16 peak)", replace(final, fp8=True))
    if cuda and final.compile_layers and final.compile_mode == "default":
        out["cuda_graphs"] = ("final, CUDA graphs (compile mode reduce-overhead)", replace(final, compile_mode="reduce-overhead"))
    if only:
        unknown = [k for k in only if k not in out]
        if unknown:
            raise ValueError(f"--sweep-variants: {', '.join(unknown)} not among this run's variants ({', '.join(out)})")
        return [out[k] for k in only]
    return list(out.values())


def main(argv=None):
    args = parse_args(argv)
    # Everything the libraries print goes to stderr; stdout carries only the JSON.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch

    from mllm.bench.encoders import get_encoder_spec
    from mllm.bench.throughput import StepSettings, arm_names, run_comparison, spec_for
    from viq.log import setup_logging

    setup_logging(int(os.environ.get("RANK", "0")), stream=sys.stderr)

    mode = MODES[args.mode or ("paper" if torch.cuda.is_available() or args.estimate else "tiny")]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else mode[name]  # noqa: E731
    llms = [x for x in pick("llm").split(",") if x]
    if args.estimate:
        estimate(args, llms, [int(x) for x in str(pick("capacity")).split(",") if x], pick("viq"), json_out)
        return
    try:
        capacities = [int(x) for x in str(pick("capacity")).split(",") if x]
        text_tokens = tuple(int(x) for x in str(pick("text_tokens")).split(","))
        encoders = [x for x in pick("encoders").split(",") if x]
        for name in encoders:
            get_encoder_spec(name)
        valid = arm_names(encoders)
        arms = [a for a in args.arms.split(",") if a] or valid
        unknown = [a for a in arms if a not in valid]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; valid: {', '.join(valid)}")
        if args.grad_accum < 1:
            raise ValueError(f"--grad-accum must be >= 1; got {args.grad_accum}")
        if (args.mode or ("paper" if torch.cuda.is_available() else "tiny")) == "paper" and not torch.cuda.is_available() \
                and args.llm is None:
            raise ValueError("--mode paper builds 0.5B-7B LLMs and needs a GPU; on CPU use --mode tiny or name --llm")
        if len(text_tokens) != 2 or not 0 < text_tokens[0] <= text_tokens[1]:
            raise ValueError(f"--text-tokens must be min,max with 0 < min <= max; got {pick('text_tokens')}")
    except ValueError as e:
        sys.exit(f"bench_throughput: error: {e}")

    mode_name = args.mode or ("paper" if torch.cuda.is_available() else "tiny")
    result = {"mode": mode_name, "device": None, "points": []}
    sweep = []

    def emit(final: bool) -> None:  # after every arm, so that a cut-off run keeps what it measured
        points = [p for p in result["points"] if p]
        result["device"] = next((p["device"] for p in points + sweep if "device" in p), None)
        if sweep:
            result["lever_sweep"] = sweep
        out = dict(result, points=points)
        if _is_main() and args.out_dir:
            write_outputs(out, Path(args.out_dir))
        if _is_main() and final:
            json_out.write(json.dumps(out, indent=2) + "\n")
            json_out.flush()

    for llm in llms:
        for capacity in capacities:
            settings = StepSettings(
                micro_batch_packs=max(1, args.micro_batch_tokens // capacity), grad_accum=args.grad_accum,
                gradient_checkpointing=args.gradient_checkpointing,
                checkpoint_fraction=args.checkpoint_fraction, loss_impl=args.loss_impl, compile_layers=args.compile,
                attn_implementation=args.attn, zero_stage=args.zero_stage, lora_rank=args.lora_rank,
                optimizer=args.optimizer, compile_mode=args.compile_mode, deepspeed_config=args.deepspeed_config,
            )
            make = lambda s: spec_for(llm, capacity, viq=pick("viq"), image_size=pick("image_size"), steps=pick("steps"),  # noqa: E731
                                      warmup=pick("warmup"), settings=s, text_tokens=text_tokens)
            try:
                spec = make(settings)
            except ValueError as e:
                sys.exit(f"bench_throughput: error: {e}")
            if args.sweep_levers:
                try:
                    variants = lever_variants(settings, torch.cuda.is_available(),
                                              [v for v in args.sweep_variants.split(",") if v not in ("", "none")])
                    variants = [] if args.sweep_variants == "none" else variants
                except ValueError as e:
                    sys.exit(f"bench_throughput: error: {e}")
                for label, lever_settings in lever_steps(settings)[:-1]:  # the last one is the comparison's codes arm
                    point = run_comparison(make(lever_settings), ["codes"], log=_log)
                    sweep.append({**point, "lever": label})
                    emit(final=False)
            result["points"].append({})

            def update(partial):
                result["points"][-1] = partial
                emit(final=False)

            point = run_comparison(spec, arms, log=_log, on_arm=update)
            result["points"][-1] = point
            if args.sweep_levers:
                sweep.append({**point, "arms": {k: v for k, v in point["arms"].items() if k == "codes"},
                              "errors": {k: v for k, v in point["errors"].items() if k == "codes"},
                              "lever": lever_steps(settings)[-1][0]})
                emit(final=False)
                for label, variant in variants:
                    sweep.append({**run_comparison(make(variant), ["codes"], log=_log), "lever": label})
                    emit(final=False)
            emit(final=False)
    emit(final=True)
    failed = [f"{p['llm']} {p['capacity']} {arm}" for p in result["points"] for arm in p["errors"]]
    if failed:
        print(f"bench_throughput: {len(failed)} arm(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)  # the JSON still holds every arm that ran, and each failure's one-line reason


def estimate(args, llms, capacities, viq, json_out) -> None:
    """Full training vs LoRA from first principles, for machines without the GPU (JSON, labelled "estimated")."""
    from mllm.bench.estimate import estimate_point

    points = [estimate_point(llm, viq, capacity, lora_rank=args.lora_rank or 64,
                             micro_batch_packs=max(1, args.micro_batch_tokens // capacity), grad_accum=args.grad_accum,
                             gradient_checkpointing=args.gradient_checkpointing, loss_impl=args.loss_impl)
              for llm in llms for capacity in capacities]
    result = {"mode": "estimate", "source": "estimated, not measured (mllm/bench/estimate.py)", "points": points}
    for p in points:
        for kind in ("full", "lora"):
            e = p[kind]
            _log(f"[bench] estimated {p['llm']} {p['capacity']} {e['training']}: peak {e['peak_memory_gib']} GiB, "
                 f"{e['tokens_per_s']} tok/s, step {e['step_ms']} ms on {e['hardware']}")
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "bench_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    json_out.write(json.dumps(result, indent=2) + "\n")
    json_out.flush()


def write_outputs(result: dict, out_dir: Path) -> None:
    from mllm.bench.report import comparison_table, lever_table, plot_comparison

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Throughput: cached codes vs encoders in the loop ({result['device']})\n", comparison_table(result["points"])]
    if result.get("lever_sweep"):
        md += ["\n## Cached-code step, levers added one at a time\n", lever_table(result["lever_sweep"])]
    (out_dir / "bench_throughput.md").write_text("\n".join(md))
    if any(p["arms"] for p in result["points"]):
        try:
            plot_comparison(result["points"], out_dir / "bench_throughput.png")
        except ImportError:
            print("bench_throughput: matplotlib is not installed, so no PNG (pip install -e .[bench])", file=sys.stderr)


def _is_main() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _log(message: str) -> None:
    if _is_main():
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
