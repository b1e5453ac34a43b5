"""OCRBench points and multiple-choice extraction against hand-computed VLMEvalKit results."""
import pytest

from eval.benchmarks import get_benchmark
from eval.metrics.aggregate import choice_table, vqa_table
from eval.metrics.choice import can_infer, choice_hit, extract_choice, mmmu_open_as_choice
from eval.metrics.ocrbench import HANDWRITTEN_MATH, OCRBENCH_CATEGORIES, ocrbench_hit, ocrbench_scores

# OCRBench's composition: 6 x 50 text recognition, 200 + 200 + 200 VQA/KIE, 100 handwritten math.
OCRBENCH_SIZES = dict(zip(OCRBENCH_CATEGORIES, [50] * 6 + [200, 200, 200, 100]))


def test_ocrbench_handwritten_math_is_case_sensitive_without_spaces():
    assert ocrbench_hit('$\\frac{a} {b}$', "['\\\\frac{a}{b}']", HANDWRITTEN_MATH) == 1
    assert ocrbench_hit('x\n+ y', ['x+y'], HANDWRITTEN_MATH) == 1
    assert ocrbench_hit('\\FRAC{a}{b}', ['\\frac{a}{b}'], HANDWRITTEN_MATH) == 0


def test_ocrbench_other_categories_are_case_insensitive_substrings():
    assert ocrbench_hit('The sign says HELLO world', ['Hello'], 'Regular Text Recognition') == 1
    assert ocrbench_hit('foo\nbar', ['foo bar'], 'Doc-oriented VQA') == 1
    assert ocrbench_hit('foobar', ['foo bar'], 'Doc-oriented VQA') == 0   # spaces matter here
    assert ocrbench_hit('x + y', ['x+y'], 'Scene Text-centric VQA') == 0
    assert ocrbench_hit('none of these', ['abc', 'NONE'], 'Key Information Extraction') == 1


def _ocrbench_records(correct_per_category):
    records = []
    for category, size in OCRBENCH_SIZES.items():
        for i in range(size):
            right = i < correct_per_category.get(category, size)
            records.append({'category': category, 'answer': "['tok']", 'prediction': 'tok' if right else 'no'})
    return records


def test_ocrbench_thousand_point_total_and_groups():
    perfect = ocrbench_scores(_ocrbench_records({}))
    assert perfect == {
        'Text Recognition': 300, 'Scene Text-centric VQA': 200, 'Doc-oriented VQA': 200,
        'Key Information Extraction': 200, HANDWRITTEN_MATH: 100, 'Final Score': 1000, 'Final Score Norm': 100.0}
    partial = ocrbench_scores(_ocrbench_records({'Regular Text Recognition': 10, 'Doc-oriented VQA': 150,
                                                 HANDWRITTEN_MATH: 33}))
    assert partial['Text Recognition'] == 260
    assert partial['Doc-oriented VQA'] == 150
    assert partial['Final Score'] == 260 + 200 + 150 + 200 + 33
    assert partial['Final Score Norm'] == pytest.approx(84.3)
    assert get_benchmark('OCRBench').headline(partial) == pytest.approx(84.3)


def test_ocrbench_unknown_category_names_row_and_valid_ones():
    with pytest.raises(ValueError, match=r"preds.jsonl: row 0 has OCRBench category 'Poetry'; expected one of"):
        ocrbench_scores([{'category': 'Poetry', 'answer': ['a'], 'prediction': 'a'}], 'preds.jsonl')


CHOICES = {'A': 'ball', 'B': 'cube', 'C': 'cone', 'D': 'pyramid'}


@pytest.mark.parametrize('prediction, expected', [
    ('C', 'C'),
    ('(B)', 'B'),
    ('The answer is C', 'C'),
    ('Looking at the image, the object has flat square faces, so the correct choice is B.', 'B'),
    # several letters: the "answer is X" phrase decides
    ('The answer is C because A is too small and D is wrong', 'C'),
    ('the answer is **b**.', 'B'),                      # the phrase is case-insensitive
    ('cube', 'B'),                                      # option text instead of a letter
    ('A or B', 'Z'),                                    # several letters, no phrase -> no answer
    ('Sorry, I can\'t help with images of people yet.', 'Z'),
    ('Cannot determine the answer from this picture', 'Z'),
    # the single letter is the first of many tokens -> not taken; text too long -> no answer
    ('B is wrong because the object in the picture is clearly a round red ball', 'Z'),
    ('it is a cube or a cone', 'Z'),                    # two option texts -> ambiguous
    ('Z', 'Z'),
    ('', 'Z'),
])
def test_choice_extraction(prediction, expected):
    assert extract_choice(prediction, dict(CHOICES)) == expected


def test_can_infer_text_length_guard():
    # 2 * (3 + 4) = 14 characters allowed.
    assert can_infer('a red ball', {'A': 'red', 'B': 'blue'}) == 'A'
    assert can_infer('it might be a red one', {'A': 'red', 'B': 'blue'}) is None


def test_api_failure_is_not_an_answer():
    assert can_infer('Failed to obtain answer via API. A', {'A': 'x', 'B': 'y'}) is None


def test_mmmu_open_question_becomes_two_options():
    record = {'question': 'What is x?', 'A': None, 'answer': '42', 'prediction': 'The value is 42'}
    converted = mmmu_open_as_choice(record)
    assert converted['A'] == '42' and converted['B'] == 'Other Answers'
    assert choice_hit(record, mmmu=True) == 1
    assert choice_hit({**record, 'prediction': '17'}, mmmu=True) == 0
    assert choice_hit({**record, 'prediction': 'A'}, mmmu=True) == 1     # the letter of the gold option counts
    assert choice_hit({**record, 'prediction': 'Other Answers'}, mmmu=True) == 0
    # multiple-choice MMMU rows are untouched
    mc = {'question': 'q', 'A': 'x', 'B': 'y', 'answer': 'B', 'prediction': 'B'}
    assert choice_hit(mc, mmmu=True) == 1


def test_choice_table_matches_report_acc_layout():
    hits = [1, 0, 1, 1]
    table = choice_table(hits, None, ['perception', 'perception', 'reasoning', 'reasoning'],
                         ['color', 'shape', 'logic', 'logic'])
    assert table == {'Overall': 0.75, 'perception': 0.5, 'reasoning': 1.0, 'color': 1.0, 'logic': 1.0, 'shape': 0.0}
    assert list(table) == ['Overall', 'perception', 'reasoning', 'color', 'logic', 'shape']
    by_split = choice_table(hits, ['dev', 'validation', 'validation', 'validation'], None, ['a', 'a', 'b', 'b'])
    assert by_split == {'dev': {'Overall': 1.0, 'a': 1.0, 'b': None},
                        'validation': {'Overall': 2 / 3, 'a': 0.0, 'b': 1.0}}
    assert get_benchmark('MMMU_DEV_VAL').headline(by_split) == pytest.approx(200 / 3)


def test_vqa_table_split_or_categories():
    assert vqa_table([1.0, 0.0, 1.0], ['test_human', 'test_augmented', 'test_human'], ['x', 'y', 'z']) == {
        'test_augmented': 0.0, 'test_human': 100.0, 'Overall': pytest.approx(200 / 3)}
    assert vqa_table([1.0, 0.5], None, ['b', 'a']) == {'Overall': 75.0, 'a': 50.0, 'b': 100.0}
