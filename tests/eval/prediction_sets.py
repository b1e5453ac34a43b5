"""Generated benchmark data + predictions that probe every scoring rule, for the VLMEvalKit cross-check.

For each benchmark key, `prediction_set(key)` returns (data_rows, predictions): VLMEvalKit-layout
data rows without images (VLMEvalKit's dataset classes and ours both accept that) and one
prediction string per row. Predictions are built from the gold answers by perturbations that
the scorers treat differently: case, punctuation and periods, units, %, thousands separators,
articles and number words, option letters inside sentences, "answer is" phrasings, option text,
refusals, empty and NaN-like strings ('None', 'N/A', 'nan'), formulas ('=...'), zero-padded and
trailing-zero numbers. `numeric_set(key)` is a smaller set whose prediction column is numbers
only (pandas then reads the whole column as floats).
"""
from __future__ import annotations

import random

ROWS = 240
NA_LIKE = ['', 'None', 'N/A', 'nan', 'NA', 'null', '#N/A', 'NULL', 'none']
ODD = ['=1+1', '=A1', '@user', '+3', '-0', '0x10', 'True', 'inf', "['a', 'b']", '_x000D_', 'a\r\nb', ' \t ',
       '.' * 40 + 'x', 'Straße', 'ß', '…', '3.', '3..', '.5', '5.', '1e3', '1,000', '$12', '12%']
WORDS = ['blue', 'Dog', 'the cat', 'x-ray', 'e.g. this', "don't", 'two', 'Hello, World!', 'New York', 'yes', 'No']
NUMBERS = ['0', '3', '7', '12', '0.5', '3.5', '100', '1000', '2019', '42.0', '1,200', '12%', '3.14', '-4']
UNITS = ['12 cm', '3 kg', '$5', '45%', '1.5 m', '2,000 people']

CHOICE_TEXTS = ['cat', 'dog', 'bird', 'fish', 'red', 'blue', 'circle', 'square', '2', '3', '4', '5', 'True', 'None']
MCQ_TEMPLATES = [
    '{L}', '({L})', '{L}.', '{l}', '**{L}**', 'Answer: {L}', 'The answer is {L}', 'the answer is {l}',
    'The correct answer is **{L}**. Here is why.', 'I think the answer is {l} because of the shape',
    '{L} is the one I would choose after looking at the whole image carefully', 'Either {L} or {O}',
    'Option {L}: {T}', '{T}', 'It is {T}.', 'It is a {T} for sure, nothing else in the picture',
    'It looks like a {T} or maybe a {OT} to me', 'I cannot tell', 'Cannot determine the answer',
    "I'm sorry, but without the image provided I cannot answer", 'Failed to obtain answer via API',
    'Z', 'The answer is E', 'answer is {L} and also {O}', '{T} ' + 'with many words around it ' * 4,
]
OCR_CATEGORIES = ['Regular Text Recognition', 'Irregular Text Recognition', 'Artistic Text Recognition',
                  'Handwriting Recognition', 'Digit String Recognition', 'Non-Semantic Text Recognition',
                  'Scene Text-centric VQA', 'Doc-oriented VQA', 'Key Information Extraction',
                  'Handwritten Mathematical Expression Recognition']
VQA_KEYS = ('DocVQA_VAL', 'InfoVQA_VAL', 'TextVQA_VAL', 'ChartQA_TEST')
MCQ_KEYS = ('MMStar', 'AI2D_TEST', 'MMMU_DEV_VAL')


