"""Training-step throughput: cached codes vs the vision encoder in the loop.

The arms share the LLM, the packed batch and the optimizer; they differ only in where the
image positions' inputs come from:

- `codes`: integer codes read from the cache (what train_mllm.py does by default);
- `online_viq`: the ViQ tokenizer encodes the images inside the step (no gradient);
- `continuous_frozen`: a continuous encoder (the ViQ ViT, no quantiser) + MLP projector,
  the encoder frozen — LLaVA-style training with the vision tower in the loop;
- `continuous_trainable`: the same with gradients through the encoder.

Each step is forward + backward + AdamW update, timed after warm-up with device syncs.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from data.packing import collate_packed
from data.tokenizer import build_tokenizer
from data.vocab import SUBCODES
from mllm.model import build_mllm
from mllm.viq_training import projector
from viq import ViQModel
from viq.bench import gpu_peak_flops

ARMS = ("codes", "online_viq", "continuous_frozen", "continuous_trainable")


def synthetic_pack(vocab, viq_cfg, capacity: int, image_size: int, rng) -> tuple[dict, list[torch.Tensor]]:
    """A pack of single-image samples (each: image tokens + ~64 text tokens) filling capacity."""
    g = image_size // (viq_cfg.patch_size * viq_cfg.merge_size)
    samples, pixels = [], []
    used = 0
    while True:
        n_text = int(rng.integers(32, 96))
        length = vocab.image_length(g, g) + n_text
        if used + length > capacity:
            break
        image = [vocab.vision_start_id] + ([vocab.image_pad_id] * g + [vocab.row_end_id]) * g + [vocab.vision_end_id]
        text = rng.integers(0, 150000, n_text).tolist()
        ids = torch.tensor(image + text)
        labels = ids.clone()
        labels[: len(image) + n_text // 2] = -100
        codes = torch.from_numpy(rng.integers(0, vocab.codebook_size, (g * g, SUBCODES))).long() + vocab.code_base
        samples.append({"input_ids": ids, "labels": labels, "codes": codes})
        pixels.append(torch.randn(3, image_size, image_size))
        used += length
    if not samples:
        raise ValueError(f"capacity {capacity} is too small for one {image_size}px image sample")
    return collate_packed(samples, capacity, pad_to_capacity=True), pixels


class ContinuousArm(torch.nn.Module):
    def __init__(self, vit, mllm):
        super().__init__()
        self.vit, self.mllm = vit, mllm
        hidden = mllm.config.hidden_size
        self.projector = projector(vit.cfg.width, hidden, hidden)

    def forward(self, batch, pixels, frozen_encoder: bool):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
            features, _, _ = self.vit(pixels)
        llm = self.mllm.llm
        mask = batch["input_ids"] == self.mllm.vocab.image_pad_id
        text = llm.get_input_embeddings()(batch["input_ids"])
        inputs = text.masked_scatter(mask.unsqueeze(-1), self.projector(features).to(text.dtype))
        hidden = llm.model(inputs_embeds=inputs, position_ids=batch["position_ids"], attention_mask=None,
                           use_cache=False).last_hidden_state
        return self.mllm.loss_from_hidden(hidden, batch["labels"])


def run_throughput_benchmark(llm: str, viq: str, capacity: int, image_size: int, steps: int, warmup: int,
                             device=None, dtype=None, arms=ARMS, gradient_checkpointing=False) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or ("bf16" if device.type == "cuda" else "fp32")]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}; valid: {', '.join(ARMS)}")
    tokenizer_model = ViQModel.from_pretrained(viq, device=device, dtype=torch_dtype)
    _, vocab = build_tokenizer(llm, tokenizer_model.config)
    rng = np.random.default_rng(0)
    batch, pixels = synthetic_pack(vocab, tokenizer_model.config, capacity, image_size, rng)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    pixels = [p.to(device=device, dtype=torch_dtype) for p in pixels]
    torch.manual_seed(0)
    mllm = build_mllm(llm, vocab, dtype=torch_dtype, device=device)
    if gradient_checkpointing:
        mllm.gradient_checkpointing_enable()
    n_images = len(pixels)
    result = {"llm": llm, "viq": viq, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(torch_dtype).replace("torch.", ""), "capacity": capacity, "image_size": image_size,
              "images_per_pack": n_images, "real_tokens": int(batch["n_real_tokens"]),
              "image_tokens": int(batch["codes"].shape[0]), "steps": steps, "arms": {}}
    for arm in arms:
        if arm.startswith("continuous"):
            model = ContinuousArm(tokenizer_model.vit, mllm).to(device=device, dtype=torch_dtype)
            model.vit.requires_grad_(arm == "continuous_trainable")
        else:
            model = mllm
        tokenizer_model.requires_grad_(arm == "continuous_trainable")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)

        def step():
            if arm == "codes":
                out = model(batch)
                loss = out["loss_sum"]
            elif arm == "online_viq":
                with torch.no_grad():
                    codes = tokenizer_model.encode_pixels(pixels)
                b = dict(batch, codes=vocab.codes_to_ids(torch.cat([c.reshape(-1, SUBCODES) for c in codes]).to(device)))
                loss = model(b)["loss_sum"]
            else:
                loss, _ = model(batch, pixels, frozen_encoder=arm == "continuous_frozen")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
        result["arms"][arm] = {"step_ms": seconds * 1e3, "tokens_per_s": result["real_tokens"] / seconds,
                               "images_per_s": n_images / seconds}
        del optimizer
    arms_out = result["arms"]
    if "codes" in arms_out:
        for arm, entry in arms_out.items():
            if arm != "codes":
                entry["codes_speedup"] = entry["step_ms"] / arms_out["codes"]["step_ms"]
    peak = gpu_peak_flops(device)
    if peak:
        result["gpu_peak_bf16_flops"] = peak
    return result


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
