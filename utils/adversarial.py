"""The WGAN-GP critic with an auxiliary classifier: generator and discriminator updates of stages 1 and 2.

Losses return as device tensors (no .item()), so nothing waits on the GPU inside the loop.
"""
import torch
import torch.nn.functional as F

from models import conditional_noise
from utils.matching import gradient_penalty


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
        _backward_step(total, opt_g, scaler)
    finally:
        _set_requires_grad(D, True)
        D.train()
    out = {'loss_g': loss.detach()}
    if match is not None:
        out['loss_match'] = match.detach()
    return out


def discriminator_step(G, D, opt_d, real, real_labels, ctx, gp_weight=10.0, scaler=None):
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
        gp = gradient_penalty(lambda x: D(x)[0].float(), real, fake.to(real.dtype), weight=gp_weight)
    loss = adv + ce + gp
    opt_d.zero_grad(set_to_none=True)
    _backward_step(loss, opt_d, scaler)
    return {'loss_d': loss.detach(), 'wasserstein': -adv.detach(), 'gp': gp.detach(),
            'acc_real': (logits[:n].argmax(1) == real_labels).float().mean().detach()}


def _backward_step(loss, opt, scaler):
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
