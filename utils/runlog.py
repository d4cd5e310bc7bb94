"""Run folders, args.json, a copy of stdout in logs.txt, tensorboard, progress bars."""
import json
import os
import sys

from tqdm import tqdm

from utils.cli import check_output_dirs
from utils.errors import UserError


class _Tee:
    """Writes to the real stdout and to a file. Unlike the reference's logger it never closes the real
    stdout, so nothing breaks when it goes away."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, 'a', buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunLog:
    """results/<tag>/ and logs/<tag>/ for one run: args.json, logs.txt, tensorboard events.

    quiet=True (the processes other than rank 0 under torchrun): the same paths, but no folders,
    files, tensorboard or progress bars, and stdout goes to /dev/null; rank 0 prints and logs for
    everyone, errors still reach stderr."""

    def __init__(self, args, quiet=False):
        self.quiet = quiet
        self.results_dir = os.path.join(args.output_dir, args.tag)
        self.logs_dir = os.path.join(args.logs_dir, args.tag)
        self._stdout = sys.stdout
        if quiet:
            self.show_progress, self.writer = False, None
            sys.stdout = open(os.devnull, 'w')
            return
        check_output_dirs(args)  # both folders, before either is created
        for folder in (self.results_dir, self.logs_dir):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {folder}: {e.strerror}") from None
            if not os.access(folder, os.W_OK):
                raise UserError(f"output folder {folder} is not writable")
        with open(os.path.join(self.logs_dir, 'args.json'), 'w') as f:
            json.dump(vars(args), f, indent=2, sort_keys=True, default=str)
        sys.stdout = _Tee(sys.stdout, os.path.join(self.logs_dir, 'logs.txt'))
        self.show_progress = not args.no_progress and self._stdout.isatty()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.logs_dir)

    def scalars(self, values, step, prefix=''):
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(prefix + name, float(value), step)

    def image(self, name, image, step):
        if self.writer is not None:
            self.writer.add_image(name, image, step)

    def progress(self, iterable=None, **kwargs):
        return tqdm(iterable, disable=not self.show_progress, dynamic_ncols=True, leave=False, **kwargs)

    def log(self, text):
        """print, without tearing an active progress bar."""
        if self.show_progress:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text)

    def path(self, *parts):
        return os.path.join(self.results_dir, *parts)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if isinstance(sys.stdout, _Tee):
            sys.stdout.file.close()
        elif self.quiet and sys.stdout is not self._stdout:
            sys.stdout.close()  # /dev/null
        sys.stdout = self._stdout


class Meters:
    """Running means of device tensors; read (one host sync) only when printed."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.count += 1

    def pop(self):
        if not self.count:
            return {}
        import torch
        keys = list(self.sums)
        means = (torch.stack([self.sums[k] for k in keys]) / self.count).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, means))
