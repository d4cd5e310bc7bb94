"""CUDA graphs for a step that has no inputs and no outputs: stage 2's --epochs-match-train SGD steps
of the pool model.

Why: on an H200 those 16 small steps are bound by host dispatch (about 125 aten ops each, a few µs of
Python and dispatcher time per op), not by the GPU. A CUDA graph records the kernels of all 16 steps
once and relaunches them with one call per generator step.

What makes it safe here: the step reads only state that stays where it is (the training set on the
device, the pool model's parameters, buffers and optimizer state) and draws its random numbers from
torch's default CUDA generator, which CUDA graphs advance on every replay as eager code would. It
returns nothing. `capture_problem` lists what would break that, and the stage refuses the flag then.
"""
import torch

from data.errors import UserError
from utils.runtime import same_device


class GraphedStep:
    """Calls `fn()` eagerly `warmup` times (on a side stream, as CUDA-graph capture asks, so that lazy
    initialisation, cuDNN autotuning and the optimizer's state happen outside the graph), then
    captures it once on that stream and replays the capture on every later call. Each call runs `fn`
    exactly once: capturing records kernels without running them, so the capturing call replays right
    after."""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup = fn, warmup
        self.graph, self.calls, self.side = None, 0, None

    def __call__(self):
        if self.graph is None and self.calls < self.warmup:
            self._eager_on_side_stream()
        else:
            if self.graph is None:
                self.graph = self._capture()
            self.graph.replay()
        self.calls += 1

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            # on the warm-up's stream: libraries that create per-stream handles or workspaces lazily
            # (cuBLAS, cuBLASLt) have done so there, outside the capture
            with torch.cuda.graph(graph, stream=self._side_stream()):
                self.fn()
        except RuntimeError as e:  # an op that can't be captured (a host sync, a CPU tensor, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--cuda-graphs: capturing the pool steps failed ({first}); "
                            "run without --cuda-graphs") from None
        return graph

    def _side_stream(self):
        if self.side is None:
            self.side = torch.cuda.Stream()
        return self.side

    def _eager_on_side_stream(self):
        side = self._side_stream()
        current = torch.cuda.current_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.fn()
        current.wait_stream(side)

    def reset(self):
        """Forget the capture (its memory pool goes with it): the next calls warm up and capture anew."""
        self.graph, self.calls = None, 0


def capture_problem(device, *, amp, compile_mode, distributed, data_device, host_random_augment):
    """Why the pool steps can't be captured in this run, as one line for the user; None if they can."""
    if device.type != 'cuda':
        return f"--cuda-graphs needs a CUDA device (this run is on {device.type})"
    if amp == 'fp16':
        return ("--cuda-graphs does not work with --amp fp16: the loss scaler decides on the host whether "
                "to skip a step; use --amp bf16 or off")
    if compile_mode != 'off':
        return "--cuda-graphs and --compile both change how the pool steps run: choose one"
    if distributed:
        return "--cuda-graphs is not supported under torchrun (the pool steps' gradient all-reduce)"
    if not same_device(data_device, device):
        return ("--cuda-graphs needs the training set on the GPU (it did not fit, so it is batched from "
                "host memory); run without --cuda-graphs")
    if host_random_augment:
        return ("--cuda-graphs needs an --aug-type with at most one of crop/scale/rotate/translate: "
                "choosing among several is a host-side draw a graph would freeze")
    return None
