"""Speed machinery, opt-in (validate.py --stack): the K classifiers of one architecture of the fixed
protocol (--num-eval K) trained as one.

Their parameters are stacked (`torch.func.stack_module_state`) and one vmapped `functional_call` runs
all K per step, while every random draw of model k (initialisation, data order, augmentation, CutMix)
comes from model k's own saved RNG state (`RngSlots`). The result equals K runs of
utils.evaluate.train_on_set one after another up to float rounding (tests/test_evaluate.py checks
it). The interface is `train_stacked`; without --stack nothing here runs.
"""
import copy
import math
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import TEST_BATCH, to_classifier_input
from utils.augment import DiffAug
from utils.evaluate import (PeriodicTests, build_classifier, classifier_optimizer, count_correct, maybe_cutmix,
                            soft_label_loss, teacher_logits, test_batch_size)
from utils.runtime import make_scaler, seed_everything


class RngSlots:
    """One saved copy of the global RNGs (torch CPU, the CUDA device's, numpy, python) per training.

    `use(k)` installs training k's state and saves it back on exit, so trainings interleaved step by
    step draw exactly the numbers they would draw alone after `seed_everything(seed_k)`. `close()`
    puts back the state found at construction.
    """

    def __init__(self, seeds, device):
        self.cuda = device.type == 'cuda'
        self.device = device
        self.outer = self._get()
        self.states = []
        for seed in seeds:
            seed_everything(seed)
            self.states.append(self._get())
        self._set(self.outer)

    def _get(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None,
                np.random.get_state(), random.getstate())

    def _set(self, state):
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)
        np.random.set_state(state[2])
        random.setstate(state[3])

    @contextmanager
    def use(self, k):
        self._set(self.states[k])
        try:
            yield
        finally:
            self.states[k] = self._get()

    def close(self):
        self._set(self.outer)


class ClassifierGroup:
    """K classifiers of one architecture seen as one: `forward(x [K, B, ...]) -> [K, B, classes]`.

    Parameters and buffers stacked along a new first dimension; one vmapped functional_call runs all
    K. BatchNorm needs no patching: its running statistics are stacked buffers too, vmapped along the
    same dimension, so each model's in-place running-stat update writes its own slice (exactly what a
    lone BatchNorm does).
    """

    def __init__(self, models):
        params, buffers = torch.func.stack_module_state(models)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(models[0]).to('meta')  # structure only; tensors come from the stacks

        def call(p, b, x):
            return torch.func.functional_call(self.base, (p, b), (x,))
        self._train_fn = torch.func.vmap(call, in_dims=(0, 0, 0))
        self._test_fn = torch.func.vmap(call, in_dims=(0, 0, None))

    def __len__(self):
        return len(next(iter(self.params.values())))

    @property
    def dtype(self):
        return self.parameters()[0].dtype

    def parameters(self):
        return list(self.params.values())

    def train(self, mode=True):
        self.base.train(mode)

    def forward(self, x):
        """x: [K, B, C, H, W], one batch per model."""
        return self._train_fn(self.params, self.buffers, x)

    def forward_shared(self, x):
        """x: [B, C, H, W], the same batch for every model (testing)."""
        return self._test_fn(self.params, self.buffers, x)

    def state_dicts(self):
        """Per-model state dicts (detached views into the stacks)."""
        return [{**{n: p[k].detach() for n, p in self.params.items()},
                 **{n: b[k] for n, b in self.buffers.items()}} for k in range(len(self))]


def can_stack(model_name, info, device, ctx):
    """Whether vmap runs this architecture (forward and backward, train and eval mode); probed on
    zeros with throw-away copies, so no RNG state or real model changes. Returns (ok, reason)."""
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            models = [build_classifier(model_name, info, device) for _ in range(2)]
        group = ClassifierGroup(models)
        x = torch.zeros(2, 2, info.channels, info.img_size, info.img_size, device=device)
        with ctx:
            out = group.forward(x)
        out.float().sum().backward()
        for mode in (False, True):  # testing: eval mode (--test-bn running) and train mode (batch)
            group.train(mode)
            with torch.no_grad(), ctx:
                group.forward_shared(x[0])
        return True, ''
    except Exception as e:  # vmap lacks a batching rule, or similar: train the K models one by one
        return False, f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'


def group_loss(logits, labels_a, labels_b, lam):
    """Each model's mean (CutMix-weighted) cross-entropy, [K]: logits [K, B, classes], labels [K, B], lam
    [K] (1 where no CutMix). Their sum is what trains: a model's gradient is that of its own loss."""
    K, B = labels_a.shape
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)  # fp32 at least
    ce_a = F.cross_entropy(flat, labels_a.flatten(), reduction='none').view(K, B).mean(1)
    ce_b = F.cross_entropy(flat, labels_b.flatten(), reduction='none').view(K, B).mean(1)
    return lam * ce_a + (1 - lam) * ce_b


