"""CUDA-only checks: FlexAttention / flash varlen in the ViT, bf16 packed MLLM steps."""
import pytest
import torch

from data.packing import collate_packed
from data.vocab import CodeVocab
from mllm.model import build_mllm
from viq import ViQModel

pytestmark = pytest.mark.gpu


def test_vit_flex_matches_sdpa_and_packing_holds():
    torch.manual_seed(0)
    pixels = [torch.randn(3, h, w, device="cuda") for h, w in [(112, 224), (448, 448), (28, 896)]]
    ref = ViQModel.from_pretrained("viq-tiny", device="cuda")
    ref.config.attn_backend = "sdpa"
    flex = ViQModel.from_pretrained("viq-tiny", device="cuda")
    for module in flex.modules():
        if hasattr(module, "backend"):
            module.backend = "flex"
    flex.config.attn_backend = "flex"
    with torch.no_grad():
        a, b = ref(pixels), flex(pixels)
        single = [flex([p])["indices"] for p in pixels]
    assert torch.allclose(a["features"], b["features"], atol=1e-4)
    assert torch.equal(torch.cat(single), b["indices"])


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_bf16_packed_step_matches_unpacked(attn):
    vocab = CodeVocab(text_vocab_size=151665, embedding_rows=151936, codebook_size=1000)
    torch.manual_seed(0)
    model = build_mllm("tiny", vocab, attn_implementation=attn, dtype=torch.bfloat16, device="cuda")
    samples = []
    for n in (40, 75, 23):
        ids = torch.randint(0, 150000, (n,))
        samples.append({"input_ids": ids, "labels": ids.clone()})
    packed = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collate_packed(samples, 256).items()}
    per_sample = model.per_sample_losses(packed)
    for s, (loss, count) in zip(samples, per_sample):
        alone = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collate_packed([s], 256, pad_to_capacity=False).items()}
        out = model(alone)
        assert int(out["n_supervised"]) == count
        assert torch.allclose(out["loss_sum"].float(), loss.float(), rtol=2e-2)
    out = model(packed)
    out["loss_sum"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