def perturb(gold: str, rng: random.Random) -> str:
    """A prediction derived from a gold answer by one of the perturbations the scorers disagree on."""
    kind = rng.randrange(20)
    if kind == 0:
        return gold
    if kind == 1:
        return gold.upper()
    if kind == 2:
        return gold + '.'
    if kind == 3:
        return f'  {gold}\n'
    if kind == 4:
        return f'The answer is {gold}'
    if kind == 5:
        return 'the ' + gold
    if kind == 6:
        return gold.replace('0', '0,').rstrip(',') if gold.isdigit() else gold.replace(' ', '-')
    if kind == 7:
        try:
            return f'{float(gold.rstrip("%")) * rng.choice([0.96, 1.04, 1.06, 0.94, 0.952, 1.052, 100, 0.01]):g}'
        except ValueError:
            return gold[:-1] if len(gold) > 2 else gold + 's'
    if kind == 8:
        return gold + '%'
    if kind == 9:
        return gold + ' cm'
    if kind == 10:
        return rng.choice(NA_LIKE)
    if kind == 11:
        return rng.choice(ODD)
    if kind == 12:
        return gold.replace('.', '') + '.0' if gold.replace('.', '').isdigit() else gold.title()
    if kind == 13:
        return '0' + gold if gold[:1].isdigit() else gold.lower()
    if kind == 14:
        return rng.choice(WORDS + NUMBERS + UNITS)
    if kind == 15:
        return f'{gold}, {rng.choice(WORDS)}'
    if kind == 16:
        return gold[: max(1, len(gold) // 2)]
    if kind == 17:
        return '\t'.join(gold.split()) or gold
    if kind == 18:
        return '$' + gold
    return f'I believe it is "{gold}"!'


def _vqa_answers(key: str, rng: random.Random) -> tuple[str, str]:
    """(the data's answer cell, a representative gold string)."""
    gold = rng.choice(WORDS + NUMBERS + UNITS)
    if key == 'TextVQA_VAL':
        others = [rng.choice([gold, gold.lower(), rng.choice(WORDS + NUMBERS)]) for _ in range(9)]
        return str([gold] + others), gold
    if key in ('DocVQA_VAL', 'InfoVQA_VAL'):
        extra = [rng.choice(WORDS + NUMBERS + UNITS) for _ in range(rng.randrange(3))]
        return str([gold] + extra), gold
    return gold, gold   # ChartQA: one answer per question


def _vqa_set(key: str, rng: random.Random, rows: int, numeric: bool):
    data, predictions = [], []
    for i in range(rows):
        answer, gold = _vqa_answers(key, rng)
        if numeric:
            gold = rng.choice(NUMBERS[:10])
            answer = str([gold] * 10) if key == 'TextVQA_VAL' else (str([gold]) if 'VQA_VAL' in key else gold)
            prediction = rng.choice([gold, '0' + gold, gold + '0' if '.' in gold else gold + '.0', '-' + gold,
                                     f'{float(gold) * 1.03:g}'])
        else:
            prediction = perturb(gold, rng)
        row = {'index': i, 'question': f'Question {i}?', 'answer': answer}
        if key == 'ChartQA_TEST':
            row['split'] = rng.choice(['test_human', 'test_augmented'])
        elif key != 'TextVQA_VAL':
            row['category'] = rng.choice(['figure', 'table', 'free_text'])
        data.append(row)
        predictions.append(prediction)
    return data, predictions


def _choice_row(key: str, i: int, rng: random.Random) -> tuple[dict, str]:
    n_options = rng.choice([2, 3, 4, 4, 4, 5]) if key == 'MMMU_DEV_VAL' else 4
    texts = rng.sample(CHOICE_TEXTS, n_options)
    letters = 'ABCDE'[:n_options]
    row = {'index': i, 'question': f'Which one is shown in question {i}?', **dict(zip(letters, texts))}
    gold = rng.choice(letters)
    row['answer'] = gold
    if key == 'MMMU_DEV_VAL':
        row['split'] = rng.choice(['dev', 'validation'])
        row['category'] = rng.choice(['Art', 'Math', 'Physics'])
        if rng.random() < 0.2:   # an open question: no options, free-form gold answer
            for letter in letters:
                del row[letter]
            row['answer'] = rng.choice(['3.5', 'Paris', '12', 'none', 'x = 2'])
            return row, rng.choice([row['answer'], 'It is ' + row['answer'], 'A', 'I do not know', ''])
    elif key == 'MMStar':
        row['category'] = rng.choice(['coarse perception', 'math', 'science & technology'])
        row['l2-category'] = rng.choice(['image scene and topic', 'numeric commonsense', 'geography & earth science'])
    else:
        row['category'] = rng.choice(['foodChainsWebs', 'lifeCycles', 'partsOfA'])
    other = rng.choice([x for x in letters if x != gold] or [gold])
    template = rng.choice(MCQ_TEMPLATES)
    prediction = template.format(L=gold if rng.random() < 0.7 else other, l=gold.lower(), O=other,
                                 T=row[gold], OT=row[other])
    if rng.random() < 0.05:
        prediction = rng.choice(NA_LIKE + ODD)
    return row, prediction


def _choice_set(key: str, rng: random.Random, rows: int):
    pairs = [_choice_row(key, i, rng) for i in range(rows)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ocrbench_set(rng: random.Random, rows: int, numeric: bool):
    data, predictions = [], []
    for i in range(rows):
        category = OCR_CATEGORIES[i % len(OCR_CATEGORIES)]
        if numeric:
            gold = rng.choice(NUMBERS[:10])
            prediction = rng.choice([gold, '0' + gold, gold + '.0', '9' + gold])
        elif category.startswith('Handwritten'):
            gold = rng.choice(['x^{2}+1', '\\frac{a}{b}', 'A + B'])
            prediction = rng.choice([gold, gold.replace('+', ' + '), gold.upper(), '$' + gold + '$', 'nan', ''])
        else:
            gold = rng.choice(WORDS + NUMBERS + UNITS)
            prediction = rng.choice([perturb(gold, rng), f'The text reads {gold.upper()} here', gold])
        data.append({'index': i, 'question': f'What is written ({i})?', 'answer': str([gold]), 'category': category})
        predictions.append(prediction)
    return data, predictions


def prediction_set(key: str, rows: int = ROWS, seed: int = 0):
    rng = random.Random(f'{key}-{seed}')
    if key in VQA_KEYS:
        return _vqa_set(key, rng, rows, numeric=False)
    if key in MCQ_KEYS:
        return _choice_set(key, rng, rows)
    if key == 'OCRBench':
        return _ocrbench_set(rng, rows, numeric=False)
    raise KeyError(key)


def numeric_set(key: str, rows: int = 40, seed: int = 0):
    rng = random.Random(f'{key}-numeric-{seed}')
    if key == 'OCRBench':
        return _ocrbench_set(rng, rows, numeric=True)
    return _vqa_set(key, rng, rows, numeric=True)
