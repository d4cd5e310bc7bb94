import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils.augment as augment_module
from data.datasets import normalize
from utils.augment import (AUGMENT_FNS, DiffAug, cutmix, rand_brightness,
                           rand_contrast, rand_rotate, rand_saturation, rand_scale, rand_translate)

OPS = ['color', 'crop', 'cutout', 'flip', 'scale', 'rotate', 'translate']
STRATEGIES = OPS + ['color_crop_cutout', 'flip_color_crop_scale_rotate_translate_cutout']


def index_image(n, c=1, h=32, w=32):
    """Pixel (i, j) holds 1 + i * w + j: every value is unique and non-zero, so a
    shifted output tells where each pixel came from and zeros mark fill."""
    img = 1.0 + torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    return img.expand(n, c, h, w).clone()


def shift_reference(img, dy, dx):
    """out[i, j] = img[i - dy, j - dx], zeros outside, by slicing (independent of the op)."""
    out = torch.zeros_like(img)
    H, W = img.shape[-2:]
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        img[..., max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


def recover_shift(out, w):
    """(dy, dx) of a shifted index image from any non-zero pixel."""
    i, j = [int(t[0]) for t in torch.nonzero(out[0], as_tuple=True)]
    src = int(out[0, i, j]) - 1
    return i - src // w, j - src % w


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_batch_mode_is_siamese(strategy):
    aug = DiffAug(strategy, batch=True)
    for seed in range(15):
        torch.manual_seed(seed)
        x = torch.randn(4, 3, 32, 32)
        y = aug(torch.cat([x, x]))
        assert torch.equal(y[:4], y[4:])
        # one draw for the whole call: identical inputs give identical outputs
        same = aug(x[:1].expand(6, -1, -1, -1).contiguous())
        assert torch.equal(same, same[:1].expand_as(same))


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_per_sample_mode_differs_across_samples(strategy):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32).expand(32, -1, -1, -1).contiguous()
    y = DiffAug(strategy, batch=False)(x)
    distinct = {tuple(y[i].flatten().tolist()) for i in range(len(y))}
    assert len(distinct) > 1


@pytest.mark.parametrize('batch', [True, False])
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_fixed_seed_reproduces(strategy, batch):
    x = torch.randn(8, 3, 32, 32)
    aug = DiffAug(strategy, batch=batch)
    torch.manual_seed(123)
    a = aug(x)
    torch.manual_seed(123)
    b = aug(x)
    assert torch.equal(a, b)


def test_cutmix_drops_cutout_only_from_per_sample_augmentation():
    assert 'cutout' not in DiffAug('color_crop_cutout', mixup_net='cut').post
    assert DiffAug('color_crop_cutout', batch=True, mixup_net='cut').post == ['cutout']
    assert DiffAug('color_crop_cutout', mixup_net='none').post == ['cutout']
    aug = DiffAug('color_crop_cutout', mixup_net='cut')
    assert (aug.pre, aug.geometric, aug.batch) == (['color'], ['crop'], False)
    assert DiffAug('color_crop_cutout', batch=True).batch is True
    # cutout alone becomes the identity
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(DiffAug('cutout', mixup_net='cut')(x), x)


def test_unknown_op_raises_and_lists_valid_ops():
    with pytest.raises(ValueError, match='crop'):
        DiffAug('color_blur')
    with pytest.raises(ValueError):
        DiffAug('color_jitter')


def test_empty_strategy_is_identity():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(DiffAug('')(x), x) and torch.equal(DiffAug('none')(x), x)


def record_ops(monkeypatch, calls):
    """Every op records its name instead of running."""
    for name, fns in list(AUGMENT_FNS.items()):
        monkeypatch.setitem(AUGMENT_FNS, name, [lambda x, b, n=fn.__name__: calls.append(n[5:]) or x for fn in fns])


def test_exactly_one_geometric_op_per_call(monkeypatch):
    aug = DiffAug('crop_scale_rotate_translate', batch=True)
    calls = []
    record_ops(monkeypatch, calls)
    torch.manual_seed(0)
    for i in range(400):
        aug(torch.zeros(1, 1, 4, 4))
        assert len(calls) == i + 1
    freq = np.array([calls.count(n) for n in aug.geometric]) / len(calls)
    assert np.all(np.abs(freq - 0.25) < 0.07)


