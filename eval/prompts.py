"""Prompts exactly as VLMEvalKit's dataset classes build them (build_prompt).

A prompt is a message list: [{'type': 'image', 'value': PIL image or file path}, ...,
{'type': 'text', 'value': str}] with the images first, except for MMMU, whose text is cut
at every '<image k>' and the k-th image placed there.

- ImageBaseDataset (OCRBench, SimpleVQA): images + the question.
- ImageVQADataset (DocVQA, InfoVQA, TextVQA, ChartQA): + '\\nAnswer the question using a
  single word or phrase.'
- ImageMCQDataset (MMStar, AI2D, MMMU): 'Hint: ...\\n' (when present), 'Question: ...\\n',
  'Options:\\n' + 'A. ...\\n' per present option, then 'Please select the correct answer
  from the options above. \\n' (the space before the newline is upstream's).
"""
from __future__ import annotations

from pathlib import Path

from data.chat import MCQ_INSTRUCTION, VQA_SUFFIX
from eval.metrics.choice import build_choices, is_missing
from eval.vlmevalkit_versions import get_version
from viq.errors import DataError
from viq.io import atomic_path


def dump_names(record: dict, count: int, version=None) -> list[str]:
    """File names dump_image gives a record's images. Upstream main (and ms-vlmeval): the
    `image_path` names when the row has them, else '<index>.png' / '<index>_<k>.png'; older
    snapshots always '<index>.jpg' for a single image (they require image_path for several)."""
    suffix = get_version(version).image_suffix
    given = record.get('image_path')
    given = [given] if isinstance(given, str) else list(given) if isinstance(given, (list, tuple)) else None
    if count == 1 and (suffix == '.jpg' or not given or len(given) != 1):
        return [f"{record['index']}{suffix}"]
    if given and len(given) == count:
        return given
    return [f"{record['index']}_{k}{suffix}" for k in range(count)]


def image_values(record: dict, image_dir=None, version=None) -> list:
    """PIL images, or (with image_dir) files written the way the VLMEvalKit version's dump_image
    writes them (PNG, or JPEG at PIL's default quality for '.jpg' names), so the model reads the
    same pixels VLMEvalKit's models read."""
    refs = record.get('image') or []
    if image_dir is None:
        return [ref.load() for ref in refs]
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ref, name in zip(refs, dump_names(record, len(refs), version)):
        path = image_dir / name
        if not path.is_file():  # written atomically: a killed run never leaves half an image
            image_format = 'JPEG' if path.suffix.lower() in ('.jpg', '.jpeg') else 'PNG'
            with atomic_path(path) as partial:
                ref.load().save(partial, format=image_format)
        paths.append(str(path))
    return paths


def messages(images: list, text: str) -> list[dict]:
    return [{'type': 'image', 'value': image} for image in images] + [{'type': 'text', 'value': text}]


def base_prompt(record: dict, image_dir=None, version=None) -> list[dict]:
    return messages(image_values(record, image_dir, version), str(record['question']))


def vqa_prompt(record: dict, image_dir=None, version=None) -> list[dict]:
    return messages(image_values(record, image_dir, version), str(record['question']) + VQA_SUFFIX)


def mcq_text(record: dict) -> str:
    options = build_choices(record)
    text = ''
    hint = record.get('hint')
    if not is_missing(hint):
        text += f'Hint: {hint}\n'
    text += f"Question: {record['question']}\n"
    if options:
        text += 'Options:\n' + ''.join(f'{letter}. {option}\n' for letter, option in options.items())
        text += MCQ_INSTRUCTION
    return text


def mcq_prompt(record: dict, image_dir=None, version=None) -> list[dict]:
    return messages(image_values(record, image_dir, version), mcq_text(record))


def interleave_images(msgs: list[dict], source: str = 'record') -> list[dict]:
    """MMMU's split_MMMU: cut the text at '<image k>' and put image k (1-based) there.
    Images never referenced are dropped; a text without markers is left as is."""
    images = [m['value'] for m in msgs if m['type'] == 'image']
    texts = [m['value'] for m in msgs if m['type'] == 'text']
    if len(texts) != 1:
        raise ValueError(f'{source}: expected one text message, got {len(texts)}')  # built by build_prompt: a bug
    pieces = texts[0].split('<image ')
    if len(pieces) == 1:
        return msgs
    out = [{'type': 'text', 'value': pieces[0]}]
    for piece in pieces[1:]:
        # Upstream reads a single digit followed by '>' (MMMU has at most 7 images).
        if len(piece) < 2 or not piece[0].isdigit() or piece[1] != '>':
            raise DataError(f"{source}: '<image {piece[:10]}' is not an '<image k>' marker with k in 1..9")
        k = int(piece[0])
        if not 1 <= k <= len(images):
            raise DataError(f'{source}: text refers to <image {k}> but the row has {len(images)} image(s)')
        out.append({'type': 'image', 'value': images[k - 1]})
        out.append({'type': 'text', 'value': piece[2:]})
    return out
