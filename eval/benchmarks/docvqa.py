"""DocVQA_VAL: document VQA scored by ANLS (VLMEvalKit ImageVQADataset, method 'anls').

Data: VLMEvalKit's DocVQA_VAL.tsv, or lmms-lab/DocVQA (config DocVQA, split validation)
as parquet / save_to_disk: questionId, question, answers (list), image.
"""
from __future__ import annotations

from eval.benchmarks.base import VQABenchmark
from eval.data import hf_field, hf_image


def convert_answers_list_row(benchmark: str, row: dict, row_number: int, id_columns=('questionId', 'question_id')):
    """HF rows with an `answers` list (DocVQA, InfoVQA, TextVQA) -> a record."""
    source = f'{benchmark} HF data'
    index = next((row[c] for c in id_columns if c in row), row_number)
    answers = hf_field(row, ('answers', 'answer'), source, row_number)
    image = hf_image(hf_field(row, ('image',), source, row_number), benchmark, row_number, 'image')
    if image is None:
        return None  # VLMEvalKit drops rows without an image
    return {'index': index, 'question': hf_field(row, ('question',), source, row_number),
            'answer': list(answers) if isinstance(answers, (list, tuple)) else answers, 'image': [image]}


class DocVQA(VQABenchmark):
    key = 'DocVQA_VAL'
    method = 'anls'

    def convert_hf_row(self, row, row_number):
        return convert_answers_list_row(self.key, row, row_number)
