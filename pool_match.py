"""Stage 2 of DiM: fine-tune the GAN so a random pool of classifiers gives the same logits on real and
generated images.

    python pool_match.py --tag match --match logit --match-aug --weight results/gan/model_dict_149.pth

Each epoch draws one pool model; per batch it takes --epochs-match-train SGD steps on real data, then
the generator steps on its GAN loss plus the match term. Every --eval-interval epochs the generator is
validated and results/<tag>/model_dict_<eval model>.pth is written when that model's best improves.
"""
import random

import torch

from data.datasets import to_gan_range
from models import list_models
from utils import distributed
from utils.adversarial import discriminator_step, generator_step
from utils.augment import make_augment, normalize
from utils.checkpoint import LAST
from utils.cli import add_match_flags, add_resume_flags, run, stage_parser
from utils.errors import UserError
from utils.evaluate import build_classifier, classifier_optimizer, classifier_step
from utils.graphs import GraphedStep, capture_problem
from utils.matching import feature_match_loss, gradient_match_loss, logit_match_loss
from utils.runtime import eager, load_optimizer_state
from utils.stage import GanRun

POOL = ['convnet', 'resnet10', 'resnet18', 'resnet10_ap', 'resnet18_ap']


def get_parser():
    p = stage_parser(__doc__.splitlines()[0], batch_size=64, epochs=100, lr=5e-6, matching=True)
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
    g.add_argument('--cuda-graphs', default='off', choices=('off', 'on'),
                   help="replay the --epochs-match-train pool steps from one CUDA graph (one launch instead "
                        "of thousands; same computation). Off by default: not yet measured on a GPU")
    add_resume_flags(p, save_every=400)
    distributed.add_flags(p)
    return p


def pool_train_augment(args):
    """The per-sample augmentation of the pool model's training batches."""
    return make_augment(args.aug_type, args.mixup_net, batch=False)


class Pool:
    """The pool model of the current epoch, its optimizer, and the augmentations around it."""

    def __init__(self, r):
        self.r, self.args = r, r.args
        self.train_aug = pool_train_augment(self.args)
        self.match_aug = make_augment(self.args.aug_type, self.args.mixup_net, batch=True)
        self.name = self.model = self.net = self.opt = None
        self.scaler = r.fast.scaler()  # fp16 only; else None
        # the pool steps, replayed from a CUDA graph with --cuda-graphs (one capture per pool model)
        graphs = self.args.cuda_graphs == 'on' and self.args.epochs_match_train > 0
        self.graphed = GraphedStep(self._train_steps) if graphs else None
        self.train_ctx = r.fast.ctx(cache=False) if self.graphed is not None else r.ctx
        state = (r.ckpt or {}).get('pool') if r.resumed_from else None
        if state:
            try:
                # building draws initial weights; keep the random numbers the resume just restored
                with torch.random.fork_rng(devices=[]):
                    self.build(state['name'])
                self.model.load_state_dict(state['model'])
                load_optimizer_state(self.opt, state['optimizer'])
                if self.scaler is not None and state.get('scaler'):
                    self.scaler.load_state_dict(state['scaler'])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"--resume: the pool model in {r.resumed_from} does not fit "
                                f"({type(e).__name__})") from None

    def build(self, name):
        fast = self.r.fast
        self.name = name
        self.model = build_classifier(name, self.r.info, self.r.device, fast)
        self.opt = classifier_optimizer(self.model.parameters(), self.args, lr=self.args.pool_lr,
                                        **fast.optimizer_kwargs(torch.optim.SGD))
        # what the steps call (compiled with --compile, DDP under torchrun); self.model is what is saved
        self.net = distributed.wrap(fast.compiled(self.model))
        if self.graphed is not None:
            self.graphed.reset()  # the capture holds the previous model's tensors

    def state(self):
        return {'pool': {'name': self.name, 'model': self.model.state_dict(), 'optimizer': self.opt.state_dict(),
                         'scaler': self.scaler.state_dict() if self.scaler is not None else None}}

    def to_pool_input(self, x):
        # As in the reference, the pool model sees the GAN's [-1, 1] images normalised again with the
        # dataset statistics (the validation classifiers see [0, 1] images normalised the same way).
        # In float32 whatever --amp made of x: real and generated halves get the same constants.
        return normalize(x.float(), self.r.info.mean, self.r.info.std)

    def train_steps(self):
        """--epochs-match-train SGD steps on the first batches of a fresh shuffled pass over the real
        training set (disjoint batches, as the official code restarts its loader for every generator step)."""
        self.model.train()
        (self.graphed or self._train_steps)()

    def _train_steps(self):
        for images, labels in self.r.train_stream.first_batches(self.args.epochs_match_train):
            x = self.train_aug(self.to_pool_input(to_gan_range(images)))
            classifier_step(self.net, self.opt, x, labels, self.train_ctx, self.scaler)

    def match_loss(self, real, fake, labels):
        """Train the pool model, then compare it on real and generated images; gradients reach G."""
        self.train_steps()
        if self.args.match_aug:  # one draw for both halves: the same transform on pair i
            real, fake = self.match_aug(torch.cat([self.to_pool_input(real), self.to_pool_input(fake)])).chunk(2)
        else:  # as the official code: the [-1, 1] images unnormalised, though the pool model trains on normalised ones
            real, fake = real.float(), fake.float()
        if self.args.match == 'grad':  # differentiates the pool model's own gradients: needs its params
            return gradient_match_loss(eager(self.model), real, labels, fake, labels, self.args.metric,
                                       self.args.bias, self.args.fc).float()
        self.model.requires_grad_(False)  # only G needs gradients of the match term
        try:
            with self.r.ctx:
                if self.args.match == 'logit':
                    return logit_match_loss(self.net, real, fake).float()
                return feature_match_loss(self.model, real, fake, idx_from=self.args.idx_from,
                                          idx_to=self.args.idx_to, metric=self.args.metric).float()
        finally:
            self.model.requires_grad_(True)


