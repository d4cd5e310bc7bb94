"""Never lose a run: exact resume after SIGTERM/SIGINT (both stages, mid-epoch, at and after an epoch
boundary, inside a validation), SIGKILL at random moments with atomic checkpoints, NaN stops.

Runs use a tiny image folder (3 classes, 24 training images: 6 iterations per epoch at batch 4) and
8-channel GANs on one CPU thread, so a whole run takes seconds. In-process runs let a test send the
signal at an exact point of the loop; the SIGKILL chain uses real processes (tests/forkserver.py).
"""
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import gen_condense
import pool_match
import utils.evaluate as evaluate
from conftest import make_imagefolder
from utils.checkpoint import LAST, TMP_PREFIX, load_checkpoint, save_checkpoint
from data.errors import UserError
from utils.run import GanRun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS_PER_EPOCH = 6  # 24 training images / batch 4


def base_flags(data_dir):
    return ['--data', 'imagefolder', '--data-dir', str(data_dir), '--img-size', '28', '--width', '8',
            '--batch-size', '4', '--eval-model', 'convnet', '--ipc', '1', '--epochs-eval', '2',
            '--test-interval', '2', '--print-freq', '1', '--deterministic', '--no-progress', '--seed', '1']


def stage1_flags(data_dir):
    return base_flags(data_dir) + ['--epochs', '4', '--eval-interval', '2', '--save-every', '5']


def stage2_flags(data_dir, weight):
    return base_flags(data_dir) + ['--epochs', '3', '--eval-interval', '2', '--save-every', '4',
                                   '--weight', str(weight), '--lr', '1e-4', '--match', 'logit', '--match-aug',
                                   '--epochs-match-train', '2', '--pool', 'convnet', 'resnet10']


def run_inprocess(module, argv, monkeypatch):
    """`python <module>.py ARGV` inside the test process; returns the exit status."""
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py'] + [str(a) for a in argv])
    try:
        module.run(module.main)
    except SystemExit as e:
        return e.code
    return 0


class Stopper:
    """Sends this process a signal at one chosen point of a run, as a scheduler would: after the
    k-th iteration's step ('iteration', k), right after epoch e ended ('epoch_end', e), or inside the
    validation that follows epoch e, after its first classifier batch ('validation', e)."""

    def __init__(self, monkeypatch):
        self.event = None
        self.validating = None
        after_iteration, end_epoch, run_validate = GanRun.after_iteration, GanRun.end_epoch, GanRun.validate
        generated_batch = evaluate.generated_batch
        stopper = self

        def patched_after_iteration(run, metrics, save_extra=None):
            stopper.fire('iteration', run.iteration + 1)
            return after_iteration(run, metrics, save_extra)

        def patched_end_epoch(run):
            end_epoch(run)
            stopper.fire('epoch_end', run.epoch)

        def patched_validate(run):
            stopper.validating = run.epoch
            try:
                return run_validate(run)
            finally:
                stopper.validating = None

        def patched_generated_batch(*args, **kwargs):
            if stopper.validating is not None:
                stopper.fire('validation', stopper.validating)
            return generated_batch(*args, **kwargs)

        monkeypatch.setattr(GanRun, 'after_iteration', patched_after_iteration)
        monkeypatch.setattr(GanRun, 'end_epoch', patched_end_epoch)
        monkeypatch.setattr(GanRun, 'validate', patched_validate)
        monkeypatch.setattr(evaluate, 'generated_batch', patched_generated_batch)

    def arm(self, kind, value, sig):
        self.event = (kind, value, sig)

    def fire(self, kind, value):
        if self.event is not None and self.event[:2] == (kind, value):
            sig, self.event = self.event[2], None
            os.kill(os.getpid(), sig)


def _tensors_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


