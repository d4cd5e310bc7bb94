"""Stage 1 of DiM: train a class-conditional GAN (WGAN-GP critic with an auxiliary classifier).

    python gen_condense.py --data cifar10 --tag gan

Every epoch writes results/<tag>/outputs/img_<epoch>.png; every --eval-interval epochs writes
results/<tag>/model_dict_<epoch>.pth and validates the generator (classifiers trained on its images).
Epochs are numbered from 0 in file names, as the official code names them: with the defaults the
files are model_dict_9.pth, model_dict_19.pth, ..., model_dict_149.pth and img_0.png ... img_149.png.

The GAN's two updates are here, in the order an iteration runs them (generator step, then critic step);
stage 2 (pool_match.py) reuses them. Losses stay device tensors (no .item()), so nothing waits on the
GPU inside the loop.

Precision: the default is fp32, as the official code. The gradient penalty runs in fp32 even under --amp
(in a CPU check at width 196, bf16 moved the penalty by 4% and its weight gradients by 6% against
float64; fp16 by 2% and 3%; fp32 by 1e-4 and 4e-4); --gp-amp runs it under autocast too. Under fp16 the
penalty's input gradient is taken of the scaled critic output and unscaled afterwards, so small
gradients do not flush to zero; a step the scaler skips for an overflow reports its penalty as 0 and is
counted in skipped_d / skipped_g, not taken for divergence.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from data.datasets import to_gan_range
from models import generate
from utils import distributed
from utils.augment import upcast
from utils.checkpoint import LAST
from utils.cli import add_resume_flags, check_flags, run, stage_parser
from utils.run import GanRun


def get_parser():
    p = stage_parser(__doc__.splitlines()[0], batch_size=128, epochs=150, lr=1e-4, resumable=True)
    add_resume_flags(p, save_every=2000)
    distributed.add_flags(p)
    return p


def train_iteration(nets, images, labels, ctx, gp_amp=False):
    """One GAN iteration on a real batch (uint8 images): generator step, then discriminator step."""
    real = to_gan_range(images)
    metrics = generator_step(nets.G_train, nets.D_train, nets.opt_g, labels, ctx, nets.scaler_g)
    metrics.update(discriminator_step(nets.G_train, nets.D_train, nets.opt_d, real, labels, ctx, nets.scaler_d,
                                      gp_amp=gp_amp))
    return metrics


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
    # the penalty differentiates the critic's input gradient (double backward), which compiled graphs
    # refuse: it runs the module behind a torch.compile wrapper (--compile), the same parameters
    gp_critic = getattr(D, '_orig_mod', D)
    grad_scale = scaler.scale(torch.ones((), device=real.device)) if scaler.is_enabled() and gp_amp else None
    with ctx if gp_amp else torch.autocast(real.device.type, enabled=False):
        gp = gradient_penalty(lambda x: upcast(gp_critic(x)[0]), real, fake.to(real.dtype),
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


def optimizer_step(loss, opt, scaler):
    """Zero the gradients, backward, step. Under fp16 (`scaler` enabled) through the loss scaler, and
    returns whether it skipped the step for an overflow (1.0) as a device tensor, read without a host
    sync (get_scale() would call .item()): the scale only goes down when it skipped. Else None."""
    opt.zero_grad(set_to_none=True)
    if not scaler.is_enabled():
        loss.backward()
        opt.step()
        return None
    one = torch.ones((), device=loss.device)
    before = scaler.scale(one)
    scaler.scale(loss).backward()
    scaler.step(opt)  # a fused optimizer takes the overflow flag on the device; others read it (.item())
    scaler.update()
    return (scaler.scale(one) < before).float()


def train(r):
    args = r.args
    print(f"stage 1: {r.info.name}, {len(r.train_split)} training images, {len(r.train_stream)} "
          f"iterations per epoch, {args.epochs} epochs, device {r.device}, {r.fast.describe()}")
    while r.epoch < args.epochs or r.validate_pending:
        if not r.validate_pending:  # else: resumed in the middle of a validation; finish it first
            bar = r.runlog.progress(r.epoch_batches(), total=len(r.train_stream) - r.epoch_iteration,
                                    desc=f'epoch {r.epoch + 1}/{args.epochs}')
            for images, labels in bar:
                r.after_iteration(train_iteration(r.nets, images, labels, r.ctx, r.fast.gp_amp))
            r.end_epoch()
            if r.epoch % args.eval_interval == 0:
                r.save(f'model_dict_{r.epoch - 1}.pth')  # the epoch's index from 0, the official name
                r.validate_pending = True
            r.save(LAST)  # before validating: a stop during validation resumes into the same validation
        if r.validate_pending:
            for name, result in r.validate().items():
                r.best[name] = max(r.best.get(name, 0.0), result['best_top1'])
            r.validate_pending = False
            r.save(LAST)
    print("done; best top-1 per eval model (selected on test): "
          + ', '.join(f'{k} {v:.2f}' for k, v in r.best.items()))


def main():
    args = get_parser().parse_args()
    check_flags(args)  # every refusal the flags alone decide, before anything is loaded
    GanRun(args, 'gen_condense', init_weight=args.weight).execute(train)


if __name__ == '__main__':
    run(main)
