"""Local Hugging Face tables: `datasets.save_to_disk` folders and Arrow stream files, via pyarrow.

`Dataset.save_to_disk(dir)` writes `dir/state.json`, whose `_data_files` list names Arrow IPC
*stream* files (`data-00000-of-00001.arrow`, ...); `DatasetDict.save_to_disk(dir)` writes
`dir/dataset_dict.json` (`{"splits": [...]}`) and one such folder per split. Training records
(`data.conversations`) and benchmark rows (`eval.data`) both read them here, so neither needs
the optional `datasets` package. Images stay as the `Image` feature stores them:
`{"bytes": ..., "path": ...}` structs.

Errors are one line naming the file at fault; callers pass their own DataError subclass and
the name of their split setting, so the message says what to change where the user sets it.
"""
from __future__ import annotations

import os
from pathlib import Path

from viq.errors import DataError
from viq.io import read_json

STATE_FILE = "state.json"
DATASET_DICT_FILE = "dataset_dict.json"


def is_save_to_disk(path: str | os.PathLike) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return (path / STATE_FILE).is_file() or (path / DATASET_DICT_FILE).is_file()


def read_arrow_stream(path: str | os.PathLike, *, error: type[DataError] = DataError):
    """One Arrow IPC stream file (what save_to_disk writes) as a pyarrow Table, memory-mapped."""
    import pyarrow as pa

    path = Path(path)
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except FileNotFoundError:
        raise error(f"{path}: Arrow file not found") from None
    except pa.ArrowInvalid as e:
        raise error(f"{path}: not an Arrow stream file as datasets.save_to_disk writes ({e})") from None


def dataset_dict_splits(path: str | os.PathLike, *, error: type[DataError] = DataError) -> list[str]:
    """The split names of a DatasetDict folder, in the order `dataset_dict.json` lists them."""
    index = Path(path) / DATASET_DICT_FILE
    content = read_json(index)
    splits = content.get("splits") if isinstance(content, dict) else None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise error(f"{index}: expected {{\"splits\": [names]}} as DatasetDict.save_to_disk writes it")
    return splits


def read_save_to_disk(path: str | os.PathLike, split: str | None = None, *, error: type[DataError] = DataError,
                      split_option: str = "split"):
    """The pyarrow Table of a save_to_disk folder; a DatasetDict needs `split` (set as `split_option`)."""
    import pyarrow as pa

    path = Path(path)
    if (path / DATASET_DICT_FILE).is_file():
        splits = dataset_dict_splits(path, error=error)
        if split not in splits:
            wanted = "choose one" if split is None else f"there is no split {split!r}; choose one"
            raise error(f"{path}: a DatasetDict with splits {', '.join(splits)}; {wanted} with {split_option}")
        path = path / split
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise error(f"{path}: no {STATE_FILE} or {DATASET_DICT_FILE}; not a datasets.save_to_disk folder")
    state = read_json(state_file)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not files or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise error(f"{state_file}: no '_data_files' list of {{\"filename\": ...}}; not a datasets.save_to_disk folder")
    return pa.concat_tables([read_arrow_stream(path / f["filename"], error=error) for f in files])
