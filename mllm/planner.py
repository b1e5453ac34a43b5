"""Will a run fit, and how long will it take? Per-GPU memory, steps, tokens and wall-clock of a
training config, before any GPU is touched.

    plan = plan_run(cfg, gpus=8, gpu="h100-80g")        # behind scripts/plan_run.py
    print(format_plan(plan))

Memory per GPU (bytes), Psi = parameters (LLM with the code rows + code merger), N = ranks,
b = bytes of the training dtype (2 for bf16 on GPUs, 4 for fp32 on CPU):

- parameters      b Psi, / N under ZeRO-3 (0 with offload_param)
- gradients       b Psi, / N from ZeRO-2 on (0 with offload_optimizer from ZeRO-2 on)
- optimizer       fp32 master copy + Adam m and v = 12 Psi, / N from ZeRO-1 on (0 offloaded)
- ZeRO-3 gathered the largest module gathered whole at once (the vocabulary table) plus the
                  prefetch bucket
- buffers         ZeRO's gradient reduction bucket(s)
- activations     per decoder layer and token: what autograd keeps (`ACTIVATION_ELEMENTS`) or,
                  for a checkpointed layer, its input only, plus one layer being recomputed
- loss            one chunk of fp32 logits and its gradient; the fused loss also keeps the head's
                  fp32 weight gradient
- optimizer step  the fp32 gradient of the optimizer's partition, alive only during step()

peak = parameters + optimizer + ZeRO-3 gathered + buffers
       + max(gradients + activations + loss, gradients + optimizer step)

Checked in tests/mllm/test_planner.py against the H200 rows of docs/benchmarks.md (within 15%)
and against the model-state bytes that DeepSpeed holds per rank in CPU runs.
Time: the measured tokens/s of docs/bench/h200_throughput.json, scaled by FLOPs per token and
the GPU's peak; multi-GPU scaling is assumed linear (not measured yet).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.tokenizer import PRESET_EMBEDDING_ROWS, QWEN25_TEXT_VOCAB_SIZE
from data.vocab import CodeVocab
from viq.config import ConfigError

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = REPO_ROOT / "docs" / "bench" / "h200_throughput.json"
# CUDA context, NCCL buffers and allocator slack: not modelled term by term.
RESERVED_GIB = 2.5


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # what torch.cuda reports as total
    peak_flops: float  # dense bf16


GPUS = {
    "h100-80g": GpuSpec("NVIDIA H100 80GB", 79.1, 989e12),
    "h100-94g": GpuSpec("NVIDIA H100 NVL 94GB", 93.0, 835e12),
    "h200-141g": GpuSpec("NVIDIA H200", 139.8, 989e12),
    "a100-80g": GpuSpec("NVIDIA A100 80GB", 79.1, 312e12),
    "a100-40g": GpuSpec("NVIDIA A100 40GB", 39.4, 312e12),
    "l40s-48g": GpuSpec("NVIDIA L40S", 44.4, 362e12),
    "b200-180g": GpuSpec("NVIDIA B200", 178.4, 2250e12),
}

# bf16 elements autograd keeps per token in one Qwen2 decoder layer, as multiples of the hidden
# size H, the key/value width Hkv and the MLP width I. Eager: two RMSNorms (fp32 upcast + bf16
# output), q/k after RoPE, v, the attention output, o_proj and MLP inputs, gate, up, SiLU and
# their product = 10 H + 2 Hkv + 4 I, times a factor fitted to the eager H200 rows (1.15); a
# compiled layer fuses the norms and the SwiGLU and keeps 0.875 of 8 H + 2 Hkv + 4 I (fitted to
# the compiled rows). CPU fp32 (SDPA, eager, measured with saved-tensor hooks): 1.06 x (8 H + 2 Hkv + 4 I).
ACTIVATION_ELEMENTS = {"eager": (11.5, 2.3, 4.6), "compiled": (7.0, 1.75, 3.5), "cpu": (8.48, 2.12, 4.24)}


@dataclass
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rows: int  # vocabulary rows after the code vocabulary is added
    tied: bool

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_width
        attention = h * h + h + 2 * (h * kv + kv) + h * h
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        table = self.rows * self.hidden
        merger = 4 * self.hidden * self.hidden + self.hidden
        return table * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden + merger

    @property
    def body_params(self) -> int:
        return self.layers * self.layer_params()


def model_dims(cfg) -> ModelDims:
    """Dimensions of `cfg.model.llm` (a preset or a local checkpoint's config.json) with the code rows."""
    from mllm.presets import LLM_PRESETS

    name = cfg.model.llm
    if name in LLM_PRESETS:
        c = {**LLM_PRESETS[name], "vocab_size": PRESET_EMBEDDING_ROWS[name]}
    else:
        path = Path(name) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.llm: {name} is neither a preset ({', '.join(LLM_PRESETS)}) nor a checkpoint with config.json")
        c = json.loads(path.read_text())
    vocab = CodeVocab(text_vocab_size=min(QWEN25_TEXT_VOCAB_SIZE, c["vocab_size"]), embedding_rows=c["vocab_size"],
                      codebook_size=_codebook_size(cfg.model.viq))
    return ModelDims(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                     c["num_key_value_heads"], vocab.total_rows, bool(c.get("tie_word_embeddings", False)))


def viq_config(viq: str):
    """The ViQConfig of a preset name or a saved tokenizer directory."""
    from viq.model import ViQConfig, get_preset

    return ViQConfig.load(viq) if Path(viq).is_dir() else get_preset(viq)


def _codebook_size(viq: str) -> int:
    return viq_config(viq).codebook_size


def _zero(cfg) -> dict:
    """The ZeRO section of the run's DeepSpeed config (stage, offload, bucket sizes)."""
    from mllm.engine import load_ds_config

    return load_ds_config(cfg, use_bf16=True)["zero_optimization"]


@dataclass
class MemoryPlan:
    terms: dict[str, float]  # bytes per GPU
    peak: float
    host_per_rank: float  # offloaded optimizer / parameters, bytes of host memory per rank
    notes: list[str] = field(default_factory=list)

    def largest(self) -> tuple[str, float]:
        return max(self.terms.items(), key=lambda kv: kv[1])

    def states(self) -> float:
        """Parameters + optimizer state at rest (what DeepSpeed holds between steps)."""
        return self.terms["parameters"] + self.terms["optimizer"]

    def beside(self, measured: dict[str, int], **context) -> dict:
        """memory.json: this plan beside the model-state bytes measured on a rank
        (mllm.engine.model_state_bytes), with the run's `context` (world size, ZeRO stage, ...)."""
        return {"planned": self.terms, "planned_peak": self.peak, "planned_states": self.states(),
                "measured_states": measured["parameters"] + measured["optimizer"], "measured": measured, **context}


def estimate_memory(cfg, world: int, *, dtype_bytes: int = 2, kind: str | None = None) -> MemoryPlan:
    """Per-GPU memory of `cfg` on `world` ranks (see the module docstring for each term)."""
    d, m, zero = model_dims(cfg), cfg.model, _zero(cfg)
    stage, b, psi = int(zero.get("stage", cfg.trainer.zero_stage)), dtype_bytes, d.params
    kind = kind or ("compiled" if m.compile_layers else "eager")
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    offload_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    n = max(1, world)
    t = {}
    t["parameters"] = 0.0 if (stage == 3 and offload_par) else b * psi / (n if stage == 3 else 1)
    t["gradients"] = 0.0 if (stage >= 2 and offload_opt) else b * psi / (n if stage >= 2 else 1)
    opt_shard = psi / (n if stage >= 1 else 1)
    t["optimizer"] = 0.0 if offload_opt else 12 * opt_shard
    largest = max(d.rows * d.hidden, 3 * d.hidden * d.intermediate)
    t["zero3 gathered"] = b * (largest + float(zero.get("stage3_prefetch_bucket_size", 5e7))) if stage == 3 else 0.0
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    t["buffers"] = b * min(bucket, psi) * (2 if zero.get("overlap_comm") and stage == 2 else 1) if stage >= 2 else 0.0
    tokens = cfg.data.max_seq_len * cfg.data.micro_batch_packs
    per_layer = tokens * b * sum(c * w for c, w in zip(ACTIVATION_ELEMENTS[kind], (d.hidden, d.kv_width, d.intermediate)))
    ckpt = round(m.checkpoint_fraction * d.layers) if m.gradient_checkpointing else 0
    t["activations"] = (d.layers - ckpt) * per_layer + ckpt * tokens * d.hidden * b + (per_layer if ckpt else 0)
    t["activations"] += 2 * tokens * d.hidden * b  # embeddings in, final norm out
    chunk = min(m.loss_chunk_size or tokens, tokens)
    t["loss"] = chunk * d.rows * (8 + b) + (d.rows * d.hidden * 4 if m.loss_impl == "fused" else 0)
    t["optimizer step"] = 0.0 if offload_opt else 4 * opt_shard
    rest = t["parameters"] + t["optimizer"] + t["zero3 gathered"] + t["buffers"]
    peak = rest + max(t["gradients"] + t["activations"] + t["loss"], t["gradients"] + t["optimizer step"])
    host = (16 * opt_shard if offload_opt else 0.0) + (b * psi / n if offload_par else 0.0)
    notes = [f"{d.params / 1e9:.2f}B parameters ({d.rows:,} vocabulary rows), ZeRO-{stage}, {n} ranks, "
             f"{tokens:,} tokens per micro-batch, {kind} layers, {ckpt}/{d.layers} layers checkpointed"]
    return MemoryPlan(t, peak, host, notes)


# ---- data and time --------------------------------------------------------------------------
def steps_per_epoch(lengths, cfg, world: int) -> dict:
    """Packs, steps, tokens of one epoch as the trainer's loader plans them (PackedLoader's plan)."""
    from data.loader import PackedLoader

    class Lengths:
        def __len__(self):
            return len(lengths)

        def length(self, i):
            return int(lengths[i])

    d = cfg.data
    loader = PackedLoader(Lengths(), d.max_seq_len, buffer_size=d.buffer_size, seed=cfg.trainer.seed, rank=0,
                          world_size=world, micro_batch_packs=d.micro_batch_packs, overlong=d.overlong)
    packs, stats = loader.plan_epoch()
    steps = loader.steps_per_epoch // cfg.trainer.grad_accum
    return {"samples": len(lengths), "packs": len(packs), "steps_per_epoch": steps, "tokens": stats.n_real_tokens,
            "packing_efficiency": stats.efficiency, "truncated": stats.n_truncated, "dropped": stats.n_dropped}


def flops_per_token(d: ModelDims, context: int, supervised_share: float = 0.16) -> float:
    """Training FLOPs per token: dense body, causal attention at `context`, head on supervised tokens."""
    return 6 * d.body_params + 6 * d.layers * d.hidden * context / 2 + 6 * d.hidden * d.rows * supervised_share


def measured_throughput(cfg) -> dict:
    """The measured point of docs/bench/ closest to cfg (same context, nearest model size): its
    tokens/s per H200 and the FLOPs per token it ran at."""
    bench = json.loads(BENCH_JSON.read_text())
    points = [p for p in bench["points"] if "codes" in p["arms"]]
    target = model_dims(cfg)
    best = min(points, key=lambda p: (p["capacity"] != cfg.data.max_seq_len,
                                      abs(math.log(_preset_params(p["llm"]) / target.body_params))))
    dims = _preset_dims(best["llm"])
    return {"llm": best["llm"], "context": best["capacity"], "tokens_per_s": best["arms"]["codes"]["tokens_per_s"],
            "flops_per_token": flops_per_token(dims, best["capacity"]), "peak_flops": GPUS["h200-141g"].peak_flops,
            "settings": best["settings"]}


def _preset_dims(name: str) -> ModelDims:
    from mllm.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.llm, cfg.model.viq = name, "viq-1.3b"
    return model_dims(cfg)


def _preset_params(name: str) -> float:
    return _preset_dims(name).body_params


def plan_run(cfg, gpus: int, gpu: str, lengths=None, length_source: str = "") -> dict:
    """Memory per GPU, fit, and (with `lengths`) steps, tokens and wall-clock for cfg on `gpus` GPUs."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU '{gpu}'; known: {', '.join(GPUS)}")
    spec = GPUS[gpu]
    memory = estimate_memory(cfg, gpus)
    usable = (spec.memory_gib - RESERVED_GIB) * GIB
    plan = {"gpu": gpu, "gpus": gpus, "memory": memory, "usable": usable, "fits": memory.peak <= usable}
    if lengths is not None:
        data = steps_per_epoch(lengths, cfg, gpus)
        ref = measured_throughput(cfg)
        dims = model_dims(cfg)
        per_gpu = ref["tokens_per_s"] * ref["flops_per_token"] / flops_per_token(dims, cfg.data.max_seq_len) \
            * spec.peak_flops / ref["peak_flops"]
        total_steps = cfg.trainer.max_steps
        tokens_per_step = data["tokens"] / max(1, data["steps_per_epoch"])
        plan.update(data=data, length_source=length_source, reference=ref, tokens_per_s=per_gpu * gpus,
                    epoch_hours=data["tokens"] / (per_gpu * gpus) / 3600,
                    run_tokens=tokens_per_step * total_steps,
                    run_hours=tokens_per_step * total_steps / (per_gpu * gpus) / 3600)
    return plan


def refusal(plan: dict) -> str:
    """The one-line reason a plan does not fit, naming its largest term."""
    m = plan["memory"]
    name, value = m.largest()
    return (f"does not fit: {m.peak / GIB:.1f} GiB per GPU > {plan['usable'] / GIB:.1f} GiB usable on {plan['gpu']} "
            f"({RESERVED_GIB} GiB kept for CUDA/NCCL); largest term: {name} {value / GIB:.1f} GiB")


def format_memory(m: MemoryPlan) -> str:
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in m.terms.items())
    return f"{m.peak / GIB:.1f} GiB per GPU ({parts} GiB)"


def format_plan(plan: dict) -> str:
    m = plan["memory"]
    lines = [f"plan: {plan['gpus']} x {plan['gpu']}; " + "; ".join(m.notes),
             f"memory: {format_memory(m)}; usable {plan['usable'] / GIB:.1f} GiB: "
             + ("fits" if plan["fits"] else refusal(plan))]
    if m.host_per_rank:
        lines.append(f"host memory for offloaded state: {m.host_per_rank / GIB:.1f} GiB per rank")
    if "data" in plan:
        d, r = plan["data"], plan["reference"]
        lines += [
            f"data ({plan['length_source']}): {d['samples']:,} samples -> {d['packs']:,} packs, {d['steps_per_epoch']:,} "
            f"steps per epoch, {d['tokens'] / 1e9:.3f}B tokens, packing efficiency {d['packing_efficiency']:.3f}, "
            f"{d['truncated']} truncated, {d['dropped']} dropped",
            f"time: ~{plan['tokens_per_s'] / 1e3:,.0f}k tokens/s -> {plan['epoch_hours']:.1f} h per epoch; "
            f"{plan['run_tokens'] / 1e9:.2f}B tokens in trainer.max_steps -> {plan['run_hours']:.1f} h "
            f"(from {r['tokens_per_s'] / 1e3:.1f}k tokens/s measured for {r['llm']} at {r['context']} on one H200, "
            "scaled by FLOPs per token and GPU peak; scaling over GPUs assumed linear)",
        ]
    return "\n".join(lines)


def demo_lengths(n: int, seed: int = 0) -> np.ndarray:
    """The LLaVA-OneVision-like length mix of the data benchmark (mllm.bench.data_path), n samples."""
    from mllm.bench.data_path import mix_lengths

    return mix_lengths(n, seed)


