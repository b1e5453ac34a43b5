"""Score generated prediction sets with eval.score and with installed VLMEvalKit snapshots; compare.

`installed_snapshots()` finds the VLMEvalKit packages dev.sh installs: the one in the environment
and the others in <venv>/vlmeval-snapshots/<version>/ (the same `vlmeval` package name, so each
runs in its own process with its directory first on PYTHONPATH). `run_crosscheck(root)` writes
the data and predictions, runs tests/eval/vlmeval_driver.py once per snapshot (in parallel) and
returns, per version and benchmark, the rows and aggregates on which the two disagree.

    python tests/eval/crosscheck.py      # prints the agreement table of docs/eval.md
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

from eval.benchmarks import get_benchmark  # noqa: E402
from eval.score import row_hits_file, score_file  # noqa: E402
from eval.vlmevalkit_versions import VERSIONS, installed_version  # noqa: E402
from prediction_sets import MCQ_KEYS, VQA_KEYS, numeric_set, prediction_set  # noqa: E402

KEYS = VQA_KEYS + MCQ_KEYS + ('OCRBench',)
FORMATS = ('xlsx', 'tsv')
SNAPSHOT_DIR = 'vlmeval-snapshots'


def installed_snapshots() -> dict[str, str]:
    """{version key: PYTHONPATH entry ('' for the environment's own package)}."""
    found = {}
    own = installed_version()
    if own is not None:
        found[own] = ''
    base = Path(sys.prefix) / SNAPSHOT_DIR
    for name in VERSIONS:
        if (base / name / 'vlmeval' / '__init__.py').is_file() and name not in found:
            found[name] = str(base / name)
    return found


def write_tsv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep='\t', index=False)


def write_eval_run_jsonl(path: Path, key: str, data_root: Path, predictions: dict) -> None:
    """The predictions file eval.run writes: the benchmark's records without images + prediction."""
    lines = []
    for record in get_benchmark(key).load(data_root):
        row = {k: v for k, v in record.items() if k not in ('image', 'image_path')}
        row['prediction'] = predictions[str(record['index'])]
        lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')


def prepare(root: Path) -> list[dict]:
    """Data TSVs, eval.run-style JSONL and the driver's score jobs (one list for every version)."""
    jobs = []
    for key in KEYS:
        data, predictions = prediction_set(key)
        variants = [('main', data, predictions)]
        if key != 'OCRBench':   # one category per row: VLMEvalKit's per-category table is then per row
            per_row = [{k: v for k, v in row.items() if k not in ('split', 'category', 'l2-category')}
                       for row in data]
            variants.append(('rows', [{**row, 'category': f'row{row["index"]:04d}'} for row in per_row], predictions))
        if key in VQA_KEYS or key == 'OCRBench':
            variants.append(('numeric', *numeric_set(key)))
        for variant, rows, preds in variants:
            data_root = root / 'data' / variant
            write_tsv(data_root / f'{key}.tsv', rows)
            by_index = {str(r['index']): p for r, p in zip(rows, preds)}
            write_eval_run_jsonl(data_root / f'{key}.predictions.jsonl', key, data_root, by_index)
            for fmt in FORMATS:
                jobs.append({'kind': 'score', 'key': key, 'variant': variant, 'format': fmt, 'lmudata': str(data_root),
                             'predictions': by_index, 'per_row': key == 'OCRBench' and variant == 'main'})
    return jobs


def run_drivers(root: Path, jobs: list[dict], snapshots: dict[str, str]) -> dict[str, list[dict]]:
    processes, logs = {}, []
    for version, path in snapshots.items():
        work = root / 'work' / version
        version_jobs = [{**job, 'work_dir': str(work / job['variant'] / job['format'] / job['key'])} for job in jobs]
        (root / f'{version}.jobs.json').write_text(json.dumps(version_jobs))
        env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in (path, str(REPO)) if p)}
        logs.append(open(root / f'{version}.stderr.log', 'w'))
        processes[version] = subprocess.Popen(
            [sys.executable, str(HERE / 'vlmeval_driver.py'), str(root / f'{version}.jobs.json'),
             str(root / f'{version}.result.json')], env=env, cwd=str(root), stdout=subprocess.DEVNULL, stderr=logs[-1])
    returncodes = {version: process.wait(timeout=900) for version, process in processes.items()}
    for log in logs:
        log.close()
    results = {}
    for version, returncode in returncodes.items():
        if returncode != 0:
            tail = (root / f'{version}.stderr.log').read_text()[-2000:]
            raise RuntimeError(f'VLMEvalKit driver for {version} failed:\n{tail}')
        results[version] = json.loads((root / f'{version}.result.json').read_text())['jobs']
    return results


