"""Synthetic validation sets exported by data/synthetic.py as VLMEvalKit-style TSVs.

- SYNTH_CHART.tsv: chart questions, scored like ChartQA (relaxed accuracy, x100).
- SYNTH_DOC.tsv: document questions, scored like DocVQA (ANLS, x100).
- SYNTH_SHAPES.tsv: multiple choice with options A-D, scored like MMStar / AI2D (fractions).
Columns: index, image (base64 PNG), question, answer, category (+ A, B, C, D). Results are
split by `category` exactly as VLMEvalKit splits any benchmark that has that column.
The SYNTH_VAL_<NAME> keys are aliases reading SYNTH_<NAME>.tsv when no SYNTH_VAL_<NAME>.tsv exists.
"""
from __future__ import annotations

from eval.benchmarks.base import ChoiceBenchmark, VQABenchmark


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
