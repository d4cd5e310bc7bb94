"""Stage 2 of DiM: fine-tune the GAN so a random pool of classifiers gives the same logits on real and
generated images.

    python pool_match.py --tag match --match logit --match-aug --weight results/gan/model_dict_149.pth

Each epoch draws one pool model; per batch it takes --epochs-match-train SGD steps on real data, then
the generator steps on its GAN loss plus the match term. Every --eval-interval epochs the generator is
validated and results/<tag>/model_dict_<eval model>.pth is written when that model's best improves.
"""
import random

import torch
import torch.nn.functional as F

from data.datasets import normalize, to_gan_range
from gen_condense import critic_frozen, discriminator_step, generator_loss, optimizer_step
from models import list_models
from utils import distributed
from utils.augment import MATCH_LOSSES, DiffAug, logit_match_loss, upcast
from utils.checkpoint import LAST
from utils.cli import (add_cuda_graphs_flag, add_match_flags, add_resume_flags, check_flags as check_stage_flags,
                       run, stage_parser)
from data.errors import UserError
from utils.evaluate import build_classifier, classifier_optimizer
from utils.graphs import GraphedStep, capture_problem
from utils.runtime import load_optimizer_state
from utils.run import GanRun

POOL = ['convnet', 'resnet10', 'resnet18', 'resnet10_ap', 'resnet18_ap']


def get_parser():
    p = stage_parser(__doc__.splitlines()[0], batch_size=64, epochs=100, lr=5e-6, matching=True, resumable=True)
    g = add_match_flags(p, acting=True)
    g.add_argument('--match', default='logit', choices=('logit', 'feat', 'grad'),
                   help="what the pool model compares (the official parser's default was 'grad'; the "
                        "paper and its README use 'logit')")
    g.add_argument('--idx-from', type=int, default=0, help='--match feat: first pool-model layer matched')
    g.add_argument('--idx-to', type=int, default=-1,
                   help='--match feat: last layer matched, inclusive (-1: --idx-from, one layer)')
    g.add_argument('--pool', nargs='+', default=POOL, help='models the pool draws from, one per epoch')
    g.add_argument('--pool-lr', type=float, default=None,
                   help='SGD learning rate of the pool model (None: --eval-lr, as the official code)')
    add_cuda_graphs_flag(g)
    add_resume_flags(p, save_every=400)
    distributed.add_flags(p)
    return p


def pool_train_augment(args):
    """The per-sample augmentation of the pool model's training batches."""
    return DiffAug(args.aug_type, mixup_net=args.mixup_net)


class Pool:
    """The pool model of the current epoch, its SGD optimizer, and the augmentations around it.

    `saved`: the pool entry of a resumed run's checkpoint (`state()`), read from `where`."""

    def __init__(self, args, info, fast, train_stream, ctx, saved=None, where=None):
        self.args, self.info, self.fast, self.train_stream, self.ctx = args, info, fast, train_stream, ctx
        self.train_aug = pool_train_augment(args)
        self.match_aug = DiffAug(args.aug_type, batch=True)
        self.name = self.model = self.net = self.opt = None
        self.scaler = fast.scaler()
        # the pool steps, replayed from a CUDA graph with --cuda-graphs (one capture per pool model)
        graphs = args.cuda_graphs == 'on' and args.epochs_match_train > 0
        if graphs:
            problem = capture_problem(fast.device, amp=fast.amp, compile_mode=fast.compile,
                                      distributed=distributed.is_dist(), data_device=train_stream.images.device,
                                      host_random_augment=self.train_aug.draws_on_host)
            if problem:
                raise UserError(problem)
        # --epochs-match-train SGD steps on the first batches of a fresh shuffled pass over the real training
        # set (disjoint batches, as the official code restarts its loader for every generator step)
        self.train_steps = GraphedStep(self._train_steps) if graphs else self._train_steps
        self.train_ctx = fast.ctx(cache=False) if graphs else ctx
        if saved:
            try:
                # building draws initial weights; keep the random numbers the resume just restored
                with torch.random.fork_rng(devices=[]):
                    self.build(saved['name'])
                self.model.load_state_dict(saved['model'])
                load_optimizer_state(self.opt, saved['optimizer'])
                if self.scaler.is_enabled() and saved.get('scaler'):
                    self.scaler.load_state_dict(saved['scaler'])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"--resume: the pool model in {where} does not fit ({type(e).__name__})") from None

    def build(self, name):
        self.name = name
        self.model = build_classifier(name, self.info, self.fast.device, self.fast)  # in train mode, which it never leaves:
        # its steps and the match loss use batch statistics, as in the official code
        self.opt = classifier_optimizer(self.model.parameters(), self.args, self.fast, lr=self.args.pool_lr)
        # what the steps call (compiled with --compile, DDP under torchrun); self.model is what is saved
        self.net = distributed.wrap(self.fast.compiled(self.model))
        if isinstance(self.train_steps, GraphedStep):
            self.train_steps.reset()  # the capture holds the previous model's tensors

    def state(self):
        return {'pool': {'name': self.name, 'model': self.model.state_dict(), 'optimizer': self.opt.state_dict(),
                         'scaler': self.scaler.state_dict() if self.scaler.is_enabled() else None}}

    def to_pool_input(self, x):
        # As in the reference, the pool model sees the GAN's [-1, 1] images normalised again with the
        # dataset statistics (the validation classifiers see [0, 1] images normalised the same way).
        # At least float32 whatever --amp made of x (float64 stays: the golden-value tests), so real and
        # generated halves get the same constants.
        return normalize(upcast(x), self.info.mean, self.info.std)

    def _train_steps(self):
        for images, labels in self.train_stream.first_batches(self.args.epochs_match_train):
            x = self.train_aug(self.to_pool_input(to_gan_range(images)))
            with self.train_ctx:
                loss = F.cross_entropy(upcast(self.net(x)), labels)
            optimizer_step(loss, self.opt, self.scaler)

    def match_loss(self, real, fake, labels):
        """The pool model's --match comparison of real and generated images; gradients reach G."""
        if self.args.match_aug:  # one draw for both halves: the same transform on pair i
            real, fake = self.match_aug(torch.cat([self.to_pool_input(real), self.to_pool_input(fake)])).chunk(2)
        else:  # as the official code: the [-1, 1] images unnormalised, though the pool model trains on normalised ones
            real, fake = upcast(real), upcast(fake)
        if self.args.match == 'grad':  # differentiates the pool model's own gradients: needs its params, fp32
            return upcast(MATCH_LOSSES['grad'](self.model, real, fake, labels, self.args))
        self.model.requires_grad_(False)  # only G needs gradients of the match term
        try:
            with self.ctx:
                if self.args.match == 'logit':  # the paper's: the net the steps call
                    return upcast(logit_match_loss(self.net, real, fake))
                return upcast(MATCH_LOSSES['feat'](self.model, real, fake, labels, self.args))  # has features()
        finally:
            self.model.requires_grad_(True)


