"""Each scoring rule that differs between VLMEvalKit versions, shown on the smallest input that tells them apart."""
import pytest

from eval.benchmarks import get_benchmark
from eval.metrics import extract_choice, normalize_vqa_answer, relaxed_accuracy, vqa_accuracy
from eval.vlmeval_files import read_vlmeval_predictions, vlmeval_round_trip, write_vlmeval_predictions
from eval.vlmevalkit_versions import VERSIONS, UnknownVersionError, get_version

MAIN, MS, NV = 'main', 'ms-vlmeval-0.0.20', 'nvidia-vlmeval-26.3'
CHOICES = {'A': 'cat', 'B': 'dog', 'C': 'bird', 'D': 'fish'}


def test_unknown_version_lists_the_valid_ones():
    with pytest.raises(UnknownVersionError, match=f"unknown VLMEvalKit version 'latest'; valid: {', '.join(VERSIONS)}"):
        get_version('latest')
    assert get_version(None).name == MAIN


def test_period_after_a_digit():
    # main / ms-vlmeval: a '.' next to a digit stays; nvidia-vlmeval's look-ahead typo deletes it.
    assert normalize_vqa_answer('3.', MAIN) == normalize_vqa_answer('3.', MS) == '3.'
    assert normalize_vqa_answer('3.', NV) == '3'
    assert vqa_accuracy('3.', ['3'] * 10, MAIN) == 0.0 and vqa_accuracy('3.', ['3'] * 10, NV) == 1.0


def test_answer_is_rule_only_upstream():
    prediction = 'I think the answer is c, really'
    assert extract_choice(prediction, CHOICES, MAIN) == 'C'
    assert extract_choice(prediction, CHOICES, MS) == 'Z' and extract_choice(prediction, CHOICES, NV) == 'Z'


def test_option_letter_window_absent_from_nvidia():
    prediction = 'B is what I would pick after looking at the whole picture'
    assert extract_choice(prediction, CHOICES, MAIN) == extract_choice(prediction, CHOICES, MS) == 'Z'
    assert extract_choice(prediction, CHOICES, NV) == 'B'


def test_option_text_length_guard_absent_from_nvidia():
    prediction = 'there is a dog ' + 'and a lot of other words around it ' * 3
    assert extract_choice(prediction, CHOICES, MAIN) == extract_choice(prediction, CHOICES, MS) == 'Z'
    assert extract_choice(prediction, CHOICES, NV) == 'B'


def test_relaxed_correctness_argument_order():
    # Tolerance relative to the target (main, ms) or to the prediction (nvidia: arguments swapped).
    assert relaxed_accuracy('105', ['100'], MAIN) == 1.0 and relaxed_accuracy('105', ['100'], NV) == 1.0
    assert relaxed_accuracy('95.1', ['100'], MAIN) == 1.0 and relaxed_accuracy('95.1', ['100'], NV) == 0.0


def test_ocrbench_report_shape():
    rows = [{'index': 1, 'prediction': 'Hello', 'answer': "['hello']", 'category': 'Regular Text Recognition'},
            {'index': 2, 'prediction': 'x', 'answer': "['y']", 'category': 'Doc-oriented VQA'}]
    main = get_benchmark('OCRBench', MAIN).score(rows)
    assert main['Text Recognition'] == 1 and main['Final Score'] == 1 and main['Final Score Norm'] == 0.1
    old = get_benchmark('OCRBench', NV).score(rows)
    assert old['Regular Text Recognition'] == {'sum': 1, 'count': 1}
    assert old['Doc-oriented VQA'] == {'sum': 0, 'count': 1}
    assert old['Final Score'] == {'sum': 1, 'count': 2} and old['Final Score Norm'] == {'sum': 0.1, 'count': None}
    assert get_benchmark('OCRBench', NV).headline(old) == get_benchmark('OCRBench').headline(main) == 0.1


def test_prediction_file_round_trip(tmp_path):
    rows = [{'index': i, 'answer': a, 'prediction': p} for i, (a, p) in
            enumerate([('7', '007'), ('3.5', '3.50'), ('2', '2')])]
    # An all-numeric prediction column comes back as floats, from .xlsx and from .tsv.
    assert [r['prediction'] for r in vlmeval_round_trip(rows)] == [7.0, 3.5, 2.0]
    assert [r['prediction'] for r in vlmeval_round_trip(rows, suffix='.tsv')] == [7.0, 3.5, 2.0]
    mixed = rows + [{'index': 3, 'answer': '1', 'prediction': 'None'}, {'index': 4, 'answer': '1', 'prediction': '=1+1'}]
    # Mixed: strings stay, NA strings become missing; '=' starts a formula in the index snapshots' .xlsx.
    assert [r['prediction'] for r in vlmeval_round_trip(mixed, MAIN)] == ['007', '3.50', '2', None, '=1+1']
    # ... whose cached value 0 then makes the whole column numeric.
    assert [r['prediction'] for r in vlmeval_round_trip(mixed, MS)] == [7.0, 3.5, 2.0, None, 0.0]
    # Whole-number floats come back from .xlsx as ints.
    assert [r['answer'] for r in vlmeval_round_trip([{'answer': 3.0}, {'answer': 2.5}])] == [3, 2.5]
    path = write_vlmeval_predictions(mixed, tmp_path / 'm_DocVQA_VAL.xlsx', MAIN)
    assert read_vlmeval_predictions(path) == vlmeval_round_trip(mixed, MAIN)
