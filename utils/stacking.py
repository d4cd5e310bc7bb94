"""K classifiers of one architecture trained as one (the fixed protocol's --num-eval seeds).

Their parameters are stacked (`torch.func.stack_module_state`) and one vmapped `functional_call` runs
all K per step, while every random draw of model k (initialisation, data order, augmentation, CutMix)
comes from model k's own saved RNG state (`RngSlots`). The result equals K separate runs up to float
rounding (tests/test_evaluate.py checks it). `train_group` is the loop; with `stacked=False` it
trains one plain model the same way, which is what the stacked one is tested against.
"""
import copy
import math
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import TEST_BATCH
from utils.augment import make_augment
from utils.evaluate import (PeriodicTests, build_classifier, classifier_optimizer, count_correct, maybe_cutmix,
                            test_batch_size)
from utils.runtime import backward_step, make_scaler, seed_everything


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

    stacked=True: parameters and buffers stacked along a new first dimension; one vmapped
    functional_call runs all K. BatchNorm needs no patching: its running statistics are stacked
    buffers too, vmapped along the same dimension, so each model's in-place running-stat update
    writes its own slice (exactly what a lone BatchNorm does). stacked=False: a single plain module
    (K = 1), the reference implementation the stacked one is tested against.
    """

    def __init__(self, models, stacked):
        self.stacked = stacked
        if stacked:
            params, buffers = torch.func.stack_module_state(models)
            self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            self.buffers = buffers
            self.base = copy.deepcopy(models[0]).to('meta')  # structure only; tensors come from the stacks

            def call(p, b, x):
                return torch.func.functional_call(self.base, (p, b), (x,))
            self._train_fn = torch.func.vmap(call, in_dims=(0, 0, 0))
            self._test_fn = torch.func.vmap(call, in_dims=(0, 0, None))
        else:
            if len(models) != 1:
                raise ValueError("an unstacked group holds one model")
            self.model = models[0]

    def __len__(self):
        return len(next(iter(self.params.values()))) if self.stacked else 1

    @property
    def dtype(self):
        return self.parameters()[0].dtype

    def parameters(self):
        return list(self.params.values()) if self.stacked else list(self.model.parameters())

    def train(self, mode=True):
        (self.base if self.stacked else self.model).train(mode)

    def forward(self, x):
        """x: [K, B, C, H, W], one batch per model."""
        if self.stacked:
            return self._train_fn(self.params, self.buffers, x)
        return self.model(x[0]).unsqueeze(0)

    def forward_shared(self, x):
        """x: [B, C, H, W], the same batch for every model (testing)."""
        if self.stacked:
            return self._test_fn(self.params, self.buffers, x)
        return self.model(x).unsqueeze(0)

    def state_dicts(self):
        """Per-model state dicts (detached; views into the stacks when stacked)."""
        if not self.stacked:
            return [{k: v.detach() for k, v in self.model.state_dict().items()}]
        return [{**{n: p[k].detach() for n, p in self.params.items()},
                 **{n: b[k] for n, b in self.buffers.items()}} for k in range(len(self))]


def can_stack(model_name, info, device, ctx):
    """Whether vmap runs this architecture (forward and backward, train and eval mode); probed on
    zeros with throw-away copies, so no RNG state or real model changes. Returns (ok, reason)."""
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            models = [build_classifier(model_name, info, device) for _ in range(2)]
        group = ClassifierGroup(models, stacked=True)
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
    """Sum over models of each model's mean (CutMix-weighted) cross-entropy. logits [K, B, classes],
    labels [K, B], lam [K] (1 where no CutMix). A model's gradient is that of its own loss."""
    K, B = labels_a.shape
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)  # fp32 at least
    ce_a = F.cross_entropy(flat, labels_a.flatten(), reduction='none').view(K, B).mean(1)
    ce_b = F.cross_entropy(flat, labels_b.flatten(), reduction='none').view(K, B).mean(1)
    return (lam * ce_a + (1 - lam) * ce_b).sum()


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


def lr_at(epoch, epochs, lr):
    """The fixed-set schedule: `lr` for the first ceil(epochs / 2) epochs, lr / 10 after."""
    return lr if epoch < (epochs + 1) // 2 else lr * 0.1


def train_group(model_name, train_sets, info, test_split, args, device, ctx, seeds, stacked, runlog=None,
                val_split=None):
    """Train one classifier per seed, model k on `train_sets[k]` (all of one size), stacked or (one
    seed) plain, with the fixed-set recipe of utils.protocols.train_fixed. Returns one result per seed."""
    K, n, B = len(seeds), len(train_sets[0]), args.batch_size
    if any(len(t) != n for t in train_sets):
        raise ValueError("stacked trainings walk their sets in step: the sets must have one size")
    epochs = args.epochs_eval
    slots = RngSlots(seeds, device)
    try:
        models = []
        for k in range(K):
            with slots.use(k):  # initialised on the CPU from seed_k, as a lone run would
                models.append(build_classifier(model_name, info, device))
        group = ClassifierGroup(models, stacked)
        opt = classifier_optimizer(group.parameters(), args)
        scaler = make_scaler(getattr(args, 'amp', 'off'), device)
        augment = make_augment(args.aug_type, args.mixup_net, batch=False)
        tests = PeriodicTests(K, args, held_out=val_split is not None)
        bar = range(epochs)
        if runlog is not None:
            bar = runlog.progress(bar, desc=f'{model_name} x{K}')
        group.train(True)
        for epoch in bar:
            for g in opt.param_groups:
                g['lr'] = lr_at(epoch, epochs, args.eval_lr)
            orders = []
            for k in range(K):
                with slots.use(k):
                    orders.append(torch.randperm(n))
            for step in range(math.ceil(n / B)):
                xs, ya, yb, lam = [], [], [], []
                for k in range(K):
                    with slots.use(k):
                        x, y = train_sets[k].batch(orders[k][step * B:(step + 1) * B])
                        x, y, mix = maybe_cutmix(augment(x), y, args)
                    y_b, lam_k = mix if mix is not None else (y, 1.0)
                    xs.append(x)
                    ya.append(y)
                    yb.append(y_b)
                    lam.append(lam_k)
                with ctx:
                    logits = group.forward(torch.stack(xs))
                loss = group_loss(logits, torch.stack(ya), torch.stack(yb), torch.tensor(lam, device=device))
                backward_step(loss, opt, scaler)
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
