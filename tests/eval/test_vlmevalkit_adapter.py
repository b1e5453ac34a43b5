"""The VLMEvalKit model inside VLMEvalKit itself: infer_data_job and run.py answer like eval.run.

The installed snapshot runs in its own process (tests/eval/vlmeval_driver.py): `infer_data_job`
with ViQMLLMVLMEval on SYNTH_CHART and SYNTH_DOC, VLMEvalKit's run.py (through `python -m
eval.adapters.vlmevalkit`) on SYNTH_SHAPES, with VLMEvalKit's own prompts and image files. eval.run
answers the same data in the snapshot's mode (PNG image files, its scoring).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosscheck import REPO, installed_snapshots, theirs_as_ours
from data.synthetic import make_synthetic_dataset
from eval.run import main as run_main
from eval.vlmeval_files import read_vlmeval_predictions
from test_run import build_tiny_export

SNAPSHOTS = {v: p for v, p in installed_snapshots().items() if p == ''}   # the environment's own package
pytestmark = pytest.mark.skipif(not SNAPSHOTS, reason='no VLMEvalKit installed (./dev.sh installs the pinned one)')
VERSION = next(iter(SNAPSHOTS), None)
KEYS = {'SYNTH_CHART': 'infer', 'SYNTH_DOC': 'infer', 'SYNTH_SHAPES': 'run'}
MAX_NEW_TOKENS = 6


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('vlmeval_adapter')
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export = build_tiny_export(root)
        make_synthetic_dataset(root / 'synthetic', 40, seed=0, val_fraction=0.3)
        data = root / 'synthetic' / 'vlmeval'
        assert run_main(['--model', str(export), '--benchmarks', ','.join(KEYS), '--data-root', str(data),
                         '--out', str(root / 'eval_run'), '--max-new-tokens', str(MAX_NEW_TOKENS), '--device', 'cpu',
                         '--vlmevalkit-version', VERSION, '--batch-size', '4']) == 0
    finally:
        torch.set_num_threads(previous)
    model_dir = root / 'eval_run' / 'tiny-run'
    jobs = [{'kind': kind, 'key': key, 'lmudata': str(data), 'work_dir': str(root / 'vlmeval' / key),
             'model_path': str(export), 'max_new_tokens': MAX_NEW_TOKENS,
             'also_evaluate': [str(model_dir / f'tiny-run_{key}.xlsx')]} for key, kind in KEYS.items()]
    (root / 'jobs.json').write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(REPO / 'tests' / 'eval' / 'vlmeval_driver.py'), str(root / 'jobs.json'),
                           str(root / 'result.json')], cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / 'result.json').read_text())['jobs']
    return {'model_dir': model_dir, 'vlmeval': dict(zip(KEYS, results))}


@pytest.mark.parametrize('key', KEYS)
def test_vlmevalkit_predictions_equal_eval_runs(runs, key):
    theirs = runs['vlmeval'][key]
    assert 'error' not in theirs, theirs
    ours_jsonl = [json.loads(line) for line in (runs['model_dir'] / f'{key}.predictions.jsonl').read_text().splitlines()]
    ours = {str(r['index']): r['prediction'] for r in read_vlmeval_predictions(runs['model_dir'] / f'tiny-run_{key}.xlsx')}
    vlmeval = {str(r['index']): r['prediction'] for r in read_vlmeval_predictions(theirs['file'])}
    assert vlmeval == ours and len(vlmeval) == len(ours_jsonl) >= 3
    assert any(isinstance(v, str) and v.strip() for v in vlmeval.values())   # the model said something


@pytest.mark.parametrize('key', KEYS)
def test_vlmevalkit_scores_equal_eval_runs(runs, key):
    """VLMEvalKit's evaluate of its own run and of eval.run's .xlsx give eval.run's scores.json."""
    theirs = runs['vlmeval'][key]
    scores = json.loads((runs['model_dir'] / 'scores.json').read_text())[key]
    assert theirs_as_ours(theirs['result']) == scores
    assert [theirs_as_ours(r) for r in theirs['also']] == [scores]


def test_synthetic_keys_use_the_registered_dataset_classes(runs):
    classes = {key: runs['vlmeval'][key]['dataset_class'] for key in KEYS}
    assert classes == {'SYNTH_CHART': 'SynthVQADataset', 'SYNTH_DOC': 'SynthVQADataset',
                       'SYNTH_SHAPES': 'SynthMCQDataset'}


def test_missing_synthetic_tsv_is_one_line(tmp_path):
    from eval.adapters.vlmevalkit import synth_data_path

    with pytest.raises(FileNotFoundError, match=r'^SYNTH_VAL_DOC: no .*SYNTH_VAL_DOC.tsv or .*SYNTH_DOC.tsv; write the '
                                                r'synthetic set with python scripts/make_synthetic_data.py'):
        synth_data_path(tmp_path, 'SYNTH_VAL_DOC')
    (tmp_path / 'SYNTH_DOC.tsv').write_text('index\tquestion\n')
    assert synth_data_path(tmp_path, 'SYNTH_VAL_DOC') == Path(tmp_path) / 'SYNTH_DOC.tsv'
