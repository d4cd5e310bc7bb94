"""Bad input: one line on stderr, exit status 2, no traceback, and no file created or changed.

Every case runs as its own process (forked from tests/forkserver.py, which saves the ~5 s of imports
each; a few run in a fresh interpreter as well) inside a workspace holding a finished run, and the
whole workspace (results/, logs/, data, checkpoints) is fingerprinted before and after.
"""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_imagefolder
from data.datasets import load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = 'results/good/last.pth'  # a stage-1 run on ./imgs (3 classes, 28 px)


def base(data='imgs'):
    return ['--data', 'imagefolder', '--data-dir', data, '--img-size', '28', '--width', '8', '--batch-size', '4',
            '--epochs', '1', '--eval-model', 'convnet', '--ipc', '1', '--epochs-eval', '1', '--test-interval', '1',
            '--eval-interval', '1', '--deterministic', '--no-progress', '--tag', 'new']


S1, S2, S3 = 'gen_condense.py', 'pool_match.py', 'validate.py'
CASES = {
    # flags and names
    'unknown dataset': (S1, base() + ['--data', 'nosuch']),
    'unknown eval model': (S1, base() + ['--eval-model', 'nosuch']),
    'unknown match type': (S2, base() + ['--weight', GOOD, '--match', 'nosuch']),
    'unknown pool model': (S2, base() + ['--weight', GOOD, '--pool', 'convnet', 'nosuch']),
    'CUDA graphs on the CPU': (S2, base() + ['--weight', GOOD, '--cuda-graphs', 'on', '--device', 'cpu']),
    'unknown augmentation': (S1, base() + ['--aug-type', 'color_nosuch']),
    'unknown flag': (S1, base() + ['--no-such-flag']),
    'not a number': (S1, base() + ['--epochs', 'ten']),
    'ipc 0': (S1, base() + ['--ipc', '0']),
    'batch size 0': (S1, base() + ['--batch-size', '0']),
    'batch larger than the data': (S1, base() + ['--batch-size', '1000']),
    'noise smaller than the classes': (S1, base() + ['--dim-noise', '2']),
    'class count the data lacks': (S1, base() + ['--num-classes', '5']),
    'negative momentum': (S3, base() + ['--baseline', 'random', '--momentum', '-0.1']),
    'negative weight decay': (S1, base() + ['--weight-decay', '-1e-4']),
    'pool learning rate 0': (S2, base() + ['--weight', GOOD, '--pool-lr', '0']),
    'unknown test BN mode': (S3, base() + ['--baseline', 'random', '--test-bn', 'eval']),
    'stage 2 without weights': (S2, base()),
    'validate without weights': (S3, base()),
    # checkpoints
    'missing checkpoint': (S1, base() + ['--weight', 'nosuch.pth']),
    'truncated checkpoint': (S1, base() + ['--weight', 'truncated.pth']),
    'corrupt checkpoint': (S1, base() + ['--weight', 'random.pth']),
    'empty checkpoint': (S1, base() + ['--weight', 'empty.pth']),
    'text file as checkpoint': (S2, base() + ['--weight', 'text.pth']),
    'checkpoint of another dataset': (S1, base() + ['--data', 'digits', '--weight', GOOD]),
    'checkpoint of another class count': (S2, base('imgs4') + ['--weight', GOOD]),
    'checkpoint of another image size': (S1, base() + ['--img-size', '32', '--weight', GOOD]),
    'validate: truncated checkpoint': (S3, base() + ['--pretrain-weight', 'truncated.pth']),
    'validate: another class count': (S3, base('imgs4') + ['--pretrain-weight', GOOD]),
    # data
    'image folder without images': (S1, base('empty')),
    'image folder with one class': (S1, base('oneclass')),
    'image folder that does not exist': (S1, base('nosuch')),
    # output folders (tests run as root: "not writable" is a file in the way)
    'output dir is a file': (S1, base() + ['--output-dir', 'afile']),
    'output dir under a file': (S1, base() + ['--output-dir', 'afile/results']),
    'logs dir is a file': (S1, base() + ['--logs-dir', 'afile']),
    'run folder is a file': (S1, base() + ['--tag', 'afile', '--output-dir', '.']),
    'validate: output dir is a file': (S3, base() + ['--pretrain-weight', GOOD, '--output-dir', 'afile']),
    # resume
    'resume with nothing to resume': (S1, base() + ['--resume']),
    'resume a missing file': (S1, base() + ['--resume', 'nosuch.pth']),
    'resume a truncated file': (S1, base() + ['--resume', 'truncated.pth']),
    'resume a corrupt file': (S1, base() + ['--resume', 'random.pth']),
    'resume another stage': (S2, base() + ['--resume', '--tag', 'good']),
    'resume on another dataset': (S1, ['--resume', '--tag', 'good', '--data', 'digits']),
    'resume at another image size': (S1, ['--resume', '--tag', 'good', '--img-size', '32']),
    'resume with another learning rate': (S1, ['--resume', '--tag', 'good', '--lr', '0.1']),
    'resume where the data changed': (S1, ['--resume', '--tag', 'good', '--data-dir', 'imgs4']),
}
if not torch.cuda.is_available():
    CASES['CUDA asked for, none present'] = (S1, base() + ['--device', 'cuda'])
