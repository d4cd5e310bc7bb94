"""Stage 3 of DiM: train classifiers on what the generator makes, test them on the real test set.

    python validate.py --tag test --pretrain-weight results/match/model_dict_convnet.pth
    python validate.py --tag fixed10 --pretrain-weight CKPT --protocol fixed --ipc 10 --num-eval 5
    python validate.py --tag rand10 --data cifar10 --baseline random --ipc 10 --num-eval 5

--protocol onthefly (the paper's, default): each --eval-model trains --epochs-eval epochs, each of
(classes x --ipc) freshly generated images. --protocol fixed: ipc images per class are drawn from the
generator once and the classifiers train on that fixed set only. --baseline random / full train the
same way on ipc real images per class / the whole training set. --num-eval K trains K classifiers
with seeds --seed, --seed + 1, ... and reports mean and std. Results: results/<tag>/eval.json and a
markdown table; both give the final top-1 and the best top-1 over the periodic tests (selected on the
test set, as the paper reports it). See docs/EVALUATION.md.
"""
import os

from data.datasets import resolve_data
from utils.checkpoint import check_compatible, checkpoint_data, load_checkpoint, load_generator
from utils.cli import add_match_flags, check_flags as check_stage_flags, check_positive, run, stage_parser
from data.errors import UserError
from utils.evaluate import default_test_bn, iterations_per_epoch
from utils.protocols import BASELINES, PROTOCOLS, markdown_table, run_evaluation, write_json
from utils.run import RunLog
from utils.runtime import autocast, resolve_amp, seed_everything, select_device, setup_backend

REPORT = 'eval.json'


def get_parser():
    p = stage_parser(__doc__.splitlines()[0], batch_size=128, epochs=250, lr=1e-4)
    p.add_argument('--pretrain-weight', default='', help='generator checkpoint (stage 1 or 2)')
    add_match_flags(p, acting=False)
    g = p.add_argument_group('evaluation protocol (docs/EVALUATION.md)')
    g.add_argument('--protocol', default=None, choices=PROTOCOLS,
                   help="onthefly: fresh generated images every batch (the paper's); fixed: ipc images per "
                        "class drawn once, then trained on with lr x0.1 at half the epochs "
                        "(None: onthefly, or fixed with --baseline)")
    g.add_argument('--num-eval', type=int, default=1,
                   help='classifiers trained per model, seeds --seed + 0..K-1; mean and std reported')
    g.add_argument('--baseline', default=None, choices=BASELINES,
                   help='random: ipc real training images per class; full: the whole training set '
                        '(both trained as --protocol fixed; no generator needed)')
    g.add_argument('--set-seed', type=int, default=None,
                   help="seed of the fixed-set draw or of the random subset (None: --seed); classifier k "
                        "trains on the set drawn with --set-seed + k unless --fixed-set")
    g.add_argument('--fixed-set', action='store_true',
                   help='every classifier trains on the one set of --set-seed (the spread then leaves out '
                        'which images were drawn)')
    g.add_argument('--val-per-class', type=int, default=0,
                   help='hold out N real training images per class that nothing trains on, test on them at '
                        'every periodic test, and report the test accuracy at the test they select '
                        '(0: off)')
    g.add_argument('--no-stack', action='store_true',
                   help='train the --num-eval classifiers one after another instead of stacked together')
    return p


def check_flags(args):
    """Every refusal the flags alone decide, before anything is loaded."""
    check_stage_flags(args)
    if args.baseline and args.protocol == 'onthefly':
        raise UserError(f"--baseline {args.baseline} trains on a fixed set; it cannot use --protocol onthefly")
    if not args.baseline and not args.pretrain_weight:
        raise UserError("validate.py needs --pretrain-weight CHECKPOINT (or --baseline random/full)")
    check_positive(args, 'num_eval')
    if args.val_per_class < 0:
        raise UserError(f"--val-per-class must be 0 or more, got {args.val_per_class}")


def main():
    args = get_parser().parse_args()
    check_flags(args)
    args.protocol = args.protocol or ('fixed' if args.baseline else 'onthefly')
    args.test_bn = args.test_bn or default_test_bn(args.protocol)
    # with a baseline a given checkpoint only supplies the default dataset
    ckpt = load_checkpoint(args.pretrain_weight) if args.pretrain_weight else None
    device = select_device(args.device)
    setup_backend(device, args.deterministic, getattr(args, 'cudnn_benchmark', False))
    args.amp = resolve_amp(args.amp, device)
    info, train_split, test_split = resolve_data(args, *checkpoint_data(ckpt))
    if ckpt is not None:
        check_compatible(ckpt, info, args.pretrain_weight)
    G = None if args.baseline else load_generator(ckpt, info, args.pretrain_weight, device)
    runlog = RunLog(args)
    seed_everything(args.seed)
    what = args.baseline or f'generator {args.pretrain_weight}'
    if args.protocol == 'onthefly':
        iters = iterations_per_epoch(info.num_classes, args.ipc, args.batch_size, extra_iteration=False)
        print(f"validate {what} on {info.name}, protocol onthefly: ipc {args.ipc}, one epoch = {iters} "
              f"iterations x {args.batch_size} = {iters * args.batch_size} generated images, "
              f"{args.epochs_eval} epochs, {args.num_eval} seed(s), test BN {args.test_bn}, device {device}, "
              f"amp {args.amp}")
    else:
        size = 'all' if args.baseline == 'full' else args.ipc
        print(f"validate {what} on {info.name}, protocol fixed: ipc {size}, {args.epochs_eval} epochs, "
              f"{args.num_eval} seed(s), test BN {args.test_bn}, device {device}, amp {args.amp}")
    try:
        report = run_evaluation(args, info, train_split, test_split, device, autocast(args.amp, device), G=G,
                                checkpoint=args.pretrain_weight or None, runlog=runlog)
        path = runlog.path(REPORT)
        write_json(report, path)
        print('\n' + markdown_table(report))
        print(f"\n(final: after the last epoch; best: the highest of the periodic tests, selected on the "
              f"test set; ± population std over seeds {report['seeds']})\nwrote {os.path.normpath(path)}")
    finally:
        runlog.close()


if __name__ == '__main__':
    run(main)
