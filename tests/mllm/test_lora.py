"""LoRA with peft (mllm/lora.py, mllm/lora_export.py): what trains, the merged and adapter exports,
and the model contract with adapters injected. In-process, tiny preset, fp32 on CPU."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from mllm.config import load_config
from mllm.contract import check_model
from mllm.engine import build_param_groups
from mllm.export import load_export, save_export
from mllm.lora import LoraSettings, apply_lora, check_lora_trainable, merge_lora_state_dict
from mllm.lora_export import load_adapter_export, save_adapter_export
from mllm.model import build_mllm
from mllm.presets import build_llm
from tests.mllm.test_model import VOCAB, assert_grads_close, grads, make_sample, pack
from viq.config import ConfigError
from viq.errors import CheckpointError

CODE_BASE, TOTAL = VOCAB.code_base, VOCAB.total_rows
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def lora_model(llm="tiny", tied=True, seed=0, perturb=True, **settings):
    """The tiny MLLM with LoRA; `perturb` moves every trainable tensor (LoRA B starts at zero, which
    would make a merge trivially right) so that each of them matters to the output."""
    torch.manual_seed(seed)
    overrides = {} if llm != "tiny" else {"tie_word_embeddings": tied}
    model = build_mllm(llm, VOCAB, attn_implementation="sdpa", seed=seed, **overrides)
    apply_lora(model, LoraSettings(enabled=True, rank=4, alpha=8.0, **settings))
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    packed = pack([make_sample(gen, 12, (2, 3)), make_sample(gen, 20, None), make_sample(gen, 9, (3, 2))])
    packed["labels"][0, 5:8] = torch.tensor([CODE_BASE + 3, VOCAB.row_end_id, 17])  # code-id targets reach the head's code rows
    return packed


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch, return_logits=True)["logits"]


@pytest.mark.parametrize("tied,variant", [(True, "lora"), (False, "rslora"), (False, "dora"), (True, "dora")])
def test_merged_export_equals_the_lora_model(tmp_path, batch, tied, variant):
    """hf/ is a standard Qwen2 checkpoint (adapters folded in, code rows included) with the live
    LoRA model's logits; a tied model's head comes back as its trained embedding (peft #2864)."""
    model = lora_model(tied=tied, **VARIANTS[variant])
    expected = logits(model, batch)
    out = save_export(model, None, VOCAB, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not [n for n in names if "lora_" in n or "base_layer" in n or "_rows" in n]
    assert ("lm_head.weight" in names) != tied and "model.layers.0.self_attn.q_proj.weight" in names
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied and config["vocab_size"] == TOTAL and "peft" not in json.dumps(config)
    loaded, _, _ = load_export(out, attn_implementation="sdpa")
    assert loaded.llm.config.tie_word_embeddings == tied
    assert (loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-5)
    head = model.llm.get_output_embeddings()
    torch.testing.assert_close(loaded.llm.lm_head.weight[CODE_BASE:], head.code_rows.detach(), rtol=0, atol=0)


def test_the_merge_is_peft_merge_and_unload(batch):
    """The state-dict merge gives peft's own merge_and_unload weights (DoRA: the hardest fold)."""
    from peft import LoraConfig, get_peft_model

    model = lora_model(tied=False, use_dora=True)
    merged = merge_lora_state_dict(model.llm.state_dict(), model.llm.peft_config["default"])
    torch.manual_seed(0)
    reference = build_llm("tiny", attn_implementation="sdpa", tie_word_embeddings=False)
    reference.resize_token_embeddings(TOTAL, mean_resizing=False)
    peft_model = get_peft_model(reference, LoraConfig(**{k: v for k, v in model.llm.peft_config["default"].to_dict().items()
                                                          if k in ("r", "lora_alpha", "target_modules", "use_dora")}))
    layer_state = {k: v for k, v in model.llm.state_dict().items() if ".layers." in k or k.startswith("model.norm")}
    peft_model.base_model.model.load_state_dict(layer_state, strict=False)
    reference_merged = peft_model.merge_and_unload().state_dict()
    for name, value in reference_merged.items():
        if ".layers." in name:
            torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_only_adapters_and_code_rows_receive_gradients(batch, tied):
    model = lora_model(tied=tied, perturb=False)
    model.train()
    model(batch)["loss_sum"].backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable  # lora_B starts at zero, yet lora_A's path is live: every trainable tensor gets a gradient
    code_tables = {"llm.model.embed_tokens.code_rows"} | (set() if tied else {"llm.lm_head.code_rows"})
    assert {n for n in got if "lora_" not in n} == code_tables | {"merger.weight", "merger.bias"}
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in got - code_tables - {"merger.weight", "merger.bias"})
    assert len([n for n in got if "lora_" in n]) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    assert check_lora_trainable(model)["other"] == 0

    cfg = load_config(None, ["model.lora.enabled=true", "optim.code_embedding_lr=1e-3", "optim.weight_decay=0.1"])
    groups, sizes = build_param_groups(model, cfg)  # asserts: every trainable tensor in exactly one group
    by_group = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    named = dict(model.named_parameters())
    assert by_group["code"] == {id(named[n]) for n in code_tables | {"merger.weight", "merger.bias"}}
    assert sizes["decay"] == 2 * 7 * 2  # the adapters, decayed at optim.lr

    with_text = lora_model(tied=tied, perturb=False, train_text_rows=True)
    with_text(batch)["loss_sum"].backward()
    assert with_text.llm.model.embed_tokens.text_rows.grad is not None
    assert check_lora_trainable(with_text, text_rows=True)["text rows"] == CODE_BASE * 64 * (1 if tied else 2)
    with pytest.raises(RuntimeError, match="train against the plan"):
        check_lora_trainable(with_text)


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_export_is_peft_format_and_loads_onto_the_base(tmp_path, batch, tied):
    """hf-adapter/: peft's files with the code rows as trainable tokens (lm_head listed when untied,
    peft #2863), loaded by peft onto the base grown to the code layout: the merged export's logits."""
    from peft import PeftConfig

    torch.manual_seed(0)
    build_llm("tiny", attn_implementation="sdpa", tie_word_embeddings=tied).save_pretrained(tmp_path / "base")
    model = lora_model(llm=str(tmp_path / "base"))
    merged, _, _ = load_export(save_export(model, None, VOCAB, tmp_path / "hf"), attn_implementation="sdpa")
    out = save_adapter_export(model, None, VOCAB, tmp_path / "hf-adapter", base=str(tmp_path / "base"))
    config = PeftConfig.from_pretrained(str(out))
    rows = list(range(CODE_BASE, TOTAL))
    assert config.trainable_token_indices == ({"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": rows})
    assert config.r == 4 and config.base_model_name_or_path == str(tmp_path / "base")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    deltas = {k: s for k, s in shapes.items() if "trainable_tokens_delta" in k}
    assert set(deltas.values()) == {(TOTAL - CODE_BASE, 64)} and len(deltas) == (1 if tied else 2)
    assert len(shapes) == len(deltas) + 2 * 7 * 2 and all(0 not in s for s in shapes.values())

    from_adapter, _, vocab = load_adapter_export(out, attn_implementation="sdpa")
    assert vocab == VOCAB
    assert (from_adapter.llm.lm_head.weight is from_adapter.llm.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits(from_adapter, batch), logits(merged, batch), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="LoRA adapter without its base"):
        load_export(out)


def test_the_contract_holds_with_adapters(batch):
    """Checkpointing, compiled layers and the fused loss see the same model with adapters injected."""
    cfg = load_config(None, ["model.lora.enabled=true"])
    reference = lora_model(seed=2)
    check_model(reference, cfg)
    assert reference.decoder_layer_class is Qwen2DecoderLayer
    reference.train()
    reference(batch)["loss_sum"].backward()
    loss_ref, grads_ref = reference(batch)["loss_sum"].detach(), grads(reference)

    def same(model):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss_sum"].backward()
        model.zero_grad(set_to_none=True)
        out = model(batch)  # second call: compiled graphs already built
        out["loss_sum"].backward()
        torch.testing.assert_close(out["loss_sum"].detach(), loss_ref, rtol=1e-5, atol=1e-5)
        assert_grads_close(grads(model), grads_ref, rel=1e-4)

    checkpointed = lora_model(seed=2)
    assert checkpointed.gradient_checkpointing_enable(fraction=1.0) == 2
    same(checkpointed)
    fused = lora_model(seed=2)
    fused.loss_impl = "fused"
    same(fused)
    # One whole graph per layer with peft's layers inside (fullgraph: no graph break). aot_eager runs
    # dynamo and AOT autograd without inductor's C++ build: the inductor path of the same layer ops is
    # test_speed_levers.py's, and costs a minute of CI per model.
    compiled = lora_model(seed=2)
    assert compiled.compile_decoder_layers(backend="aot_eager", fullgraph=True) == 2
    same(compiled)


def test_lora_config_errors():
    base = ["model.lora.enabled=true"]
    cases = {
        "freeze.llm_body=true": "'freeze.llm_body' and 'model.lora.enabled' are both set",
        "model.lora.target_modules=[q_proj,embed_tokens]": r"'model.lora.target_modules' has \['embed_tokens'\]; valid: q_proj",
        "model.lora.rank=0": "'model.lora.rank' must be positive",
        "model.lora.dropout=1.0": r"'model.lora.dropout' must be in \[0, 1\)",
        "model.lora.export_adapter=true": "needs model.llm to be a local checkpoint directory, not the preset 'tiny'",
        "model.lora.layers=[1,1]": "distinct layer indices",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, override])
    with pytest.raises(ConfigError, match="contradict"):
        load_config(None, [*base, "freeze.text_embeddings=true", "model.lora.train_text_rows=true"])
    load_config(None, ["freeze.llm_body=true", "model.lora.rank=0"])  # LoRA off: its settings are not checked
    model = build_mllm("tiny", VOCAB, attn_implementation="sdpa")
    with pytest.raises(ConfigError, match=r"'model.lora.layers' has \[5\]: the LLM has 2 decoder layers"):
        apply_lora(model, LoraSettings(enabled=True, layers=[0, 5]))
    only_first = lora_model(layers=[1], target_modules=["q_proj", "down_proj"], perturb=False)
    assert sorted(n for n, _ in only_first.named_parameters() if "lora_A" in n) == [
        "llm.model.layers.1.mlp.down_proj.lora_A.default.weight", "llm.model.layers.1.self_attn.q_proj.lora_A.default.weight"]


