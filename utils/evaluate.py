"""Classifiers trained on what a generator makes and tested on real data: the stage validations of
stages 1 and 2 (`validate`, on images drawn on the fly), validate.py's two protocols
(`train_on_generator`, `train_on_set`), and the pieces they and pool_match.py share (the classifier,
its SGD, one step, the test)."""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import TEST_BATCH, normalize, test_batches, to_classifier_input
from data.errors import Interrupted
from models import create_model, generate
from utils.augment import DiffAug, cutmix, upcast
from utils.runtime import FastPath, make_scaler


def classifier_optimizer(params, args, fast=None, lr=None):
    """The SGD of every classifier (validation, fixed-set, pool models): --momentum and --weight-decay
    (official 0.9, 5e-4) at `lr` (default --eval-lr), with the optimizer kernels `fast` chooses."""
    impl = fast.optimizer_kwargs(torch.optim.SGD) if fast is not None else {}
    return torch.optim.SGD(params, lr=args.eval_lr if lr is None else lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, **impl)


def build_classifier(name, info, device, fast=None):
    model = create_model(name, info.num_classes, info.channels, info.img_size, stem=info.resnet_stem)
    return fast.prepare(model) if fast is not None else model.to(device)


def classifier_step(model, opt, images, labels, ctx, scaler, mix=None, teacher=None, temperature=None,
                    totals=None):
    """One SGD step on cross-entropy; `mix` = (labels_b, lam) from CutMix: lam * CE(labels) +
    (1 - lam) * CE(labels_b), in float32 at least (float64 under a float64 default dtype). With a
    `teacher` (--soft-labels) the batch is labelled by the teacher instead, as it is (augmented and
    mixed): the loss is soft_label_loss at `temperature`, and `labels` and `mix` are not used. `totals`
    (a device tensor [2]) gets the batch's summed loss and its hits on `labels` added, without a host
    sync (the training curves). Returns the loss as a device tensor."""
    with ctx:
        logits = model(images)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if teacher is not None:
            loss = soft_label_loss(logits, teacher_logits(teacher, images), temperature)
        else:
            loss = F.cross_entropy(logits, labels)
            if mix is not None:
                labels_b, lam = mix
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits, labels_b)
    # through the loss scaler, which skips the step when an fp16 gradient overflowed; a disabled one
    # (fp32, bf16: utils/runtime.make_scaler) is the plain backward and step
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if totals is not None:
        totals[0] += loss.detach() * len(labels)
        totals[1] += (logits.detach().argmax(-1) == labels).sum()
    return loss.detach()


# --soft-labels: a teacher trained on the real training set labels every training batch after its
# augmentation (FKD, SRe2L, RDED; DD-Ranking's soft-label mode "M"), and the student learns its softened
# outputs. The default temperature is the one DD-Ranking's CIFAR-10 configurations give that mode for
# ConvNet-3 students: `soft_label_mode: M`, `soft_label_criterion: kl`, `temperature: 20.0` in
# D4M/CIFAR10/IPC{1,10,50}.yaml and RDED/CIFAR10/IPC{1,10,50}.yaml of NUS-HPC-AI-Lab/DD-Ranking (its
# SRe2L configurations, with ResNet-18 students, use 30.0; its evaluator's own default is 1.0).
DEFAULT_TEMPERATURE = 20.0


def soft_label_loss(student_logits, teacher_logits, temperature):
    """KL(softmax(teacher / T) || softmax(student / T)) x T^2: summed over the classes, averaged over the
    batch (the FKD / SRe2L form; T^2 keeps the gradient's scale independent of T). Logits [..., B,
    classes] give [...]: a scalar for one model, [K] for K stacked models (utils/stacking.py). Computed
    in the student logits' dtype (float32 at least)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean(-1) * temperature ** 2


@torch.no_grad()
def teacher_logits(teacher, images):
    """The teacher's logits for one batch [B, C, H, W] or K stacked batches [K, B, C, H, W], without a
    gradient. The teacher is in eval mode (utils.checkpoint.load_teacher): each image is labelled alone.
    Called inside the caller's autocast context."""
    flat = images.flatten(0, images.dim() - 4)
    return teacher(flat).view(*images.shape[:-3], -1)


# How classifiers are tested unless --test-bn says: 'batch' for the on-the-fly protocol (the official code
# never leaves train mode, so BatchNorm normalises each test batch with its own statistics, and the
# paper's ResNet numbers depend on it), 'running' (eval mode) for the field's fixed-set protocol.
DEFAULT_TEST_BN = {'onthefly': 'batch', 'fixed': 'running'}


