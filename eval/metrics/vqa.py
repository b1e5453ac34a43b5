"""Open-ended VQA metrics as VLMEvalKit computes them (vlmeval/dataset/utils/vqa_eval.py).

Three per-question scores and the rule that turns per-answer matches into one hit:

- VQA accuracy (TextVQA, and VLMEvalKit's default): the answer normalisation of the
  official VQA evaluation (punctuation, number words, articles, contractions), then
  min(1, #other annotators agreeing / 3) averaged over the leave-one-out answer sets.
- ANLS (DocVQA, InfoVQA): 1 - edit distance / length, thresholded at 0.5 and maximised over
  the gold answers.
- Relaxed accuracy (ChartQA): 5% relative tolerance for numbers, exact string otherwise,
  maximised over the gold answers.

Quirks that change numbers are kept on purpose (each is marked "quirk" below), because the
point of this module is that our scores equal VLMEvalKit's for the same predictions. Rules that
differ between VLMEvalKit versions take a `version` (eval.vlmevalkit_versions; default: main).
"""
from __future__ import annotations

import ast
import re

import numpy as np

from eval.vlmevalkit_versions import get_version

# The punctuation characters of the VQA evaluation; order matters (see process_punctuation).
_PUNCTUATION = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-',
                '>', '<', '@', '`', ',', '?', '!']
_COMMA_BETWEEN_DIGITS = re.compile(r'(\d)(,)(\d)')
# The period pattern is the version's (period_pattern): main deletes a '.' with no digit on either
# side; older snapshots every '.' not followed by a digit (their "(?!<=\d)" typo).
# quirk, in every version: upstream calls periodStrip.sub("", text, re.UNICODE); the third positional
# argument of Pattern.sub is `count`, and re.UNICODE == 32, so at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

_NUMBER_WORDS = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
    'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10',
}
_ARTICLES = ('a', 'an', 'the')

# The contraction table of the official VQA evaluation (data, kept verbatim in content:
# the mixed-case keys such as "Im" can never match lower-cased words; that is upstream's).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def as_text(value) -> str:
    """str(x) as VLMEvalKit applies it to a pandas cell: a missing cell (NaN) becomes 'nan'."""
    if value is None:
        return 'nan'
    if isinstance(value, float) and value != value:
        return 'nan'
    return str(value)


def answer_list(answer) -> list[str]:
    """The gold answers of one row: a list, or a string holding a Python list literal
    (VLMEvalKit's istype(x, list) + eval), else the single answer."""
    if isinstance(answer, (list, tuple)):
        return [as_text(a) for a in answer]
    text = as_text(answer)
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return [text]
    if isinstance(parsed, list):
        return [as_text(a) for a in parsed]
    return [text]


def process_punctuation(text: str, version=None) -> str:
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        # The test looks at the original text, not at `out` (upstream behaviour).
        if (p + ' ' in text or ' ' + p in text) or has_digit_comma:
            out = out.replace(p, '')
        else:
            out = out.replace(p, ' ')
    return get_version(version).period_pattern.sub('', out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return ' '.join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str, version=None) -> str:
    """VLMEvalKit's process_answer: whitespace, punctuation, digits/articles/contractions."""
    answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
    return process_digit_article(process_punctuation(answer, version))


def vqa_accuracy(prediction: str, answers: list[str], version=None) -> float:
    """Leave-one-out VQA accuracy: mean over i of min(1, #(j != i with gt_j == pred) / 3)."""
    gts = [normalize_vqa_answer(a, version) for a in answers]
    pred = normalize_vqa_answer(prediction, version)
    per_set = []
    for i in range(len(gts)):
        agreeing = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        per_set.append(min(1, agreeing / 3))
    # numpy's pairwise mean, as upstream (np.mean), so the float is bit-identical.
    return float(np.mean(per_set))


def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        current = [j + 1]
        for i, ca in enumerate(a):
            if ca == cb:
                current.append(previous[i])
            else:
                current.append(1 + min(previous[i], previous[i + 1], current[-1]))
        previous = current
    return previous[-1]


def normalized_edit_distance(gold: str, prediction: str) -> float:
    """Edit distance of the lower-cased, whitespace-collapsed strings divided by the longer
    RAW length (quirk: len(s.upper()) of the strings before normalisation, so surrounding
    spaces or newlines in a prediction enlarge the denominator)."""
    gold_norm = ' '.join(gold.strip().lower().split())
    pred_norm = ' '.join(prediction.strip().lower().split())
    distance = levenshtein(gold_norm, pred_norm)
    length = max(len(gold.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else distance / length


def anls(prediction: str, answers: list[str], version=None, threshold: float = 0.5) -> float:
    """Per-question ANLS: best similarity over the gold answers; below `threshold` -> 0,
    exactly `threshold` is kept (upstream tests `similarity < threshold`). The same in every
    version we reproduce."""
    similarity = 1 - min(normalized_edit_distance(a, prediction) for a in answers)
    return 0.0 if similarity < threshold else similarity


def _to_float(text: str):
    try:
        if text.endswith('%'):
            return float(text.rstrip('%')) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed match: |p - t| / |t| <= 5% when both parse as numbers and t != 0
    (a trailing '%' divides by 100); otherwise case-insensitive string equality. Nothing
    else is stripped: '$12', '1,200' or 'Yes.' do not parse / do not equal '12', '1200',
    'Yes' (Python's float() does accept '12.' and surrounding whitespace)."""
    prediction_value = _to_float(prediction)
    target_value = _to_float(target)
    if prediction_value is not None and target_value:
        return abs(prediction_value - target_value) / abs(target_value) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: list[str], version=None) -> float:
    """Per-question ChartQA hit: the prediction is stripped, the gold answers are not. Older
    snapshots call relaxed_correctness(prediction, target): the tolerance is then relative to
    the prediction and a zero prediction (not target) falls back to string comparison."""
    prediction = prediction.strip()
    if get_version(version).relaxed_target_first:
        return float(max(relaxed_correctness(a, prediction) for a in answers))
    return float(max(relaxed_correctness(prediction, a) for a in answers))


def exact_accuracy(prediction: str, answers: list[str], version=None) -> float:
    """OCRVQA/GQA-style exact match (stripped, case-insensitive), max over gold answers;
    also the documented no-judge fallback for SimpleVQA."""
    pred = prediction.strip().lower()
    return float(max(a.strip().lower() == pred for a in answers))


# Method name -> per-question scorer (prediction, gold answers, version) -> hit in [0, 1].
VQA_METHODS = {
    'vqa_score': vqa_accuracy,
    'anls': anls,
    'relaxed_accuracy': relaxed_accuracy,
    'accuracy': exact_accuracy,
}
