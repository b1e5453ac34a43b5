"""Per-question hits -> the aggregate tables VLMEvalKit reports.

- vqa_table: ImageVQADataset.evaluate. With a `split` column: one score per split plus
  'Overall' (categories are then ignored); without: 'Overall' plus one score per sorted
  category. Scores are mean hit x 100 (not rounded: upstream calls DataFrame.round without
  keeping the result).
- choice_table: multiple_choice.report_acc. Fractions in [0, 1]: 'Overall', then every
  sorted 'l2-category' value, then every sorted 'category' value (MMBench ability names
  abbreviated). Upstream returns one row per split (split 'none' when the data has none);
  here a single 'none' row is returned flat and several splits as {split: row}.

Means use numpy (as upstream) so floats are bit-identical; an empty group gives None.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

NO_SPLIT = 'none'
MMBENCH_ABBREVIATIONS = {
    'coarse_perception': 'CP',
    'finegrained_perception (instance-level)': 'FP-S',
    'finegrained_perception (cross-instance)': 'FP-C',
    'logic_reasoning': 'LR',
    'relation_reasoning': 'RR',
    'attribute_reasoning': 'AR',
}


def mean_or_none(values) -> float | None:
    values = list(values)
    if not values:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        value = float(np.mean(values))
    return None if math.isnan(value) else value


def _sorted_groups(values) -> list:
    # Upstream sorts set(values); str() keeps a mixed or numeric column sortable.
    return sorted(set(values), key=lambda v: (str(type(v)), v))


def vqa_table(hits: list[float], splits: list | None = None, categories: list | None = None) -> dict:
    table = {}
    if splits is not None:
        for split in _sorted_groups(splits):
            table[str(split)] = _scaled(mean_or_none(h for h, s in zip(hits, splits) if s == split))
        table['Overall'] = _scaled(mean_or_none(hits))
        return table
    table['Overall'] = _scaled(mean_or_none(hits))
    if categories is not None:
        for category in _sorted_groups(categories):
            table[str(category)] = _scaled(mean_or_none(h for h, c in zip(hits, categories) if c == category))
    return table


def _scaled(value):
    return None if value is None else value * 100


def choice_table(hits: list[int], splits: list | None = None, l2_categories: list | None = None,
                 categories: list | None = None) -> dict:
    split_values = splits if splits is not None else [NO_SPLIT] * len(hits)
    rows = {}
    for split in _sorted_groups(split_values):
        in_split = [s == split for s in split_values]
        row = {'Overall': mean_or_none(h for h, keep in zip(hits, in_split) if keep)}
        for groups in (l2_categories, categories):
            if groups is None:
                continue
            for group in _sorted_groups(groups):
                name = MMBENCH_ABBREVIATIONS.get(group, group)
                row[str(name)] = mean_or_none(
                    h for h, g, keep in zip(hits, groups, in_split) if keep and g == group)
        rows[str(split)] = row
    if list(rows) == [NO_SPLIT]:
        return rows[NO_SPLIT]
    return rows
