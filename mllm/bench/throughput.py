"""Training throughput: cached codes vs a vision encoder in the loop, through the real trainer.

Every arm is a `Trainer` (the class `train_mllm.py` runs) with its DeepSpeed engine, fed the
same synthetic packed micro-batches; the arms differ only in where the inputs at the image
positions come from:

- `codes`: cached integer codes (what train_mllm.py does by default; no encoder in the loop);
- `online_viq`: the ViQ tokenizer encodes the images inside the step (frozen, no gradient);
- `<encoder>_frozen` / `<encoder>_trainable`: a continuous encoder (`mllm/bench/encoders.py`:
  transformers' SigLIP / InternViT with the released configs) + its stack's projector, the
  LLaVA-OneVision / InternVL set-up, with the encoder frozen or trained.

Every arm hands the LLM the same image positions per image except `siglip-so400m-llava-ov`
(729 per 384 px crop, LLaVA-OneVision's own layout): its packs hold fewer, longer samples,
so compare it per sample (`codes_sample_speedup`).

Per arm: the forward pass (no gradient) and the full step (forward, backward, DeepSpeed
optimizer step) are timed after warm-up with device syncs; reported with tokens/s, samples/s,
peak memory and MFU (dense matmul + attention FLOPs of the LLM and of the encoder in the loop).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from data.packing import collate_packed, concat_packed
from data.vocab import SUBCODES
from mllm.config import TrainConfig
from mllm.bench.encode import encode_flops
from mllm.bench.encoders import ContinuousEncoder, build_projector, encoder_forward_flops, get_encoder_spec
from mllm.hardware import device_name, free_memory, sync
from mllm.trainer import Trainer

BASE_ARMS = ("codes", "online_viq")


def arm_names(encoders: list[str]) -> list[str]:
    return [*BASE_ARMS, *(f"{e}_{mode}" for e in encoders for mode in ("frozen", "trainable"))]


@dataclass
class StepSettings:
    """The training-step settings under test (the levers of docs/benchmarks.md)."""

    micro_batch_packs: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step (amortises the optimizer step)
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = 1.0
    loss_impl: str = "chunked"
    compile_layers: bool = False
    attn_implementation: str = "auto"
    zero_stage: int = 1
    optimizer: str = "config"  # optim.implementation: config | torch_foreach | torch_fused | deepspeed_fused
    compile_mode: str = "default"  # model.compile_mode with compile_layers (reduce-overhead: CUDA graphs)
    kernels: str = "none"  # model.kernels: liger (CUDA)
    fp8: bool = False  # model.fp8: torchao float8 linears (Hopper)
    deepspeed_config: str = ""  # a DeepSpeed JSON instead of configs/deepspeed/zero<stage>.json (offload for 7B)
    lora_rank: int = 0  # > 0: LoRA of this rank on every linear layer, code rows in full (mllm/lora.py); 0: full training


@dataclass
class BenchSpec:
    llm: str
    viq: str
    capacity: int
    image_size: int = 448
    text_tokens: tuple[int, int] = (64, 192)  # text per sample, uniform: ~30% of the tokens with 448 px images
    steps: int = 5
    warmup: int = 2
    settings: StepSettings = field(default_factory=StepSettings)
    seed: int = 0


def synthetic_samples(vocab, grid: int, image_size: int, capacity: int, text_tokens, rng) -> list[dict]:
    """Single-image conversations (image block + text, the answer half supervised) filling one pack."""
    samples, used = [], 0
    image = [vocab.vision_start_id] + ([vocab.image_pad_id] * grid + [vocab.row_end_id]) * grid + [vocab.vision_end_id]
    while True:
        n_text = int(rng.integers(text_tokens[0], text_tokens[1] + 1))
        if used + len(image) + n_text > capacity:
            break
        ids = torch.tensor(image + rng.integers(0, 150000, n_text).tolist())
        labels = ids.clone()
        labels[: len(image) + n_text // 2] = -100
        codes = torch.from_numpy(rng.integers(0, vocab.codebook_size, (grid * grid, SUBCODES))) + vocab.code_base
        pixels = torch.from_numpy(rng.standard_normal((3, image_size, image_size), dtype=np.float32))
        samples.append({"input_ids": ids, "labels": labels, "codes": codes, "images": [pixels]})
        used += len(ids)
    if not samples:
        raise ValueError(f"capacity {capacity} is too small for one {image_size}px image sample ({len(image)} tokens)")
    return samples


class ContinuousArm(nn.Module):
    """Continuous encoder -> projector -> the ViQMLLM's own forward (`image_embeds`), on the same packed batch."""

    def __init__(self, encoder: ContinuousEncoder, mllm, trainable_encoder: bool):
        super().__init__()
        self.encoder, self.mllm = encoder, mllm
        self.projector = build_projector(encoder.spec, mllm.config.hidden_size)
        self.trainable_encoder = trainable_encoder

    # ---- mllm.contract.TrainableModel -------------------------------------------------------
    llm = property(lambda self: self.mllm.llm)
    vocab = property(lambda self: self.mllm.vocab)
    code_rows_split = property(lambda self: self.mllm.code_rows_split)
    decoder_layer_class = property(lambda self: self.mllm.decoder_layer_class)

    def gradient_checkpointing_enable(self, fraction: float = 1.0) -> int:
        self.encoder.gradient_checkpointing_enable()
        return self.mllm.gradient_checkpointing_enable(fraction=fraction)

    def compile_decoder_layers(self, **compile_kwargs) -> int:
        return self.mllm.compile_decoder_layers(**compile_kwargs)

    def unsupported_settings(self, cfg) -> dict[str, str]:
        return {}

    def forward(self, batch: dict) -> dict:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable_encoder):
            features = self.encoder(batch["pixels"])
        embeds = self.projector(features.to(next(self.projector.parameters()).dtype))
        return self.mllm({**batch, "codes": None, "image_embeds": embeds})


