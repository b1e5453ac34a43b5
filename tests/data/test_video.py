"""Video frames: choice, decoding, timestamps, records, layout and cache keys (no model)."""
import json

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.chat import build_sample
from data.conversations import RecordError, load_records, parse_record
from data.tokenizer import build_tokenizer
from data.video import (
    VideoIndex,
    VideoInputError,
    VideoSettings,
    decode_frames,
    expand_video_placeholder,
    frame_keys,
    plan_frames,
    select_frames,
)
from data.synthetic_video import write_video
from tests.video_fixtures import frame_number, indexed_frames
from viq import ViQModel
from viq.errors import ConfigError


def test_select_frames_uniform_fps_and_no_duplicates():
    thirty_fps = [k / 30 for k in range(61)]  # 2 s at 30 fps
    assert select_frames(thirty_fps, 4) == [0, 20, 40, 60]
    assert select_frames(thirty_fps, 32, fps=1.0) == [0, 30, 60]
    assert select_frames(thirty_fps, 2, fps=1.0) == [0, 60]  # fps candidates thinned uniformly to max_frames
    # a clip shorter than max_frames: every frame once, never repeated (ms-swift #9750, lmms-eval #1019)
    assert select_frames([0.0, 0.5, 1.0], 32) == [0, 1, 2]
    # a source slower than the sampling rate: round(fps_src / fps) would be 0; each frame once instead
    two_fps = [k / 2 for k in range(5)]
    assert select_frames(two_fps, 32, fps=10.0) == [0, 1, 2, 3, 4]
    # many candidates: distinct even when the spacing is barely above one
    assert len(set(select_frames([k / 30 for k in range(33)], 32))) == 32
    assert select_frames([], 8) == []


@pytest.mark.parametrize("codec,suffix,n,fps", [("libx264", "mp4", 15, 5), ("libvpx", "webm", 6, 3), ("mpeg4", "mp4", 9, 4)])
def test_sampled_frames_are_exactly_the_planned_ones_with_pts_timestamps(tmp_path, codec, suffix, n, fps):
    path = write_video(tmp_path / f"v.{suffix}", indexed_frames(n, side=56), fps=fps, codec=codec)
    plan = plan_frames(path, VideoSettings(max_frames=4))
    expected = [round(k * (n - 1) / 3) for k in range(4)]
    assert plan.indices == expected
    # timestamps from pts and the time base (not from a sampling step), starting at 0
    assert plan.seconds == pytest.approx([k / fps for k in expected], abs=1e-3)
    assert [frame_number(im) for im in decode_frames(path, plan)] == expected
    assert (plan.height, plan.width) == (56, 56)
    if suffix == "webm":  # no frame count in the container: the plan counts packets itself (PyAV #1131)
        with av.open(str(path)) as container:
            assert container.streams.video[0].frames == 0


def test_b_frames_and_sparse_keyframes_decode_the_right_frames(tmp_path):
    # Packets arrive out of presentation order (B-frames) and keyframes are 5 apart: the frames kept
    # are still the ones asked for, not the previous keyframe (vllm #42586) nor a decode-order neighbour.
    path = tmp_path / "gop.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width = stream.height = 56
        stream.pix_fmt = "yuv420p"
        stream.gop_size = 5
        stream.options = {"bf": "2"}
        for array in indexed_frames(15, side=56):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    plan = plan_frames(path, VideoSettings(max_frames=32, fps=2.5))
    assert plan.indices == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [frame_number(im) for im in decode_frames(path, plan)] == plan.indices
    # far-apart frames are reached by seeking (to keyframes 5 and 10) and decoding forward to the target
    sparse = plan_frames(path, VideoSettings(max_frames=3))
    assert sparse.indices == [0, 7, 14]
    for gap in (0.5, None):
        assert [frame_number(im) for im in decode_frames(path, sparse, seek_gap_seconds=gap)] == [0, 7, 14]


def test_unusable_videos_fail_with_their_name(tmp_path):
    with pytest.raises(VideoInputError, match="nowhere.mp4: no such video file"):
        plan_frames(tmp_path / "nowhere.mp4", VideoSettings())
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    with pytest.raises(VideoInputError, match="junk.mp4: cannot open video"):
        plan_frames(tmp_path / "junk.mp4", VideoSettings())
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoInputError, match="empty.mp4: cannot open video"):
        plan_frames(tmp_path / "empty.mp4", VideoSettings())
    with av.open(str(tmp_path / "no_frames.mkv"), "w") as container:  # a video stream with zero frames (audio only)
        video = container.add_stream("mpeg4", rate=4)
        video.width = video.height = 32
        audio = container.add_stream("pcm_s16le", rate=8000)
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        chunk.sample_rate = 8000
        for packet in [*audio.encode(chunk), *audio.encode()]:
            container.mux(packet)
    with pytest.raises(VideoInputError, match="no_frames.mkv: video has no frames"):
        plan_frames(tmp_path / "no_frames.mkv", VideoSettings())
    # a file cut short after planning: fewer decoded frames than planned is an error, not fewer frames
    path = write_video(tmp_path / "cut.mkv", indexed_frames(8, side=32), codec="mpeg4")
    plan = plan_frames(path, VideoSettings())
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(VideoInputError, match=r"cut.mkv: (decoded [0-7] of its 8 sampled frames|cannot open video)"):
        decode_frames(path, plan)


def test_settings_are_validated_and_tag_the_keys():
    with pytest.raises(ConfigError, match="data.video.max_frames"):
        VideoSettings(max_frames=0).validate()
    with pytest.raises(ConfigError, match="data.video.frame_max_pixels"):
        VideoSettings(frame_max_pixels=100).validate()
    with pytest.raises(ConfigError, match=r"^--video-fps must be >= 0"):
        VideoSettings(fps=-1).validate("--video")
    assert VideoSettings(max_frames=8, fps=0.5).tag() == "max_frames=8,fps=0.5,frame_max_pixels=50176"


