"""The WGAN-GP critic with an auxiliary classifier: generator and discriminator updates of stages 1 and 2.

Losses return as device tensors (no .item()), so nothing waits on the GPU inside the loop.

`G` and `D` may be torch.compile wrappers (`FastPath.compiled`): they share their parameters with the
plain modules. The gradient penalty differentiates the critic's input gradient (double backward), which
compiled graphs do not support, so it always runs the plain critic (`eager(D)`).

The penalty runs in fp32 by default (TF32 convolutions on CUDA unless --deterministic: the precision
the reference had, cuDNN allowing TF32 by default): it is a function of the critic's input gradient,
which half precision moves a lot -- in a CPU check at width 196, bf16 moved the penalty by 4% and its
weight gradients by 6% (median), fp16 by 2% and 3%, against float64 (fp32: 1e-4 and 4e-4).
`gp_amp=True` (--gp-amp) runs it under the autocast context as well. With fp16 (a `scaler` given)
its input gradient is then taken of the scaled critic output and unscaled afterwards, so small
gradients do not flush to zero; when that scaled gradient overflows, the scaler skips the step and
backs off. Such a step is not a divergence: its penalty is reported as 0. Steps the scaler skipped
are counted in `skipped_d` / `skipped_g`.
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from models import Discriminator, Generator, conditional_noise
from utils.matching import gradient_penalty
from utils.runtime import backward_step, eager, scale_value


def build_gan(g_cfg, d_cfg, fast, make_optimizer):
    """G and D as the fast path wants them, their optimizers `make_optimizer(params, **impl)`, the
    callables the steps run (compiled with --compile) and the fp16 loss scalers (else None)."""
    G, D = fast.prepare(Generator(**g_cfg)), fast.prepare(Discriminator(**d_cfg))
    impl = fast.optimizer_kwargs(torch.optim.Adam)
    return SimpleNamespace(G=G, D=D, opt_g=make_optimizer(G.parameters(), **impl),
                           opt_d=make_optimizer(D.parameters(), **impl),
                           G_step=fast.compiled(G), D_step=fast.compiled(D),
                           scaler_g=fast.scaler(), scaler_d=fast.scaler())


def generate(G, labels):
    """Images of the given classes: N(0, I) noise whose first entries are the one-hot class."""
    return G(conditional_noise(labels, G.num_classes, G.dim_noise))


def _set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def generator_step(G, D, opt_g, labels, ctx, extra_loss=None, scaler=None):
    """loss_G = -mean(critic(G(z))) + CE(classes(G(z)), labels), z conditioned on `labels`.

    `extra_loss(fake)` is called after the adversarial loss is formed and its value added before the
    step: stage 2 trains its pool model there and returns the match term.
    """
    D.eval()  # the critic has no BatchNorm, so this only mirrors the reference
    _set_requires_grad(D, False)  # G's gradients flow through D; D's own are not needed here
    try:
        with ctx:
            fake = generate(G, labels)
            critic, logits = D(fake)
            loss = -critic.float().mean() + F.cross_entropy(logits.float(), labels)
        match = extra_loss(fake) if extra_loss is not None else None
        total = loss if match is None else loss + match
        opt_g.zero_grad(set_to_none=True)
        skipped = _step(total, opt_g, scaler, labels.device)
    finally:
        _set_requires_grad(D, True)
        D.train()
    out = {'loss_g': loss.detach()}
    if match is not None:
        out['loss_match'] = match.detach()
    if skipped is not None:
        out['skipped_g'] = skipped
    return out


def discriminator_step(G, D, opt_d, real, real_labels, ctx, gp_weight=10.0, scaler=None, gp_amp=False):
    """loss_D = mean(critic(fake)) - mean(critic(real)) + CE(fake) + CE(real) + GP, fake labels uniform.

    G stays in train mode while it draws the fakes (without gradient), as in the reference, so its
    BatchNorm running statistics keep updating here too.
    """
    fake_labels = torch.randint(G.num_classes, real_labels.shape, device=real_labels.device)
    with torch.no_grad(), ctx:
        fake = generate(G, fake_labels)
    with ctx:
        # one pass over real and fake together: the critic has only per-sample (layer) norms
        critic, logits = D(torch.cat([real, fake.to(real.dtype)]))
        critic, logits = critic.float(), logits.float()
        n = len(real)
        adv = critic[n:].mean() - critic[:n].mean()
        ce = F.cross_entropy(logits[n:], fake_labels) + F.cross_entropy(logits[:n], real_labels)
    plain_critic = eager(D)
    grad_scale = scale_value(scaler, real.device) if scaler is not None and gp_amp else None
    with ctx if gp_amp else torch.autocast(real.device.type, enabled=False):
        gp = gradient_penalty(lambda x: plain_critic(x)[0].float(), real, fake.to(real.dtype),
                              weight=gp_weight, grad_scale=grad_scale)
    loss = adv + ce + gp
    opt_d.zero_grad(set_to_none=True)
    skipped = _step(loss, opt_d, scaler, real.device)
    out = {'loss_d': loss.detach(), 'wasserstein': -adv.detach(), 'gp': gp.detach(),
           'acc_real': (logits[:n].argmax(1) == real_labels).float().mean().detach()}
    if skipped is not None:
        out['skipped_d'] = skipped
    if grad_scale is not None:
        # an overflow of the scaled penalty gradient: the scaler skipped this step (see module doc)
        shown = torch.where(torch.isfinite(out['gp']), out['gp'], torch.zeros_like(out['gp']))
        out['loss_d'] = (adv + ce).detach() + shown
        out['gp'] = shown
    return out


def _step(loss, opt, scaler, device):
    """backward_step; with a scaler, also whether it skipped the step (1.0) -- a device tensor: the
    scale only goes down when an overflow made the scaler skip."""
    if scaler is None:
        backward_step(loss, opt)
        return None
    before = scale_value(scaler, device)
    backward_step(loss, opt, scaler)
    return (scale_value(scaler, device) < before).float()
