"""What the two GAN-training stages share around their loops: setup, checkpoints, exact resume,
pre-emption signals, non-finite loss detection and sample grids. The loops live in the scripts."""
import os
import signal
import sys

import torch
import torchvision

from data.datasets import BatchStream, load_dataset
from models import Discriminator, Generator
from utils import distributed
from utils.checkpoint import (LAST, check_compatible, checkpoint_dataset, gan_configs, is_official,
                              load_checkpoint, load_state, save_checkpoint)
from utils.cli import check_common
from utils.errors import Diverged, Interrupted, UserError
from utils.evaluate import validate
from utils.runlog import Meters, RunLog
from utils.runtime import (autocast, resolve_amp, rng_state, seed_everything, select_device,
                           set_rng_state, setup_backend)

# tensorboard names of the per-iteration metrics
SCALAR_TAGS = {'loss_g': 'Loss/G', 'loss_d': 'Loss/D', 'loss_match': 'Loss/match', 'gp': 'Loss/GP',
               'wasserstein': 'Loss/wasserstein', 'acc_real': 'Acc/D_real'}

# Flags a resumed run may change; everything else comes from the checkpoint so the run continues as
# it started.
RUN_CONTROL_FLAGS = ('resume', 'device', 'no_progress', 'num_workers', 'save_every', 'epochs', 'print_freq')


def adam(params, lr):
    # betas as two floats: the reference's (0, 0.9) mixed an int and a float, which current PyTorch refuses
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.9))


def resolve_data(args, ckpt=None):
    """Fill --data/--data-dir from the checkpoint (or the defaults), load the data and check the flags."""
    stored = checkpoint_dataset(ckpt) if ckpt is not None else None
    stored_dir = (ckpt.get('args') or {}).get('data_dir') if stored else None
    args.data = args.data or stored or 'cifar10'
    args.data_dir = args.data_dir or stored_dir or './data'
    info, train, test = load_dataset(args.data, args.data_dir, args.img_size)
    check_common(args, info, len(train))
    return info, train, test


