"""Match losses between real and generated images, and the WGAN-GP penalty.

All match losses treat the real side as data (no graph is kept for it) and keep
the graph of the fake side, so the loss trains the generator through ``model``.
Augmentation, when given, is applied to ``torch.cat([real, fake])`` in batch
(siamese) mode so both halves get the same transform.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['gradient_penalty', 'logit_match_loss', 'feature_match_loss',
           'gradient_match_loss', 'MATCH_LOSSES', 'GRAD_METRICS']

LOGIT_WEIGHT = 0.01
FEATURE_WEIGHT = 0.001
COS_EPS = 1e-6


def _fp32(t: Tensor) -> Tensor:
    # reduce half-precision (autocast) values in float32; keep float64 as is
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
        grad = _fp32(grad) / grad_scale
    norm = _fp32(grad.flatten(1)).norm(2, dim=1)
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
        real_logp = F.log_softmax(_fp32(model(real_x)), dim=1)
    fake_logp = F.log_softmax(_fp32(model(fake_x)), dim=1)
    return LOGIT_WEIGHT * ((real_logp - fake_logp) ** 2).mean()


def _layer_range(n: int, idx_from: int, idx_to: int) -> slice:
    # inclusive range; negative indices count from the end (-1 = last layer)
    start, stop = idx_from % n, idx_to % n + 1
    if start >= stop:
        raise ValueError(f'empty layer range [{idx_from}, {idx_to}] for {n} layers')
    return slice(start, stop)


def feature_match_loss(model: nn.Module, real: Tensor, fake: Tensor, augment: Callable | None = None,
                       idx_from: int = 0, idx_to: int = -1) -> Tensor:
    """``0.001 * sum_layers sum((mean_batch f(real) - mean_batch f(fake))^2)``.

    ``model.features(x)`` returns a list of activations; layers ``idx_from`` to
    ``idx_to`` are used, both inclusive. Only batch means are compared, so the
    two batch sizes may differ.
    """
    real_x, fake_x = _augment_pair(real, fake, augment)
    with torch.no_grad():
        real_feats = model.features(real_x)
    fake_feats = model.features(fake_x)
    layers = _layer_range(len(fake_feats), idx_from, idx_to)
    dist = [((_fp32(r).mean(0) - _fp32(f).mean(0)) ** 2).sum()
            for r, f in zip(real_feats[layers], fake_feats[layers])]
    return FEATURE_WEIGHT * torch.stack(dist).sum()


def _cos_distance(gr: Tensor, gf: Tensor) -> Tensor:
    """Sum over output channels of 1 - cosine similarity."""
    # A 1-D parameter (a bias) is compared as one vector: per element, the
    # cosine of two scalars is only their sign agreement and has no gradient.
    rows = gr.shape[0] if gr.dim() > 1 else 1
    gr, gf = gr.reshape(rows, -1), gf.reshape(rows, -1)
    nr, nf = gr.norm(dim=1), gf.norm(dim=1)
    # The cosine is undefined for a (near) zero gradient: a dead unit, or a conv
    # bias right before BatchNorm. Such channels are left out (the additive-eps
    # form would count them as a constant 1, with the same zero gradient), so
    # identical gradients give 0; the clamp only keeps the division finite.
    defined = (nr > COS_EPS) & (nf > COS_EPS)
    cos = (gr * gf).sum(1) / (nr.clamp_min(COS_EPS) * nf.clamp_min(COS_EPS))
    return ((1 - cos) * defined).sum()


GRAD_METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    'l1': lambda gr, gf: (gr - gf).abs().sum(),
    'mse': lambda gr, gf: ((gr - gf) ** 2).sum(),
    'l1_mean': lambda gr, gf: (gr - gf).abs().mean(),
    'cos': _cos_distance,
}


def _matched_params(model: nn.Module, bias: bool, fc: bool) -> list[nn.Parameter]:
    # conv kernels always; 1-D biases and the classifier ('fc.*') are opt-in
    chosen = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (p.dim() == 4
                or (bias and p.dim() == 1 and name.split('.')[-1] == 'bias')
                or (fc and name.startswith('fc.'))):
            chosen.append(p)
    return chosen


def gradient_match_loss(model: nn.Module, real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor,
                        metric: str = 'l1', bias: bool = False, fc: bool = False) -> Tensor:
    """Distance between the CE-loss parameter gradients on real and on fake data.

    The fake gradients keep their graph (``create_graph=True``) so the distance
    backpropagates into ``fake``; the real gradients are constants.
    """
    if metric not in GRAD_METRICS:
        raise ValueError(f'unknown metric {metric!r}; valid metrics: {sorted(GRAD_METRICS)}')
    dist_fn = GRAD_METRICS[metric]
    params = _matched_params(model, bias, fc)
    if not params:
        raise ValueError('no parameters to match (no conv weights, and bias/fc not selected)')

    loss_real = F.cross_entropy(_fp32(model(real.detach())), real_labels)
    g_real = torch.autograd.grad(loss_real, params, allow_unused=True)
    loss_fake = F.cross_entropy(_fp32(model(fake)), fake_labels)
    g_fake = torch.autograd.grad(loss_fake, params, create_graph=True, allow_unused=True)

    # a parameter the forward does not use has no gradient on either side
    dist = [dist_fn(_fp32(gr.detach()), _fp32(gf))
            for gr, gf in zip(g_real, g_fake) if gr is not None and gf is not None]
    if not dist:
        raise ValueError('none of the matched parameters received a gradient')
    return torch.stack(dist).sum()


MATCH_LOSSES: dict[str, Callable[..., Tensor]] = {
    'logit': logit_match_loss,
    'feat': feature_match_loss,
    'grad': gradient_match_loss,
}
