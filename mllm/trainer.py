"""The trainer: data, model, DeepSpeed engine, the training step, logging, checkpoints.

    trainer = Trainer(cfg, resume="auto")
    trainer.train()          # loops train_step() to trainer.max_steps, saves, exports

One optimizer step = `grad_accum` micro-batches of packed rows on every rank. The loss of
a step is the sum of token cross-entropies divided by the number of supervised tokens of
the whole step: all micro-batches on all ranks (counted up front with one all-reduce).

Subclasses (tokenizer training, the throughput benchmark) change the trainer only through
these extension points, never through its private methods:

    build_data()                   records -> dataset -> loader; called again when the data settings change
    data_settings()                (resize policy, pack capacity) of the data now
    build_model()                  the module to train (a mllm.contract.TrainableModel)
    configure_trainable(model)     freeze what must not train; returns the report that is logged
    prepare_batch(batch)           a loader batch -> the model's input on the device
    extra_metrics(micro_batches)   more numbers for the step's metrics
    extra_loop_state() / restore_extra_loop_state(state)   more JSON state in checkpoints
    before_step() / after_step(metrics)
    export()
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from data.dataset import ConversationDataset
from data.video import write_video_settings
from data.loader import PackedLoader
from data.prepare import prepare_training_data
from data.tokenizer import build_tokenizer
from mllm import checkpoint as ckpt
from mllm.config import TrainConfig, save_config
from mllm.contract import check_model
from mllm.engine import (
    all_reduce_sum,
    all_reduce_vector,
    any_rank_nonfinite,
    apply_freezing,
    construction_context,
    device_and_dtype,
    full_numel,
    gathered,
    init_distributed,
    initialize_engine,
    load_ds_config,
    master_weights,
    model_state_bytes,
)
from mllm.export import save_export
from mllm.faults import EXIT_STOPPED, GracefulStop, RunDirectoryBusy, RunLock, check_free_space
from mllm.hardware import gpu_peak_flops
from mllm.kernels import apply_kernel_options
from mllm.lora import apply_lora, check_lora_trainable
from mllm.model import build_mllm
from viq import ViQModel
from viq.errors import CheckpointError, DataError, UserError, run_cli
from viq.log import setup_logging

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became inf/NaN (a learning rate too high, bad data): one line, not a traceback."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | None = None):
        self.cfg = cfg
        self.rank, self.world, self.local_rank = init_distributed()
        self.device, self.dtype = device_and_dtype(cfg.model.dtype)
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_lock = self._lock_run_dir()
        # Verified before anything is built: a damaged --resume PATH fails in seconds, and --resume
        # auto picks the newest intact checkpoint (a warning for each damaged one it skips).
        self.resumed_from = ckpt.find_resume(self.ckpt_dir, resume)
        self.stopped_by: str | None = None
        self.graceful_stop: GracefulStop | None = None  # installed by train()
        _seed_everything(cfg.trainer.seed)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self._viq = None
        self.viq_config = self.build_viq_config()
        self.tokenizer, self.vocab = build_tokenizer(cfg.model.llm, self.viq_config)
        self.records = self.image_root = self.code_store = None
        self.build_data()
        self.ds_config = load_ds_config(cfg, self.dtype == torch.bfloat16)
        self.model = self.build_model()
        log.info(self._trainable_report(self.configure_trainable(self.model)))
        check_model(self.model, cfg)
        self.engine, self.ds_config, groups = initialize_engine(self.model, cfg, self.dtype == torch.bfloat16,
                                                                self.ds_config)
        log.info(f"optimizer groups: {groups}; ZeRO stage {self.ds_config['zero_optimization']['stage']}; "
                 f"device {self.device}, dtype {self.dtype}, attention {self.llm.config._attn_implementation}")
        self.step = 0
        self.totals = {"tokens": 0, "samples": 0, "skipped_steps": 0}
        self.peak_flops = gpu_peak_flops(self.device)
        self.flops_per_token = self._dense_flops_per_token()
        self.checkpoint_bytes = self._checkpoint_bytes()
        if self.is_main:
            check_free_space(self.ckpt_dir, self.checkpoint_bytes)
        if self.resumed_from is not None:
            self._resume(self.resumed_from)

    # ---- extension points: data -------------------------------------------------------------
    def build_data(self) -> None:
        """Hook: (re)build `self.dataset`, `self.loader`, `self.batches` for `data_settings()`.

        The first call prepares the records (demo data generated and code cache extracted when
        missing, rank 0 first); later calls (a resolution schedule) reuse them.
        """
        cfg, d = self.cfg, self.cfg.data
        first = self.records is None
        if first:
            self.records, self.image_root, self.code_store = prepare_training_data(
                cfg, self.viq_config, rank=self.rank, local_rank=self.local_rank, barrier=self.barrier,
                get_viq=lambda: self.viq, log=log.info,
            )
        policy, self.capacity = self.data_settings()
        self.dataset = ConversationDataset(
            self.records, self.tokenizer, self.vocab, source=cfg.vision.source, image_root=self.image_root,
            code_store=self.code_store, resize_policy=policy, system=d.system_prompt or None,
            video=d.video, max_len=self.capacity, overlong=d.overlong,
        )
        if self.dataset.n_skipped:
            log.info(f"data: skipped {self.dataset.n_skipped} record(s) {self.dataset.skipped}; e.g. {self.dataset.skipped_examples[0]}")
        if self.dataset.n_video_truncated:
            log.info(f"data: {self.dataset.n_video_truncated} video sample(s) longer than {self.capacity} tokens "
                     f"keep only their leading whole frames (data.overlong=truncate)")
        if len(self.dataset) == 0:
            raise DataError(f"no usable training records in {d.train or d.root}")
        self.loader = PackedLoader(
            self.dataset, self.capacity, buffer_size=d.buffer_size, seed=cfg.trainer.seed, rank=self.rank,
            world_size=self.world, micro_batch_packs=d.micro_batch_packs, overlong=d.overlong,
            pad_to_capacity=d.pad_to_capacity, pad_id=self.tokenizer.pad_token_id, image_pad_id=self.vocab.image_pad_id,
        )
        self.batches = self.loader.iter_forever()
        if first:
            _, plan = self.loader.plan_epoch()
            log.info(
                f"data: {len(self.dataset)} samples, {self.loader.steps_per_epoch // cfg.trainer.grad_accum} steps per epoch "
                f"({self.capacity} tokens x {d.micro_batch_packs} packs x {cfg.trainer.grad_accum} accumulation x "
                f"{self.world} ranks), packing efficiency {plan.efficiency:.3f}; longer than {self.capacity} tokens: "
                f"{plan.n_truncated} truncated, {plan.n_dropped} dropped (data.overlong={d.overlong}), "
                f"{plan.n_unsupervised} dropped because the cut left no supervised token"
            )

    def data_settings(self) -> tuple:
        """Hook: (resize policy, pack capacity) of the data now; progressive schedules override it."""
        return self.viq_config.resize_policy, self.cfg.data.max_seq_len

    def prepare_batch(self, batch: dict) -> dict:
        """Hook: a loader batch -> the model's input on the device (online: codes encoded here)."""
        out = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if self.cfg.vision.source == "online":
            with torch.no_grad():
                codes = self.viq.encode_pixels([p.to(self.viq.device) for p in batch["images"]])
            flat = [c.reshape(-1, 4) for c in codes]
            ids = torch.cat(flat) if flat else torch.zeros((0, 4), dtype=torch.long)
            out["codes"] = self.vocab.codes_to_ids(ids).to(self.device)
        return out

    # ---- extension points: model ------------------------------------------------------------
    def build_viq_config(self):
        """Hook: the ViQ tokenizer's configuration (code layout, resize policy); `model.viq`'s by default."""
        from viq.model import ViQConfig, get_preset

        name = self.cfg.model.viq
        return ViQConfig.load(name) if Path(name).is_dir() else get_preset(name)

    @property
    def viq(self) -> ViQModel:
        """The ViQ tokenizer, loaded on first use (codes-mode training never needs it on the GPU)."""
        if self._viq is None:
            online = self.cfg.vision.source == "online"
            device = self.device if online else "cpu"
            # Online encoding on a GPU runs in the training dtype, as extract_codes.py does (bf16 on CUDA).
            dtype = self.dtype if online and self.device.type == "cuda" else None
            self._viq = ViQModel.from_pretrained(self.cfg.model.viq, device=device, dtype=dtype)
            self._viq.requires_grad_(False)
        return self._viq

    def build_model(self):
        """Hook: the module to train; it must satisfy mllm.contract.TrainableModel.

        Under ZeRO-3 it is built partitioned (engine.construction_context): presets and local
        checkpoints alike, the vocabulary extended and the code rows initialised on gathered
        parameters, so that no rank ever holds the whole model.
        """
        c = self.cfg.model
        self.memory_plan = self._plan_memory()
        features = None
        if c.vocab_init == "codebook":
            features = self.viq.codebook_vectors()
        torch.manual_seed(self.cfg.trainer.seed)
        with construction_context(self.ds_config):
            model = build_mllm(
                c.llm, self.vocab, attn_implementation=c.attn_implementation, dtype=self.dtype, device=self.device,
                init=c.vocab_init, codebook_features=features, noise_std=c.vocab_init_noise, seed=self.cfg.trainer.seed,
                loss_chunk_size=c.loss_chunk_size, loss_impl=c.loss_impl,
                gathered=gathered(self.ds_config["zero_optimization"]["stage"]),
            )
            for replaced in apply_kernel_options(model, c, self.ds_config["zero_optimization"]["stage"]):
                log.info(f"kernels: {replaced}")
            if self.cfg.optim.code_embedding_lr > 0:  # own tensors for the code rows, so they get their own LR
                model.split_code_rows()
            if c.lora.enabled:  # adapters on the body, the code rows split out and trained in full
                apply_lora(model, c.lora)
        return model

    def _plan_memory(self):
        """The planner's per-GPU memory estimate for this run (scripts/plan_run.py), logged at start."""
        from mllm.planner import estimate_memory, format_memory

        plan = estimate_memory(self.cfg, self.world, dtype_bytes=self.dtype.itemsize,
                               kind=None if self.device.type == "cuda" else "cpu")
        log.info(f"memory plan: {format_memory(plan)}")
        return plan

    def _record_memory(self) -> None:
        """runs/<name>/memory.json after the first step: the plan beside what was measured (rank 0's)."""
        if getattr(self, "memory_plan", None) is None:
            return
        record = self.memory_plan.beside(model_state_bytes(self.engine), world_size=self.world,
                                         zero_stage=self.ds_config["zero_optimization"]["stage"])
        if self.device.type == "cuda":
            record["measured_peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
        if self.is_main:
            (self.run_dir / "memory.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info(f"memory after step 1: model states {record['measured_states'] / 2**30:.3f} GiB measured, "
                 f"{record['planned_states'] / 2**30:.3f} GiB planned")

    def configure_trainable(self, model) -> dict:
        """Hook: freeze what must not train (config `freeze`); returns {part or kind: count} for the log."""
        freeze = apply_freezing(model, self.cfg)
        report = {"trainable": freeze["trainable"], "total": freeze["total"], "frozen tensors": len(freeze["frozen_params"]),
                  "masked rows": freeze["masked_embedding_rows"] or "none"}
        if self.cfg.model.lora.enabled:  # asserts that the LLM trains exactly adapters + code rows
            report.update({f"LLM {k}": v for k, v in check_lora_trainable(model, text_rows=self.cfg.model.lora.train_text_rows).items()})
        return report

    @staticmethod
    def _trainable_report(report: dict) -> str:
        return "trainable parameters: " + "; ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in report.items())

    @property
    def llm(self):
        """The Hugging Face causal LM inside the trained module."""
        return self.model.llm

    def _dense_flops_per_token(self) -> float:
        """Per token, the forward + backward of the dense layers: 6 x trainable and 4 x frozen
        non-embedding parameters (a frozen weight, e.g. under LoRA, needs no weight gradient)."""
        cfg = self.llm.config
        body = [p for name, p in self.llm.model.named_parameters() if "embed_tokens" not in name]
        self.attn_flops_coeff = 6 * cfg.num_hidden_layers * cfg.hidden_size  # x sum(L_i^2) for causal attention
        self.head_flops_per_token = 6 * cfg.hidden_size * self.vocab.total_rows
        return float(sum((6 if p.requires_grad else 4) * full_numel(p) for p in body))

    # ---- extension points: metrics ----------------------------------------------------------
    def extra_metrics(self, micro_batches: list[dict]) -> dict:
        """Hook: more numbers for one step's metrics (e.g. a benchmark's encoder FLOPs)."""
        return {}

    # ---- the step --------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns the step's global metrics.

        Host-device syncs are kept to what the step needs: the host counts of the batches are
        summed with one all-reduce (none on a single rank); with trainer.nonfinite=stop the
        finiteness check waits only once backward is queued, so the GPU keeps working; the loss
        and logged values stay on the device until the one read at the end of the step.
        """
        t0 = time.perf_counter()
        local_sup = sum(int(b["n_supervised"]) for b in micro_batches)
        n_global = all_reduce_sum(local_sup, self.device)
        # No supervised token on any rank (every rank agrees): nothing to learn, and 0/0 would log
        # NaN; the step runs no forward, updates nothing and is counted.
        empty = n_global == 0
        if empty:
            self.totals["empty_steps"] = self.totals.get("empty_steps", 0) + 1
        scale = self.world / max(n_global, 1.0)  # DeepSpeed averages gradients over ranks
        check_before_backward = self.cfg.trainer.nonfinite == "skip"
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        skipped = 0
        self.engine.train()
        logs: dict[str, list] = {}
        for j, batch in enumerate([] if empty else micro_batches):
            out = self.engine(self.prepare_batch(batch))
            loss_sum = out["loss_sum"]
            # Auxiliary losses arrive as means: averaged over micro-batches here, over ranks by DeepSpeed.
            aux = out.get("aux_loss")
            objective = loss_sum * scale if aux is None else loss_sum * scale + aux / len(micro_batches)
            if check_before_backward and any_rank_nonfinite(objective):
                skipped += 1  # no backward: it adds nothing to the step's accumulated gradients
                continue
            self.engine.backward(objective, scale_wrt_gas=False)
            if not check_before_backward and any_rank_nonfinite(objective):
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step + 1}, micro-batch {j} (samples {batch.get('sample_indices', [])[:8]}); "
                    "stopping before the update. Lower optim.lr or set trainer.nonfinite=skip to skip such batches"
                )
            loss_total += loss_sum.detach()
            if aux is not None:
                logs.setdefault("aux_loss", []).append(aux.detach())
            for key, value in out.get("logs", {}).items():
                logs.setdefault(key, []).append(value.detach() if torch.is_tensor(value) else value)
        # The trainer owns the accumulation boundary (managed_gradient_accumulation=false): one
        # engine.step() per optimizer step reduces what the micro-batches accumulated and updates,
        # however many of them were skipped; a step whose every micro-batch was skipped updates nothing.
        if skipped == len(micro_batches):
            self.totals["skipped_steps"] += 1
        elif not empty:
            self.engine.step()
        # Efficiency against the full capacity of every pack, whether or not rows were padded to it.
        pack_capacity = self.cfg.data.max_seq_len * self.cfg.data.micro_batch_packs
        log_keys = sorted(logs)
        # The stop request rides on the step's one all-reduce: a signal seen by any rank stops all.
        stop = self.graceful_stop is not None and self.graceful_stop.requested()
        host = torch.tensor([
            sum(int(b["n_real_tokens"]) for b in micro_batches), pack_capacity * len(micro_batches),
            sum(int(b["n_samples"]) for b in micro_batches), sum(_sum_sq_lengths(b) for b in micro_batches),
            float(stop),
        ], dtype=torch.float64)
        device_values = torch.stack([loss_total] + [
            torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in logs[k]]).mean()
            for k in log_keys
        ])
        totals = all_reduce_vector(torch.cat([host.to(self.device), device_values])).tolist()  # the step's one read
        tokens, capacity, samples, sq, stops, loss_global = totals[:6]
        seconds = time.perf_counter() - t0
        flops = self.flops_per_token * tokens + self.attn_flops_coeff * sq + self.head_flops_per_token * n_global
        return {
            "loss_sum": loss_global, "n_supervised": n_global, "tokens": tokens, "capacity": capacity,
            "samples": samples, "seconds": seconds, "flops": flops, "skipped_micro_batches": skipped,
            "sample_indices": [i for b in micro_batches for i in b.get("sample_indices", [])],
            "logs": {k: v / self.world for k, v in zip(log_keys, totals[6:])}, "stop_requested": stops > 0,
            **self.extra_metrics(micro_batches),
        }

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.trainer
        self._trim_metrics()
        writer = self._tensorboard()
        progress = self._progress()
        interval: list[dict] = []
        last = {}
        metrics_path = self.run_dir / "metrics.jsonl"
        self.graceful_stop = GracefulStop().install()
        while self.step < t.max_steps:
            self.before_step()
            micro = [next(self.batches) for _ in range(t.grad_accum)]
            m = self.train_step(micro)
            self.step += 1
            if self.step == 1:
                self._record_memory()
            self.after_step(m)
            self.totals["tokens"] += int(m["tokens"])
            self.totals["samples"] += int(m["samples"])
            interval.append(m)
            if progress is not None:
                progress.update(1)
                if m["n_supervised"]:
                    progress.set_postfix(loss=f"{m['loss_sum'] / m['n_supervised']:.4f}")
            stop = m["stop_requested"]
            if self.step % t.log_every == 0 or self.step == t.max_steps or (stop and interval):
                last = self._log(interval, metrics_path, writer)
                interval = []
            if stop:  # every rank agreed in train_step: save this step and leave
                self.stopped_by = self.graceful_stop.reason or "a signal to another rank"
                break
            if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                self.save()
        if progress is not None:
            progress.close()
        self.save()
        if t.export and self.stopped_by is None:
            self.export()
        self.graceful_stop.uninstall()
        if writer is not None:
            writer.close()
        return last

    def before_step(self) -> None:
        """Hook: runs before each step's batches are drawn (e.g. a resolution schedule)."""

    def after_step(self, metrics: dict) -> None:
        """Hook: runs after each optimizer step (e.g. an EMA teacher)."""

    def _log(self, interval: list[dict], path: Path, writer) -> dict:
        n_sup = sum(m["n_supervised"] for m in interval)
        seconds = sum(m["seconds"] for m in interval)
        tokens = sum(m["tokens"] for m in interval)
        record = {
            "step": self.step,
            "loss": (sum(m["loss_sum"] for m in interval) / n_sup) if n_sup else None,  # null: nothing supervised
            "lr": self.engine.get_lr()[0],
            "tokens": self.totals["tokens"],
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "samples": self.totals["samples"],
            "packing_efficiency": tokens / max(1, sum(m["capacity"] for m in interval)),
            "supervised_tokens": n_sup,
            "step_time_s": seconds / len(interval),
            "grad_norm": _float_or_none(self.engine.get_global_grad_norm()),
            "epoch": self.loader.epoch,
            # Which samples rank 0 trained on since the last record: equal runs, equal fingerprints.
            "data_fingerprint": zlib.crc32(json.dumps([m["sample_indices"] for m in interval]).encode()),
        }
        for key in sorted({k for m in interval for k in m["logs"]}):
            values = [m["logs"][key] for m in interval if key in m["logs"]]
            record[key] = sum(values) / len(values)
        for key in ("skipped_steps", "empty_steps"):
            if self.totals.get(key):
                record[key] = self.totals[key]
        stats = self.loader.stats  # samples longer than max_seq_len, per data.overlong (this rank's loader)
        if stats.n_truncated or stats.n_dropped or stats.n_unsupervised:
            record["samples_truncated"], record["samples_dropped"] = stats.n_truncated, stats.n_dropped
            record["samples_unsupervised"] = stats.n_unsupervised  # cut to no supervised token: dropped
        if self.peak_flops:
            record["mfu"] = sum(m["flops"] for m in interval) / seconds / (self.peak_flops * self.world)
        if self.is_main:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if writer is not None:
                for key, value in record.items():
                    if key not in ("step", "epoch", "data_fingerprint") and isinstance(value, (int, float)):
                        writer.add_scalar(f"train/{key}", value, self.step)
        return record

    def _tensorboard(self):
        if not (self.is_main and self.cfg.trainer.tensorboard):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _progress(self):
        if not (self.is_main and self.cfg.trainer.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.trainer.max_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                    dynamic_ncols=True)

    def _trim_metrics(self) -> None:
        """metrics.jsonl holds exactly this run's history: rows after the resumed step (logged
        after the last save, before a crash) are dropped; a fresh start begins an empty file."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
        if not kept and self.step == 0:
            log.info(f"starting a new run in {self.run_dir}: the previous metrics.jsonl is replaced")
        path.write_text("".join(line + "\n" for line in kept))

    # ---- checkpoints and export ------------------------------------------------------------
    def barrier(self):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def loop_state(self) -> dict:
        return {"step": self.step, "totals": self.totals, "world_size": self.world,
                "loader": self.loader.state_dict(), "rng": ckpt.rng_state(), **self.extra_loop_state()}

    def extra_loop_state(self) -> dict:
        """Hook: more JSON state for checkpoints (restored by restore_extra_loop_state)."""
        return {}

    def restore_extra_loop_state(self, state: dict) -> None:
        """Hook: runs on resume before the loader state is loaded."""

    def save(self) -> Path:
        tag_dir = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, self.loop_state(), rank=self.rank,
                                       keep=self.cfg.trainer.keep_checkpoints, barrier=self.barrier,
                                       needed_bytes=self.checkpoint_bytes)
        log.info(f"saved checkpoint {tag_dir}")
        return tag_dir

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run directory; every rank learns whether another run holds it."""
        lock, refusal = None, None
        if self.is_main:
            lock = RunLock(self.run_dir)
            try:
                lock.acquire()
            except RunDirectoryBusy as e:
                refusal = str(e)
        refusals = [r for r in ckpt.gather_objects(refusal) if r]
        if refusals:
            raise RunDirectoryBusy(refusals[0])
        return lock

    def _checkpoint_bytes(self) -> int:
        """About what one checkpoint takes on disk, all ranks together: the 16-bit or fp32 weights
        DeepSpeed writes plus the fp32 master weights and Adam's two moments."""
        master = sum(full_numel(p) * 4 for p in master_weights(self.engine) if p.numel())
        weights = model_state_bytes(self.engine)["parameters"]
        mine = 3 * master + (weights if self.is_main or self.ds_config["zero_optimization"]["stage"] == 3 else 0)
        return int(all_reduce_sum(mine, self.device))

    def _resume(self, tag_dir: Path) -> None:
        state = ckpt.load_checkpoint(self.engine, tag_dir)
        if state["world_size"] != self.world:
            raise CheckpointError(f"{tag_dir}: saved with {state['world_size']} ranks, now {self.world}; resume with the same number of ranks")
        self.step = state["step"]
        self.totals = state["totals"]
        self.restore_extra_loop_state(state)
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        log.info(f"resumed from {tag_dir} at step {self.step}")

    def export(self) -> Path | None:
        """runs/<name>/hf/: safetensors + config + tokenizer + ViQ tokenizer (rank 0 writes)."""
        out = self.run_dir / "hf"
        stage = self.ds_config["zero_optimization"]["stage"]
        state = self.engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None  # collective: every rank
        if self.is_main:
            save_export(self.model, self.tokenizer, self.vocab, out, self.viq, state_dict=state,
                        vision_source=self.cfg.vision.source)
            write_video_settings(out, self.cfg.data.video)
            if self.cfg.model.lora.export_adapter:
                from mllm.lora_export import save_adapter_export

                adapter = save_adapter_export(self.model, self.tokenizer, self.vocab, self.run_dir / "hf-adapter", self.viq,
                                              base=self.cfg.model.llm, state_dict=state)
                log.info(f"exported {adapter} (the LoRA adapter and code rows, peft format, for {self.cfg.model.llm})")
        self.barrier()
        log.info(f"exported {out}")
        return out


def _sum_sq_lengths(batch: dict) -> float:
    lens = batch["seq_lens"].double()
    n_real = int(batch["n_real_tokens"])
    # the padding tail (if any) is the last segment; it does no useful attention work
    total = float((lens**2).sum())
    if int(lens.sum()) > n_real:
        total -= float(lens[-1] ** 2)
    return total


def _float_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: TrainConfig, resume: str | None = None, trainer_class=None) -> int:
    """Build the trainer and train; a UserError is one line and exit status 1 (viq.errors.run_cli)."""
    setup_logging(int(os.environ.get("RANK", "0")))

    def body() -> int:
        trainer = (trainer_class or Trainer)(cfg, resume=resume)
        try:
            last = trainer.train()
        finally:  # a run that failed is not holding the directory either (a kill leaves a stale lock)
            if trainer.run_lock is not None:
                trainer.run_lock.release()
        if trainer.stopped_by is not None:
            if trainer.is_main:
                print(f"[train] stopped at step {trainer.step} ({trainer.stopped_by}); checkpoint saved; continue with "
                      f"--resume auto (exit status {EXIT_STOPPED})", flush=True)
            return EXIT_STOPPED
        if trainer.is_main:
            loss = last.get("loss")
            loss = "n/a" if loss is None else f"{loss:.4f}"
            print(f"[train] done: step {trainer.step}, loss {loss}; run directory {trainer.run_dir}", flush=True)
        return 0

    return run_cli(body)
