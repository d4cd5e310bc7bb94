"""The fast path computes what the plain path computes.

Every loop (stage 1 GAN iteration, stage 2 iteration with a pool model, validation classifier step) runs
a few fp32 iterations through the plain path (contiguous, per-parameter optimizer loop, no compile) and
through the fast path (channels-last, foreach or fused optimizers, torch.compile) from the same seed,
and the losses and parameters must agree. Mixed precision: the gradient penalty's double backward under
bf16 and fp16 (with loss scaling), GradScaler steps, and an overflow that must skip a step, not stop a run.
All on the CPU at tiny sizes; the workloads are misc/benchmark.py's, which call the real step functions.
DIM_TEST_DEVICE=cuda runs the path comparisons on a GPU instead (TF32 off, deterministic cuDNN); the
mixed-precision tests stay on the CPU.
"""
import argparse
import copy
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from data.datasets import BatchStream
from misc.benchmark import DispatchCounter, random_split, stage1_workload, stage2_workload, validation_workload
from models import Discriminator
from gen_condense import discriminator_step, generator_step, gradient_penalty
from data.datasets import _CHANNEL_CONSTANTS, normalize
from utils.cli import stage_parser
from utils.evaluate import classifier_step
from data.errors import UserError
from utils.runtime import (FastPath, autocast, concrete_device, cpu_fp16_supported, load_optimizer_state,
                           make_scaler, resolve_amp, same_device, select_device, setup_backend)

CPU = torch.device('cpu')
DEVICE = torch.device(os.environ.get('DIM_TEST_DEVICE', 'cpu'))
PLAIN = FastPath.plain(DEVICE)
FAST = {
    'foreach': FastPath(DEVICE, optim_impl='foreach'),
    'fused': FastPath(DEVICE, optim_impl='fused'),
    'channels_last+fused': FastPath(DEVICE, channels_last=True, optim_impl='fused'),
}
ITERS = 3
WIDTH, BATCH, TRAIN = 8, 8, 64
ADAM_EPS = 1e-3
needs_fp16 = pytest.mark.skipif(not cpu_fp16_supported(), reason='this torch has no CPU fp16 autocast/GradScaler')


@pytest.fixture(autouse=True)
def one_thread():
    # a shared 2-core machine: multi-threaded kernels mostly wait on each other there
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope='module')
def exact_gpu():
    """On a GPU: fp32 without TF32, deterministic cuDNN, so two correct paths agree to fp32 rounding."""
    if DEVICE.type != 'cuda':
        yield
        return
    from utils.runtime import allow_tf32, default_tf32
    setup_backend(DEVICE)
    allow_tf32(False)
    yield
    default_tf32()


@pytest.fixture
def well_conditioned(monkeypatch):
    """Make fp32 trajectories comparable elementwise, without touching the code under test.

    Two properties of the model, not of any implementation, make two correct fp32 runs drift apart:
    - a ReLU / LeakyReLU input that rounding moves across 0 switches that unit's derivative: one such
      flip changed a ConvNet gradient by 1e-3 (relative, elementwise) and the gradient penalty of a
      width-8 critic by 2e-4;
    - Adam with eps 1e-8 steps by about lr * sign(gradient): biases followed by BatchNorm have an
      exactly zero gradient, so their rounding noise becomes steps of +-lr (seen: 5e-4 apart after 3).
    So these tests use smooth activations (softplus with beta 20) and Adam eps 1e-3 (its update is then
    linear in small gradients). The kernels and code paths are the same; the comparisons get tight:
    observed differences beyond rtol 1e-4 stay under 2e-6, where the tolerance allows atol 1e-5.
    """
    softplus = F.softplus
    monkeypatch.setattr(F, 'relu', lambda x, inplace=False: softplus(x, beta=20))
    monkeypatch.setattr(F, 'leaky_relu', lambda x, negative_slope=0.01, inplace=False:
                        negative_slope * x + (1 - negative_slope) * softplus(x, beta=20))


WORKLOADS = {
    'stage1': lambda fast: stage1_workload(fast, WIDTH, BATCH, TRAIN),
    'stage2_convnet': lambda fast: stage2_workload(fast, 'convnet', WIDTH, BATCH, pool_steps=2, train_size=TRAIN),
    'stage2_resnet10': lambda fast: stage2_workload(fast, 'resnet10', WIDTH, BATCH, pool_steps=2, train_size=TRAIN),
    'validation_convnet': lambda fast: validation_workload(fast, 'convnet', WIDTH, BATCH),
}