def check_cuda_graphs(r):
    """Refuse --cuda-graphs, in one line, where a capture of the pool steps would not replay them
    faithfully (or not at all)."""
    if r.args.cuda_graphs != 'on':
        return
    problem = capture_problem(r.device, amp=r.fast.amp, compile_mode=r.fast.compile,
                              distributed=distributed.is_dist(), data_device=r.train_stream.images.device,
                              host_random_augment=pool_train_augment(r.args).draws_on_host)
    if problem:
        raise UserError(problem)


def train_iteration(r, pool, images, labels):
    """One stage-2 iteration on a real batch (uint8 images): the generator step with the pool model's
    training and match term inside it, then stage 1's discriminator step."""
    real = to_gan_range(images)
    metrics = generator_step(r.G_step, r.D_step, r.opt_g, labels, r.ctx, scaler=r.scaler_g,
                             extra_loss=lambda fake: pool.match_loss(real, fake, labels))
    metrics.update(discriminator_step(r.G_step, r.D_step, r.opt_d, real, labels, r.ctx, scaler=r.scaler_d,
                                      gp_amp=r.fast.gp_amp))
    return metrics


def train(r):
    args = r.args
    pool = Pool(r)
    print(f"stage 2: {r.info.name}, match {args.match}{' + aug' if args.match_aug else ''}, pool "
          f"{' '.join(args.pool)}, {len(r.train_stream)} iterations per epoch, {args.epochs} epochs, "
          f"device {r.device}, {r.fast.describe()}")
    while r.epoch < args.epochs or r.validate_pending:
        if not r.validate_pending:
            if r.epoch_iteration == 0 or pool.model is None:
                pool.build(distributed.broadcast_object(random.choice(args.pool)))  # rank 0's draw
                print(f"epoch {r.epoch + 1}: pool model {pool.name}")
            bar = r.runlog.progress(r.epoch_batches(), total=len(r.train_stream) - r.epoch_iteration,
                                    desc=f'epoch {r.epoch + 1}/{args.epochs} ({pool.name})')
            for images, labels in bar:
                r.after_iteration(train_iteration(r, pool, images, labels), save_extra=pool.state)
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


def main():
    args = get_parser().parse_args()
    if not args.resume and not args.weight:
        raise UserError("pool_match.py needs --weight CHECKPOINT (a gen_condense.py model_dict_<epoch>.pth)")
    if args.epochs_match_train < 0:
        raise UserError("--epochs-match-train must be 0 or more")
    unknown = [m for m in args.pool if m not in list_models()]
    if unknown:
        raise UserError(f"unknown --pool model {', '.join(unknown)}; choose from: {', '.join(list_models())}")
    GanRun(args, 'pool_match', init_weight=args.weight, check=check_cuda_graphs).execute(train)


if __name__ == '__main__':
    run(main)
