"""eval.run and eval.generate on a tiny export and the synthetic validation sets (CPU)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.engine import free_port
from data.chat import build_prompt
from data.synthetic import make_synthetic_dataset
from data.tokenizer import build_tokenizer
from eval.benchmarks import BENCHMARKS, get_benchmark
from eval.generate import MLLMGenerator, VideoItem, human_turn, model_name_from_path
from eval.data import DataError
from eval.run import main, read_predictions
from eval.score import score_file
from mllm.export import save_export
from mllm.model import build_mllm
from viq import ViQModel

REPO = Path(__file__).resolve().parents[2]
KEYS = ('SYNTH_CHART', 'SYNTH_SHAPES')
# One thread: the test machines have two cores, often shared, where two-thread matmuls stall.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO), 'TOKENIZERS_PARALLELISM': 'false'}


def build_tiny_export(out: Path) -> Path:
    """tiny LLM + viq-tiny, untied and with large random weights so answers vary with the input."""
    viq = ViQModel.from_pretrained('viq-tiny')
    tokenizer, vocab = build_tokenizer('tiny', viq.config)
    torch.manual_seed(0)
    model = build_mllm('tiny', vocab, attn_implementation='sdpa', tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return save_export(model, tokenizer, vocab, out / 'tiny-run' / 'hf', viq)


@pytest.fixture(scope='module')
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp('eval_run')
    export = build_tiny_export(root)
    # 12 validation samples: 3 charts, 4 documents, 5 shapes.
    make_synthetic_dataset(root / 'synthetic', 40, seed=0, val_fraction=0.3)
    return {'root': root, 'export': export, 'data': root / 'synthetic' / 'vlmeval'}


def run_cli(setup, out, *extra, launcher=None):
    args = ['--model', str(setup['export']), '--benchmarks', ','.join(KEYS), '--data-root', str(setup['data']),
            '--out', str(out), '--batch-size', '2', '--max-new-tokens', '6', '--limit', '3', '--device', 'cpu', *extra]
    command = (launcher or [sys.executable]) + ['-m', 'eval.run'] + args
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def clean_run(setup):
    out = setup['root'] / 'clean'
    return out, run_cli(setup, out)


def test_model_name_comes_from_the_export_or_its_run(tmp_path):
    assert model_name_from_path(tmp_path / 'runs' / 'demo' / 'hf') == 'demo'
    assert model_name_from_path(tmp_path / 'exports' / 'viq-0.5b') == 'viq-0.5b'


def test_human_turn_places_images_where_they_occur():
    assert human_turn([{'type': 'image', 'value': 'a.jpg'}, {'type': 'image', 'value': 'b.jpg'},
                       {'type': 'text', 'value': 'How many?'}]) == ('<image>\n<image>\nHow many?', ['a.jpg', 'b.jpg'])
    text, images = human_turn([{'type': 'text', 'value': 'Compare '}, {'type': 'image', 'value': 1},
                               {'type': 'text', 'value': ' and '}, {'type': 'image', 'value': 2},
                               {'type': 'text', 'value': '. Write <image> tags?'}])
    assert text == 'Compare <image> and <image>. Write < image> tags?' and images == [1, 2]
    text, items = human_turn([{'type': 'video', 'value': 'x.mp4'}, {'type': 'text', 'value': 'Where to?'}])
    assert text == '<image>\nWhere to?' and items == [VideoItem('x.mp4')]   # laid out as frames by prepare()
    with pytest.raises(ValueError, match="message item 0: type must be 'image', 'video' or 'text'"):
        human_turn([{'type': 'audio', 'value': 'x.wav'}])


def test_prompt_matches_the_training_layout(setup):
    """[image, text] becomes the LLaVA '<image>\\n' + question turn the trainer tokenizes, with the image's codes."""
    generator = MLLMGenerator(setup['export'], device='cpu')
    benchmark = get_benchmark('SYNTH_CHART')
    record = benchmark.load(setup['data'])[0]
    messages = benchmark.build_prompt(record)
    prompt = generator.prepare([messages])[0]
    codes = generator.viq.encode([messages[0]['value']])[0]
    expected = build_prompt(generator.tokenizer, generator.vocab,
                            [{'from': 'human', 'value': '<image>\n' + messages[1]['value']}], [tuple(codes.shape[:2])])
    assert torch.equal(prompt.input_ids, expected['input_ids'])
    assert torch.equal(prompt.codes, generator.vocab.codes_to_ids(codes.reshape(-1, 4)))
    assert int((prompt.input_ids == generator.vocab.image_pad_id).sum()) == prompt.codes.shape[0]