def theirs_as_ours(result):
    """VLMEvalKit's evaluate output in eval.score's shape (report_acc rows -> flat or {split: row})."""
    if isinstance(result, list) and result and 'split' in result[0]:
        rows = {row['split']: {k: v for k, v in row.items() if k != 'split'} for row in result}
        return rows['none'] if list(rows) == ['none'] else rows
    if isinstance(result, list):
        return result[0]
    return result


def row_disagreements(job: dict, theirs: dict, version: str) -> list[str]:
    """Rows whose hit differs: VQA hits x100 and choice hits are VLMEvalKit's per-row categories."""
    data_root = Path(job['lmudata'])
    if job['key'] == 'OCRBench':
        ours = row_hits_file('OCRBench', theirs['file'], data_root, version)
        pairs = [(str(i), hit, float(t)) for (i, hit), (_, t) in zip(ours, theirs['rows'])]
    else:
        table = theirs_as_ours(theirs['result'])
        scale = 100 if job['key'] in VQA_KEYS else 1
        pairs = [(str(i), hit * scale, table[f'row{int(i):04d}'])
                 for i, hit in row_hits_file(job['key'], theirs['file'], data_root, version)]
    predictions = job['predictions']
    return [f"index {i}: ours {a!r}, VLMEvalKit {b!r}, prediction {predictions[i]!r}" for i, a, b in pairs if a != b]


def compare(jobs: list[dict], results: dict[str, list[dict]]) -> dict:
    """{version: {key: {'rows': n, 'row_disagreements': [...], 'aggregate_disagreements': [...], 'errors': [...]}}}."""
    report = {}
    for version, outputs in results.items():
        per_key = report.setdefault(version, {})
        for job, theirs in zip(jobs, outputs):
            entry = per_key.setdefault(job['key'], {'rows': 0, 'row_disagreements': [], 'aggregate_disagreements': [],
                                                    'errors': []})
            where = f"{job['variant']}/{job['format']}"
            if 'error' in theirs:
                entry['errors'].append(f'{where}: {theirs["error"]}')
                continue
            data_root = Path(job['lmudata'])
            expected = theirs_as_ours(theirs['result'])
            sources = {'VLMEvalKit file': theirs['file']}
            if job['format'] == 'xlsx':   # eval.run's JSONL, scored after the simulated round trip
                sources['eval.run JSONL'] = data_root / f"{job['key']}.predictions.jsonl"
            for label, source in sources.items():
                ours = score_file(job['key'], source, data_root, version=version)
                if ours != expected:
                    entry['aggregate_disagreements'].append(f'{where} {label}: ours {ours}, VLMEvalKit {expected}')
            if job['variant'] == 'rows' or theirs.get('rows'):
                entry['rows'] += len(job['predictions'])
                entry['row_disagreements'] += [f'{where}: {d}' for d in row_disagreements(job, theirs, version)]
    return report


def run_crosscheck(root: Path, snapshots: dict[str, str] | None = None) -> dict:
    snapshots = installed_snapshots() if snapshots is None else snapshots
    jobs = prepare(root)
    return compare(jobs, run_drivers(root, jobs, snapshots))


def markdown_table(report: dict) -> str:
    lines = ['| benchmark | VLMEvalKit | rows compared | row disagreements | aggregate disagreements | VLMEvalKit errors |',
             '|---|---|---|---|---|---|']
    for version, per_key in report.items():
        for key, entry in per_key.items():
            lines.append(f"| {key} | {version} | {entry['rows']} | {len(entry['row_disagreements'])} | "
                         f"{len(entry['aggregate_disagreements'])} | {'; '.join(entry['errors']) or '-'} |")
    return '\n'.join(lines)


if __name__ == '__main__':
    with tempfile.TemporaryDirectory() as tmp:
        print(markdown_table(run_crosscheck(Path(tmp))))