def build(loop, fast, adam_eps=ADAM_EPS):
    """`loop`: a WORKLOADS name, or a function of the fast path that builds a workload."""
    work = (WORKLOADS[loop] if isinstance(loop, str) else loop)(fast)  # seeds itself before building
    nets = getattr(work, 'nets', None)
    if nets is not None and adam_eps is not None:
        for opt in (nets.opt_g, nets.opt_d):
            for group in opt.param_groups:
                group['eps'] = adam_eps
    return work


def run(loop, fast, iters=ITERS, adam_eps=ADAM_EPS):
    """Losses of `iters` iterations and the final state of every module, from fixed seeds."""
    work = build(loop, fast, adam_eps)
    torch.manual_seed(1)
    losses = [{k: float(v) for k, v in work.step().items()} for _ in range(iters)]
    state = {f'{name}.{k}': v.detach().contiguous().clone()
             for name, module in work.modules.items() for k, v in module.state_dict().items()}
    return losses, state


def assert_same_run(a, b, rtol=1e-4, atol=1e-5):
    (losses_a, state_a), (losses_b, state_b) = a, b
    assert len(losses_a) == len(losses_b)
    for i, (la, lb) in enumerate(zip(losses_a, losses_b)):
        assert la.keys() == lb.keys()
        for k in la:
            assert lb[k] == pytest.approx(la[k], rel=rtol, abs=atol), f'iteration {i}: {k}'
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], rtol=rtol, atol=atol, msg=lambda m: f'{k}: {m}')


@pytest.fixture(scope='module')
def plain_runs():
    return {}


def plain_run(cache, loop):
    if loop not in cache:
        cache[loop] = run(loop, PLAIN)
    return cache[loop]


@pytest.mark.parametrize('fast', list(FAST))
@pytest.mark.parametrize('loop', list(WORKLOADS))
def test_fast_path_matches_plain(loop, fast, plain_runs, well_conditioned):
    assert_same_run(plain_run(plain_runs, loop), run(loop, FAST[fast]))
    # and the fast run really used the fast layout and kernels
    work = build(loop, FAST[fast])
    convs = [m.weight for mod in work.modules.values() for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = torch.channels_last if FAST[fast].channels_last else torch.contiguous_format
    assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)
    opts = [work.nets.opt_g, work.nets.opt_d] if hasattr(work, 'nets') else []
    for opt in opts:
        assert bool(opt.defaults.get('fused')) == (FAST[fast].optim_impl == 'fused')


@pytest.mark.parametrize('loop', ['stage1', 'validation_convnet'])
def test_compiled_matches_plain(loop, plain_runs, well_conditioned):
    # torch.compile's graph capture and autograd, with the aot_eager backend: inductor's C++ build
    # takes minutes on this CPU (misc/benchmark.py --compile runs inductor on a GPU). The gradient
    # penalty runs the eager critic: double backward through compiled graphs is refused.
    torch._dynamo.reset()
    try:
        fast = replace(FAST['channels_last+fused'], compile='default', compile_backend='aot_eager')
        assert_same_run(plain_run(plain_runs, loop), run(loop, fast))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize('loop', list(WORKLOADS))
def test_real_model_first_losses_match(loop):
    # Without the conditioning: what is computed before any parameter changed must agree tightly.
    first = {'stage1': 'loss_g', 'stage2_convnet': 'loss_g', 'stage2_resnet10': 'loss_g',
             'validation_convnet': 'loss'}[loop]
    (plain,), _ = run(loop, PLAIN, iters=1, adam_eps=None)
    (fast,), _ = run(loop, FAST['channels_last+fused'], iters=1, adam_eps=None)
    assert fast[first] == pytest.approx(plain[first], rel=1e-5)
    if 'loss_match' in plain:
        assert fast['loss_match'] == pytest.approx(plain['loss_match'], rel=1e-3, abs=1e-7)


@pytest.mark.skipif(DEVICE.type != 'cuda', reason='CUDA graphs need a GPU (DIM_TEST_DEVICE=cuda)')
@pytest.mark.parametrize('model', ['convnet', 'resnet10'])
def test_cuda_graphs_match_eager(model, well_conditioned):
    # 6 iterations: 3 eager warm-ups of the pool steps, the capture (replayed at once), 2 replays
    def workload(graphs):
        return lambda fast: stage2_workload(fast, model, WIDTH, BATCH, pool_steps=2, train_size=TRAIN,
                                            cuda_graphs=graphs)
    fast = FAST['channels_last+fused']
    assert_same_run(run(workload('off'), fast, iters=6), run(workload('on'), fast, iters=6))
    work = build(workload('on'), fast)
    for _ in range(4):
        work.step()
    assert work.pool.train_steps.graph is not None  # the last steps were replays