def train_iteration(nets, pool, images, labels, ctx, gp_amp=False):
    """One stage-2 iteration on a real batch (uint8 images), in the official order: the generator's GAN
    loss, the pool model's training, the match term, the generator step; then stage 1's
    discriminator step."""
    real = to_gan_range(images)
    with critic_frozen(nets.D):
        fake, loss_g = generator_loss(nets.G_train, nets.D_train, labels, ctx)
        pool.train_steps()  # --epochs-match-train SGD steps of the pool model on real batches
        loss_match = pool.match_loss(real, fake, labels)
        skipped = optimizer_step(loss_g + loss_match, nets.opt_g, nets.scaler_g)
    metrics = {'loss_g': loss_g.detach(), 'loss_match': loss_match.detach()}
    if skipped is not None:  # fp16 loss scaling
        metrics['skipped_g'] = skipped
    metrics.update(discriminator_step(nets.G_train, nets.D_train, nets.opt_d, real, labels, ctx, nets.scaler_d,
                                      gp_amp=gp_amp))
    return metrics


def train(r, pool):
    args = r.args
    print(f"stage 2: {r.info.name}, match {args.match}{' + aug' if args.match_aug else ''}, pool "
          f"{' '.join(args.pool)}, {len(r.train_stream)} iterations per epoch, {args.epochs} epochs, "
          f"device {r.device}, {r.fast.describe()}")
    while r.epoch < args.epochs or r.validate_pending:
        if not r.validate_pending:
            if r.epoch_iteration == 0 or pool.model is None:
                pool.build(distributed.broadcast_object(random.choice(args.pool)))  # rank 0's draw
                print(f"epoch {r.epoch + 1}: pool model {pool.name}")
                # on the loss curves' axis (iterations): a jump in Loss/match reads against the model drawn
                r.runlog.scalars({'Pool/model_index': args.pool.index(pool.name)}, r.iteration)
                r.runlog.text('Pool/model', f'epoch {r.epoch + 1}: {pool.name} (index {args.pool.index(pool.name)} '
                              f'of --pool {" ".join(args.pool)})', r.iteration)
            bar = r.runlog.progress(r.epoch_batches(), total=len(r.train_stream) - r.epoch_iteration,
                                    desc=f'epoch {r.epoch + 1}/{args.epochs} ({pool.name})')
            for images, labels in bar:
                metrics = train_iteration(r.nets, pool, images, labels, r.ctx, r.fast.gp_amp)
                r.after_iteration(metrics, save_extra=pool.state)
            r.end_epoch()
            r.validate_pending = r.epoch % args.eval_interval == 0
            r.save(LAST, pool.state())
        if r.validate_pending:
            for name, result in r.validate().items():
                if result['best_top1'] > r.best.get(name, -1.0):
                    r.best[name] = result['best_top1']
                    path = r.save(f'model_dict_{name}.pth')
                    print(f"  new best for {name}: {result['best_top1']:.2f}; saved {path}")
            r.validate_pending = False
            r.save(LAST, pool.state())
    print("done; best top-1 per eval model (selected on test): "
          + ', '.join(f'{k} {v:.2f}' for k, v in r.best.items()))


def check_flags(args):
    """Every refusal the flags alone decide, before anything is loaded. (--cuda-graphs is checked
    when the Pool is built: whether a capture works depends on where the training set lives.)"""
    check_stage_flags(args)
    if not args.resume and not args.weight:
        raise UserError("pool_match.py needs --weight CHECKPOINT (a gen_condense.py model_dict_<epoch>.pth)")
    if args.epochs_match_train < 0:
        raise UserError("--epochs-match-train must be 0 or more")
    unknown = [m for m in args.pool if m not in list_models()]
    if unknown:
        raise UserError(f"unknown --pool model {', '.join(unknown)}; choose from: {', '.join(list_models())}")


def main():
    args = get_parser().parse_args()
    check_flags(args)
    r = GanRun(args, 'pool_match', init_weight=args.weight)
    saved = r.ckpt.get('pool') if r.resumed_from else None
    pool = Pool(args, r.info, r.fast, r.train_stream, r.ctx, saved, r.resumed_from)
    r.execute(lambda run: train(run, pool))


if __name__ == '__main__':
    run(main)