def test_ops_run_in_the_official_order(monkeypatch):
    # flip, colour, one geometric op among those listed (in the strategy's order), cutout: whatever
    # order the string names them in
    aug = DiffAug('cutout_rotate_color_flip_crop', batch=False)
    assert aug.geometric == ['rotate', 'crop']
    calls = []
    record_ops(monkeypatch, calls)
    torch.manual_seed(0)
    plans = []
    for _ in range(40):
        aug(torch.zeros(2, 3, 8, 8))
        plans.append(calls[:])
        calls.clear()
    assert {p[4] for p in plans} == {'rotate', 'crop'}
    for p in plans:
        assert p[:4] == ['flip', 'brightness', 'saturation', 'contrast'] and p[5:] == ['cutout']


# --------------------------------------------------------------------------- statistics
def test_color_on_constant_image_is_a_brightness_shift_in_range():
    torch.manual_seed(0)
    x = torch.full((2000, 3, 8, 8), 0.3)
    y = DiffAug('color', batch=False)(x)
    shift = y - 0.3
    # constant image: saturation and contrast are no-ops, each image shifts uniformly
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    s = shift[:, 0, 0, 0]
    assert s.min() >= -0.5 - 1e-6 and s.max() <= 0.5 + 1e-6
    assert s.min() < -0.45 and s.max() > 0.45 and abs(float(s.mean())) < 0.05


def test_color_components_have_the_right_factors():
    torch.manual_seed(0)
    x = torch.randn(500, 3, 8, 8)
    b = rand_brightness(x, False) - x
    assert torch.allclose(b, b[:, :1, :1, :1].expand_as(b), atol=1e-6)     # one shift per image
    assert b.amin() >= -0.5 - 1e-6 and b.amax() <= 0.5 + 1e-6

    y = rand_saturation(x, False)
    m = x.mean(1, keepdim=True)
    assert torch.allclose(y.mean(1, keepdim=True), m, atol=1e-5)           # grey value kept
    f = ((y - m) * (x - m)).flatten(1).sum(1) / ((x - m) ** 2).flatten(1).sum(1)
    assert torch.allclose(y, (x - m) * f.view(-1, 1, 1, 1) + m, atol=1e-5)
    assert f.min() >= 0 and f.max() <= 2 and f.min() < 0.1 and f.max() > 1.9

    y = rand_contrast(x, False)
    m = x.mean([1, 2, 3], keepdim=True)
    assert torch.allclose(y.mean([1, 2, 3], keepdim=True), m, atol=1e-5)   # global mean kept
    f = ((y - m) * (x - m)).flatten(1).sum(1) / ((x - m) ** 2).flatten(1).sum(1)
    assert torch.allclose(y, (x - m) * f.view(-1, 1, 1, 1) + m, atol=1e-5)
    assert f.min() >= 0.5 - 1e-6 and f.max() <= 1.5 + 1e-6 and f.min() < 0.6 and f.max() > 1.4


@pytest.mark.parametrize('size', [28, 32])
@pytest.mark.parametrize('op', ['crop', 'translate'])
def test_integer_shifts_fill_zeros(op, size):
    torch.manual_seed(0)
    x = index_image(300, c=2, h=size, w=size)
    y = DiffAug(op, batch=False)(x)
    shifts = []
    for b in range(len(y)):
        dy, dx = recover_shift(y[b], size)
        assert torch.equal(y[b], shift_reference(x[b], dy, dx))
        shifts.append((dy, dx))
    dys, dxs = zip(*shifts)
    s = int(size * 0.125 + 0.5)
    assert s == 4
    assert set(dxs) == set(range(-s, s + 1))                               # all offsets, no more
    assert set(dys) == ({0} if op == 'translate' else set(range(-s, s + 1)))


@pytest.mark.parametrize('batch', [True, False])
def test_translate_moves_columns_only(batch):
    # one lit pixel on a non-square image: the shift follows the width, up to round(0.125 * W) = 5
    # (round(0.125 * H) would be 2), and the pixel never leaves its row
    torch.manual_seed(0)
    H, W, i, j = 16, 40, 5, 20
    x = torch.zeros(1, 2, H, W)
    x[:, :, i, j] = 1.0
    shifts = set()
    for _ in range(40 if batch else 1):
        y = rand_translate(x.expand(200, -1, -1, -1).contiguous(), batch)
        lit = torch.nonzero(y[:, 0] == 1.0)                                  # (sample, row, col)
        assert len(lit) == 200 and int((y != 0).sum()) == 2 * 200          # the pixel survives, once per channel
        assert torch.all(lit[:, 1] == i)                                   # same row
        assert torch.equal(y[:, 0], y[:, 1])
        shifts |= set((lit[:, 2] - j).tolist())
    assert shifts == set(range(-5, 6))


