"""The run around a stage's loop: what all three scripts share (RunLog: run folders, args.json, a copy of
stdout in logs.txt, tensorboard, progress bars) and what the two GAN-training stages share (GanRun: setup,
the networks and their optimizers, checkpoints, exact resume, pre-emption signals, non-finite loss
detection, the losses' running means and sample grids). The loops themselves live in the scripts."""
import json
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torchvision
from tqdm import tqdm
from torch import nn

from data.datasets import BatchStream, resolve_data
from models import Discriminator, Generator
from utils.checkpoint import (LAST, check_compatible, check_resumable, checkpoint_data, gan_configs,
                              load_checkpoint, load_gan_state, remove_stale_temps, save_checkpoint)
from utils import distributed
from utils.cli import check_output_dirs
from data.errors import Diverged, Interrupted, UserError
from utils.evaluate import DEFAULT_TEST_BN, validate
from utils.runtime import (FastPath, autocast, resolve_amp, rng_state,
                           seed_everything, select_device, set_rng_state, setup_backend)

class _Tee:
    """Writes to the real stdout and to a file. Unlike the reference's logger it never closes the real
    stdout, so nothing breaks when it goes away."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, 'a', buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunLog:
    """results/<tag>/ and logs/<tag>/ for one run: args.json, logs.txt, tensorboard events.

    quiet=True (the processes other than rank 0 under torchrun): the same paths, but no folders,
    files, tensorboard or progress bars, and stdout goes to /dev/null; rank 0 prints and logs for
    everyone, errors still reach stderr."""

    def __init__(self, args, quiet=False):
        self.quiet = quiet
        self.results_dir = os.path.join(args.output_dir, args.tag)
        self.logs_dir = os.path.join(args.logs_dir, args.tag)
        self._stdout = sys.stdout
        if quiet:
            self.show_progress, self.writer = False, None
            sys.stdout = open(os.devnull, 'w')
            return
        check_output_dirs(args)  # both folders, before either is created
        for folder in (self.results_dir, self.logs_dir):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {folder}: {e.strerror}") from None
            if not os.access(folder, os.W_OK):
                raise UserError(f"output folder {folder} is not writable")
        with open(os.path.join(self.logs_dir, 'args.json'), 'w') as f:
            json.dump(vars(args), f, indent=2, sort_keys=True, default=str)
        sys.stdout = _Tee(sys.stdout, os.path.join(self.logs_dir, 'logs.txt'))
        self.show_progress = not args.no_progress and self._stdout.isatty()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.logs_dir)
        # the full arguments beside the curves (tensorboard's Text tab), as args.json has them; indented
        # four spaces, tensorboard's markdown shows them verbatim
        self.writer.add_text('args', '\n'.join(f'    {k}: {v}' for k, v in sorted(vars(args).items())), 0)

    def scalars(self, values, step, prefix=''):
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(prefix + name, float(value), step)

    def text(self, name, text, step):
        if self.writer is not None:
            self.writer.add_text(name, text, step)

    def image(self, name, image, step):
        if self.writer is not None:
            self.writer.add_image(name, image, step)

    def progress(self, iterable=None, **kwargs):
        return tqdm(iterable, disable=not self.show_progress, dynamic_ncols=True, leave=False, **kwargs)

    def log(self, text, scalars=None, step=None):
        """print, without tearing an active progress bar; and the `scalars` to tensorboard at `step`."""
        if scalars:
            self.scalars(scalars, step)
        if self.show_progress:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text)

    def path(self, *parts):
        return os.path.join(self.results_dir, *parts)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if isinstance(sys.stdout, _Tee):
            sys.stdout.file.close()
        elif self.quiet and sys.stdout is not self._stdout:
            sys.stdout.close()  # /dev/null
        sys.stdout = self._stdout


# tensorboard names of the per-iteration metrics
SCALAR_TAGS = {'loss_g': 'Loss/G', 'loss_d': 'Loss/D', 'loss_match': 'Loss/match', 'gp': 'Loss/GP',
               'wasserstein': 'Loss/wasserstein', 'acc_real': 'Acc/D_real'}

# Flags a resumed run takes from its command line; every other flag comes from the checkpoint so the
# run continues as it started (giving one with another value than the run's is refused).
RUN_CONTROL_FLAGS = ('resume', 'device', 'amp', 'no_progress', 'num_workers', 'save_every', 'epochs',
                     'print_freq', 'data_dir', 'tag', 'output_dir', 'logs_dir',
                     'channels_last', 'compile', 'optim_impl', 'cudnn_benchmark', 'cuda_graphs')


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


def open_resume(args, stage):
    """The checkpoint --resume names (results/<tag>/last.pth by default), checked; the run's own flags
    replace the command line's, except RUN_CONTROL_FLAGS."""
    path = os.path.join(args.output_dir, args.tag, LAST) if args.resume == 'auto' else args.resume
    if not os.path.exists(path):
        raise UserError(f"--resume: nothing to resume, {path} does not exist"
                        + (f" (is --tag {args.tag} the run's tag?)" if args.resume == 'auto' else ''))
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, stage)
    stored = ckpt['args']
    given = set(getattr(args, 'given', None) or ())
    for name in sorted(given):
        if (name not in RUN_CONTROL_FLAGS and stored.get(name) is not None
                and getattr(args, name) != stored[name]):
            flag = '--' + name.replace('_', '-')
            raise UserError(f"--resume continues {path} with its own flags, but {flag} {getattr(args, name)} "
                            f"differs from its {stored[name]}; drop {flag}, or start a new run with another --tag")
    # run-control flags, and flags the run left unset (e.g. --num-classes), come from the command line
    keep = {k: getattr(args, k) for k in RUN_CONTROL_FLAGS if hasattr(args, k)}
    keep.update({k: getattr(args, k) for k in given if stored.get(k) is None})
    vars(args).update({**stored, **keep})
    return ckpt, path


