"""First-principles estimate of one GPU's training step: peak memory and tokens/s, full vs LoRA.

For machines without the GPU (every figure is labelled "estimated" with its assumptions);
`scripts/bench_throughput.py` measures the same step where a GPU is present
(`scripts/gpu_checks.sh lora_7b_4k`). The model is the one this project trains on one GPU:
bf16 weights, DeepSpeed ZeRO-1/2 with its bf16 optimizer and torch AdamW (fp32 master weights
and moments), packed sequences, the vocabulary grown by the code rows.

Memory (bytes):
- weights 2 x all parameters; gradients 2 x trainable; optimizer 12 x trainable (fp32 master,
  Adam m and v); at the optimizer step DeepSpeed converts one parameter group's gradients to
  fp32 at a time: + 4 x the largest group;
- activations per token and decoder layer (what autograd keeps, bf16, Qwen2's RMSNorm in fp32):
  20 H + 4 KV + 8 I bytes (norms 2 x 6H, the q/k/v/o and MLP inputs 2 x 2H, attention q/k/v/out
  4H + 4KV, the SwiGLU gate / activation / up / product 8I); LoRA adds 2r per adapted module and,
  with dropout, 3 bytes per input feature of each adapted module (dropped copy + mask). With
  activation checkpointing only each layer's input (2H) is kept, plus one layer's recomputation
  and its gradients (the per-layer figure + 4H + 4I);
- the loss: fused cross-entropy keeps one chunk of fp32 logits (chunk x V x 4), the hidden-state
  gradients, and, when any head row trains, a V x H fp32 weight gradient (plus a bf16 copy of the
  head when its code rows are split out: the two tables are concatenated);
- DeepSpeed's two reduce buckets (2 x reduce_bucket_size x 2 bytes).
Peak: weights + gradients + optimizer + buckets + the larger of (activations + loss) during the
backward pass and the fp32 gradients of the optimizer step (the former are freed by then).

Time: FLOPs per token run by the step (forward 2N, activation gradients 2N, weight gradients 2N
of the trainable weights only, + 2N recomputation when checkpointing; attention and the
supervised head likewise) over an assumed fraction of the GPU's peak, plus the optimizer step as
memory traffic (bytes per trainable parameter over an assumed share of HBM bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16
    hbm_bytes_per_s: float
    memory_gib: float


H100 = Hardware("NVIDIA H100 80GB SXM", 989e12, 3.35e12, 79.6)
H200 = Hardware("NVIDIA H200", 989e12, 4.8e12, 139.8)


@dataclass
class Assumptions:
    """The numbers an estimate rests on; each is printed with it."""

    matmul_utilisation: float = 0.35  # of peak, on the FLOPs the step runs (the 1.5B/16k codes step measured 28.7% MFU)
    optimizer_bytes_per_param: float = 80.0  # torch AdamW (foreach) + DeepSpeed's bf16<->fp32 copies and grad norm
    hbm_utilisation: float = 0.5
    supervised_fraction: float = 0.15  # of the packed tokens: answers only (docs/benchmarks.md mix: ~64% image positions)
    mean_sample_tokens: float = 400.0  # causal attention within a packed sample (448 px image + text)
    reduce_bucket_elements: float = 2e8  # configs/deepspeed/zero2.json


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of a Qwen2 decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(config, total_rows: int, lora=None) -> dict[str, int]:
    """Parameters of the vocabulary-extended Qwen2 + code merger; `lora` (LoraSettings) adds adapters.

    Keys: body (decoder layers + final norm), tables (embedding and untied head, all rows),
    code_rows (their rows past the checkpoint's, i.e. the code vocabulary), merger, lora, total."""
    shapes = linear_shapes(config)
    h, layers = config.hidden_size, config.num_hidden_layers
    biased = ("q_proj", "k_proj", "v_proj")  # Qwen2 attention projections carry a bias
    per_layer = sum(a * b + (b if name in biased else 0) for name, (a, b) in shapes.items()) + 2 * h
    n_tables = 1 if config.tie_word_embeddings else 2
    counts = {"body": layers * per_layer + h, "tables": n_tables * total_rows * h,
              "code_rows": n_tables * (total_rows - config.vocab_size) * h, "merger": 4 * h * h + h, "lora": 0}
    if lora is not None:
        adapted = [i for i in range(layers) if not lora.layers or i in lora.layers]
        per = sum(lora.rank * (a + b) + (b if lora.use_dora else 0)
                  for name, (a, b) in shapes.items() if name in lora.target_modules)
        counts["lora"] = len(adapted) * per
    counts["total"] = counts["body"] + counts["tables"] + counts["merger"] + counts["lora"]
    return counts


def estimate_step(config, total_rows: int, capacity: int, *, lora=None, micro_batch_packs: int = 1, grad_accum: int = 1,
                  gradient_checkpointing: bool = True, loss_impl: str = "fused", loss_chunk_size: int = 1024,
                  split_code_rows: bool = True, hardware: Hardware = H200,
                  assume: Assumptions | None = None) -> dict:
    """Estimated peak memory (GiB, the parts and the sum) and tokens/s of one training step on one GPU.

    `lora` None: full training. With LoRA the trainable parameters are the adapters, the code
    rows and the merger (text rows and body frozen, as mllm/lora.py sets them).
    """
    a = assume or Assumptions()
    counts = parameter_counts(config, total_rows, lora)
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = linear_shapes(config)["k_proj"][1]
    tokens = capacity * micro_batch_packs
    if lora is None:
        trainable = counts["total"]
        # the optimizer groups of mllm/engine.py: matrices decay; tables, norms and biases do not
        matrices = layers * sum(a * b for a, b in linear_shapes(config).values()) + 4 * h * h
        groups = [matrices, counts["total"] - matrices]
    else:
        trainable = counts["lora"] + counts["code_rows"] + counts["merger"]
        groups = [counts["lora"], counts["code_rows"] + counts["merger"]]
    memory = {
        "weights": 2 * counts["total"],
        "gradients": 2 * trainable,
        "optimizer_states": 12 * trainable,
        "optimizer_step_fp32_gradients": 4 * max(groups),
        "deepspeed_buckets": 2 * a.reduce_bucket_elements * 2,
    }
    per_layer = 20 * h + 4 * kv + 8 * inter
    if lora is not None:
        adapted = {n: s for n, s in linear_shapes(config).items() if n in lora.target_modules}
        per_layer += sum(2 * lora.rank + (3 * fan_in if lora.dropout > 0 else 0) for fan_in, _ in adapted.values())
    if gradient_checkpointing:
        memory["activations"] = tokens * (layers * 2 * h + per_layer + 4 * h + 4 * inter)
    else:
        memory["activations"] = tokens * layers * per_layer
    vocab = total_rows
    supervised = a.supervised_fraction * tokens
    head_trains = lora is None or counts["code_rows"] > 0
    loss = min(loss_chunk_size, supervised) * vocab * 4 + supervised * h * 2
    if loss_impl == "fused" and head_trains:
        loss += vocab * h * 4 + (vocab * h * 2 if split_code_rows else 0)
    memory["loss"] = loss
    # Activations and the loss's buffers are gone by the optimizer step, whose fp32 gradients come then.
    transient = max(memory["activations"] + memory["loss"], memory["optimizer_step_fp32_gradients"])
    memory["peak"] = memory["weights"] + memory["gradients"] + memory["optimizer_states"] + memory["deepspeed_buckets"] + transient

    body_flops = 2 * (counts["body"] + counts["lora"])  # one forward pass per token
    trained_body = counts["body"] if lora is None else counts["lora"]
    recompute = 1 if gradient_checkpointing else 0
    # forward, activation gradients and recomputation of every weight; weight gradients of the trained ones
    flops_per_token = body_flops * (2 + recompute) + 2 * trained_body
    attention = 2 * layers * h * a.mean_sample_tokens  # causal QK^T and PV of one token, forward
    flops_per_token += attention * (3 + recompute)
    # The fused loss computes the whole head's weight gradient; the chunked one recomputes the logits.
    head_rows_trained = vocab if (lora is None or loss_impl == "fused") else total_rows - config.vocab_size
    head = a.supervised_fraction * ((6 if loss_impl == "chunked" else 4) * vocab * h + 2 * head_rows_trained * h)
    flops_per_token += head
    compute_s = tokens * grad_accum * flops_per_token / (hardware.peak_flops * a.matmul_utilisation)
    optimizer_s = trainable * a.optimizer_bytes_per_param / (hardware.hbm_bytes_per_s * a.hbm_utilisation)
    step_s = compute_s + optimizer_s
    # MFU as the trainer counts it: 6 x trained and 4 x frozen weights, no recomputation
    model_flops = (6 * counts["body"] if lora is None else 4 * counts["body"] + 6 * counts["lora"]) + 3 * attention + head
    return {
        "source": "estimated",
        "training": "full" if lora is None else f"LoRA r={lora.rank} on {','.join(lora.target_modules)}",
        "hardware": hardware.name,
        "tokens_per_micro_batch": tokens, "grad_accum": grad_accum,
        "gradient_checkpointing": gradient_checkpointing, "loss_impl": loss_impl,
        "params": counts, "trainable_params": trainable,
        "memory_gib": {k: round(v / GIB, 2) for k, v in memory.items()},
        "peak_memory_gib": round(memory["peak"] / GIB, 1),
        "fits": {hw.name: memory["peak"] <= hw.memory_gib * GIB for hw in (H100, H200)},
        "step_ms": round(step_s * 1e3, 1), "optimizer_ms": round(optimizer_s * 1e3, 1),
        "tokens_per_s": round(tokens * grad_accum / step_s),
        "mfu": round(tokens * grad_accum * model_flops / step_s / hardware.peak_flops, 3),
        "assumptions": vars(a),
    }


def estimate_point(llm: str, viq: str, capacity: int, *, lora_rank: int, micro_batch_packs: int = 1, grad_accum: int = 1,
                   gradient_checkpointing: bool = True, loss_impl: str = "fused", hardware: Hardware = H200) -> dict:
    """Full training and LoRA (rank `lora_rank`, alpha 2 x rank, every linear layer) side by side,
    for an LLM preset or local checkpoint and a ViQ preset or directory."""
    from transformers import Qwen2Config

    from data.tokenizer import build_tokenizer
    from mllm.lora import LoraSettings
    from mllm.presets import LLM_PRESETS, preset_config
    from viq.model import ViQConfig, get_preset

    config = preset_config(llm) if llm in LLM_PRESETS else Qwen2Config.from_pretrained(llm, local_files_only=True)
    _, vocab = build_tokenizer(llm, ViQConfig.load(viq) if Path(viq).is_dir() else get_preset(viq))
    common = dict(micro_batch_packs=micro_batch_packs, grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing,
                  loss_impl=loss_impl, hardware=hardware)
    lora = LoraSettings(enabled=True, rank=lora_rank, alpha=2.0 * lora_rank)
    return {"llm": llm, "viq": viq, "capacity": capacity, "source": "estimated",
            # as the benchmark's full arm runs: one table per matrix (LoRA always splits the code rows out)
            "full": estimate_step(config, vocab.total_rows, capacity, split_code_rows=False, **common),
            "lora": estimate_step(config, vocab.total_rows, capacity, lora=lora, **common)}