def test_translate_fills_zeros_from_the_side():
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8).expand(1, 1, 3, 8).contiguous()
    # out[j] = x[j + shift], as the official code
    y = augment_module._shift(x, torch.tensor([-2]), 3)
    assert torch.equal(y[0, 0, 0], torch.tensor([0.0, 0, 1, 2, 3, 4, 5, 6]))
    y = augment_module._shift(x, torch.tensor([3]), 3)
    assert torch.equal(y[0, 0, 2], torch.tensor([4.0, 5, 6, 7, 8, 0, 0, 0]))


@pytest.mark.parametrize('size', [28, 32])
def test_cutout_zeroes_a_clipped_square(size):
    torch.manual_seed(0)
    c = int(size * 0.5 + 0.5)
    x = torch.ones(400, 3, size, size)
    y = DiffAug('cutout', batch=False)(x)
    assert torch.equal(y[:, 0:1].expand_as(y), y)                            # same box on all channels
    full = clipped = 0
    for b in range(len(y)):
        zero = y[b, 0] == 0
        rows = torch.nonzero(zero.any(1)).flatten()
        cols = torch.nonzero(zero.any(0)).flatten()
        # the zeros are exactly a rectangle of consecutive rows x consecutive columns
        assert torch.equal(zero, zero.any(1)[:, None] & zero.any(0)[None, :])
        for idx in (rows, cols):
            assert len(idx) >= 1 and torch.equal(idx, torch.arange(int(idx[0]), int(idx[-1]) + 1))
            # shorter than c only where clipped by the border
            assert len(idx) == c or idx[0] == 0 or idx[-1] == size - 1
            assert len(idx) <= c
        inside = len(rows) == c and len(cols) == c
        full += inside
        clipped += not inside
        assert torch.all(y[b][:, ~zero] == 1)
    assert full > 0 and clipped > 0


def test_cutout_box_positions_cover_the_centre_range():
    # centres in [0, size + 1 - c % 2): the box top-left ranges over [-c//2, size - c//2]
    torch.manual_seed(0)
    size, c = 32, 16
    y = DiffAug('cutout', batch=False)(torch.ones(3000, 1, size, size))
    zero = y[:, 0] == 0
    first_row = zero.any(2).float().argmax(1)
    last_row = size - 1 - zero.any(2).flip(1).float().argmax(1)
    assert int(first_row.min()) == 0 and int(last_row.max()) == size - 1
    # the smallest visible box: centre 0 -> rows [0, c - c//2 - 1]; centre size -> rows [size - c//2, size - 1]
    assert int((last_row - first_row + 1).min()) == c // 2


