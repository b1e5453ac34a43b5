"""VLMEvalKit's prediction files, read and written through the same pandas calls it makes.

VLMEvalKit does not score what a model said but what comes back from its prediction file:
`infer_data_job` writes the data columns plus `prediction` with `vlmeval.smp.dump` (.xlsx by
default, .tsv with PRED_FORMAT=tsv) and every `evaluate` reads it back with `vlmeval.smp.load`
(`pd.read_excel` / `pd.read_csv(sep='\\t')`). That round trip changes values: a column whose
cells all look numeric comes back as numbers ('007' -> 7.0, '3.50' -> 3.5), whole-number floats
come back from .xlsx as ints, pandas' NA strings ('None', 'N/A', 'nan', '', ...) become missing,
and the index snapshots write a prediction starting with '=' as a formula (read back as 0).

This module makes the same calls, so that
- `read_vlmeval_predictions` reads a VLMEvalKit work-dir file exactly as its `load` does;
- `write_vlmeval_predictions` writes a file the way a version's `dump` writes it (eval.run uses
  it, so VLMEvalKit can score our predictions);
- `vlmeval_round_trip` gives the values VLMEvalKit would score for predictions we hold in
  memory or in JSONL (eval.score applies it to JSONL input).

pandas with openpyxl (reading .xlsx) and xlsxwriter (writing .xlsx) are what VLMEvalKit uses;
results follow the pandas installed here, as VLMEvalKit's follow the pandas installed there.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from eval.data import DataError
from eval.vlmevalkit_versions import get_version

PREDICTION_FORMATS = ('.xlsx', '.tsv')


def _pandas():
    try:
        import pandas
    except ImportError:
        raise DataError("VLMEvalKit prediction files need pandas (pip install 'viq-mllm[eval]')") from None
    return pandas


def python_cell(value):
    """A pandas cell as a plain Python value: missing -> None, numpy scalars -> int/float/bool."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if hasattr(value, 'item') and not isinstance(value, (list, tuple, dict)):
        value = value.item()   # numpy scalar
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        if _pandas().isna(value) is True:   # pd.NA, NaT
            return None
    except (TypeError, ValueError):
        pass
    return value


def frame_rows(frame) -> list[dict]:
    columns = [str(c) for c in frame.columns]
    return [{c: python_cell(v) for c, v in zip(columns, values)} for values in frame.itertuples(index=False)]


def read_vlmeval_predictions(path) -> list[dict]:
    """Rows of a VLMEvalKit prediction file, as `vlmeval.smp.load` reads it."""
    path = Path(path)
    pandas = _pandas()
    if path.suffix not in PREDICTION_FORMATS:
        raise DataError(f'{path}: not a VLMEvalKit prediction file (expected one of {", ".join(PREDICTION_FORMATS)})')
    try:
        frame = pandas.read_excel(path) if path.suffix == '.xlsx' else pandas.read_csv(path, sep='\t')
    except ImportError as exc:
        raise DataError(f"{path}: reading it needs {exc.name or 'openpyxl'} (pip install 'viq-mllm[eval]')") from None
    except (ValueError, OSError, pandas.errors.ParserError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f'{path}: not readable as VLMEvalKit reads it ({detail})') from None
    return frame_rows(frame)


def _table_cell(value):
    # VLMEvalKit's rows come from its TSV, where a list (answers, images) is its Python literal.
    return str(list(value)) if isinstance(value, (list, tuple)) else value


def prediction_frame(rows: list[dict]):
    """A DataFrame of prediction rows, columns in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return _pandas().DataFrame([[_table_cell(row.get(c)) for c in columns] for row in rows], columns=list(columns))


def _write(frame, target, suffix: str, version) -> None:
    if suffix == '.xlsx':
        options = {'strings_to_formulas': get_version(version).xlsx_strings_to_formulas}
        with _pandas().ExcelWriter(target, engine='xlsxwriter', engine_kwargs={'options': options}) as writer:
            frame.to_excel(writer, index=False)
    elif suffix == '.tsv':
        frame.to_csv(target, sep='\t', index=False, encoding='utf-8', quoting=csv.QUOTE_ALL)
    else:
        raise DataError(f'{target}: VLMEvalKit writes predictions as {" or ".join(PREDICTION_FORMATS)}')


def write_vlmeval_predictions(rows: list[dict], path, version=None) -> Path:
    """Write rows as the version's `dump` writes a prediction file (.xlsx or .tsv by suffix)."""
    path = Path(path)
    partial = path.with_name(path.name + '.partial' + path.suffix)
    _write(prediction_frame(rows), partial, path.suffix, version)
    partial.replace(path)
    return path


def vlmeval_round_trip(rows: list[dict], version=None, suffix: str = '.xlsx') -> list[dict]:
    """The rows as VLMEvalKit's `evaluate` sees them after its run stored them as `suffix`."""
    pandas = _pandas()
    frame = prediction_frame(rows)
    if suffix == '.xlsx':
        buffer = io.BytesIO()
        _write(frame, buffer, suffix, version)
        buffer.seek(0)
        return frame_rows(pandas.read_excel(buffer))
    text = io.StringIO()
    _write(frame, text, suffix, version)
    text.seek(0)
    return frame_rows(pandas.read_csv(text, sep='\t'))


__all__ = ['PREDICTION_FORMATS', 'frame_rows', 'prediction_frame', 'python_cell', 'read_vlmeval_predictions',
           'vlmeval_round_trip', 'write_vlmeval_predictions']
