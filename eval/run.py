"""Run an exported ViQ-MLLM on benchmarks, resumably, then score and report.

    python -m eval.run --model runs/demo/hf --benchmarks SYNTH_CHART,SYNTH_SHAPES \\
        --data-root runs/data/synthetic/vlmeval --out runs/eval [--batch-size 8] [--max-new-tokens 64] \\
        [--limit N] [--device cuda] [--dtype bf16] [--model-name NAME]
    torchrun --nproc_per_node 8 -m eval.run ...        (or the deepspeed launcher: records are sharded)

For each benchmark: load `<data-root>/<KEY>.tsv` (or the HF layouts `eval.data` reads), build
VLMEvalKit's prompt with the benchmark's own `build_prompt`, answer greedily and append one
JSON line per record (`index`, the benchmark's columns, `prediction`) to
`<out>/<model>/<KEY>.predictions.jsonl`, flushed after every batch. A rerun skips the indices
already there; a half-written last line (the process was killed mid-write) is dropped and
counted. When the benchmark is complete the file is rewritten in data order, so a resumed
run ends with the same file as an uninterrupted one, and the same rows are written as
VLMEvalKit's own prediction file `<out>/<model>/<model>_<KEY>.xlsx`, which VLMEvalKit's
`evaluate` scores as it scores its own runs. `--vlmevalkit-version` picks the VLMEvalKit whose
image files (PNG or JPEG), prediction file and scoring are reproduced (default: upstream main).

With RANK / WORLD_SIZE set (torchrun, deepspeed), rank r answers records r::world into
`<KEY>.rank{r}.jsonl`; after a barrier rank 0 merges them into the predictions file. A process
group (gloo on CPU, nccl on CUDA) exists only when WORLD_SIZE > 1.

Rank 0 then scores every benchmark with `eval.score.score_file` (the code path of
`python -m eval.score --data-root`), keeps them in `<out>/<model>/scores.json`, and writes
`<out>/report.json` and `<out>/report.md` (eval.report: one row per model found under
`<out>`, one column per benchmark, Avg., per-category tables). The last stdout line is a JSON
summary with the per-benchmark counts (records, reused, generated, dropped partial lines).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from eval.benchmarks import BENCHMARKS, UnknownBenchmarkError, get_benchmark
from eval.data import DataError, prediction_row
from eval.generate import DEFAULT_MAX_NEW_TOKENS, MLLMGenerator, check_export_dir, model_name_from_path
from eval.judge import judge_from_env
from eval.report import write_report
from eval.score import score_file
from eval.vlmeval_files import write_vlmeval_predictions
from eval.vlmevalkit_versions import VERSIONS, UnknownVersionError, get_version
from viq.dtypes import default_device, parse_dtype
from viq.errors import ConfigError, MissingFileError, UserError, run_cli
from viq.io import atomic_write, atomic_write_json, read_json
from viq.log import setup_logging

PREDICTIONS_SUFFIX = '.predictions.jsonl'
SETTINGS_FILE = 'generation.json'
SCORES_FILE = 'scores.json'
# Prompts prepared (images encoded) at once, in batches: large enough that sorting by length
# saves padding, small enough that a kill loses little and memory stays bounded.
SORT_WINDOW_BATCHES = 8


logger = logging.getLogger(__name__)


class RunError(ConfigError):
    """Bad arguments to eval.run (or settings that clash with earlier runs); one line to the user."""


# --------------------------------------------------------------------------- predictions files


def _jsonable(value):
    """A record cell as JSON: NaN -> null, numpy scalars / arrays -> Python values."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, 'tolist'):   # numpy scalar or array
        return _jsonable(value.tolist())
    if isinstance(value, (bytes, bytearray)):
        return None
    return value


def record_key(record: dict) -> str:
    return str(record['index'])


def read_predictions(path: Path, repair: bool = False) -> tuple[dict[str, dict], int]:
    """({index: row}, number of dropped partial lines) of a predictions file being written.

    Only the last line may be cut short (a process killed mid-write); it is dropped, and with
    `repair` the file is truncated to its last complete line so appends continue cleanly. A
    malformed line anywhere else means the file is not ours to guess about: one-line error.
    """
    if not path.is_file():
        return {}, 0
    data = path.read_bytes()
    rows: dict[str, dict] = {}
    lines = data.split(b'\n')
    complete_bytes = 0
    dropped = 0
    offset = 0
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        end = offset + len(raw) + (0 if is_last else 1)
        if raw.strip():
            try:
                row = json.loads(raw)
                if not isinstance(row, dict) or 'index' not in row or 'prediction' not in row:
                    raise ValueError('not a prediction object')
            except (ValueError, UnicodeDecodeError):
                if is_last:   # no newline after it: the write was cut short
                    dropped = 1
                    break
                raise DataError(f'{path}:{number}: malformed predictions line (not a JSON object with index and '
                                f'prediction); delete the file or pass --overwrite to regenerate it') from None
            rows[str(row['index'])] = row
        complete_bytes = end
        offset = end
    if repair:
        if dropped:
            with open(path, 'r+b') as handle:
                handle.truncate(complete_bytes)
        if complete_bytes and not data[:complete_bytes].endswith(b'\n'):
            with open(path, 'ab') as handle:   # a complete last object whose newline was lost
                handle.write(b'\n')
    return rows, dropped


