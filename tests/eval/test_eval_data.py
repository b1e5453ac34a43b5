"""Loading VLMEvalKit TSVs and HF layouts into records; one-line errors on bad input."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.benchmarks import get_benchmark
from eval.data import DataError, read_jsonl_rows, read_prediction_rows, read_tsv_rows, records_from_tsv
from eval_fixtures import png_b64, png_bytes, write_jsonl, write_tsv


def test_tsv_index_reference_multi_image_and_rgb_conversion(tmp_path):
    red, blue = png_b64((255, 0, 0), mode='RGBA'), png_b64((0, 0, 255), size=(3, 5))
    multi = str([red, blue])
    write_tsv(tmp_path / 'SYNTH_DOC.tsv', ['index', 'image', 'question', 'answer', 'category'], [
        [10, red, 'What is red?', 'apple', 'fruit'],
        [11, '10', 'Same picture?', "['yes', 'Yes']", 'fruit'],     # image reused from index 10
        [12, multi, 'Two pictures?', '2', 'count'],
        [13, '', 'No picture', 'x', 'fruit'],                         # dropped like skip_noimg
    ])
    records = get_benchmark('SYNTH_DOC').load(tmp_path)
    assert [r['index'] for r in records] == [10, 11, 12]
    first, reused, two = records
    image = first['image'][0].load()
    assert image.mode == 'RGB' and image.size == (6, 4) and image.getpixel((0, 0)) == (255, 0, 0)
    assert reused['image'][0].payload == red
    assert [ref.load().size for ref in two['image']] == [(6, 4), (3, 5)]
    prompt = get_benchmark('SYNTH_DOC').build_prompt(two)
    assert [m['type'] for m in prompt] == ['image', 'image', 'text']
    assert prompt[-1]['value'] == 'Two pictures?\nAnswer the question using a single word or phrase.'


def test_tsv_cells_follow_pandas_semantics(tmp_path):
    path = write_tsv(tmp_path / 'x.tsv', ['index', 'answer', 'opt', 'flag', 'prediction', 'text'], [
        [1, '0', 'N/A', 'True', 'None', '007'],
        [2, '2.5', 'None', 'False', '3.50', 'abc'],
        [3, '4', 'x', 'true', 'NA', '008'],
    ])
    rows = read_tsv_rows(path)
    assert [r['index'] for r in rows] == [1, 2, 3]
    assert [r['answer'] for r in rows] == [0.0, 2.5, 4.0]              # a float column: str() gives '0.0'
    assert [r['opt'] for r in rows] == [None, None, 'x']               # default NA strings
    assert [r['flag'] for r in rows] == [True, False, True]
    assert [r['prediction'] for r in rows] == [None, '3.50', None]    # predictions: NA rule only
    assert [r['text'] for r in rows] == ['007', 'abc', '008']         # mixed column stays text


def test_int_column_with_missing_values_becomes_float(tmp_path):
    rows = read_tsv_rows(write_tsv(tmp_path / 'y.tsv', ['index', 'answer'], [[1, '3'], [2, 'NA']]))
    assert [r['answer'] for r in rows] == [3.0, None]


def test_undecodable_base64_names_benchmark_row_and_column(tmp_path):
    write_tsv(tmp_path / 'DocVQA_VAL.tsv', ['index', 'image', 'question', 'answer'], [
        [1, png_b64(), 'ok?', 'yes'],
        [2, '#' * 80, 'broken?', 'no'],
        [3, 'aGVsbG8gd29ybGQ=' * 6, 'not an image?', 'no'],
    ])
    records = get_benchmark('DocVQA_VAL').load(tmp_path)
    records[0]['image'][0].load()
    with pytest.raises(DataError) as bad_b64:
        records[1]['image'][0].load()
    message = str(bad_b64.value)
    assert message.startswith("DocVQA_VAL: row 1 (index 2), column 'image': undecodable image") and '\n' not in message
    with pytest.raises(DataError, match=r"DocVQA_VAL: row 2 \(index 3\), column 'image': undecodable image \(UnidentifiedImage"):
        get_benchmark('DocVQA_VAL').build_prompt(records[2])


def test_dangling_image_reference(tmp_path):
    write_tsv(tmp_path / 'OCRBench.tsv', ['index', 'image', 'question', 'answer', 'category'],
              [[1, '99', 'q', "['a']", 'Doc-oriented VQA']])
    with pytest.raises(DataError, match=r"OCRBench.tsv: row 0, column 'image': '99' is neither a base64 image"):
        get_benchmark('OCRBench').load(tmp_path)


def test_missing_required_column_names_column_and_file(tmp_path):
    path = write_tsv(tmp_path / 'TextVQA_VAL.tsv', ['index', 'image', 'answer'], [[1, png_b64(), "['a']"]])
    with pytest.raises(DataError) as error:
        get_benchmark('TextVQA_VAL').load(tmp_path)
    assert str(error.value).startswith(f"{path}: missing column 'question' (required by TextVQA_VAL")


def test_missing_data_file_lists_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r'MMStar: no data under .* \(looked for MMStar.tsv, MMStar.parquet, MMStar/\)'):
        get_benchmark('MMStar').load(tmp_path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / 'p.jsonl'
    path.write_text('{"index": 1, "prediction": "a"}\n{"index": 2, "prediction": \n')
    with pytest.raises(DataError, match=rf'^{path}:2: invalid JSON'):
        read_jsonl_rows(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=rf'^{path}:1: expected a JSON object, got list'):
        read_prediction_rows(path)


def test_jsonl_applies_na_rule(tmp_path):
    rows = read_prediction_rows(write_jsonl(tmp_path / 'p.jsonl', [{'prediction': 'N/A', 'answer': 3}]))
    assert rows == [{'prediction': None, 'answer': 3}]


# ------------------------------------------------------------------ HF layouts
def _image_struct(color):
    return {'bytes': png_bytes(color), 'path': None}


def test_docvqa_parquet_layout(tmp_path):
    table = pa.table({
        'questionId': [57, 58],
        'question': ['What is the date?', 'Who signed?'],
        'answers': [['May 5', '5 May'], ['J. Smith']],
        'image': [_image_struct((0, 255, 0)), _image_struct((0, 0, 0))],
    })
    path = tmp_path / 'docvqa.parquet'
    pq.write_table(table, path)
    benchmark = get_benchmark('DocVQA_VAL')
    records = benchmark.load(path=path)
    assert [(r['index'], r['answer']) for r in records] == [(57, ['May 5', '5 May']), (58, ['J. Smith'])]
    prompt = benchmark.build_prompt(records[0])
    assert isinstance(prompt[0]['value'], Image.Image) and prompt[0]['value'].getpixel((0, 0)) == (0, 255, 0)
    scored = benchmark.score([{**records[0], 'prediction': '5 May'}, {**records[1], 'prediction': 'J Smith'}])
    # second: "j. smith" vs "j smith": distance 1 / raw length 8 -> 0.875
    assert scored == {'Overall': pytest.approx((1.0 + 0.875) / 2 * 100)}


def test_save_to_disk_layout_chartqa_query_label(tmp_path):
    table = pa.table({
        'query': ['How many?', 'Which year?'],
        'label': [['12'], ['2019']],
        'human_or_machine': [0, 1],
        'image': [_image_struct((1, 2, 3)), _image_struct((4, 5, 6))],
    })
    directory = tmp_path / 'chartqa_test'
    directory.mkdir()
    with pa.OSFile(str(directory / 'data-00000-of-00001.arrow'), 'wb') as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (directory / 'state.json').write_text(json.dumps({'_data_files': [{'filename': 'data-00000-of-00001.arrow'}]}))
    benchmark = get_benchmark('ChartQA_TEST')
    records = benchmark.load(path=directory)
    assert [(r['question'], r['answer'], r['split']) for r in records] == [
        ('How many?', '12', 'test_human'), ('Which year?', '2019', 'test_augmented')]
    scores = benchmark.score([{**records[0], 'prediction': '12.5'}, {**records[1], 'prediction': '2019'}])
    assert scores == {'test_augmented': 100.0, 'test_human': 100.0, 'Overall': 100.0}


def test_ai2d_options_list_and_answer_position(tmp_path):
    pq.write_table(pa.table({'question': ['Which label?'], 'options': [['leaf', 'root', 'stem']],
                             'answer': ['2'], 'image': [_image_struct((9, 9, 9))]}), tmp_path / 'AI2D_TEST.parquet')
    records = get_benchmark('AI2D_TEST').load(tmp_path)
    assert {k: records[0][k] for k in ('A', 'B', 'C', 'answer')} == {'A': 'leaf', 'B': 'root', 'C': 'stem', 'answer': 'C'}


def test_mmstar_inline_options(tmp_path):
    question = 'Which is true?\nOptions: A: The cup is red., B: The cup, a mug, is blue., C: None, D: Both'
    pq.write_table(pa.table({'index': [0], 'question': [question], 'answer': ['B'], 'category': ['coarse perception'],
                             'l2_category': ['image emotion'], 'image': [png_bytes()]}), tmp_path / 'MMStar.parquet')
    record = get_benchmark('MMStar').load(tmp_path)[0]
    assert record['question'] == 'Which is true?'
    assert [record[k] for k in 'ABCD'] == ['The cup is red.', 'The cup, a mug, is blue.', 'None', 'Both']
    assert record['l2-category'] == 'image emotion'


def test_mmmu_images_interleave_in_text(tmp_path):
    pq.write_table(pa.table({
        'id': ['validation_Art_Theory_3'],
        'question': ['Compare <image 1> with <image 2>.'],
        'options': ["['<image 2> is older', 'same age']"],
        'answer': ['A'],
        'image_1': [_image_struct((10, 0, 0))], 'image_2': [_image_struct((0, 20, 0))], 'image_3': [None],
    }), tmp_path / 'mmmu.parquet')
    benchmark = get_benchmark('MMMU_DEV_VAL')
    record = benchmark.load(path=tmp_path / 'mmmu.parquet')[0]
    assert (record['split'], record['category'], record['A']) == ('validation', 'Art_Theory', '<image 2> is older')
    prompt = benchmark.build_prompt(record)
    kinds = [m['type'] for m in prompt]
    assert kinds == ['text', 'image', 'text', 'image', 'text', 'image', 'text']
    assert prompt[0]['value'] == 'Question: Compare '
    assert [prompt[i]['value'].getpixel((0, 0)) for i in (1, 3, 5)] == [(10, 0, 0), (0, 20, 0), (0, 20, 0)]
    assert prompt[4]['value'] == '.\nOptions:\nA. '
    assert prompt[6]['value'] == (' is older\nB. same age\nPlease select the correct answer from the options above. \n')


def test_records_from_tsv_requires_file(tmp_path):
    with pytest.raises(DataError, match=r'SimpleVQA: data file .* not found'):
        records_from_tsv(tmp_path / 'SimpleVQA.tsv', 'SimpleVQA')


def test_mmmu_tsv_multi_image_row_and_synthetic_alias(tmp_path):
    one, two = png_b64((1, 1, 1)), png_b64((2, 2, 2))
    write_tsv(tmp_path / 'MMMU_DEV_VAL.tsv', ['index', 'image', 'image_path', 'question', 'A', 'B', 'answer', 'split'], [
        [5, str([one, two]), str(['5_1.png', '5_2.png']), '<image 2> or <image 1>?', 'left', 'right', 'A', 'dev'],
    ])
    benchmark = get_benchmark('MMMU_DEV_VAL')
    record = benchmark.load(tmp_path)[0]
    assert record['image_path'] == ['5_1.png', '5_2.png']
    prompt = benchmark.build_prompt(record, image_dir=tmp_path / 'images')
    assert [m['value'] for m in prompt if m['type'] == 'image'] == [
        str(tmp_path / 'images' / '5_2.png'), str(tmp_path / 'images' / '5_1.png')]
    assert prompt[0] == {'type': 'text', 'value': 'Question: '}
    write_tsv(tmp_path / 'SYNTH_CHART.tsv', ['index', 'image', 'question', 'answer', 'category'],
              [[0, one, 'Max bar?', '42', 'bar']])
    alias = get_benchmark('SYNTH_VAL_CHART')
    assert [r['answer'] for r in alias.load(tmp_path)] == [42]
    assert alias.score([{'answer': 42, 'category': 'bar', 'prediction': '43'}]) == {'Overall': 100.0, 'bar': 100.0}


def test_hf_undecodable_image_names_column(tmp_path):
    pq.write_table(pa.table({'id': ['dev_Math_1'], 'question': ['<image 1> <image 2>'], 'options': [['1', '2']],
                             'answer': ['B'], 'image_1': [_image_struct((0, 0, 0))],
                             'image_2': [{'bytes': b'not a png', 'path': None}]}), tmp_path / 'm.parquet')
    benchmark = get_benchmark('MMMU_DEV_VAL')
    record = benchmark.load(path=tmp_path / 'm.parquet')[0]
    with pytest.raises(DataError, match=r"^MMMU_DEV_VAL: row 0, column 'image_2': undecodable image"):
        benchmark.build_prompt(record)
