"""SimpleVQA: factual short-answer VQA. VLMEvalKit grades it with an LLM judge only.

With a judge (eval/judge.py, any OpenAI-compatible endpoint) each prediction is graded
CORRECT / INCORRECT / NOT_ATTEMPTED and the aggregates follow VLMEvalKit's SimpleVQAEval:
is_correct, is_incorrect, is_not_attempted, is_given_attempted (fractions rounded to 4
places), accuracy_given_attempted and f1. Without a judge the score is a clearly labelled
exact-match fallback ({'judge': 'exact_match_fallback', ...}) that is NOT comparable to
VLMEvalKit's number.

Data: VLMEvalKit's SimpleVQA.tsv (index, question, answer, image), or an HF table with
question / answer / image columns. Prompt: the bare question (ImageBaseDataset).
"""
from __future__ import annotations

from eval.benchmarks.base import Benchmark
from eval.data import hf_field, hf_image
from eval.judge import JudgeClient, judge_from_env, simplevqa_judge_scores
from eval.metrics.vqa import answer_list, as_text, exact_accuracy
from eval.prompts import base_prompt

EXACT_MATCH_FALLBACK = 'exact_match_fallback'


class SimpleVQA(Benchmark):
    key = 'SimpleVQA'
    score_columns = ('question', 'answer')

    def __init__(self, key=None, judge: JudgeClient | None = None, version=None):
        super().__init__(key, version)
        self.judge = judge

    def convert_hf_row(self, row, row_number):
        source = f'{self.key} HF data'
        image = hf_image(hf_field(row, ('image',), source, row_number), self.key, row_number, 'image')
        if image is None:
            return None
        return {'index': row.get('index', row.get('data_id', row_number)),
                'question': hf_field(row, ('question',), source, row_number),
                'answer': hf_field(row, ('answer',), source, row_number), 'image': [image]}

    def build_prompt(self, record, image_dir=None):
        return base_prompt(record, image_dir, self.version)

    def score(self, records, source='predictions'):
        self.check_predictions(records, source)
        judge = self.judge or judge_from_env()
        if judge is not None:
            return simplevqa_judge_scores(records, judge)
        hits = [exact_accuracy(as_text(r.get('prediction')), answer_list(r.get('answer'))) for r in records]
        return {'judge': EXACT_MATCH_FALLBACK, 'exact_match': sum(hits) / len(hits) if hits else None,
                'n': len(hits)}

    def headline(self, aggregates):
        value = aggregates.get('exact_match') if aggregates.get('judge') == EXACT_MATCH_FALLBACK \
            else aggregates.get('is_correct')
        return None if value is None else value * 100
