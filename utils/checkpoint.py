"""Checkpoints: atomic writes, self-describing contents, and the official format still readable.

A checkpoint is a dict with the official keys `generator`, `discriminator`, `optim_g`, `optim_d`
(state dicts), plus `format`, `stage`, `dataset` (the DatasetInfo as a dict), `generator_config` and
`discriminator_config` (constructor arguments), `epoch` (epochs completed), `iteration` (optimizer
steps so far), `epoch_iteration` (batches done in the current epoch), `args`, `best`, `rng` and, in
stage 2, `pool` (the current pool model and its optimizer). The official files hold only the first
four keys; then the dataset flags say what to build.
"""
import glob
import os
import tempfile

import torch

from utils.errors import UserError

FORMAT = 'dim-repro/1'
OFFICIAL_KEYS = ('generator', 'discriminator', 'optim_g', 'optim_d')
LAST = 'last.pth'  # rolling checkpoint that --resume picks up
TMP_PREFIX, TMP_SUFFIX = '.tmp-', '.pth'  # partial writes; never picked up by --resume
# what --resume needs besides the weights to continue exactly where the run stopped
RESUME_KEYS = ('optim_g', 'optim_d', 'stage', 'dataset', 'generator_config', 'discriminator_config', 'epoch',
               'iteration', 'epoch_iteration', 'order', 'best', 'validate_pending', 'args', 'rng', 'data_rng')


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed over
    `path`. A process killed at any moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, 'wb') as f:
            torch.save({'format': FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_temps(folder):
    """Delete the partial files a killed writer left in `folder` (only names save_checkpoint makes)."""
    for path in glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + '*' + TMP_SUFFIX)):
        try:
            os.unlink(path)
        except OSError:
            pass


def load_checkpoint(path):
    """Load to the CPU; any unreadable file becomes a one-line UserError."""
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: our checkpoints hold args, RNG states and numpy arrays; only load files
        # you trust, as with any pickle.
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # a torn or foreign file can fail inside the unpickler in many ways
        raise UserError(f"cannot read checkpoint {path}: truncated or not a checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or 'generator' not in ckpt:
        raise UserError(f"{path} is not a DiM checkpoint (no 'generator' entry)")
    if not is_official(ckpt):
        missing = [k for k in ('dataset', 'generator_config', 'discriminator_config') if k not in ckpt]
        if missing or not isinstance(ckpt['dataset'], dict):
            raise UserError(f"{path} is a damaged checkpoint (missing {', '.join(missing) or 'dataset'})")
    return ckpt


def check_resumable(ckpt, path, stage):
    """Refuse, in one line, a checkpoint that --resume cannot continue exactly."""
    if is_official(ckpt) or ckpt.get('stage') != stage:
        raise UserError(f"--resume: {path} is not a {stage} checkpoint of this repository "
                        f"({'official format' if is_official(ckpt) else 'stage ' + str(ckpt.get('stage'))})")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing)}, so it cannot be continued")


def is_official(ckpt):
    return ckpt.get('format') != FORMAT


def checkpoint_dataset(ckpt):
    """The dataset name stored in a checkpoint, or None for an official-format file."""
    return None if is_official(ckpt) else ckpt['dataset'].get('name')


def check_compatible(ckpt, info, path):
    """Refuse a checkpoint made for other data than the flags ask for, with one line saying what differs."""
    if is_official(ckpt):
        return
    stored = ckpt['dataset']
    if stored.get('name') != info.name:
        raise UserError(f"{path} was trained on {stored.get('name')}, but the flags ask for {info.name}")
    for key, what in (('num_classes', 'classes'), ('img_size', 'px images'), ('channels', 'channels')):
        if stored.get(key) != getattr(info, key):
            raise UserError(f"{path} was trained with {stored.get(key)} {what}, but {info.name} as the flags "
                            f"give it has {getattr(info, key)} {what}")


def gan_configs(ckpt, info, dim_noise, width):
    """Constructor arguments of the generator and discriminator a checkpoint holds."""
    if not is_official(ckpt):
        return ckpt['generator_config'], ckpt['discriminator_config']
    # Official files: sizes come from the flags; the reference's generator always took 100 noise inputs.
    g = dict(num_classes=info.num_classes, channels=info.channels, img_size=info.img_size,
             dim_noise=dim_noise, width=width)
    d = dict(num_classes=info.num_classes, channels=info.channels, img_size=info.img_size, width=width)
    return g, d


def load_state(module, state, path, what):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: its {what} does not fit the model the flags describe ({first})") from None


def last_checkpoint_path(results_dir):
    return os.path.join(results_dir, LAST)
