"""vision.source none (the blind baseline): image positions kept, image information gone."""
import torch

from data.conversations import load_records
from data.dataset import BLIND_CODE, ConversationDataset
from data.tokenizer import build_tokenizer
from tests.fixtures import make_colour_dataset
from viq import ViQModel


def test_blind_source_keeps_the_positions_and_drops_the_image(tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=4)
    viq = ViQModel.from_pretrained("viq-tiny")
    tokenizer, vocab = build_tokenizer("tiny", viq.config)
    records = load_records(train, train.parent)
    kw = dict(image_root=train.parent, resize_policy=viq.config.resize_policy)
    online = ConversationDataset(records, tokenizer, vocab, source="online", **kw)
    blind = ConversationDataset(records, tokenizer, vocab, source="none", **kw)
    fixed = vocab.codes_to_ids(torch.full((1, 4), BLIND_CODE))
    for i in range(len(online)):
        a, b = online[i], blind[i]
        # the same sequence, image placeholders and row ends included, and the same supervision
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        n = sum(int(c.reshape(-1, 4).shape[0]) for c in viq.encode_pixels(a["images"]))
        assert "images" not in b and b["codes"].shape == (n, 4)
        assert torch.equal(b["codes"], fixed.expand(n, 4))


def test_blind_export_is_evaluated_with_the_fixed_code(tmp_path):
    from PIL import Image

    from eval.generate import MLLMGenerator
    from mllm.export import is_blind_export, save_export
    from mllm.model import build_mllm

    viq = ViQModel.from_pretrained("viq-tiny")
    tokenizer, vocab = build_tokenizer("tiny", viq.config)
    torch.manual_seed(0)
    model = build_mllm("tiny", vocab)
    image = Image.fromarray(torch.randint(0, 256, (84, 112, 3), dtype=torch.uint8).numpy())
    messages = [[{"type": "image", "value": image}, {"type": "text", "value": "What colour?"}]]
    prompts = {}
    for source in ("codes", "none"):
        out = save_export(model, tokenizer, vocab, tmp_path / source, viq, vision_source=source)
        assert is_blind_export(out) == (source == "none")
        prompts[source] = MLLMGenerator(out, device="cpu").prepare(messages)[0]
    seen, blind = prompts["codes"], prompts["none"]
    assert torch.equal(seen.input_ids, blind.input_ids) and seen.codes.shape == blind.codes.shape == (12, 4)
    assert torch.equal(blind.codes, vocab.codes_to_ids(torch.full((12, 4), BLIND_CODE)))
    assert not torch.equal(seen.codes, blind.codes)
