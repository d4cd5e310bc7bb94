"""Match losses between real and generated images, and the WGAN-GP penalty.

All match losses treat the real side as data (no graph is kept for it) and keep
the graph of the fake side, so the loss trains the generator through ``model``.
Augmentation, when given (logit and feature matching), is applied to
``torch.cat([real, fake])`` in batch (siamese) mode so both halves get the same
transform; callers may instead augment the pair themselves and pass none.
Feature and gradient matching measure with ``dist`` (``METRICS``) and weight
each layer / parameter tensor by 0.001, as the reference does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['upcast', 'gradient_penalty', 'logit_match_loss', 'feature_match_loss',
           'gradient_match_loss', 'MATCH_LOSSES', 'METRICS', 'dist']

LOGIT_WEIGHT = 0.01
FEATURE_WEIGHT = 0.001   # per layer of feature matching
GRAD_WEIGHT = 0.001      # per parameter tensor of gradient matching
COS_EPS = 1e-6           # added to the norm product of the cos distance


def upcast(t: Tensor) -> Tensor:
    """Half-precision (autocast) values to float32 for reductions and losses; float32 and float64 stay
    as they are, so a float64 run (the golden-value tests) stays float64 throughout."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                     weight: float = 10.0, alpha: Tensor | None = None,
                     grad_scale: Tensor | None = None) -> Tensor:
    """WGAN-GP: ``weight * mean((||d critic(x_hat) / d x_hat||_2 - 1)^2)``.

    ``x_hat = a * real + (1 - a) * fake`` with ``a ~ U(0, 1)`` per sample (or the
    given ``alpha`` of shape [B]). The penalty constrains the critic only, so the
    interpolates are a fresh leaf (no gradient to the generator); the graph of
    the input gradient is kept so the penalty can be backpropagated into the
    critic's weights (double backward).

    ``grad_scale`` (fp16 loss scaling): the input gradient is taken of the
    critic output times this scale and divided by it again, so it does not
    underflow in half precision; the penalty's value is unchanged.
    """
    B = real.shape[0]
    if alpha is None:
        alpha = torch.rand(B, device=real.device)
    a = alpha.to(device=real.device, dtype=real.dtype).view(B, *([1] * (real.dim() - 1)))
    x_hat = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat).sum()
    if grad_scale is not None:
        scores = scores * grad_scale
    grad, = torch.autograd.grad(scores, x_hat, create_graph=True)
    if grad_scale is not None:
        grad = upcast(grad) / grad_scale
    norm = upcast(grad.flatten(1)).norm(2, dim=1)
    return weight * ((norm - 1) ** 2).mean()


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
    real_x, fake_x = _augment_pair(real, fake, augment)
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