def test_batched_greedy_equals_one_at_a_time(setup):
    generator = MLLMGenerator(setup['export'], device='cpu')
    messages = []
    for key in KEYS:   # different prompt lengths, so batches are padded and reordered
        benchmark = get_benchmark(key)
        messages += [benchmark.build_prompt(r) for r in benchmark.load(setup['data'])[:3]]
    batched = generator.generate(messages, max_new_tokens=6, batch_size=4)
    single = [generator.generate([m], max_new_tokens=6, batch_size=1)[0] for m in messages]
    assert batched == single
    assert len(set(batched)) == len(batched) and all(batched)   # answers differ per prompt: a real check


def test_run_writes_predictions_scores_and_report(setup, clean_run):
    out, summary = clean_run
    model_dir = out / 'tiny-run'
    assert summary['model'] == 'tiny-run'
    for key in KEYS:
        assert summary['benchmarks'][key] == {'records': 3, 'reused': 0, 'generated': 3, 'dropped_partial_lines': 0}
        rows = [json.loads(line) for line in (model_dir / f'{key}.predictions.jsonl').read_text().splitlines()]
        data = get_benchmark(key).load(setup['data'])[:3]
        assert [r['index'] for r in rows] == [d['index'] for d in data]
        columns = ['index', 'question'] + (['A', 'B', 'C', 'D'] if key == 'SYNTH_SHAPES' else []) + ['answer', 'category']
        assert all(list(r) == columns + ['prediction'] for r in rows)
        assert all(isinstance(r['prediction'], str) for r in rows)
        # The same numbers `python -m eval.score --data-root` prints for that file.
        expected = score_file(key, model_dir / f'{key}.predictions.jsonl', setup['data'])
        assert summary['scores'][key] == expected
    assert not list(model_dir.glob('*.rank*.jsonl'))
    report = json.loads((out / 'report.json').read_text())
    assert report['benchmarks'] == list(KEYS)
    assert set(report['summary']['tiny-run']) == {*KEYS, 'Avg.'}
    assert set(report['aggregates']['tiny-run']) == set(KEYS)
    assert set(report['aggregates']['tiny-run']['SYNTH_SHAPES']) >= {'Overall', 'count_shape'}
    markdown = (out / 'report.md').read_text()
    assert '| Model | SYNTH_CHART | SYNTH_SHAPES | Avg. |' in markdown
    assert '### SYNTH_SHAPES (SYNTH_SHAPES)' in markdown and '| tiny-run |' in markdown
    assert json.loads((model_dir / 'scores.json').read_text()) == report['aggregates']['tiny-run']


def test_run_predictions_equal_the_generator_on_the_same_prompts(setup, clean_run):
    out, _ = clean_run
    generator = MLLMGenerator(setup['export'], device='cpu')
    benchmark = get_benchmark('SYNTH_SHAPES')
    # eval.run feeds the VLMEvalKit-style JPEG dumps under <out>/images/<KEY>.
    messages = [benchmark.build_prompt(r, out / 'images' / 'SYNTH_SHAPES') for r in benchmark.load(setup['data'])[:3]]
    rows = [json.loads(line) for line in (out / 'tiny-run' / 'SYNTH_SHAPES.predictions.jsonl').read_text().splitlines()]
    assert [r['prediction'] for r in rows] == generator.generate(messages, max_new_tokens=6, batch_size=1)


