"""Device, precision, seeding and random-number-generator state, and the fast path: what every stage
sets up the same way.

The fast path (`FastPath`) changes how the work runs: the memory format of conv weights
(channels-last), the optimizer kernels (fused / foreach / per-parameter loop), torch.compile of the
modules, mixed precision and loss scaling for fp16. Each stage builds one from its flags
(`FastPath.from_args`) and asks it for modules, optimizers, scalers and compiled callables.

Every switch is off by default, on every device: the default is the plain fp32 path the official code
computes (its cuDNN settings, torch's default optimizer kernels, contiguous tensors, no compile). A
switch becomes a default only once a test shows it computes the same and a GPU measurement shows it
faster (docs/PERFORMANCE.md has the measurements and what each switch changes in the numerics).
"""
import contextlib
import functools
import inspect
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

from data.errors import UserError

AMP_CHOICES = ('off', 'bf16', 'fp16')
# torch.compile modes offered: no CUDA-graph mode ('reduce-overhead') -- the step functions keep tensors
# across calls in ways CUDA-graph trees do not promise to support, and it is not verified here
COMPILE_MODES = ('off', 'default', 'max-autotune-no-cudagraphs')
# 'default': torch's own choice (foreach on CUDA, a per-parameter loop on the CPU), as the official code
OPTIM_IMPLS = ('default', 'fused', 'foreach', 'for-loop')
SWITCH = ('off', 'on')


def select_device(name='auto'):
    """'auto' takes CUDA when present (CUDA_VISIBLE_DEVICES decides which GPU), else the CPU. A CUDA
    device comes back with its index (cuda:0, not cuda), so it compares equal to its tensors' device."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type != 'cuda':
        return device
    if not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device "
                        "(check CUDA_VISIBLE_DEVICES and that the CUDA build of torch is installed)")
    return concrete_device(device)


def concrete_device(device):
    """`device` with its index filled in. torch.device('cuda') means "the current GPU" and has no index,
    while every CUDA tensor reports cuda:N, and torch compares the two as different devices."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def same_device(a, b):
    """Whether two device names or objects are the same device ('cuda' and 'cuda:0' are, on one GPU)."""
    return concrete_device(a) == concrete_device(b)


def hardware(device):
    """What computed a result, finer than the device type: the GPU's name, or the CPU's model and the
    instruction set torch's CPU kernels use. The same run on a CPU with another instruction set rounds
    differently (forcing AVX2 on an AVX-512 machine changes a stage-1 run's weights), so bit-identical
    reruns need the same kind of CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    except OSError:
        pass
    return f"{model}, {torch.backends.cpu.get_cpu_capability()} kernels"


def setup_backend(device, deterministic=False, benchmark=False):
    """cuDNN as the official code sets it: deterministic algorithms, no autotuning, and torch's default
    TF32 behaviour left alone (convolutions may use TF32, matrix products are full fp32), which is the
    precision the official runs had. `benchmark` (--cudnn-benchmark) lets cuDNN time and pick the
    fastest algorithms instead: the same fp32 arithmetic, other summation orders, not reproducible
    run to run. `deterministic` refuses that."""
    if benchmark and deterministic:
        raise UserError("--cudnn-benchmark picks algorithms by timing them, which is not reproducible: "
                        "drop it or --deterministic")
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = not benchmark


def allow_tf32(on):
    """TF32 for float32 convolutions and matrix products (on), or full fp32 for both (off). Not a flag:
    the GPU tests switch it off to compare two paths at fp32 rounding, and the benchmark restores
    torch's defaults with `default_tf32`."""
    # torch >= 2.9 spells it fp32_precision ('tf32' / 'ieee'); allow_tf32 is the older spelling, which
    # newer releases plan to retire. Mixing the two spellings is refused by some versions: use one.
    matmul, cudnn_conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, 'conv', None)
    if hasattr(matmul, 'fp32_precision') and hasattr(cudnn_conv, 'fp32_precision'):
        value = 'tf32' if on else 'ieee'
        matmul.fp32_precision = value
        cudnn_conv.fp32_precision = value
    else:
        matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def default_tf32():
    """torch's defaults, which the official runs had: TF32 convolutions, full-fp32 matrix products."""
    allow_tf32(False)
    conv = getattr(torch.backends.cudnn, 'conv', None)
    if hasattr(torch.backends.cuda.matmul, 'fp32_precision') and hasattr(conv, 'fp32_precision'):
        conv.fp32_precision = 'tf32'
    else:
        torch.backends.cudnn.allow_tf32 = True


