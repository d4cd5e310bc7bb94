"""The augmentation ops against the official code's own draws (tests/golden/dsa_*.json).

Each entry of a file is one official op call, in batch mode (one draw for the batch) or per sample: the
random numbers it drew, the parameters in plain terms and a fingerprint of its output. We pass the
official parameters to this repository's ops (`rand_<op>(x, batch, **params)`: the op applies them
instead of drawing its own) on the same input and compare the outputs. `composed` entries run whole
strategies through `DiffAug.__call__`, every op handed its official parameters (rebuilt from the raw
draws by the formulas the file's protocol states) and the geometric op the official call chose: the
order DiffAug runs the ops in is checked with the output.

The random streams themselves are not compared: the official code draws batch mode from numpy, this
repository from torch on the images' device (same distributions, no host round trip on a GPU).

Tolerance: float64 outputs to 1e-9 relative (a signed sum to 1e-9 of the sum of absolute values, a
listed value to 1e-9 of its list's largest magnitude). The float32 outputs of scale and rotate (the
official affine matrix is float32) to 1e-6: their fingerprints were summed in float32 by the official
run, so a reduction in another order differs in the seventh digit; a warp with another angle or
direction differs in the first.
"""
import math

import pytest
import torch

import utils.augment as augment
from utils.augment import AUGMENT_FNS, DiffAug

from test_golden import check, close, fingerprint, load_golden as load

FILES = ['dsa_4x3x32x32', 'dsa_4x1x28x28']
GEOMETRIC = ('crop', 'scale', 'rotate', 'translate')
PARAM_NAMES = {'angle_rad': 'angle'}  # the official file's name -> this repository's


def official_input(golden, dtype_name):
    x = torch.randn(golden['protocol']['shape'], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return x.float() if dtype_name == 'torch.float32' else x


def as_tensor(value):
    """A parameter of the file as the [n] tensor `apply` takes (n = 1 for one batch-mode value)."""
    values = value if isinstance(value, list) else [value]
    if isinstance(values[0], bool):
        return torch.tensor(values)
    if isinstance(values[0], int):
        return torch.tensor(values, dtype=torch.long)
    return torch.tensor(values, dtype=torch.float64)  # float32 inputs (scale, rotate) store theta in float32


def check_output(y, want, what):
    """The output's fingerprint (in float64) as test_golden checks a network's, and per-sample sums and
    norms."""
    assert str(y.dtype) == want['dtype'], what
    tol = 1e-9 if y.dtype == torch.float64 else 1e-6
    y = y.detach().double()
    check(what, fingerprint([y]), want, tol)
    per_sample = y.flatten(1)
    for got, expected, size in zip(per_sample.sum(1).tolist(), want['per_sample_sum'], per_sample.abs().sum(1).tolist()):
        assert abs(got - expected) <= tol * size, (what, 'per-sample sum', got, expected)
    close(per_sample.norm(dim=1).tolist(), want['per_sample_norm'], (what, 'per-sample norm'), tol)


@pytest.mark.parametrize('name', FILES)
def test_every_op_applies_the_official_parameters_as_the_official_op(name):
    golden = load(name)
    assert len(golden['entries']) == 18  # 9 ops x (batch, per sample)
    assert golden['input']['sum'] == pytest.approx(official_input(golden, 'torch.float64').sum().item(), rel=1e-12)
    for entry in golden['entries']:
        x = official_input(golden, entry['input_dtype'])
        params = {PARAM_NAMES.get(k, k): as_tensor(v) for k, v in entry['params'].items()}
        n = 1 if entry['mode'] == 'batch' else x.shape[0]
        assert all(len(p) == n for p in params.values())
        y = getattr(augment, f"rand_{entry['op']}")(x, entry['mode'] == 'batch', **params)
        check_output(y, entry['output'], f"{entry['op']} ({entry['mode']})")


def official_plan(strategy, draws, x):
    """The (op, parameters) list of one official DiffAug call, from its raw draws in the order made:
    flip, colour (brightness, saturation, contrast), the choice of the geometric op and its draws,
    cutout, each by the formula of the file's protocol."""
    draws = iter(d['values'] for d in draws)

    def uniform():
        return torch.tensor(next(draws), dtype=torch.float64).reshape(-1)

    def integer():
        return torch.tensor(next(draws), dtype=torch.long).reshape(-1)

    def in_dtype(t):
        return t.to(x.dtype)

    listed = strategy.split('_')
    plan = []
    if 'flip' in listed:
        plan.append(('flip', {'flipped': uniform() < 0.5}))
    if 'color' in listed:
        plan += [('brightness', {'offset': in_dtype(uniform() - 0.5)}),
                 ('saturation', {'factor': in_dtype(uniform() * 2)}),
                 ('contrast', {'factor': in_dtype(uniform() + 0.5)})]
    geometric = [op for op in listed if op in GEOMETRIC]
    if geometric:
        op = geometric[int(integer())]  # drawn even when one op is listed
        if op == 'crop':
            plan.append(('crop', {'shift_rows': integer(), 'shift_cols': integer()}))
        elif op == 'translate':
            plan.append(('translate', {'shift_cols': integer()}))
        elif op == 'scale':
            low, high = 1 / 1.2, 1.2
            plan.append(('scale', {'sx': uniform() * (high - low) + low, 'sy': uniform() * (high - low) + low}))
        else:
            plan.append(('rotate', {'angle': (uniform() - 0.5) * 2 * 15 / 180 * math.pi}))
    if 'cutout' in listed:
        plan.append(('cutout', {'centre_row': integer(), 'centre_col': integer()}))
    assert next(draws, None) is None, 'draws left over'
    return plan


@pytest.mark.parametrize('name', FILES)
def test_whole_strategies_match_the_official_calls(name, monkeypatch):
    golden = load(name)
    assert len(golden['composed']) == 4
    ops = {name: list(fns) for name, fns in AUGMENT_FNS.items()}
    for entry in golden['composed']:
        x = official_input(golden, entry['input_dtype'])
        plan = official_plan(entry['strategy'], entry['draws'], x)
        aug = DiffAug(entry['strategy'], batch=entry['mode'] == 'batch')
        assert aug.geometric == [op for op in entry['strategy'].split('_') if op in GEOMETRIC]
        # every op applies its official parameters and says that it ran
        ran = []
        for strategy_name, fns in ops.items():
            monkeypatch.setitem(AUGMENT_FNS, strategy_name, [
                lambda x, batch, fn=fn: ran.append(fn.__name__[5:]) or fn(x, batch, **dict(plan)[fn.__name__[5:]])
                for fn in fns])
        chosen = [op for op, _ in plan if op in GEOMETRIC]
        aug.geometric, aug.draws_on_host = chosen, False  # the official call's choice
        y = aug(x)
        assert ran == [op for op, _ in plan], 'DiffAug runs the ops in another order'
        check_output(y, entry['output'], f"{entry['strategy']} ({entry['mode']})")