def write_rows_atomically(path: Path, rows: list[dict]) -> None:
    def write(handle):
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False) + '\n').encode('utf-8'))

    atomic_write(path, write)


# --------------------------------------------------------------------------- distributed


class Ranks:
    """RANK / WORLD_SIZE from the launcher; a process group only when there are several ranks."""

    def __init__(self, device: str):
        self.rank = int(os.environ.get('RANK', 0))
        self.world = int(os.environ.get('WORLD_SIZE', 1))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.group = False
        if self.world > 1:
            if not dist.is_initialized():
                backend = 'nccl' if device.startswith('cuda') else 'gloo'
                if backend == 'nccl':
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend, timeout=timedelta(hours=2))
            self.group = True

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def sum(self, values: list[int]) -> list[int]:
        if not self.group:
            return values
        tensor = torch.tensor(values, dtype=torch.long)
        if dist.get_backend() == 'nccl':
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.group:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- one benchmark


def select_records(benchmark, data_root, limit: int | None) -> list[dict]:
    records = benchmark.load(data_root)
    seen = set()
    for position, record in enumerate(records):
        key = record_key(record)
        if key in seen:
            raise DataError(f'{benchmark.key}: index {key!r} occurs twice in the data (row {position}); '
                            f'predictions are keyed by index, which must be unique')
        seen.add(key)
    return records[:limit] if limit is not None else records


def predict_benchmark(generator, benchmark, records: list[dict], model_dir: Path, ranks: Ranks, *,
                      batch_size: int, max_new_tokens: int, image_dir: Path | None) -> dict:
    """Answer the records that have no prediction yet; returns this benchmark's counts."""
    final = model_dir / f'{benchmark.key}{PREDICTIONS_SUFFIX}'
    sharded = ranks.world > 1
    own = model_dir / (f'{benchmark.key}.rank{ranks.rank}.jsonl' if sharded else final.name)

    if sharded:
        # Every rank reads every file before any rank writes (barrier below), so all agree on what is done.
        done, _ = read_predictions(final)
        for shard in sorted(model_dir.glob(f'{benchmark.key}.rank*.jsonl')):
            if shard != own:
                done.update(read_predictions(shard)[0])
        ranks.barrier()
        own_rows, dropped = read_predictions(own, repair=True)
        done.update(own_rows)
        mine = records[ranks.rank::ranks.world]
    else:
        done, dropped = read_predictions(own, repair=True)
        mine = records
    pending = [r for r in mine if record_key(r) not in done]
    reused = len(mine) - len(pending)

    progress = None
    if ranks.rank == 0:
        label = benchmark.key if not sharded else f'{benchmark.key} (rank 0 of {ranks.world})'
        progress = tqdm(total=len(mine), initial=reused, desc=label, unit='q', file=sys.stderr, dynamic_ncols=True)
    generated = 0
    window = max(1, batch_size * SORT_WINDOW_BATCHES)
    benchmark_images = None if image_dir is None else image_dir / benchmark.key
    with open(own, 'a', encoding='utf-8') as handle:
        for start in range(0, len(pending), window):
            chunk = pending[start:start + window]
            messages = [benchmark.build_prompt(record, benchmark_images) for record in chunk]
            try:
                prompts = generator.prepare(messages)
            except UserError as exc:   # a bad image or record; any other exception is a bug and keeps its traceback
                raise DataError(f'{benchmark.key}: cannot build the prompt of index '
                                f'{chunk[0]["index"]!r}..{chunk[-1]["index"]!r}: {exc}') from None
            for answered in generator.generate_prepared(prompts, max_new_tokens, batch_size):
                for position, answer in answered:
                    row = _jsonable(prediction_row(chunk[position], answer))
                    handle.write(json.dumps(row, ensure_ascii=False) + '\n')
                handle.flush()
                generated += len(answered)
                if progress is not None:
                    progress.update(len(answered))
    if progress is not None:
        progress.close()

    if sharded:
        ranks.barrier()
    if ranks.rank == 0:
        rows, _ = read_predictions(final)
        if sharded:
            for shard in sorted(model_dir.glob(f'{benchmark.key}.rank*.jsonl')):
                rows.update(read_predictions(shard)[0])
        missing = [record_key(r) for r in records if record_key(r) not in rows]
        if missing:
            raise DataError(f'{benchmark.key}: {len(missing)} record(s) have no prediction after the run '
                            f'(first index {missing[0]!r}); rerun to complete them')
        # Data order, selected records only: a resumed run ends with the same bytes as a clean one.
        ordered = [rows[record_key(r)] for r in records]
        write_rows_atomically(final, ordered)
        write_vlmeval_predictions(ordered, vlmeval_file(model_dir, benchmark.key), benchmark.version)
        if sharded:
            for shard in model_dir.glob(f'{benchmark.key}.rank*.jsonl'):
                shard.unlink()
    if sharded:
        ranks.barrier()
    generated, reused, dropped = ranks.sum([generated, reused, dropped])
    return {'records': len(records), 'reused': reused, 'generated': generated, 'dropped_partial_lines': dropped}


