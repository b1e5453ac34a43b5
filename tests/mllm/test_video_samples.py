"""Video samples end to end below the trainer: extraction keys, resume, ranks, codes == online,
whole-frame truncation, packed == unpacked, named skips."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data.conversations import load_records
from data.dataset import ConversationDataset, image_key
from data.extract import cache_meta, extract_codes, extract_file
from data.loader import PackedLoader
from data.packing import collate_packed
from data.shards import CodeStore, ShardWriter, done_keys, merge_manifests
from data.tokenizer import build_tokenizer
from data.video import VideoSettings, frame_keys, plan_frames
from data.video_codes import incomplete_video_errors, missing_videos
from mllm.model import build_mllm
from tests.mllm.test_train import FAST, REPO, launch, metrics
from tests.video_fixtures import make_mixed_dataset
from viq import ViQModel

SETTINGS = VideoSettings(max_frames=4, frame_max_pixels=56 * 56)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    train = make_mixed_dataset(root)
    viq = ViQModel.from_pretrained("viq-tiny")
    summary = extract_file(viq, "viq-tiny", str(train), str(root / "codes"), log=None, video=SETTINGS)
    tokenizer, vocab = build_tokenizer("tiny", viq.config)
    records = load_records(train, train.parent)
    store = CodeStore(root / "codes", expected_meta=cache_meta(viq.config, "viq-tiny"))
    return {"train": train, "viq": viq, "summary": summary, "tokenizer": tokenizer, "vocab": vocab,
            "records": records, "store": store}


@pytest.fixture(scope="module")
def model(mixed):
    torch.manual_seed(0)
    return build_mllm("tiny", mixed["vocab"]).eval()


def datasets(m, **kw):
    common = dict(image_root=m["train"].parent, video=kw.pop("video", SETTINGS), **kw)
    cached = ConversationDataset(m["records"], m["tokenizer"], m["vocab"], source="codes", code_store=m["store"], **common)
    online = ConversationDataset(m["records"], m["tokenizer"], m["vocab"], source="online",
                                 resize_policy=m["viq"].config.resize_policy, **common)
    return cached, online


def test_extraction_stores_frames_and_names_bad_videos(mixed):
    s = mixed["summary"]
    assert (s["images_encoded"], s["videos_total"], s["videos_encoded"], s["videos_skipped"]) == (3, 4, 2, 2)
    assert s["video_frames_encoded"] == 8  # 4 of the mp4's 10 frames, 4 of the webm's 6
    report = [json.loads(line) for line in open(s["skipped_report"])]
    assert [r["key"] for r in report] == ["videos/broken.mp4", "videos/nowhere.mp4"]
    assert "broken.mp4: cannot open video" in report[0]["error"] and "nowhere.mp4: no such video file" in report[1]["error"]
    keys = [k for k in mixed["store"].keys() if k.startswith("videos/grey.mp4|")]
    assert keys == [f"videos/grey.mp4|{SETTINGS.tag()}|frame {k + 1}/4 #{i} @{i / 5:.3f}s" for k, i in enumerate([0, 3, 6, 9])]
    # 56 x 56 px budget: each 56 x 56 frame is 2 x 2 tokens, the 84 x 84 webm frames shrink to 2 x 2 as well
    assert {mixed["store"].grid(k) for k in mixed["store"].keys() if "|frame " in k} == {(2, 2)}


def test_codes_and_online_give_the_same_video_samples(mixed, model):
    cached, online = datasets(mixed)
    assert len(cached) == len(online) == 6  # 3 images, 1 multi-image, 2 videos
    for ds in (cached, online):
        assert ds.skipped == ({"codes missing from the cache": 2} if ds is cached else {"VideoInputError": 2})
        assert any("nowhere.mp4" in e for e in ds.skipped_examples)
    viq, vocab = mixed["viq"], mixed["vocab"]
    for i in range(len(cached)):
        a, b = cached[i], online[i]
        assert cached.length(i) == online.length(i) == a["input_ids"].numel()
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        with torch.inference_mode():
            codes = torch.cat([c.reshape(-1, 4) for c in viq.encode_pixels(b["images"])])
        assert torch.equal(a["codes"], vocab.codes_to_ids(codes))
        with torch.no_grad():
            la = model(collate_packed([a], 1024, pad_to_capacity=False))["loss_sum"]
            lb = model(collate_packed([{**b, "codes": vocab.codes_to_ids(codes)}], 1024, pad_to_capacity=False))["loss_sum"]
        assert torch.equal(la, lb)
    video = next(i for i, r in enumerate(cached.records) if r.id == "v_mp4")
    ids = cached[video]["input_ids"]
    assert int((ids == vocab.vision_start_id).sum()) == 4
    text = mixed["tokenizer"].decode(ids[ids < vocab.text_vocab_size].tolist())
    assert "0.0s: <|vision_start|><|vision_end|>\n0.6s: " in text.replace("<|image_pad|>", "")


def test_packed_equals_unpacked_with_video_samples(mixed, model):
    cached, _ = datasets(mixed)
    samples = [cached[i] for i in range(len(cached))]
    with torch.no_grad():
        alone = [model(collate_packed([s], 1024, pad_to_capacity=False))["loss_sum"] for s in samples]
        per_sample = model.per_sample_losses(collate_packed(samples, sum(s["input_ids"].numel() for s in samples)))
    torch.testing.assert_close(torch.stack([l for l, _ in per_sample]), torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_overlong_videos_keep_whole_frames_or_are_dropped(mixed):
    cached, online = datasets(mixed)
    video = next(i for i, r in enumerate(cached.records) if r.id == "v_mp4")
    full = cached.length(video)
    per_frame = mixed["vocab"].image_length(2, 2)
    max_len = full - per_frame - 3  # one frame (and its timestamp) too many
    short_c, short_o = datasets(mixed, max_len=max_len, overlong="truncate")
    assert short_c.n_video_truncated == short_o.n_video_truncated >= 1
    a, b = short_c[video], short_o[video]
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].numel() <= max_len
    assert int((a["input_ids"] == mixed["vocab"].vision_start_id).sum()) == 3 and len(b["images"]) == 3
    assert a["codes"].shape == (3 * 4, 4) and a["labels"][-2] != -100  # the answer survives, whole frames gone
    dropping, _ = datasets(mixed, max_len=max_len, overlong="drop")
    assert dropping.n_video_truncated == 0 and dropping.length(video) == full
    loader = PackedLoader(dropping, max_len, buffer_size=16, overlong="drop", drop_last=False)
    _, stats = loader.plan_epoch()
    assert stats.n_dropped >= 1
    tiny, _ = datasets(mixed, max_len=40, overlong="truncate")  # not even one frame fits: skipped and named
    assert tiny.skipped.get("ValueError") and any("not even one frame fits" in e for e in tiny.skipped_examples)


def test_new_settings_extract_new_frames_never_mixing(mixed, tmp_path):
    train, records, viq = mixed["train"], mixed["records"], mixed["viq"]
    out = tmp_path / "codes"
    other = VideoSettings(max_frames=2, frame_max_pixels=56 * 56)
    # two ranks, then a merge: every video frame exactly once
    for rank in (0, 1):
        extract_codes(viq, "viq-tiny", records, str(out), key_root=str(train.parent), rank=rank, world_size=2, log=None,
                      video=SETTINGS)
    merge_manifests(out)
    assert missing_videos(out, records, train.parent, image_key, SETTINGS) == 2  # the two unusable ones
    assert missing_videos(out, records, train.parent, image_key, other) == 4
    again = extract_codes(viq, "viq-tiny", records, str(out), key_root=str(train.parent), log=None, video=other)
    assert (again["videos_already_cached"], again["videos_encoded"], again["images_encoded"]) == (0, 2, 0)
    store = CodeStore(out)
    assert sum("max_frames=2," in k for k in store.keys()) == 4 and sum("max_frames=4," in k for k in store.keys()) == 8
    for settings, n_frames in ((SETTINGS, 4), (other, 2)):
        ds = ConversationDataset(records, mixed["tokenizer"], mixed["vocab"], source="codes", image_root=train.parent,
                                 code_store=store, video=settings)
        video = next(i for i, r in enumerate(ds.records) if r.id == "v_webm")
        assert len(ds.keys[video]) == n_frames and all(settings.tag() in k for k in ds.keys[video])


def test_interrupted_video_is_reported_then_completed(mixed, tmp_path):
    train, records, viq = mixed["train"], mixed["records"], mixed["viq"]
    out = tmp_path / "codes"
    key = "videos/grey.webm"
    keys = frame_keys(key, SETTINGS, plan_frames(train.parent / key, SETTINGS))
    with ShardWriter(out, meta=cache_meta(viq.config, "viq-tiny")) as writer:  # a run killed after one frame
        writer.add(keys[0], torch.zeros(2, 2, 4, dtype=torch.long))
    assert incomplete_video_errors(out) == [f"{out}: video '{key}|{SETTINGS.tag()}' has only some of its frames cached; "
                                            "rerun the extraction to complete it"]
    summary = extract_codes(viq, "viq-tiny", records, str(out), key_root=str(train.parent), log=None, video=SETTINGS)
    assert summary["videos_encoded"] == 2 and incomplete_video_errors(out) == []
    assert set(keys) <= done_keys(out)


def test_eval_lays_out_a_video_message_as_training_does(mixed, tmp_path):
    from types import SimpleNamespace

    from data.video import read_video_settings, write_video_settings
    from eval.generate import MLLMGenerator, human_turn

    write_video_settings(tmp_path, SETTINGS)
    assert read_video_settings(tmp_path) == SETTINGS and read_video_settings(tmp_path / "none") == VideoSettings()
    _, online = datasets(mixed)
    i = next(i for i, r in enumerate(online.records) if r.id == "v_mp4")
    text, items = human_turn([{"type": "video", "value": str(mixed["train"].parent / "videos" / "grey.mp4")},
                              {"type": "text", "value": "Does it get brighter?"}])
    # the generator's own method, on the real ViQ model and the export's sampling settings
    laid, pixels = MLLMGenerator._with_frames(SimpleNamespace(video=SETTINGS, viq=mixed["viq"]), text, items)
    assert laid == online.records[i].conversations[0]["value"]
    assert len(pixels) == 4 and all(torch.equal(a, b) for a, b in zip(pixels, online[i]["images"]))


@pytest.mark.slow
def test_mixed_image_and_video_file_trains_through_the_launcher_and_scores_the_video_task(tmp_path):
    train = make_mixed_dataset(tmp_path / "data")
    video = ["--set", "data.video.max_frames=4", "--set", f"data.video.frame_max_pixels={56 * 56}"]
    run = tmp_path / "codes-run"
    proc = launch(["--set", f"data.train={train}", *video, "--run-dir", str(run), "--max-steps", "4", *FAST])
    assert len(metrics(run)) == 4 and (train.parent / "codes-viq-tiny" / "manifest.json").is_file()
    log = proc.stdout + proc.stderr
    assert "2 videos (8 frames), 2 skipped" in log and "skipped 2 record(s)" in log
    assert json.loads((run / "hf" / "video.json").read_text())["max_frames"] == 4
    # the same file with the encoder in the loop: the same samples, so the same losses
    online = tmp_path / "online-run"
    launch(["--set", f"data.train={train}", *video, "--set", "vision.source=online", "--set", "trainer.export=false",
            "--run-dir", str(online), "--max-steps", "2", *FAST])
    for got, want in zip(metrics(online), metrics(run)[:2], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (got, want)

    from data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "synth", 3, seed=1, val_fraction=0.5, n_videos=4)
    proc = subprocess.run(
        [sys.executable, "-m", "eval.run", "--model", str(run / "hf"), "--benchmarks", "SYNTH_VIDEO",
         "--data-root", str(tmp_path / "synth" / "vlmeval"), "--out", str(tmp_path / "eval"), "--max-new-tokens", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])["scores"]
    assert 0 <= scores["SYNTH_VIDEO"]["Overall"] <= 1
    assert "SYNTH_VIDEO" in (tmp_path / "eval" / "report.md").read_text()