# ---------------------------------------------------------------------------------------------------
# no host round trips on the hot path

@pytest.mark.parametrize('loop', list(WORKLOADS))
@pytest.mark.parametrize('fast', [PLAIN, FAST['channels_last+fused']], ids=['plain', 'fast'])
def test_no_host_reads_in_an_iteration(loop, fast):
    work = WORKLOADS[loop](fast)
    work.step()
    with DispatchCounter() as counter:
        work.step()
    # F.one_hot checks its labels with .item() on the CPU only (on CUDA a device assert does it)
    allowed = {('_local_scalar_dense', 'conditional_noise')}
    assert set(counter.host_reads) <= allowed, dict(counter.host_reads)
    assert counter.ops > 100


# ---------------------------------------------------------------------------------------------------
# mixed precision: the gradient penalty's double backward, loss scaling, overflow

def _gan(width=8, seed=0):
    torch.manual_seed(seed)
    D = Discriminator(10, 3, 32, width=width)
    real = torch.rand(6, 3, 32, 32) * 2 - 1
    return D, real


def test_gradient_penalty_scale_leaves_the_value_unchanged():
    D, real = _gan()
    fake = torch.rand_like(real) * 2 - 1
    alpha = torch.rand(len(real))
    plain = gradient_penalty(lambda x: D(x)[0], real, fake, alpha=alpha)
    scaled = gradient_penalty(lambda x: D(x)[0], real, fake, alpha=alpha, grad_scale=torch.tensor(1024.0))
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)
    g_plain = torch.autograd.grad(plain, list(D.parameters()), allow_unused=True)
    g_scaled = torch.autograd.grad(scaled, list(D.parameters()), allow_unused=True)
    for a, b in zip(g_plain, g_scaled):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _d_step(amp, scaler, gp_amp=False, seed=0):
    from models import Generator
    torch.manual_seed(seed)
    G, D = Generator(10, 3, 32, width=8), Discriminator(10, 3, 32, width=8)
    opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.9), fused=True)
    real, labels = torch.rand(6, 3, 32, 32) * 2 - 1, torch.randint(10, (6,))
    before = [p.detach().clone() for p in D.parameters()]
    torch.manual_seed(seed + 1)
    out = discriminator_step(G, D, opt, real, labels, autocast(amp, CPU), scaler, gp_amp=gp_amp)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(D.parameters(), before))
    return {k: float(v) for k, v in out.items()}, moved


@pytest.mark.parametrize('gp_amp', [False, True], ids=['gp_fp32', 'gp_amp'])
@pytest.mark.parametrize('amp', ['bf16', pytest.param('fp16', marks=needs_fp16)])
def test_discriminator_step_double_backward_under_amp(amp, gp_amp):
    ref, moved_ref = _d_step('off', make_scaler('off', CPU))
    scaler = make_scaler(amp, CPU)
    assert scaler.is_enabled() == (amp == 'fp16')
    if scaler.is_enabled():  # a scale this tiny critic does not overflow at once (see the overflow test)
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    out, moved = _d_step(amp, scaler, gp_amp)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values()), out
    assert out.get('skipped_d', 0.0) == 0.0
    assert moved > 0 and moved == pytest.approx(moved_ref, rel=0.2)  # Adam's first step: ~lr per weight
    # Loose: the fakes come from a half-precision generator, and this width-8 critic's input gradient
    # jumps wherever a LeakyReLU input changes sign, so its penalty moved by up to 13% here. The
    # precision of the penalty itself is checked at width 196 in the notes of gen_condense.py and
    # by the fp16 scaling test below.
    for k in ('loss_d', 'gp'):
        assert out[k] == pytest.approx(ref[k], rel=0.25), k
    assert out['wasserstein'] == pytest.approx(ref['wasserstein'], rel=0.1, abs=5e-3)


