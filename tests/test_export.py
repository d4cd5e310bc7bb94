"""misc/export.py: the fixed distilled set other benchmarks load (images.pt, labels.pt, meta.json, png/)."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import DATASETS
from tests.helpers import save_tiny_generator
from tests.official import save_official
from data.errors import UserError
from validate import draw_fixed_set

ROOT = Path(__file__).resolve().parent.parent
INFO = DATASETS['digits']


def load_export_module():
    spec = importlib.util.spec_from_file_location('dim_export', ROOT / 'misc' / 'export.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def gen_ckpt(tmp_path_factory):
    """A tiny, untrained generator saved as a stage-1 checkpoint of this repository."""
    path = str(tmp_path_factory.mktemp('gen') / 'gen.pth')
    return path, save_tiny_generator(path, INFO, seed=1)


def test_export_round_trip(gen_ckpt, tmp_path):
    path, G = gen_ckpt
    out = tmp_path / 'set'
    cmd = [sys.executable, str(ROOT / 'misc' / 'export.py'), '--pretrain-weight', path, '--ipc', '3',
           '--out', str(out), '--seed', '11', '--png', '--device', 'cpu']
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the script finds the repository itself
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    images, labels = torch.load(out / 'images.pt'), torch.load(out / 'labels.pt')
    assert images.dtype == torch.float32 and images.shape == (30, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.tolist() == [c for c in range(10) for _ in range(3)]
    # the very set validate.py --protocol fixed --set-seed 11 trains on
    expected, _ = draw_fixed_set(G, INFO, 3, seed=11, device=torch.device('cpu'))
    torch.testing.assert_close(images, expected)

    with open(out / 'meta.json') as f:
        meta = json.load(f)
    assert meta['dataset'] == 'digits' and meta['ipc'] == 3 and meta['seed'] == 11
    assert meta['mean'] == list(INFO.mean) and meta['std'] == list(INFO.std)
    assert meta['images_shape'] == [30, 1, 28, 28] and meta['num_classes'] == 10
    assert meta['generator_sha256'] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert meta['generator_checkpoint'] == os.path.abspath(path)

    # the statistics undo the normalisation: pixels in [0, 1]
    mean = torch.tensor(meta['mean']).view(1, -1, 1, 1)
    std = torch.tensor(meta['std']).view(1, -1, 1, 1)
    pixels = images * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.std() > 0

    # png/<class>/: one folder per class, in class order, ipc images each, the same pixels (8 bit)
    folders = sorted(os.listdir(out / 'png'))
    assert folders == [str(c) for c in range(10)]
    for c, folder in enumerate(folders):
        files = sorted(os.listdir(out / 'png' / folder))
        assert len(files) == 3
        with Image.open(out / 'png' / folder / files[0]) as img:
            first = torch.from_numpy(np.array(img.convert('L'))).float() / 255
        assert (first - pixels[3 * c, 0]).abs().max() <= 1 / 255 + 1e-6


def test_export_errors_are_user_errors(gen_ckpt, tmp_path):
    export = load_export_module()
    with pytest.raises(UserError, match='checkpoint not found'):
        export.main(['--pretrain-weight', str(tmp_path / 'missing.pth'), '--ipc', '1'])
    with pytest.raises(UserError, match='--ipc must be at least 1'):
        export.main(['--pretrain-weight', gen_ckpt[0], '--ipc', '0'])
    with pytest.raises(UserError, match='trained on digits, not --data mnist'):
        export.main(['--pretrain-weight', gen_ckpt[0], '--ipc', '1', '--data', 'mnist'])


def test_export_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'misc' / 'export.py'), '--pretrain-weight',
                           str(tmp_path / 'missing.pth'), '--ipc', '1'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and proc.stderr.startswith('error: checkpoint not found')


@pytest.fixture(scope='module')
def official_ckpt(tmp_path_factory):
    """A checkpoint of the official implementation for 28-px 1-channel data (width 196, state dicts only)."""
    path = str(tmp_path_factory.mktemp('official') / 'official.pth')
    G0, *_ = save_official(path, 1, 28, seed=3)
    return path, G0


def test_export_from_an_official_checkpoint(official_ckpt, forks, tmp_path):
    """misc/export.py --pretrain-weight on an official file, as a user runs it: the images are those the
    official generator draws from the same noise."""
    path, G0 = official_ckpt
    out = tmp_path / 'set'
    status = forks.run(['misc/export.py', '--pretrain-weight', path, '--data', 'digits', '--ipc', '2', '--out', out,
                        '--seed', '5', '--device', 'cpu'], tmp_path, tmp_path / 'export.out', tmp_path / 'export.err')
    assert status == 0, (tmp_path / 'export.err').read_text()[-2000:]
    images, labels = torch.load(out / 'images.pt'), torch.load(out / 'labels.pt')
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    expected, _ = draw_fixed_set(G0, INFO, 2, seed=5, device=torch.device('cpu'))
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert images.std() > 0.01
    with open(out / 'meta.json') as f:
        assert json.load(f)['generator_sha256'] == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_export_refuses_an_official_checkpoint_for_other_data(official_ckpt):
    export = load_export_module()
    path = official_ckpt[0]
    with pytest.raises(UserError, match='is an official-format checkpoint: give --data'):
        export.main(['--pretrain-weight', path, '--ipc', '1'])
    with pytest.raises(UserError) as e:
        export.main(['--pretrain-weight', path, '--ipc', '1', '--data', 'cifar10'])
    assert str(e.value) == (f"{path} is an official-format checkpoint for 28-px 1-channel images of 10 classes, "
                            f"but cifar10 as the flags give it has 32-px 3-channel images of 10 classes")
