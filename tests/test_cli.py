import re

import pytest

from tests.helpers import ROOT, run_script

COMMON = ['--batch-size', '--epochs', '--lr', '--ipc', '--epochs-eval', '--test-interval', '--eval-interval',
          '--aug-type', '--mixup-net', '--mix-p', '--seed', '--tag', '--data', '--data-dir', '--output-dir',
          '--logs-dir', '--eval-model', '--eval-lr', '--dim-noise', '--num-classes', '--weight',
          '--device', '--num-workers', '--no-progress']
OWN = {'gen_condense.py': [], 'validate.py': ['--pretrain-weight'],
       'pool_match.py': ['--match', '--match-aug', '--metric', '--epochs-match-train', '--bias', '--fc']}
DEFAULTS = {'gen_condense.py': ('128', '150', '0.0001'), 'pool_match.py': ('64', '100', '5e-06'),
            'validate.py': ('128', '250', '0.0001')}


@pytest.mark.parametrize('script', sorted(OWN))
def test_help_lists_the_official_flags_with_per_script_defaults(script, tmp_path):
    out = run_script(script, '--help', cwd=tmp_path)
    assert out.returncode == 0
    text = ' '.join(out.stdout.split())
    for flag in COMMON + OWN[script]:
        assert flag in text, flag
    batch, epochs, lr = DEFAULTS[script]
    assert re.search(rf'--batch-size BATCH_SIZE [^(]*\(default: {batch}\)', text)
    assert re.search(rf'--epochs EPOCHS [^(]*\(default: {epochs}\)', text)
    assert re.search(rf'--lr LR [^(]*\(default: {re.escape(lr)}\)', text)
    for flag, default in (('--ipc IPC', '50'), ('--epochs-eval EPOCHS_EVAL', '1000'),
                          ('--test-interval TEST_INTERVAL', '200'), ('--aug-type AUG_TYPE', 'color_crop_cutout'),
                          ('--seed SEED', '3407'), ('--output-dir OUTPUT_DIR', './results/'),
                          ('--logs-dir LOGS_DIR', './logs/')):
        assert re.search(rf'{flag} [^(]*\(default: {re.escape(default)}\)', text), flag
    if script == 'pool_match.py':
        assert "--match {logit,feat,grad}" in text and '(default: logit)' in text
        assert '--epochs-match-train EPOCHS_MATCH_TRAIN' in text and '(default: 16)' in text


@pytest.mark.parametrize('script,args,message', [
    ('gen_condense.py', ['--data', 'imagenet21k'], "unknown dataset 'imagenet21k'"),
    ('gen_condense.py', ['--data', 'digits', '--eval-model', 'vgg99'], 'unknown --eval-model vgg99'),
    ('gen_condense.py', ['--data', 'digits', '--dim-noise', '5'], 'smaller than the 10 classes'),
    ('gen_condense.py', ['--data', 'digits', '--ipc', '0'], '--ipc must be at least 1'),
    ('gen_condense.py', ['--data', 'digits', '--batch-size', '5000'], 'larger than the 1437 training images'),
    ('gen_condense.py', ['--data', 'digits', '--num-classes', '7'], '--num-classes 7'),
    ('pool_match.py', ['--data', 'digits'], 'needs --weight'),
    ('pool_match.py', ['--data', 'digits', '--match', 'pixels', '--weight', 'x.pth'], "invalid choice: 'pixels'"),
    ('pool_match.py', ['--data', 'digits', '--weight', 'missing.pth'], 'checkpoint not found: missing.pth'),
    ('validate.py', ['--data', 'digits'], 'needs --pretrain-weight'),
    ('validate.py', ['--data', 'digits', '--device', 'cuda', '--pretrain-weight', 'x.pth'], None),
])
def test_bad_input_is_one_line_and_exit_2(script, args, message, tmp_path):
    out = run_script(script, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
    if message:
        assert message in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written for a refused run