@needs_fp16
def test_fp16_gradient_penalty_needs_and_gets_loss_scaling():
    # a critic whose input gradients are ~1e-8 per pixel: below fp16's range, so unscaled they flush
    # to zero and the penalty's gradient with them; scaled by 2^16 they survive
    D, real = _gan()
    fake = torch.rand_like(real) * 2 - 1
    alpha = torch.rand(len(real))
    params = [p for name, p in D.named_parameters() if not name.startswith('classifier')]

    def critic(x):
        return D(x)[0].float() * 1e-6

    def penalty_grads(amp, grad_scale=None):
        with torch.autocast('cpu', dtype=torch.float16, enabled=amp):
            gp = gradient_penalty(critic, real, fake, alpha=alpha, grad_scale=grad_scale)
        # the outer loss scaling GradScaler does: scaled backward, unscaled gradients
        outer = 2.0 ** 16 if amp else 1.0
        grads = torch.autograd.grad(gp * outer, params, allow_unused=True)  # the critic head's bias has none
        return torch.cat([g.flatten() for g in grads if g is not None]) / outer

    ref = penalty_grads(False)
    raw = penalty_grads(True)
    scaled = penalty_grads(True, torch.tensor(2.0 ** 16))
    assert ref.norm() > 0
    # unscaled, the input gradients underflow to 0: norm 0, and the penalty's gradient is NaN (0/0)
    assert not torch.isfinite(raw).all() or (raw - ref).norm() / ref.norm() > 0.5
    assert (scaled - ref).norm() / ref.norm() < 0.05  # the scaled recipe keeps it


@needs_fp16
def test_fp16_overflow_skips_the_step_without_a_nonfinite_loss():
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 60)  # the scaled input gradient overflows fp16
    out, moved = _d_step('fp16', scaler, gp_amp=True)
    assert out['skipped_d'] == 1.0 and moved == 0.0
    assert out['gp'] == 0.0 and torch.isfinite(torch.tensor(out['loss_d']))
    assert scaler.get_scale() == 2.0 ** 59


@needs_fp16
def test_fp16_generator_and_classifier_steps_with_scaler():
    from models import Generator, create_model
    for amp in ('off', 'fp16'):
        torch.manual_seed(0)
        G, D = Generator(10, 3, 32, width=8), Discriminator(10, 3, 32, width=8)
        opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.9), fused=True)
        model = create_model('convnet', 10, 3, 32)
        opt_c = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        scaler_g, scaler_c = make_scaler(amp, CPU), make_scaler(amp, CPU)
        if amp == 'fp16':  # a scale this tiny generator does not overflow at once
            scaler_g = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
        labels = torch.randint(10, (6,))
        out = generator_step(G, D, opt_g, labels, autocast(amp, CPU), scaler_g)
        loss_c = classifier_step(model, opt_c, torch.randn(6, 3, 32, 32), labels, autocast(amp, CPU), scaler_c)
        if amp == 'off':
            ref_g, ref_c = float(out['loss_g']), float(loss_c)
            assert 'skipped_g' not in out
        else:
            assert float(out['skipped_g']) == 0.0
            assert float(out['loss_g']) == pytest.approx(ref_g, rel=1e-2)
            assert float(loss_c) == pytest.approx(ref_c, rel=1e-2)


def test_defaults_are_the_plain_fp32_path_on_every_device():
    """The official command on CUDA computes what the official code computes: fp32, contiguous tensors,
    torch's default optimizer kernels, no compile (a first GPU run found bf16 + channels-last + fused
    on by default there)."""
    cuda = torch.device('cuda')  # only resolved, never used
    args = stage_parser('x', 8, 1, 1e-4).parse_args([])
    assert (args.amp, args.channels_last, args.compile, args.optim_impl, args.cudnn_benchmark) == \
        ('off', 'off', 'off', 'default', False)
    for device in (CPU, cuda):
        fast = FastPath.from_args(args, device)
        assert fast == FastPath.plain(device)
        assert (fast.amp, fast.channels_last, fast.compile, fast.optim_impl) == ('off', False, 'off', 'default')
        assert fast.optimizer_kwargs(torch.optim.Adam) == {}  # torch's own choice, as the official code
    # runs saved when 'auto' was the default resolve to the plain path too
    legacy = argparse.Namespace(amp='auto', channels_last='auto', compile='off', optim_impl='auto')
    assert FastPath.from_args(legacy, cuda) == FastPath.plain(cuda)


def test_switches_resolve_as_asked():
    cuda = torch.device('cuda')
    assert resolve_amp('bf16', cuda) == 'bf16' and resolve_amp('off', cuda) == 'off'
    if cpu_fp16_supported():
        assert resolve_amp('fp16', CPU) == 'fp16'
    args = stage_parser('x', 8, 1, 1e-4).parse_args(['--compile', '--channels-last', 'on', '--optim-impl', 'for-loop',
                                                     '--amp', 'bf16'])
    f = FastPath.from_args(args, cuda)
    assert (f.amp, f.compile, f.channels_last, f.optim_impl) == ('bf16', 'default', True, 'for-loop')
    assert f.optimizer_kwargs(torch.optim.Adam) == {'foreach': False}
    assert FastPath(cuda, optim_impl='fused').optimizer_kwargs(torch.optim.SGD) == {'fused': True}
    assert FastPath(CPU, optim_impl='foreach').optimizer_kwargs(torch.optim.SGD) == {'foreach': True}
    with pytest.raises(UserError, match='--cudnn-benchmark'):
        setup_backend(CPU, deterministic=True, benchmark=True)