def test_tokenizer_training_trains_the_llm_through_adapters():
    """Stage-1 ViQ training with viq_train.train_llm and model.lora: in the LLM only the adapters
    train (codes never enter there, so the code rows stay frozen too)."""
    from data.tokenizer import build_tokenizer
    from mllm.viq_training import ViQStageConfig, ViQTrainConfig, ViQTrainModel
    from tests.mllm.test_viq_training import image_batch
    from viq import ViQModel

    viq = ViQModel.from_pretrained("viq-tiny")
    _, vocab = build_tokenizer("tiny", viq.config)
    torch.manual_seed(0)
    mllm = build_mllm("tiny", vocab, attn_implementation="sdpa")
    apply_lora(mllm, LoraSettings(enabled=True, rank=4))
    model = ViQTrainModel(viq, mllm, ViQStageConfig(stage=1, teacher="none", train_llm=True))
    report = model.apply_freezing()
    assert report["llm adapters"] == report["mllm"] == sum(p.numel() for n, p in mllm.named_parameters() if "lora_" in n)
    out = model(image_batch(model, vocab, [(56, 84)]))
    (out["loss_sum"] + out["aux_loss"]).backward()
    llm_grads = {n for n, p in mllm.llm.named_parameters() if p.grad is not None}
    assert llm_grads and all("lora_" in n for n in llm_grads)
    assert all(p.grad is not None for p in model.projector.parameters())

    load_config(None, ["model.lora.enabled=true", "viq_train.train_llm=true", "vision.source=online"], cls=ViQTrainConfig)
    with pytest.raises(ConfigError, match="set viq_train.train_llm=true"):
        load_config(None, ["model.lora.enabled=true", "vision.source=online"], cls=ViQTrainConfig)
