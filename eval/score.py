"""Score an existing predictions file the way VLMEvalKit scores it (judge exact_matching).

    python -m eval.score --benchmark DocVQA_VAL --predictions preds.jsonl [--data-root DIR]

FILE is JSONL (one object per line) or TSV with the benchmark's VLMEvalKit columns plus
`prediction`. With --data-root every prediction's `index` must be a row of
<DIR>/<KEY>.tsv; the gold answer is then taken from the benchmark data (as VLMEvalKit
takes it from its own copy of the data) and missing columns are filled from it, so a file
with only `index` and `prediction` suffices. Prints one JSON object with the aggregates.
"""
from __future__ import annotations

import argparse
import json
import sys

from eval.benchmarks import BENCHMARKS, get_benchmark
from eval.data import DataError, read_prediction_rows
from eval.judge import judge_from_env


def attach_benchmark_data(benchmark, rows: list[dict], data_root, source) -> list[dict]:
    """Check predictions against the benchmark's rows and complete them from the data."""
    data_records = {str(r['index']): r for r in benchmark.load(data_root)}
    merged = []
    for line, row in enumerate(rows, start=1):
        if 'index' not in row:
            raise DataError(f"{source}: row {line} has no 'index' column, needed to match --data-root rows")
        record = data_records.get(str(row['index']))
        if record is None:
            raise DataError(f"{source}: row {line} index {row['index']!r} is not a row of {benchmark.key} under "
                            f"{data_root}; the predictions do not belong to this benchmark")
        completed = {k: v for k, v in record.items() if k not in ('image', 'image_path')}
        completed.update({k: v for k, v in row.items() if k != 'answer'})
        merged.append(completed)
    return merged


def score_file(benchmark_key: str, predictions, data_root=None, judge=None) -> dict:
    kwargs = {'judge': judge} if benchmark_key == 'SimpleVQA' and judge is not None else {}
    benchmark = get_benchmark(benchmark_key, **kwargs)
    rows = read_prediction_rows(predictions)
    if not rows:
        raise DataError(f'{predictions}: no prediction rows')
    if data_root is not None:
        rows = attach_benchmark_data(benchmark, rows, data_root, predictions)
    return benchmark.score(rows, source=predictions)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m eval.score', description=__doc__.split('\n\n')[0])
    parser.add_argument('--benchmark', required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument('--predictions', required=True, help='JSONL or TSV: benchmark columns + prediction')
    parser.add_argument('--data-root', default=None, help='directory holding <KEY>.tsv (optional)')
    parser.add_argument('--judge-base-url', default=None, help='SimpleVQA judge endpoint (or VIQ_JUDGE_BASE_URL)')
    parser.add_argument('--judge-model', default=None, help='SimpleVQA judge model (or VIQ_JUDGE_MODEL)')
    args = parser.parse_args(argv)
    try:
        judge = judge_from_env(args.judge_base_url, args.judge_model)
        result = score_file(args.benchmark, args.predictions, args.data_root, judge)
    except (DataError, KeyError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False, allow_nan=False))
    return 0


if __name__ == '__main__':
    sys.exit(main())