def test_video_records_llava_ov_layout(tmp_path):
    rec = parse_record({"id": "v", "video": "clips/a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "x"}]}, "f:1", tmp_path)
    assert rec.video == str(tmp_path / "clips/a.mp4") and rec.images == []
    assert rec.conversations[0]["value"] == "<image>\nWhat happens?"
    rec = parse_record({"video": "a.mp4", "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "x"}]},
                       "f:2", tmp_path)
    assert rec.conversations[0]["value"] == "<image>\nWhy?"  # no placeholder: before the first question
    with pytest.raises(RecordError, match=r"f:3: 2 '<image>'/'<video>' placeholders but one video"):
        parse_record({"video": "a.mp4", "conversations": [{"from": "human", "value": "<image><video>"},
                                                          {"from": "gpt", "value": "x"}]}, "f:3", tmp_path)
    with pytest.raises(RecordError, match="f:4: a video record holds exactly one 'video' and no 'image'"):
        parse_record({"video": "a.mp4", "image": "b.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                            {"from": "gpt", "value": "x"}]}, "f:4", tmp_path)
    # parquet tables: a `video` column of paths (null for image records) or of embedded bytes
    clip = write_video(tmp_path / "a.mp4", indexed_frames(3, side=32), codec="mpeg4").read_bytes()
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    pq.write_table(pa.table({"id": ["i", "v"], "image": ["x.png", None], "video": [None, "a.mp4"],
                             "conversations": [turns] * 2}), tmp_path / "paths.parquet")
    pq.write_table(pa.table({"id": ["b"], "video": [{"bytes": clip, "path": "a.mp4"}], "conversations": [turns]}),
                   tmp_path / "bytes.parquet")
    image_rec, video_rec = load_records(tmp_path / "paths.parquet", tmp_path)
    assert image_rec.video is None and video_rec.video == str(tmp_path / "a.mp4")
    embedded = load_records(tmp_path / "bytes.parquet", tmp_path)[0]
    assert embedded.video == clip
    assert [frame_number(im) for im in decode_frames(clip, plan_frames(clip, VideoSettings()))] == [0, 1, 2]


def test_frames_in_order_each_its_own_span_with_timestamps():
    tokenizer, vocab = build_tokenizer("tiny", ViQModel.from_pretrained("viq-tiny").config)
    turns = [{"from": "human", "value": "<image>\nWhere to?"}, {"from": "gpt", "value": "left"}]
    laid = expand_video_placeholder(turns, [0.0, 0.5, 1.25], timestamps=True)
    assert laid[0]["value"] == "0.0s: <image>\n0.5s: <image>\n1.2s: <image>\nWhere to?"
    assert expand_video_placeholder(turns, [0.0, 0.5], timestamps=False)[0]["value"] == "<image>\n<image>\nWhere to?"
    sample = build_sample(tokenizer, vocab, laid, [(2, 3)] * 3)
    ids = sample["input_ids"].tolist()
    starts = [i for i, t in enumerate(ids) if t == vocab.vision_start_id]
    ends = [i for i, t in enumerate(ids) if t == vocab.vision_end_id]
    assert len(starts) == len(ends) == 3 and all(e - s == vocab.image_length(2, 3) - 1 for s, e in zip(starts, ends))
    between = tokenizer.decode(ids[ends[0] + 1:starts[1]])
    assert between == "\n0.5s: " and sample["n_image_tokens"] == 18


def test_video_index_tells_complete_from_interrupted():
    settings = VideoSettings(max_frames=3)
    plan = type("P", (), {"indices": [0, 4, 9], "seconds": [0.0, 0.4, 0.9]})()
    keys = frame_keys("clips/a.mp4", settings, plan)
    assert keys[1] == "clips/a.mp4|max_frames=3,fps=0,frame_max_pixels=50176|frame 2/3 #4 @0.400s"
    index = VideoIndex(keys + ["img.png"] + frame_keys("b.mp4", settings, plan)[:2])
    assert [k for _, _, k in index.complete("clips/a.mp4|" + settings.tag())] == keys
    assert index.complete("b.mp4|" + settings.tag()) is None
    assert index.incomplete() == ["b.mp4|" + settings.tag()]
    assert index.complete("clips/a.mp4|" + VideoSettings(max_frames=4).tag()) is None  # other settings, other keys


def test_synthetic_videos_leave_the_image_records_untouched(tmp_path):
    from data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "a", 6, seed=3, val_fraction=0.25)
    summary = make_synthetic_dataset(tmp_path / "b", 6, seed=3, n_videos=4, val_fraction=0.25)
    a_lines = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    b_lines = (tmp_path / "b" / "train.jsonl").read_text().splitlines()
    assert b_lines[: len(a_lines)] == a_lines and summary["n_videos"] == 4
    for name in ("SYNTH_CHART.tsv", "SYNTH_DOC.tsv", "SYNTH_SHAPES.tsv"):
        assert (tmp_path / "a" / "vlmeval" / name).read_bytes() == (tmp_path / "b" / "vlmeval" / name).read_bytes()
    videos = [json.loads(line) for line in b_lines[len(a_lines):]]
    assert len(videos) == 3 and all(v["video"].endswith(".mp4") for v in videos)
    from eval.benchmarks import get_benchmark

    rows = get_benchmark("SYNTH_VIDEO").load(tmp_path / "b" / "vlmeval")
    assert len(rows) == 1 and rows[0]["answer"] in "ABCD"
    plan = plan_frames(rows[0]["video"], VideoSettings())
    assert len(plan.indices) == 8 and plan.seconds[-1] == pytest.approx(1.75)
