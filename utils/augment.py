"""Differentiable Siamese Augmentation (DSA) and CutMix.

Every op is a pure function ``op(x, batch) -> x`` on a normalised [B, C, H, W]
float tensor and is differentiable w.r.t. ``x`` (the generator is trained through
it). Random parameters are drawn with torch's global RNG on ``x.device`` so the
same code runs on CPU and CUDA, and ``torch.manual_seed`` reproduces a call.

``batch=True`` draws ONE set of parameters for the whole call. Matching losses
augment ``torch.cat([real, fake])`` in this mode so that both halves see the same
transform ("siamese"); otherwise the loss would measure the augmentation noise
instead of the real/fake gap. ``batch=False`` draws independently per image
(classifier training).

Geometric ops, as the reference: ``crop`` shifts by an integer in x and y and
``translate`` along the width (last) axis only, each up to round(0.125 * side)
pixels with zeros shifted in; ``scale`` and ``rotate`` are bilinear affine warps
(``affine_grid`` / ``grid_sample`` with ``align_corners=False``, zero padding).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['DiffAug', 'make_augment', 'cutmix', 'AUGMENT_FNS']

CROP_RATIO = 0.125      # max shift as a fraction of the side: 4 px at 32 px
CUTOUT_RATIO = 0.5      # cutout side as a fraction of the side: 16 px at 32 px
SCALE_RATIO = 1.2       # scale factors in [1/1.2, 1.2]
ROTATE_DEGREES = 15.0   # angles in [-15, 15] degrees
FLIP_PROB = 0.5


# ---------------------------------------------------------------------------
# random parameters: n = 1 in batch mode, so a single draw broadcasts over B
# ---------------------------------------------------------------------------
def _num_draws(x: Tensor, batch: bool) -> int:
    return 1 if batch else x.shape[0]


def _uniform(x: Tensor, batch: bool, low: float, high: float, shape: Sequence[int] = (1, 1, 1)) -> Tensor:
    # Drawn in float32 whatever x.dtype is, so a seed gives the same numbers under
    # autocast / half inputs; cast afterwards so the op keeps x's dtype.
    u = torch.rand(_num_draws(x, batch), *shape, device=x.device)
    return (low + (high - low) * u).to(x.dtype)


def _randint(x: Tensor, batch: bool, low: int, high: int) -> Tensor:
    """Integers in [low, high) of shape [n, 1]."""
    return torch.randint(low, high, (_num_draws(x, batch), 1), device=x.device)


def _max_shift(size: int) -> int:
    return int(size * CROP_RATIO + 0.5)


# ---------------------------------------------------------------------------
# colour
# ---------------------------------------------------------------------------
def rand_brightness(x: Tensor, batch: bool) -> Tensor:
    return x + _uniform(x, batch, -0.5, 0.5)


def rand_saturation(x: Tensor, batch: bool) -> Tensor:
    # scale each pixel's deviation from its grey value; a no-op for 1 channel
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * _uniform(x, batch, 0.0, 2.0) + m


def rand_contrast(x: Tensor, batch: bool) -> Tensor:
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * _uniform(x, batch, 0.5, 1.5) + m


# ---------------------------------------------------------------------------
# integer shifts: pad one zero row/column and clamp indices onto it, so every
# pixel shifted in from outside the image reads a zero; gather keeps it
# vectorised (and its backward is a scatter-add, i.e. still differentiable).
# ---------------------------------------------------------------------------
def _shift_rows(x: Tensor, dy: Tensor) -> Tensor:
    """out[..., i, :] = x[..., i - dy, :] (zeros outside); dy: [n, 1] ints, n in {1, B}."""
    B, C, H, W = x.shape
    padded = F.pad(x, [0, 0, 1, 1])
    rows = (torch.arange(H, device=x.device) - dy + 1).clamp(0, H + 1)          # [n, H]
    index = rows.view(-1, 1, H, 1).expand(B, C, H, W)
    return padded.gather(2, index)


def _shift_cols(x: Tensor, dx: Tensor) -> Tensor:
    """out[..., :, j] = x[..., :, j - dx] (zeros outside); dx: [n, 1] ints, n in {1, B}."""
    B, C, H, W = x.shape
    padded = F.pad(x, [1, 1])
    cols = (torch.arange(W, device=x.device) - dx + 1).clamp(0, W + 1)          # [n, W]
    index = cols.view(-1, 1, 1, W).expand(B, C, H, W)
    return padded.gather(3, index)


def rand_crop(x: Tensor, batch: bool) -> Tensor:
    s_h, s_w = _max_shift(x.shape[2]), _max_shift(x.shape[3])
    dy = _randint(x, batch, -s_h, s_h + 1)
    dx = _randint(x, batch, -s_w, s_w + 1)
    return _shift_cols(_shift_rows(x, dy), dx)


def rand_translate(x: Tensor, batch: bool) -> Tensor:
    # width (last) axis only, by an integer in [-s, s], s = round(0.125 * W)
    s = _max_shift(x.shape[3])
    return _shift_cols(x, _randint(x, batch, -s, s + 1))


# ---------------------------------------------------------------------------
# cutout: a mask built by comparisons instead of scattering a box per image
# ---------------------------------------------------------------------------
def _box_mask(size: int, start: Tensor, length: int) -> Tensor:
    """[n, size] bool, True on [start, start + length) -- clipping to the image is implicit."""
    pos = torch.arange(size, device=start.device)
    return (pos >= start) & (pos < start + length)


def rand_cutout(x: Tensor, batch: bool) -> Tensor:
    B, C, H, W = x.shape
    c_h, c_w = int(H * CUTOUT_RATIO + 0.5), int(W * CUTOUT_RATIO + 0.5)
    # the centre range matches DSA: [0, size + (1 - c % 2))
    cy = _randint(x, batch, 0, H + (1 - c_h % 2))
    cx = _randint(x, batch, 0, W + (1 - c_w % 2))
    rows = _box_mask(H, cy - c_h // 2, c_h)                                     # [n, H]
    cols = _box_mask(W, cx - c_w // 2, c_w)                                     # [n, W]
    keep = ~(rows[:, :, None] & cols[:, None, :])                               # [n, H, W]
    return x * keep[:, None].to(x.dtype)


# ---------------------------------------------------------------------------
# flip
# ---------------------------------------------------------------------------
def rand_flip(x: Tensor, batch: bool) -> Tensor:
    # compare in float32: rounding u to a half dtype first would bias p
    flip = torch.rand(_num_draws(x, batch), 1, 1, 1, device=x.device) < FLIP_PROB
    return torch.where(flip, x.flip(3), x)


# ---------------------------------------------------------------------------
# affine warps (bilinear, zero padding, torch's default align_corners=False as
# in the reference: -1 and 1 are the outer edges of the border pixels)
# ---------------------------------------------------------------------------
def _warp(x: Tensor, theta: Tensor) -> Tensor:
    theta = theta.expand(x.shape[0], 2, 3).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # autocast may run these in float32; grid_sample wants input and grid to
    # agree, and casting back keeps every op dtype-preserving (the output dtype
    # must not depend on which op was drawn)
    return F.grid_sample(x, grid.to(x.dtype), align_corners=False).to(x.dtype)


def _theta(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """[[a, b, 0], [c, d, 0]] from [n] tensors -> [n, 2, 3]."""
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([a, b, z], -1), torch.stack([c, d, z], -1)], -2)


def rand_scale(x: Tensor, batch: bool) -> Tensor:
    sx = _uniform(x, batch, 1.0 / SCALE_RATIO, SCALE_RATIO, shape=())
    sy = _uniform(x, batch, 1.0 / SCALE_RATIO, SCALE_RATIO, shape=())
    z = torch.zeros_like(sx)
    return _warp(x, _theta(sx, z, z, sy))


def rand_rotate(x: Tensor, batch: bool) -> Tensor:
    angle = _uniform(x, batch, -ROTATE_DEGREES, ROTATE_DEGREES, shape=()) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _warp(x, _theta(cos, sin, -sin, cos))


# name -> list of ops applied in order (DiffAugment style)
AUGMENT_FNS: dict[str, list[Callable[[Tensor, bool], Tensor]]] = {
    'color': [rand_brightness, rand_saturation, rand_contrast],
    'crop': [rand_crop],
    'cutout': [rand_cutout],
    'flip': [rand_flip],
    'scale': [rand_scale],
    'rotate': [rand_rotate],
    'translate': [rand_translate],
}
_PRE = ('flip', 'color')                                   # always applied, in this order
_GEOMETRIC = ('crop', 'scale', 'rotate', 'translate')      # one of these per call
_POST = ('cutout',)                                        # always applied, last


def _parse(strategy: str) -> list[str]:
    if strategy.strip().lower() in ('', 'none'):
        return []
    ops = strategy.split('_')
    unknown = [op for op in ops if op not in AUGMENT_FNS]
    if unknown:
        raise ValueError(f'unknown augmentation op(s) {unknown} in {strategy!r}; '
                         f'valid ops: {sorted(AUGMENT_FNS)}')
    return ops


class DiffAug:
    """Differentiable augmentation for a strategy like ``'color_crop_cutout'``.

    Per call: ``flip`` and ``color`` if listed, then ONE listed op among
    crop/scale/rotate/translate chosen uniformly (stacking several warps would
    blur and shrink the content too much), then ``cutout`` if listed. The order
    is fixed, independent of the order in the string. ``''``/``'none'`` is the
    identity.
    """

    def __init__(self, strategy: str = 'color_crop_cutout', batch: bool = False):
        ops = _parse(strategy)
        self.strategy = strategy
        self.batch = batch
        self.pre = [op for op in _PRE if op in ops]
        self.geometric = [op for op in _GEOMETRIC if op in ops]
        self.post = [op for op in _POST if op in ops]

    @property
    def draws_on_host(self) -> bool:
        """Whether a call makes a host-side random draw (the choice among several geometric ops)."""
        return len(self.geometric) > 1

    def _apply(self, name: str, x: Tensor) -> Tensor:
        for fn in AUGMENT_FNS[name]:
            x = fn(x, self.batch)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        for name in self.pre:
            x = self._apply(name, x)
        if self.geometric:
            # a single CPU draw: picking the op needs a Python int, and a CPU
            # tensor's item() does not synchronise with the GPU
            k = int(torch.randint(len(self.geometric), (1,))) if self.draws_on_host else 0
            x = self._apply(self.geometric[k], x)
        for name in self.post:
            x = self._apply(name, x)
        return x

    def __repr__(self) -> str:
        return f'DiffAug(strategy={self.strategy!r}, batch={self.batch})'


def make_augment(strategy: str, mixup_net: str = 'cut', batch: bool = False) -> DiffAug:
    """Augmentation for training (per-sample) or matching (``batch=True``).

    With CutMix on the classifier (``mixup_net == 'cut'``) cutout is dropped from
    the per-sample strategy: CutMix already pastes boxes, cutting another would
    double the occlusion. Batch (matching) mode keeps cutout.
    """
    ops = _parse(strategy)
    if not batch and mixup_net == 'cut':
        ops = [op for op in ops if op != 'cutout']
    return DiffAug('_'.join(ops), batch=batch)


def cutmix(images: Tensor, labels: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor, Tensor, float]:
    """CutMix (Yun et al., 2019) with one box for the whole batch.

    Returns ``(mixed, labels_a, labels_b, lam)``; train with
    ``lam * CE(out, labels_a) + (1 - lam) * CE(out, labels_b)``. ``lam`` is the
    fraction of each image that is still its own (recomputed from the clipped box).
    The input is not modified.
    """
    H, W = images.shape[-2:]
    lam = float(np.random.beta(beta, beta))
    perm = torch.randperm(images.shape[0], device=images.device)
    ratio = math.sqrt(1.0 - lam)
    # plain int(): np.int, used by the reference code, no longer exists in NumPy
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    cy, cx = int(np.random.randint(H)), int(np.random.randint(W))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2][perm]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (H * W)
    return mixed, labels, labels[perm], lam
