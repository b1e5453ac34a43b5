"""SimpleVQA: eval.score with a judge against VLMEvalKit's own SimpleVQA.evaluate, same judge.

VLMEvalKit grades SimpleVQA only with an LLM (GPT-4o through the OpenAI client; `exact_matching`
has no path for it), and its grader prompt is its own text, which we do not copy: eval/judge.py
asks with its own rubric. What can and must agree is everything around the grades. A local
OpenAI-compatible endpoint stands in for the LLM and grades deterministically from the
(answer, prediction) it reads out of either prompt; then both sides must send the judge the same
pairs row by row (after VLMEvalKit's prediction-file round trip) and report the same aggregates.
nvidia-vlmeval 26.3 has no SimpleVQA dataset.
"""
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crosscheck import REPO, installed_snapshots, write_eval_run_jsonl, write_tsv
from eval.judge import JudgeClient
from eval.score import score_file
from eval.vlmevalkit_versions import VERSIONS
from eval_fixtures import send_json
from prediction_sets import perturb

SNAPSHOTS = {v: p for v, p in installed_snapshots().items() if VERSIONS[v].has_simplevqa}
pytestmark = pytest.mark.skipif(not SNAPSHOTS, reason='no VLMEvalKit with a SimpleVQA dataset installed')
GOLDS = ['Paris', '3518.17', 'Barack Obama', 'blue', '1998', 'Mount Everest', 'H2O', '42']
SHARED_KEYS = ('is_correct', 'is_incorrect', 'is_not_attempted', 'is_given_attempted', 'accuracy_given_attempted', 'f1')
VLMEVAL_PROMPT = re.compile(r'正确答案: (?P<answer>.*?)\n\s*预测答案: \n\[预测答案0\]：(?P<prediction>.*)\n\s*```\s*\n', re.S)
OUR_PROMPT = re.compile(r'Gold answer: (?P<answer>.*?)\nPredicted answer: (?P<prediction>.*)\n\nGrade \(one word\):$', re.S)
VERDICTS = {'CORRECT': '正确', 'INCORRECT': '错误', 'NOT_ATTEMPTED': '未尝试'}


def verdict(answer: str, prediction: str) -> str:
    said, gold = prediction.strip().lower(), answer.strip().lower()
    if said in ('', 'nan', 'none', "i don't know"):
        return 'NOT_ATTEMPTED'
    return 'CORRECT' if gold in said else 'INCORRECT'


class Judge(BaseHTTPRequestHandler):
    seen: dict = {'vlmeval': [], 'ours': []}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        prompt = body['messages'][-1]['content']
        match, side = VLMEVAL_PROMPT.search(prompt), 'vlmeval'
        if match is None:
            match, side = OUR_PROMPT.search(prompt), 'ours'
        pair = (match['answer'], match['prediction'])
        self.seen[side].append(pair)
        grade = verdict(*pair)
        content = json.dumps({'预测答案0': VERDICTS[grade]}, ensure_ascii=False) if side == 'vlmeval' else grade
        send_json(self, {'id': 'x', 'object': 'chat.completion', 'created': 0, 'model': body['model'],
                         'choices': [{'index': 0, 'finish_reason': 'stop',
                                      'message': {'role': 'assistant', 'content': content}}]})

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def judged(tmp_path_factory):
    root = tmp_path_factory.mktemp('simplevqa')
    import random

    rng = random.Random(7)
    rows = [{'index': i, 'question': f'What is shown ({i})?', 'answer': rng.choice(GOLDS)} for i in range(200)]
    predictions = {str(r['index']): perturb(r['answer'], rng) for r in rows}
    write_tsv(root / 'SimpleVQA.tsv', rows)
    write_eval_run_jsonl(root / 'SimpleVQA.predictions.jsonl', 'SimpleVQA', root, predictions)
    server = ThreadingHTTPServer(('127.0.0.1', 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/v1'
    results = {}
    try:
        for version, path in SNAPSHOTS.items():
            Judge.seen = {'vlmeval': [], 'ours': []}
            job = {'kind': 'score', 'key': 'SimpleVQA', 'format': 'xlsx', 'lmudata': str(root), 'predictions': predictions,
                   'work_dir': str(root / version)}
            (root / 'jobs.json').write_text(json.dumps([job]))
            env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in (path, str(REPO)) if p),
                   'OPENAI_API_BASE': url, 'OPENAI_API_KEY': 'local'}
            done = subprocess.run([sys.executable, str(REPO / 'tests' / 'eval' / 'vlmeval_driver.py'),
                                   str(root / 'jobs.json'), str(root / 'result.json')], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            theirs = json.loads((root / 'result.json').read_text())['jobs'][0]
            judge = JudgeClient(url, 'gpt-4o')
            ours = {label: score_file('SimpleVQA', source, root, judge, version)
                    for label, source in (('file', theirs['file']), ('jsonl', root / 'SimpleVQA.predictions.jsonl'))}
            results[version] = {'theirs': theirs, 'ours': ours, 'seen': Judge.seen}
    finally:
        server.shutdown()
    return results


def test_the_judge_sees_the_same_pairs_row_by_row(judged):
    for version, result in judged.items():
        theirs, ours = result['seen']['vlmeval'], result['seen']['ours']
        assert len(theirs) == 200 and len(ours) == 2 * 200, version   # ours: VLMEvalKit's file, then our JSONL
        assert Counter(theirs) == Counter(ours[:200]) == Counter(ours[200:]), version
        assert len({verdict(*pair) for pair in theirs}) == 3   # all three grades occur


def test_aggregates_equal_simplevqa_evaluate(judged):
    for version, result in judged.items():
        assert 'error' not in result['theirs'], result['theirs']
        theirs = dict(result['theirs']['result'][i].values() for i in range(len(result['theirs']['result'])))
        for ours in result['ours'].values():
            assert {k: ours[k] for k in SHARED_KEYS} == {k: theirs[k] for k in SHARED_KEYS}, version
            assert ours['n'] == 200 and ours['judge_failed'] == 0
