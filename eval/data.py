"""Benchmark data: VLMEvalKit TSVs and Hugging Face (lmms-lab / HF) layouts -> records.

A record is a plain dict with VLMEvalKit's column names (`index`, `question`, `answer`,
`A`..`I`, `hint`, `category`, `l2-category`, `split`, ...) and `image`: a list of
ImageRef (decoded lazily, so loading DocVQA does not decode thousands of images).

Cell values follow what VLMEvalKit sees after pandas reads the TSV, because those values
are what it scores: the default NA strings ('', 'N/A', 'NA', 'None', 'null', 'nan', ...)
become missing (None), and a column whose values are all integers / all numbers / all
booleans becomes int / float / bool (so an all-numeric answer column '0' reads as 0.0 when
another row holds '2.5'; str() of it is '0.0'). Prediction files are another matter: VLMEvalKit's
.xlsx / .tsv are read with pandas itself (eval/vlmeval_files.py), as VLMEvalKit reads them.

VLMEvalKit TSV conventions handled: base64 images; an `image` value of <= 64 characters is
the index of another row whose image it reuses; a "['...', '...']" image value is a
multi-image row; rows without an image are dropped (ImageBaseDataset's skip_noimg).
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import os
import re
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data.hf_tables import is_save_to_disk, read_arrow_stream, read_save_to_disk
from viq.errors import DataError  # bad benchmark or prediction input; callers import it from here too
from viq.io import read_jsonl_objects, read_text

# pandas' default na_values for read_csv / read_excel.
PANDAS_NA_STRINGS = frozenset({
    '', '#N/A', '#N/A N/A', '#NA', '-1.#IND', '-1.#QNAN', '-NaN', '-nan', '1.#IND', '1.#QNAN',
    '<NA>', 'N/A', 'NA', 'NULL', 'NaN', 'None', 'n/a', 'nan', 'null',
})
TEXT_ONLY_COLUMNS = ('prediction',)
IMAGE_REFERENCE_MAX_LEN = 64  # VLMEvalKit: an image field this short is another row's index
_INT_PATTERN = re.compile(r'^[+-]?\d+$')
_FLOAT_PATTERN = re.compile(r'^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity|nan)$',
                            re.IGNORECASE)
_BOOL_VALUES = {'True': True, 'TRUE': True, 'true': True, 'False': False, 'FALSE': False, 'false': False}


class ImageRef:
    """One image of one record: base64 text, encoded bytes or a file path, decoded on load()."""

    def __init__(self, payload, benchmark: str, row: int, column: str, index=None):
        self.payload = payload
        self.benchmark = benchmark
        self.row = row          # 0-based data row in the source file
        self.column = column
        self.index = index      # the row's `index` value, when known

    def _bytes(self) -> bytes:
        if isinstance(self.payload, (bytes, bytearray)):
            return bytes(self.payload)
        if isinstance(self.payload, os.PathLike) or (
                isinstance(self.payload, str) and len(self.payload) < 4096 and os.path.isfile(self.payload)):
            return Path(self.payload).read_bytes()
        return base64.b64decode(self.payload)

    def load(self) -> Image.Image:
        """The image as VLMEvalKit hands it on: RGBA / P / LA converted to RGB."""
        try:
            image = Image.open(io.BytesIO(self._bytes()))
            image.load()
        except (binascii.Error, ValueError, TypeError, OSError, UnidentifiedImageError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            where = f'row {self.row}' + ('' if self.index is None else f' (index {self.index})')
            raise DataError(f"{self.benchmark}: {where}, column '{self.column}': undecodable image "
                            f"({type(exc).__name__}: {detail})") from None
        if image.mode in ('RGBA', 'P', 'LA'):
            image = image.convert('RGB')
        return image

    def __repr__(self):
        return f'ImageRef({self.benchmark}, row={self.row}, column={self.column!r})'


# --------------------------------------------------------------------------- cells


def apply_na_rule(value):
    return None if isinstance(value, str) and value in PANDAS_NA_STRINGS else value


def infer_column(values: list):
    """pandas read_csv type inference for one column of raw strings."""
    present = [v for v in values if v is not None]
    if not present:
        return values
    if all(_INT_PATTERN.match(v) for v in present):
        if len(present) == len(values):
            return [int(v) for v in values]
        return [None if v is None else float(int(v)) for v in values]  # ints with NaN -> float64
    if all(_FLOAT_PATTERN.match(v) for v in present):
        return [None if v is None else float(v) for v in values]
    if len(present) == len(values) and all(v in _BOOL_VALUES for v in present):
        return [_BOOL_VALUES[v] for v in values]
    return values


def read_tsv_rows(path: Path, text_only_columns=TEXT_ONLY_COLUMNS) -> list[dict]:
    """A TSV as pandas (sep='\\t', default quoting) would read it, as a list of row dicts."""
    csv.field_size_limit(sys.maxsize)
    try:
        header, raw_rows = _read_tsv_fields(path)
    except UnicodeDecodeError:
        read_text(path)   # streaming saves memory on GB-sized TSVs; this names the file, line and byte
        raise
    columns = {}
    for j, name in enumerate(header):
        values = [apply_na_rule(r[j]) for r in raw_rows]
        columns[name] = values if name in text_only_columns else infer_column(values)
    return [{name: columns[name][i] for name in header} for i in range(len(raw_rows))]


def _read_tsv_fields(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows padded to the header's width) of a tab-separated file, read as a stream."""
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.reader(f, delimiter='\t')
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f'{path}: empty file, expected a header line with column names') from None
        raw_rows = []
        for line_number, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) > len(header):
                raise DataError(f'{path}:{line_number}: {len(fields)} fields but the header has {len(header)} columns')
            raw_rows.append(fields + [''] * (len(header) - len(fields)))
    return header, raw_rows


