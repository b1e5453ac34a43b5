"""InfoVQA_VAL: infographic VQA scored by ANLS (VLMEvalKit ImageVQADataset, method 'anls').

Data: VLMEvalKit's InfoVQA_VAL.tsv, or lmms-lab/InfographicVQA (split validation):
questionId, question, answers (list), image.
"""
from __future__ import annotations

from eval.benchmarks.base import VQABenchmark
from eval.benchmarks.docvqa import convert_answers_list_row


class InfoVQA(VQABenchmark):
    key = 'InfoVQA_VAL'
    method = 'anls'

    def convert_hf_row(self, row, row_number):
        return convert_answers_list_row(self.key, row, row_number)
