"""The WGAN-GP critic with an auxiliary classifier: generator and discriminator updates of stages 1 and 2.

Losses return as device tensors (no .item()), so nothing waits on the GPU inside the loop.

The steps take the networks they call (`GanNets.G_train`, `D_train`), which may be torch.compile
or DistributedDataParallel wrappers sharing their parameters with the plain modules. The gradient penalty differentiates the critic's input gradient (double backward), which
compiled graphs do not support, so it always runs the plain critic (`eager(D)`).

The penalty runs in fp32 by default (TF32 convolutions on CUDA unless --deterministic: the precision
the reference had, cuDNN allowing TF32 by default): it is a function of the critic's input gradient,
which half precision moves a lot -- in a CPU check at width 196, bf16 moved the penalty by 4% and its
weight gradients by 6% (median), fp16 by 2% and 3%, against float64 (fp32: 1e-4 and 4e-4).
`gp_amp=True` (--gp-amp) runs it under the autocast context as well. With fp16 (the scaler enabled)
its input gradient is then taken of the scaled critic output and unscaled afterwards, so small
gradients do not flush to zero; when that scaled gradient overflows, the scaler skips the step and
backs off. Such a step is not a divergence: its penalty is reported as 0. Steps the scaler skipped
are counted in `skipped_d` / `skipped_g`.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Discriminator, Generator, conditional_noise
from utils.matching import gradient_penalty, upcast
from utils.runtime import backward_step, eager, scale_value


def adam(params, lr, **impl):
    # betas as two floats: the reference's (0, 0.9) mixed an int and a float, which current PyTorch refuses
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.9), **impl)


@dataclass
class GanNets:
    """The two networks of a GAN stage and what trains them. `G` and `D` are the modules checkpoints
    save; `G_train` and `D_train` are what the steps call: the same parameters, compiled with
    --compile and wrapped in DistributedDataParallel under torchrun (else the modules themselves)."""
    G: Generator
    D: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    G_train: nn.Module
    D_train: nn.Module
    scaler_g: torch.amp.GradScaler  # fp16 loss scaling; disabled (plain backward and step) otherwise
    scaler_d: torch.amp.GradScaler


def build_gan(g_cfg, d_cfg, fast, lr):
    """G and D as the fast path wants them, with their Adam optimizers at `lr` and loss scalers."""
    G, D = fast.prepare(Generator(**g_cfg)), fast.prepare(Discriminator(**d_cfg))
    impl = fast.optimizer_kwargs(torch.optim.Adam)
    return GanNets(G=G, D=D, opt_g=adam(G.parameters(), lr, **impl), opt_d=adam(D.parameters(), lr, **impl),
                   G_train=fast.compiled(G), D_train=fast.compiled(D),
                   scaler_g=fast.scaler(), scaler_d=fast.scaler())


def generate(G, labels):
    """Images of the given classes: N(0, I) noise whose first entries are the one-hot class."""
    return G(conditional_noise(labels, G.num_classes, G.dim_noise))


@contextmanager
def critic_frozen(D):
    """The generator's update: its gradients flow through D, D's own are not needed (and D is in eval
    mode, which only mirrors the reference: the critic has no BatchNorm)."""
    D.eval()
    for p in D.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in D.parameters():
            p.requires_grad_(True)
        D.train()


def generator_loss(G, D, labels, ctx):
    """(fake, loss): fake = G(z) with z conditioned on `labels`, and the generator's GAN loss
    -mean(critic(fake)) + CE(classes(fake), labels). Run it inside `critic_frozen(D)`."""
    with ctx:
        fake = generate(G, labels)
        critic, logits = D(fake)
        loss = -upcast(critic).mean() + F.cross_entropy(upcast(logits), labels)
    return fake, loss


def generator_step(G, D, opt_g, labels, ctx, scaler):
    """Stage 1's generator update: generator_loss, backward, Adam step."""
    with critic_frozen(D):
        _, loss = generator_loss(G, D, labels, ctx)
        skipped = optimizer_step(loss, opt_g, scaler)
    metrics = {'loss_g': loss.detach()}
    if skipped is not None:  # fp16 loss scaling
        metrics['skipped_g'] = skipped
    return metrics


def discriminator_step(G, D, opt_d, real, real_labels, ctx, scaler, gp_amp=False, gp_weight=10.0):
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
        critic, logits = upcast(critic), upcast(logits)
        n = len(real)
        adv = critic[n:].mean() - critic[:n].mean()
        ce = F.cross_entropy(logits[n:], fake_labels) + F.cross_entropy(logits[:n], real_labels)
    plain_critic = eager(D)
    grad_scale = scale_value(scaler, real.device) if scaler.is_enabled() and gp_amp else None
    with ctx if gp_amp else torch.autocast(real.device.type, enabled=False):
        gp = gradient_penalty(lambda x: upcast(plain_critic(x)[0]), real, fake.to(real.dtype),
                              weight=gp_weight, grad_scale=grad_scale)
    loss = adv + ce + gp
    skipped = optimizer_step(loss, opt_d, scaler)
    out = {'loss_d': loss.detach(), 'wasserstein': -adv.detach(), 'gp': gp.detach(),
           'acc_real': (logits[:n].argmax(1) == real_labels).float().mean().detach()}
    if skipped is not None:  # fp16 loss scaling
        out['skipped_d'] = skipped
    if grad_scale is not None:
        # an overflow of the scaled penalty gradient: the scaler skipped this step (see module doc)
        shown = torch.where(torch.isfinite(out['gp']), out['gp'], torch.zeros_like(out['gp']))
        out['loss_d'] = (adv + ce).detach() + shown
        out['gp'] = shown
    return out


def optimizer_step(loss, opt, scaler):
    """backward_step; under fp16 loss scaling, also whether the scaler skipped the step (1.0), as a
    device tensor: the scale only goes down when an overflow made it skip. None without loss scaling."""
    if not scaler.is_enabled():
        backward_step(loss, opt, scaler)
        return None
    before = scale_value(scaler, loss.device)
    backward_step(loss, opt, scaler)
    return (scale_value(scaler, loss.device) < before).float()
