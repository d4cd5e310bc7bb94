"""Command line shared by the three stages: one parent parser, flag checks, and the error boundary.

Flag names and per-script defaults are the official ones (batch 128/64/128, epochs 150/100/250,
lr 1e-4/5e-6/1e-4); each script passes its own defaults to `stage_parser`.
"""
import argparse
import os
import sys

from data.datasets import DATASET_CHOICES
from data.errors import UserError

TEST_BN = ('batch', 'running')


class Flags(argparse.Namespace):
    """The parsed flags. `given` (a slot, so not in vars(): never saved with the run's args) names the
    flags the command line set, which --resume compares with the run it continues."""
    __slots__ = ('given',)


_UNSET = object()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class ResumableParser(OneLineParser):
    """The parser of a script that can --resume: it also records in `args.given` which flags the
    command line set, which the resumed run compares with the run it continues."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, Flags() if namespace is None else namespace)
        if isinstance(ns, Flags):
            # parse again into a namespace already holding a marker for every flag: argparse then
            # fills in no defaults, so whatever is not the marker came from the command line
            probe = argparse.Namespace(**{a.dest: _UNSET for a in self._actions if a.dest != argparse.SUPPRESS})
            super().parse_known_args(args, probe)
            ns.given = frozenset(k for k, v in vars(probe).items() if v is not _UNSET)
        return ns


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ('yes', 'true', 't', 'y', '1'):
        return True
    if v.lower() in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{v}'")


def stage_parser(description, batch_size, epochs, lr, matching=False, resumable=False):
    """The flags every stage shares, with the stage's own defaults. `matching`: the script runs the
    pool matching, so --bias and --fc act (they are official flags of all three scripts). `resumable`:
    the script takes --resume (add_resume_flags), so its parser records the flags given."""
    parser = ResumableParser if resumable else OneLineParser
    p = parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None, metavar='{' + ','.join(DATASET_CHOICES) + '}',
                   help="dataset (default: the checkpoint's dataset, else cifar10)")
    g.add_argument('--data-dir', default=None,
                   help="dataset root (default: the checkpoint's, else ./data); for imagefolder "
                        "a folder with train/<class>/ and test/<class>/")
    g.add_argument('--img-size', type=int, default=32, choices=(28, 32), help='image size for imagefolder')
    g.add_argument('--num-classes', type=int, default=None,
                   help='number of classes (default: from the data; if given it must agree)')
    g.add_argument('--num-workers', type=int, default=4, help='threads decoding image folders')

    g = p.add_argument_group('model and training')
    g.add_argument('--dim-noise', type=int, default=100, help='noise size; its first entries hold the one-hot class')
    g.add_argument('--width', type=int, default=196, help='generator and discriminator channels')
    g.add_argument('--batch-size', type=int, default=batch_size, help='training batch size')
    g.add_argument('--epochs', type=int, default=epochs, help='training epochs')
    g.add_argument('--lr', type=float, default=lr, help='Adam learning rate of generator and discriminator')
    g.add_argument('--weight', default='', help='checkpoint to start from')
    g.add_argument('--seed', type=int, default=3407, help='seed of python, numpy and torch')
    g.add_argument('--print-freq', type=int, default=50, help='iterations between printed losses')
    g.add_argument('--bias', type=str2bool, nargs='?', const=True, default=False,
                   help=NO_EFFECT if not matching else '--match grad: match 1-D gradients too (biases, norm weights)')
    g.add_argument('--fc', type=str2bool, nargs='?', const=True, default=False,
                   help=NO_EFFECT if not matching else '--match grad: match 2-D gradients too (linear weights)')

    g = p.add_argument_group('validation (train classifiers on generated images)')
    g.add_argument('--eval-model', nargs='+', default=['convnet'], help='classifier(s) to evaluate with')
    g.add_argument('--ipc', type=int, default=50, help='images per class generated per validation epoch')
    g.add_argument('--epochs-eval', type=int, default=1000, help='epochs of each validation training')
    g.add_argument('--eval-lr', type=float, default=0.01, help='SGD learning rate of validation classifiers')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum of validation classifiers (and pool models)')
    g.add_argument('--weight-decay', type=float, default=5e-4,
                   help='SGD weight decay of validation classifiers (and pool models)')
    g.add_argument('--test-interval', type=int, default=200, help='validation epochs between tests')
    g.add_argument('--eval-interval', type=int, default=10, help='training epochs between validations')
    g.add_argument('--aug-type', default='color_crop_cutout', help='DSA strategy, ops joined by _')
    g.add_argument('--mixup-net', default='cut', choices=('cut', 'none'), help="'cut': CutMix in validation")
    g.add_argument('--mix-p', type=float, default=-1.0, help='CutMix probability (<= 0: never)')
    g.add_argument('--beta', type=float, default=1.0, help='CutMix Beta(beta, beta)')
    g.add_argument('--test-bn', default=None, choices=TEST_BN,
                   help="how BatchNorm classifiers are tested: batch = in train mode, statistics of each test "
                        "batch of --batch-size (the official code's, transductive); running = in eval mode "
                        "(the field's). None: batch for the on-the-fly protocol, running for --protocol fixed "
                        "and the baselines")

    g = p.add_argument_group('run')
    g.add_argument('--tag', default='test', help='run name: results/<tag>/ and logs/<tag>/')
    g.add_argument('--output-dir', default='./results/', help='checkpoints and sample grids go to <output-dir>/<tag>/')
    g.add_argument('--logs-dir', default='./logs/', help='logs.txt, args.json and tensorboard events go to <logs-dir>/<tag>/')
    g.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'),
                   help='auto: CUDA when torch sees a GPU (CUDA_VISIBLE_DEVICES decides which), else CPU')
    g.add_argument('--deterministic', action='store_true',
                   help='bit-reproducible runs and resumes: refuses --cudnn-benchmark, and a resume takes the '
                        "run's CPU thread count")
    add_fastpath_flags(g)
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


# What each official flag that does nothing in a script says in its --help.
NO_EFFECT = 'accepted for official command lines; no effect in this script, as in the official code'


def add_match_flags(p, acting):
    """The official matching flags. `acting`: this script matches (pool_match.py). Elsewhere, and for
    --match-coeff, --match-model, --fix-disc and --epochs-match everywhere, they are accepted and do
    nothing, as in the official scripts (docs: README, "Differences from the official code")."""
    g = p.add_argument_group('matching' if acting else 'official matching flags (no effect here)')
    g.add_argument('--match-aug', action='store_true',
                   help='siamese augmentation of real and generated batches before matching' if acting else NO_EFFECT)
    g.add_argument('--metric', default='l1', choices=('l1', 'mse', 'l1_mean', 'cos'),
                   help='distance of --match grad and --match feat' if acting else NO_EFFECT)
    g.add_argument('--epochs-match-train', type=int, default=16,
                   help='SGD steps of the pool model on real batches per generator step' if acting else NO_EFFECT)
    g.add_argument('--match-coeff', type=float, default=0.001, help=NO_EFFECT)
    g.add_argument('--match-model', default='convnet', help=NO_EFFECT)
    g.add_argument('--fix-disc', action='store_true', help=NO_EFFECT)
    g.add_argument('--epochs-match', type=int, default=100, help=NO_EFFECT)
    return g


def add_fastpath_flags(g):
    """How the work runs (utils/runtime.FastPath); the stages' and misc/benchmark.py's. Every switch is
    off by default on every device: the default is the official code's fp32 path. docs/PERFORMANCE.md
    gives each switch's measured speed and how far it moves the numbers."""
    from utils.runtime import AMP_CHOICES, COMPILE_MODES, OPTIM_IMPLS, SWITCH
    g.add_argument('--amp', default='off', choices=AMP_CHOICES,
                   help='mixed precision of the forward passes. off: fp32, as the official code. bf16 / fp16 '
                        'change the numbers (bf16 moved stage-1 losses by 17-25%% on an H200 after the same steps)')
    g.add_argument('--channels-last', default='off', choices=SWITCH,
                   help='conv weights and activations in NHWC (same arithmetic, other kernels)')
    g.add_argument('--compile', nargs='?', const='default', default='off', choices=COMPILE_MODES,
                   help='torch.compile G, D and the classifiers (bare --compile: default mode; fused kernels '
                        'round differently)')
    g.add_argument('--optim-impl', default='default', choices=OPTIM_IMPLS,
                   help="optimizer kernels. default: torch's own choice, as the official code (foreach on CUDA, "
                        "a per-parameter loop on the CPU); fused / foreach / for-loop compute the same update")
    g.add_argument('--cudnn-benchmark', action='store_true',
                   help="let cuDNN time and pick its fastest algorithms (default: the official code's "
                        "deterministic cuDNN; same fp32 arithmetic, other summation orders, not reproducible)")
    g.add_argument('--gp-amp', action='store_true',
                   help='run the gradient penalty under --amp too (default: fp32, the reference\'s '
                        'precision; bf16 moves the penalty by a few percent)')


