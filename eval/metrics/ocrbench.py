"""OCRBench scoring as VLMEvalKit's OCRBench.evaluate computes it.

Each of the 1000 questions is worth one point. A prediction scores when any gold answer
is a substring of it: case-insensitively after strip + newline->space for nine categories;
for 'Handwritten Mathematical Expression Recognition' case-sensitively with all spaces and
newlines removed (LaTeX is case- but not space-sensitive). The ten categories are reported
in five groups; 'Final Score' is the point total and 'Final Score Norm' that total / 10.
nvidia-vlmeval 26.3 reports every category and group as {'sum': points, 'count': questions}
instead (eval.vlmevalkit_versions: ocrbench_sum_count).
"""
from __future__ import annotations

from eval.metrics.vqa import answer_list, as_text
from eval.vlmevalkit_versions import get_version

HANDWRITTEN_MATH = 'Handwritten Mathematical Expression Recognition'
TEXT_RECOGNITION_CATEGORIES = (
    'Regular Text Recognition',
    'Irregular Text Recognition',
    'Artistic Text Recognition',
    'Handwriting Recognition',
    'Digit String Recognition',
    'Non-Semantic Text Recognition',
)
OCRBENCH_CATEGORIES = TEXT_RECOGNITION_CATEGORIES + (
    'Scene Text-centric VQA',
    'Doc-oriented VQA',
    'Key Information Extraction',
    HANDWRITTEN_MATH,
)
# Reported groups, in upstream's key order.
OCRBENCH_GROUPS = {
    'Text Recognition': TEXT_RECOGNITION_CATEGORIES,
    'Scene Text-centric VQA': ('Scene Text-centric VQA',),
    'Doc-oriented VQA': ('Doc-oriented VQA',),
    'Key Information Extraction': ('Key Information Extraction',),
    HANDWRITTEN_MATH: (HANDWRITTEN_MATH,),
}


def ocrbench_hit(prediction, answers, category: str) -> int:
    prediction = as_text(prediction)
    golds = answer_list(answers)
    if category == HANDWRITTEN_MATH:
        predicted = prediction.strip().replace('\n', ' ').replace(' ', '')
        return int(any(g.strip().replace('\n', ' ').replace(' ', '') in predicted for g in golds))
    predicted = prediction.lower().strip().replace('\n', ' ')
    return int(any(g.lower().strip().replace('\n', ' ') in predicted for g in golds))


def ocrbench_scores(records: list[dict], source: str = 'predictions', version=None) -> dict:
    """Points per group plus 'Final Score' and 'Final Score Norm' (upstream's dict)."""
    per_category = {c: 0 for c in OCRBENCH_CATEGORIES}
    questions = {c: 0 for c in OCRBENCH_CATEGORIES}
    for row, record in enumerate(records):
        category = record.get('category')
        if category not in per_category:
            raise ValueError(
                f"{source}: row {row} has OCRBench category {category!r}; expected one of "
                f"{list(OCRBENCH_CATEGORIES)}")
        per_category[category] += ocrbench_hit(record.get('prediction'), record.get('answer'), category)
        questions[category] += 1
    if get_version(version).ocrbench_sum_count:
        return _sum_count_table(per_category, questions)
    result = {group: sum(per_category[c] for c in members) for group, members in OCRBENCH_GROUPS.items()}
    result['Final Score'] = sum(result[g] for g in OCRBENCH_GROUPS)
    result['Final Score Norm'] = float(result['Final Score']) / 10
    return result


def _sum_count_table(points: dict, questions: dict) -> dict:
    """The older report: each category, then 'Text Recognition', 'Final Score' as points + counts."""
    table = {c: {'sum': points[c], 'count': questions[c]} for c in OCRBENCH_CATEGORIES}
    table['Text Recognition'] = {'sum': sum(points[c] for c in TEXT_RECOGNITION_CATEGORIES),
                                 'count': sum(questions[c] for c in TEXT_RECOGNITION_CATEGORIES)}
    total = sum(points.values())
    table['Final Score'] = {'sum': total, 'count': sum(questions.values())}
    table['Final Score Norm'] = {'sum': float(total) / 10, 'count': None}
    return table