def assert_same_state(path_a, path_b):
    """Bit-identical generator, discriminator, both optimizers, counters and best accuracies."""
    a, b = load_checkpoint(str(path_a)), load_checkpoint(str(path_b))
    for key in ('generator', 'discriminator', 'optim_g', 'optim_d'):
        _tensors_equal(a[key], b[key], key)
    for key in ('epoch', 'iteration', 'epoch_iteration', 'best', 'validate_pending'):
        assert a[key] == b[key], key
    assert (a.get('pool') is None) == (b.get('pool') is None)
    if a.get('pool') is not None:
        _tensors_equal(a['pool'], b['pool'], 'pool')


def saved(results, tag, name=LAST):
    return load_checkpoint(str(results / tag / name))


@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    make_imagefolder(tmp_path / 'imgs')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage1_signal_stops_resume_bit_identical(workdir, monkeypatch):
    data, results = workdir / 'imgs', workdir / 'results'
    flags = stage1_flags(data)
    assert run_inprocess(gen_condense, flags + ['--tag', 'ref'], monkeypatch) == 0

    stop = Stopper(monkeypatch)
    # (where the signal comes, which signal, --resume form, iteration last.pth then holds)
    segments = [
        (('iteration', 3), signal.SIGTERM, [], 3),  # mid-epoch 1
        (('iteration', ITERS_PER_EPOCH), signal.SIGINT, ['--resume'], 6),  # the epoch's last step
        (('epoch_end', 1), signal.SIGTERM, ['--resume', str(results / 'cut' / LAST)], 7),  # after it: next step
        (('validation', 2), signal.SIGTERM, ['--resume'], 12),  # inside it: last.pth from before it
        (('epoch_end', 4), signal.SIGINT, ['--resume'], 24),  # last epoch ended, final validation due
    ]
    for (kind, value), sig, resume, iteration in segments:
        stop.arm(kind, value, sig)
        code = run_inprocess(gen_condense, flags + ['--tag', 'cut'] + resume, monkeypatch)
        assert stop.event is None, f'the run never reached {kind} {value}'
        assert code == 128 + sig, (kind, value)
        ckpt = saved(results, 'cut')
        assert ckpt['iteration'] == iteration, (kind, value)
    assert saved(results, 'cut')['validate_pending']
    assert run_inprocess(gen_condense, flags + ['--tag', 'cut', '--resume'], monkeypatch) == 0

    assert_same_state(results / 'ref' / LAST, results / 'cut' / LAST)
    for epoch in (1, 3):  # after the 2nd and 4th epochs: named from 0
        assert_same_state(results / 'ref' / f'model_dict_{epoch}.pth', results / 'cut' / f'model_dict_{epoch}.pth')
    assert saved(results, 'cut')['best'] == saved(results, 'ref')['best'] != {}


def test_stage2_signal_stops_resume_bit_identical(workdir, monkeypatch):
    data, results = workdir / 'imgs', workdir / 'results'
    assert run_inprocess(gen_condense, base_flags(data) + ['--epochs', '1', '--eval-interval', '5',
                                                           '--tag', 'gan'], monkeypatch) == 0
    flags = stage2_flags(data, results / 'gan' / LAST)
    assert run_inprocess(pool_match, flags + ['--tag', 'ref'], monkeypatch) == 0

    stop = Stopper(monkeypatch)
    segments = [
        (('iteration', 2), signal.SIGTERM, [], 2),  # mid-epoch 1: pool model and its optimizer saved
        (('epoch_end', 1), signal.SIGINT, ['--resume'], 7),  # after the boundary: new pool model drawn
        (('validation', 2), signal.SIGTERM, ['--resume'], 12),  # inside the validation after epoch 2
        (('iteration', 3 * ITERS_PER_EPOCH), signal.SIGTERM, ['--resume'], 18),  # last step of the run
    ]
    for (kind, value), sig, resume, iteration in segments:
        stop.arm(kind, value, sig)
        code = run_inprocess(pool_match, flags + ['--tag', 'cut'] + resume, monkeypatch)
        assert stop.event is None, f'the run never reached {kind} {value}'
        assert code == 128 + sig, (kind, value)
        assert saved(results, 'cut')['iteration'] == iteration, (kind, value)
        assert saved(results, 'cut')['pool']['model'] is not None
    assert run_inprocess(pool_match, flags + ['--tag', 'cut', '--resume'], monkeypatch) == 0

    assert_same_state(results / 'ref' / LAST, results / 'cut' / LAST)
    assert_same_state(results / 'ref' / 'model_dict_convnet.pth', results / 'cut' / 'model_dict_convnet.pth')