def test_batch_size(args):
    """Test batches of --batch-size under --test-bn batch (their statistics are the normalisation, so
    the size matters, as in the official code); under running the size changes nothing but speed."""
    return args.batch_size if args.test_bn == 'batch' else TEST_BATCH


@torch.no_grad()
def test(model, test_split, info, device, ctx, bn='running', batch_size=TEST_BATCH):
    """Top-1 and top-5 accuracy (%) on the real test set, normalised with the dataset statistics
    (the reference used the GAN's (0.5, 0.5) on MNIST and Fashion: fixed here).

    bn='running': eval mode. bn='batch': train mode, as the official code tests -- BatchNorm uses each
    test batch's statistics (transductive; it also moves the running statistics, as there). Networks
    without BatchNorm (ConvNet-3) give the same numbers either way."""
    was_training = model.training
    model.train(bn == 'batch')
    correct1, correct5 = count_correct(model, test_split, info, device, ctx, batch_size)
    model.train(was_training)
    n = len(test_split)
    return 100.0 * correct1.item() / n, 100.0 * correct5.item() / n


def count_correct(forward, test_split, info, device, ctx, batch_size):
    """Top-1 and top-5 hits of `forward` over the split, as float32 device tensors: 0-dim for one
    model's logits [B, classes], [K] for K models' [K, B, classes] (utils/stacking.group_test). The
    fixed-set protocol turns them into percentages in float32 on the device (`train_on_set`), `test`
    in float64."""
    k = min(5, info.num_classes)
    correct1 = correct5 = None
    for images, labels in test_batches(test_split, device, batch_size):
        with ctx:
            logits = forward(to_classifier_input(images, info))
        hits = logits.float().topk(k, dim=-1).indices == labels[:, None]  # [..., B, k]
        if correct1 is None:
            correct1 = correct5 = torch.zeros(hits.shape[:-2], device=device)
        correct1 = correct1 + hits[..., 0].sum(-1)
        correct5 = correct5 + hits.any(dim=-1).sum(-1)
    return correct1, correct5


def iterations_per_epoch(num_classes, ipc, batch_size, extra_iteration):
    """The reference trains (classes * ipc) // batch iterations per epoch, plus one in stages 1 and 2.
    validate.py had no extra one and so trained nothing when ipc was small; at least one here."""
    n = num_classes * ipc // batch_size
    return n + 1 if extra_iteration else max(1, n)


@torch.no_grad()
def generated_batch(G, batch_size, info, augment, device):
    """A batch of generated images as a classifier sees them: [0, 1], normalised, augmented per sample."""
    if batch_size == info.num_classes:
        labels = torch.randperm(info.num_classes, device=device)
    else:
        labels = torch.randint(info.num_classes, (batch_size,), device=device)
    images = (upcast(generate(G, labels)) + 1) / 2  # float32 under --amp, float64 in a float64 check
    return augment(normalize(images, info.mean, info.std)), labels


def maybe_cutmix(images, labels, args):
    """CutMix with probability --mix-p under --mixup-net cut (one numpy draw decides): (images, labels,
    mix), mix = (labels_b, lam) for classifier_step, or None when the batch is not mixed."""
    if args.mixup_net == 'cut' and args.mix_p > 0 and np.random.rand() < args.mix_p:
        images, labels, labels_b, lam = cutmix(images, labels, args.beta)
        return images, labels, (labels_b, lam)
    return images, labels, None


class Selection:
    """The test accuracy at the periodic test that scored best on held-out real training images
    (validate.py --val-per-class): an epoch chosen without looking at the test set. Ties keep the
    earliest test."""

    def __init__(self):
        self.val_top1, self.top1, self.epoch = -1.0, None, None

    def update(self, epoch, val_top1, test_top1):
        if val_top1 > self.val_top1:
            self.val_top1, self.top1, self.epoch = val_top1, test_top1, epoch

    def result(self):
        return {'val_top1': self.val_top1, 'selected_top1': self.top1, 'selected_epoch': self.epoch}


