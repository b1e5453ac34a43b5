"""TextVQA_VAL: scene-text VQA scored by VQA accuracy over the 10 annotator answers
(VLMEvalKit ImageVQADataset, method 'vqa_score').

Data: VLMEvalKit's TextVQA_VAL.tsv, or lmms-lab/textvqa (split validation):
question_id, question, answers (10), image.
"""
from __future__ import annotations

from eval.benchmarks.base import VQABenchmark
from eval.benchmarks.docvqa import convert_answers_list_row


class TextVQA(VQABenchmark):
    key = 'TextVQA_VAL'
    method = 'vqa_score'

    def convert_hf_row(self, row, row_number):
        return convert_answers_list_row(self.key, row, row_number, id_columns=('question_id', 'questionId'))
