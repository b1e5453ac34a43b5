"""Multiple-choice answer extraction as VLMEvalKit does it with judge `exact_matching`.

Upstream (vlmeval/utils/matching_util.py + dataset/utils/multiple_choice.py) maps a free-form
prediction to an option letter without any LLM:

1. can_infer_option: a refusal phrase -> 'Z'; else split the prediction on whitespace after
   turning `.()[],:;!*#{}` into spaces; if exactly one option letter occurs as a token and
   it sits among the last tokens (its first position > #tokens - 5) it is the answer; no
   letter but a 'Z' token -> 'Z'; otherwise an "answer is X" phrase (X in A-D, any case).
2. can_infer_text: if the prediction is not longer than twice the total option text, the
   unique option whose text occurs in the lower-cased prediction.
3. Nothing found -> 'Z' (never equal to a gold letter, so a miss).

Three of these rules depend on the VLMEvalKit version (eval.vlmevalkit_versions): the
last-tokens window and the length guard are absent from nvidia-vlmeval 26.3, the "answer is
X" rule from both index snapshots.

MMMU open questions (no option A) become two-option questions: A = the gold answer text,
B = 'Other Answers', gold = 'A'.
"""
from __future__ import annotations

import re
import string

from eval.metrics.vqa import as_text
from eval.vlmevalkit_versions import get_version

OPTION_LETTERS = tuple(string.ascii_uppercase)
NO_ANSWER = 'Z'
MMMU_OTHER_ANSWERS = 'Other Answers'

_API_FAILURE = 'Failed to obtain answer via API'
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    'Cannot determine the answer',
)
_TOKEN_SEPARATORS = '.()[],:;!*#{}'
_ANSWER_IS = re.compile(r'(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**')
# A letter only counts when it is among the last tokens of the prediction (upstream's
# `splits.index(ch) > len(splits) - 5`), so "A" in "A dog is ... so C" is not the pick.
_LAST_TOKENS_WINDOW = 5


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def build_choices(record: dict) -> dict[str, str]:
    """Option letter -> text for every present, non-missing column A..Z (in letter order)."""
    return {
        letter: record[letter]
        for letter in OPTION_LETTERS
        if letter in record and not is_missing(record[letter])
    }


def can_infer_option(answer: str, choices: dict, version=None) -> str | None:
    version = get_version(version)
    if _API_FAILURE in answer:
        return None
    for refusal in _REFUSALS:
        if refusal in answer:
            return NO_ANSWER
    spaced = answer
    for ch in _TOKEN_SEPARATORS:
        spaced = spaced.replace(ch, ' ')
    tokens = spaced.split()
    letters_present = [c for c in choices if c in tokens]
    if len(letters_present) == 1:
        letter = letters_present[0]
        if not version.option_last_tokens or tokens.index(letter) > len(tokens) - _LAST_TOKENS_WINDOW:
            return letter
    elif not letters_present and NO_ANSWER in tokens:
        return NO_ANSWER
    if version.answer_is_rule:
        match = _ANSWER_IS.search(answer)
        if match and match.group(1).upper() in choices:
            return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: dict, version=None) -> str | None:
    answer = answer.lower()
    # A long, rambling prediction mentions many options by accident: give up instead.
    if get_version(version).option_text_length_guard and len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer, choices: dict, version=None) -> str | None:
    answer = as_text(answer)
    return can_infer_option(answer, choices, version) or can_infer_text(answer, choices, version)


def extract_choice(prediction, choices: dict, version=None) -> str:
    """The option letter VLMEvalKit's exact matching reads from `prediction`, or 'Z'."""
    return can_infer(prediction, choices, version) or NO_ANSWER


def mmmu_open_as_choice(record: dict) -> dict:
    """MMMU_preproc: a question without option A becomes 'A. <gold text> / B. Other Answers'."""
    if not is_missing(record.get('A')):
        return record
    converted = dict(record)
    converted['A'] = record.get('answer')
    converted['B'] = MMMU_OTHER_ANSWERS
    return converted


def mmmu_gold_letter(answer) -> str:
    """MMMU's answer map: a gold answer that is not a single capital letter becomes 'A'
    (the gold text was moved into option A by mmmu_open_as_choice)."""
    text = as_text(answer)
    return text if text in OPTION_LETTERS else 'A'


def choice_hit(record: dict, mmmu: bool = False, version=None) -> int:
    """1 when the extracted letter equals the gold letter, else 0."""
    if mmmu:
        record = mmmu_open_as_choice(record)
        gold = mmmu_gold_letter(record.get('answer'))
    else:
        gold = as_text(record.get('answer'))
    return int(extract_choice(record.get('prediction'), build_choices(record), version) == gold)