def test_resume_generates_only_what_is_missing(setup, clean_run):
    clean_out, _ = clean_run
    out = setup['root'] / 'resumed'
    shutil.copytree(clean_out / 'tiny-run', out / 'tiny-run')
    (out / 'tiny-run' / 'scores.json').unlink()
    for key in KEYS:
        lines = (clean_out / 'tiny-run' / f'{key}.predictions.jsonl').read_text().splitlines(keepends=True)
        # Row 1 lost, row 2 cut mid-line as by a kill during the write.
        (out / 'tiny-run' / f'{key}.predictions.jsonl').write_text(lines[0] + lines[2][: len(lines[2]) // 2])
    summary = run_cli(setup, out)
    for key in KEYS:
        assert summary['benchmarks'][key] == {'records': 3, 'reused': 1, 'generated': 2, 'dropped_partial_lines': 1}
        assert ((out / 'tiny-run' / f'{key}.predictions.jsonl').read_bytes()
                == (clean_out / 'tiny-run' / f'{key}.predictions.jsonl').read_bytes())
    # A complete rerun generates nothing.
    again = run_cli(setup, out)
    assert all(again['benchmarks'][k] == {'records': 3, 'reused': 3, 'generated': 0, 'dropped_partial_lines': 0}
               for k in KEYS)
    assert again['scores'] == summary['scores']


@pytest.mark.slow
def test_two_ranks_shard_and_merge_to_the_single_process_file(setup, clean_run):
    clean_out, _ = clean_run
    out = setup['root'] / 'sharded'
    port = free_port()  # other test runs may hold the default one
    torchrun = [str(Path(sys.executable).with_name('torchrun')), '--nproc_per_node', '2', '--master_port', str(port)]
    summary = run_cli(setup, out, launcher=torchrun)
    for key in KEYS:
        assert summary['benchmarks'][key] == {'records': 3, 'reused': 0, 'generated': 3, 'dropped_partial_lines': 0}
        assert ((out / 'tiny-run' / f'{key}.predictions.jsonl').read_bytes()
                == (clean_out / 'tiny-run' / f'{key}.predictions.jsonl').read_bytes())
    assert not list((out / 'tiny-run').glob('*.rank*.jsonl'))
    assert json.loads((out / 'report.json').read_text())['aggregates'] == json.loads(
        (clean_out / 'report.json').read_text())['aggregates']


# --------------------------------------------------------------------------- predictions file rules


def test_partial_last_line_is_dropped_and_the_file_repaired(tmp_path):
    path = tmp_path / 'X.predictions.jsonl'
    path.write_text('{"index": 1, "prediction": "a"}\n{"index": 2, "prediction": "b"}\n{"index": 3, "predi')
    rows, dropped = read_predictions(path, repair=True)
    assert sorted(rows) == ['1', '2'] and dropped == 1
    assert path.read_text() == '{"index": 1, "prediction": "a"}\n{"index": 2, "prediction": "b"}\n'
    path.write_text('{"index": 1, "prediction": "a"}')   # complete object, newline lost
    rows, dropped = read_predictions(path, repair=True)
    assert list(rows) == ['1'] and dropped == 0 and path.read_text() == '{"index": 1, "prediction": "a"}\n'


def test_malformed_line_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / 'X.predictions.jsonl'
    path.write_text('{"index": 1, "prediction": "a"}\nnot json\n{"index": 3, "prediction": "c"}\n')
    with pytest.raises(DataError, match=r'X\.predictions\.jsonl:2: malformed predictions line'):
        read_predictions(path)


# --------------------------------------------------------------------------- one-line errors


def cli_error(capsys, *args) -> str:
    """The message of a bad-input run: exit 2, nothing on stdout, one line on stderr, no traceback."""
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.count('\n') == 1
    line = captured.err.strip()
    prefix, suffix = 'eval.run: ', ' (VIQ_DEBUG=1 shows the traceback)'
    assert line.startswith(prefix) and line.endswith(suffix), line
    return line[len(prefix):-len(suffix)]


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only project errors become one line: anything else is a bug and must show where it happened."""
    import eval.run

    monkeypatch.setattr(eval.run, 'run', lambda args: {}['no such key'])
    with pytest.raises(KeyError, match='no such key'):
        main(['--model', str(tmp_path), '--benchmarks', 'SYNTH_CHART', '--data-root', str(tmp_path),
              '--out', str(tmp_path)])


def test_unknown_benchmark_lists_the_valid_keys(setup, capsys, tmp_path):
    error = cli_error(capsys, '--model', str(setup['export']), '--benchmarks', 'SYNTH_CHART,VQAv2',
                      '--data-root', str(setup['data']), '--out', str(tmp_path))
    assert error == f"error: unknown benchmark 'VQAv2'; valid keys: {', '.join(BENCHMARKS)}"


def test_missing_data_file_names_the_path(setup, capsys, tmp_path):
    error = cli_error(capsys, '--model', str(setup['export']), '--benchmarks', 'DocVQA_VAL',
                      '--data-root', str(setup['data']), '--out', str(tmp_path))
    assert error.startswith(f"error: DocVQA_VAL: no data under {setup['data']} (looked for DocVQA_VAL.tsv")


def test_directory_that_is_not_an_export(setup, capsys, tmp_path):
    not_export = tmp_path / 'some_checkpoint'
    not_export.mkdir()
    (not_export / 'config.json').write_text('{}')
    error = cli_error(capsys, '--model', str(not_export), '--benchmarks', 'SYNTH_CHART',
                      '--data-root', str(setup['data']), '--out', str(tmp_path / 'out'))
    assert error.startswith(f'error: --model {not_export} is not a ViQ-MLLM export: missing viq_mllm.json, vocab.json')
    error = cli_error(capsys, '--model', str(tmp_path / 'nowhere'), '--benchmarks', 'SYNTH_CHART',
                      '--data-root', str(setup['data']), '--out', str(tmp_path / 'out'))
    assert error.startswith(f'error: --model {tmp_path / "nowhere"}: directory not found')


def test_changed_generation_settings_refuse_to_mix_predictions(setup, clean_run, capsys, tmp_path):
    clean_out, _ = clean_run
    out = tmp_path / 'out'
    shutil.copytree(clean_out / 'tiny-run', out / 'tiny-run')
    error = cli_error(capsys, '--model', str(setup['export']), '--benchmarks', 'SYNTH_CHART', '--data-root',
                      str(setup['data']), '--out', str(out), '--max-new-tokens', '9', '--device', 'cpu')
    assert error == (f"error: {out / 'tiny-run' / 'generation.json'}: existing predictions were generated with "
                     f"max_new_tokens=6, this run asks for 9; pass --overwrite or choose another --out / --model-name")