@functools.lru_cache(maxsize=None)
def cpu_fp16_supported():
    """Whether this torch autocasts to float16 on the CPU and has a CPU GradScaler (torch >= 2.3/2.4)."""
    if not hasattr(torch.amp, 'GradScaler'):
        return False
    try:
        with torch.autocast('cpu', dtype=torch.float16):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        return out.dtype == torch.float16
    except (RuntimeError, TypeError, ValueError):
        return False


def resolve_amp(amp, device):
    """--amp as given: 'off' (fp32, the default everywhere), 'bf16' or 'fp16'; runs saved before fp32
    became the default may say 'auto', which now means fp32 too. fp16 on the CPU is allowed where torch
    supports it (slow: meant for testing the fp16 path)."""
    if amp in (None, 'auto'):
        return 'off'
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == 'fp16' and device.type != 'cuda' and not (device.type == 'cpu' and cpu_fp16_supported()):
        raise UserError(f"--amp fp16 is not supported on {device.type} by torch {torch.__version__}; "
                        "use --amp bf16 or off")
    return amp


def autocast(amp, device, cache=True):
    """The context every forward pass runs in: autocast for bf16/fp16, nothing for fp32.
    (torch.autocast objects keep state on enter: reuse one only sequentially, never nested.)
    `cache=False` for code captured in a CUDA graph, as torch asks; each weight is cast once per
    forward either way, so the results are the same."""
    if amp == 'off':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def make_scaler(amp, device):
    """The loss scaler of one optimizer: dynamic scaling for fp16 (its range is too small for raw
    gradients); for bf16 and fp32 a disabled one, whose scale/step/update are the plain backward and
    step. One per optimizer, so a step skipped for one network does not back off the other's scale.

    With fp16 the scaler skips the step (and halves the scale) when a gradient overflowed. A fused
    optimizer takes the overflow flag on the device; any other makes scaler.step wait for it (.item())."""
    return torch.amp.GradScaler(device.type, enabled=amp == 'fp16')


# ---------------------------------------------------------------------------------------------------
# the fast path

def resolve_switch(value, flag):
    """'on' / 'off' (or a boolean); 'auto' from runs saved before every switch defaulted to off is off."""
    if isinstance(value, bool):
        return value
    if value in (None, 'auto'):
        return False
    if value not in SWITCH:
        raise UserError(f"{flag} must be one of {', '.join(SWITCH)}, got {value!r}")
    return value == 'on'


def _has_kwarg(cls, name):
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def resolve_optim_impl(impl):
    """'default' (torch's choice, as the official code), 'fused' (one launch for all parameters, and no
    host sync under fp16 loss scaling), 'foreach' (a few multi-tensor launches) or 'for-loop'; 'auto'
    from older runs is 'default'."""
    if impl in (None, 'auto'):
        return 'default'
    if impl not in OPTIM_IMPLS:
        raise UserError(f"--optim-impl must be one of {', '.join(OPTIM_IMPLS)}, got {impl!r}")
    return impl


def eager(module):
    """The plain module behind a torch.compile wrapper (the same parameters). Double backward -- the
    gradient penalty -- is not supported through compiled graphs, so it runs the eager module."""
    return getattr(module, '_orig_mod', module)