def test_devices_compare_by_what_they_are():
    assert same_device('cuda', torch.device('cuda', 0)) and same_device(torch.device('cuda'), 'cuda:0')
    assert not same_device('cuda:1', 'cuda') and not same_device('cpu', 'cuda')
    assert concrete_device('cuda') == torch.device('cuda', 0) and concrete_device('cpu') == CPU
    assert select_device('cpu') == CPU


# ---------------------------------------------------------------------------------------------------
# optimizer state across implementations and layouts; device-side batches; cached constants

def _conv_net():
    torch.manual_seed(0)
    # no conv bias before the BatchNorm: its gradient would be rounding noise, which Adam turns into +-lr
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


@pytest.mark.parametrize('opt_cls,kwargs', [(torch.optim.Adam, dict(lr=1e-2, betas=(0.0, 0.9))),
                                            (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=5e-4))])
@pytest.mark.parametrize('direction', ['plain_to_fast', 'fast_to_plain'])
def test_optimizer_state_moves_between_implementations(opt_cls, kwargs, direction):
    x = torch.randn(4, 3, 8, 8)
    paths = [FastPath.plain(CPU), FastPath(CPU, channels_last=True, optim_impl='fused')]
    src_path, dst_path = paths if direction == 'plain_to_fast' else paths[::-1]

    def make(path):
        net = _conv_net()
        net(x)  # materialise the lazy layer
        net = path.prepare(net)
        return net, opt_cls(net.parameters(), **kwargs, **path.optimizer_kwargs(opt_cls))

    def step(net, opt):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    src, src_opt = make(src_path)
    for _ in range(2):
        step(src, src_opt)
    dst, dst_opt = make(dst_path)
    dst.load_state_dict(src.state_dict())
    # deepcopy: as from a checkpoint (a live state dict would share its buffers with src_opt)
    load_optimizer_state(dst_opt, copy.deepcopy(src_opt.state_dict()))
    group = dst_opt.param_groups[0]
    assert group.get('fused') == dst_opt.defaults.get('fused') and group.get('foreach') == dst_opt.defaults.get('foreach')
    for p in group['params']:
        for key, value in dst_opt.state[p].items():
            if key == 'step':
                assert value.device.type == 'cpu' and value.dtype == torch.float32
            elif value.shape == p.shape:
                assert value.stride() == p.stride(), key
    step(src, src_opt)
    step(dst, dst_opt)
    for a, b in zip(src.parameters(), dst.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_pool_batches_are_disjoint_batches_of_one_pass_drawn_on_the_device():
    split = random_split(40)
    stream = BatchStream(split, 8, CPU, torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    batches = list(stream.first_batches(4))
    torch.manual_seed(3)
    again = list(stream.first_batches(4))
    assert len(batches) == 4
    flat = split.images.flatten(1)
    seen = []
    for (images, labels), (images2, _) in zip(batches, again):
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (8,)
        assert torch.equal(images, images2)  # reproducible from torch's RNG
        # match each image back to its index in the split
        idx = [int((flat == img.flatten()).all(1).nonzero()[0]) for img in images]
        assert torch.equal(labels, split.labels[idx])
        seen += idx
    assert len(set(seen)) == 32  # no image twice across the 4 batches: one pass, as the official loader
    assert len(list(stream.first_batches(16))) == 5  # a drop-last pass of 40 images has 5 batches of 8


def test_normalize_reuses_its_device_constants():
    x = torch.rand(2, 3, 4, 4)
    with torch.inference_mode():
        normalize(torch.rand(2, 3, 4, 4), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    made = dict(_CHANNEL_CONSTANTS)
    x.requires_grad_(True)
    y = normalize(x, [0.1, 0.2, 0.3], [0.5, 0.6, 0.7])  # a list: same constants as the tuple
    assert _CHANNEL_CONSTANTS.keys() == made.keys()  # none made anew
    assert all(a is b for key in made for a, b in zip(made[key], _CHANNEL_CONSTANTS[key]))
    y.sum().backward()  # the constants were not made in inference mode, so autograd can save them
    torch.testing.assert_close(x.grad, (1 / torch.tensor([0.5, 0.6, 0.7])).view(1, 3, 1, 1).expand_as(x))
    torch.testing.assert_close(y, (x - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(3, 1, 1))
