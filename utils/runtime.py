"""Device, precision, seeding and random-number-generator state: what every stage sets up the same way."""
import contextlib
import random

import numpy as np
import torch

from utils.errors import UserError


def select_device(name='auto'):
    """'auto' takes CUDA when present (CUDA_VISIBLE_DEVICES decides which GPU), else the CPU."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device "
                        "(check CUDA_VISIBLE_DEVICES and that the CUDA build of torch is installed)")
    return torch.device(name)


def setup_backend(device, deterministic):
    """cuDNN autotuning is faster; --deterministic trades it for run-to-run identical results."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def resolve_amp(amp, device):
    """'auto' is bf16 on CUDA and off on the CPU (where bf16 is slower and only adds noise)."""
    if amp == 'auto':
        return 'bf16' if device.type == 'cuda' else 'off'
    if amp == 'fp16' and device.type != 'cuda':
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    return amp


def autocast(amp, device):
    """The context every forward pass runs in: autocast for bf16/fp16, nothing for fp32."""
    if amp == 'off':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """Every random-number generator a stage draws from, for exact resume."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
