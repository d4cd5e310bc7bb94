"""Shared test helpers: run a script as a user would, and locate the real datasets of the data tests."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folder of real datasets two tests of test_data.py read (MNIST/raw/*.gz as torchvision downloads it, and
# the CIFAR-10 JPEG copy): DIM_TEST_DATA=DIR, by default the project's shared/datasets beside the checkout.
TEST_DATA_VARIABLE = 'DIM_TEST_DATA'
TEST_DATA = os.environ.get(TEST_DATA_VARIABLE) or os.path.join(os.path.dirname(ROOT), 'shared', 'datasets')

# tiny schedule flags that keep a stage to seconds on 2 CPU cores
TINY = ['--data', 'digits', '--width', '16', '--ipc', '10', '--epochs-eval', '2', '--test-interval', '1',
        '--print-freq', '5', '--no-progress', '--device', 'cpu']


def run_script(script, *args, cwd, timeout=600):
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def save_tiny_generator(path, info, seed):
    """A tiny, untrained generator saved as a stage-1 checkpoint of this repository; returns it."""
    import torch

    from models import Discriminator, Generator
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    G = Generator(info.num_classes, info.channels, info.img_size, dim_noise=32, width=16)
    D = Discriminator(info.num_classes, info.channels, info.img_size, width=16)
    save_checkpoint({'generator': G.state_dict(), 'discriminator': D.state_dict(), 'stage': 'gen_condense',
                     'dataset': info.to_dict(), 'generator_config': G.config,
                     'discriminator_config': D.config, 'args': {}}, path)
    return G


def eval_args(**overrides):
    """validate.py's arguments for in-process evaluations (validate.run_evaluation): a tiny fixed
    protocol on one ConvNet; `overrides` change any of them."""
    from argparse import Namespace

    base = dict(protocol='fixed', baseline=None, num_eval=1, seed=7, set_seed=None, stack=False, ipc=1,
                epochs_eval=2, eval_lr=0.01, batch_size=8, test_interval=1, aug_type='color_crop_cutout',
                mixup_net='cut', mix_p=-1.0, beta=1.0, eval_model=['convnet'], amp='off', momentum=0.9,
                weight_decay=5e-4, test_bn='running', fixed_set=False, val_per_class=0)
    base.update(overrides)
    return Namespace(**base)
