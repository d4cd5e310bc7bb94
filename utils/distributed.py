"""Data-parallel training of stages 1 and 2 under torchrun (DistributedDataParallel).

    torchrun --nproc_per_node 4 gen_condense.py --data cifar10 --tag gan

Without torchrun (no WORLD_SIZE > 1 in the environment) every function here is a no-op that returns
its input, so a plain `python gen_condense.py` runs exactly as before. Under torchrun:

* `setup` joins the process group: NCCL on cuda:LOCAL_RANK, gloo on the CPU, plus a gloo "control"
  group with a long timeout for the small messages below (rank 0 may validate for a long time while
  the others wait; a NCCL collective would time out).
* `prepare` wraps G and D in DDP (`nets.G_train`, `nets.D_train`; `nets.G`/`nets.D` stay the bare
  modules, so checkpoints keep the single-process keys), optionally converts G's BatchNorm to
  SyncBatchNorm (--sync-bn), and gives every rank other than 0 its own random stream.
* `--batch-size` stays the global batch: every global batch of the single-process data order is cut
  into world_size slices, one per rank (`data.datasets.BatchStream` with `rank`, `world`), so the
  union over the ranks of an epoch is the single-process epoch.
* Only rank 0 writes (checkpoints, sample grids, logs, tensorboard: `RunLog(quiet=True)` on the others) and
  validates (`main_rank_only`); every rank gets its result. Stop signals and NaN checks are agreed
  between the ranks, so they all stop at the same iteration; logged losses are averaged over them.
* `local_main_first`: one dataset download per node.

See docs/DISTRIBUTED.md for the command lines, the multi-node setup and what is batch-size-independent.
"""
import atexit
import contextlib
import datetime
import functools
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data.datasets import local_batch_size
from data.errors import Interrupted, UserError

# minutes the ranks wait for each other on the control group (rank 0 validating, or saving)
TIMEOUT_ENV = 'DIM_DIST_TIMEOUT_MIN'
DEFAULT_TIMEOUT_MIN = 360.0

_state = {'control': None, 'vote': None}


# -- who am I --------------------------------------------------------------------------------

def launched():
    """True under torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return rank() == 0


# -- flags -----------------------------------------------------------------------------------

def add_flags(parser):
    g = parser.add_argument_group('several processes (torchrun; see docs/DISTRIBUTED.md)')
    g.add_argument('--sync-bn', action='store_true',
                   help="under torchrun on CUDA: the generator's BatchNorm uses the statistics of the "
                        "global batch (SyncBatchNorm) instead of each process's share")
    return parser


# -- setup -----------------------------------------------------------------------------------

def setup(args, device):
    """Join the process group when started by torchrun and return this rank's device; otherwise
    return `device` untouched. Checks that the global batch divides among the processes first."""
    if not launched():
        return device
    world, local = int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    local_batch_size(args.batch_size, world)
    if not dist.is_available():
        raise UserError("started by torchrun, but this build of torch has no torch.distributed")
    if getattr(args, 'sync_bn', False) and device.type != 'cuda':
        raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernels)")
    kwargs = {}
    if device.type == 'cuda':
        count = torch.cuda.device_count()
        if count > 1 and local >= count:
            raise UserError(f"LOCAL_RANK {local}, but only {count} CUDA devices are visible: start at "
                            f"most that many processes per node")
        # one visible device: the launcher gave each process its own GPU (CUDA_VISIBLE_DEVICES per rank)
        device = torch.device('cuda', local if count > 1 else 0)
        torch.cuda.set_device(device)
        backend, kwargs['device_id'] = 'nccl', device
    else:
        backend = 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend, **kwargs)  # env:// rendezvous that torchrun prepares
        atexit.register(shutdown)
    try:
        minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV} must be a number of minutes, got {os.environ[TIMEOUT_ENV]!r}") from None
    _state['control'] = dist.new_group(backend='gloo', timeout=datetime.timedelta(minutes=minutes))
    _state['vote'] = _StopVote(_state['control'])
    return device


def shutdown():
    """Leave the process group (at exit): finish the last stop vote so no rank tears down a
    collective another one is still in."""
    vote = _state.get('vote')
    if vote is not None and vote.work is not None:
        try:
            vote.work.wait(datetime.timedelta(seconds=60))
        except Exception:  # another rank is gone already: nothing left to agree on
            pass
    _state.update(control=None, vote=None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare(nets, args, iteration):
    """Make a stage's GanNets data-parallel: `nets.G_train`/`nets.D_train`, what the training steps
    call, become DDP wrappers (`nets.G`/`nets.D` stay the bare modules, so checkpoints keep the
    single-process keys), G's BatchNorm optionally synchronised, and ranks > 0 reseed."""
    if not is_dist():
        if getattr(args, 'sync_bn', False):
            print("--sync-bn: a single process has nothing to synchronise; ignored")
        return
    world = world_size()
    if getattr(args, 'compile', 'off') not in (None, 'off'):
        # not verified: double backward (the gradient penalty) through DDP around a compiled module
        raise UserError("--compile is not supported under torchrun yet; drop --compile")
    if getattr(args, 'sync_bn', False):
        nets.G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.G)  # in place: same parameters
    nets.G_train, nets.D_train = wrap(nets.G), wrap(nets.D)
    seed_rank(args.seed, iteration)
    if is_main():  # printed before the run log silences the other ranks
        print(f"data-parallel: {world} processes ({dist.get_backend()}), global batch {args.batch_size} = "
              f"{world} x {local_batch_size(args.batch_size, world)}, generator BatchNorm "
              f"{'synchronised (--sync-bn)' if getattr(args, 'sync_bn', False) else 'per process'}")


