"""Augmentation and matching: differentiable siamese augmentation (DSA), CutMix, the match losses of
stage 2.

Every augmentation op ``op(x, batch) -> x`` works on a normalised [B, C, H, W]
float tensor and is differentiable w.r.t. ``x`` (the generator is trained through
it). It draws its random parameters, then applies them; ``op(x, batch, **params)``
applies given ones, which mean what the official code's do: its shifts, boxes,
flips, factors and angles give the same output draw for draw
(tests/test_golden_augment.py). Random parameters are drawn
with torch's global RNG on ``x.device`` (the official code draws batch mode from
numpy: same distributions, other streams) so the same code runs on CPU and CUDA
without a host round trip, and ``torch.manual_seed`` reproduces a call.

``batch=True`` draws ONE set of parameters for the whole call. Matching losses
augment ``torch.cat([real, fake])`` in this mode so that both halves see the same
transform ("siamese"); otherwise the loss would measure the augmentation noise
instead of the real/fake gap. ``batch=False`` draws independently per image
(classifier training).

Geometric ops, as the reference: ``crop`` shifts by an integer in x and y and
``translate`` along the width (last) axis only, each up to round(0.125 * side)
pixels with zeros shifted in (``out[i] = x[i + shift]``); ``scale`` and ``rotate`` are bilinear affine warps
(``affine_grid`` / ``grid_sample`` with ``align_corners=False``, zero padding).

Match losses treat the real side as data (no graph is kept for it) and keep
the graph of the fake side, so the loss trains the generator through ``model``.
Augmentation, when given (logit and feature matching), is applied to
``torch.cat([real, fake])`` in batch (siamese) mode so both halves get the same
transform; callers may instead augment the pair themselves and pass none.
Feature and gradient matching measure with ``dist`` (``METRICS``) and weight
each layer / parameter tensor by 0.001, as the reference does.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['DiffAug', 'cutmix', 'AUGMENT_FNS', 'upcast', 'logit_match_loss',
           'feature_match_loss', 'gradient_match_loss', 'MATCH_LOSSES', 'METRICS', 'dist']

CROP_RATIO = 0.125      # max shift as a fraction of the side: 4 px at 32 px
CUTOUT_RATIO = 0.5      # cutout side as a fraction of the side: 16 px at 32 px
SCALE_RATIO = 1.2       # scale factors in [1/1.2, 1.2]
ROTATE_DEGREES = 15.0   # angles in [-15, 15] degrees
FLIP_PROB = 0.5


# ---------------------------------------------------------------------------
# Each op draws its random parameters unless they are given, then applies them:
# ``op(x, batch)`` draws (one row in batch mode, so one draw broadcasts over B;
# one per sample otherwise), ``op(x, batch, **params)`` applies the given ones
# ([n] tensors, n in {1, B}). The parameters mean what the official code's do,
# and the golden-value tests pass the official code's own draws.
# ---------------------------------------------------------------------------
def _uniform(x: Tensor, batch: bool, low: float, high: float) -> Tensor:
    # [n], drawn in float32 whatever x.dtype is, so a seed gives the same numbers
    # under autocast / half inputs; cast afterwards so the op keeps x's dtype.
    u = torch.rand(1 if batch else x.shape[0], device=x.device)
    return (low + (high - low) * u).to(x.dtype)


# ---------------------------------------------------------------------------
# colour
# ---------------------------------------------------------------------------
def rand_brightness(x: Tensor, batch: bool, offset: Tensor | None = None) -> Tensor:
    if offset is None:
        offset = _uniform(x, batch, -0.5, 0.5)
    return x + offset.view(-1, 1, 1, 1)


def rand_saturation(x: Tensor, batch: bool, factor: Tensor | None = None) -> Tensor:
    # scale each pixel's deviation from its grey value; a no-op for 1 channel
    if factor is None:
        factor = _uniform(x, batch, 0.0, 2.0)
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * factor.view(-1, 1, 1, 1) + m


def rand_contrast(x: Tensor, batch: bool, factor: Tensor | None = None) -> Tensor:
    if factor is None:
        factor = _uniform(x, batch, 0.5, 1.5)
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * factor.view(-1, 1, 1, 1) + m


# ---------------------------------------------------------------------------
# integer shifts, as the official code: out[..., i, ...] = x[..., i + shift, ...],
# zeros where that index falls outside; shifts uniform in [-s, s], s =
# round(0.125 * side), drawn with torch.randint. Pad one zero row/column and
# clamp indices onto it; gather keeps it vectorised (its backward is a
# scatter-add, still differentiable).
# ---------------------------------------------------------------------------
def _shift(x: Tensor, shift: Tensor, dim: int) -> Tensor:
    """out[..., i, ...] = x[..., i + shift, ...] along `dim` (2: rows, 3: columns); shift: [n], n in {1, B}."""
    size = x.shape[dim]
    padded = F.pad(x, [1, 1] if dim == 3 else [0, 0, 1, 1])
    index = (torch.arange(size, device=x.device) + shift.view(-1, 1) + 1).clamp(0, size + 1)   # [n, size]
    index = index.view(-1, 1, size, 1) if dim == 2 else index.view(-1, 1, 1, size)
    return padded.gather(dim, index.expand(x.shape))


def rand_crop(x: Tensor, batch: bool, shift_rows: Tensor | None = None, shift_cols: Tensor | None = None) -> Tensor:
    if shift_rows is None:  # rows drawn first, as the official code
        n = 1 if batch else x.shape[0]
        s_h, s_w = int(x.shape[2] * CROP_RATIO + 0.5), int(x.shape[3] * CROP_RATIO + 0.5)  # rounded
        shift_rows = torch.randint(-s_h, s_h + 1, (n,), device=x.device)
        shift_cols = torch.randint(-s_w, s_w + 1, (n,), device=x.device)
    return _shift(_shift(x, shift_rows, 2), shift_cols, 3)


def rand_translate(x: Tensor, batch: bool, shift_cols: Tensor | None = None) -> Tensor:
    # width (last) axis only, by an integer in [-s, s], s = round(0.125 * W)
    if shift_cols is None:
        s = int(x.shape[3] * CROP_RATIO + 0.5)
        shift_cols = torch.randint(-s, s + 1, (1 if batch else x.shape[0],), device=x.device)
    return _shift(x, shift_cols, 3)


# ---------------------------------------------------------------------------
# cutout: a mask built by comparisons instead of scattering a box per image
# ---------------------------------------------------------------------------
def rand_cutout(x: Tensor, batch: bool, centre_row: Tensor | None = None,
                centre_col: Tensor | None = None) -> Tensor:
    B, C, H, W = x.shape
    c_h, c_w = int(H * CUTOUT_RATIO + 0.5), int(W * CUTOUT_RATIO + 0.5)
    if centre_row is None:  # the centre range matches DSA: [0, size + (1 - c % 2)); rows first
        n = 1 if batch else B
        centre_row = torch.randint(0, H + (1 - c_h % 2), (n,), device=x.device)
        centre_col = torch.randint(0, W + (1 - c_w % 2), (n,), device=x.device)
    # the box [centre - c // 2, centre - c // 2 + c) per axis; clipping to the image is implicit
    top, left = centre_row.view(-1, 1) - c_h // 2, centre_col.view(-1, 1) - c_w // 2
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = (rows >= top) & (rows < top + c_h)                                   # [n, H]
    cols = (cols >= left) & (cols < left + c_w)                                 # [n, W]
    keep = ~(rows[:, :, None] & cols[:, None, :])                               # [n, H, W]
    return x * keep[:, None].to(x.dtype)


# ---------------------------------------------------------------------------
# flip
# ---------------------------------------------------------------------------
def rand_flip(x: Tensor, batch: bool, flipped: Tensor | None = None) -> Tensor:
    if flipped is None:  # compare in float32: rounding u to a half dtype first would bias p
        flipped = torch.rand(1 if batch else x.shape[0], device=x.device) < FLIP_PROB
    return torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)


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


def rand_scale(x: Tensor, batch: bool, sx: Tensor | None = None, sy: Tensor | None = None) -> Tensor:
    if sx is None:
        sx = _uniform(x, batch, 1.0 / SCALE_RATIO, SCALE_RATIO)
        sy = _uniform(x, batch, 1.0 / SCALE_RATIO, SCALE_RATIO)
    z = torch.zeros_like(sx)
    return _warp(x, _theta(sx, z, z, sy))


def rand_rotate(x: Tensor, batch: bool, angle: Tensor | None = None) -> Tensor:
    """`angle` in radians. The official formula and matrix, [[cos, -sin], [sin, cos]], in float64 and
    stored in x's dtype; the uniform is drawn in float32, as the other ops draw theirs."""
    if angle is None:
        u = torch.rand(1 if batch else x.shape[0], device=x.device).to(torch.float64)
        angle = (u - 0.5) * 2 * ROTATE_DEGREES / 180 * math.pi
    angle = angle.to(torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _warp(x, _theta(cos, -sin, sin, cos))


# name -> list of ops applied in order (DiffAugment style)
AUGMENT_FNS: dict[str, list[Callable[..., Tensor]]] = {
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


class DiffAug:
    """Differentiable augmentation for a strategy like ``'color_crop_cutout'``.

    Per call, as the official code: ``flip`` and ``color`` if listed, then ONE of
    the listed crop/scale/rotate/translate, chosen uniformly among them in the
    order the strategy names them, then ``cutout`` if listed. ``''``/``'none'`` is
    the identity.

    ``batch=True``: one draw for the whole batch (matching: real and generated
    images get the same transform); ``False``: a draw per sample (classifier
    training). ``mixup_net='cut'`` (CutMix on the classifier) drops cutout from
    a per-sample strategy.
    """

    def __init__(self, strategy: str = 'color_crop_cutout', batch: bool = False, mixup_net: str = 'none'):
        ops = [] if strategy.strip().lower() in ('', 'none') else strategy.split('_')
        unknown = [op for op in ops if op not in AUGMENT_FNS]
        if unknown:
            raise ValueError(f'unknown augmentation op(s) {unknown} in {strategy!r}; '
                             f'valid ops: {sorted(AUGMENT_FNS)}')
        if mixup_net == 'cut' and not batch and 'cutout' in ops:
            # CutMix on the classifier already pastes boxes: a per-sample cutout would double the
            # occlusion. Batch (matching) mode keeps it.
            ops = [op for op in ops if op != 'cutout']
            strategy = '_'.join(ops)
        self.strategy = strategy
        self.batch = batch
        self.pre = [op for op in _PRE if op in ops]
        self.geometric = [op for op in ops if op in _GEOMETRIC]  # in the strategy's order, as the official
        self.post = [op for op in _POST if op in ops]
        # whether a call makes a host-side random draw (the choice among several geometric ops)
        self.draws_on_host = len(self.geometric) > 1
        self.steps = self.pre + (['geometric'] if self.geometric else []) + self.post

    def __call__(self, x: Tensor) -> Tensor:
        for name in self.steps:
            if name == 'geometric':
                # a single CPU draw: picking the op needs a Python int, and a CPU
                # tensor's item() does not synchronise with the GPU
                name = self.geometric[int(torch.randint(len(self.geometric), (1,))) if self.draws_on_host else 0]
            for fn in AUGMENT_FNS[name]:
                x = fn(x, self.batch)
        return x

    def __repr__(self) -> str:
        return f'DiffAug(strategy={self.strategy!r}, batch={self.batch})'


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


# ---------------------------------------------------------------------------
# match losses
# ---------------------------------------------------------------------------
LOGIT_WEIGHT = 0.01
FEATURE_WEIGHT = 0.001   # per layer of feature matching
GRAD_WEIGHT = 0.001      # per parameter tensor of gradient matching
COS_EPS = 1e-6           # added to the norm product of the cos distance


def upcast(t: Tensor) -> Tensor:
    """Half-precision (autocast) values to float32 for reductions and losses; float32 and float64 stay
    as they are, so a float64 run (the golden-value tests) stays float64 throughout."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_siamese(augment: Callable | None) -> None:
    # per-sample augmentation would give real and fake different transforms and
    # the loss would measure the augmentation, not the real/fake gap
    if augment is not None and getattr(augment, 'batch', True) is False:
        raise ValueError('matching needs batch-mode (siamese) augmentation: use batch=True')


def _augment_pair(real: Tensor, fake: Tensor, augment: Callable | None) -> tuple[Tensor, Tensor]:
    """Augment real and fake with ONE shared draw; the real side carries no graph."""
    real = real.detach()
    if augment is None:
        return real, fake
    _check_siamese(augment)
    x = augment(torch.cat([real, fake]))
    real_x, fake_x = x.split([real.shape[0], fake.shape[0]])
    return real_x.detach(), fake_x


def logit_match_loss(model: nn.Module, real: Tensor, fake: Tensor,
                     augment: Callable | None = None) -> Tensor:
    """``0.01 * mean((log_softmax(model(real)) - log_softmax(model(fake)))^2)``.

    Real and fake are paired sample by sample (same batch size, same labels in
    the same order). They go through the model in separate forwards so that
    BatchNorm in train mode normalises each half with its own statistics.
    """
    if real.shape[0] != fake.shape[0]:
        raise ValueError(f'logit matching pairs samples: got {real.shape[0]} real and {fake.shape[0]} fake')
    real_x, fake_x = _augment_pair(real, fake, augment) if augment is not None else (real.detach(), fake)
    with torch.no_grad():
        real_logp = F.log_softmax(upcast(model(real_x)), dim=1)
    fake_logp = F.log_softmax(upcast(model(fake_x)), dim=1)
    return LOGIT_WEIGHT * ((real_logp - fake_logp) ** 2).mean()


def _metric_fn(metric: str) -> Callable[[Tensor, Tensor], Tensor]:
    try:
        return METRICS[metric]
    except KeyError:
        raise ValueError(f'unknown metric {metric!r}; valid metrics: {sorted(METRICS)}') from None


def _rows(x: Tensor) -> int:
    # the first dimension indexes the rows; a 0-d tensor is one row of one element
    return x.shape[0] if x.dim() > 0 else 1


def _cos(x: Tensor, y: Tensor) -> Tensor:
    # per row of the [first dim, -1] view; a 1-D tensor gives one row per element,
    # so each element contributes 1 - sign agreement (and 1 where either is zero)
    x, y = x.reshape(_rows(x), -1), y.reshape(_rows(y), -1)
    cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + COS_EPS)
    return (1 - cos).sum()


def _l1_mean(x: Tensor, y: Tensor) -> Tensor:
    # mean over all dimensions but the first, summed over the first (= l1 for a 1-D tensor)
    return (x - y).abs().reshape(_rows(x), -1).mean(1).sum()


METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    'mse': lambda x, y: ((x - y) ** 2).sum(),
    'l1': lambda x, y: (x - y).abs().sum(),
    'l1_mean': _l1_mean,
    'cos': _cos,
}


def dist(x: Tensor, y: Tensor, metric: str) -> Tensor:
    """The distance of feature and gradient matching, a scalar.

    ``mse``: sum of squared differences. ``l1``: sum of absolute differences.
    ``l1_mean``: mean of ``|x - y|`` over all dimensions but the first, summed
    over the first. ``cos``: with x, y viewed as ``[first dim, -1]``, the sum over
    rows of ``1 - <x_i, y_i> / (|x_i| |y_i| + 1e-6)``. For a 1-D tensor the first
    dimension is the element: ``l1_mean`` equals ``l1`` and ``cos`` compares
    single elements.
    """
    return _metric_fn(metric)(x, y)


def feature_match_loss(model: nn.Module, real: Tensor, fake: Tensor, idx_from: int = 0, idx_to: int = -1,
                       metric: str = 'l1', augment: Callable | None = None) -> Tensor:
    """``0.001 * sum_layers dist(mean_batch f(real), mean_batch f(fake), metric)``.

    ``model.features(x)`` returns the list of layer outputs; layers ``idx_from``
    to ``idx_to`` are used, both inclusive, and ``idx_to == -1`` means
    ``idx_to = idx_from`` (one layer). Only batch means are compared, so the two
    batch sizes may differ. Real features carry no gradient.
    """
    metric_fn = _metric_fn(metric)
    real_x, fake_x = _augment_pair(real, fake, augment)
    with torch.no_grad():
        real_feats = model.features(real_x)
    n = len(real_feats)
    if idx_to == -1:
        idx_to = idx_from
    if not 0 <= idx_from <= idx_to < n:
        raise ValueError(f'feature layers [{idx_from}, {idx_to}] out of range: the model has {n} layers '
                         f'(indices 0..{n - 1}, idx_from <= idx_to, idx_to = -1 for idx_from alone)')
    fake_feats = model.features(fake_x)
    d = [metric_fn(upcast(real_feats[i]).mean(0), upcast(fake_feats[i]).mean(0))
         for i in range(idx_from, idx_to + 1)]
    return FEATURE_WEIGHT * torch.stack(d).sum()


def _matched_params(model: nn.Module, bias: bool, fc: bool) -> list[nn.Parameter]:
    # by dimension, as the reference: 1-D tensors (biases and norm weights) only
    # with ``bias``, 2-D tensors (linear weights) only with ``fc``, all others
    # (conv kernels) always
    chosen = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if (p.dim() == 1 and not bias) or (p.dim() == 2 and not fc):
            continue
        chosen.append(p)
    return chosen


def gradient_match_loss(model: nn.Module, real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor,
                        metric: str = 'l1', bias: bool = False, fc: bool = False) -> Tensor:
    """``0.001 * sum_params dist(dCE(real)/dp, dCE(fake)/dp, metric)``.

    Parameters are picked by dimension: 1-D tensors (biases, norm weights) only
    with ``bias``, 2-D tensors (linear weights) only with ``fc``, the others
    (conv kernels) always. The fake gradients keep their graph
    (``create_graph=True``) so the distance backpropagates into ``fake``; the real
    gradients are constants.
    """
    metric_fn = _metric_fn(metric)
    params = _matched_params(model, bias, fc)
    if not params:
        raise ValueError('no parameters to match (no conv weights, and bias/fc not selected)')

    loss_real = F.cross_entropy(upcast(model(real.detach())), real_labels)
    g_real = torch.autograd.grad(loss_real, params, allow_unused=True)
    loss_fake = F.cross_entropy(upcast(model(fake)), fake_labels)
    g_fake = torch.autograd.grad(loss_fake, params, create_graph=True, allow_unused=True)

    # a parameter the forward does not use has no gradient on either side
    d = [metric_fn(upcast(gr.detach()), upcast(gf))
         for gr, gf in zip(g_real, g_fake) if gr is not None and gf is not None]
    if not d:
        raise ValueError('none of the matched parameters received a gradient')
    return GRAD_WEIGHT * torch.stack(d).sum()


# pool_match.py --match: each entry compares `model` on paired real and generated batches (pair i of
# class labels[i]); `opts` carries --idx-from, --idx-to, --metric, --bias and --fc.
MATCH_LOSSES: dict[str, Callable[..., Tensor]] = {
    'logit': lambda model, real, fake, labels, opts: logit_match_loss(model, real, fake),
    'feat': lambda model, real, fake, labels, opts: feature_match_loss(
        model, real, fake, idx_from=opts.idx_from, idx_to=opts.idx_to, metric=opts.metric),
    'grad': lambda model, real, fake, labels, opts: gradient_match_loss(
        model, real, labels, fake, labels, opts.metric, opts.bias, opts.fc),
}
