"""MMStar: vision-indispensable multiple choice, reported as 'Overall' plus the sorted
l2-categories and categories (VLMEvalKit ImageMCQDataset.report_acc, fractions 0..1).

Data: VLMEvalKit's MMStar.tsv, or Lin-Chen/MMStar (parquet): index, question (with the
options written inline as '\\nOptions: A: ..., B: ..., C: ..., D: ...'), answer, category,
l2_category, image. The inline options are split into columns A-D.
"""
from __future__ import annotations

import re

from eval.benchmarks.base import ChoiceBenchmark
from eval.data import DataError, hf_field, hf_image

_INLINE_OPTION = re.compile(r'(?:^|, )([A-D]): ')


def split_inline_options(question: str, source: str, row_number: int) -> tuple[str, dict]:
    stem, marker, tail = question.rpartition('Options:')
    if not marker:
        raise DataError(f"{source}: row {row_number} question has no 'Options:' part to read options A-D from")
    parts = _INLINE_OPTION.split(tail.strip())
    letters, texts = parts[1::2], parts[2::2]
    if letters != ['A', 'B', 'C', 'D'][:len(letters)] or len(letters) < 2:
        raise DataError(f'{source}: row {row_number} options {letters} are not A, B, C, D in order')
    return stem.rstrip('\n').rstrip(), dict(zip(letters, texts))


class MMStar(ChoiceBenchmark):
    key = 'MMStar'

    def convert_hf_row(self, row, row_number):
        source = f'{self.key} HF data'
        image = hf_image(hf_field(row, ('image',), source, row_number), self.key, row_number, 'image')
        if image is None:
            return None
        question = hf_field(row, ('question',), source, row_number)
        if 'A' in row:
            options = {k: row[k] for k in 'ABCD' if k in row}
        else:
            question, options = split_inline_options(question, source, row_number)
        record = {'index': row.get('index', row_number), 'question': question, **options,
                  'answer': hf_field(row, ('answer',), source, row_number)}
        for name in ('category', 'l2-category', 'l2_category'):
            if name in row:
                record[name.replace('_', '-')] = row[name]
        record['image'] = [image]
        return record