@torch.no_grad()
def group_test(group, test_split, info, device, ctx, bn='running', batch_size=TEST_BATCH):
    """Top-1 and top-5 (%) of every model on the real test set: two lists of K floats. `bn` and
    `batch_size` as in utils.evaluate.test."""
    group.train(bn == 'batch')
    c1, c5 = count_correct(lambda x: group.forward_shared(x.to(group.dtype)), test_split, info, device, ctx,
                           batch_size)
    group.train(True)
    n = len(test_split)
    return (100.0 * c1 / n).tolist(), (100.0 * c5 / n).tolist()


def train_stacked(model_name, train_sets, info, test_split, args, device, ctx, seeds, runlog=None,
                  val_split=None, teacher=None):
    """Train one classifier per seed, model k on `train_sets[k]` ((images, labels), all of one size),
    all K stacked, with the recipe of utils.evaluate.train_on_set (a `teacher`, --soft-labels, labels
    each model's augmented batch as there). Returns one result per seed (with its `state_dict`), or
    None, after one printed line, when vmap cannot run this architecture (the caller then trains the
    seeds one after another)."""
    ok, why = can_stack(model_name, info, device, ctx)
    if not ok:
        print(f"  [{model_name}] cannot train the {len(seeds)} seeds stacked ({why}); one after another")
        return None
    K, n, B = len(seeds), len(train_sets[0][1]), args.batch_size
    if any(len(labels) != n for _, labels in train_sets):
        raise ValueError("stacked trainings walk their sets in step: the sets must have one size")
    epochs = args.epochs_eval
    slots = RngSlots(seeds, device)
    try:
        models = []
        for k in range(K):
            with slots.use(k):  # initialised on the CPU from seed_k, as a lone run would
                models.append(build_classifier(model_name, info, device))
        group = ClassifierGroup(models)
        opt = classifier_optimizer(group.parameters(), args)
        scaler = make_scaler(getattr(args, 'amp', 'off'), device)
        augment = DiffAug(args.aug_type, mixup_net=args.mixup_net)
        # each stacked model's curves under its own seed, as a lone run of that seed writes them
        board = None if runlog is None else (runlog, [f'{model_name}/seed{seed}' for seed in seeds], teacher is None)
        tests = PeriodicTests(K, args, held_out=val_split is not None, board=board)
        bar = range(epochs)
        if runlog is not None:
            bar = runlog.progress(bar, desc=f'{model_name} x{K}')
        group.train(True)
        for epoch in bar:
            for g in opt.param_groups:
                g['lr'] = args.eval_lr if epoch < (epochs + 1) // 2 else args.eval_lr * 0.1
            orders = []
            for k in range(K):
                with slots.use(k):
                    orders.append(torch.randperm(n))
            totals = torch.zeros(K, 2, device=device)  # each model's summed loss and hits, read at the next test
            for step in range(math.ceil(n / B)):
                xs, ya, yb, lam = [], [], [], []
                for k, (images, labels) in enumerate(train_sets):
                    with slots.use(k):
                        idx = orders[k][step * B:(step + 1) * B].to(images.device)
                        x = images[idx].to(device, non_blocking=True)
                        y = labels[idx].to(device, non_blocking=True)
                        if x.dtype == torch.uint8:
                            x = to_classifier_input(x, info)
                        x, y, mix = maybe_cutmix(augment(x), y, args)
                    y_b, lam_k = mix if mix is not None else (y, 1.0)
                    xs.append(x)
                    ya.append(y)
                    yb.append(y_b)
                    lam.append(lam_k)
                batch = torch.stack(xs)
                with ctx:
                    logits = group.forward(batch)
                    # the teacher labels the K batches in one pass (eval mode: each image alone)
                    soft = teacher_logits(teacher, batch) if teacher is not None else None
                labels_now = torch.stack(ya)
                if soft is None:
                    losses = group_loss(logits, labels_now, torch.stack(yb), torch.tensor(lam, device=device))
                else:  # each model's own soft-label loss: each gets the gradient of its own
                    losses = soft_label_loss(logits.to(torch.promote_types(logits.dtype, torch.float32)), soft,
                                             args.temperature)
                opt.zero_grad(set_to_none=True)  # as utils/evaluate.classifier_step
                scaler.scale(losses.sum()).backward()
                scaler.step(opt)
                scaler.update()
                totals[:, 0] += losses.detach() * labels_now.shape[1]
                totals[:, 1] += (logits.detach().argmax(-1) == labels_now).sum(-1)
            tests.training.append((epoch, totals, n, opt.param_groups[0]['lr']))
            if tests.due(epoch):
                top1, top5 = group_test(group, test_split, info, device, ctx, args.test_bn, test_batch_size(args))
                val1 = (group_test(group, val_split, info, device, ctx, args.test_bn, test_batch_size(args))[0]
                        if val_split is not None else None)
                tests.record(epoch, top1, top5, val1)
                if hasattr(bar, 'set_postfix'):
                    bar.set_postfix(top1=f'{np.mean(top1):.2f}')
        states = group.state_dicts()
    finally:
        slots.close()
    return [{'seed': seeds[k], **tests.result(k), 'state_dict': states[k]} for k in range(K)]
