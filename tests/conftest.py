"""Fixtures shared by the run-level tests (test_resume.py, test_bad_input.py)."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forkserver import ForkServer  # noqa: E402


def make_imagefolder(root, classes=3, train=8, test=4, size=28, seed=0):
    """A tiny --data imagefolder tree of grey PNGs (class c is brighter than class c-1): real files
    through the real loader, but a training epoch of a few milliseconds."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (('train', train), ('test', test)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((size, size)) * 60 + c * 190 / max(1, classes - 1)).clip(0, 255)
                Image.fromarray(pixels.astype(np.uint8), 'L').save(os.path.join(folder, f'{i}.png'))
    return str(root)


@pytest.fixture(scope='session')
def forks():
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def one_thread():
    """CPU results depend on the thread count: in-process runs use one thread, as the children do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
