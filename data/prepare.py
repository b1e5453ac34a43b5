"""Get the training data ready: demo data set, records, code cache.

With `data.train` empty the trainer uses the synthetic demo set under `data.root`,
generating it when it is missing. In `codes` mode the code cache (`vision.codes_dir`,
default `<data.root>/codes-<viq>`) is extracted first when absent (rank 0 extracts, the
others wait), then opened with the settings it must match.

Several nodes: global rank 0 prepares first; then the local rank 0 of any node that still does
not see the result (a node-local disk, e.g. a relative path under each node's working
directory) prepares its own copy, the same bytes. On a shared filesystem the second round finds
everything in place and does nothing.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from data.conversations import load_mixture, load_records, mixture_order
from data.extract import cache_meta, extract_codes
from data.dataset import image_key
from data.shards import CodeStore
from data.video_codes import missing_videos
from viq.errors import ConfigError, MissingFileError
from viq.io import read_json

logger = logging.getLogger(__name__)


def train_path(cfg) -> Path:
    return Path(cfg.data.train) if cfg.data.train else Path(cfg.data.root) / "train.jsonl"


def default_codes_dir(cfg) -> Path:
    if cfg.vision.codes_dir:
        return Path(cfg.vision.codes_dir)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.model.viq).name or cfg.model.viq)
    base = Path(cfg.data.train).parent if cfg.data.train else Path(cfg.data.root)
    return base / f"codes-{safe}"


def check_synthetic_set(cfg) -> None:
    """The demo set found under `data.root` must be the one the config asks for: a set drawn with
    another size, seed or video count is refused rather than silently trained on."""
    meta_path = Path(cfg.data.root) / "meta.json"
    if cfg.data.train or not meta_path.is_file():
        return
    meta = read_json(meta_path, what="synthetic set description")
    asked = {"data.synthetic_n": (cfg.data.synthetic_n, meta.get("n")), "trainer.seed": (cfg.trainer.seed, meta.get("seed")),
             "data.synthetic_videos": (cfg.data.synthetic_videos, meta.get("n_videos", 0))}
    differ = [f"{key} is {want}, the set's is {have}" for key, (want, have) in asked.items() if want != have]
    if differ:
        raise ConfigError(f"{cfg.data.root} holds another synthetic set ({'; '.join(differ)}): set data.root to a new "
                          f"folder (the set is generated there) or delete {cfg.data.root}")


def load_training_records(cfg, seed: int):
    """(records, image_root) for a conversations file or a mixture YAML (weighted draw)."""
    path = train_path(cfg)
    if path.suffix in (".yaml", ".yml"):
        mixture = load_mixture(path)
        per_source = mixture.load()
        order = mixture_order([len(r) for r in per_source], mixture.weights, seed=seed, epoch=0)
        records = [per_source[s][i] for s, i in order.tolist()]
        image_root = cfg.data.image_root or None
        return records, image_root
    image_root = cfg.data.image_root or str(path.parent)
    return load_records(path, image_root), image_root


def _on_every_disk(make, missing, *, rank: int, local_rank: int, barrier) -> None:
    """`make()` where `missing()`: global rank 0 first, then local rank 0 of each node that still
    misses it (node-local disks). Every rank meets at both barriers unconditionally: a rank that
    checked after another had finished would otherwise skip a barrier and deadlock the rest."""
    if rank == 0 and missing():
        make()
    barrier()
    if local_rank == 0 and rank != 0 and missing():
        make()
    barrier()


def prepare_training_data(cfg, viq_cfg, *, rank: int, barrier, get_viq, log=logger.info, local_rank: int | None = None):
    """(records, image_root, code_store or None) with everything generated/extracted as needed.

    `local_rank`: this process's rank on its node (default: `rank`, one node)."""
    local_rank = rank if local_rank is None else local_rank
    path = train_path(cfg)

    def make_demo_data():
        from data.synthetic import make_synthetic_dataset

        log(f"generating the synthetic demo data set ({cfg.data.synthetic_n} samples) in {cfg.data.root}")
        make_synthetic_dataset(cfg.data.root, cfg.data.synthetic_n, seed=cfg.trainer.seed, n_videos=cfg.data.synthetic_videos)

    _on_every_disk(make_demo_data, lambda: not cfg.data.train and not path.exists(),
                   rank=rank, local_rank=local_rank, barrier=barrier)
    if not path.exists():
        raise MissingFileError(f"data.train: {path} does not exist")
    check_synthetic_set(cfg)
    records, image_root = load_training_records(cfg, cfg.trainer.seed)
    if cfg.vision.source in ("online", "none"):  # none: the blind baseline needs no codes
        return records, image_root, None
    codes_dir = default_codes_dir(cfg)
    manifest = codes_dir / "manifest.json"

    def extract():
        log(f"extracting codes with {cfg.model.viq} into {codes_dir}" + (f" (rank {rank})" if rank else ""))
        summary = extract_codes(get_viq(), cfg.model.viq, records, str(codes_dir), key_root=image_root, log=None,
                                video=cfg.data.video)
        log(f"  {summary['images_encoded']} images at {summary['images_per_s']:.1f} images/s, "
            f"compression {summary['compression_ratio'] or 0:.0f}x, {summary['images_skipped']} skipped"
            + (f"; {summary['videos_encoded']} videos ({summary['video_frames_encoded']} frames), "
               f"{summary['videos_skipped']} skipped" if summary["videos_total"] else ""))

    def missing() -> bool:
        # Videos are cached per sampling setting (data.video): new settings extract their frames.
        return cfg.vision.extract_if_missing and (
            not manifest.exists() or missing_videos(codes_dir, records, image_root, image_key, cfg.data.video) > 0)

    _on_every_disk(extract, missing, rank=rank, local_rank=local_rank, barrier=barrier)
    if not manifest.exists():
        raise MissingFileError(
            f"vision.codes_dir: no code cache at {codes_dir}; run scripts/extract_codes.py or set vision.extract_if_missing=true"
        )
    store = CodeStore(codes_dir, expected_meta=cache_meta(viq_cfg, cfg.model.viq))
    return records, image_root, store
