"""VQA-family metrics against hand-computed VLMEvalKit values, quirks included."""
import pytest

from eval.metrics.vqa import (anls, answer_list, normalize_vqa_answer, normalized_edit_distance,
                              process_punctuation, relaxed_accuracy, relaxed_correctness, vqa_accuracy)


# ------------------------------------------------------------------ ANLS
def test_anls_exactly_half_is_kept():
    # "ab" vs "a": distance 1 / max length 2 = 0.5 -> similarity 0.5, not < 0.5, kept.
    assert anls('a', ['ab']) == 0.5
    assert anls('ab', ['abcd']) == 0.5


def test_anls_just_below_half_scores_zero():
    # "abcdefg" vs "abc": 4 / 7 -> similarity 3/7 = 0.428... < 0.5 -> 0.
    assert anls('abc', ['abcdefg']) == 0.0
    # one more matching character: 3 / 7 -> similarity 4/7 kept.
    assert anls('abcd', ['abcdefg']) == pytest.approx(4 / 7)


def test_anls_denominator_is_raw_length():
    # Normalised strings "a" vs "ab": distance 1. Raw lengths 5 ("  a  ") and 2 -> 1/5.
    assert normalized_edit_distance('ab', '  a  ') == pytest.approx(0.2)
    assert anls('  a  ', ['ab']) == pytest.approx(0.8)
    # A normalised-length denominator would have given 1/2 -> 0.5; it must not.
    assert anls('  a  ', ['ab']) != 0.5


def test_anls_upper_length_quirk_and_case_insensitivity():
    # len('ß'.upper()) == 2: distance 1 over 2 -> 0.5, kept.
    assert anls('s', ['ß']) == 0.5
    assert anls('HELLO   World', ['hello world']) == 1 - 0 / 13  # spaces collapse, case folds


def test_anls_takes_best_gold_answer():
    assert anls('1999', ['nineteen ninety-nine', '1999']) == 1.0
    assert anls('', ['']) == 1.0  # both empty: distance 0, length 0 -> 0.0 distance


# ------------------------------------------------------------------ relaxed accuracy
def test_relaxed_exactly_five_percent_and_just_over():
    assert relaxed_correctness('100', '105') is True
    assert relaxed_correctness('20', '21') is True         # 1/20 == 0.05 exactly in floating point
    assert relaxed_correctness('100', '105.01') is False
    assert relaxed_correctness('100', '94.9') is False


def test_relaxed_zero_target_falls_back_to_strings():
    assert relaxed_correctness('0', '0') is True
    assert relaxed_correctness('0', '0.0') is False         # no tolerance and no numeric compare at 0
    assert relaxed_correctness('0', '0.001') is False


def test_relaxed_percentages():
    assert relaxed_correctness('0.5', '50%') is True
    assert relaxed_correctness('50%', '0.5') is True
    assert relaxed_correctness('50', '50%') is False        # 0.5 vs 50


def test_relaxed_nothing_else_is_stripped():
    assert relaxed_accuracy('Yes.', ['Yes']) == 0.0         # trailing '.' kept
    assert relaxed_accuracy('$12', ['12']) == 0.0           # '$' kept, not numeric
    assert relaxed_accuracy('1,200', ['1200']) == 0.0
    assert relaxed_accuracy('12.', ['12']) == 1.0           # float('12.') parses
    assert relaxed_accuracy(' yes \n', ['Yes']) == 1.0      # prediction stripped, case folded
    assert relaxed_accuracy('Yes', ['Yes ']) == 0.0         # gold answers are not stripped


def test_relaxed_max_over_answers():
    assert relaxed_accuracy('7', ['seven', '7.2']) == 1.0   # |7 - 7.2| / 7.2 = 0.0277


# ------------------------------------------------------------------ VQA accuracy (TextVQA)
def test_vqa_number_words_articles_contractions_punctuation():
    assert normalize_vqa_answer('Two') == '2'
    assert normalize_vqa_answer('none') == '0'
    assert normalize_vqa_answer('The Dog') == 'dog'
    assert normalize_vqa_answer('dont') == "don't"
    assert normalize_vqa_answer('hello, world!') == 'hello world'
    assert normalize_vqa_answer('e.g.\tstop.') == 'eg stop'
    assert normalize_vqa_answer('3.5 cm') == '3.5 cm'       # '.' before a digit stays
    assert normalize_vqa_answer('1,000') == '1000'          # digit comma: punctuation removed
    assert normalize_vqa_answer('x-ray') == 'x ray'         # no space around '-': becomes a space
    assert normalize_vqa_answer('x-ray - film') == 'xray film'  # ' -' somewhere: every '-' removed


def test_period_strip_count_quirk():
    # re.sub(..., re.UNICODE) passes count=32: only 32 of 40 periods are removed.
    assert process_punctuation('.' * 40) == '.' * 8


def test_vqa_accuracy_leave_one_out():
    assert vqa_accuracy('two', ['2'] * 10) == 1.0
    assert vqa_accuracy('a dog', ['dog'] * 10) == 1.0
    # 2 of 10 annotators said red: gold "red" sets see 1 other -> 1/3, blue sets see 2 -> 2/3.
    assert vqa_accuracy('red', ['red'] * 2 + ['blue'] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy('Two', ['2'] * 3 + ['two dogs'] * 7) == pytest.approx(0.9)
    assert vqa_accuracy('cat', ['dog'] * 10) == 0.0


def test_answer_list_parses_list_literals_only():
    assert answer_list("['a', 'b']") == ['a', 'b']
    assert answer_list(['x', 3]) == ['x', '3']
    assert answer_list('[citation needed]') == ['[citation needed]']
    assert answer_list(None) == ['nan']                      # str(NaN), as VLMEvalKit sees it
    assert answer_list(2.0) == ['2.0']
