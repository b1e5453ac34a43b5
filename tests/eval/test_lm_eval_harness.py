"""The viq-mllm model inside lm-eval itself, against lm-eval's own `hf` model on the same export.

Local tasks of all three request types (multiple choice -> loglikelihood, perplexity ->
loglikelihood_rolling, generation with stop strings, max_gen_toks and an assistant prefill) run
through `lm_eval.simple_evaluate`, with and without the chat template. The documents hold what
broke the adapter before: special tokens in the text, a literal <|image_pad|>, an empty context
whose continuation starts with the prefix token.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from crosscheck import REPO
from test_run import build_tiny_export

pytestmark = pytest.mark.skipif(importlib.util.find_spec('lm_eval') is None,
                                reason='lm-eval not installed (./dev.sh installs the pinned one)')

DOCS = [
    {'q': 'What colour is the sky?', 'a': 'blue', 'choices': [' blue', ' green', ' red'], 'label': 0,
     'text': 'Discrete vision codes should not hurt the language model. The quick brown fox jumps over the dog.'},
    {'q': 'How many legs has a cat?', 'a': 'four', 'choices': [' two', ' four', ' six'], 'label': 1,
     'text': 'A second document, a little longer than the first one, to give the windows something to do.'},
    {'q': 'Name a prime <|image_pad|> number.', 'a': '7', 'choices': [' 4', ' 6', ' 7'], 'label': 2,
     'text': '<|im_end|>Hello with a special token and a literal <|image_pad|> in it.'},
    {'q': '', 'a': 'x', 'choices': ['<|im_end|>Hello', ' yes', 'no'], 'label': 0, 'text': 'Short.'},
]
TASKS = {
    'viq_mc': 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
              'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n',
    'viq_ppl': 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               'metric_list:\n  - metric: word_perplexity\n',
    'viq_gen': 'output_type: generate_until\ndoc_to_text: "Question: {{q}} {{text}}\\nAnswer:"\n'
               'doc_to_target: "{{a}}"\ngen_prefix: "The answer is"\n'
               'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
               'metric_list:\n  - metric: exact_match\n',
}


def write_tasks(root):
    (root / 'docs.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in DOCS))
    for name, body in TASKS.items():
        (root / f'{name}.yaml').write_text(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: '
                                           f'{root / "docs.jsonl"}\ntest_split: train\n{body}')
    return root


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('lm_eval')
    (root / 'tasks').mkdir()
    return {'export': build_tiny_export(root), 'tasks': write_tasks(root / 'tasks'), 'root': root}


@pytest.fixture(scope='module')
def samples(setup):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import eval.adapters.lm_eval  # noqa: F401  (registers viq-mllm)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    manager = TaskManager(include_path=str(setup['tasks']), include_defaults=False)   # lm-eval's own tasks: not needed
    out = {}
    try:
        for model, device in (('hf', 'cpu'), ('viq-mllm', None)):   # viq-mllm: no device given, as on the CLI
            for chat in (False, True):
                result = lm_eval.simple_evaluate(model=model, model_args=f"pretrained={setup['export']},dtype=auto",
                                                 tasks=list(TASKS), task_manager=manager, batch_size=4, device=device,
                                                 log_samples=True, apply_chat_template=chat)
                out[model, chat] = {task: [(s['arguments'], s['resps']) for s in result['samples'][task]]
                                    for task in TASKS}
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.mark.parametrize('chat', [False, True])
@pytest.mark.parametrize('task', list(TASKS))
def test_viq_mllm_answers_like_the_hf_model(samples, task, chat):
    hf, ours = samples['hf', chat][task], samples['viq-mllm', chat][task]
    assert [arguments for arguments, _ in ours] == [arguments for arguments, _ in hf]
    assert len(hf) == len(DOCS)
    for (_, expected), (_, got) in zip(hf, ours):
        if task == 'viq_gen':
            assert got == expected   # identical strings
            continue
        flat_expected = [x for response in expected for x in response]
        flat_got = [x for response in got for x in response]
        for e, g in zip(flat_expected, flat_got, strict=True):
            if isinstance(e, (list, tuple)):   # (log-likelihood, greedy)
                assert g[0] == pytest.approx(e[0], abs=1e-5) and g[1] == e[1]
            else:
                assert g == pytest.approx(e, abs=1e-5)


def test_chat_template_continues_the_assistant_prefill(samples):
    """With gen_prefix the prompt ends inside the assistant turn, not after a closed one."""
    prompts = [arguments[0][0] for arguments, _ in samples['viq-mllm', True]['viq_gen']]
    assert all(p.endswith('<|im_start|>assistant\nThe answer is') for p in prompts), prompts[0][-60:]


def test_empty_context_with_the_prefix_token_is_scored_like_hf(samples):
    arguments, _ = samples['viq-mllm', False]['viq_mc'][3]
    assert arguments[0] == ('', '<|im_end|>Hello')   # the case that used to differ


def test_documented_cli_runs_on_a_cpu_machine_without_device(setup):
    """`python -m eval.adapters.lm_eval` registers the model for lm-eval's own CLI, whose --device
    default (cuda:0) falls back to the CPU here."""
    done = subprocess.run(
        [sys.executable, '-m', 'eval.adapters.lm_eval', '--model', 'viq-mllm', '--model_args',
         f"pretrained={setup['export']}", '--tasks', 'viq_gen', '--include_path', str(setup['tasks']), '--limit', '1',
         '--output_path', str(setup['root'] / 'cli')],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-2000:]
    assert '|viq_gen|' in done.stdout.replace(' ', '')


def test_model_arguments_lm_eval_passes_are_checked(setup):
    from lm_eval.api.registry import get_model

    from eval.adapters.lm_eval import ModelArgumentError

    model = get_model('viq-mllm')
    with pytest.raises(ModelArgumentError) as error:
        model.create_from_arg_string(f"pretrained={setup['export']},max_lenght=16", {'batch_size': 4})
    assert str(error.value) == ("viq-mllm: unknown model argument 'max_lenght'; valid: pretrained, dtype, max_length, "
                                "max_gen_toks, batch_size, max_batch_size, device")
    with pytest.raises(ModelArgumentError, match=r"^viq-mllm: dtype='int8' is not one of auto, float32, fp32"):
        model.create_from_arg_string(f"pretrained={setup['export']},dtype=int8")
    assert get_model('hf').__name__ == 'HFLM'   # importing the adapter keeps lm-eval's own models
