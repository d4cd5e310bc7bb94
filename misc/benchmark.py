"""Benchmark of DiM's three inner loops on CIFAR-shaped random data (a benchmark, not a test).

    python misc/benchmark.py --device cuda --json bench.json             # plain, each switch alone, the bundle
    python misc/benchmark.py --device cuda --configs plain fast --amp bf16  # plain against the flags given
    python misc/benchmark.py --device cpu --quick --json /tmp/b.json     # tiny, under a minute on a CPU

Configs (--configs): `plain` is the default path (fp32, the official code's cuDNN settings, torch's
default optimizer kernels); each name of SWITCHES turns on one switch alone; `bundle` turns on every
switch that keeps fp32 numerics (not bf16, not compile); `fast` takes the fast-path flags given on the
command line. Every row has its time relative to plain and how far its losses are from plain's after the
same --check-iters iterations from the same seed.

Loops, each run through the real step functions (gen_condense.train_iteration, pool_match.Pool and
pool_match.train_iteration, utils/evaluate's generated_batch and classifier_step):
  stage1            one GAN iteration: generator step + discriminator step with gradient penalty
  stage2_<model>    one stage-2 iteration: --pool-steps pool-model SGD steps + G step (GAN + logit match
                    loss, siamese augmentation) + D step
  validation_<m>    one validation iteration: generate a batch, augment, one classifier SGD step; plus
                    the time of one test pass, and the projected time of a default validation
                    (1000 epochs of 4 iterations, 5 tests)

For each loop and config it reports the median milliseconds per iteration over --iters timed iterations
after --warmup (CUDA events on a GPU, perf_counter on the CPU), images per second, the matmul/conv FLOPs
of one iteration (torch.utils.flop_counter.FlopCounterMode, forward and backward, eager), the achieved
TFLOP/s against a large matrix product timed in the same run (bf16 on CUDA, fp32 on the CPU), peak
memory, the aten operators one iteration dispatches and the host reads of tensor values among them
(.item(), bool(tensor): each a host sync on a GPU; counted on any device by a TorchDispatchMode), and on
CUDA the host syncs torch.cuda.set_sync_debug_mode reports. --json writes the same as one file.
"""
import argparse
import collections
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import replace
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import gen_condense  # noqa: E402
import pool_match  # noqa: E402
import validate  # noqa: E402
from data.datasets import DATASETS, BatchStream, Split  # noqa: E402
from models import Generator  # noqa: E402
from utils.run import build_gan  # noqa: E402
from utils.augment import DiffAug  # noqa: E402
from utils.cli import OneLineParser, add_cuda_graphs_flag, add_fastpath_flags, run  # noqa: E402
from utils.evaluate import (build_classifier, classifier_optimizer, classifier_step, generated_batch,  # noqa: E402
                            iterations_per_epoch, test)
from utils.runtime import FastPath, default_tf32, select_device, setup_backend  # noqa: E402

INFO = DATASETS['cifar10']
POOL = pool_match.POOL
# The default CIFAR-10 schedule, for the projections
CIFAR_TRAIN, STAGE1_EPOCHS, STAGE2_EPOCHS, EVAL_INTERVAL = 50000, 150, 100, 10
EVAL_EPOCHS, EVAL_IPC, EVAL_TESTS = 1000, 50, 5

# One switch each, on top of the plain path: FastPath fields, plus the cuDNN autotuner and stage 2's
# CUDA graphs, which are not FastPath fields. 'bundle' is every switch that keeps fp32 numerics.
SWITCHES = {
    'bf16': {'amp': 'bf16'},
    'channels-last': {'channels_last': True},
    'foreach': {'optim_impl': 'foreach'},
    'fused': {'optim_impl': 'fused'},
    'cudnn-benchmark': {'cudnn_benchmark': True},
    'cuda-graphs': {'cuda_graphs': 'on'},
    'compile': {'compile': 'default'},
}
BUNDLE = {'channels_last': True, 'optim_impl': 'fused', 'cudnn_benchmark': True, 'cuda_graphs': 'on'}
CONFIGS = ('plain', *SWITCHES, 'bundle', 'fast')
CUDA_ONLY = ('cudnn-benchmark', 'cuda-graphs')  # nothing to measure on the CPU