def add_cuda_graphs_flag(g):
    """pool_match.py's (and misc/benchmark.py's) --cuda-graphs."""
    g.add_argument('--cuda-graphs', default='off', choices=('off', 'on'),
                   help="replay the --epochs-match-train pool steps from one CUDA graph (one launch instead "
                        "of thousands; same computation). Off by default: not yet measured on a GPU")


def add_resume_flags(p, save_every):
    g = p.add_argument_group('resume')
    g.add_argument('--resume', nargs='?', const='auto', default=None, metavar='PATH',
                   help="continue a run: its results/<tag>/last.pth, or PATH")
    g.add_argument('--save-every', type=int, default=save_every,
                   help='iterations between rolling last.pth checkpoints (0: only at epoch ends)')


def check_positive(args, *names):
    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def check_flags(args):
    """The refusals every script shares that the flags alone decide: made first, before anything is
    loaded, built or written. (Whether the flags fit the data -- --num-classes, --dim-noise,
    --batch-size against the training set -- is checked as the data loads: data.datasets.resolve_data.)"""
    from models import list_models
    from utils.augment import DiffAug

    check_positive(args, 'batch_size', 'epochs', 'ipc', 'epochs_eval', 'test_interval', 'eval_interval',
                   'print_freq', 'width')
    for name in ('momentum', 'weight_decay'):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    for name in ('eval_lr', 'pool_lr'):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    unknown = [m for m in args.eval_model if m not in list_models()]
    if unknown:
        raise UserError(f"unknown --eval-model {', '.join(unknown)}; choose from: {', '.join(list_models())}")
    try:
        DiffAug(args.aug_type)
    except ValueError as e:
        raise UserError(f"--aug-type: {e}") from None
    check_output_dirs(args)


def check_output_dirs(args):
    """Refuse, before anything is written, a --output-dir or --logs-dir where results/<tag> or
    logs/<tag> cannot be created (and validate.py's --save-classifier where its folder cannot): a file
    in the way, or a folder this user cannot write."""
    wanted = [(flag, root, os.path.join(root, args.tag))
              for flag, root in (('--output-dir', args.output_dir), ('--logs-dir', args.logs_dir))]
    if getattr(args, 'save_classifier', None):
        path = os.path.abspath(args.save_classifier)
        wanted.append(('--save-classifier', args.save_classifier, os.path.dirname(path)))
    for flag, root, folder in wanted:
        folder = os.path.abspath(folder)
        probe = folder
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)  # the deepest part that exists decides
        if not os.path.isdir(probe):
            raise UserError(f"{flag} {root}: cannot create {folder}, {probe} is a file")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {root}: cannot create {folder}, {probe} is not writable")


def run(main):
    """Entry point of every script: user mistakes become one line on stderr and exit status 2; a
    Ctrl-C outside a training loop (which saves and stops on its own) ends with one line, status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
