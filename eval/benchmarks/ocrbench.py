"""OCRBench: 1000 OCR questions in ten categories, one point each (VLMEvalKit OCRBench).

The prompt is the bare question (OCRBench derives from ImageBaseDataset, not from
ImageVQADataset, so there is no 'single word or phrase' suffix). Scores are points per
category group, 'Final Score' (0-1000) and 'Final Score Norm' (/10).

Data: VLMEvalKit's OCRBench.tsv, or echo840/OCRBench: question, question_type (the
category), answer (list), image.
"""
from __future__ import annotations

from eval.benchmarks.base import Benchmark
from eval.data import hf_field, hf_image
from eval.metrics.ocrbench import ocrbench_hit, ocrbench_scores
from eval.prompts import base_prompt


class OCRBench(Benchmark):
    key = 'OCRBench'
    data_columns = ('index', 'question', 'answer', 'category')
    score_columns = ('answer', 'category')

    def convert_hf_row(self, row, row_number):
        source = f'{self.key} HF data'
        image = hf_image(hf_field(row, ('image',), source, row_number), self.key, row_number, 'image')
        if image is None:
            return None
        answer = hf_field(row, ('answer', 'answers'), source, row_number)
        return {'index': row.get('index', row_number), 'question': hf_field(row, ('question',), source, row_number),
                'answer': list(answer) if isinstance(answer, (list, tuple)) else answer,
                'category': hf_field(row, ('category', 'question_type', 'type'), source, row_number),
                'image': [image]}

    def build_prompt(self, record, image_dir=None):
        return base_prompt(record, image_dir, self.version)

    def row_hits(self, records, source='predictions'):
        self.check_predictions(records, source)
        return [float(ocrbench_hit(r.get('prediction'), r.get('answer'), r.get('category'))) for r in records]

    def score(self, records, source='predictions'):
        self.check_predictions(records, source)
        return ocrbench_scores(records, str(source), self.version)

    def headline(self, aggregates):
        total = aggregates['Final Score']
        return (total['sum'] if isinstance(total, dict) else total) / 10
