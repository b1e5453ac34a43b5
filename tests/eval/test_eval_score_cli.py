"""python -m eval.score end to end through a subprocess, plus its one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_fixtures import png_b64, write_jsonl, write_tsv

REPO = Path(__file__).resolve().parents[2]


def run_score(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'eval.score', *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_docvqa_jsonl_scores(tmp_path):
    predictions = write_jsonl(tmp_path / 'docvqa.jsonl', [
        {'index': 1, 'question': 'q', 'answer': ['May 5', '5 May'], 'prediction': '5 may'},   # 1.0
        {'index': 2, 'question': 'q', 'answer': "['ab']", 'prediction': 'a'},                 # exactly 0.5
        {'index': 3, 'question': 'q', 'answer': 'abcdefg', 'prediction': 'abc'},              # 3/7 -> 0
        {'index': 4, 'question': 'q', 'answer': 'ab', 'prediction': '  a  '},                 # 0.8 (raw length)
    ])
    done = run_score('--benchmark', 'DocVQA_VAL', '--predictions', predictions)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {'Overall': pytest.approx((1.0 + 0.5 + 0.0 + 0.8) / 4 * 100)}
    assert done.stdout.count('\n') == 1


def test_chartqa_tsv_with_splits(tmp_path):
    predictions = write_tsv(tmp_path / 'chartqa.tsv', ['index', 'question', 'answer', 'split', 'prediction'], [
        [1, 'q', '100', 'test_human', '105'],
        [2, 'q', '100', 'test_human', '105.01'],
        [3, 'q', 'Yes', 'test_augmented', 'Yes.'],
        [4, 'q', '0.5', 'test_augmented', '50%'],
    ])
    done = run_score('--benchmark', 'ChartQA_TEST', '--predictions', predictions)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {'test_augmented': 50.0, 'test_human': 50.0, 'Overall': 50.0}


def test_mcq_with_data_root_needs_only_index_and_prediction(tmp_path):
    image = png_b64()
    write_tsv(tmp_path / 'SYNTH_SHAPES.tsv', ['index', 'image', 'question', 'answer', 'A', 'B', 'C', 'D', 'category'], [
        [0, image, 'Shape?', 'A', 'circle', 'square', 'triangle', 'star', 'shape'],
        [1, '0', 'Color?', 'C', 'red', 'green', 'blue', 'black', 'color'],
        [2, '0', 'Count?', 'B', '1', '2', '3', '4', 'count'],
    ])
    predictions = write_jsonl(tmp_path / 'shapes.jsonl', [
        {'index': 0, 'prediction': 'A'},
        {'index': 1, 'prediction': 'The answer is C'},
        {'index': 2, 'prediction': 'Either A or B'},
    ])
    done = run_score('--benchmark', 'SYNTH_SHAPES', '--predictions', predictions, '--data-root', tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {'Overall': pytest.approx(2 / 3), 'color': 1.0, 'count': 0.0, 'shape': 1.0}


def test_predictions_not_matching_the_benchmark(tmp_path):
    write_tsv(tmp_path / 'SYNTH_DOC.tsv', ['index', 'image', 'question', 'answer'], [[0, png_b64(), 'q', 'a']])
    predictions = write_jsonl(tmp_path / 'other.jsonl', [{'index': 0, 'prediction': 'a'}, {'index': 99, 'prediction': 'b'}])
    done = run_score('--benchmark', 'SYNTH_DOC', '--predictions', predictions, '--data-root', tmp_path)
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.strip() == (f"error: {predictions}: row 2 index 99 is not a row of SYNTH_DOC under {tmp_path}; "
                                   f"the predictions do not belong to this benchmark")


def test_missing_prediction_or_benchmark_column(tmp_path):
    no_prediction = write_jsonl(tmp_path / 'a.jsonl', [{'index': 1, 'answer': 'x', 'category': 'Doc-oriented VQA'}])
    done = run_score('--benchmark', 'OCRBench', '--predictions', no_prediction)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {no_prediction}: missing column 'prediction' (needed to score OCRBench")
    assert done.stderr.count('\n') == 1
    no_category = write_jsonl(tmp_path / 'b.jsonl', [{'index': 1, 'answer': 'x', 'prediction': 'x'}])
    done = run_score('--benchmark', 'OCRBench', '--predictions', no_category)
    assert done.stderr.startswith(f"error: {no_category}: missing column 'category'")


def test_malformed_jsonl_line(tmp_path):
    predictions = tmp_path / 'bad.jsonl'
    predictions.write_text('{"index": 1, "answer": "a", "prediction": "a"}\n\n{"index": 2, answer}\n')
    done = run_score('--benchmark', 'TextVQA_VAL', '--predictions', predictions)
    assert done.returncode == 2
    assert done.stderr.startswith(f'error: {predictions}:3: invalid JSON')


def test_unknown_benchmark_lists_keys(tmp_path):
    done = run_score('--benchmark', 'VQAv2', '--predictions', tmp_path / 'x.jsonl')
    assert done.returncode == 2 and "valid keys: MMStar, MMMU_DEV_VAL, SimpleVQA" in done.stderr


def test_scores_follow_vlmevalkits_prediction_file_round_trip(tmp_path):
    """An all-numeric prediction column comes back from VLMEvalKit's file as floats: '007' -> 7.0."""
    gold = "['007', '007', '007', '007', '007', '007', '007', '007', '007', '007']"
    numeric = write_jsonl(tmp_path / 'numeric.jsonl', [{'index': i, 'answer': gold, 'prediction': '007'} for i in range(3)])
    done = run_score('--benchmark', 'TextVQA_VAL', '--predictions', numeric)
    assert json.loads(done.stdout) == {'Overall': 0.0}
    mixed = write_jsonl(tmp_path / 'mixed.jsonl', [{'index': i, 'answer': gold, 'prediction': p}
                                                   for i, p in enumerate(['007', '007', 'seven'])])
    done = run_score('--benchmark', 'TextVQA_VAL', '--predictions', mixed)
    assert json.loads(done.stdout) == {'Overall': pytest.approx(200 / 3)}
    # VLMEvalKit's own .xlsx is read as it is: the same numbers.
    from eval.vlmeval_files import write_vlmeval_predictions
    xlsx = write_vlmeval_predictions([json.loads(line) for line in numeric.read_text().splitlines()],
                                     tmp_path / 'M_TextVQA_VAL.xlsx')
    assert json.loads(run_score('--benchmark', 'TextVQA_VAL', '--predictions', xlsx).stdout) == {'Overall': 0.0}


def test_unknown_vlmevalkit_version_lists_the_valid_ones(tmp_path):
    predictions = write_jsonl(tmp_path / 'p.jsonl', [{'index': 1, 'answer': 'a', 'prediction': 'a'}])
    done = run_score('--benchmark', 'DocVQA_VAL', '--predictions', predictions, '--vlmevalkit-version', '0.2')
    assert done.returncode == 2 and done.stderr == (
        "error: unknown VLMEvalKit version '0.2'; valid: main, ms-vlmeval-0.0.20, nvidia-vlmeval-26.3\n")
