"""SimpleVQA judge against a local OpenAI-compatible server, the no-judge fallback, and reports."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eval.benchmarks import get_benchmark
from eval.judge import JudgeClient, parse_grade, simplevqa_judge_scores
from eval.report import summary, write_report
from eval_fixtures import send_json, write_jsonl

REPO = Path(__file__).resolve().parents[2]
REPLIES = {'Paris': 'CORRECT', 'London': '**INCORRECT**', 'Lyon?': 'Hmm, hard to say.'}


class FakeChatCompletions(BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        FakeChatCompletions.seen.append((self.path, self.headers.get('Authorization'), body['model']))
        prompt = body['messages'][0]['content']
        prediction = prompt.split('Predicted answer: ')[1].split('\n')[0]
        if prediction not in REPLIES:
            self.send_response(500)
            self.end_headers()
            return
        send_json(self, {'choices': [{'message': {'role': 'assistant', 'content': REPLIES[prediction]}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(('127.0.0.1', 0), FakeChatCompletions)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    FakeChatCompletions.seen = []
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}/v1'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _records(*predictions):
    return [{'index': i, 'question': 'Capital of France?', 'answer': 'Paris', 'prediction': p}
            for i, p in enumerate(predictions)]


def test_judge_grades_and_simplevqa_aggregates(judge_server):
    judge = JudgeClient(judge_server, 'grader-1', api_key='sk-test', timeout=5, retries=0)
    scores = simplevqa_judge_scores(_records('Paris', 'London', 'Lyon?', 'boom'), judge)
    assert scores == {
        'judge': 'grader-1', 'is_correct': 0.25, 'is_incorrect': 0.25, 'is_not_attempted': 0.25,
        'is_given_attempted': 0.5, 'accuracy_given_attempted': 0.5, 'f1': pytest.approx(2 * 0.5 * 0.25 / 0.75),
        'n': 4, 'judge_failed': 1}
    assert {s[:3] for s in FakeChatCompletions.seen} == {('/v1/chat/completions', 'Bearer sk-test', 'grader-1')}
    assert get_benchmark('SimpleVQA').headline(scores) == 25.0


def test_parse_grade():
    assert parse_grade('NOT_ATTEMPTED') == 'NOT_ATTEMPTED'
    assert parse_grade('The grade is incorrect.') == 'INCORRECT'
    assert parse_grade('correct') == 'CORRECT'
    assert parse_grade('no idea') == 'NOT_ATTEMPTED'


def test_score_cli_uses_judge_from_environment(judge_server, tmp_path):
    predictions = write_jsonl(tmp_path / 'simplevqa.jsonl', _records('Paris', 'Paris', 'London'))
    done = subprocess.run([sys.executable, '-m', 'eval.score', '--benchmark', 'SimpleVQA', '--predictions',
                           str(predictions)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'VIQ_JUDGE_BASE_URL': judge_server, 'VIQ_JUDGE_MODEL': 'grader-2'})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result['judge'], result['is_correct'], result['is_incorrect']) == ('grader-2', 0.6667, 0.3333)


def test_simplevqa_without_judge_is_labelled_fallback(monkeypatch):
    for name in ('VIQ_JUDGE_BASE_URL', 'VIQ_JUDGE_MODEL'):
        monkeypatch.delenv(name, raising=False)
    scores = get_benchmark('SimpleVQA').score(_records(' paris', 'Paris, France'))
    assert scores == {'judge': 'exact_match_fallback', 'exact_match': 0.5, 'n': 2}


def test_report_table_two_shape(tmp_path):
    ocr = {'Text Recognition': 250, 'Scene Text-centric VQA': 150, 'Doc-oriented VQA': 120,
           'Key Information Extraction': 100, 'Handwritten Mathematical Expression Recognition': 20,
           'Final Score': 640, 'Final Score Norm': 64.0}
    results = {
        'viq-1.5b': {'MMStar': {'Overall': 0.5, 'coarse perception': 0.75}, 'DocVQA_VAL': {'Overall': 80.0},
                     'OCRBench': ocr, 'MMMU_DEV_VAL': {'dev': {'Overall': 0.1}, 'validation': {'Overall': 0.4}}},
        'baseline': {'MMStar': {'Overall': 0.45}, 'DocVQA_VAL': {'Overall': 70.0}},
    }
    assert summary(results)['viq-1.5b'] == {'MMStar': 50.0, 'MMMU_DEV_VAL': 40.0, 'DocVQA_VAL': 80.0,
                                            'OCRBench': 64.0, 'Avg.': 58.5}
    json_path, md_path = write_report(results, tmp_path)
    markdown = md_path.read_text()
    assert '| Model | MMStar | MMMU | DocVQA | OCRBench | Avg. |' in markdown
    assert '| viq-1.5b | 50.0 | 40.0 | 80.0 | 64.0 | 58.5 |' in markdown
    assert '| baseline | 45.0 | - | 70.0 | - | 57.5† |' in markdown
    assert '| viq-1.5b | 50.00 | 75.00 |' in markdown                      # MMStar per-category, x100
    assert '| viq-1.5b | 250 | 150 | 120 | 100 | 20 | 640 | 64.0 |' in markdown
    payload = json.loads(json_path.read_text())
    assert payload['benchmarks'] == ['MMStar', 'MMMU_DEV_VAL', 'DocVQA_VAL', 'OCRBench']
    assert payload['aggregates'] == results
