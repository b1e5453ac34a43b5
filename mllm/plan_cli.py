"""scripts/plan_run.py: read the config and the sample lengths, print the plan (mllm.planner)."""
from __future__ import annotations

import sys

import numpy as np

from mllm.config import load_config
from mllm.planner import GIB, demo_lengths, format_plan, plan_run, refusal
from viq.errors import DataError, run_cli


def _lengths(args, cfg):
    if args.lengths is not None:
        if not args.lengths.is_file():
            raise DataError(f"--lengths: {args.lengths} does not exist")
        values = np.load(args.lengths) if args.lengths.suffix == ".npy" else np.loadtxt(args.lengths, dtype=np.int64)
        return np.asarray(values, dtype=np.int64).reshape(-1), f"{args.lengths}"
    from data.prepare import default_codes_dir, train_path

    if train_path(cfg).is_file() and (default_codes_dir(cfg) / "manifest.json").is_file():
        return _dataset_lengths(cfg), f"{train_path(cfg)}"
    return demo_lengths(args.samples), (f"assumed LLaVA-OneVision-like mix of {args.samples:,} samples "
                                        f"({train_path(cfg)} or its code cache not on this machine)")


def _dataset_lengths(cfg) -> np.ndarray:
    """Every sample's length exactly as the trainer's data set computes it (cached codes)."""
    from data.dataset import ConversationDataset
    from data.extract import cache_meta
    from data.prepare import default_codes_dir, load_training_records
    from data.shards import CodeStore
    from data.tokenizer import build_tokenizer
    from mllm.planner import viq_config

    viq_cfg = viq_config(cfg.model.viq)
    tokenizer, vocab = build_tokenizer(cfg.model.llm, viq_cfg)
    records, image_root = load_training_records(cfg, cfg.trainer.seed)
    store = CodeStore(default_codes_dir(cfg), expected_meta=cache_meta(viq_cfg, cfg.model.viq))
    dataset = ConversationDataset(records, tokenizer, vocab, source="codes", image_root=image_root, code_store=store,
                                  system=cfg.data.system_prompt or None)
    return np.array([dataset.length(i) for i in range(len(dataset))], dtype=np.int64)


def run(args) -> int:
    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        lengths, source = _lengths(args, cfg)
        plan = plan_run(cfg, args.gpus, args.gpu, lengths, source)
        print(format_plan(plan))
        m = plan["memory"]
        if m.host_per_rank:
            per_node = m.host_per_rank * args.gpus / max(1, args.nodes)
            print(f"host memory per node ({args.gpus // max(1, args.nodes)} ranks): {per_node / GIB:.0f} GiB")
        if not plan["fits"]:
            print(f"plan_run: error: {refusal(plan)}", file=sys.stderr)
            return 1
        return 0

    return run_cli(body)
