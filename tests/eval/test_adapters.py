"""VLMEvalKit and lm-eval adapters: broken installs fail in one line, core computations on the tiny export."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.synthetic import make_synthetic_dataset
from eval.adapters import lm_eval as lm_adapter
from eval.adapters import vlmevalkit
from eval.adapters.lm_eval import (ExportTextModel, continuation_logprobs, cut_at_stop, encode_pair, prefix_token_id,
                                   rolling_windows)
from eval.benchmarks import get_benchmark
from eval.generate import MLLMGenerator
from test_run import build_tiny_export

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # two shared cores: two-thread matmuls stall
    yield build_tiny_export(tmp_path_factory.mktemp('adapters'))
    torch.set_num_threads(previous)


@pytest.fixture(scope='module')
def text_model(export):
    return ExportTextModel(str(export), 'cpu', 'fp32', batch_size=3, max_length=None, max_gen_toks=8)


# --------------------------------------------------------------------------- VLMEvalKit


def run_with_broken(package: str, error: str, code: str, tmp_path):
    """Run `code` where importing `package` raises RuntimeError(error), as a broken install does."""
    site = tmp_path / 'site'
    (site / package).mkdir(parents=True)
    (site / package / '__init__.py').write_text(f'raise RuntimeError({error!r})\n')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(), done.stderr


def test_a_torchvision_that_cannot_be_imported_gets_a_placeholder(tmp_path):
    """The index's torchvision next to the CPU torch dies with a RuntimeError at import time."""
    lines, _ = run_with_broken(
        'torchvision', 'operator torchvision::nms does not exist',
        'from eval.adapters.vlmeval_import import ensure_torchvision_importable\n'
        'print(ensure_torchvision_importable())\n'
        'from torchvision.transforms import InterpolationMode\n'
        'import torchvision.transforms as T\n'
        'class Aug(T.Compose): pass\n'
        'mode = InterpolationMode.BICUBIC\n'
        'try:\n    T.Resize(224)\nexcept RuntimeError as e:\n    print(e)\n', tmp_path)
    assert lines == [
        'RuntimeError: operator torchvision::nms does not exist',
        'torchvision.transforms.Resize is unavailable: torchvision could not be imported (RuntimeError: operator '
        'torchvision::nms does not exist); VLMEvalKit was imported with a placeholder in its place']


def test_a_broken_vlmeval_is_a_one_line_import_error(tmp_path):
    lines, _ = run_with_broken(
        'vlmeval', 'CUDA driver version is insufficient',
        'import eval.adapters.vlmevalkit as adapter\n'
        'print(adapter.as_message_list("text only"))\n'
        'try:\n    adapter.ViQMLLMVLMEval\nexcept ImportError as e:\n    print(e)\n', tmp_path)
    assert lines == [
        "[{'type': 'text', 'value': 'text only'}]",
        f'{vlmevalkit.MISSING_VLMEVAL} (importing it failed: RuntimeError: CUDA driver version is insufficient)']


def test_vlmevalkit_message_forms(tmp_path):
    image = tmp_path / 'a.jpg'
    image.write_bytes(b'')
    assert vlmevalkit.as_message_list([str(image), 'What is it?']) == [
        {'type': 'image', 'value': str(image)}, {'type': 'text', 'value': 'What is it?'}]
    assert vlmevalkit.as_message_list('just text') == [{'type': 'text', 'value': 'just text'}]
    with pytest.raises(ValueError, match='expected a dict with type/value or a string'):
        vlmevalkit.as_message_list([3])


def test_vlmevalkit_answer_is_the_eval_run_answer(export, tmp_path):
    make_synthetic_dataset(tmp_path / 'synthetic', 12, seed=1, val_fraction=0.5)
    benchmark = get_benchmark('SYNTH_SHAPES')
    record = benchmark.load(tmp_path / 'synthetic' / 'vlmeval')[0]
    message = benchmark.build_prompt(record, tmp_path / 'images')   # VLMEvalKit hands over file paths
    generator = MLLMGenerator(export, device='cpu')
    answer = vlmevalkit.answer_message(generator, [m['value'] for m in message], max_new_tokens=5)
    assert answer == generator.generate([message], max_new_tokens=5)[0] and answer


# --------------------------------------------------------------------------- lm-eval


def test_a_broken_lm_eval_leaves_the_module_importable(tmp_path):
    lines, stderr = run_with_broken(
        'lm_eval', 'incompatible torch',
        'import eval.adapters.lm_eval as adapter\n'
        'try:\n    adapter.ViQMLLMLM(pretrained="x")\nexcept ImportError as e:\n    print(e)\n'
        'print(adapter.main(["--tasks", "hellaswag"]))\n', tmp_path)
    assert lines == [f'{lm_adapter.MISSING_LM_EVAL} (RuntimeError: incompatible torch)', '2']
    assert stderr == f'error: {lm_adapter.MISSING_LM_EVAL}\n'


