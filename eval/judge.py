"""LLM judge for SimpleVQA over any OpenAI-compatible chat-completions endpoint.

Standard library only (urllib). Configure with arguments or the environment:
VIQ_JUDGE_BASE_URL (e.g. http://127.0.0.1:8000/v1), VIQ_JUDGE_MODEL, VIQ_JUDGE_API_KEY.

The grading rubric follows VLMEvalKit's SimpleVQA grader (itself modelled on OpenAI's
SimpleQA grader): CORRECT when the answer contains the gold information without
contradiction, INCORRECT when it contradicts it, NOT_ATTEMPTED when it neither gives nor
contradicts it. Aggregation follows VLMEvalKit's SimpleVQAEval: a reply without a
recognisable grade counts as NOT_ATTEMPTED; a request that fails entirely counts in the
denominator only (reported as `judge_failed`).
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from eval.metrics.vqa import as_text
from viq.errors import ConfigError, UserError

GRADES = ('CORRECT', 'INCORRECT', 'NOT_ATTEMPTED')
_GRADE_PATTERN = re.compile(r'\b(NOT_ATTEMPTED|INCORRECT|CORRECT)\b')

GRADER_PROMPT = """You grade answers to questions about images. Given a question, its gold answer and a \
predicted answer, reply with exactly one word: CORRECT, INCORRECT or NOT_ATTEMPTED.

CORRECT: the prediction contains the essential information of the gold answer and nothing that \
contradicts it. Language (e.g. Chinese vs English), capitalisation, punctuation, word order and \
different transliterations or names of the same entity do not matter. Hedging is acceptable if \
the gold answer is given and not contradicted. Information the question already implies may be \
left out (gold "Sardinia, Italy" for "in which region of Italy" accepts "Sardinia").
INCORRECT: the prediction states something that contradicts the gold answer, even with hedging \
("maybe", "I think"), or lists several candidates of which some are wrong, or gives only part of \
a multi-part gold answer.
NOT_ATTEMPTED: the prediction neither gives the essential gold information nor contradicts it \
("I don't know", "I cannot identify the person", "N/A", a vague range such as "about 3500 m" \
for a gold 3518.17).
For numeric gold answers the prediction must match to the precision given (gold 3518.17 accepts \
3518, 3518.1 and 3518.17; 3520 is INCORRECT).

Question: {question}
Gold answer: {answer}
Predicted answer: {prediction}

Grade (one word):"""


class JudgeError(UserError, RuntimeError):
    """The judge endpoint did not answer usably (URL, model name, key or server): a setup problem."""


class JudgeClient:
    """POST {base_url}/chat/completions; returns the first choice's message content."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, temperature: float = 0.0):
        if not base_url or not model:
            raise ConfigError('judge needs base_url and model (or VIQ_JUDGE_BASE_URL / VIQ_JUDGE_MODEL)')
        self.url = base_url.rstrip('/') + '/chat/completions'
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.temperature = temperature

    def complete(self, prompt: str) -> str:
        body = json.dumps({'model': self.model, 'temperature': self.temperature,
                           'messages': [{'role': 'user', 'content': prompt}]}).encode()
        headers = {'Content-Type': 'application/json'}
        if self.api_key:
            headers['Authorization'] = f'Bearer {self.api_key}'
        last_error = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method='POST')
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode('utf-8'))
                return payload['choices'][0]['message']['content']
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                last_error = exc
                if attempt < self.retries:
                    time.sleep(0.5 * (attempt + 1))
        raise JudgeError(f'judge request to {self.url} failed after {self.retries + 1} tries: {last_error}')


def judge_from_env(base_url=None, model=None, api_key=None) -> JudgeClient | None:
    """A client from arguments or VIQ_JUDGE_* variables; None when no endpoint is set."""
    base_url = base_url or os.environ.get('VIQ_JUDGE_BASE_URL')
    model = model or os.environ.get('VIQ_JUDGE_MODEL')
    api_key = api_key or os.environ.get('VIQ_JUDGE_API_KEY')
    if not base_url or not model:
        return None
    return JudgeClient(base_url, model, api_key)


def parse_grade(reply: str) -> str:
    """The grade in a judge reply; anything unrecognisable is NOT_ATTEMPTED (as upstream)."""
    match = _GRADE_PATTERN.search(reply.replace('**', '').upper())
    return match.group(1) if match else 'NOT_ATTEMPTED'


def grade_one(judge: JudgeClient, record: dict) -> str | None:
    prompt = GRADER_PROMPT.format(question=as_text(record.get('question')), answer=as_text(record.get('answer')),
                                  prediction=as_text(record.get('prediction')))
    try:
        return parse_grade(judge.complete(prompt))
    except JudgeError:
        return None


def simplevqa_judge_scores(records: list[dict], judge: JudgeClient, workers: int = 4) -> dict:
    """VLMEvalKit SimpleVQAEval aggregates over judge grades."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        grades = list(pool.map(lambda r: grade_one(judge, r), records))
    amount = len(records)
    counts = {g: sum(1 for x in grades if x == g) for g in GRADES}
    result = {'judge': judge.model}
    if amount == 0:
        return {**result, 'n': 0}
    result['is_correct'] = round(counts['CORRECT'] / amount, 4)
    result['is_incorrect'] = round(counts['INCORRECT'] / amount, 4)
    result['is_not_attempted'] = round(counts['NOT_ATTEMPTED'] / amount, 4)
    result['is_given_attempted'] = round(result['is_correct'] + result['is_incorrect'], 4)
    attempted = result['is_given_attempted']
    accuracy = result['is_correct'] / attempted if attempted > 0 else 0
    result['accuracy_given_attempted'] = accuracy
    denominator = accuracy + result['is_correct']
    result['f1'] = 2 * accuracy * result['is_correct'] / denominator if denominator > 0 else 0
    result['n'] = amount
    result['judge_failed'] = sum(1 for x in grades if x is None)
    return result
