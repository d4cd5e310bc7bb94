import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_imagefolder
from data.datasets import DATASETS
from models import Discriminator, Generator
from models.gan import OFFICIAL_DISCRIMINATOR_NAMES, OFFICIAL_GENERATOR_NAMES
from tests.official import save_official
from utils.checkpoint import (check_compatible, check_resumable, gan_configs, is_official, load_checkpoint,
                              load_state, save_checkpoint)
from data.errors import UserError
from utils.runtime import load_optimizer_state
from utils.run import adam

DIGITS = DATASETS['digits']


def _gan(width=8):
    G = Generator(10, 1, 28, dim_noise=64, width=width)
    D = Discriminator(10, 1, 28, width=width)
    return G, D


def _state(G, D):
    return {'generator': G.state_dict(), 'discriminator': D.state_dict(),
            'optim_g': adam(G.parameters(), 1e-4).state_dict(), 'optim_d': adam(D.parameters(), 1e-4).state_dict(),
            'dataset': DIGITS.to_dict(), 'generator_config': G.config, 'discriminator_config': D.config,
            'epoch': 3}


def test_round_trip_rebuilds_the_generator_without_flags(tmp_path):
    G, D = _gan()
    path = tmp_path / 'model_dict_3.pth'
    save_checkpoint(_state(G, D), path)
    assert sorted(os.listdir(tmp_path)) == ['model_dict_3.pth']  # no temporary file left behind
    ckpt = load_checkpoint(str(path))
    assert not is_official(ckpt)
    for key in ('generator', 'discriminator', 'optim_g', 'optim_d'):
        assert key in ckpt
    # flags that disagree with the stored sizes are ignored: the checkpoint describes itself
    g_cfg, d_cfg = gan_configs(ckpt, DIGITS)
    G2 = Generator(**g_cfg)
    load_state(G2, ckpt['generator'], path, 'generator')
    z = torch.randn(3, 64)
    G.eval(), G2.eval()
    assert torch.equal(G(z), G2(z))
    assert Discriminator(**d_cfg).load_state_dict(ckpt['discriminator'])


def test_checkpoint_for_other_data_is_refused(tmp_path):
    G, D = _gan()
    save_checkpoint(_state(G, D), tmp_path / 'c.pth')
    ckpt = load_checkpoint(str(tmp_path / 'c.pth'))
    with pytest.raises(UserError, match='trained on digits, but the flags ask for mnist'):
        check_compatible(ckpt, DATASETS['mnist'], 'c.pth')
    with pytest.raises(UserError, match='trained with 28 px images, but digits as the flags give it has 32 px images'):
        check_compatible(ckpt, replace(DIGITS, img_size=32), 'c.pth')
    with pytest.raises(UserError, match='trained with 10 classes, but digits as the flags give it has 7 classes'):
        check_compatible(ckpt, replace(DIGITS, num_classes=7), 'c.pth')


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all', None])
def test_unreadable_checkpoints_are_one_line_errors(tmp_path, content):
    path = tmp_path / 'bad.pth'
    if content is None:  # a real checkpoint cut in half
        G, D = _gan()
        save_checkpoint(_state(G, D), path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert '\n' not in str(e.value)


def test_missing_checkpoint():
    with pytest.raises(UserError, match='not found'):
        load_checkpoint('/nonexistent/model.pth')


# -- checkpoints of the official implementation -------------------------------------------------

# (channels, img_size, registration order of the official modules, a dataset of that shape)
OFFICIAL_CASES = {'32px': (3, 32, 'interleaved', DATASETS['cifar10']),
                  '28px': (1, 28, 'grouped', DIGITS)}


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """One official checkpoint per case (width 196, state dicts only), and the official networks and
    optimizers that wrote it."""
    folder = tmp_path_factory.mktemp('official')
    files = {}
    for case, (channels, size, order, _) in OFFICIAL_CASES.items():
        path = str(folder / f'official_{case}.pth')
        files[case] = (path, *save_official(path, channels, size, order=order, seed=len(files)))
    return files


def _rename(name, table):
    module, _, leaf = name.rpartition('.')
    return f'{table[module]}.{leaf}'


def _load_as_this_repo(path, info):
    """What every entry point does: load, check against the data, rebuild from the configs, load."""
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, info, path)
    g_cfg, d_cfg = gan_configs(ckpt, info)  # from the file alone: no flag enters
    G, D = Generator(**g_cfg), Discriminator(**d_cfg)
    load_state(G, ckpt['generator'], path, 'generator')
    load_state(D, ckpt['discriminator'], path, 'discriminator')
    return ckpt, G, D


