"""eval.score against the VLMEvalKit snapshots dev.sh installs, row by row, on generated prediction sets.

For every benchmark scored by exact matching (SimpleVQA needs an LLM judge: see
test_simplevqa_judge_crosscheck.py) and every installed snapshot: VLMEvalKit stores the
predictions as its run does (.xlsx and .tsv) and scores them with its own dataset `evaluate`;
eval.score, in that snapshot's mode, scores the same files and eval.run's JSONL of the same rows.
"""
import pytest

from crosscheck import FORMATS, KEYS, installed_snapshots, run_crosscheck
from eval.score import row_hits_file
from eval.vlmevalkit_versions import PACKAGE_VERSIONS

SNAPSHOTS = installed_snapshots()
pytestmark = [pytest.mark.skipif(not SNAPSHOTS, reason='no VLMEvalKit installed (./dev.sh installs the pinned ones)'),
              pytest.mark.slow]  # VLMEvalKit's own evaluate, in a process per snapshot

# nvidia-vlmeval 26.3's OCRBench writes its score dict to the prediction path with '.xlsx'
# replaced by '_score.json'; a .tsv prediction file is thus overwritten with a dict, which fails.
KNOWN_VLMEVAL_FAILURES = {('nvidia-vlmeval-26.3', 'OCRBench', 'tsv'): "AttributeError: 'dict' object has no attribute "
                                                                      "'to_csv'"}


@pytest.fixture(scope='module')
def crosscheck(tmp_path_factory):
    root = tmp_path_factory.mktemp('crosscheck')
    return root, run_crosscheck(root, SNAPSHOTS)


def test_dev_sh_installs_every_pinned_snapshot():
    assert set(SNAPSHOTS) == set(PACKAGE_VERSIONS.values())


@pytest.mark.parametrize('key', KEYS)
def test_scores_equal_vlmevalkits_own_evaluate_row_by_row(crosscheck, key):
    _, report = crosscheck
    for version, per_key in report.items():
        entry = per_key[key]
        formats = [fmt for fmt in FORMATS if (version, key, fmt) not in KNOWN_VLMEVAL_FAILURES]
        assert entry['rows'] >= 200 * len(formats), (version, key)
        assert entry['row_disagreements'] == [], (version, key, entry['row_disagreements'][:5])
        assert entry['aggregate_disagreements'] == [], (version, key, entry['aggregate_disagreements'][:2])
        expected = [f'{variant}/{fmt}: {message}' for (v, k, fmt), message in KNOWN_VLMEVAL_FAILURES.items()
                    if (v, k) == (version, key) for variant in ('main', 'numeric')]
        assert entry['errors'] == expected, (version, key)


@pytest.mark.parametrize('key, versions', [
    ('MMStar', ('main', 'ms-vlmeval-0.0.20')),                      # "answer is X"
    ('MMMU_DEV_VAL', ('ms-vlmeval-0.0.20', 'nvidia-vlmeval-26.3')),  # letter window, length guard
    ('TextVQA_VAL', ('ms-vlmeval-0.0.20', 'nvidia-vlmeval-26.3')),   # period after a digit
    ('ChartQA_TEST', ('ms-vlmeval-0.0.20', 'nvidia-vlmeval-26.3')),  # relaxed_correctness argument order
])
def test_the_sets_tell_the_versions_apart(crosscheck, key, versions):
    """The generated rows exercise the rules that differ: another version's rules disagree somewhere."""
    root, _ = crosscheck
    installed = [v for v in versions if v in SNAPSHOTS]
    file = root / 'work' / installed[0] / 'main' / FORMATS[0] / key / f'ViQ-MLLM_{key}.{FORMATS[0]}'
    data_root = root / 'data' / 'main'
    first, second = (row_hits_file(key, file, data_root, version) for version in versions)
    assert first != second
