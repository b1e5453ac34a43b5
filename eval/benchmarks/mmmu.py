"""MMMU_DEV_VAL: college-level multi-discipline multiple choice with interleaved images.

VLMEvalKit's MMMUDataset: the ImageMCQDataset prompt, then the text is cut at every
'<image k>' marker and image k placed there. Scoring is exact matching where an open
question (no option A) becomes 'A. <gold answer> / B. Other Answers' with gold 'A'
(MMMU_preproc); results come per split ('dev', 'validation'), the headline being the
validation split's Overall.

Data: VLMEvalKit's MMMU_DEV_VAL.tsv (multi-image rows hold a list of base64 images), or
MMMU/MMMU / lmms-lab/MMMU: id ('validation_<Subject>_<n>'), question, options (list or
its string), answer, image_1..image_7.
"""
from __future__ import annotations

import ast

from eval.benchmarks.base import ChoiceBenchmark
from eval.data import DataError, hf_field, hf_image
from eval.metrics.choice import OPTION_LETTERS
from eval.prompts import interleave_images, mcq_prompt

MAX_IMAGES = 7


class MMMU(ChoiceBenchmark):
    key = 'MMMU_DEV_VAL'
    data_columns = ('index', 'question', 'answer')
    score_columns = ('index', 'question', 'answer', 'A')
    mmmu = True
    headline_split = 'validation'

    def build_prompt(self, record, image_dir=None):
        return interleave_images(mcq_prompt(record, image_dir, self.version),
                                 f"{self.key} index {record.get('index')}")

    def convert_hf_row(self, row, row_number):
        source = f'{self.key} HF data'
        identifier = str(hf_field(row, ('id', 'index'), source, row_number))
        options = row.get('options') or []
        if isinstance(options, str):
            try:
                options = ast.literal_eval(options)
            except (ValueError, SyntaxError):
                raise DataError(f'{source}: row {row_number} options {options[:60]!r} is not a list literal') from None
        if len(options) > len(OPTION_LETTERS):
            raise DataError(f'{source}: row {row_number} has {len(options)} options, more than A-Z')
        record = {'index': identifier, 'question': hf_field(row, ('question',), source, row_number)}
        record.update({letter: str(text) for letter, text in zip(OPTION_LETTERS, options)})
        record['answer'] = hf_field(row, ('answer',), source, row_number)
        split, _, rest = identifier.partition('_')
        if rest:
            record['split'] = split
            record['category'] = rest.rsplit('_', 1)[0]
        images = []
        for k in range(1, MAX_IMAGES + 1):
            ref = hf_image(row.get(f'image_{k}'), self.key, row_number, f'image_{k}')
            if ref is None:
                break  # MMMU numbers its images contiguously from 1
            images.append(ref)
        if not images:
            return None
        record['image'] = images
        return record