@pytest.mark.parametrize('case', list(OFFICIAL_CASES))
def test_official_checkpoint_computes_what_the_official_networks_compute(official, case):
    channels, size, _, info = OFFICIAL_CASES[case]
    path, G0, D0, _, _ = official[case]
    ckpt, G, D = _load_as_this_repo(path, info)
    assert is_official(ckpt)
    assert ckpt['generator_config'] == dict(num_classes=10, channels=channels, img_size=size, dim_noise=100,
                                            width=196)
    assert ckpt['discriminator_config'] == dict(num_classes=10, channels=channels, img_size=size, width=196)
    for m in (G, D, G0, D0):
        m.eval()
    z = torch.randn(6, 100)
    z[:, :10] = F.one_hot(torch.arange(6), 10).float()
    x = torch.rand(6, channels, size, size) * 2 - 1
    with torch.no_grad():
        images = G(z)
        assert images.shape == (6, channels, size, size) and images.std() > 0.01
        assert torch.equal(images, G0(z))
        for inp in (x, images):
            critic, logits = D(inp)
            critic0, logits0 = D0(inp)
            assert torch.equal(critic, critic0.squeeze(1)) and torch.equal(logits, logits0)


@pytest.mark.parametrize('case', list(OFFICIAL_CASES))
def test_official_adam_state_lands_on_its_parameters(official, case):
    """The optimizer states index parameters by position; the official order (here 'grouped' for the
    28-px case: every conv before every norm) need not be this repository's. Each moment must reach the
    parameter it belongs to."""
    _, _, _, info = OFFICIAL_CASES[case]
    path, G0, D0, opt_g0, opt_d0 = official[case]
    ckpt, G, D = _load_as_this_repo(path, info)
    for ours, theirs, opt0, key, table in ((G, G0, opt_g0, 'optim_g', OFFICIAL_GENERATOR_NAMES),
                                           (D, D0, opt_d0, 'optim_d', OFFICIAL_DISCRIMINATOR_NAMES)):
        opt = adam(ours.parameters(), lr=5e-6)  # as GanRun builds it, then loads the file's state
        load_optimizer_state(opt, ckpt[key])
        params = dict(ours.named_parameters())
        assert len(opt.state) == len(params) == len(opt0.state)
        for name, p0 in theirs.named_parameters():
            state, state0 = opt.state[params[_rename(name, table)]], opt0.state[p0]
            for leaf in ('exp_avg', 'exp_avg_sq', 'step'):
                assert torch.equal(state[leaf], state0[leaf]), (name, leaf)


@pytest.mark.parametrize('order', ['interleaved', 'grouped'])
def test_training_continues_as_the_official_code_would(tmp_path, order):
    """One more Adam step on the loaded networks and on the official ones, from the same batch: the same
    loss and the same update, parameter by parameter (width 8: the loader reads any width)."""
    path = str(tmp_path / 'small.pth')
    G0, D0, opt_g0, opt_d0 = save_official(path, 3, 32, width=8, order=order)
    ckpt, G, D = _load_as_this_repo(path, DATASETS['cifar10'])
    torch.manual_seed(0)
    z, x = torch.randn(4, 100), torch.rand(4, 3, 32, 32) * 2 - 1
    for ours, theirs, opt0, key, table, inp in ((G, G0, opt_g0, 'optim_g', OFFICIAL_GENERATOR_NAMES, z),
                                                (D, D0, opt_d0, 'optim_d', OFFICIAL_DISCRIMINATOR_NAMES, x)):
        opt = adam(ours.parameters(), lr=5e-6)
        load_optimizer_state(opt, ckpt[key])
        losses = []
        for m, o in ((ours, opt), (theirs, opt0)):
            m.train()
            out = m(inp)
            loss = out.square().mean() if torch.is_tensor(out) else out[0].mean() + out[1].square().mean()
            o.zero_grad()
            loss.backward()
            o.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        params = dict(ours.named_parameters())
        for name, p0 in theirs.named_parameters():
            torch.testing.assert_close(params[_rename(name, table)].detach(), p0.detach(), rtol=0, atol=1e-6)


