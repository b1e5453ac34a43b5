"""Runs inside a VLMEvalKit installation (a subprocess of the tests): VLMEvalKit's own code only.

    python vlmeval_driver.py JOBS.json RESULT.json

Each job is {'kind': 'score', 'key', 'lmudata', 'work_dir', 'format': 'xlsx'|'tsv', 'predictions':
{index: str}, 'per_row': bool} or {'kind': 'infer' | 'run', 'key', 'lmudata', 'work_dir',
'model_path', 'max_new_tokens'}, optionally with 'also_evaluate': [prediction files].

- score: build the benchmark's VLMEvalKit dataset class over $LMUData/<key>.tsv, store the
  predictions as `infer_data_job` stores them (dataset.data + `prediction` = str(answer), image
  column dropped, `vlmeval.smp.dump` to <model>_<key>.<format>), then `dataset.evaluate(file,
  model='exact_matching')`. The result is the aggregate VLMEvalKit returns; with per_row, OCRBench
  is also evaluated row by row (each row of the frame VLMEvalKit loaded, stored as a one-row pickle
  that `load` returns unchanged). The VQA and multiple-choice per-row hits come from a data file
  with one category per row, whose per-category table is the per-row hits.
- infer: `infer_data_job` with the ViQ-MLLM model on a SYNTH_* key (eval.adapters.vlmevalkit's
  registered dataset classes); the result is the prediction file, its evaluation and the
  evaluation of every file in also_evaluate (eval.run's .xlsx) by the same dataset.
- run: the same through VLMEvalKit's run.py (`python -m eval.adapters.vlmevalkit ...`).

The only change to VLMEvalKit's classes: the official TSVs' md5 is dropped so that the generated
TSV under $LMUData is read instead of downloading the official one (there is no network).
"""
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from eval.adapters.vlmevalkit import ViQMLLMVLMEval, register_with_vlmeval  # noqa: E402  (imports VLMEvalKit)
from eval.adapters.vlmevalkit import main as vlmevalkit_main  # noqa: E402

import pandas as pd  # noqa: E402
from vlmeval.dataset import ImageMCQDataset, ImageVQADataset, MMMUDataset  # noqa: E402
from vlmeval.dataset.image_vqa import OCRBench  # noqa: E402
from vlmeval.smp import dump, load  # noqa: E402

MODEL = 'ViQ-MLLM'


def local_class(base):
    return type(f'Local{base.__name__}', (base,), {'DATASET_MD5': {}})


CLASSES = {'MMStar': ImageMCQDataset, 'AI2D_TEST': ImageMCQDataset, 'MMMU_DEV_VAL': MMMUDataset,
           'OCRBench': OCRBench, 'DocVQA_VAL': ImageVQADataset, 'InfoVQA_VAL': ImageVQADataset,
           'TextVQA_VAL': ImageVQADataset, 'ChartQA_TEST': ImageVQADataset}


def plain(value):
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, 'item'):
        value = value.item()
    return None if isinstance(value, float) and value != value else value


def table(result):
    """evaluate's return value as JSON: a dict, or a DataFrame as a list of row dicts."""
    if isinstance(result, pd.DataFrame):
        return [plain(row) for row in result.to_dict('records')]
    return plain(result)


def score(job):
    os.environ['LMUData'] = job['lmudata']
    os.environ['PRED_FORMAT'] = job['format']
    if job['key'] == 'SimpleVQA':   # not in every snapshot
        from vlmeval.dataset.simplevqa import SimpleVQA
        CLASSES['SimpleVQA'] = SimpleVQA
    dataset = local_class(CLASSES[job['key']])(dataset=job['key'])
    data = dataset.data.copy()
    data['prediction'] = [str(job['predictions'][str(i)]) for i in data['index']]
    if 'image' in data:
        data.pop('image')
    work = Path(job['work_dir'])
    work.mkdir(parents=True, exist_ok=True)
    path = str(work / f"{MODEL}_{job['key']}.{job['format']}")
    dump(data, path)
    out = {'file': path, 'result': table(dataset.evaluate(path, model='exact_matching', nproc=1))}
    if job.get('per_row') and job['key'] == 'OCRBench':
        loaded = load(path)
        rows = []
        for i in range(len(loaded)):
            single = str(work / f'row{i}.pkl')
            loaded.iloc[i:i + 1].reset_index(drop=True).to_pickle(single)
            result = plain(dataset.evaluate(single, model='exact_matching'))
            total = result['Final Score']
            rows.append([plain(loaded.iloc[i]['index']), total['sum'] if isinstance(total, dict) else total])
        out['rows'] = rows
    return out


def infer(job):
    os.environ['LMUData'] = job['lmudata']
    register_with_vlmeval()
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job

    work = Path(job['work_dir'])
    work.mkdir(parents=True, exist_ok=True)
    if job['kind'] == 'infer':
        model = ViQMLLMVLMEval(model_path=job['model_path'], max_new_tokens=job['max_new_tokens'], device='cpu')
        infer_data_job(model, work_dir=str(work), model_name=MODEL, dataset=build_dataset(job['key']))
        path = work / f"{MODEL}_{job['key']}.xlsx"
    else:
        status = vlmevalkit_main(['--model-path', job['model_path'], '--max-new-tokens', str(job['max_new_tokens']),
                                  '--device', 'cpu', '--data', job['key'], '--work-dir', str(work),
                                  '--judge', 'exact_matching', '--mode', 'infer'])
        assert status == 0, status
        path = work / MODEL / f"{MODEL}_{job['key']}.xlsx"
    dataset = build_dataset(job['key'])
    return {'file': str(path), 'dataset_class': type(dataset).__name__,
            'result': table(dataset.evaluate(str(path), model='exact_matching')),
            'also': [table(dataset.evaluate(f, model='exact_matching')) for f in job.get('also_evaluate', [])]}


def main(jobs_path, result_path):
    import vlmeval

    results = {'vlmeval': vlmeval.__file__, 'jobs': []}
    for job in json.loads(Path(jobs_path).read_text()):
        try:
            results['jobs'].append(score(job) if job['kind'] == 'score' else infer(job))
        except Exception as exc:   # VLMEvalKit itself failing on a job is a result the tests report
            results['jobs'].append({'error': f'{type(exc).__name__}: {exc}'})
    Path(result_path).write_text(json.dumps(results))


if __name__ == '__main__':
    main(*sys.argv[1:3])
