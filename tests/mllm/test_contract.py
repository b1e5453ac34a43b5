"""One model contract and one LLM forward: every trained model satisfies it, the image positions
take codes or continuous vectors through the same forward, and settings a model cannot honour
are one config error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import build_tokenizer
from mllm.bench.encoders import ContinuousEncoder, get_encoder_spec
from mllm.bench.throughput import ContinuousArm
from mllm.config import TrainConfig
from mllm.contract import TrainableModel, check_model
from mllm.model import IGNORE_INDEX, build_mllm
from mllm.viq_training import ViQStageConfig, ViQTrainModel
from tests.mllm.test_model import assert_grads_close, grads, make_model, make_sample, pack
from tests.mllm.test_viq_training import image_batch
from viq import ViQModel
from viq.config import ConfigError


def merged_code_vectors(model, codes):
    """What the codes path puts at the image positions: the merger over the four sub-code embeddings."""
    sub = model.llm.get_input_embeddings()(codes.reshape(-1))
    return model.merger(sub.view(codes.shape[0], 4, -1))


def llm_grads(model) -> dict:
    out = {n: g for n, g in grads(model).items() if n.startswith("llm.")}
    out["llm.model.embed_tokens.weight"] = out["llm.model.embed_tokens.weight"][: model.vocab.code_base]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_codes_and_image_embeds_take_the_same_forward(attn):
    """The same vectors at the image positions give the same loss and LLM gradients whichever
    way they arrive, on packed rows of several samples (each backend's document isolation).
    Only the code rows of the (tied) embedding differ: the codes path also trains them."""
    model = make_model(attn_implementation=attn)
    gen = torch.Generator().manual_seed(3)
    batch = pack([make_sample(gen, 14, (2, 3)), make_sample(gen, 9, None), make_sample(gen, 11, (3, 2))])

    model.zero_grad()
    via_codes = model(batch)
    via_codes["loss_sum"].backward()
    expected = llm_grads(model)

    model.zero_grad()
    embeds = merged_code_vectors(model, batch["codes"]).detach()
    via_embeds = model({**batch, "codes": None, "image_embeds": embeds})
    via_embeds["loss_sum"].backward()
    got = llm_grads(model)
    assert int(via_embeds["n_supervised"]) == int(via_codes["n_supervised"])
    torch.testing.assert_close(via_embeds["loss_sum"], via_codes["loss_sum"], rtol=1e-6, atol=1e-5)
    assert_grads_close(got, expected, rel=1e-5)
    assert model.merger.weight.grad is None  # the codes path is not run at all


def test_image_embeds_errors(model_and_batch):
    model, batch = model_and_batch
    embeds = merged_code_vectors(model, batch["codes"]).detach()
    with pytest.raises(ValueError, match="input_ids hold 12 image_pad positions .* but image_embeds has 11 rows"):
        model({**batch, "codes": None, "image_embeds": embeds[:-1]})
    with pytest.raises(ValueError, match="codes or image_embeds, not both"):
        model({**batch, "image_embeds": embeds})


@pytest.fixture(scope="module")
def model_and_batch():
    gen = torch.Generator().manual_seed(4)
    return make_model(), pack([make_sample(gen, 10, (2, 3)), make_sample(gen, 10, (3, 2))])


@pytest.fixture(scope="module")
def viq_train_model():
    viq = ViQModel.from_pretrained("viq-tiny")
    _, vocab = build_tokenizer("tiny", viq.config)
    torch.manual_seed(0)
    return ViQTrainModel(viq, build_mllm("tiny", vocab), ViQStageConfig(stage=1, teacher="none")), vocab


def test_tokenizer_training_loss_is_the_projected_features_through_the_llm(viq_train_model):
    """Reference: the projected ViT tokens scattered into the text embeddings by hand, the HF
    decoder, next-token cross-entropy over the supervised positions."""
    model, vocab = viq_train_model
    batch = image_batch(model, vocab, [(56, 84), (112, 56)])
    out = model(batch)
    with torch.no_grad():
        features, _, _ = model.viq.vit(batch["images"])
        text = model.llm.get_input_embeddings()(batch["input_ids"])
        mask = (batch["input_ids"] == vocab.image_pad_id).unsqueeze(-1)
        inputs = text.masked_scatter(mask, model.projector(features))
        hidden = model.llm.model(inputs_embeds=inputs, position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        logits = model.llm.get_output_embeddings()(hidden).float()
        reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(out["n_supervised"]) == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(out["loss_sum"].detach(), reference, rtol=1e-5, atol=1e-5)


def test_tokenizer_training_honours_gradient_checkpointing():
    """`train_viq.py --set model.gradient_checkpointing=true` used to end in an AttributeError:
    now the ViT blocks and the LLM layers recompute, with the same loss and gradients."""
    viq = ViQModel.from_pretrained("viq-tiny")
    _, vocab = build_tokenizer("tiny", viq.config)
    torch.manual_seed(0)
    model = ViQTrainModel(viq, build_mllm("tiny", vocab), ViQStageConfig(stage=1, teacher="none", train_llm=True))
    model.train()
    batch = image_batch(model, vocab, [(56, 84), (84, 56)])
    model(batch)["loss_sum"].backward()
    plain = grads(model)
    model.zero_grad()
    n = model.gradient_checkpointing_enable(fraction=1.0)
    assert n == len(model.viq.vit.blocks) + len(model.llm.model.layers)
    model(batch)["loss_sum"].backward()
    assert_grads_close(grads(model), plain, rel=1e-5)


def test_every_trained_model_satisfies_the_contract(model_and_batch, viq_train_model):
    mllm, _ = model_and_batch
    arm = ContinuousArm(ContinuousEncoder(get_encoder_spec("siglip-tiny")), make_model(), trainable_encoder=False)
    cfg = TrainConfig()
    for model in (mllm, viq_train_model[0], arm):
        assert isinstance(model, TrainableModel), type(model).__name__
        check_model(model, cfg)


def test_a_setting_a_model_cannot_honour_is_one_config_error(viq_train_model):
    cfg = TrainConfig()
    cfg.freeze.llm_body = True
    with pytest.raises(ConfigError, match="config key 'freeze.llm_body': tokenizer training sets what trains with viq_train"):
        check_model(viq_train_model[0], cfg)
    cfg = TrainConfig()
    cfg.optim.code_embedding_lr = 1e-3
    with pytest.raises(ConfigError, match="config key 'optim.code_embedding_lr': codes never enter tokenizer training"):
        check_model(viq_train_model[0], cfg)


def test_a_model_missing_part_of_the_contract_is_a_bug_not_a_config_error():
    class Incomplete(torch.nn.Module):
        llm = vocab = None

    with pytest.raises(TypeError, match="Incomplete does not satisfy mllm.contract.TrainableModel: missing code_rows_split"):
        check_model(Incomplete(), TrainConfig())