# ---------------------------------------------------------------------------------------------------
# workloads: a `step()` that runs one iteration of a real loop, on random CIFAR-shaped data

def random_split(n, seed=0, info=INFO):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.channels, info.img_size, info.img_size), dtype=torch.uint8, generator=g)
    return Split(images, torch.randint(info.num_classes, (n,), generator=g))


def _endless(stream):
    while True:
        yield from stream.batches(stream.new_order())


def gan_nets(fast, width, lr, info=INFO, seed=0):
    """The stages' GanNets (build_gan) at `width`, from `seed`."""
    g_cfg = dict(num_classes=info.num_classes, channels=info.channels, img_size=info.img_size,
                 dim_noise=100, width=width)
    d_cfg = dict(num_classes=info.num_classes, channels=info.channels, img_size=info.img_size, width=width)
    torch.manual_seed(seed)
    return build_gan(g_cfg, d_cfg, fast, lr)


def stage1_workload(fast, width=196, batch=128, train_size=CIFAR_TRAIN, seed=0):
    nets = gan_nets(fast, width, gen_condense.get_parser().get_default('lr'), seed=seed)
    stream = BatchStream(random_split(train_size, seed), batch, fast.device, torch.Generator().manual_seed(seed))
    batches, ctx = _endless(stream), fast.ctx()

    def step():
        images, labels = next(batches)
        return gen_condense.train_iteration(nets, images, labels, ctx, fast.gp_amp)
    return SimpleNamespace(step=step, batch=batch, modules={'G': nets.G, 'D': nets.D}, nets=nets)


def stage2_workload(fast, pool_model, width=196, batch=64, pool_steps=16, train_size=CIFAR_TRAIN, seed=0,
                    cuda_graphs='off'):
    args = pool_match.get_parser().parse_args(['--match', 'logit', '--match-aug', '--cuda-graphs', cuda_graphs,
                                               '--epochs-match-train', str(pool_steps)])
    nets = gan_nets(fast, width, args.lr, seed=seed)
    stream = BatchStream(random_split(train_size, seed), batch, fast.device, torch.Generator().manual_seed(seed))
    batches, ctx = _endless(stream), fast.ctx()
    pool = pool_match.Pool(args, INFO, fast, stream, ctx)  # refuses --cuda-graphs where it can't capture
    pool.build(pool_model)

    def step():
        images, labels = next(batches)
        return pool_match.train_iteration(nets, pool, images, labels, ctx, fast.gp_amp)
    return SimpleNamespace(step=step, batch=batch, modules={'G': nets.G, 'D': nets.D, 'pool': pool.model},
                           nets=nets, pool=pool)


def validation_workload(fast, model_name, width=196, batch=128, seed=0, info=INFO):
    """train_on_generator's iteration: a generated, augmented batch and one classifier step."""
    args = validate.get_parser().parse_args([])  # the validation defaults
    torch.manual_seed(seed)
    G = fast.prepare(Generator(info.num_classes, info.channels, info.img_size, dim_noise=100, width=width)).eval()
    G_net = fast.compiled(G)
    model = build_classifier(model_name, info, fast.device, fast)
    opt = classifier_optimizer(model.parameters(), args, fast)
    net, scaler, ctx = fast.compiled(model), fast.scaler(), fast.ctx()
    augment = DiffAug(args.aug_type, mixup_net=args.mixup_net)
    model.train()

    def step():
        images, labels = generated_batch(G_net, batch, info, augment, fast.device)
        return {'loss': classifier_step(net, opt, images, labels, ctx, scaler)}
    return SimpleNamespace(step=step, batch=batch, modules={'G': G, 'model': model}, ctx=ctx)


# ---------------------------------------------------------------------------------------------------
# measuring