def test_resume_keeps_the_runs_flags(workdir, monkeypatch, capsys):
    """A resumed run takes its flags from the checkpoint; a differing one is refused, not ignored;
    run-control flags (--epochs, --save-every, ...) may change."""
    flags = stage1_flags(workdir / 'imgs') + ['--tag', 'r']
    stop = Stopper(monkeypatch)
    stop.arm('iteration', 2, signal.SIGTERM)
    assert run_inprocess(gen_condense, flags, monkeypatch) == 128 + signal.SIGTERM
    before = os.stat(workdir / 'results' / 'r' / LAST).st_mtime_ns
    capsys.readouterr()
    assert run_inprocess(gen_condense, flags + ['--resume', '--lr', '0.5'], monkeypatch) == 2
    err = capsys.readouterr().err
    assert '--lr 0.5 differs from its 0.0001' in err and err.count('\n') == 1
    assert os.stat(workdir / 'results' / 'r' / LAST).st_mtime_ns == before
    stop.arm('iteration', 4, signal.SIGTERM)
    assert run_inprocess(gen_condense, ['--resume', '--tag', 'r', '--epochs', '9', '--save-every', '1'],
                         monkeypatch) == 128 + signal.SIGTERM
    ckpt = saved(workdir / 'results', 'r')
    assert ckpt['iteration'] == 4 and ckpt['args']['epochs'] == 9 and ckpt['args']['lr'] == 1e-4


def test_second_signal_stops_at_once(workdir, monkeypatch, capsys):
    """A second SIGTERM while the first one's checkpoint is being written: stop at once, exit 143,
    one line; last.pth stays the previous complete one and no partial file is left."""
    import utils.run as stage
    flags = stage1_flags(workdir / 'imgs') + ['--save-every', '2', '--tag', 'twice']
    stop = Stopper(monkeypatch)
    stop.arm('iteration', 3, signal.SIGTERM)
    write = stage.save_checkpoint

    def save_checkpoint(state, path):
        if state['iteration'] == 3:  # the save the first signal asked for
            def torn_save(obj, f):
                f.write(b'PK\x03\x04 part of a zip')
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler raises here
            monkeypatch.setattr(torch, 'save', torn_save)
        return write(state, path)
    monkeypatch.setattr(stage, 'save_checkpoint', save_checkpoint)
    assert run_inprocess(gen_condense, flags, monkeypatch) == 128 + signal.SIGTERM
    monkeypatch.setattr(torch, 'save', torch.serialization.save)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'second signal' in err and '(iteration 2)' in err, err
    assert saved(workdir / 'results', 'twice')['iteration'] == 2
    assert not glob.glob(str(workdir / 'results' / 'twice' / (TMP_PREFIX + '*')))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def _all_finite(path):
    ckpt = load_checkpoint(path)
    return all(t.isfinite().all() for key in ('generator', 'discriminator') for t in ckpt[key].values()
               if t.is_floating_point())


def test_nonfinite_loss_stops_stage1(workdir, monkeypatch, capsys):
    """An absurd learning rate: the run stops at once, exit 1, one line; nothing non-finite saved."""
    flags = base_flags(workdir / 'imgs') + ['--epochs', '3', '--eval-interval', '1', '--save-every', '1',
                                            '--lr', '1e30', '--tag', 'nan']
    assert run_inprocess(gen_condense, flags, monkeypatch) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert re.search(r'NaN or infinite at iteration \d+ \(epoch 1\); stopped without saving', err), err
    for path in glob.glob(str(workdir / 'results' / 'nan' / '*.pth')):
        assert _all_finite(path), path
    assert not glob.glob(str(workdir / 'results' / 'nan' / 'model_dict_*.pth'))