def seed_rank(seed, iteration):
    """Ranks > 0 draw their noise, fake labels, penalty mixes and augmentations from their own torch
    stream; rank 0 keeps the common one (so it also resumes exactly from its saved state). The
    iteration enters so a resumed run does not replay the noise of the start."""
    if rank() > 0:
        torch.manual_seed((seed + 1_000_003 * rank() + 7_919 * iteration) % 2**63)


# -- models ----------------------------------------------------------------------------------

class DDP(DistributedDataParallel):
    """DistributedDataParallel for the training steps, with two conveniences:

    * the wrapped model's own attributes read through (`G.num_classes`, `G.dim_noise`);
    * when no gradient can reach the parameters (under no_grad, or with every parameter frozen, as D
      is in the generator step) the bare module runs, as `D.module` would: no reducer bookkeeping for
      gradients that will not come, and no buffer broadcast (a collective) in a forward that only
      some ranks might make.

    The discriminator step runs two forwards of D before one backward (the real+fake batch, and the
    WGAN-GP interpolates whose input gradient is taken with create_graph). That is safe here: the
    inner torch.autograd.grad asks for the input gradient only, so no parameter's gradient hook fires
    inside it, and the final backward fires each hook once with the sum of both paths;
    tests/test_distributed.py checks D's gradients against a single process.
    """

    def forward(self, *inputs, **kwargs):
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.module.parameters()):
            return self.module(*inputs, **kwargs)
        return super().forward(*inputs, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get('_modules', {}).get('module')
            if module is None or name.startswith('_'):
                raise
            return getattr(module, name)


def wrap(model):
    """`model` itself in a single process; under torchrun a DDP wrapper around it (same parameters,
    so optimizers built on `model` keep working; rank 0's weights are broadcast at wrap time)."""
    if not is_dist():
        return model
    device = next(model.parameters()).device
    if device.type == 'cuda':
        return DDP(model, device_ids=[device.index], output_device=device.index)
    return DDP(model)


# -- agreement between ranks -----------------------------------------------------------------

@contextlib.contextmanager
def local_main_first():
    """Local rank 0 of every node runs the block first (a dataset download, a statistics cache), the
    other processes of the node after it, so they do not write the same files at once."""
    if not is_dist():
        yield
        return
    first = int(os.environ.get('LOCAL_RANK', 0)) == 0
    if not first:
        dist.barrier(group=_state['control'])
    yield
    if first:
        dist.barrier(group=_state['control'])


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank (e.g. stage 2's pool model of the epoch)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_state['control'])
    return box[0]


def main_rank_only(method):
    """Decorator for a GanRun method only rank 0 runs (validation): the other ranks wait for it and
    return its result. If a stop signal interrupts it on rank 0, every rank raises Interrupted."""

    @functools.wraps(method)
    def wrapper(run, *args, **kwargs):
        if not is_dist():
            return method(run, *args, **kwargs)
        outcome = None
        if is_main():
            try:
                outcome = ('ok', method(run, *args, **kwargs))
            except Interrupted:
                outcome = ('interrupted', run.stop_signal)
            except BaseException as e:  # tell the waiting ranks, then fail here as before
                broadcast_object(('failed', f'{type(e).__name__}: {e}'))
                raise
        outcome = broadcast_object(outcome)
        kind, value = outcome
        if kind == 'interrupted':
            if run.stop_signal is None:
                run.stop_signal = value
            raise Interrupted
        if kind == 'failed':
            raise RuntimeError(f"rank 0 failed in {method.__name__}: {value}")
        return value

    return wrapper


class _StopVote:
    """Agree on stopping without blocking every iteration: each iteration starts an asynchronous
    all-reduce (max) of this rank's signal number and reads the previous iteration's result, so all
    ranks stop at the same iteration, one iteration after the first signal arrived anywhere."""

    def __init__(self, group):
        self.group, self.work, self.flag, self.agreed = group, None, None, 0

    def __call__(self, signum):
        if self.work is not None:
            self.work.wait()
            self.work, self.agreed = None, int(self.flag.item())
        if not self.agreed:
            self.flag = torch.tensor([int(signum or 0)], dtype=torch.int64)
            self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return self.agreed  # once agreed, it stays so


def stop_requested(run):
    """`run.stop_requested()`, agreed between the ranks (all call it once per iteration). A rank that
    got no signal itself takes the signal number another rank got."""
    if not is_dist():
        return run.stop_requested()
    agreed = _state['vote'](run.stop_signal)
    if agreed and run.stop_signal is None:
        run.stop_signal = agreed
    return bool(agreed)


def mean_over_ranks(values):
    """{name: float} averaged over the ranks, so printed and logged losses are those of the global
    batch (every logged metric is a mean over the samples of a rank's equal share)."""
    if not is_dist() or not values:
        return values
    keys = list(values)  # the same order on every rank: the same code filled it
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=_state['control'])
    return dict(zip(keys, (t / world_size()).tolist()))


def first_bad_step(bad_step):
    """The earliest iteration with a non-finite loss on any rank (-1: none), so every rank stops
    together on NaN (one host sync, as the single-process check has)."""
    step = int(bad_step)
    if not is_dist():
        return step
    none = 2**62
    t = torch.tensor([step if step >= 0 else none], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_state['control'])
    return -1 if int(t) == none else int(t)