def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup, iters):
    """Milliseconds of each of `iters` iterations after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == 'cuda':
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module attribution, whose backward hooks refuse
    autograd.grad on a leaf input -- what the gradient penalty does. Totals are all we report."""
    parents = {'Global'}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(step):
    """Matmul/conv FLOPs of one call (forward and backward, double backward included); None when this
    torch's FlopCounterMode cannot follow it."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, 'mod_tracker'):
        counter.mod_tracker = _GlobalOnly()
    try:
        with counter:
            step()
    except RuntimeError as e:
        print(f"  (FLOPs not counted: {str(e).splitlines()[0]})")
        return None
    return int(counter.get_total_flops())


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operators a piece of code dispatches (on a GPU each is at least one kernel launch
    of a few microseconds: at these sizes the count predicts the time) and, by the repository function
    that caused them, the reads of tensor values by the host (.item(), int(), bool(): a host sync on a
    GPU) and tensors made from Python data (an H2D copy that waits, on CUDA). Reads inside torch.optim
    are left out: they read the step counters, which non-fused optimizers keep on the host on every
    device, so they cost no sync on a GPU either."""

    HOST_READS = ('_local_scalar_dense', 'lift_fresh', 'lift_fresh_copy')

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.host_reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in self.HOST_READS:
            stack = traceback.extract_stack()[:-1]
            if not any(f'{os.sep}torch{os.sep}optim{os.sep}' in f.filename for f in stack):
                ours = [f for f in stack if f.filename.startswith(ROOT + os.sep) and '/site-packages/' not in f.filename
                        and not f.filename.startswith(os.path.join(ROOT, 'tests'))
                        and f.filename != os.path.abspath(__file__)]
                self.host_reads[(name, ours[-1].name if ours else '?')] += 1
        return func(*args, **(kwargs or {}))


def count_dispatch(step):
    """(aten operators, host reads) of one call."""
    with DispatchCounter() as counter:
        step()
    return counter.ops, sum(counter.host_reads.values())


def count_host_syncs(step, device):
    """Synchronising CUDA calls in one iteration (None on the CPU, where nothing is asynchronous)."""
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize(device)
    return sum('synchroniz' in str(w.message).lower() for w in caught)


def peak_matmul(device, n, reps):
    """The chip's dense matrix rate measured here: bf16 on CUDA, fp32 on the CPU (random data)."""
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_steps(lambda: a @ b, device, warmup=3, iters=reps))
    return {'dtype': str(dtype).replace('torch.', ''), 'n': n, 'ms': ms, 'tflops': 2 * n ** 3 / ms / 1e9}