@dataclass(frozen=True)
class FastPath:
    device: torch.device
    amp: str = 'off'               # resolved: bf16 / fp16 / off
    channels_last: bool = False    # conv weights (and so conv activations) in NHWC
    compile: str = 'off'           # torch.compile mode, or 'off'
    optim_impl: str = 'default'    # default (torch's choice) / fused / foreach / for-loop
    gp_amp: bool = False           # the gradient penalty under `amp` too (else fp32, as the reference)
    compile_backend: str = 'inductor'

    @classmethod
    def from_args(cls, args, device, **overrides):
        """From a stage's flags (--amp, --channels-last, --compile, --optim-impl, --gp-amp); flags
        missing from an old checkpoint's args take their defaults."""
        compile_mode = getattr(args, 'compile', 'off') or 'off'
        if compile_mode not in COMPILE_MODES:
            raise UserError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        fields = dict(amp=resolve_amp(getattr(args, 'amp', 'off'), device),
                      channels_last=resolve_switch(getattr(args, 'channels_last', 'off'), '--channels-last'),
                      compile=compile_mode,
                      optim_impl=resolve_optim_impl(getattr(args, 'optim_impl', 'default')),
                      gp_amp=bool(getattr(args, 'gp_amp', False)))
        fields.update(overrides)
        return cls(device, **fields)

    @classmethod
    def plain(cls, device, amp='off'):
        """The reference's way: contiguous tensors, torch's default optimizer kernels, no compilation."""
        return cls(device, amp=amp)

    def describe(self):
        gp = self.amp if self.gp_amp and self.amp != 'off' else 'fp32'
        return (f"amp {self.amp} (gradient penalty {gp}), channels-last {'on' if self.channels_last else 'off'}, "
                f"optimizer {self.optim_impl}, compile {self.compile}")

    def ctx(self, cache=True):
        return autocast(self.amp, self.device, cache)

    def scaler(self):
        return make_scaler(self.amp, self.device)

    def prepare(self, module):
        """Move a module to the device, in channels-last when asked. Do it before its optimizer is
        built, so the optimizer's state is created in the parameters' layout."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)  # 4-D parameters only
        return module

    def compiled(self, module):
        """A torch.compile wrapper of `module` sharing its parameters, or the module itself."""
        if self.compile == 'off':
            return module
        mode = None if self.compile == 'default' else self.compile
        return torch.compile(module, mode=mode, backend=self.compile_backend)

    def optimizer_kwargs(self, cls):
        """Keyword arguments choosing the optimizer implementation (fused falls back to foreach where
        this torch's `cls` has no fused kernel)."""
        if self.optim_impl == 'fused' and _has_kwarg(cls, 'fused'):
            return {'fused': True}
        if self.optim_impl == 'for-loop':
            return {'foreach': False}
        if self.optim_impl == 'default':
            return {}
        return {'foreach': True}


def load_optimizer_state(opt, state):
    """opt.load_state_dict(state), keeping the implementation `opt` was built with.

    A state dict carries its writer's `fused`/`foreach` choice, its 'step' counters on the writer's
    device and its buffers in the writer's memory format. Restore this optimizer's own choice, put
    'step' where that implementation wants it (fused: the parameter's device; otherwise the CPU, where
    reading it costs no sync), and give every buffer its parameter's layout: multi-tensor kernels walk
    parameters and buffers as flat memory, so the layouts must agree.
    """
    impl = [{k: g[k] for k in ('fused', 'foreach') if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, keep in zip(opt.param_groups, impl):
        group.update(keep)
        for p in group['params']:
            st = opt.state.get(p)
            if not st:
                continue
            for key, value in list(st.items()):
                if not torch.is_tensor(value):
                    continue
                if key == 'step':
                    on_device = group.get('fused') or group.get('capturable')
                    st[key] = value.to(device=p.device if on_device else 'cpu', dtype=torch.float32)
                elif value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


# ---------------------------------------------------------------------------------------------------
# seeds and RNG state

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """Every random-number generator a stage draws from, for exact resume."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
