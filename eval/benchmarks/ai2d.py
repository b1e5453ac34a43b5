"""AI2D_TEST: science-diagram multiple choice (VLMEvalKit ImageMCQDataset, exact matching).

Data: VLMEvalKit's AI2D_TEST.tsv (options in columns A-D), or lmms-lab/ai2d: question,
options (list), answer (the option's 0-based position as text), image.
"""
from __future__ import annotations

from eval.benchmarks.base import ChoiceBenchmark
from eval.data import DataError, hf_field, hf_image
from eval.metrics.choice import OPTION_LETTERS


def options_record(benchmark: str, row: dict, row_number: int, options, answer_position) -> dict:
    source = f'{benchmark} HF data'
    try:
        position = int(answer_position)
    except (TypeError, ValueError):
        raise DataError(f'{source}: row {row_number} answer {answer_position!r} is not an option position') from None
    if not 0 <= position < len(options):
        raise DataError(f'{source}: row {row_number} answer position {position} outside {len(options)} options')
    record = {letter: str(text) for letter, text in zip(OPTION_LETTERS, options)}
    record['answer'] = OPTION_LETTERS[position]
    return record


class AI2D(ChoiceBenchmark):
    key = 'AI2D_TEST'

    def convert_hf_row(self, row, row_number):
        source = f'{self.key} HF data'
        image = hf_image(hf_field(row, ('image',), source, row_number), self.key, row_number, 'image')
        if image is None:
            return None
        record = {'index': row.get('index', row_number), 'question': hf_field(row, ('question',), source, row_number)}
        record.update(options_record(self.key, row, row_number, hf_field(row, ('options',), source, row_number),
                                     hf_field(row, ('answer',), source, row_number)))
        if 'category' in row:
            record['category'] = row['category']
        record['image'] = [image]
        return record