@pytest.mark.parametrize('where', ['loss', 'weights'])
def test_nonfinite_stop_names_step_and_last_good_checkpoint(workdir, monkeypatch, capsys, where):
    """The generator breaks in step 9 (epoch 2), after 8 good saves: through its loss, or only in its
    weights after the step (no loss shows it yet; the check before saving does)."""
    generator_step, discriminator_step = gen_condense.generator_step, gen_condense.discriminator_step
    calls = {'g': 0, 'd': 0}

    def poison(G):
        with torch.no_grad():
            next(G.parameters()).fill_(float('nan'))

    def g_step(G, *args, **kwargs):
        calls['g'] += 1
        if where == 'loss' and calls['g'] == 9:
            poison(G)
        return generator_step(G, *args, **kwargs)

    def d_step(G, *args, **kwargs):
        calls['d'] += 1
        out = discriminator_step(G, *args, **kwargs)
        if where == 'weights' and calls['d'] == 9:
            poison(G)
        return out
    monkeypatch.setattr(gen_condense, 'generator_step', g_step)
    monkeypatch.setattr(gen_condense, 'discriminator_step', d_step)
    flags = base_flags(workdir / 'imgs') + ['--epochs', '3', '--eval-interval', '1', '--save-every', '1',
                                            '--tag', 'nan']
    assert run_inprocess(gen_condense, flags, monkeypatch) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    last = os.path.join('.', 'results', 'nan', LAST)
    assert re.search(r'(at|by) iteration 9\b.*last good checkpoint: ' + re.escape(last) + r' \(iteration 8\)$', err), err
    assert saved(workdir / 'results', 'nan')['iteration'] == 8
    for path in glob.glob(str(workdir / 'results' / 'nan' / '*.pth')):
        assert _all_finite(path), path
    assert os.path.exists(workdir / 'results' / 'nan' / 'model_dict_0.pth')  # epoch 1 done (named from 0)
    assert not os.path.exists(workdir / 'results' / 'nan' / 'model_dict_1.pth')


def test_nonfinite_loss_stops_stage2_without_best(workdir, monkeypatch, capsys):
    data, results = workdir / 'imgs', workdir / 'results'
    assert run_inprocess(gen_condense, base_flags(data) + ['--epochs', '1', '--eval-interval', '5',
                                                           '--tag', 'gan'], monkeypatch) == 0
    flags = stage2_flags(data, results / 'gan' / LAST) + ['--eval-interval', '1', '--lr', '1e30',
                                                          '--save-every', '0', '--tag', 'nan']
    capsys.readouterr()
    assert run_inprocess(pool_match, flags, monkeypatch) == 1
    err = capsys.readouterr().err
    assert 'NaN or infinite' in err and 'last good checkpoint: none (nothing saved yet; the run started from' in err
    assert not (results / 'nan' / 'model_dict_convnet.pth').exists()
    assert not (results / 'nan' / LAST).exists()


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'ck.pth'
    state = {'dataset': {'name': 'digits'}, 'generator_config': {}, 'discriminator_config': {}}
    save_checkpoint({**state, 'generator': {'w': torch.ones(3)}}, str(path))
    plain = tmp_path / 'plain'
    with open(plain, 'wb'):
        pass
    # the permissions open() gives under this umask, not mkstemp's 0600
    assert oct(path.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)
    plain.unlink()

    def torn_save(obj, f):
        f.write(b'PK\x03\x04 half a zip')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(OSError):
        save_checkpoint({**state, 'generator': {'w': torch.zeros(3)}}, str(path))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(str(path))['generator']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ck.pth']  # no temporary file left behind

    path.write_bytes(path.read_bytes()[:100])  # what a non-atomic writer killed mid-way leaves
    with pytest.raises(UserError, match='truncated or not a checkpoint'):
        load_checkpoint(str(path))


# -------------------------------------------------------------------------------------------------
# real processes killed at random moments

CYCLES = 27  # 23 SIGKILLs, 2 SIGTERMs, 2 SIGINTs
GENTLE = {9: signal.SIGTERM, 14: signal.SIGINT, 19: signal.SIGTERM, 24: signal.SIGINT}
RESUMED = re.compile(r'^resumed from .*: epoch (\d+), iteration (\d+)', re.M)
ITER_LINE = re.compile(r'^epoch \d+ iter (\d+):', re.M)