def test_encode_pair_follows_the_hf_model_rules(text_model):
    tokenizer = text_model.tokenizer
    context, continuation = encode_pair(tokenizer, 'The sky is ', 'blue')
    assert context == tokenizer.encode('The sky is', add_special_tokens=False)
    assert continuation == tokenizer.encode('The sky is blue', add_special_tokens=False)[len(context):]
    assert tokenizer.decode(continuation) == ' blue'
    assert encode_pair(tokenizer, '', 'Hello') == ([prefix_token_id(tokenizer)], tokenizer.encode('Hello'))
    assert prefix_token_id(tokenizer) == tokenizer.eos_token_id   # Qwen2.5 has no bos token
    # An empty context whose continuation starts with the prefix token: that token is the context.
    prefix = tokenizer.decode([prefix_token_id(tokenizer)])
    assert encode_pair(tokenizer, '', prefix + 'Hello') == ([prefix_token_id(tokenizer)], tokenizer.encode('Hello'))


def manual_logprob(llm, context, continuation, max_length):
    ids = (context + continuation)[-(max_length + 1):]
    with torch.no_grad():
        logits = llm(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    scores = F.log_softmax(logits, dim=-1)[-len(continuation):]
    target = torch.tensor(continuation)
    return scores.gather(-1, target[:, None]).sum().item(), bool(torch.equal(scores.argmax(-1), target))


def test_loglikelihood_matches_a_manual_forward(text_model):
    llm = text_model.model.llm
    pairs = [([9707, 11, 1879], [0, 15, 220]), ([785], [1879]), (list(range(100, 130)), [42, 43, 44, 45]),
             ([151643], [3838, 374])]
    got = continuation_logprobs(llm, pairs, max_length=1024, batch_size=3)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        expected, expected_greedy = manual_logprob(llm, context, continuation, 1024)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    # The input is cut from the left to max_length, as lm-eval does.
    short = continuation_logprobs(llm, pairs[2:3], max_length=6)[0]
    assert short[0] == pytest.approx(manual_logprob(llm, *pairs[2], 6)[0], abs=1e-4)
    assert short[0] != pytest.approx(got[2][0], abs=1e-3)


def test_greedy_flag_is_true_for_the_greedy_continuation(text_model):
    llm = text_model.model.llm
    context = [9707, 11, 1879]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(llm(input_ids=torch.tensor([context + greedy])).logits[0, -1].argmax()))
    (_, is_greedy), (_, other) = continuation_logprobs(llm, [(context, greedy), (context, greedy[:2] + [greedy[2] + 1])],
                                                       max_length=64)
    assert is_greedy and not other


def test_rolling_windows_cover_every_token_once():
    assert rolling_windows(list(range(1, 11)), 0, 4) == [([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]), ([6, 7, 8], [9, 10])]
    assert rolling_windows([1, 2, 3], 0, 4) == [([0], [1, 2, 3])]
    assert rolling_windows([], 0, 4) == []
    with pytest.raises(ValueError, match='max_length must be >= 1'):
        rolling_windows([1], 0, 0)


def test_loglikelihood_rolling_is_the_sum_over_windows(text_model):
    text = 'Discrete vision codes should not hurt the language model.'
    tokens = text_model.tokenizer.encode(text, add_special_tokens=False)
    prefix = prefix_token_id(text_model.tokenizer)
    # Fits one window: the log-probability of the whole text after the prefix token.
    whole, _ = manual_logprob(text_model.model.llm, [prefix], tokens, 1024)
    assert text_model.loglikelihood_rolling([text])[0] == pytest.approx(whole, abs=1e-4)
    # Several windows: the sum of each window's manual score.
    text_model.max_length = 4
    try:
        windowed = text_model.loglikelihood_rolling([text, text[:20]])
    finally:
        text_model.max_length = int(text_model.model.config.max_position_embeddings)
    expected = sum(manual_logprob(text_model.model.llm, c, t, 4)[0] for c, t in rolling_windows(tokens, prefix, 4))
    assert windowed[0] == pytest.approx(expected, abs=1e-4)
    assert windowed[0] != pytest.approx(whole, abs=1e-3)


def test_generate_until_is_greedy_text_cut_at_the_stop_string(text_model):
    contexts = ['Question: what colour is the sky?\nAnswer:', 'Hello']
    free = text_model.generate_until([(c, {'until': [], 'max_gen_toks': 8}) for c in contexts])
    assert all(free) and free[0] != free[1]
    single = [text_model.generate_until([(c, {'until': [], 'max_gen_toks': 8})])[0] for c in contexts]
    assert free == single
    stop = free[0][3:5]
    cut = text_model.generate_until([(contexts[0], {'until': [stop], 'max_gen_toks': 8}),
                                     (contexts[1], {'until': 'zzzz-not-there', 'max_gen_toks': 8})])
    assert cut == [free[0][:free[0].find(stop)], free[1]]
    assert cut_at_stop('a.b\nc', ['\n', '.']) == 'a' and cut_at_stop('abc', ['', 'x']) == 'abc'