def reset_memory(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS so far


def loss_trace(make, fast, iters):
    """The losses of the first `iters` iterations of a workload built from the same seed."""
    work = make(fast)  # seeds the global RNG, so every config draws the same numbers
    return [{k: float(v) for k, v in work.step().items() if not k.startswith('skipped')} for _ in range(iters)]


def deviation(reference, trace):
    """Per loss, the largest difference from the reference over the iterations, over the loss's mean
    absolute reference value (relative to its typical size, not to each value: the Wasserstein estimate,
    say, crosses zero)."""
    out = {}
    for key in reference[0]:
        scale = max(sum(abs(r[key]) for r in reference) / len(reference), 1e-12)
        out[key] = max(abs(t[key] - r[key]) for r, t in zip(reference, trace)) / scale
    return out


def measure(name, make, fast, opts, peak, reference=None, extra=None):
    """Build the workload, count its FLOPs (eagerly, on a separate copy) and its dispatched operators,
    compare its losses with the plain path's `reference` trace, time it."""
    device = fast.device
    flops = count_flops(make(replace(fast, compile='off')).step)
    trace = loss_trace(make, fast, opts.check_iters) if opts.check_iters else None
    reset_memory(device)
    work = make(fast)
    t0 = time.perf_counter()
    times = time_steps(work.step, device, opts.warmup, opts.iters)
    wall = time.perf_counter() - t0
    ops, host_reads = count_dispatch(work.step)
    ms = statistics.median(times)
    row = {
        'loop': name, 'config': opts.config_name, 'fast_path': fast.describe(), 'batch': work.batch,
        'iters': len(times), 'warmup': opts.warmup, 'ms_median': ms,
        'ms_min': min(times), 'ms_max': max(times),
        'images_per_s': work.batch / ms * 1e3,
        'flops_per_iter': flops, 'gflop_per_image': flops / work.batch / 1e9 if flops else None,
        'tflops_achieved': flops / ms / 1e9 if flops else None,
        'fraction_of_peak': flops / ms / 1e9 / peak['tflops'] if flops else None,
        'peak_memory_mb': peak_memory_mb(device),
        'peak_memory_kind': 'cuda max_memory_allocated' if device.type == 'cuda' else 'process peak RSS',
        'ops_per_iter': ops, 'host_reads_per_iter': host_reads,
        'host_syncs_per_iter': count_host_syncs(work.step, device),
        'losses': trace,
        'vs_plain_max_rel_diff': deviation(reference, trace) if reference and trace else None,
        'check_iters': opts.check_iters,
        'seconds_total': wall,
    }
    if extra:
        row.update(extra(work, ms))
    return row


def validation_extra(opts, device):
    def extra(work, ms):
        split = random_split(opts.test_size, seed=1)
        test(work.modules['model'], split, INFO, device, work.ctx)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        test(work.modules['model'], split, INFO, device, work.ctx)
        synchronize(device)
        test_ms = (time.perf_counter() - t0) * 1e3 * (10000 / opts.test_size)  # scaled to a 10,000-image test set
        iters = iterations_per_epoch(INFO.num_classes, EVAL_IPC, 128, extra_iteration=True)
        projected = (EVAL_EPOCHS * iters * ms + EVAL_TESTS * test_ms) / 1e3 if work.batch == 128 else None
        return {'test_ms_10k_images': test_ms, 'validation_projected_s': projected,
                'validation_protocol': f'{EVAL_EPOCHS} epochs x {iters} iterations of batch 128 + '
                                       f'{EVAL_TESTS} tests (ipc {EVAL_IPC}, stage validations)'}
    return extra


def project(rows):
    """The default CIFAR-10 pipeline from the measured loops (only where measured at default sizes)."""
    out = {}
    for config in sorted({r['config'] for r in rows}):
        by = {r['loop']: r for r in rows if r['config'] == config}
        s1, val = by.get('stage1'), by.get('validation_convnet')
        pools = [by[f'stage2_{m}'] for m in POOL if f'stage2_{m}' in by]
        if not (s1 and val and pools and s1['batch'] == 128 and all(p['batch'] == 64 for p in pools)
                and val.get('validation_projected_s')):
            continue
        v = val['validation_projected_s']
        stage1 = STAGE1_EPOCHS * (CIFAR_TRAIN // 128) * s1['ms_median'] / 1e3 + STAGE1_EPOCHS // EVAL_INTERVAL * v
        stage2 = (STAGE2_EPOCHS * (CIFAR_TRAIN // 64) * statistics.mean(p['ms_median'] for p in pools) / 1e3
                  + STAGE2_EPOCHS // EVAL_INTERVAL * v)
        out[config] = {'stage1_h': stage1 / 3600, 'stage2_h': stage2 / 3600, 'pipeline_h': (stage1 + stage2) / 3600,
                       'pool_models_measured': [p['loop'][len('stage2_'):] for p in pools],
                       'note': 'stage 2 uses the mean over the measured pool models (the run draws one '
                               'of five per epoch); convnet validations; sample grids and checkpoints '
                               'not counted'}
    return out


# ---------------------------------------------------------------------------------------------------

def config_path(config, opts, device):
    """(FastPath, whether cuDNN autotunes, --cuda-graphs) of a config."""
    if config == 'fast':
        return FastPath.from_args(opts, device), opts.cudnn_benchmark, opts.cuda_graphs
    switch = BUNDLE if config == 'bundle' else SWITCHES.get(config, {})
    fields = {k: v for k, v in switch.items() if k not in ('cudnn_benchmark', 'cuda_graphs')}
    if device.type != 'cuda':
        switch = {k: v for k, v in switch.items() if k not in ('cudnn_benchmark', 'cuda_graphs')}
    return (replace(FastPath.plain(device), **fields), switch.get('cudnn_benchmark', False),
            switch.get('cuda_graphs', 'off'))


def describe_row(row):
    notes = f", {row['ops_per_iter']} ops, {row['host_reads_per_iter']} host reads"
    if row['host_syncs_per_iter'] is not None:
        notes += f", {row['host_syncs_per_iter']} host syncs"
    if row['speedup_vs_plain']:
        notes += f", x{row['speedup_vs_plain']:.2f} vs plain"
    if row['vs_plain_max_rel_diff'] is not None:
        notes += ', losses vs plain: ' + ' '.join(f'{k} {v:.1e}' for k, v in row['vs_plain_max_rel_diff'].items())
    rate = (f"{row['flops_per_iter'] / 1e9:9.2f} GFLOP/it  {row['tflops_achieved']:7.3f} TFLOP/s "
            f"({100 * row['fraction_of_peak']:.1f}% of peak)" if row['flops_per_iter'] else 'FLOPs n/a')
    return (f"[{row['config']}] {row['loop']:22s} {row['ms_median']:9.2f} ms/it  {row['images_per_s']:9.1f} img/s  "
            f"{rate}  peak mem {row['peak_memory_mb']:.0f} MB{notes}"
            + (f"  validation run {row['validation_projected_s']:.1f} s" if row.get('validation_projected_s') else ''))


def get_parser():
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'))
    p.add_argument('--quick', action='store_true',
                   help='tiny sizes and few iterations (seconds on a CPU): checks the benchmark runs')
    p.add_argument('--json', default='', metavar='PATH', help='also write the results to this file')
    p.add_argument('--loops', nargs='+', default=['stage1', 'stage2', 'validation'],
                   choices=('stage1', 'stage2', 'validation'))
    p.add_argument('--pool-models', nargs='+', default=None,
                   help=f"stage-2 pool models (default convnet resnet18; --quick: convnet; 'all': {' '.join(POOL)})")
    p.add_argument('--eval-models', nargs='+', default=['convnet'])
    p.add_argument('--configs', nargs='+', default=['plain', *SWITCHES, 'bundle'], choices=CONFIGS,
                   help="plain: the default path (fp32, the official cuDNN settings, torch's optimizer kernels); "
                        "a switch's name: that switch alone; bundle: " + ' + '.join(sorted(BUNDLE))
                        + "; fast: the flags below")
    g = p.add_argument_group("the fast path of the 'fast' config (the stages' flags; the others ignore them)")
    add_fastpath_flags(g)
    add_cuda_graphs_flag(g)
    p.add_argument('--check-iters', type=int, default=None,
                   help="iterations whose losses are compared with plain's (default 5; --quick: 2; 0: none)")
    p.add_argument('--width', type=int, default=None, help='G/D width (default 196; --quick: 8)')
    p.add_argument('--batch-stage1', type=int, default=None, help='default 128 (--quick: 8)')
    p.add_argument('--batch-stage2', type=int, default=None, help='default 64 (--quick: 8)')
    p.add_argument('--batch-eval', type=int, default=None, help='default 128 (--quick: 8)')
    p.add_argument('--pool-steps', type=int, default=None, help='pool-model steps per iteration (default 16; --quick: 2)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations (default 50; --quick: 3)')
    p.add_argument('--warmup', type=int, default=None, help='untimed iterations first (default 10; --quick: 1)')
    p.add_argument('--train-size', type=int, default=None, help='random training images (default 50000; --quick: 256)')
    p.add_argument('--test-size', type=int, default=None, help='random test images (default 10000; --quick: 100)')
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads (default torch's; --quick on the CPU: 1, as a shared machine's "
                        "load makes multi-threaded kernels wait on each other)")
    p.add_argument('--matmul-n', type=int, default=None, help='peak-rate matrix size (default 8192 on CUDA, 1024 on CPU; --quick: 256)')
    return p


def fill_defaults(opts, device):
    quick = opts.quick
    defaults = dict(width=8 if quick else 196, batch_stage1=8 if quick else 128, batch_stage2=8 if quick else 64,
                    batch_eval=8 if quick else 128, pool_steps=2 if quick else 16, iters=3 if quick else 50,
                    warmup=1 if quick else 10, train_size=256 if quick else CIFAR_TRAIN,
                    check_iters=2 if quick else 5,
                    test_size=100 if quick else 10000,
                    matmul_n=256 if quick else (8192 if device.type == 'cuda' else 1024))
    defaults['pool_models'] = ['convnet'] if quick else ['convnet', 'resnet18']
    defaults['threads'] = 1 if quick and device.type == 'cpu' else torch.get_num_threads()
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.pool_models == ['all']:
        opts.pool_models = list(POOL)


def main(argv=None):
    opts = get_parser().parse_args(argv)
    device = select_device(opts.device)
    fill_defaults(opts, device)
    torch.set_num_threads(opts.threads)
    setup_backend(device)
    default_tf32()
    peak = peak_matmul(device, opts.matmul_n, reps=5 if device.type == 'cpu' else 20)
    meta = {'torch': torch.__version__, 'python': platform.python_version(), 'device': str(device),
            'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine(),
            'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'load_average': os.getloadavg(), 'quick': opts.quick, 'argv': sys.argv[1:] if argv is None else argv,
            'options': {k: v for k, v in vars(opts).items() if k != 'json'}}
    print(f"torch {torch.__version__} on {meta['device_name']} ({device}); peak {peak['dtype']} matmul "
          f"n={peak['n']}: {peak['tflops']:.3f} TFLOP/s", flush=True)
    plan = []
    if 'stage1' in opts.loops:
        plan.append(('stage1', lambda f, graphs: stage1_workload(f, opts.width, opts.batch_stage1, opts.train_size),
                     None))
    if 'stage2' in opts.loops:
        for m in opts.pool_models:
            plan.append((f'stage2_{m}', lambda f, graphs, m=m: stage2_workload(
                f, m, opts.width, opts.batch_stage2, opts.pool_steps, opts.train_size, cuda_graphs=graphs), None))
    if 'validation' in opts.loops:
        for m in opts.eval_models:
            plan.append((f'validation_{m}', lambda f, graphs, m=m: validation_workload(f, m, opts.width, opts.batch_eval),
                         validation_extra(opts, device)))
    rows, references = [], {}
    for config in opts.configs:
        if device.type != 'cuda' and config in CUDA_ONLY:
            print(f"[{config}] skipped: CUDA only")
            continue
        fast, benchmark, graphs = config_path(config, opts, device)
        setup_backend(device, benchmark=benchmark)
        opts.config_name = config
        for name, make, extra in plan:
            if config == 'cuda-graphs' and not name.startswith('stage2'):
                continue  # only stage 2's pool steps are graphed
            build = functools.partial(lambda f, make, graphs: make(f, graphs), make=make, graphs=graphs)
            if name not in references and opts.check_iters:
                plain = config_path('plain', opts, device)[0]
                setup_backend(device)
                references[name] = loss_trace(functools.partial(make, graphs='off'), plain, opts.check_iters)
                setup_backend(device, benchmark=benchmark)
            row = measure(name, build, fast, opts, peak, references.get(name), extra)
            base = row if config == 'plain' else next(
                (r for r in rows if r['loop'] == name and r['config'] == 'plain'), None)
            row['speedup_vs_plain'] = base['ms_median'] / row['ms_median'] if base else None
            rows.append(row)
            print(describe_row(row), flush=True)
    projection = project(rows)
    for config, p in projection.items():
        print(f"[{config}] default CIFAR-10 pipeline projected: stage 1 {p['stage1_h']:.2f} h + stage 2 "
              f"{p['stage2_h']:.2f} h = {p['pipeline_h']:.2f} h (pool models measured: "
              f"{' '.join(p['pool_models_measured'])})")
    result = {'meta': meta, 'peak': peak, 'results': rows, 'projection': projection}
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, 'w') as f:
            json.dump(result, f, indent=1)
        print(f"wrote {opts.json}")
    return result


if __name__ == '__main__':
    run(main)  # a bad flag combination (say --cuda-graphs on the CPU): one line, exit status 2
