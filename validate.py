"""Stage 3 of DiM: train classifiers on what the generator makes, test them on the real test set.

    python validate.py --tag test --pretrain-weight results/match/model_dict_convnet.pth
    python validate.py --tag fixed10 --pretrain-weight CKPT --protocol fixed --ipc 10 --num-eval 5
    python validate.py --tag rand10 --data cifar10 --baseline random --ipc 10 --num-eval 5

--protocol onthefly (the paper's, default): each --eval-model trains --epochs-eval epochs, each of
(classes x --ipc) freshly generated images. --protocol fixed: ipc images per class are drawn from the
generator once and the classifiers train on that fixed set only. --baseline random / full train the
same way on ipc real images per class / the whole training set. --num-eval K trains K classifiers
with seeds --seed, --seed + 1, ... (one after another; --stack trains a fixed-set architecture's K
together) and reports mean and std. Results: results/<tag>/eval.json and a markdown table; both give
the final top-1 and the best top-1 over the periodic tests (selected on the test set, as the paper
reports it). --select kmeans keeps, per class, the images nearest the k-means centroids of many
candidates in a classifier's features instead of a random draw. --soft-labels TEACHER trains on a
teacher's labels of every augmented batch instead of the hard labels (a teacher: --baseline full
--save-classifier PATH). See docs/EVALUATION.md.

The run, top-down: main() sets up; run_evaluation() holds the protocol: (1) hold out real images
(--val-per-class), (2) draw the fixed training sets, (3) for every architecture and seed train a
classifier (utils/evaluate.py: train_on_generator, train_on_set) and test it periodically, (4)
summarise over the seeds into the report that main() writes and prints.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import Split, normalize, resolve_data
from data.errors import UserError
from utils.checkpoint import (check_compatible, checkpoint_data, load_checkpoint, load_generator, load_teacher,
                              save_teacher)
from utils.cli import add_match_flags, check_flags as check_stage_flags, check_positive, run, stage_parser
from utils.evaluate import (DEFAULT_TEMPERATURE, DEFAULT_TEST_BN, iterations_per_epoch, test_batch_size,
                            train_on_generator, train_on_set)
from utils.run import RunLog
from utils.runtime import autocast, hardware, resolve_amp, seed_everything, select_device, setup_backend
from utils.selection import DEFAULT_CANDIDATES, SELECTIONS, embed, kmeans_per_class
from utils.stacking import train_stacked

PROTOCOLS = ('onthefly', 'fixed')
BASELINES = ('random', 'full')
REPORT = 'eval.json'
REPORT_FORMAT = 'dim-eval/1'
SOFT_CELL = 'soft, T {temperature:g}'  # how a soft-label report's labels read in tables (misc/compare.py too)
DRAW_CHUNK = 1000  # images per generator forward pass when drawing a fixed set
ON_DEVICE_MAX_BYTES = 4 * 2**30  # training sets up to this size live on the training device
HOLDOUT_SEED = 0  # the same held-out images for every run with the same --val-per-class


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
    g.add_argument('--stack', action='store_true',
                   help='--protocol fixed and the baselines: train the --num-eval classifiers of an architecture '
                        'together, stacked with torch.func (faster; equal to one after another up to float '
                        'rounding, utils/stacking.py)')
    g.add_argument('--no-stack', action='store_true',
                   help='one classifier after another: the default; accepted for older command lines')
    g = p.add_argument_group('which images a fixed set keeps (docs/EVALUATION.md, "Selection")')
    g.add_argument('--select', default='random', choices=SELECTIONS,
                   help='--protocol fixed and --baseline random: random: ipc images per class drawn at random; '
                        'kmeans: per class, k-means (k = ipc, seeded by the set seed) of the candidates in the '
                        'penultimate features of --select-features, keeping the candidate nearest each centroid')
    g.add_argument('--select-features', default=None, metavar='PATH',
                   help='--select kmeans: the classifier whose penultimate features (eval mode) the candidates '
                        'are clustered in: a --save-classifier file of this dataset')
    g.add_argument('--candidates', type=int, default=None, metavar='M',
                   help=f'--select kmeans of a generator: M x ipc draws per class to choose the ipc from (None: '
                        f'{DEFAULT_CANDIDATES}: at ipc 1 ten draws to choose among, and a draw plus the clustering '
                        'stay seconds on a CPU); real candidates are every training image of the class but the '
                        'held-out ones')
    g = p.add_argument_group('soft labels from a teacher (docs/EVALUATION.md, "Soft labels")')
    g.add_argument('--save-classifier', default=None, metavar='PATH',
                   help='--baseline full: keep the first --eval-model\'s classifier of seed --seed (its final '
                        'weights) at PATH as a teacher for --soft-labels; the file records its architecture, '
                        'dataset, normalisation and test accuracy')
    g.add_argument('--soft-labels', default=None, metavar='TEACHER',
                   help='label every training batch, after augmentation, by TEACHER (a --save-classifier file, '
                        'in eval mode) and train on KL(softmax(teacher/T) || softmax(student/T)) x T^2 instead of '
                        'cross-entropy on the hard labels; --protocol fixed, onthefly and --baseline random')
    g.add_argument('--temperature', type=float, default=None, metavar='T',
                   help=f'temperature T of --soft-labels (None: {DEFAULT_TEMPERATURE:g}, what DD-Ranking\'s CIFAR-10 '
                        'configurations give its teacher-relabelling soft-label mode for ConvNet-3 students, '
                        'D4M/ and RDED/CIFAR10/IPC{1,10,50}.yaml of NUS-HPC-AI-Lab/DD-Ranking)')
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
    if args.stack and args.no_stack:
        raise UserError("--stack and --no-stack contradict each other: give one")
    if args.soft_labels and args.baseline == 'full':
        raise UserError("--soft-labels trains on a teacher's labels; --baseline full is where a teacher comes from "
                        "(--save-classifier), not a row to relabel")
    if args.temperature is not None and not args.soft_labels:
        raise UserError("--temperature is the temperature of --soft-labels: give --soft-labels TEACHER too")
    if args.temperature is not None and not args.temperature > 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.save_classifier and args.baseline != 'full':
        raise UserError("--save-classifier keeps the classifier of --baseline full (trained on the real training "
                        "set) as a teacher: add --baseline full")
    if args.save_classifier and args.test_bn == 'batch':
        raise UserError("--save-classifier: a teacher labels in eval mode, so its test accuracy is measured in eval "
                        "mode too: drop --test-bn batch")
    if args.select == 'kmeans':
        protocol = args.protocol or ('fixed' if args.baseline else 'onthefly')
        if protocol == 'onthefly' or args.baseline == 'full':
            what = '--protocol onthefly draws fresh images every batch' if protocol == 'onthefly' else \
                '--baseline full trains on every image'
            raise UserError(f"--select kmeans chooses the images of a fixed set, but {what}: use --protocol fixed "
                            "or --baseline random")
        if not args.select_features:
            raise UserError("--select kmeans clusters the candidates in a classifier's features: give "
                            "--select-features PATH (a --baseline full --save-classifier file)")
        if args.candidates is not None and args.baseline:
            raise UserError("--candidates is the number of generator draws per stored image; --baseline random "
                            "chooses among every real training image of the class")
        if args.candidates is not None:
            check_positive(args, 'candidates')
    elif args.select_features or args.candidates is not None:
        raise UserError(f"--{'select-features' if args.select_features else 'candidates'} belongs to --select "
                        "kmeans: add --select kmeans, or drop it")
    if args.save_classifier and os.path.isdir(args.save_classifier):
        raise UserError(f"--save-classifier {args.save_classifier} is a folder: give a file name in it, "
                        "e.g. teacher.pth")


def main():
    args = get_parser().parse_args()
    check_flags(args)
    args.protocol = args.protocol or ('fixed' if args.baseline else 'onthefly')
    args.test_bn = args.test_bn or DEFAULT_TEST_BN[args.protocol]
    # with a baseline a given checkpoint only supplies the default dataset
    ckpt = load_checkpoint(args.pretrain_weight) if args.pretrain_weight else None
    device = select_device(args.device)
    setup_backend(device, args.deterministic, getattr(args, 'cudnn_benchmark', False))
    args.amp = resolve_amp(args.amp, device)
    info, train_split, test_split = resolve_data(args, *checkpoint_data(ckpt))
    if ckpt is not None:
        check_compatible(ckpt, info, args.pretrain_weight)
    G = None if args.baseline else load_generator(ckpt, info, args.pretrain_weight, device)
    # --soft-labels: the teacher, checked against the data before anything is written
    teacher = load_teacher(args.soft_labels, info, device) if args.soft_labels else None
    if teacher is not None:
        args.temperature = args.temperature or DEFAULT_TEMPERATURE
    # --select kmeans: the classifier whose features the candidates are clustered in, checked likewise
    features = (load_teacher(args.select_features, info, device, flag='--select-features')
                if args.select == 'kmeans' else None)
    if features is not None and not args.baseline:
        args.candidates = args.candidates or DEFAULT_CANDIDATES
    runlog = RunLog(args)
    seed_everything(args.seed)
    what = args.baseline or f'generator {args.pretrain_weight}'
    if teacher is not None:
        what += (f" with soft labels of the teacher {args.soft_labels} ({teacher[1]['architecture']}, test top-1 "
                 f"{teacher[1]['test_top1']:.2f}%) at T {args.temperature:g}")
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
                                checkpoint=args.pretrain_weight or None, runlog=runlog, teacher=teacher,
                                features=features)
        path = os.path.join(runlog.results_dir, REPORT)
        write_json(report, path)
        print('\n' + markdown_table(report))
        print(f"\n(final: after the last epoch; best: the highest of the periodic tests, selected on the "
              f"test set; ± population std over seeds {report['seeds']})\nwrote {os.path.normpath(path)}")
    finally:
        runlog.close()


def run_evaluation(args, info, train_split, test_split, device, ctx, G=None, checkpoint=None, runlog=None,
                   teacher=None, features=None):
    """Evaluate every --eval-model under --protocol / --baseline with --num-eval seeds; with `teacher`
    ((model, description) of utils.checkpoint.load_teacher: --soft-labels) on the teacher's labels at
    --temperature; with `features` (the same kind of pair: --select kmeans) on sets chosen by k-means in
    its features.

    Returns the report dict written to results/<tag>/eval.json (docs/EVALUATION.md lists its fields).
    """
    method = args.baseline or 'dim'
    protocol = args.protocol
    teacher_model = teacher[0] if teacher is not None else None
    save_to = getattr(args, 'save_classifier', None)  # --baseline full: keep a classifier as a teacher
    if method == 'dim' and G is None:
        raise ValueError("evaluating the generator needs G")
    if method != 'dim' and protocol != 'fixed':
        raise ValueError("baselines are trained with the fixed protocol")
    seeds = [args.seed + k for k in range(args.num_eval)]
    set_seed = args.seed if getattr(args, 'set_seed', None) is None else args.set_seed
    # seed k trains on the set drawn with set_seed + k, so the spread covers the draw of the set;
    # --fixed-set: every seed on the one set of set_seed (the spread of the classifier training alone)
    fixed_set = getattr(args, 'fixed_set', False) or method == 'full'
    set_seeds = [set_seed] * len(seeds) if fixed_set else [set_seed + k for k in range(len(seeds))]
    start = time.time()

    # (1) real training images that nothing trains on, to select an epoch without the test set
    val_split = None
    if getattr(args, 'val_per_class', 0):
        val_split, train_split = hold_out(train_split, info.num_classes, args.val_per_class)
        print(f"held out {len(val_split)} real training images ({args.val_per_class} per class) to select the "
              f"epoch; the baselines draw from the other {len(train_split)}")

    # (2) the fixed protocol's training sets, each drawn (or chosen, --select) once: (images, labels) per seed
    train_sets = training_sets(args, method, G, info, train_split, set_seeds, device, features) \
        if protocol == 'fixed' else None

    # (3) every architecture, every seed: a fresh classifier from seed_everything(seed), trained and
    # tested periodically; --stack trains a fixed-set architecture's seeds together instead
    rows = []
    for name in args.eval_model:
        t0 = time.time()
        results = None
        if protocol == 'fixed' and args.stack and len(seeds) > 1:
            results = train_stacked(name, train_sets, info, test_split, args, device, ctx, seeds, runlog, val_split,
                                    teacher_model)
        stacked = results is not None
        if not stacked:
            results = []
            for k, seed in enumerate(seeds):
                seed_everything(seed)
                board = f'{name}/seed{seed}'  # the tag prefix of this classifier's tensorboard curves
                if protocol == 'onthefly':
                    r = train_on_generator(G, name, info, test_split, args, device, ctx, extra_iteration=False,
                                           runlog=runlog, val_split=val_split, teacher=teacher_model, board=board)
                    r.pop('seconds')
                else:
                    model, r = train_on_set(name, *train_sets[k], info, test_split, args, device, ctx, runlog,
                                            val_split, teacher_model, board)
                    if save_to and k == 0:
                        r['state_dict'] = model.state_dict()
                results.append({'seed': seed, **r})
        if save_to and name == args.eval_model[0]:
            # the final weights of seed --seed, with the accuracy they score (tested in eval mode, as they label)
            save_teacher(save_to, name, results[0]['state_dict'], info, test_top1=results[0]['top1'],
                         test_top5=results[0]['top5'], seed=seeds[0], train_images=len(train_sets[0][1]),
                         val_per_class=getattr(args, 'val_per_class', 0),
                         recipe={'epochs_eval': args.epochs_eval, 'eval_lr': args.eval_lr,
                                 'batch_size': args.batch_size, 'aug_type': args.aug_type, 'stacked': stacked})
            print(f"  [{name}] kept the classifier of seed {seeds[0]} (test top-1 {results[0]['top1']:.2f}) as a "
                  f"teacher: {save_to}")

        # (4) the architecture's row: every accuracy per seed, with mean and std over the seeds
        row = summarise(name, results, time.time() - t0, stacked)
        rows.append(row)
        print(f"  [{name}] top-1 final {row['top1_mean']:.2f} ± {row['top1_std']:.2f}, "
              + (f"at the test selected on held-out images {row['selected_top1_mean']:.2f} ± "
                 f"{row['selected_top1_std']:.2f}, " if val_split is not None else "")
              + f"best (selected on test) {row['best_top1_mean']:.2f} ± {row['best_top1_std']:.2f} over "
              f"{len(seeds)} seed(s), "
              f"{row['wall_seconds']:.0f}s{' (stacked)' if stacked else ''}")
        if runlog is not None:
            runlog.scalars({f'Eval/{method}/{protocol}/{name}/top1': row['top1_mean'],
                            f'Eval/{method}/{protocol}/{name}/best_top1': row['best_top1_mean']}, 0)

    fixed = protocol == 'fixed' and method != 'full'
    return make_report(args, info, method, rows, G=G, checkpoint=checkpoint, teacher=teacher, features=features,
                       train_sets=train_sets, val_split=val_split, test_split=test_split, seeds=seeds,
                       sets=dict(set_seed=set_seed if fixed else None, set_seeds=set_seeds if fixed else None,
                                 fixed_set=fixed_set if fixed else None),
                       device=device, seconds=time.time() - start)


def make_report(args, info, method, rows, G, checkpoint, teacher, features, train_sets, val_split, test_split,
                seeds, sets, device, seconds):
    """The report of run_evaluation (results/<tag>/eval.json): what was trained on what, how it was
    labelled and chosen, the recipe, every accuracy (`rows`, one per architecture), the environment."""
    protocol, save_to = args.protocol, getattr(args, 'save_classifier', None)
    params = sum(p.numel() for p in G.parameters()) if method == 'dim' else None
    sha256 = None
    if checkpoint and method == 'dim':
        with open(checkpoint, 'rb') as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()
    ipc = None if method == 'full' else args.ipc
    kmeans = features is not None
    return {
        'format': REPORT_FORMAT,
        'protocol': protocol,
        'method': method,
        # hard: cross-entropy on the set's labels; soft: every augmented batch labelled by the teacher
        'labels': 'hard' if teacher is None else 'soft',
        'temperature': None if teacher is None else args.temperature,
        'teacher': None if teacher is None else teacher[1],
        'saved_classifier': os.path.abspath(save_to) if save_to else None,
        # which images a fixed set keeps: random, or kmeans in the features of a classifier file
        'select': ('kmeans' if kmeans else 'random') if protocol == 'fixed' and method != 'full' else None,
        'select_features': features[1] if kmeans else None,
        # DiM: draws per stored image; real images: None (every training image of the class but held-out ones)
        'candidates': (getattr(args, 'candidates', None) or DEFAULT_CANDIDATES) if kmeans and method == 'dim' else None,
        'dataset': info.name,
        'num_classes': info.num_classes,
        'ipc': ipc,
        'test_bn': args.test_bn,
        'train_images': len(train_sets[0][1]) if train_sets is not None else None,
        'val_per_class': getattr(args, 'val_per_class', 0),
        'val_images': len(val_split) if val_split is not None else 0,
        # what the method stores: the generator (fp32, bf16) against ipc x classes uint8 real images
        'storage': {'generator_parameters': params, 'generator_bytes_fp32': params and 4 * params,
                    'generator_bytes_bf16': params and 2 * params,
                    'ipc_images_bytes_uint8': None if ipc is None else
                    ipc * info.num_classes * info.channels * info.img_size ** 2},
        'architectures': list(args.eval_model),
        'num_eval': args.num_eval,
        'seeds': seeds,
        **sets,
        'generator_checkpoint': os.path.abspath(checkpoint) if checkpoint and method == 'dim' else None,
        'generator_sha256': sha256,
        'recipe': {
            'epochs_eval': args.epochs_eval, 'eval_lr': args.eval_lr, 'batch_size': args.batch_size,
            'momentum': args.momentum, 'weight_decay': args.weight_decay,
            'lr_schedule': 'x0.1 after the first half of the epochs' if protocol == 'fixed' else 'constant',
            'loss': 'cross-entropy (CutMix: lam-weighted over both labels)' if teacher is None else
                    'KL(softmax(teacher/T) || softmax(student/T)) x T^2, summed over classes, averaged over the batch',
            'aug_type': args.aug_type, 'mixup_net': args.mixup_net, 'mix_p': args.mix_p, 'beta': args.beta,
            'test_interval': args.test_interval,
            'test_bn': args.test_bn, 'test_batch_size': test_batch_size(args),
        },
        'test_order_seed': test_split.order_seed,
        'accuracy_keys': ACCURACY_KEYS,
        'rows': rows,
        'device': str(device),
        'hardware': hardware(device),
        'amp': getattr(args, 'amp', 'off'),
        'torch': torch.__version__,
        'wall_seconds': round(seconds, 3),
    }


ACCURACY_KEYS = {  # what each accuracy of a report's rows is (eval.json repeats it for its readers)
    'top1': 'top-1 (%) on the real test set after the last epoch',
    'test_bn': 'batch: tested in train mode, BatchNorm on each test batch (official, transductive); '
               'running: eval mode',
    'best_top1': 'best top-1 (%) over the periodic tests: selected on the test set',
    'selected_top1': 'top-1 (%) at the periodic test whose accuracy on the held-out real training '
                     'images (--val-per-class) was highest (earliest on ties)',
    'top5': 'top-5 (%) after the last epoch',
    'best_top5': 'best top-5 (%) over the periodic tests: selected on the test set',
    'std': 'population standard deviation over the seeds (ddof=0)',
}


def training_sets(args, method, G, info, train_split, set_seeds, device, features=None):
    """The fixed protocol's training set of each seed, (images, labels), drawn once per set seed:
    generated images float32 and normalised, real ones uint8 (normalised per batch). With `features`
    (--select kmeans) each set is chosen by k-means among candidates: for DiM --candidates x ipc draws
    per class with the set seed, for real images every training image of the class (held-out ones
    excluded); the seed of the set seeds the clustering."""
    built, real_features = {}, None
    for s in set_seeds:
        if s in built:
            continue
        if method == 'dim':
            per_image = (getattr(args, 'candidates', None) or DEFAULT_CANDIDATES) if features is not None else 1
            draws = args.ipc * per_image
            images, labels = draw_fixed_set(G, info, draws, s, device)
            if features is not None:
                idx = kmeans_per_class(embed(features[0], images, info, device), labels.cpu(), info.num_classes,
                                       args.ipc, s)
                images, labels = images[idx.to(images.device)], labels[idx.to(labels.device)]
        elif method == 'random':
            if features is None:
                idx = random_subset_indices(train_split.labels, info.num_classes, args.ipc, s)
            else:  # the candidates are the same for every seed: embedded once
                if real_features is None:
                    real_features = embed(features[0], train_split.images, info, device)
                idx = kmeans_per_class(real_features, train_split.labels.cpu(), info.num_classes, args.ipc, s)
            images, labels = train_split.images[idx], train_split.labels[idx]
        else:  # full
            images, labels = train_split.images, train_split.labels
        where = device if images.numel() * images.element_size() <= ON_DEVICE_MAX_BYTES else torch.device('cpu')
        built[s] = (images.to(where), labels.to(where))
    n = len(built[set_seeds[0]][1])
    print(f"fixed training set ({method}{', k-means' if features is not None else ''}): {n} images"
          + (f" per seed, drawn with set seeds {set_seeds}" if len(built) > 1 else "")
          + f", {math.ceil(n / args.batch_size)} minibatches of up to {args.batch_size} per epoch")
    return [built[s] for s in set_seeds]


# ----------------------------------------------------------------------------------------------
# the training sets: a fixed draw from G, a random real subset, the held-out images

@torch.no_grad()
def draw_fixed_set(G, info, ipc, seed, device, chunk=DRAW_CHUNK):
    """ipc images per class from G, class-major (all of class 0, then class 1, ...).

    G runs in eval mode (BatchNorm running statistics, so every image is independent of the others
    in its pass) and in float32. The noise comes from a CPU generator seeded with `seed`: N(0, I) with
    the one-hot class in its first entries (as `models.conditional_noise`), so the same seed gives the
    same noise on any device and the global RNG is not touched. G is called once per `chunk` images.
    Returns (images, labels) on `device`: images float32 in [0, 1] normalised with the dataset
    statistics, labels int64. (misc/export.py writes the same sets to disk.)
    """
    if ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {ipc}")
    labels = torch.arange(info.num_classes).repeat_interleave(ipc)
    z = torch.randn(len(labels), G.dim_noise, generator=torch.Generator().manual_seed(seed))
    z[:, :info.num_classes] = F.one_hot(labels, info.num_classes).float()
    was_training = G.training
    G.eval()
    try:
        parts = [G(part.to(device)).float() for part in z.split(chunk)]
    finally:
        G.train(was_training)
    images = (torch.cat(parts) + 1) / 2
    return normalize(images, info.mean, info.std).contiguous(), labels.to(device)


def random_subset_indices(labels, num_classes, ipc, seed, what='--baseline random', flag='--ipc'):
    """Indices of ipc images per class, class-major, chosen with a CPU generator seeded `seed`.
    `what` and `flag` name the request in the error a too-small class gives."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < ipc:
            raise UserError(f"{what}: class {c} has only {len(members)} training images, "
                            f"fewer than {flag} {ipc}")
        chosen.append(members[torch.randperm(len(members), generator=gen)[:ipc]])
    return torch.cat(chosen)


