"""Evaluation protocols shared by validate.py and misc/export.py (see docs/EVALUATION.md).

- `onthefly`: DiM's own protocol (utils.evaluate.train_on_generator): fresh generated images every
  batch.
- `fixed`: ipc images per class drawn from the generator ONCE (`draw_fixed_set`), then classifiers
  are trained on that fixed set only with the recipe of the dataset-distillation literature.
- baselines `random` (ipc real images per class, `random_subset_indices`) and `full` (the whole
  training set) go through the same fixed-set trainer.

The fixed protocol's K classifiers of one architecture, each reproducible from its own seed
(seed_k = seed + k), are trained together, stacked (utils/stacking.py); the report is made here.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import Split, normalize, seed_of_test_order, to_classifier_input
from utils.errors import UserError
from utils.evaluate import test_batch_size, train_on_generator
from utils.runtime import hardware, seed_everything
from utils.stacking import can_stack, train_group

PROTOCOLS = ('onthefly', 'fixed')
BASELINES = ('random', 'full')
REPORT_FORMAT = 'dim-eval/1'
DRAW_CHUNK = 1000  # images per generator forward pass when drawing a fixed set
ON_DEVICE_MAX_BYTES = 4 * 2**30  # training sets up to this size live on the training device


def classifier_seeds(seed, num_eval):
    """Seeds of the K classifier trainings: seed, seed + 1, ..., seed + K - 1."""
    return [seed + k for k in range(num_eval)]


def file_sha256(path, block=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(block), b''):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the training sets: a fixed draw from G, a random real subset, the full training set

@torch.no_grad()
def draw_fixed_set(G, info, ipc, seed, device, chunk=DRAW_CHUNK):
    """ipc images per class from G, class-major (all of class 0, then class 1, ...).

    G runs in eval mode (BatchNorm running statistics, so every image is independent of the others
    in its pass) and in float32. The noise comes from a CPU generator seeded with `seed`: N(0, I) with
    the one-hot class in its first entries (as `models.conditional_noise`), so the same seed gives the
    same noise on any device and the global RNG is not touched. G is called once per `chunk` images.
    Returns (images, labels) on `device`: images float32 in [0, 1] normalised with the dataset
    statistics, labels int64.
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


class TrainSet:
    """The images a fixed-set classifier trains on: float32 already normalised (a generated set), or
    uint8 pixels (real data) normalised per batch exactly as the test images are."""

    def __init__(self, images, labels, info, device):
        self.info, self.device = info, device
        self.uint8 = images.dtype == torch.uint8
        where = device if images.numel() * images.element_size() <= ON_DEVICE_MAX_BYTES else torch.device('cpu')
        self.images, self.labels = images.to(where), labels.to(where)

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        idx = idx.to(self.images.device)
        images = self.images[idx].to(self.device, non_blocking=True)
        labels = self.labels[idx].to(self.device, non_blocking=True)
        return (to_classifier_input(images, self.info) if self.uint8 else images), labels


def train_fixed(model_name, train_sets, info, test_split, args, device, ctx, seeds, stack=True,
                runlog=None, val_split=None):
    """Train one classifier per seed, seed k on the fixed `train_sets[k]` (one TrainSet for all seeds
    is accepted too), and test it on the real test set (and on `val_split`, held-out real images, when
    given).

    Recipe: SGD (utils.evaluate.classifier_optimizer), lr x0.1 after the first half of
    --epochs-eval epochs; each epoch shuffles the set and walks it in minibatches of --batch-size
    (the last one may be smaller); DSA augmentation per sample (--aug-type, without cutout when
    --mixup-net cut) and CutMix with probability --mix-p. Tests every --test-interval epochs and after
    the last. Returns one result per seed (in order) and whether the trainings ran stacked.
    """
    if isinstance(train_sets, TrainSet):
        train_sets = [train_sets] * len(seeds)
    stacked = stack and len(seeds) > 1
    if stacked:
        stacked, why = can_stack(model_name, info, device, ctx)
        if not stacked:
            print(f"  [{model_name}] cannot train the {len(seeds)} seeds stacked ({why}); one after another")
    groups = [range(len(seeds))] if stacked else [[k] for k in range(len(seeds))]
    results = []
    for members in groups:
        results += train_group(model_name, [train_sets[k] for k in members], info, test_split, args, device,
                               ctx, [seeds[k] for k in members], stacked, runlog, val_split)
    return results, stacked


