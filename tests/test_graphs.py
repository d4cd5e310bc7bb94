"""--cuda-graphs (stage 2's pool steps replayed from a CUDA graph): the bookkeeping of GraphedStep and the
refusals run on the CPU; tests/test_fastpath.py::test_cuda_graphs_match_eager compares replays with eager
steps on a GPU (DIM_TEST_DEVICE=cuda)."""
import contextlib

import pytest
import torch

from utils.augment import DiffAug
from data.errors import UserError
from utils.graphs import GraphedStep, capture_problem

CUDA, CPU = torch.device('cuda'), torch.device('cpu')


class FakeGraph:
    """Records what a capture ran, without running it (as CUDA capture records kernels); replay runs it."""

    def __init__(self, log):
        self.log, self.recorded = log, None

    def replay(self):
        self.log.append('replay')
        self.recorded()


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's graph and stream API replaced by recorders, so GraphedStep's bookkeeping runs on
    the CPU: a capture records the function without running it; streams order nothing."""
    log, graphs = [], []

    def make_graph():
        graphs.append(FakeGraph(log))
        return graphs[-1]

    @contextlib.contextmanager
    def capture(graph, stream=None):
        assert isinstance(stream, FakeStream)  # captured on the warm-up's side stream
        log.append('capture')
        calls_before = len(log)
        yield
        assert log[calls_before:] == ['run']  # the function ran once while capturing ...
        del log[calls_before:]                 # ... but a capture executes nothing
        graph.recorded = lambda: log.append('run')

    monkeypatch.setattr(torch.cuda, 'CUDAGraph', make_graph)
    monkeypatch.setattr(torch.cuda, 'graph', capture)
    monkeypatch.setattr(torch.cuda, 'Stream', FakeStream)
    monkeypatch.setattr(torch.cuda, 'current_stream', FakeStream)
    monkeypatch.setattr(torch.cuda, 'stream', lambda stream: contextlib.nullcontext())
    return log, graphs


def test_warms_up_captures_once_then_replays(fake_cuda):
    log, graphs = fake_cuda
    step = GraphedStep(lambda: log.append('run'), warmup=3)
    for _ in range(6):
        step()
    assert log == ['run'] * 3 + ['capture', 'replay', 'run'] + ['replay', 'run'] * 2
    assert len(graphs) == 1 and log.count('run') == 6  # every call ran the steps exactly once


def test_reset_warms_up_and_captures_again(fake_cuda):
    log, graphs = fake_cuda
    step = GraphedStep(lambda: log.append('run'), warmup=1)
    for _ in range(3):
        step()
    step.reset()  # a new pool model
    log.clear()
    for _ in range(3):
        step()
    assert log == ['run', 'capture', 'replay', 'run', 'replay', 'run'] and len(graphs) == 2


def test_a_failed_capture_is_one_line(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'graph', lambda graph, stream=None: contextlib.nullcontext())

    def fn():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    step = GraphedStep(fn, warmup=0)
    with pytest.raises(UserError, match=r'^--cuda-graphs: capturing the pool steps failed \(CUDA error: '
                                        r'operation not permitted when stream is capturing\); run without'):
        step()


GOOD = dict(amp='bf16', compile_mode='off', distributed=False, data_device=CUDA, host_random_augment=False)


@pytest.mark.parametrize('change, words', [
    ({}, None),
    ({'amp': 'off'}, None),
    ({'amp': 'fp16'}, '--amp fp16'),
    ({'compile_mode': 'default'}, '--compile'),
    ({'distributed': True}, 'torchrun'),
    ({'data_device': CPU}, 'training set on the GPU'),
    ({'host_random_augment': True}, '--aug-type'),
])
def test_capture_problems(change, words):
    problem = capture_problem(CUDA, **{**GOOD, **change})
    if words is None:
        assert problem is None
    else:
        assert words in problem and '\n' not in problem
    assert 'needs a CUDA device' in capture_problem(CPU, **{**GOOD, **change})


@pytest.mark.parametrize('strategy, mixup, host', [
    ('color_crop_cutout', 'cut', False),   # the default: one geometric op
    ('color_crop_cutout', 'none', False),
    ('color_crop_rotate_cutout', 'cut', True),
    ('none', 'cut', False),
])
def test_augmentations_that_draw_on_the_host(strategy, mixup, host):
    assert DiffAug(strategy, mixup_net=mixup).draws_on_host == host


@pytest.mark.parametrize('device, data_device', [
    (torch.device('cuda'), torch.device('cuda', 0)),   # --device cuda against a tensor's device
    (torch.device('cuda', 0), torch.device('cuda')),
    (torch.device('cuda', 0), torch.device('cuda', 0)),
    ('cuda', 'cuda:0'),
])
def test_cuda_and_cuda_0_are_one_device(device, data_device):
    """The first GPU run refused --cuda-graphs with 'needs the training set on the GPU' for a data set on
    the GPU: torch.device('cuda') != torch.device('cuda', 0). Built without a GPU: only compared."""
    assert capture_problem(torch.device(device), **{**GOOD, 'data_device': torch.device(data_device)}) is None


def test_other_gpu_or_host_is_another_device():
    assert 'training set on the GPU' in capture_problem(CUDA, **{**GOOD, 'data_device': torch.device('cuda', 1)})
    assert 'training set on the GPU' in capture_problem(torch.device('cuda', 1), **{**GOOD, 'data_device': CUDA})
    assert 'training set on the GPU' in capture_problem(CUDA, **{**GOOD, 'data_device': CPU})
