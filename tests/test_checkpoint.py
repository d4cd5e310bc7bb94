import os
from dataclasses import replace

import pytest
import torch

from data.datasets import DATASETS
from models import Discriminator, Generator
from utils.checkpoint import (check_compatible, gan_configs, is_official, load_checkpoint, load_state,
                              save_checkpoint)
from utils.errors import UserError
from utils.stage import adam

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
    g_cfg, d_cfg = gan_configs(ckpt, DIGITS, dim_noise=100, width=196)
    G2 = Generator(**g_cfg)
    load_state(G2, ckpt['generator'], path, 'generator')
    z = torch.randn(3, 64)
    G.eval(), G2.eval()
    assert torch.equal(G(z), G2(z))
    assert Discriminator(**d_cfg).load_state_dict(ckpt['discriminator'])


def test_official_format_loads_with_sizes_from_the_flags(tmp_path):
    G, D = _gan(width=8)
    official = {'generator': G.state_dict(), 'discriminator': D.state_dict(),
                'optim_g': adam(G.parameters(), 1e-4).state_dict(), 'optim_d': adam(D.parameters(), 1e-4).state_dict()}
    torch.save(official, tmp_path / 'official.pth')
    ckpt = load_checkpoint(str(tmp_path / 'official.pth'))
    assert is_official(ckpt)
    check_compatible(ckpt, DIGITS, 'official.pth')  # nothing stored to disagree with
    g_cfg, _ = gan_configs(ckpt, DIGITS, dim_noise=64, width=8)
    load_state(Generator(**g_cfg), ckpt['generator'], 'official.pth', 'generator')
    g_cfg, _ = gan_configs(ckpt, DIGITS, dim_noise=64, width=16)  # flags that do not fit
    with pytest.raises(UserError, match='does not fit'):
        load_state(Generator(**g_cfg), ckpt['generator'], 'official.pth', 'generator')


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