class PeriodicTests:
    """The test record of K classifiers trained side by side (K = 1 on the fly), tested every
    --test-interval epochs and after the last: the final accuracies, the best ones (selected on the
    test set, as the paper reports), each model's curve, and with held-out images (--val-per-class)
    each model's Selection.

    With `board` = (runlog, [K tag prefixes], hard) every test also goes to tensorboard at its epoch
    (counted from 1): `<prefix>/test_top1`, `test_top5`, `val_top1`, and the epochs since the last test
    from `training` (the loop appends (epoch, device tensor [K, 2] of summed loss and hits, images, lr)
    each epoch): `train_loss`, `train_top1` (hard labels only), `lr`; read once per test, so training
    adds no host sync."""

    def __init__(self, K, args, held_out=False, board=None):
        self.interval, self.epochs = args.test_interval, args.epochs_eval
        self.final1 = self.final5 = self.best1 = self.best5 = [0.0] * K
        self.curves = [[] for _ in range(K)]
        self.selections = [Selection() for _ in range(K)] if held_out else None
        self.board, self.training = board, []

    def due(self, epoch):
        """Whether epoch `epoch` (from 0) ends with a test."""
        return (epoch + 1) % self.interval == 0 or epoch + 1 == self.epochs

    def record(self, epoch, top1, top5, val_top1=None):
        """One test of every model: lists of K accuracies (%), and on the held-out images with them."""
        self.final1, self.final5 = top1, top5
        self.best1 = [max(a, b) for a, b in zip(self.best1, top1)]
        self.best5 = [max(a, b) for a, b in zip(self.best5, top5)]
        for k, acc in enumerate(top1):
            self.curves[k].append([epoch + 1, acc])
            if self.selections is not None:
                self.selections[k].update(epoch + 1, val_top1[k], acc)
        if self.board is None:
            return
        runlog, prefixes, hard = self.board
        sums = torch.stack([t for _, t, _, _ in self.training]).tolist() if self.training else []
        for (e, _, n, lr), per_model in zip(self.training, sums):
            for prefix, (loss, hits) in zip(prefixes, per_model):
                runlog.scalars({f'{prefix}/train_loss': loss / n, f'{prefix}/lr': lr,
                                **({f'{prefix}/train_top1': 100.0 * hits / n} if hard else {})}, e + 1)
        self.training.clear()
        for k, prefix in enumerate(prefixes):
            runlog.scalars({f'{prefix}/test_top1': top1[k], f'{prefix}/test_top5': top5[k],
                            **({f'{prefix}/val_top1': val_top1[k]} if self.selections is not None else {})},
                           epoch + 1)

    def result(self, k):
        return {'top1': self.final1[k], 'top5': self.final5[k], 'best_top1': self.best1[k],
                'best_top5': self.best5[k], 'test_curve': self.curves[k],
                **(self.selections[k].result() if self.selections is not None else {})}


def train_on_generator(G, model_name, info, test_split, args, device, ctx, extra_iteration, runlog=None,
                       stop=None, val_split=None, teacher=None, board=None):
    """Train one fresh classifier on generated images for --epochs-eval epochs; test every
    --test-interval epochs and at the end. Returns accuracies: the final one, and the best over the
    periodic tests (the paper's number: selected on the test set); with `val_split` (held-out real
    images) also the test accuracy at the test that scored best on them. With a `teacher`
    (--soft-labels) each fresh batch is labelled by it at --temperature (classifier_step). `board`: the
    tag prefix of this classifier's tensorboard curves (PeriodicTests; None: no curves)."""
    G_was_training = G.training
    G.eval()  # BatchNorm running statistics, as the reference validates
    fast = FastPath.from_args(args, device)
    G_net = fast.compiled(fast.prepare(G))
    model = build_classifier(model_name, info, device, fast)
    opt = classifier_optimizer(model.parameters(), args, fast)
    net, scaler = fast.compiled(model), fast.scaler()
    augment = DiffAug(args.aug_type, mixup_net=args.mixup_net)
    iters = iterations_per_epoch(info.num_classes, args.ipc, args.batch_size, extra_iteration)
    tests = PeriodicTests(1, args, held_out=val_split is not None,
                          board=(runlog, [board], teacher is None) if board and runlog else None)
    start = time.time()
    bar = runlog.progress(range(args.epochs_eval), desc=f'eval {model_name}') if runlog else range(args.epochs_eval)
    for epoch in bar:
        if stop is not None and stop():
            raise Interrupted
        model.train()
        # the epoch's summed loss and hits, read at the next test; kept only for tensorboard curves
        totals = torch.zeros(1, 2, device=device) if tests.board else None
        for _ in range(iters):
            images, labels = generated_batch(G_net, args.batch_size, info, augment, device)
            images, labels, mix = maybe_cutmix(images, labels, args)
            classifier_step(net, opt, images, labels, ctx, scaler, mix, teacher, getattr(args, 'temperature', None),
                            None if totals is None else totals[0])
        if totals is not None:
            tests.training.append((epoch, totals, iters * args.batch_size, opt.param_groups[0]['lr']))
        if tests.due(epoch):
            top1, top5 = test(model, test_split, info, device, ctx, args.test_bn, test_batch_size(args))
            val1 = (test(model, val_split, info, device, ctx, args.test_bn, test_batch_size(args))[0]
                    if val_split is not None else None)
            tests.record(epoch, [top1], [top5], [val1])
            if hasattr(bar, 'set_postfix'):
                bar.set_postfix(top1=f'{top1:.2f}', best=f'{tests.best1[0]:.2f}')
    G.train(G_was_training)
    result = tests.result(0)
    del result['test_curve']  # the stage validations and eval.json record no on-the-fly curves
    return {**result, 'iters_per_epoch': iters, 'seconds': time.time() - start}