FRESH = ['unknown match type', 'resume a corrupt file']  # also in a new interpreter (argparse; torch.load)


def fingerprint(root):
    """Every path under root with its kind, size, mtime and content hash."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            seen[os.path.relpath(os.path.join(folder, d), root)] = 'dir'
        for f in files:
            path = os.path.join(folder, f)
            st = os.stat(path)
            with open(path, 'rb') as fh:
                seen[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns,
                                                     hashlib.sha256(fh.read()).hexdigest())
    return seen


@pytest.fixture(scope='module')
def workspace(tmp_path_factory, forks):
    """A finished stage-1 run (results/good, logs/good) and the bad files the cases point at."""
    ws = tmp_path_factory.mktemp('bad_input')
    out = tmp_path_factory.mktemp('bad_input_streams')
    make_imagefolder(ws / 'imgs')
    make_imagefolder(ws / 'imgs4', classes=4)
    make_imagefolder(ws / 'oneclass', classes=1)
    for split in ('train', 'test'):
        for c in ('a', 'b'):
            os.makedirs(ws / 'empty' / split / c)
        (ws / 'empty' / split / 'a' / 'notes.txt').write_text('not an image')
    for data, size in (('imgs', 28), ('imgs', 32), ('imgs4', 28)):  # cache the folder statistics now,
        load_dataset('imagefolder', str(ws / data), size)  # so that no case's load writes them
    flags = base() + ['--tag', 'good', '--save-every', '2']
    assert forks.run([S1] + flags, ws, out / 'good.out', out / 'good.err') == 0, (out / 'good.err').read_text()
    good = (ws / GOOD).read_bytes()
    (ws / 'truncated.pth').write_bytes(good[:len(good) // 2])
    (ws / 'random.pth').write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (ws / 'empty.pth').write_bytes(b'')
    (ws / 'text.pth').write_text('generator: none\n')
    (ws / 'afile').write_text('a file, not a folder\n')
    return ws, out


def check_refused(status, stderr, stdout, before, after):
    lines = stderr.strip().splitlines()
    assert status == 2, (status, stderr, stdout[-2000:])
    assert len(lines) == 1, stderr
    assert 'Traceback' not in stderr + stdout, stderr
    assert 'error' in lines[0], stderr
    assert before == after, sorted(set(before.items()) ^ set(after.items()))


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_refused_cleanly(workspace, forks, case):
    ws, out = workspace
    script, argv = CASES[case]
    name = case.replace(' ', '_').replace(':', '')
    before = fingerprint(ws)
    status = forks.run([script] + argv, ws, out / f'{name}.out', out / f'{name}.err', timeout=120)
    stderr, stdout = (out / f'{name}.err').read_text(), (out / f'{name}.out').read_text()
    check_refused(status, stderr, stdout, before, fingerprint(ws))


@pytest.mark.parametrize('case', FRESH)
def test_bad_input_refused_cleanly_fresh_interpreter(workspace, case):
    ws, _ = workspace
    script, argv = CASES[case]
    before = fingerprint(ws)
    proc = subprocess.run([sys.executable, os.path.join(REPO, script)] + argv, cwd=ws, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'})
    check_refused(proc.returncode, proc.stderr, proc.stdout, before, fingerprint(ws))