class BenchTrainer(Trainer):
    """The real trainer with synthetic packs instead of a data set, and the arm's model."""

    def __init__(self, cfg: TrainConfig, spec: BenchSpec, arm: str):
        self.spec, self.arm = spec, arm
        super().__init__(cfg)

    def image_layout(self) -> tuple[int, int]:
        """(LLM positions per image side, image side in pixels) of this arm's samples."""
        spec = self.spec
        if self.arm in BASE_ARMS:
            return spec.image_size // (self.viq_config.patch_size * self.viq_config.merge_size), spec.image_size
        encoder = get_encoder_spec(self.arm.rsplit("_", 1)[0])
        return encoder.grid(spec.image_size), encoder.image_side(spec.image_size)

    def build_data(self) -> None:
        spec, vocab = self.spec, self.vocab
        grid, side = self.image_layout()
        rng = np.random.default_rng(spec.seed + 1000 * self.rank)
        self.capacity = spec.capacity
        packs = self.cfg.data.micro_batch_packs
        self.bench_batches = []
        for _ in range(2):  # two different micro-batches, alternated
            rows = [collate_packed(synthetic_samples(vocab, grid, side, spec.capacity, spec.text_tokens, rng),
                                   spec.capacity, pad_to_capacity=True, pad_id=self.tokenizer.pad_token_id,
                                   image_pad_id=vocab.image_pad_id) for _ in range(packs)]
            batch = concat_packed(rows)
            batch["pixels"] = torch.stack(batch["images"])
            self.bench_batches.append(batch)
        self.loader = None

    def build_model(self):
        mllm = super().build_model()
        if self.arm in BASE_ARMS:
            return mllm
        name, mode = self.arm.rsplit("_", 1)
        with torch.device(self.device):  # random init on the GPU: seconds less per arm
            encoder = ContinuousEncoder(get_encoder_spec(name))
            arm = ContinuousArm(encoder, mllm, trainable_encoder=mode == "trainable")
        arm.encoder.to(self.dtype)
        arm.projector.to(self.dtype)
        return arm

    def configure_trainable(self, model) -> dict:
        report = super().configure_trainable(model)
        if isinstance(model, ContinuousArm):
            model.encoder.requires_grad_(model.trainable_encoder)
            report["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return report

    def prepare_batch(self, batch: dict) -> dict:
        if self.arm == "codes":
            batch = {k: v for k, v in batch.items() if k not in ("images", "pixels")}
        elif self.arm == "online_viq":
            batch = {k: v for k, v in batch.items() if k != "pixels"}
        else:
            batch = {k: v for k, v in batch.items() if k not in ("images", "codes")}
        return super().prepare_batch(batch)

    def extra_metrics(self, micro_batches: list[dict]) -> dict:
        """The FLOPs the vision side adds to the step, summed over ranks (0 for cached codes)."""
        return {"vision_flops": sum(self.encoder_flops(b) for b in micro_batches) * self.world}

    def encoder_flops(self, batch: dict) -> float:
        """FLOPs the vision side adds to one step on this micro-batch (0 for cached codes)."""
        n = len(batch["images"])
        if self.arm == "codes":
            return 0.0
        if self.arm == "online_viq":
            g = self.spec.image_size // self.viq_config.patch_size // self.viq_config.merge_size
            return encode_flops(self.viq, [(g, g)] * n)
        spec = self.model.encoder.spec
        forward = encoder_forward_flops(spec, self.spec.image_size, n, self.llm.config.hidden_size)
        return 3 * forward if self.model.trainable_encoder else forward  # backward ~ 2x forward


def bench_config(spec: BenchSpec, arm: str, run_dir: str) -> TrainConfig:
    s = spec.settings
    cfg = TrainConfig()
    cfg.model.llm, cfg.model.viq = spec.llm, spec.viq
    cfg.model.attn_implementation = s.attn_implementation
    cfg.model.gradient_checkpointing, cfg.model.checkpoint_fraction = s.gradient_checkpointing, s.checkpoint_fraction
    cfg.model.loss_impl, cfg.model.compile_layers, cfg.model.compile_mode = s.loss_impl, s.compile_layers, s.compile_mode
    cfg.optim.implementation = s.optimizer
    cfg.model.kernels, cfg.model.fp8 = s.kernels, s.fp8
    cfg.vision.source = "online" if arm == "online_viq" else "codes"
    cfg.data.max_seq_len, cfg.data.micro_batch_packs = spec.capacity, s.micro_batch_packs
    cfg.trainer.grad_accum = s.grad_accum
    if s.lora_rank:
        cfg.model.lora.enabled, cfg.model.lora.rank, cfg.model.lora.alpha = True, s.lora_rank, 2.0 * s.lora_rank
    cfg.optim.warmup_steps, cfg.optim.lr = 1, 1e-5
    t = cfg.trainer
    t.runs_dir, t.run_name, t.zero_stage, t.deepspeed_config = run_dir, arm, s.zero_stage, s.deepspeed_config
    t.max_steps, t.tensorboard, t.progress, t.export = spec.steps + spec.warmup, False, False, False
    return cfg.validate()


def measure_arm(spec: BenchSpec, arm: str, run_dir: str) -> dict:
    """Forward and full-step timings of one arm (a fresh trainer and engine, released afterwards)."""
    trainer = BenchTrainer(bench_config(spec, arm, run_dir), spec, arm)
    device, batches = trainer.device, trainer.bench_batches
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.engine.eval()
        with torch.no_grad():
            for i in range(spec.warmup + spec.steps):
                if i == spec.warmup:
                    sync(device)
                    t0 = time.perf_counter()
                trainer.engine(trainer.prepare_batch(batches[i % 2]))
            sync(device)
        forward_s = (time.perf_counter() - t0) / spec.steps
        step_metrics = timed_train_steps(trainer, spec)
        step_s = sum(m["seconds"] for m in step_metrics) / spec.steps
        mean = lambda key: sum(m[key] for m in step_metrics) / spec.steps  # noqa: E731 - all ranks, per step
        tokens, samples, llm_flops, vision_flops = mean("tokens"), mean("samples"), mean("flops"), mean("vision_flops")
        entry = {
            "forward_ms": forward_s * 1e3, "step_ms": step_s * 1e3,
            "step_ms_each": [round(m["seconds"] * 1e3, 2) for m in step_metrics],  # a slow first step shows here
            "tokens_per_s": tokens / step_s, "samples_per_s": samples / step_s,
            "loss": step_metrics[-1]["loss_sum"] / max(step_metrics[-1]["n_supervised"], 1),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        }
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if trainer.peak_flops:
            entry["mfu"] = (llm_flops + vision_flops) / step_s / (trainer.peak_flops * trainer.world)
            entry["llm_mfu"] = llm_flops / step_s / (trainer.peak_flops * trainer.world)
        batch = batches[0]
        entry.update(images=len(batch["images"]), image_positions=int(batch["codes"].shape[0]),
                     real_tokens=int(batch["n_real_tokens"]))  # per micro-batch; an arm may have its own layout
        shape = {"tokens_per_micro_batch": int(batch["input_ids"].numel()), "real_tokens": int(batch["n_real_tokens"]),
                 "images": len(batch["images"]), "image_positions": int(batch["codes"].shape[0]),
                 "attention": trainer.llm.config._attn_implementation, "device": device_name(device),
                 "dtype": str(trainer.dtype).replace("torch.", ""), "world_size": trainer.world}
        return {"entry": entry, "shape": shape}
    finally:
        _release(trainer)


def timed_train_steps(trainer, spec: BenchSpec, profiler=None) -> list[dict]:
    """The benchmark's training steps: warm-up, then `spec.steps` timed optimizer steps, each of
    `grad_accum` micro-batches alternating between the two synthetic batches. With `profiler`
    (a started torch.profiler), the last timed step runs under it (scripts/profile_step.py
    profiles exactly this step) and its device time is synchronised before the profile stops."""
    batches, k = trainer.bench_batches, spec.settings.grad_accum
    step_metrics = []
    for i in range(spec.warmup + spec.steps):
        micro = [batches[(i * k + j) % 2] for j in range(k)]
        last = i == spec.warmup + spec.steps - 1
        if profiler is not None and last:
            with profiler:
                m = trainer.train_step(micro)
                sync(trainer.device)
        else:
            m = trainer.train_step(micro)
        if i >= spec.warmup:
            step_metrics.append(m)
    return step_metrics


def _release(trainer) -> None:
    engine = getattr(trainer, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    trainer.engine = trainer.model = trainer._viq = None
    if getattr(trainer, "run_lock", None) is not None:  # the arm's run directory is free for the next arm
        trainer.run_lock.release()
    free_memory()


def run_comparison(spec: BenchSpec, arms: list[str], log=print, on_arm=None) -> dict:
    """One (LLM, context, settings) point: every arm measured, speedups of cached codes over each.

    `on_arm(result)` runs after each arm with the point so far (a cut-off run keeps what it measured).
    """
    result = {"llm": spec.llm, "viq": spec.viq, "capacity": spec.capacity, "image_size": spec.image_size,
              "text_tokens": list(spec.text_tokens), "steps": spec.steps, "warmup": spec.warmup,
              "settings": dataclasses.asdict(spec.settings), "arms": {}, "errors": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as run_dir:
        for arm in arms:
            try:
                measured = measure_arm(spec, arm, run_dir)
            except Exception as e:  # noqa: BLE001 - one arm's failure (OOM, a compiler error) is reported, not fatal
                free_memory()
                result["errors"][arm] = _one_line(e)
                log(f"[bench] {spec.llm} {spec.capacity} {arm}: {result['errors'][arm]}")
                if not spec.settings.compile_layers:
                    continue
                eager = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, compile_layers=False))
                try:  # a compiler failure should not cost the arm: measure it eager, and say so
                    measured = measure_arm(eager, arm, run_dir)
                except Exception as e2:  # noqa: BLE001
                    free_memory()
                    result["errors"][arm] += f"; eager: {_one_line(e2)}"
                    continue
                measured["entry"]["compile_layers"] = False
                result["compile_errors"] = {**result.get("compile_errors", {}), arm: result["errors"].pop(arm)}
            result["arms"][arm] = measured["entry"]
            shape = measured["shape"]
            if _own_layout(arm):  # the point describes the layout the other arms share
                shape = {k: v for k, v in shape.items() if k not in ("real_tokens", "images", "image_positions")}
            result.update(shape)
            _add_speedups(result)
            if on_arm is not None:
                on_arm(result)
            e = measured["entry"]
            log(f"[bench] {spec.llm} {spec.capacity} {arm}: step {e['step_ms']:.1f} ms, forward {e['forward_ms']:.1f} ms, "
                f"{e['tokens_per_s']:.0f} tok/s" + (f", MFU {e['mfu']:.3f}" if "mfu" in e else "")
                + (f", peak {e['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in e else ""))
    _add_speedups(result)
    return result


def _own_layout(arm: str) -> bool:
    """Whether the arm's samples differ from the ViQ layout (LLaVA-OV's 729 positions per crop)."""
    return arm not in BASE_ARMS and get_encoder_spec(arm.rsplit("_", 1)[0]).crop_size > 0


def _add_speedups(result: dict) -> None:
    if "real_tokens" in result:
        result["image_token_share"] = result["image_positions"] / result["real_tokens"]
    codes = result["arms"].get("codes")
    if codes:
        for arm, e in result["arms"].items():
            if arm != "codes":
                e["codes_step_speedup"] = e["step_ms"] / codes["step_ms"]
                e["codes_forward_speedup"] = e["forward_ms"] / codes["forward_ms"]
                e["codes_sample_speedup"] = codes["samples_per_s"] / e["samples_per_s"]  # arms with their own layout


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def spec_for(llm: str, capacity: int, *, viq: str, image_size: int, steps: int, warmup: int,
             settings: StepSettings, text_tokens=(64, 192)) -> BenchSpec:
    if image_size % 28:
        raise ValueError(f"--image-size must be a multiple of 28 (patch 14 x merge 2); got {image_size}")
    return BenchSpec(llm=llm, viq=viq, capacity=capacity, image_size=image_size, steps=steps, warmup=warmup,
                     settings=settings, text_tokens=tuple(text_tokens))
