"""Reports in the shape of the ViQ paper's Table 2, from {model: {benchmark_key: aggregates}}.

The summary has one row per model, one column per benchmark and `Avg.`; every cell is the
benchmark's headline on a 0-100 scale: VQA 'Overall' as VLMEvalKit prints it (already
x100), multiple choice 'Overall' x100 (MMMU_DEV_VAL: the validation split), OCRBench
'Final Score' / 10, SimpleVQA the judge's is_correct x100. Per-benchmark breakdown tables
list every aggregate (split / category) per model on the same scales.
"""
from __future__ import annotations

import json
from pathlib import Path

from eval.benchmarks import PAPER_BENCHMARKS, ChoiceBenchmark, get_benchmark
from eval.benchmarks.simplevqa import EXACT_MATCH_FALLBACK
from viq.io import atomic_write

DISPLAY_NAMES = {
    'MMStar': 'MMStar', 'MMMU_DEV_VAL': 'MMMU', 'SimpleVQA': 'SimpleVQA', 'InfoVQA_VAL': 'InfoVQA',
    'TextVQA_VAL': 'TextVQA', 'DocVQA_VAL': 'DocVQA', 'OCRBench': 'OCRBench', 'AI2D_TEST': 'AI2D',
    'ChartQA_TEST': 'ChartQA',
}
_SIMPLEVQA_FRACTIONS = ('is_correct', 'is_incorrect', 'is_not_attempted', 'is_given_attempted',
                        'accuracy_given_attempted', 'f1', 'exact_match')
_COUNT_KEYS = ('n', 'judge_failed')
FALLBACK_MARK = '‡'
PARTIAL_AVG_MARK = '†'


def ordered_benchmarks(results: dict) -> list[str]:
    present = {key for per_model in results.values() for key in per_model}
    return [k for k in PAPER_BENCHMARKS if k in present] + sorted(present - set(PAPER_BENCHMARKS))


def headline(key: str, aggregates: dict) -> float | None:
    return get_benchmark(key).headline(aggregates)


def summary(results: dict) -> dict:
    """{model: {key: headline, ..., 'Avg.': mean of the present headlines}}."""
    keys = ordered_benchmarks(results)
    table = {}
    for model, per_model in results.items():
        row = {k: headline(k, per_model[k]) for k in keys if k in per_model}
        values = [v for v in row.values() if v is not None]
        row['Avg.'] = sum(values) / len(values) if values else None
        table[model] = row
    return table


def _cell(value, digits=1) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def summary_markdown(results: dict) -> str:
    keys = ordered_benchmarks(results)
    rows = summary(results)
    lines = ['| Model | ' + ' | '.join(DISPLAY_NAMES.get(k, k) for k in keys) + ' | Avg. |',
             '|---|' + '---|' * (len(keys) + 1)]
    notes = set()
    for model, row in rows.items():
        cells = []
        for key in keys:
            text = _cell(row.get(key))
            if key == 'SimpleVQA' and results[model].get(key, {}).get('judge') == EXACT_MATCH_FALLBACK:
                text += FALLBACK_MARK
                notes.add(f'{FALLBACK_MARK} SimpleVQA without an LLM judge: exact-match fallback, '
                          f"not comparable to VLMEvalKit's judged score.")
            cells.append(text)
        average = _cell(row['Avg.'])
        if any(k not in row or row[k] is None for k in keys):
            average += PARTIAL_AVG_MARK
            notes.add(f'{PARTIAL_AVG_MARK} average over the benchmarks this model has results for.')
        lines.append(f'| {model} | ' + ' | '.join(cells) + f' | {average} |')
    return '\n'.join(lines + [''] + sorted(notes)).rstrip() + '\n'


def breakdown(key: str, aggregates: dict) -> dict:
    """Flat {column: number} for one benchmark on the summary's scale."""
    flat = {}
    for name, value in aggregates.items():
        if isinstance(value, dict):  # several splits: {split: {column: value}}
            flat.update({f'{name}/{col}': v for col, v in value.items()})
        else:
            flat[name] = value
    scale_all = isinstance(get_benchmark(key), ChoiceBenchmark)
    out = {}
    for name, value in flat.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or name in _COUNT_KEYS:
            continue
        if scale_all or (key == 'SimpleVQA' and name in _SIMPLEVQA_FRACTIONS):
            value = value * 100
        out[name] = value
    return out


def breakdown_markdown(results: dict) -> str:
    sections = []
    for key in ordered_benchmarks(results):
        per_model = {m: breakdown(key, r[key]) for m, r in results.items() if key in r}
        columns = []
        for values in per_model.values():
            columns += [c for c in values if c not in columns]
        lines = [f'### {DISPLAY_NAMES.get(key, key)} ({key})', '',
                 '| Model | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
        for model, values in per_model.items():
            digits = 0 if key == 'OCRBench' else 2
            lines.append(f'| {model} | ' + ' | '.join(
                _cell(values.get(c), 1 if c == 'Final Score Norm' else digits) for c in columns) + ' |')
        sections.append('\n'.join(lines))
    return '\n\n'.join(sections) + '\n'


def write_report(results: dict, out_dir, name: str = 'report') -> tuple[Path, Path]:
    """Write <name>.json (headlines, averages and raw aggregates) and <name>.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {'benchmarks': ordered_benchmarks(results), 'summary': summary(results), 'aggregates': results}
    json_path = out_dir / f'{name}.json'
    atomic_write(json_path, json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + '\n')
    markdown = ('## Summary (0-100)\n\n' + summary_markdown(results) + '\n## Per-category results\n\n'
                + breakdown_markdown(results))
    md_path = out_dir / f'{name}.md'
    atomic_write(md_path, markdown)
    return json_path, md_path