def test_official_checkpoint_for_other_data_is_one_line_error(official):
    path = official['28px'][0]
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, DATASETS['mnist'], path)  # 28 px, 1 channel, 10 classes: fits
    with pytest.raises(UserError) as e:
        check_compatible(ckpt, DATASETS['cifar10'], path)
    assert str(e.value) == (f"{path} is an official-format checkpoint for 28-px 1-channel images of 10 classes, "
                            f"but cifar10 as the flags give it has 32-px 3-channel images of 10 classes")


def _small_official(tmp_path, channels=1, size=28, **kwargs):
    """A width-8 official checkpoint as a dict (the loader reads any width), for cheap variations."""
    path = tmp_path / 'small.pth'
    save_official(path, channels, size, width=8, steps=1, **kwargs)
    return torch.load(path)


def _state_dicts(ckpt):
    return {k: dict(v) if isinstance(v, dict) else v for k, v in ckpt.items()}


def _variants(tmp_path):
    """(what is wrong, expected message) -> a mutated official checkpoint."""
    base = _small_official(tmp_path)
    other = _small_official(tmp_path, channels=3, size=32)

    def change(what, key=None, value=None, drop=None):
        c = _state_dicts(base)
        if drop:
            del c[what][drop]
        else:
            c[what][key] = value
        return c

    opt_short = {**base['optim_d'], 'param_groups': [{**base['optim_d']['param_groups'][0],
                                                      'params': base['optim_d']['param_groups'][0]['params'][:-1]}]}
    ids = base['optim_g']['param_groups'][0]['params']  # fc1.weight's state given to bn0.weight's position
    opt_shifted = {**base['optim_g'], 'state': {ids[i]: base['optim_g']['state'][ids[(i + 1) % len(ids)]]
                                                for i in range(len(ids))}}
    return {
        'missing name': (change('generator', drop='bn3.running_var'), 'generator does not have the layout '
                         'of the DiM generator (missing bn3.running_var)'),
        'unexpected name': (change('discriminator', 'ln9.weight', torch.ones(3)),
                            'discriminator does not have the layout of the DiM discriminator (unexpected ln9.weight)'),
        'wrong shape': (change('generator', 'conv5.weight', torch.zeros(8, 8, 3, 3)),
                        'generator has tensors of the wrong shape: conv5.weight [8, 8, 3, 3] (expected [8, 8, 4, 4])'),
        'no fc1': (change('generator', drop='fc1.weight'), 'its generator has no fc1.weight'),
        'odd kernel': (change('generator', 'conv1.weight', torch.zeros(8, 8, 5, 5)), 'generator conv1 has kernel 5'),
        'fc1 not 4x4': (change('generator', 'fc1.weight', torch.zeros(100, 100)), 'fc1 has 100 outputs'),
        'G and D for other data': ({**base, 'discriminator': other['discriminator']},
                                   'its generator makes 28-px 1-channel images, but its discriminator takes '
                                   '32-px 3-channel ones'),
        'not a state dict': ({**base, 'generator': [1, 2]}, 'its generator is not a state dict of tensors'),
        'foreign names': ({**base, 'generator': {'w': torch.ones(3)}}, 'its generator has neither the official '
                          'names (fc1, bn0, conv1, ...) nor this repository'),
        'optimizer too short': ({**base, 'optim_d': opt_short}, 'its optim_d holds 35 parameters in 1 group(s); '
                                'its discriminator has 36 parameters'),
        'optimizer out of line': ({**base, 'optim_g': opt_shifted}, 'its optim_g does not line up with its '
                                  'generator: the exp_avg of fc1.weight has shape [128]'),
        'optimizer not a dict': ({**base, 'optim_g': 3}, 'its optim_g is not an optimizer state dict'),
    }


