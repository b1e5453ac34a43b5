"""Synthetic validation sets exported by data/synthetic.py as VLMEvalKit-style TSVs.

- SYNTH_CHART.tsv: chart questions, scored like ChartQA (relaxed accuracy, x100).
- SYNTH_DOC.tsv: document questions, scored like DocVQA (ANLS, x100).
- SYNTH_SHAPES.tsv: multiple choice with options A-D, scored like MMStar / AI2D (fractions).
Columns: index, image (base64 PNG), question, answer, category (+ A, B, C, D). Results are
split by `category` exactly as VLMEvalKit splits any benchmark that has that column.
- SYNTH_VIDEO.tsv (written with `make_synthetic_data.py --videos N`): "which way does the
  shape move?" over a video, multiple choice A-D scored like SYNTH_SHAPES. Its `video` column
  is a file path relative to the TSV's folder (VLMEvalKit's video benchmarks keep files beside
  the TSV too); the prompt is the video followed by the multiple-choice text.
The SYNTH_VAL_<NAME> keys are aliases reading SYNTH_<NAME>.tsv when no SYNTH_VAL_<NAME>.tsv exists.
"""
from __future__ import annotations

import os
from pathlib import Path

from eval.benchmarks.base import ChoiceBenchmark, VQABenchmark
from eval.prompts import mcq_text


class SynthChart(VQABenchmark):
    key = 'SYNTH_CHART'
    data_key = 'SYNTH_CHART'
    method = 'relaxed_accuracy'


class SynthDoc(VQABenchmark):
    key = 'SYNTH_DOC'
    data_key = 'SYNTH_DOC'
    method = 'anls'


class SynthShapes(ChoiceBenchmark):
    key = 'SYNTH_SHAPES'
    data_key = 'SYNTH_SHAPES'


class SynthVideo(ChoiceBenchmark):
    key = 'SYNTH_VIDEO'
    data_key = 'SYNTH_VIDEO'
    data_columns = ('index', 'video', 'question', 'answer', 'A', 'B')

    def load(self, data_root=None, path=None, split=None):
        path = Path(path) if path is not None else self.data_path(data_root)
        records = super().load(path=path, split=split)
        for record in records:
            record['video'] = os.path.normpath(path.parent / str(record['video']))
        return records

    def build_prompt(self, record, image_dir=None):
        return [{'type': 'video', 'value': record['video']}, {'type': 'text', 'value': mcq_text(record)}]
