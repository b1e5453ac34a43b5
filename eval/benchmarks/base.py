"""What every benchmark provides: load, build_prompt, score, headline.

Three scoring families mirror VLMEvalKit's dataset classes: VQABenchmark
(ImageVQADataset.evaluate), ChoiceBenchmark (ImageMCQDataset.evaluate with
exact_matching) and the OCRBench / SimpleVQA classes in their own files. A benchmark scores
as one VLMEvalKit version does (`version`, eval.vlmevalkit_versions; default: main);
`row_hits` gives the per-question hits behind the aggregates.
"""
from __future__ import annotations

from pathlib import Path

from eval.data import DataError, records_from_hf, records_from_tsv, require_columns
from eval.metrics.aggregate import choice_table, vqa_table
from eval.metrics.choice import choice_hit
from eval.metrics.vqa import VQA_METHODS, answer_list, as_text
from eval.prompts import mcq_prompt, vqa_prompt
from eval.vlmevalkit_versions import get_version


class Benchmark:
    """One benchmark key. Subclasses set the class attributes and may override methods."""

    key: str = ''
    data_key: str = ''             # file stem under the data root when it differs from key
    data_columns: tuple = ('index', 'question', 'answer')   # required in the benchmark data
    score_columns: tuple = ('answer',)                       # required (with prediction) to score

    def __init__(self, key: str | None = None, version=None):
        self.key = key or self.key
        self.version = get_version(version)

    # ------------------------------------------------------------------ data
    def data_path(self, data_root) -> Path:
        """<root>/<KEY>.tsv, else <root>/<KEY>.parquet or <root>/<KEY>/ (HF layouts)."""
        root = Path(data_root)
        stems = [self.key] + ([self.data_key] if self.data_key and self.data_key != self.key else [])
        for stem in stems:
            for candidate in (root / f'{stem}.tsv', root / f'{stem}.parquet', root / stem):
                if candidate.exists():
                    return candidate
        raise DataError(f'{self.key}: no data under {root} (looked for '
                        f"{', '.join(f'{s}.tsv, {s}.parquet, {s}/' for s in stems)})")

    def load(self, data_root=None, path=None, split: str | None = None) -> list[dict]:
        """Records of this benchmark from a VLMEvalKit TSV or an HF parquet/arrow layout."""
        if path is None:
            if data_root is None:
                raise DataError(f'{self.key}: give data_root (holding {self.key}.tsv) or path')
            path = self.data_path(data_root)
        path = Path(path)
        if path.suffix == '.tsv':
            return records_from_tsv(path, self.key, self.data_columns)
        records = records_from_hf(path, self.key, self.convert_hf_row, split)
        require_columns(records, self.data_columns, path, f'required by {self.key} after HF mapping')
        return records

    def convert_hf_row(self, row: dict, row_number: int) -> dict | None:
        raise DataError(f'{self.key}: no Hugging Face layout is supported; use the VLMEvalKit TSV')

    # ------------------------------------------------------------------ prompt
    def build_prompt(self, record: dict, image_dir=None) -> list[dict]:
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring
    def check_predictions(self, records: list[dict], source) -> None:
        require_columns(records, ('prediction',) + tuple(self.score_columns), source,
                        f'needed to score {self.key}')

    def score(self, records: list[dict], source='predictions') -> dict:
        raise NotImplementedError

    def row_hits(self, records: list[dict], source='predictions') -> list[float]:
        """The per-question hit of every record (what the aggregates average or sum)."""
        raise NotImplementedError

    def headline(self, aggregates: dict) -> float | None:
        """The benchmark's one number on a 0-100 scale (for the summary table)."""
        return aggregates.get('Overall')


def _column(records: list[dict], name: str) -> list | None:
    """The values of a column, or None when no record has it (upstream: `name in data`)."""
    if not any(name in r for r in records):
        return None
    return [r.get(name) for r in records]


class VQABenchmark(Benchmark):
    """ImageVQADataset: single word/phrase prompt; per-question metric chosen by `method`."""

    method: str = 'vqa_score'

    def build_prompt(self, record, image_dir=None):
        return vqa_prompt(record, image_dir, self.version)

    def row_hits(self, records: list[dict], source='predictions') -> list[float]:
        self.check_predictions(records, source)
        metric = VQA_METHODS[self.method]
        return [metric(as_text(r.get('prediction')), answer_list(r.get('answer')), self.version) for r in records]

    def score(self, records, source='predictions'):
        return vqa_table(self.row_hits(records, source), _column(records, 'split'), _column(records, 'category'))


class ChoiceBenchmark(Benchmark):
    """ImageMCQDataset with judge exact_matching: letter extraction, then report_acc."""

    data_columns = ('index', 'question', 'answer', 'A', 'B')
    score_columns = ('index', 'question', 'answer', 'A')
    mmmu: bool = False
    headline_split: str | None = None   # which split's Overall is the headline, if several

    def build_prompt(self, record, image_dir=None):
        return mcq_prompt(record, image_dir, self.version)

    @staticmethod
    def lower_columns(records: list[dict]) -> list[dict]:
        # Upstream lower-cases every column name except the option letters.
        return [{(k if len(k) == 1 and k.isupper() else k.lower()): v for k, v in r.items()} for r in records]

    def row_hits(self, records, source='predictions'):
        records = self.lower_columns(records)
        self.check_predictions(records, source)
        return [choice_hit(r, mmmu=self.mmmu, version=self.version) for r in records]

    def score(self, records, source='predictions'):
        hits = self.row_hits(records, source)
        records = self.lower_columns(records)
        return choice_table(hits, _column(records, 'split'), _column(records, 'l2-category'),
                            _column(records, 'category'))

    def headline(self, aggregates):
        if 'Overall' in aggregates:
            value = aggregates['Overall']
        else:
            split = self.headline_split if self.headline_split in aggregates else sorted(aggregates)[-1]
            value = aggregates[split]['Overall']
        return None if value is None else value * 100