def test_malformed_official_checkpoints_are_one_line_errors(tmp_path):
    for case, (ckpt, message) in _variants(tmp_path).items():
        path = str(tmp_path / f"{case.replace(' ', '_')}.pth")
        torch.save(ckpt, path)
        with pytest.raises(UserError) as e:
            load_checkpoint(path)
        text = str(e.value)
        assert text.startswith(path + ':') and message in text and '\n' not in text, (case, text)


def test_official_layout_variants_load(tmp_path):
    base = _small_official(tmp_path)
    G0 = Generator(10, 1, 28, width=8)
    # an nn.DataParallel save: every name under module.
    prefixed = {k: {f'module.{n}': t for n, t in base[k].items()} for k in ('generator', 'discriminator')}
    # this repository's names without `format` (official keys copied out of one of its checkpoints)
    G0.load_state_dict({_rename(n, OFFICIAL_GENERATOR_NAMES): t for n, t in base['generator'].items()})
    ours = {'generator': G0.state_dict(), 'discriminator': {
        _rename(n, OFFICIAL_DISCRIMINATOR_NAMES): t for n, t in base['discriminator'].items()}}
    for name, ckpt in (('prefixed', {**base, **prefixed}), ('ours', {**base, **ours}),
                       ('generator only', {'generator': base['generator']})):
        path = str(tmp_path / f'{name}.pth')
        torch.save(ckpt, path)
        loaded = load_checkpoint(path)
        assert is_official(loaded)
        g_cfg, d_cfg = gan_configs(loaded, DIGITS)
        assert g_cfg == dict(num_classes=10, channels=1, img_size=28, dim_noise=100, width=8), name
        assert d_cfg == dict(num_classes=10, channels=1, img_size=28, width=8), name
        G = Generator(**g_cfg)
        load_state(G, loaded['generator'], path, 'generator')
        assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), G0.state_dict().values()))
        if 'optim_g' in loaded:
            load_optimizer_state(adam(G.parameters(), 1e-4), loaded['optim_g'])
    with pytest.raises(UserError, match='--resume: .* is not a pool_match checkpoint of this repository'):
        check_resumable(load_checkpoint(path), path, 'pool_match')


def test_entry_points_run_from_an_official_checkpoint(official, forks, tmp_path):
    """validate.py --pretrain-weight and pool_match.py --weight, as a user runs them, on the 28-px file
    (width 196). pool_match runs one epoch of 2 iterations on a 10-image folder and skips validation."""
    path = official['28px'][0]
    make_imagefolder(tmp_path / 'imgs', classes=10, train=1, test=1, size=28)
    common = ['--no-progress', '--device', 'cpu', '--print-freq', '1']
    runs = {
        'validate': ['validate.py', '--pretrain-weight', path, '--data', 'digits', '--epochs-eval', '2', '--ipc', '1',
                     '--batch-size', '10', '--test-interval', '1', '--tag', 'val', *common],
        'pool_match': ['pool_match.py', '--weight', path, '--data', 'imagefolder', '--data-dir', tmp_path / 'imgs',
                       '--img-size', '28', '--epochs', '1', '--batch-size', '4', '--epochs-match-train', '1',
                       '--pool', 'convnet', '--match', 'logit', '--eval-interval', '2', '--tag', 'match', *common],
    }
    pids = {name: forks.start(argv, tmp_path, tmp_path / f'{name}.out', tmp_path / f'{name}.err')
            for name, argv in runs.items()}
    for name, pid in pids.items():
        status = forks.wait(pid, timeout=300)
        assert status == 0, (name, (tmp_path / f'{name}.err').read_text()[-3000:])
    row, = json.load(open(tmp_path / 'results' / 'val' / 'eval.json'))['rows']
    assert row['architecture'] == 'convnet'
    # stage 2 continued the official Adam state: 2 official steps, then its own iterations
    last = load_checkpoint(str(tmp_path / 'results' / 'match' / 'last.pth'))
    assert last['iteration'] == 2 and last['generator_config']['width'] == 196
    for key in ('optim_g', 'optim_d'):
        steps = {float(s['step']) for s in last[key]['state'].values()}
        assert steps == {4.0}, (key, steps)
        assert last[key]['param_groups'][0]['lr'] == 5e-6