def hold_out(split, num_classes, per_class):
    """(held-out Split of `per_class` images per class, Split of the rest), drawn with HOLDOUT_SEED:
    real training images that nothing in the evaluation trains on, to select an epoch without the
    test set (--val-per-class)."""
    idx = random_subset_indices(split.labels, num_classes, per_class, HOLDOUT_SEED, 'held-out images',
                                '--val-per-class')
    rest = torch.ones(len(split), dtype=torch.bool)
    rest[idx] = False
    return Split(split.images[idx], split.labels[idx]), Split(split.images[rest], split.labels[rest])


# ----------------------------------------------------------------------------------------------
# the report: eval.json and its markdown table (misc/compare.py prints several reports with it)

def summarise(architecture, results, seconds, stacked):
    """One architecture's row: each accuracy per seed, with its mean and population std (numpy's
    default ddof=0, as the DC/DSA/MTT evaluation code reports it; 0 for one seed)."""
    row = {'architecture': architecture, 'seeds': [r['seed'] for r in results], 'stacked': stacked,
           'wall_seconds': round(seconds, 3)}
    selected = 'selected_top1' in results[0]  # --val-per-class
    for key in ('top1', 'best_top1', 'top5', 'best_top5') + (('selected_top1', 'val_top1') if selected else ()):
        values = [r[key] for r in results]
        a = np.asarray(values, dtype=np.float64)
        row[key], row[f'{key}_mean'], row[f'{key}_std'] = values, float(a.mean()), float(a.std())
    if selected:
        row['selected_epoch'] = [r['selected_epoch'] for r in results]
    row['test_curves'] = [r['test_curve'] for r in results if 'test_curve' in r]
    return row


