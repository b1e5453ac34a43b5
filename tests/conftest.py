from collections import Counter

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Files with the most `slow` tests run first; tests marked `gpu` need CUDA, without it they
    are skipped (and reported as skipped).

    Under xdist (`--dist loadfile`) each worker takes the next file when it finishes one: starting
    with the files that launch processes leaves the short ones to even out the end of the run.
    Within a file the order is unchanged (the sort is stable).
    """
    slow = Counter(item.path for item in items if "slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.path])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
