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