def markdown_table(report, labels=None):
    """The report as a markdown table, one row per architecture. A labels column (hard, or soft and the
    temperature) when the report is a soft-label one, or when `labels` asks for it (misc/compare.py puts
    hard and soft reports under one header)."""
    K = report['num_eval']
    ipc = report['ipc'] if report['ipc'] is not None else 'all'
    selected = report.get('val_per_class')
    soft = report.get('labels', 'hard') == 'soft'  # reports from before soft labels are hard
    labels = soft if labels is None else labels
    how = SOFT_CELL.format(**report) if soft else 'hard'
    chosen = ' (k-means)' if report.get('select') == 'kmeans' else ''  # --select kmeans; reports before it: random
    lines = ["| method | " + ("labels | " if labels else "") + "protocol | test BN | dataset | ipc | model | runs "
             "| top-1 final (mean ± std) "
             + ("| top-1 at the test selected on held-out train images (mean ± std) " if selected else "")
             + "| top-1 best, selected on test (mean ± std) | top-5 final (mean ± std) |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (bool(labels) + bool(selected)) + "---|---|"]
    for r in report['rows']:
        lines.append(f"| {report['method']}{chosen} | " + (f"{how} | " if labels else "") + f"{report['protocol']} "
                     f"| {report['test_bn']} | {report['dataset']} "
                     f"| {ipc} | {r['architecture']} | {K} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} "
                     + (f"| {r['selected_top1_mean']:.2f} ± {r['selected_top1_std']:.2f} " if selected else "")
                     + f"| {r['best_top1_mean']:.2f} ± {r['best_top1_std']:.2f} "
                     f"| {r['top5_mean']:.2f} ± {r['top5_std']:.2f} |")
    return '\n'.join(lines)


def write_json(obj, path):
    """Write atomically: a temporary file then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)


if __name__ == '__main__':
    run(main)