def train_on_set(model_name, images, labels, info, test_split, args, device, ctx, runlog=None, val_split=None,
                 teacher=None, board=None):
    """Train one fresh classifier on the fixed set (images, labels) -- validate.py's --protocol fixed
    and its baselines -- and test it on the real test set (and on `val_split`, held-out real images,
    when given). Generated images come float32 and normalised, real ones uint8, normalised per batch
    exactly as the test images are.

    Recipe: SGD (classifier_optimizer), lr x0.1 after the first half of --epochs-eval epochs; each
    epoch shuffles the set and walks it in minibatches of --batch-size (the last one may be smaller);
    DSA augmentation per sample (--aug-type, without cutout when --mixup-net cut) and CutMix with
    probability --mix-p; with a `teacher` (--soft-labels) every augmented batch is labelled by it at
    --temperature instead (classifier_step). Tests every --test-interval epochs and after the last.
    Every random draw (initialisation, order, augmentation, CutMix) comes from the global RNGs: the
    caller seeds them; the teacher draws none, so a soft run sees the batches its hard run sees.
    `board`: the tag prefix of the tensorboard curves (PeriodicTests; None: none). Returns the trained
    model and its test record (PeriodicTests.result).
    """
    model = build_classifier(model_name, info, device)
    opt = classifier_optimizer(model.parameters(), args)
    scaler = make_scaler(getattr(args, 'amp', 'off'), device)
    augment = DiffAug(args.aug_type, mixup_net=args.mixup_net)
    tests = PeriodicTests(1, args, held_out=val_split is not None,
                          board=(runlog, [board], teacher is None) if board and runlog else None)
    n, B, epochs = len(labels), args.batch_size, args.epochs_eval
    bar = runlog.progress(range(epochs), desc=f'{model_name}') if runlog is not None else range(epochs)
    model.train()
    for epoch in bar:
        for group in opt.param_groups:
            group['lr'] = args.eval_lr if epoch < (epochs + 1) // 2 else args.eval_lr * 0.1
        order = torch.randperm(n)
        # the epoch's summed loss and hits, read at the next test; kept only for tensorboard curves
        totals = torch.zeros(1, 2, device=device) if tests.board else None
        for step in range(math.ceil(n / B)):
            idx = order[step * B:(step + 1) * B].to(images.device)
            x, y = images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = to_classifier_input(x, info)
            x, y, mix = maybe_cutmix(augment(x), y, args)
            classifier_step(model, opt, x, y, ctx, scaler, mix, teacher, getattr(args, 'temperature', None),
                            None if totals is None else totals[0])
        if totals is not None:
            tests.training.append((epoch, totals, n, opt.param_groups[0]['lr']))
        if tests.due(epoch):
            # top-1 and top-5 (%) computed in float32 on the device, as the fixed protocol's reports
            # always have (`test` rounds in float64)
            model.train(args.test_bn == 'batch')
            acc = [(100.0 * torch.stack(count_correct(model, split, info, device, ctx, test_batch_size(args)))
                    / len(split)).tolist() for split in (test_split, val_split) if split is not None]
            model.train()
            tests.record(epoch, [acc[0][0]], [acc[0][1]], [acc[1][0]] if val_split is not None else None)
            if hasattr(bar, 'set_postfix'):
                bar.set_postfix(top1=f'{acc[0][0]:.2f}')
    return model, tests.result(0)


def validate(G, info, test_split, args, device, ctx, runlog, step, extra_iteration=True, stop=None):
    """Evaluate G with every --eval-model; print, log to tensorboard at `step`, return {model: result}."""
    results = {}
    for name in args.eval_model:
        r = train_on_generator(G, name, info, test_split, args, device, ctx, extra_iteration, runlog, stop=stop)
        results[name] = r
        print(f"  [{name}] top1 {r['top1']:.2f}  best top1 {r['best_top1']:.2f} (selected on test)  "
              f"top5 {r['top5']:.2f}  ({r['iters_per_epoch']} it/epoch, {r['seconds']:.0f}s)")
        runlog.scalars({f'Eval/{name}/top1': r['top1'], f'Eval/{name}/best_top1': r['best_top1']}, step)
    return results
