"""Score an existing predictions file the way VLMEvalKit scores it (judge exact_matching).

    python -m eval.score --benchmark DocVQA_VAL --predictions preds.jsonl [--data-root DIR]
        [--vlmevalkit-version main|ms-vlmeval-0.0.20|nvidia-vlmeval-26.3]

FILE is one of
- a VLMEvalKit prediction file (`<model>_<KEY>.xlsx`, or `.tsv` with PRED_FORMAT=tsv) from its
  work dir: read with the pandas calls VLMEvalKit's `load` makes, so rescoring a VLMEvalKit run
  gives VLMEvalKit's numbers;
- JSONL (eval.run's `<KEY>.predictions.jsonl`, one object per line): scored on the values
  VLMEvalKit would see after storing the same rows in its default .xlsx prediction file.
Either holds the benchmark's VLMEvalKit columns plus `prediction`. With --data-root every
prediction's `index` must be a row of <DIR>/<KEY>.tsv; missing columns are filled from the data
and, for multiple choice, the gold letter is the data's (VLMEvalKit takes it from its copy of the
data), so a file with only `index` and `prediction` suffices. Prints one JSON object with the
aggregates of the chosen VLMEvalKit version (default: upstream main; see docs/eval.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.benchmarks import BENCHMARKS, ChoiceBenchmark, get_benchmark
from eval.data import DataError, read_prediction_rows
from eval.judge import judge_from_env
from eval.vlmeval_files import PREDICTION_FORMATS, vlmeval_round_trip
from eval.vlmevalkit_versions import VERSIONS, UnknownVersionError


def attach_benchmark_data(benchmark, rows: list[dict], data_records: dict, data_root, source) -> list[dict]:
    """Check predictions against the benchmark's rows and fill the columns they lack from the data."""
    merged = []
    for line, row in enumerate(rows, start=1):
        if 'index' not in row:
            raise DataError(f"{source}: row {line} has no 'index' column, needed to match --data-root rows")
        record = data_records.get(str(row['index']))
        if record is None:
            raise DataError(f"{source}: row {line} index {row['index']!r} is not a row of {benchmark.key} under "
                            f"{data_root}; the predictions do not belong to this benchmark")
        completed = {k: v for k, v in record.items() if k not in ('image', 'image_path')}
        completed.update(row)
        merged.append(completed)
    return merged


def scoring_rows(benchmark, predictions, data_root=None) -> list[dict]:
    """The rows VLMEvalKit's evaluate would score for this file, under the benchmark's version."""
    path = Path(predictions)
    rows = read_prediction_rows(path)
    stored = path.suffix in PREDICTION_FORMATS   # VLMEvalKit's own file: already round-tripped
    if not rows:
        raise DataError(f'{path}: no prediction rows')
    data_records = None
    if data_root is not None:
        data_records = {str(r['index']): r for r in benchmark.load(data_root)}
        rows = attach_benchmark_data(benchmark, rows, data_records, data_root, path)
    if not stored:
        rows = vlmeval_round_trip(rows, benchmark.version)
    if data_records is not None and isinstance(benchmark, ChoiceBenchmark):
        # Multiple choice: VLMEvalKit's gold letter comes from its copy of the data, not the file.
        rows = [{**row, 'answer': data_records[str(row['index'])].get('answer')} for row in rows]
    return rows


def score_file(benchmark_key: str, predictions, data_root=None, judge=None, version=None) -> dict:
    kwargs = {'judge': judge} if benchmark_key == 'SimpleVQA' and judge is not None else {}
    benchmark = get_benchmark(benchmark_key, version=version, **kwargs)
    return benchmark.score(scoring_rows(benchmark, predictions, data_root), source=predictions)


def row_hits_file(benchmark_key: str, predictions, data_root=None, version=None) -> list[tuple]:
    """(index, hit) per row: the per-question hits behind score_file's aggregates."""
    benchmark = get_benchmark(benchmark_key, version=version)
    rows = scoring_rows(benchmark, predictions, data_root)
    return [(row.get('index'), hit) for row, hit in zip(rows, benchmark.row_hits(rows, source=predictions))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m eval.score', description=__doc__.split('\n\n')[0])
    parser.add_argument('--benchmark', required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument('--predictions', required=True,
                        help="eval.run's JSONL, or VLMEvalKit's <model>_<KEY>.xlsx / .tsv")
    parser.add_argument('--data-root', default=None, help='directory holding <KEY>.tsv (optional)')
    parser.add_argument('--vlmevalkit-version', default=None,
                        help=f"the VLMEvalKit whose scoring to reproduce: {', '.join(VERSIONS)} (default: main)")
    parser.add_argument('--judge-base-url', default=None, help='SimpleVQA judge endpoint (or VIQ_JUDGE_BASE_URL)')
    parser.add_argument('--judge-model', default=None, help='SimpleVQA judge model (or VIQ_JUDGE_MODEL)')
    args = parser.parse_args(argv)
    try:
        judge = judge_from_env(args.judge_base_url, args.judge_model)
        result = score_file(args.benchmark, args.predictions, args.data_root, judge, args.vlmevalkit_version)
    except (DataError, KeyError, ValueError, UnknownVersionError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False, allow_nan=False))
    return 0


if __name__ == '__main__':
    sys.exit(main())