class GanRun:
    """Everything a GAN-training stage holds: data, G, D, optimizers, run folders, counters."""

    def __init__(self, args, stage, init_weight=''):
        if getattr(args, 'resume', None):
            path = os.path.join(args.output_dir, args.tag, LAST) if args.resume == 'auto' else args.resume
            if not os.path.isfile(path):
                raise UserError(f"--resume: nothing to resume at {path}")
            ckpt = load_checkpoint(path)
            if is_official(ckpt) or ckpt.get('stage') != stage:
                raise UserError(f"--resume: {path} is not a {stage} checkpoint of this repository")
            keep = {k: getattr(args, k) for k in RUN_CONTROL_FLAGS if hasattr(args, k)}
            vars(args).update({**ckpt['args'], **keep})
            self.resumed_from = path
        else:
            ckpt = load_checkpoint(init_weight) if init_weight else None
            self.resumed_from = None
        self.args, self.stage = args, stage
        self.device = select_device(args.device)
        self.device = distributed.setup(args, self.device)  # torchrun: join the group, cuda:LOCAL_RANK
        setup_backend(self.device, args.deterministic)
        args.amp = resolve_amp(args.amp, self.device)
        self.ctx = autocast(args.amp, self.device)
        with distributed.local_main_first():  # under torchrun one download per node, not one per process
            self.info, self.train_split, self.test_split = resolve_data(args, ckpt)
        if ckpt is not None:
            check_compatible(ckpt, self.info, self.resumed_from or init_weight)
        self.runlog = RunLog(args) if distributed.is_main() else distributed.QuietRunLog(args)
        seed_everything(args.seed)

        g_cfg, d_cfg = (gan_configs(ckpt, self.info, args.dim_noise, args.width) if ckpt is not None else
                        (dict(num_classes=self.info.num_classes, channels=self.info.channels,
                              img_size=self.info.img_size, dim_noise=args.dim_noise, width=args.width),
                         dict(num_classes=self.info.num_classes, channels=self.info.channels,
                              img_size=self.info.img_size, width=args.width)))
        self.G = Generator(**g_cfg).to(self.device)
        self.D = Discriminator(**d_cfg).to(self.device)
        self.opt_g, self.opt_d = adam(self.G.parameters(), args.lr), adam(self.D.parameters(), args.lr)
        self.data_gen = torch.Generator().manual_seed(args.seed)
        self.train_stream = BatchStream(self.train_split, args.batch_size, self.device, self.data_gen)
        self.epoch = self.iteration = self.epoch_iteration = 0
        self.order = None  # the current epoch's data order (saved, so a resume continues it)
        self.best = {}
        self.validate_pending = False
        self.ckpt = ckpt
        if ckpt is not None:
            where = self.resumed_from or init_weight
            load_state(self.G, ckpt['generator'], where, 'generator')
            load_state(self.D, ckpt['discriminator'], where, 'discriminator')
            if self.resumed_from or stage == 'gen_condense':
                self._load_optimizers(ckpt, where)
            else:  # stage 2 starts from stage 1's optimizers but with its own learning rate
                self._load_optimizers(ckpt, where)
                for opt in (self.opt_g, self.opt_d):
                    for group in opt.param_groups:
                        group['lr'] = args.lr
        if self.resumed_from:
            self.epoch, self.iteration = ckpt['epoch'], ckpt['iteration']
            self.epoch_iteration, self.order = ckpt['epoch_iteration'], ckpt['order']
            self.best, self.validate_pending = ckpt['best'], ckpt['validate_pending']
            self.data_gen.set_state(ckpt['data_rng'])
            set_rng_state(ckpt['rng'])
            print(f"resumed from {self.resumed_from}: epoch {self.epoch}, iteration {self.iteration}")
        distributed.prepare(self)  # G_train/D_train (DDP under torchrun), sharded stream, per-rank seeds
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.stop_signal = None
        self.meters = Meters()
        # fixed noise for sample grids, drawn apart from the training RNG so grids do not perturb it
        self.grid_labels = torch.arange(self.info.num_classes).repeat(10).to(self.device)
        self.grid_noise = torch.randn(len(self.grid_labels), self.G.dim_noise,
                                      generator=torch.Generator().manual_seed(args.seed)).to(self.device)

    def _load_optimizers(self, ckpt, where):
        for key, opt in (('optim_g', self.opt_g), ('optim_d', self.opt_d)):
            if key in ckpt:
                try:
                    opt.load_state_dict(ckpt[key])
                except (ValueError, KeyError) as e:
                    raise UserError(f"{where}: its {key} does not fit ({e})") from None

    # -- loop helpers ------------------------------------------------------------------------

    def epoch_batches(self):
        """This epoch's batches, continuing mid-epoch after a resume."""
        if self.order is None or self.epoch_iteration == 0:
            self.order = self.train_stream.new_order()
        return self.train_stream.batches(self.order, start=self.epoch_iteration)

    def track(self, *losses):
        """Remember the first step whose losses are not finite, without a host sync."""
        finite = torch.stack([loss.float() for loss in losses]).isfinite().all()
        self.bad_step = torch.where((self.bad_step < 0) & ~finite,
                                    torch.full_like(self.bad_step, self.iteration), self.bad_step)

    def check_finite(self):
        step = distributed.first_bad_step(self.bad_step)  # int(self.bad_step), agreed between ranks
        if step >= 0:
            last = os.path.join(self.runlog.results_dir, LAST)
            have = last if os.path.exists(last) else 'none yet'
            raise Diverged(f"a loss became NaN or infinite at iteration {step} (epoch {self.epoch + 1}); "
                           f"stopped without saving; last good checkpoint: {have}")

    def install_signal_handlers(self):
        def handler(signum, frame):
            if self.stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def stop_requested(self):
        return self.stop_signal is not None

    def after_iteration(self, metrics, save_extra=None):
        """Count the step, watch for NaN, print and log every --print-freq steps, write the rolling
        checkpoint every --save-every steps, and stop cleanly when a signal came."""
        args = self.args
        self.iteration += 1
        self.epoch_iteration += 1
        self.track(*metrics.values())
        self.meters.add(metrics)
        if self.iteration % args.print_freq == 0:
            self.check_finite()
            means = distributed.mean_over_ranks(self.meters.pop())  # the one host sync per print
            self.runlog.scalars({SCALAR_TAGS.get(k, k): v for k, v in means.items()}, self.iteration)
            self.runlog.log(f"epoch {self.epoch + 1} iter {self.iteration}: "
                            + '  '.join(f'{k} {v:.4f}' for k, v in means.items()))
        if args.save_every and self.iteration % args.save_every == 0:
            self.save(LAST, save_extra() if save_extra else None)
        if distributed.stop_requested(self):  # self.stop_requested(), agreed between ranks
            self.save(LAST, save_extra() if save_extra else None)
            raise Interrupted

    def end_epoch(self):
        self.epoch += 1
        self.epoch_iteration = 0
        self.order = None
        self.save_samples()

    @distributed.main_rank_only  # under torchrun rank 0 validates, the others get its result
    def validate(self):
        """Validate G with every --eval-model (the validation protocol of the reference)."""
        print(f"validation after epoch {self.epoch} (iteration {self.iteration}):")
        return validate(self.G, self.info, self.test_split, self.args, self.device, self.ctx, self.runlog,
                        self.iteration, extra_iteration=True, stop=self.stop_requested)

    def execute(self, loop):
        """Run a stage's loop: SIGTERM/SIGINT save and stop (exit 128+signal), NaN stops (exit 1)."""
        self.install_signal_handlers()
        code = 0
        try:
            loop(self)
        except Interrupted:
            print(f"stopped by {signal.Signals(self.stop_signal).name} at epoch {self.epoch}, iteration "
                  f"{self.iteration}; state saved in {self.runlog.path(LAST)}; continue with --resume")
            code = 128 + self.stop_signal
        except Diverged as e:
            print(f"error: {e}", file=sys.stderr)
            code = 1
        finally:
            self.close()
        if code:
            sys.exit(code)

    # -- checkpoints -------------------------------------------------------------------------

    def state(self, extra=None):
        return {
            'generator': self.G.state_dict(), 'discriminator': self.D.state_dict(),
            'optim_g': self.opt_g.state_dict(), 'optim_d': self.opt_d.state_dict(),
            'stage': self.stage, 'dataset': self.info.to_dict(),
            'generator_config': self.G.config, 'discriminator_config': self.D.config,
            'epoch': self.epoch, 'iteration': self.iteration, 'epoch_iteration': self.epoch_iteration,
            'order': self.order, 'best': self.best, 'validate_pending': self.validate_pending,
            'args': vars(self.args), 'rng': rng_state(), 'data_rng': self.data_gen.get_state(),
            **(extra or {}),
        }

    def save(self, name, extra=None):
        self.check_finite()  # never write a diverged generator
        path = self.runlog.path(name)
        if not distributed.is_main():  # under torchrun only rank 0 writes
            return path
        save_checkpoint(self.state(extra), path)
        return path

    @torch.no_grad()
    def save_samples(self):
        """results/<tag>/outputs/img_<epoch>.png: 10 rows of draws, one column per class."""
        if not distributed.is_main():  # under torchrun only rank 0 writes
            return
        was_training = self.G.training
        self.G.eval()
        z = self.grid_noise.clone()
        z[:, :self.info.num_classes] = torch.nn.functional.one_hot(self.grid_labels, self.info.num_classes)
        with self.ctx:
            images = (self.G(z).float() + 1) / 2
        self.G.train(was_training)
        grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=self.info.num_classes, padding=2)
        os.makedirs(self.runlog.path('outputs'), exist_ok=True)
        torchvision.utils.save_image(grid, self.runlog.path('outputs', f'img_{self.epoch}.png'))
        self.runlog.writer.add_image('Samples', grid, self.iteration)

    def close(self):
        self.runlog.close()