def _wait_for(forks, pid, path, pattern, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and pattern.search(path.read_text()):
            return True
        if not forks.running(pid):
            return False
        time.sleep(0.01)
    return False


def test_sigkill_at_random_moments_never_loses_more_than_one_save(forks, tmp_path):
    make_imagefolder(tmp_path / 'imgs')
    procs = tmp_path / 'procs'
    procs.mkdir()
    results = tmp_path / 'results' / 'chain'
    save_every = 1
    flags = base_flags(tmp_path / 'imgs') + ['--eval-interval', '3', '--save-every', str(save_every)]
    rng = random.Random(20240305)
    reached = 0  # the highest iteration any process printed (printed before it is saved)
    resumes, torn = 0, 0
    for cycle in range(CYCLES):
        out, err = procs / f'{cycle}.out', procs / f'{cycle}.err'
        torn += len(glob.glob(str(results / (TMP_PREFIX + '*'))))  # partial writes of the previous kill
        argv = ['gen_condense.py'] + flags + ['--epochs', '1000', '--tag', 'chain'] + (['--resume'] if cycle else [])
        pid = forks.start(argv, tmp_path, out, err)
        sig = GENTLE.get(cycle, signal.SIGKILL)
        if cycle == 0 or sig != signal.SIGKILL:  # wait for training (and its signal handlers) to run
            assert _wait_for(forks, pid, out, ITER_LINE), (out.read_text(), err.read_text())
            time.sleep(rng.uniform(0, 0.3))
        elif rng.random() < 0.7:  # anywhere in training: steps, saves, validations
            _wait_for(forks, pid, out, RESUMED)
            time.sleep(rng.uniform(0, 0.8))
        else:  # anywhere from the start: imports done, reading the checkpoint, building, training
            time.sleep(rng.uniform(0, 1.0))
        os.kill(pid, sig)
        status = forks.wait(pid)
        text, errors = out.read_text(), err.read_text()
        assert 'Traceback' not in errors and not re.search('^error', errors, re.M), errors
        assert status == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), (cycle, status, text[-500:])
        m = RESUMED.search(text)
        if m:
            resumes += 1
            iteration = int(m.group(2))
            assert reached - save_every <= iteration <= reached, (cycle, iteration, reached)
        if sig != signal.SIGKILL:
            assert 'continue with --resume' in text
        reached = max([reached] + [int(i) for i in ITER_LINE.findall(text)])
        if sig != signal.SIGKILL:
            assert load_checkpoint(str(results / LAST))['iteration'] == reached  # stopped where it was
    assert resumes >= CYCLES // 2, f'only {resumes} of {CYCLES - 1} processes got as far as resuming'
    print(f'{CYCLES - len(GENTLE)} SIGKILLs, {resumes} resumes, {torn} partial checkpoint files left by kills, '
          f'{reached} iterations reached')

    # finish in a fresh interpreter, after one more SIGTERM there, then compare with a run never stopped
    epochs = load_checkpoint(str(results / LAST))['epoch'] + 2  # at least one whole epoch still to train
    final = flags + ['--epochs', str(epochs), '--tag', 'chain', '--resume']
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'gen_condense.py')] + final, cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if ITER_LINE.match(line):
            proc.send_signal(signal.SIGTERM)
            break
    rest, errors = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in errors, (proc.returncode, errors, rest)
    assert 'stopped by SIGTERM' in rest
    assert forks.run(['gen_condense.py'] + final, tmp_path, procs / 'final.out', procs / 'final.err') == 0
    assert forks.run(['gen_condense.py'] + flags + ['--epochs', str(epochs), '--tag', 'ref'], tmp_path,
                     procs / 'ref.out', procs / 'ref.err') == 0
    assert_same_state(tmp_path / 'results' / 'ref' / LAST, results / LAST)
    assert not glob.glob(str(results / (TMP_PREFIX + '*')))  # a start clears what kills left