def read_jsonl_rows(path: Path) -> list[dict]:
    """JSON Lines objects with pandas' NA strings as None (what VLMEvalKit's round trip yields)."""
    return [{k: apply_na_rule(v) for k, v in row.items()} for _, row in read_jsonl_objects(path)]


def require_columns(rows: list[dict], columns, source, purpose: str) -> None:
    present = set()
    for row in rows:
        present.update(row)
    for column in columns:
        if column not in present:
            raise DataError(f"{source}: missing column '{column}' ({purpose}; columns present: "
                            f"{sorted(present)})")


# --------------------------------------------------------------------------- VLMEvalKit TSV


def _image_list(value: str) -> list[str]:
    """toliststr: a "[...]" string is a Python list literal of images, else one image."""
    if value.startswith('[') and value.endswith(']'):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return [str(x) for x in parsed]
    return [value]


def records_from_tsv(path: Path, benchmark: str, required_columns=()) -> list[dict]:
    """VLMEvalKit TSV -> records, with index-referenced and multi-image rows resolved."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{benchmark}: data file {path} not found (expected <data-root>/{benchmark}.tsv)')
    rows = read_tsv_rows(path)
    require_columns(rows, required_columns, path, f'required by {benchmark}')
    has_image = any('image' in r for r in rows)
    numbered = list(enumerate(rows))
    if has_image:
        numbered = [(n, r) for n, r in numbered if r.get('image') is not None]  # skip_noimg
    by_index = {str(r['index']): r for _, r in numbered} if rows and 'index' in rows[0] else {}
    records = []
    for row_number, row in numbered:
        record = dict(row)
        if has_image:
            value = str(row['image'])
            if len(value) <= IMAGE_REFERENCE_MAX_LEN:
                target = by_index.get(value)
                if target is None or len(str(target['image'])) <= IMAGE_REFERENCE_MAX_LEN:
                    raise DataError(f"{path}: row {row_number}, column 'image': {value!r} is neither a base64 image "
                                    f"nor the index of a row that holds one")
                value = str(target['image'])
            record['image'] = [ImageRef(p, benchmark, row_number, 'image', row.get('index'))
                               for p in _image_list(value)]
        if isinstance(row.get('image_path'), str):
            record['image_path'] = _image_list(row['image_path'])
        records.append(record)
    return records


# --------------------------------------------------------------------------- HF layouts


def _hf_table(path: Path, split: str | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file():
        if path.suffix == '.parquet':
            return pq.read_table(path)
        if path.suffix == '.arrow':
            return read_arrow_stream(path)
        raise DataError(f'{path}: not a .parquet or .arrow file')
    if is_save_to_disk(path):
        return read_save_to_disk(path, split, split_option='split=')
    parquet_files = sorted(path.rglob('*.parquet'))
    if split is not None:
        parquet_files = [p for p in parquet_files if split in p.name or split in p.parent.name]
    if parquet_files:
        return pa.concat_tables([pq.read_table(p) for p in parquet_files])
    return None


def read_hf_rows(path, split: str | None = None) -> list[dict]:
    """Rows of a parquet file / parquet directory / save_to_disk directory (pyarrow only);
    any other local layout goes through `datasets` (optional extra `eval`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f'{path}: not found')
    table = _hf_table(path, split)
    if table is not None:
        return table.to_pylist()
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: no parquet/arrow data found and the 'datasets' package is not installed "
                        f"(pip install 'viq-mllm[eval]')") from None
    return list(datasets.load_dataset(str(path), split=split or 'test'))


def hf_image(cell, benchmark: str, row: int, column: str) -> ImageRef | None:
    """An HF Image cell ({'bytes', 'path'} struct, raw bytes, a path, or a PIL image)."""
    if cell is None:
        return None
    if isinstance(cell, dict):
        payload = cell.get('bytes') or cell.get('path')
        return None if payload is None else ImageRef(payload, benchmark, row, column)
    if isinstance(cell, Image.Image):
        buffer = io.BytesIO()
        cell.save(buffer, format='PNG')
        return ImageRef(buffer.getvalue(), benchmark, row, column)
    return ImageRef(cell, benchmark, row, column)


def records_from_hf(path, benchmark: str, convert_row, split: str | None = None) -> list[dict]:
    """HF rows -> records via the benchmark's `convert_row(row, row_number) -> record | None`."""
    records = []
    for row_number, row in enumerate(read_hf_rows(path, split)):
        record = convert_row(row, row_number)
        if record is not None:
            records.append(record)
    return records


def hf_field(row: dict, names, source: str, row_number: int):
    """The first present column among `names` (HF mirrors spell columns differently)."""
    for name in names:
        if name in row:
            return row[name]
    raise DataError(f"{source}: row {row_number} has none of the columns {list(names)} "
                    f"(columns present: {sorted(row)})")


# --------------------------------------------------------------------------- predictions


def read_prediction_rows(path) -> list[dict]:
    """A predictions file: JSONL (one object per line), or VLMEvalKit's own .xlsx / .tsv
    prediction file read with the pandas call VLMEvalKit's `load` makes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{path}: predictions file not found')
    if path.suffix in ('.jsonl', '.json'):
        return read_jsonl_rows(path)
    if path.suffix in ('.xlsx', '.tsv'):
        from eval.vlmeval_files import read_vlmeval_predictions   # (imports this module)

        return read_vlmeval_predictions(path)
    raise DataError(f'{path}: unknown predictions format {path.suffix!r}; use .jsonl, .xlsx or .tsv')


def prediction_row(record: dict, prediction: str) -> dict:
    """What a runner writes per question: the record's columns without images + prediction."""
    row = {k: v for k, v in record.items() if k not in ('image', 'image_path')}
    row['prediction'] = prediction
    return row
