"""ChartQA_TEST: chart VQA scored by relaxed accuracy, reported per split
('test_augmented', 'test_human') and 'Overall' (VLMEvalKit ImageVQADataset).

Data: VLMEvalKit's ChartQA_TEST.tsv; lmms-lab/ChartQA (question, answer, type, image) or
HuggingFaceM4/ChartQA (query, label list, human_or_machine, image), split test.
"""
from __future__ import annotations

from eval.benchmarks.base import VQABenchmark
from eval.data import DataError, hf_field, hf_image

# HF spellings of the two ChartQA test sets -> VLMEvalKit's split names.
_SPLIT_NAMES = {'human_test': 'test_human', 'augmented_test': 'test_augmented', 0: 'test_human',
                1: 'test_augmented', 'test_human': 'test_human', 'test_augmented': 'test_augmented'}


class ChartQA(VQABenchmark):
    key = 'ChartQA_TEST'
    method = 'relaxed_accuracy'

    def convert_hf_row(self, row, row_number):
        source = f'{self.key} HF data'
        answer = hf_field(row, ('answer', 'label'), source, row_number)
        if isinstance(answer, (list, tuple)):
            answer = list(answer) if len(answer) != 1 else answer[0]
        record = {'index': row.get('index', row_number),
                  'question': hf_field(row, ('question', 'query'), source, row_number), 'answer': answer}
        kind = next((row[c] for c in ('type', 'human_or_machine', 'split') if c in row), None)
        if kind is not None:
            if kind not in _SPLIT_NAMES:
                raise DataError(f'{source}: row {row_number} has test-set type {kind!r}; expected one of '
                                f'{sorted(map(str, _SPLIT_NAMES))}')
            record['split'] = _SPLIT_NAMES[kind]
        image = hf_image(hf_field(row, ('image',), source, row_number), self.key, row_number, 'image')
        if image is None:
            return None
        record['image'] = [image]
        return record