def train_onthefly(G, model_name, info, test_split, args, device, ctx, seeds, runlog=None, val_split=None):
    """DiM's protocol once per seed: seed_everything(seed_k), then utils.evaluate.train_on_generator
    unchanged (with K = 1 and the default seed this is exactly the former validate.py)."""
    results = []
    for seed in seeds:
        seed_everything(seed)
        r = train_on_generator(G, model_name, info, test_split, args, device, ctx, extra_iteration=False,
                               runlog=runlog, val_split=val_split)
        r.pop('seconds')
        results.append({'seed': seed, **r})
    return results


# ----------------------------------------------------------------------------------------------
# reports

def mean_std(values):
    """Mean and population standard deviation (numpy's default ddof=0, as the DC/DSA/MTT evaluation
    code reports it); std is 0 for one value."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def summarise(architecture, results, seconds, stacked):
    row = {'architecture': architecture, 'seeds': [r['seed'] for r in results], 'stacked': stacked,
           'wall_seconds': round(seconds, 3)}
    selected = 'selected_top1' in results[0]  # --val-per-class
    for key in ('top1', 'best_top1', 'top5', 'best_top5') + (('selected_top1', 'val_top1') if selected else ()):
        values = [r[key] for r in results]
        row[key] = values
        row[f'{key}_mean'], row[f'{key}_std'] = mean_std(values)
    if selected:
        row['selected_epoch'] = [r['selected_epoch'] for r in results]
    row['test_curves'] = [r['test_curve'] for r in results if 'test_curve' in r]
    return row


def markdown_table(report):
    """The report as a markdown table, one row per architecture."""
    K = report['num_eval']
    ipc = report['ipc'] if report['ipc'] is not None else 'all'
    selected = report.get('val_per_class')
    lines = ["| method | protocol | test BN | dataset | ipc | model | runs | top-1 final (mean ± std) "
             + ("| top-1 at the test selected on held-out train images (mean ± std) " if selected else "")
             + "| top-1 best, selected on test (mean ± std) | top-5 final (mean ± std) |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if selected else "") + "---|---|"]
    for r in report['rows']:
        lines.append(f"| {report['method']} | {report['protocol']} | {report['test_bn']} | {report['dataset']} "
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


HOLDOUT_SEED = 0  # the same held-out images for every run with the same --val-per-class


def hold_out(split, num_classes, per_class):
    """(held-out Split of `per_class` images per class, Split of the rest), drawn with HOLDOUT_SEED:
    real training images that nothing in the evaluation trains on, to select an epoch without the
    test set (validate.py --val-per-class)."""
    idx = random_subset_indices(split.labels, num_classes, per_class, HOLDOUT_SEED, 'held-out images',
                                '--val-per-class')
    rest = torch.ones(len(split), dtype=torch.bool)
    rest[idx] = False
    return Split(split.images[idx], split.labels[idx]), Split(split.images[rest], split.labels[rest])


def storage(G, info, ipc):
    """What the evaluated method stores: the generator's parameters (fp32 and bf16 bytes) against
    ipc x classes real images as uint8, what a distilled set of that size stores."""
    params = sum(p.numel() for p in G.parameters()) if G is not None else None
    images = None if ipc is None else ipc * info.num_classes * info.channels * info.img_size ** 2
    return {'generator_parameters': params, 'generator_bytes_fp32': params and 4 * params,
            'generator_bytes_bf16': params and 2 * params, 'ipc_images_bytes_uint8': images}


def build_train_set(method, G, info, train_split, ipc, set_seed, device):
    """The fixed training set of a method: 'dim' (drawn from G), 'random' (real subset) or 'full'."""
    if method == 'dim':
        images, labels = draw_fixed_set(G, info, ipc, set_seed, device)
    elif method == 'random':
        idx = random_subset_indices(train_split.labels, info.num_classes, ipc, set_seed)
        images, labels = train_split.images[idx], train_split.labels[idx]
    elif method == 'full':
        images, labels = train_split.images, train_split.labels
    else:
        raise ValueError(f"unknown method '{method}'")
    return TrainSet(images, labels, info, device)


def run_evaluation(args, info, train_split, test_split, device, ctx, G=None, checkpoint=None, runlog=None):
    """Evaluate every --eval-model under --protocol / --baseline with --num-eval seeds.

    Returns the report dict written to results/<tag>/eval.json (docs/EVALUATION.md lists its fields).
    """
    method = args.baseline or 'dim'
    protocol = args.protocol
    if method == 'dim' and G is None:
        raise ValueError("evaluating the generator needs G")
    if method != 'dim' and protocol != 'fixed':
        raise ValueError("baselines are trained with the fixed protocol")
    seeds = classifier_seeds(args.seed, args.num_eval)
    set_seed = args.seed if getattr(args, 'set_seed', None) is None else args.set_seed
    # seed k trains on the set drawn with set_seed + k, so the spread covers the draw of the set;
    # --fixed-set: every seed on the one set of set_seed (the spread of the classifier training alone)
    fixed_set = getattr(args, 'fixed_set', False) or method == 'full'
    set_seeds = [set_seed] * len(seeds) if fixed_set else [set_seed + k for k in range(len(seeds))]
    start = time.time()
    val_split = None
    if getattr(args, 'val_per_class', 0):
        val_split, train_split = hold_out(train_split, info.num_classes, args.val_per_class)
        print(f"held out {len(val_split)} real training images ({args.val_per_class} per class) to select the "
              f"epoch; the baselines draw from the other {len(train_split)}")
    train_sets = None
    if protocol == 'fixed':
        built = {}
        for s in set_seeds:
            if s not in built:
                built[s] = build_train_set(method, G, info, train_split, args.ipc, s, device)
        train_sets = [built[s] for s in set_seeds]
        print(f"fixed training set ({method}): {len(train_sets[0])} images"
              + (f" per seed, drawn with set seeds {set_seeds}" if len(built) > 1 else "")
              + f", {math.ceil(len(train_sets[0]) / args.batch_size)} minibatches of up to {args.batch_size} "
              "per epoch")
    rows = []
    for name in args.eval_model:
        t0 = time.time()
        if protocol == 'onthefly':
            results = train_onthefly(G, name, info, test_split, args, device, ctx, seeds, runlog, val_split)
            stacked = False
        else:
            results, stacked = train_fixed(name, train_sets, info, test_split, args, device, ctx, seeds,
                                           stack=not getattr(args, 'no_stack', False), runlog=runlog,
                                           val_split=val_split)
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
    return {
        'format': REPORT_FORMAT,
        'protocol': protocol,
        'method': method,
        'dataset': info.name,
        'num_classes': info.num_classes,
        'ipc': None if method == 'full' else args.ipc,
        'test_bn': args.test_bn,
        'train_images': len(train_sets[0]) if train_sets is not None else None,
        'val_per_class': getattr(args, 'val_per_class', 0),
        'val_images': len(val_split) if val_split is not None else 0,
        'storage': storage(G if method == 'dim' else None, info, None if method == 'full' else args.ipc),
        'architectures': list(args.eval_model),
        'num_eval': args.num_eval,
        'seeds': seeds,
        'set_seed': set_seed if protocol == 'fixed' and method != 'full' else None,
        'set_seeds': set_seeds if protocol == 'fixed' and method != 'full' else None,
        'fixed_set': fixed_set if protocol == 'fixed' and method != 'full' else None,
        'generator_checkpoint': os.path.abspath(checkpoint) if checkpoint and method == 'dim' else None,
        'generator_sha256': file_sha256(checkpoint) if checkpoint and method == 'dim' else None,
        'recipe': {
            'epochs_eval': args.epochs_eval, 'eval_lr': args.eval_lr, 'batch_size': args.batch_size,
            'momentum': args.momentum, 'weight_decay': args.weight_decay,
            'lr_schedule': 'x0.1 after the first half of the epochs' if protocol == 'fixed' else 'constant',
            'aug_type': args.aug_type, 'mixup_net': args.mixup_net, 'mix_p': args.mix_p, 'beta': args.beta,
            'test_interval': args.test_interval,
            'test_bn': args.test_bn, 'test_batch_size': test_batch_size(args),
        },
        'test_order_seed': seed_of_test_order(info.name),
        'accuracy_keys': {
            'top1': 'top-1 (%) on the real test set after the last epoch',
            'test_bn': 'batch: tested in train mode, BatchNorm on each test batch (official, transductive); '
                       'running: eval mode',
            'best_top1': 'best top-1 (%) over the periodic tests: selected on the test set',
            'selected_top1': 'top-1 (%) at the periodic test whose accuracy on the held-out real training '
                             'images (--val-per-class) was highest (earliest on ties)',
            'top5': 'top-5 (%) after the last epoch',
            'best_top5': 'best top-5 (%) over the periodic tests: selected on the test set',
            'std': 'population standard deviation over the seeds (ddof=0)',
        },
        'rows': rows,
        'device': str(device),
        'hardware': hardware(device),
        'amp': getattr(args, 'amp', 'off'),
        'torch': torch.__version__,
        'wall_seconds': round(time.time() - start, 3),
    }