# --------------------------------------------------------------------------- scoring and report


def collect_scores(out: Path) -> dict:
    """{model: {key: aggregates}} of every model directory under `out` that has scores."""
    results = {}
    for scores in sorted(out.glob(f'*/{SCORES_FILE}')):
        try:
            results[scores.parent.name] = read_json(scores)
        except DataError as exc:
            raise DataError(f'{exc}; delete it to rebuild the report') from None
    return results


def vlmeval_file(model_dir: Path, key: str) -> Path:
    """VLMEvalKit's name for a prediction file: <work_dir>/<model>_<dataset>.xlsx."""
    return model_dir / f'{model_dir.name}_{key}.xlsx'


def score_and_report(keys: list[str], model_dir: Path, out: Path, data_root, judge, version=None) -> dict:
    scores_path = model_dir / SCORES_FILE
    scores = read_json(scores_path) if scores_path.is_file() else {}
    for key in keys:
        scores[key] = score_file(key, model_dir / f'{key}{PREDICTIONS_SUFFIX}', data_root, judge, version)
    atomic_write(scores_path, json.dumps(scores, indent=2, ensure_ascii=False, allow_nan=False) + '\n')
    json_path, md_path = write_report(collect_scores(out), out)
    return {'scores': {k: scores[k] for k in keys}, 'report_json': str(json_path), 'report_md': str(md_path)}


# --------------------------------------------------------------------------- CLI


def parse_benchmarks(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(',') if k.strip()]
    if not keys:
        raise RunError(f"--benchmarks is empty; give comma-separated keys from: {', '.join(BENCHMARKS)}")
    for key in keys:
        if key not in BENCHMARKS:
            raise UnknownBenchmarkError(f'unknown benchmark {key!r}; valid keys: {", ".join(BENCHMARKS)}')
    if len(set(keys)) != len(keys):
        raise RunError(f'--benchmarks lists a key twice: {text}')
    return keys


