"""Prompts are VLMEvalKit's build_prompt output, character for character."""
import pytest
from PIL import Image

from eval.benchmarks import BENCHMARKS, get_benchmark
from eval.data import ImageRef
from eval.prompts import interleave_images
from eval_fixtures import png_b64


def _record(**fields):
    return {'index': 7, 'question': 'What is shown?', 'answer': 'x',
            'image': [ImageRef(png_b64(mode='RGBA'), 'T', 0, 'image')], **fields}


@pytest.mark.parametrize('key', ['DocVQA_VAL', 'InfoVQA_VAL', 'TextVQA_VAL', 'ChartQA_TEST', 'SYNTH_CHART', 'SYNTH_DOC'])
def test_vqa_sets_add_single_phrase_suffix(key):
    prompt = get_benchmark(key).build_prompt(_record())
    assert prompt[0]['type'] == 'image' and isinstance(prompt[0]['value'], Image.Image)
    assert prompt[1] == {'type': 'text', 'value': 'What is shown?\nAnswer the question using a single word or phrase.'}


@pytest.mark.parametrize('key', ['OCRBench', 'SimpleVQA'])
def test_base_datasets_use_bare_question(key):
    assert get_benchmark(key).build_prompt(_record())[-1] == {'type': 'text', 'value': 'What is shown?'}


@pytest.mark.parametrize('key', ['MMStar', 'AI2D_TEST', 'SYNTH_SHAPES', 'MMMU_DEV_VAL'])
def test_multiple_choice_block(key):
    record = _record(A='cat', B='dog', C=None, hint='Look closely.')
    text = get_benchmark(key).build_prompt(record)[-1]['value']
    assert text == ('Hint: Look closely.\nQuestion: What is shown?\nOptions:\nA. cat\nB. dog\n'
                    'Please select the correct answer from the options above. \n')
    assert get_benchmark(key).build_prompt(_record(A='cat', hint=None))[-1]['value'].startswith('Question: ')


def test_image_dir_writes_the_versions_dump_image_files(tmp_path):
    # Upstream main and ms-vlmeval dump a single image as <index>.png; nvidia-vlmeval as <index>.jpg.
    for version, name, image_format in (('main', '7.png', 'PNG'), ('ms-vlmeval-0.0.20', '7.png', 'PNG'),
                                        ('nvidia-vlmeval-26.3', '7.jpg', 'JPEG')):
        prompt = get_benchmark('DocVQA_VAL', version).build_prompt(_record(), image_dir=tmp_path / version)
        assert prompt[0]['value'] == str(tmp_path / version / name)
        with Image.open(prompt[0]['value']) as image:
            assert image.format == image_format and image.mode == 'RGB'
    named = get_benchmark('DocVQA_VAL').build_prompt({**_record(), 'image_path': ['page.png']}, image_dir=tmp_path)
    assert named[0]['value'] == str(tmp_path / 'page.png')


def test_interleave_rejects_bad_markers():
    msgs = [{'type': 'image', 'value': 'a.jpg'}, {'type': 'text', 'value': 'see <image 2>'}]
    with pytest.raises(ValueError, match=r'row 3: text refers to <image 2> but the row has 1 image'):
        interleave_images(msgs, 'row 3')
    no_marker = [{'type': 'image', 'value': 'a.jpg'}, {'type': 'text', 'value': 'plain'}]
    assert interleave_images(no_marker) == no_marker


def test_registry_lists_valid_keys_for_unknown_key():
    with pytest.raises(KeyError) as error:
        get_benchmark('MMBench')
    assert str(error.value).startswith("unknown benchmark 'MMBench'; valid keys: MMStar, MMMU_DEV_VAL")
    assert {'MMStar', 'MMMU_DEV_VAL', 'SimpleVQA', 'InfoVQA_VAL', 'TextVQA_VAL', 'DocVQA_VAL', 'OCRBench',
            'AI2D_TEST', 'ChartQA_TEST', 'SYNTH_CHART', 'SYNTH_DOC', 'SYNTH_SHAPES'} <= set(BENCHMARKS)