class GanRun:
    """What a GAN-training stage holds around its loop: data, the networks (`nets`), counters, and
    the run folders, which `execute` opens. The script checks its flags first (check_flags); building
    a GanRun then checks the checkpoint and the data; nothing is written before `execute`, so a
    refused start writes nothing."""

    def __init__(self, args, stage, init_weight=''):
        if getattr(args, 'resume', None):
            ckpt, self.resumed_from = open_resume(args, stage)
        else:
            ckpt = load_checkpoint(init_weight) if init_weight else None
            self.resumed_from = None
        where = self.resumed_from or init_weight
        self.args, self.stage = args, stage
        args.test_bn = args.test_bn or DEFAULT_TEST_BN['onthefly']  # the stages validate on the fly
        self.device = select_device(args.device)
        self.device = distributed.setup(args, self.device)  # torchrun: join the group, cuda:LOCAL_RANK
        setup_backend(self.device, args.deterministic, getattr(args, 'cudnn_benchmark', False))
        threads_note = self._match_threads(ckpt) if self.resumed_from else ''
        args.amp = resolve_amp(args.amp, self.device)
        self.ctx = autocast(args.amp, self.device)
        self.fast = FastPath.from_args(args, self.device)
        with distributed.local_main_first():  # under torchrun one download per node, not one per process
            self.info, self.train_split, self.test_split = resolve_data(args, *checkpoint_data(ckpt))
        if ckpt is not None:
            check_compatible(ckpt, self.info, where)

        seed_everything(args.seed)
        g_cfg, d_cfg = (gan_configs(ckpt, self.info) if ckpt is not None else
                        (dict(num_classes=self.info.num_classes, channels=self.info.channels,
                              img_size=self.info.img_size, dim_noise=args.dim_noise, width=args.width),
                         dict(num_classes=self.info.num_classes, channels=self.info.channels,
                              img_size=self.info.img_size, width=args.width)))
        try:
            self.nets = build_gan(g_cfg, d_cfg, self.fast, args.lr)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: cannot rebuild its generator or discriminator ({e})") from None
        self.data_gen = torch.Generator().manual_seed(args.seed)
        # under torchrun each process takes its slice of every global batch
        self.train_stream = BatchStream(self.train_split, args.batch_size, self.device, self.data_gen,
                                        rank=distributed.rank(), world=distributed.world_size())
        self.epoch = self.iteration = self.epoch_iteration = 0
        self.order = None  # the current epoch's data order (saved, so a resume continues it)
        self.best = {}
        self.validate_pending = False
        self.ckpt = ckpt
        self.last_good = None  # (path, iteration) of the newest checkpoint this run can go back to
        if ckpt is not None:
            load_gan_state(self.nets, ckpt, where)
            if not self.resumed_from and stage != 'gen_condense':
                # stage 2 starts from stage 1's optimizers but with its own learning rate
                for opt in (self.nets.opt_g, self.nets.opt_d):
                    for group in opt.param_groups:
                        group['lr'] = args.lr
        if self.resumed_from:
            self._restore_progress(ckpt)
        distributed.prepare(self.nets, args, self.iteration)  # DDP under torchrun, per-rank seeds
        self.distributed = distributed.is_dist()
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.stop_signal = None
        self.loss_sums, self.loss_count = None, 0  # running sums of the logged losses, on the device
        # fixed noise for sample grids, drawn apart from the training RNG so grids do not perturb it
        self.grid_labels = torch.arange(self.info.num_classes).repeat(10).to(self.device)
        self.grid_noise = torch.randn(len(self.grid_labels), self.nets.G.dim_noise,
                                      generator=torch.Generator().manual_seed(args.seed)).to(self.device)
        self.threads_note = threads_note
        self.runlog = None  # opened by execute()

    def _restore_progress(self, ckpt):
        where = self.resumed_from
        try:
            self.epoch, self.iteration = int(ckpt['epoch']), int(ckpt['iteration'])
            self.epoch_iteration, self.order = int(ckpt['epoch_iteration']), ckpt['order']
            self.best, self.validate_pending = dict(ckpt['best']), bool(ckpt['validate_pending'])
            self.data_gen.set_state(ckpt['data_rng'])
            set_rng_state(ckpt['rng'])  # last: building the models above drew from the generators
            for key, scaler in (('g', self.nets.scaler_g), ('d', self.nets.scaler_d)):
                if scaler.is_enabled() and key in ckpt.get('scalers', {}):
                    scaler.load_state_dict(ckpt['scalers'][key])
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--resume: {where} holds a damaged run state ({type(e).__name__})") from None
        if self.order is not None and len(self.order) != len(self.train_split):
            raise UserError(f"--resume: {where} was made with {len(self.order)} training images, the data "
                            f"now has {len(self.train_split)}")
        self.last_good = (where, self.iteration)

    def _match_threads(self, ckpt):
        """CPU float results depend on the thread count: a --deterministic resume takes the run's."""
        saved = ckpt.get('num_threads')
        if self.args.deterministic and saved and saved != torch.get_num_threads():
            was = torch.get_num_threads()
            torch.set_num_threads(saved)
            return f" (--deterministic: {saved} CPU threads as the run had, not {was})"
        return ''

    # -- loop helpers ------------------------------------------------------------------------

    def epoch_batches(self):
        """This epoch's batches, continuing mid-epoch after a resume."""
        if self.order is None or self.epoch_iteration == 0:
            self.order = self.train_stream.new_order()
        return self.train_stream.batches(self.order, start=self.epoch_iteration)

    def _last_good_text(self):
        if self.last_good is None:
            return "none (nothing saved yet" + (f"; the run started from {self.args.weight})"
                                                 if getattr(self.args, 'weight', '') else ")")
        return f"{self.last_good[0]} (iteration {self.last_good[1]})"

    def check_finite(self, weights=False):
        """Stop (Diverged) once a loss was NaN or infinite; with `weights`, also when G or D holds a
        non-finite number (a step can break the weights before any loss shows it)."""
        # the one host sync of the check; under torchrun the earliest over the ranks
        step = distributed.first_bad_step(self.bad_step) if self.distributed else int(self.bad_step)
        if step >= 0:
            epoch = (step - 1) // max(1, len(self.train_stream)) + 1
            raise Diverged(f"a loss became NaN or infinite at iteration {step} (epoch {epoch}); stopped "
                           f"without saving; last good checkpoint: {self._last_good_text()}")
        if weights:
            params = [p for m in (self.nets.G, self.nets.D) for p in m.parameters()]
            if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
                raise Diverged(f"the generator or discriminator weights became NaN or infinite by iteration "
                               f"{self.iteration}; stopped without saving; last good checkpoint: "
                               f"{self._last_good_text()}")

    def install_signal_handlers(self):
        """SIGTERM/SIGINT only set a flag: the loop saves and stops at the next step or validation epoch.
        A second signal stops at once (KeyboardInterrupt), with what the last save holds."""
        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop_requested(self):
        return self.stop_signal is not None

    def after_iteration(self, metrics, save_extra=None):
        """Count the step; remember the first step with a non-finite loss and add the losses to their
        running sums, both on the device (no host sync); every --print-freq steps check, print and log
        their means (the one host sync); write the rolling checkpoint every --save-every steps; stop
        cleanly when a signal came."""
        args = self.args
        self.iteration += 1
        self.epoch_iteration += 1
        losses = torch.stack([v.detach().float() for v in metrics.values()])
        self.bad_step = torch.where((self.bad_step < 0) & ~losses.isfinite().all(),
                                    torch.full_like(self.bad_step, self.iteration), self.bad_step)
        self.loss_sums = losses if self.loss_count == 0 else self.loss_sums + losses
        self.loss_count += 1
        if self.iteration % args.print_freq == 0:
            self.check_finite()
            means = dict(zip(metrics, (self.loss_sums / self.loss_count).tolist()))
            self.loss_count = 0
            if self.distributed:  # the losses of the global batch
                means = distributed.mean_over_ranks(means)
            self.runlog.log(f"epoch {self.epoch + 1} iter {self.iteration}: "
                            + '  '.join(f'{k} {v:.4f}' for k, v in means.items()),
                            {SCALAR_TAGS.get(k, k): v for k, v in means.items()}, self.iteration)
        # under torchrun a signal to any rank stops all of them at the same step
        stop = distributed.stop_requested(self) if self.distributed else self.stop_signal is not None
        if stop or (args.save_every and self.iteration % args.save_every == 0):
            self.save(LAST, save_extra() if save_extra else None)
        if stop:
            raise Interrupted

    def end_epoch(self):
        self.epoch += 1
        self.epoch_iteration = 0
        self.order = None
        self.save_samples()

    @distributed.main_rank_only  # under torchrun rank 0 validates, the others get its result
    def validate(self):
        """Validate G with every --eval-model (the validation protocol of the reference). A signal
        stops it at the next classifier epoch; the loop saved last.pth just before, so a resume
        runs this validation again from its start, with the same random numbers."""
        print(f"validation after epoch {self.epoch} (iteration {self.iteration}):")
        return validate(self.nets.G, self.info, self.test_split, self.args, self.device, self.ctx, self.runlog,
                        self.iteration, extra_iteration=True, stop=self.stop_requested)

    def execute(self, loop):
        """Run a stage's loop. SIGTERM/SIGINT: save last.pth and exit 128+signal (143/130); a second
        signal exits at once with the same status. Non-finite loss: exit 1, nothing saved."""
        self.runlog = RunLog(self.args, quiet=not distributed.is_main())  # from here on files are written
        if distributed.is_main():
            remove_stale_temps(self.runlog.results_dir)  # partial writes of a killed run
        if self.resumed_from:
            print(f"resumed from {self.resumed_from}: epoch {self.epoch}, iteration {self.iteration}"
                  + self.threads_note)
        previous = self.install_signal_handlers()
        code = 0
        try:
            loop(self)
        except Interrupted:
            print(f"stopped by {signal.Signals(self.stop_signal).name} at epoch {self.epoch}, iteration "
                  f"{self.iteration}; state saved in {self.last_good[0] if self.last_good else '(nothing)'}"
                  "; continue with --resume")
            code = 128 + self.stop_signal
        except KeyboardInterrupt:  # a second signal while stopping
            print(f"stopped at once by a second signal; continue with --resume from "
                  f"{self._last_good_text()}", file=sys.stderr)
            code = 128 + (self.stop_signal or signal.SIGINT)
        except Diverged as e:
            print(f"error: {e}", file=sys.stderr)
            code = 1
        finally:
            self.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
        if code:
            sys.exit(code)

    # -- checkpoints -------------------------------------------------------------------------

    def state(self, extra=None):
        nets = self.nets
        return {
            'generator': nets.G.state_dict(), 'discriminator': nets.D.state_dict(),
            'optim_g': nets.opt_g.state_dict(), 'optim_d': nets.opt_d.state_dict(),
            'stage': self.stage, 'dataset': self.info.to_dict(),
            'generator_config': nets.G.config, 'discriminator_config': nets.D.config,
            'epoch': self.epoch, 'iteration': self.iteration, 'epoch_iteration': self.epoch_iteration,
            'order': self.order, 'best': self.best, 'validate_pending': self.validate_pending,
            'args': vars(self.args), 'rng': rng_state(), 'data_rng': self.data_gen.get_state(),
            'num_threads': torch.get_num_threads(),
            # fp16 loss scales, so a resumed fp16 run does not restart its scale search
            'scalers': {k: sc.state_dict() for k, sc in (('g', nets.scaler_g), ('d', nets.scaler_d)) if sc.is_enabled()},
            **(extra or {}),
        }

    def save(self, name, extra=None):
        """Write results/<tag>/<name> atomically; never a diverged generator."""
        self.check_finite(weights=True)
        path = self.runlog.path(name)
        if not distributed.is_main():  # under torchrun only rank 0 writes
            return path
        try:
            save_checkpoint(self.state(extra), path)
        except OSError as e:
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        if name == LAST:
            self.last_good = (path, self.iteration)
        return path

    @torch.no_grad()
    def save_samples(self):
        """results/<tag>/outputs/img_<epoch>.png, the epoch numbered from 0 as in the official file names:
        10 rows of draws, one column per class."""
        if not distributed.is_main():  # under torchrun only rank 0 writes
            return
        G = self.nets.G
        was_training = G.training
        G.eval()
        z = self.grid_noise.clone()
        z[:, :self.info.num_classes] = torch.nn.functional.one_hot(self.grid_labels, self.info.num_classes)
        with self.ctx:
            images = (G(z).float() + 1) / 2
        G.train(was_training)
        grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=self.info.num_classes, padding=2)
        os.makedirs(self.runlog.path('outputs'), exist_ok=True)
        torchvision.utils.save_image(grid, self.runlog.path('outputs', f'img_{self.epoch - 1}.png'))
        self.runlog.image('Samples', grid, self.iteration)

    def close(self):
        if self.runlog is not None:
            self.runlog.close()