def test_flip_fraction():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8).expand(4000, -1, -1, -1).contiguous()
    y = DiffAug('flip', batch=False)(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert abs(float(flipped.float().mean()) - 0.5) < 0.03


def pixel_centres(size):
    """Normalised coordinates of the pixel centres with align_corners=False: (2k + 1) / size - 1."""
    return (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1


def ramp_image(n, size):
    """Channel 0 holds the normalised x coordinate of each pixel centre, channel 1 the y coordinate;
    bilinear sampling reproduces a linear ramp exactly, so a warped ramp returns the sampling grid
    itself wherever it stays between the outer pixel centres."""
    lin = pixel_centres(size)
    return torch.stack([lin.view(1, -1).expand(size, size), lin.view(-1, 1).expand(size, size)]).expand(n, 2, size, size)


def test_scale_factors_in_range():
    torch.manual_seed(0)
    size = 33                                            # odd: pixel 16 is the centre, coordinate 0
    j = 24
    c = float(pixel_centres(size)[j])                    # 16 / 33
    y = DiffAug('scale', batch=False)(ramp_image(2000, size).contiguous())
    sx = y[:, 0, 16, j] / c
    sy = y[:, 1, j, 16] / c
    for s in (sx, sy):
        assert s.min() >= 1 / 1.2 - 1e-5 and s.max() <= 1.2 + 1e-5
        assert s.min() < 1 / 1.2 + 0.02 and s.max() > 1.2 - 0.02
    assert abs(float(torch.corrcoef(torch.stack([sx, sy]))[0, 1])) < 0.1   # independent
    # no translation and no shear: the centre stays put
    assert torch.allclose(y[:, :, 16, 16], torch.zeros(2000, 2), atol=1e-5)


def test_rotate_angles_in_range():
    torch.manual_seed(0)
    size, j = 33, 24
    c = float(pixel_centres(size)[j])
    y = DiffAug('rotate', batch=False)(ramp_image(2000, size).contiguous())
    # at (X, Y) = (c, 0) the grid is (cos * c, sin * c) (the official matrix [[cos, -sin], [sin, cos]])
    cos, sin = y[:, 0, 16, j] / c, y[:, 1, 16, j] / c
    assert torch.allclose(cos ** 2 + sin ** 2, torch.ones(2000), atol=1e-4)
    deg = torch.rad2deg(torch.atan2(sin, cos))
    assert deg.min() >= -15 - 1e-3 and deg.max() <= 15 + 1e-3
    assert deg.min() < -14 and deg.max() > 14


@pytest.mark.parametrize('op', ['scale', 'rotate'])
def test_warps_use_align_corners_false(op):
    # fix the random draws, then compare with torch's affine_grid / grid_sample at their
    # default align_corners=False on the known theta
    # fix the parameters, then compare with torch's affine_grid / grid_sample at their
    # default align_corners=False on the known theta
    torch.manual_seed(0)
    x = torch.randn(3, 2, 12, 20)
    if op == 'scale':
        y = rand_scale(x, True, sx=torch.tensor([1.15]), sy=torch.tensor([0.9]))
        theta = torch.tensor([[1.15, 0.0, 0.0], [0.0, 0.9, 0.0]])
    else:
        a = math.radians(10.0)  # the official matrix: [[cos, -sin], [sin, cos]]
        y = rand_rotate(x, True, angle=torch.tensor([a], dtype=torch.float64))
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    theta = theta.expand(3, 2, 3)
    expected = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    assert torch.allclose(y, expected, atol=1e-5)
    if op == 'rotate':
        # A theta without translation maps pixel centres the same way in both conventions
        # unless it mixes the axes of a non-square image: only rotation there tells them
        # apart (a scale is the same warp either way).
        corners = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)
        assert not torch.allclose(y, corners, atol=1e-3)


# --------------------------------------------------------------------------- gradients, shapes, formats
@pytest.mark.parametrize('batch', [True, False])
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_gradients_flow_to_input(strategy, batch):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    y = DiffAug(strategy, batch=batch)(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize('batch', [True, False])
@pytest.mark.parametrize('channels,size', [(1, 28), (3, 32), (1, 32), (3, 28)])
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_shapes_for_mnist_and_cifar(strategy, channels, size, batch):
    x = torch.randn(5, channels, size, size)
    y = DiffAug(strategy, batch=batch)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_channels_last_matches_contiguous(strategy):
    x = torch.randn(4, 3, 16, 16)
    aug = DiffAug(strategy, batch=False)
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_autocast_and_half_inputs_keep_dtype(strategy):
    x = torch.randn(4, 3, 16, 16)
    for batch in (True, False):
        aug = DiffAug(strategy, batch=batch)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert aug(x).dtype == torch.float32
            assert aug(x.bfloat16()).dtype == torch.bfloat16
        y = aug(torch.cat([x, x]).bfloat16()) if batch else None
        if batch:
            assert torch.equal(y[:4], y[4:])


# --------------------------------------------------------------------------- normalize, cutmix
def test_normalize_one_and_three_channels():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float64
    for c in range(3):
        assert torch.allclose(y[:, c], (x[:, c] - mean[c]) / std[c])
    g = torch.rand(2, 1, 4, 4)
    assert torch.allclose(normalize(g, [0.1307], [0.3081]), (g - 0.1307) / 0.3081)
    assert torch.allclose(normalize(g[0], [0.1307], [0.3081]), (g[0] - 0.1307) / 0.3081)   # [C, H, W]


@pytest.mark.parametrize('beta', [1.0, 0.5])
def test_cutmix_box_lam_and_labels(beta):
    np.random.seed(0)
    torch.manual_seed(0)
    B, H, W = 8, 32, 28
    labels = torch.arange(B) + 10
    # image b is constant (b + 1), so each mixed pixel says which image it came from
    images = (torch.arange(B, dtype=torch.float32) + 1).view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()
    original = images.clone()
    nontrivial = 0
    for _ in range(30):
        mixed, la, lb, lam = cutmix(images, labels, beta)
        assert torch.equal(images, original)                               # input untouched
        assert isinstance(lam, float) and 0.0 <= lam <= 1.0
        assert torch.equal(la, labels)
        assert sorted(lb.tolist()) == labels.tolist()                      # a permutation
        src = mixed[:, 0] - 1                                             # source image index per pixel
        partner = (lb - 10).view(B, 1, 1).float()
        own = src == torch.arange(B).view(B, 1, 1)
        assert torch.all(own | (src == partner))
        # one box for the batch: the pasted region is the same rectangle in every image
        pasted = (src == partner) & ~(partner == torch.arange(B).view(B, 1, 1))
        moved = pasted.any(0)
        if moved.any():
            nontrivial += 1
            assert torch.equal(moved, moved.any(1)[:, None] & moved.any(0)[None, :])
            assert math.isclose(lam, 1 - int(moved.sum()) / (H * W), abs_tol=1e-12)
    assert nontrivial > 10
