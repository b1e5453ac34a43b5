"""VLMEvalKit-exact scoring functions (judge `exact_matching`); see docs/eval.md."""
from eval.metrics.aggregate import choice_table, vqa_table
from eval.metrics.choice import (build_choices, can_infer, can_infer_option, can_infer_text, choice_hit,
                                 extract_choice, mmmu_gold_letter, mmmu_open_as_choice)
from eval.metrics.ocrbench import OCRBENCH_CATEGORIES, OCRBENCH_GROUPS, ocrbench_hit, ocrbench_scores
from eval.metrics.vqa import (VQA_METHODS, anls, answer_list, as_text, exact_accuracy, normalize_vqa_answer,
                              normalized_edit_distance, process_digit_article, process_punctuation,
                              relaxed_accuracy, relaxed_correctness, vqa_accuracy)

__all__ = [
    'VQA_METHODS', 'OCRBENCH_CATEGORIES', 'OCRBENCH_GROUPS', 'anls', 'answer_list', 'as_text', 'build_choices',
    'can_infer', 'can_infer_option', 'can_infer_text', 'choice_hit', 'choice_table', 'exact_accuracy',
    'extract_choice', 'mmmu_gold_letter', 'mmmu_open_as_choice', 'normalize_vqa_answer',
    'normalized_edit_distance', 'ocrbench_hit', 'ocrbench_scores', 'process_digit_article',
    'process_punctuation', 'relaxed_accuracy', 'relaxed_correctness', 'vqa_accuracy', 'vqa_table',
]
