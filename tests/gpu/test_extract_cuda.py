"""CUDA-only: the extraction pipeline's pinned, asynchronous path gives the encoder's own codes."""
import pytest
import torch

from data.conversations import load_records
from data.extract_pipeline import extract_pipeline
from data.shards import CodeStore
from tests.fixtures import make_colour_dataset
from viq import ViQModel

pytestmark = pytest.mark.gpu


def test_pipeline_on_cuda_equals_encode(tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=12)
    viq = ViQModel.from_pretrained("viq-tiny", device="cuda")
    records = load_records(train, train.parent)
    summary = extract_pipeline(viq, "viq-tiny", records, str(tmp_path / "codes"), key_root=str(train.parent),
                               workers=2, batch_images=12, log=None)  # one batch: the same packing as encode() below
    assert summary["images_encoded"] == 12 and summary["verified"] is True
    expected = viq.encode([r.images[0] for r in records])
    store = CodeStore(tmp_path / "codes")
    for k, codes in enumerate(expected):
        assert torch.equal(store.get(f"images/{k:03d}.png"), codes)