def check_settings(model_dir: Path, settings: dict, overwrite: bool, keys: list[str]) -> None:
    """Predictions are reused only if they were generated with the same settings."""
    path = model_dir / SETTINGS_FILE
    if overwrite:
        for key in keys:
            for stale in [model_dir / f'{key}{PREDICTIONS_SUFFIX}', *model_dir.glob(f'{key}.rank*.jsonl')]:
                stale.unlink(missing_ok=True)
    elif path.is_file():
        previous = read_json(path)
        changed = sorted(k for k in settings if k in previous and previous[k] != settings[k])
        has_predictions = any((model_dir / f'{k}{PREDICTIONS_SUFFIX}').exists()
                              or any(model_dir.glob(f'{k}.rank*.jsonl')) for k in keys)
        if changed and has_predictions:
            name = changed[0]
            raise RunError(f'{path}: existing predictions were generated with {name}={previous[name]!r}, this run '
                           f'asks for {settings[name]!r}; pass --overwrite or choose another --out / --model-name')
    atomic_write_json(path, settings, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m eval.run', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='ViQ-MLLM export directory (runs/<run>/hf)')
    parser.add_argument('--benchmarks', required=True, help=f"comma-separated keys: {', '.join(BENCHMARKS)}")
    parser.add_argument('--data-root', required=True, help='directory holding <KEY>.tsv (VLMEvalKit LMUData)')
    parser.add_argument('--out', required=True, help='output directory (predictions, scores, report)')
    parser.add_argument('--batch-size', type=int, default=8, help='prompts per generation batch')
    parser.add_argument('--max-new-tokens', type=int, default=DEFAULT_MAX_NEW_TOKENS, help='greedy decoding length limit')
    parser.add_argument('--limit', type=int, default=None, help='only the first N records of each benchmark')
    parser.add_argument('--device', default=None, help='cuda, cuda:1, cpu (default: cuda when available)')
    parser.add_argument('--dtype', default=None, help='bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--model-name', default=None, help='row name in the report (default: the export dir name)')
    parser.add_argument('--system', default=None, help="system prompt (default: Qwen2.5's, as in training)")
    parser.add_argument('--image-dir', default=None,
                        help="where benchmark images are dumped like VLMEvalKit's dump_image (default: <out>/images)")
    parser.add_argument('--in-memory-images', action='store_true',
                        help='feed decoded images directly instead of VLMEvalKit-style image files')
    parser.add_argument('--vlmevalkit-version', default=None,
                        help=f"the VLMEvalKit whose image files, prediction file and scoring to reproduce: "
                             f"{', '.join(VERSIONS)} (default: main)")
    parser.add_argument('--overwrite', action='store_true', help='discard existing predictions of these benchmarks')
    parser.add_argument('--judge-base-url', default=None, help='SimpleVQA judge endpoint (or VIQ_JUDGE_BASE_URL)')
    parser.add_argument('--judge-model', default=None, help='SimpleVQA judge model (or VIQ_JUDGE_MODEL)')
    return parser


def run(args) -> dict:
    keys = parse_benchmarks(args.benchmarks)
    for name, value, low in (('--batch-size', args.batch_size, 1), ('--max-new-tokens', args.max_new_tokens, 1),
                             ('--limit', args.limit, 1)):
        if value is not None and value < low:
            raise RunError(f'{name} must be >= {low}, got {value}')
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise MissingFileError(f'--data-root {data_root}: directory not found (it should hold <KEY>.tsv files)')
    try:
        version = get_version(args.vlmevalkit_version)
    except UnknownVersionError as exc:
        raise RunError(f'--vlmevalkit-version: {exc}') from None
    benchmarks = {key: get_benchmark(key, version) for key in keys}
    for benchmark in benchmarks.values():
        benchmark.data_path(data_root)   # a missing file fails now, naming the paths, not after model loading
    check_export_dir(args.model)

    ranks = Ranks(args.device or default_device())
    device = args.device or default_device()
    if device == 'cuda' and ranks.world > 1:
        device = f'cuda:{ranks.local_rank}'
    dtype = parse_dtype(args.dtype, device)
    model_name = args.model_name or model_name_from_path(args.model)
    out = Path(args.out)
    model_dir = out / model_name
    if ranks.rank == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
        check_settings(model_dir, {'model': str(Path(args.model).resolve()), 'max_new_tokens': args.max_new_tokens,
                                   'dtype': str(dtype).replace('torch.', ''), 'system': args.system,
                                   'in_memory_images': args.in_memory_images, 'vlmevalkit_version': version.name},
                       args.overwrite, keys)
    ranks.barrier()
    image_dir = None if args.in_memory_images else Path(args.image_dir) if args.image_dir else out / 'images'

    generator = MLLMGenerator(args.model, device=device, dtype=dtype, system=args.system, batch_size=args.batch_size)
    counts = {}
    for key, benchmark in benchmarks.items():
        records = select_records(benchmark, data_root, args.limit)
        if not records:
            raise DataError(f'{benchmark.data_path(data_root)}: no records to evaluate')
        counts[key] = predict_benchmark(generator, benchmark, records, model_dir, ranks, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens, image_dir=image_dir)
        if ranks.rank == 0:
            c = counts[key]
            logger.info(f"{key}: {c['records']} records, {c['reused']} reused, {c['generated']} generated"
                        + (f", {c['dropped_partial_lines']} partial line(s) dropped" if c['dropped_partial_lines'] else ''))
    summary = {'model': model_name, 'benchmarks': counts}
    if ranks.rank == 0:
        judge = judge_from_env(args.judge_base_url, args.judge_model)
        summary.update(score_and_report(keys, model_dir, out, data_root, judge, version))
    ranks.barrier()
    ranks.close()
    return summary


def main(argv=None) -> int:
    """Bad input is one line on stderr and exit status 2 (as documented in docs/eval.md); a bug keeps
    its traceback. stdout carries only the JSON summary, so log lines go to stderr."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get('RANK', 0))

    def body() -> int:
        summary = run(args)
        if rank == 0:
            print(json.dumps(summary, ensure_ascii=False))
        return 0

    return run_cli(body, 'eval.run', exit_code=2)


if __name__ == '__main__':
    # Here, not in main(): a caller that runs main() in its own process keeps its logging set-up.
    setup_logging(int(os.environ.get('RANK', 0)), stream=sys.stderr)
    sys.exit(main())
