"""Checkpoints: atomic writes, self-describing contents, and the official format still readable.

A checkpoint is a dict with the official keys `generator`, `discriminator`, `optim_g`, `optim_d`
(state dicts), plus `format`, `stage`, `dataset` (the DatasetInfo as a dict), `generator_config` and
`discriminator_config` (constructor arguments), `epoch` (epochs completed), `iteration` (optimizer
steps so far), `epoch_iteration` (batches done in the current epoch), `args`, `best`, `rng` and, in
stage 2, `pool` (the current pool model and its optimizer).

The official files hold only the first four keys, under the official module names (fc1, bn0, conv1,
...; see models/gan.py). `load_checkpoint` turns such a file into this repository's terms, so every
entry point reads it alike: the state dicts renamed, the optimizer states re-indexed to this
repository's parameter order, and `generator_config` / `discriminator_config` inferred from the tensor
shapes. It stays "official" (no `format`): it records no dataset, so `check_compatible` compares the
inferred sizes with the data the flags select, and --resume refuses it.

A teacher (`save_teacher`, `load_teacher`: validate.py --save-classifier and --soft-labels) is a file of
its own format, TEACHER_FORMAT: one classifier with its architecture, dataset and normalisation.
"""
import glob
import hashlib
import io
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping

import torch

from models import create_model, list_models
from models.gan import (OFFICIAL_DISCRIMINATOR_NAMES, OFFICIAL_GENERATOR_NAMES, Discriminator,
                        Generator)
from data.errors import UserError
from utils.runtime import load_optimizer_state

FORMAT = 'dim-repro/1'
TEACHER_FORMAT = 'dim-teacher/1'  # a classifier kept to label training batches (validate.py --soft-labels)
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
    try:
        return from_official(ckpt, path)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # odd content the checks missed
        raise UserError(f"{path}: not a DiM checkpoint of the official layout ({type(e).__name__})") from None


def check_resumable(ckpt, path, stage):
    """Refuse, in one line, a checkpoint that --resume cannot continue exactly."""
    if is_official(ckpt) or ckpt.get('stage') != stage:
        raise UserError(f"--resume: {path} is not a {stage} checkpoint of this repository "
                        f"({'official format' if is_official(ckpt) else 'stage ' + str(ckpt.get('stage'))})")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing)}, so it cannot be continued")


def is_official(ckpt):
    """Whether a loaded file is in the official layout: it carries neither of this repository's formats
    (a GAN checkpoint's nor a teacher's)."""
    return ckpt.get('format') not in (FORMAT, TEACHER_FORMAT)


def checkpoint_data(ckpt):
    """(dataset name, --data-dir) a checkpoint was trained with, what data.datasets.resolve_data
    fills the flags from; (None, None) without a checkpoint or for an official-format file."""
    if ckpt is None or is_official(ckpt):
        return None, None
    return ckpt['dataset'].get('name'), (ckpt.get('args') or {}).get('data_dir')


_SIZE_KEYS = ('img_size', 'channels', 'num_classes')


def _sizes(img_size, channels, num_classes):
    return f"{img_size}-px {channels}-channel images" + (f" of {num_classes} classes" if num_classes else '')


def check_compatible(ckpt, info, path):
    """Refuse a checkpoint made for other data than the flags ask for, with one line saying what differs."""
    if is_official(ckpt):  # no dataset recorded: compare the sizes its tensors give (from_official)
        cfg = ckpt['generator_config']
        have = {k: cfg[k] for k in _SIZE_KEYS}
        if any(v is not None and v != getattr(info, k) for k, v in have.items()):
            raise UserError(f"{path} is an official-format checkpoint for {_sizes(**have)}, but {info.name} as "
                            f"the flags give it has {_sizes(**{k: getattr(info, k) for k in _SIZE_KEYS})}")
        return
    stored = ckpt['dataset']
    if stored.get('name') != info.name:
        raise UserError(f"{path} was trained on {stored.get('name')}, but the flags ask for {info.name}")
    for key, what in (('num_classes', 'classes'), ('img_size', 'px images'), ('channels', 'channels')):
        if stored.get(key) != getattr(info, key):
            raise UserError(f"{path} was trained with {stored.get(key)} {what}, but {info.name} as the flags "
                            f"give it has {getattr(info, key)} {what}")


def gan_configs(ckpt, info):
    """Constructor arguments of the generator and discriminator a checkpoint holds. They come from the
    checkpoint (an official file's from its tensor shapes), never from the flags."""
    g, d = dict(ckpt['generator_config']), ckpt['discriminator_config']
    if is_official(ckpt):
        if g['num_classes'] is None:  # an official file without its discriminator: classes from the data
            g['num_classes'] = info.num_classes
        d = dict(d) if d is not None else dict(num_classes=g['num_classes'], channels=g['channels'],
                                               img_size=g['img_size'], width=g['width'])
    return g, d


def load_state(module, state, path, what):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: its {what} does not fit the model the flags describe ({first})") from None


def load_generator(ckpt, info, path, device='cpu'):
    """The generator a loaded checkpoint holds (stage 1 or 2, or an official file), rebuilt from the
    checkpoint's own configuration, on `device`: what validate.py, misc/export.py and misc/diagnose.py
    evaluate. `path` names the file in errors."""
    g_cfg, _ = gan_configs(ckpt, info)
    G = Generator(**g_cfg).to(device)
    load_state(G, ckpt['generator'], path, 'generator')
    return G


def load_gan_state(nets, ckpt, path):
    """Load a checkpoint's generator, discriminator and their Adam states into a stage's GanNets
    (built from gan_configs(ckpt)); an official file's optimizer states were re-indexed on loading."""
    load_state(nets.G, ckpt['generator'], path, 'generator')
    load_state(nets.D, ckpt['discriminator'], path, 'discriminator')
    for key, opt in (('optim_g', nets.opt_g), ('optim_d', nets.opt_d)):
        if key in ckpt:
            try:
                load_optimizer_state(opt, ckpt[key])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}: its {key} does not fit ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


# -- the teacher of soft labels -----------------------------------------------------------------
# A teacher file is a dict: `format` (TEACHER_FORMAT), `architecture` (a models/ registry name),
# `dataset` (the DatasetInfo as a dict: its mean and std are the normalisation the teacher's inputs
# had), `state_dict`, and what describes it: `test_top1` / `test_top5` (its own accuracy on the real
# test set, BatchNorm in eval mode, as it labels), `seed`, `train_images`, `val_per_class`, `recipe`,
# `torch`. Only tensors, numbers, strings, lists and dicts: it loads with weights_only=True.
TEACHER_KEYS = ('architecture', 'dataset', 'state_dict', 'test_top1')
WRITES_A_TEACHER = '`validate.py --baseline full --save-classifier PATH` writes one'


def save_teacher(path, architecture, state_dict, info, **record):
    """Keep a classifier trained on the real training set as a teacher (atomically, as every checkpoint).
    `record`: test_top1, test_top5, seed, train_images, val_per_class, recipe (see above)."""
    save_checkpoint({'format': TEACHER_FORMAT, 'architecture': architecture, 'dataset': info.to_dict(),
                     'state_dict': {k: v.detach().cpu().clone() for k, v in state_dict.items()},
                     'torch': str(torch.__version__), **record}, path)


def load_teacher(path, info, device='cpu', flag='--soft-labels'):
    """The teacher of --soft-labels, rebuilt on `device` in eval mode and frozen (no parameter takes a
    gradient, so no optimizer can move it). A file that is not a teacher, or one trained on other data or
    with another normalisation than `info`, is a one-line UserError. Returns (model, description): the
    description is what eval.json records, the file's sha256 and the teacher's own test accuracy among it.
    `flag` names the option that gave the file in the errors (--select-features reads the same files)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{flag}: teacher not found: {path}")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location='cpu', weights_only=True)
    except Exception as e:  # a torn file, a pickle of other objects (a GAN checkpoint with its RNG states)
        raise UserError(f"{flag}: cannot read {path} as a teacher: truncated or not a teacher checkpoint "
                        f"({type(e).__name__}); {WRITES_A_TEACHER}") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != TEACHER_FORMAT:
        what = 'a generator checkpoint' if isinstance(ckpt, dict) and 'generator' in ckpt else 'another kind of file'
        raise UserError(f"{flag}: {path} is {what}, not a teacher; {WRITES_A_TEACHER}")
    missing = [k for k in TEACHER_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{flag}: {path} is a damaged teacher checkpoint (missing {', '.join(missing)})")
    check_compatible(ckpt, info, path)
    stored = ckpt['dataset']
    mean, std = list(stored.get('mean', ())), list(stored.get('std', ()))
    if (mean, std) != (list(info.mean), list(info.std)):
        # the teacher would see inputs shifted and scaled other than in its training: wrong labels, silently
        raise UserError(f"{flag}: {path} was trained on inputs normalised with mean {mean} and std {std}, "
                        f"but {info.name} as the flags give it uses mean {list(info.mean)} and std {list(info.std)}")
    if ckpt['architecture'] not in list_models():
        raise UserError(f"{flag}: {path} holds an unknown architecture {ckpt['architecture']!r}")
    model = create_model(ckpt['architecture'], info.num_classes, info.channels, info.img_size,
                         stem=stored.get('resnet_stem', info.resnet_stem))
    load_state(model, ckpt['state_dict'], path, 'teacher')
    model.to(device).eval().requires_grad_(False)
    description = {'path': os.path.abspath(path), 'sha256': hashlib.sha256(raw).hexdigest(),
                   'architecture': ckpt['architecture'], 'dataset': stored.get('name'),
                   **{k: ckpt.get(k) for k in ('test_top1', 'test_top5', 'seed', 'train_images', 'val_per_class')}}
    return model, description


# -- the official layout ------------------------------------------------------------------------

def from_official(ckpt, path):
    """An official-format checkpoint ({generator, discriminator, optim_g, optim_d} under the official
    module names) in this repository's terms: state dicts renamed (models/gan.py, OFFICIAL_*_NAMES),
    optimizer states re-indexed to this repository's parameter order, and the constructor arguments
    inferred from the tensor shapes. A file without `format` that already uses this repository's names
    goes through the same checks. Anything that does not fit is a one-line UserError naming the file."""
    out = dict(ckpt)
    g = _official_names(ckpt['generator'], OFFICIAL_GENERATOR_NAMES, path, 'generator')
    d = (_official_names(ckpt['discriminator'], OFFICIAL_DISCRIMINATOR_NAMES, path, 'discriminator')
         if ckpt.get('discriminator') is not None else None)
    g_cfg, d_cfg = _infer_configs(g, d, path)
    with torch.device('meta'):  # names, shapes and parameter order only: no memory, no random draws
        nets = [('generator', 'optim_g', g, Generator(**g_cfg), OFFICIAL_GENERATOR_NAMES)]
        if d is not None:
            nets.append(('discriminator', 'optim_d', d, Discriminator(**d_cfg), OFFICIAL_DISCRIMINATOR_NAMES))
    for what, opt_key, (state, layout), model, table in nets:
        out[what] = _to_repo_names(state, layout, model, table, path, what)
        if out.get(opt_key) is not None:
            out[opt_key] = _remap_optimizer(out[opt_key], state, layout, model, table, path, opt_key, what)
    out['generator_config'], out['discriminator_config'] = g_cfg, d_cfg
    return out


def _rename(key, table):
    module, _, leaf = key.rpartition('.')
    return f'{table[module]}.{leaf}' if module in table else key


def _official_names(state, table, path, what):
    """(state under the official names, in the file's order; 'official' or 'repository': the names
    the file used)."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                 for k, v in state.items()):
        raise UserError(f"{path}: its {what} is not a state dict of tensors")
    if state and all(k.startswith('module.') for k in state):  # saved from an nn.DataParallel
        state = OrderedDict((k[len('module.'):], v) for k, v in state.items())
    modules = {k.rpartition('.')[0] for k in state}
    if modules & set(table):
        return OrderedDict(state), 'official'
    to_official = {repo: official for official, repo in table.items()}
    if modules & set(to_official):
        return OrderedDict((_rename(k, to_official), v) for k, v in state.items()), 'repository'
    raise UserError(f"{path}: its {what} has neither the official names ({', '.join(list(table)[:3])}, ...) "
                    f"nor this repository's; not a DiM checkpoint")


def _shape(state, key, ndim, path, what):
    t = state.get(key)
    if t is None:
        raise UserError(f"{path}: its {what} has no {key}")
    if t.dim() != ndim:
        raise UserError(f"{path}: its {what} {key} has shape {list(t.shape)}, not {ndim}-dimensional")
    return tuple(t.shape)


def _infer_configs(g, d, path):
    """Generator and discriminator constructor arguments from the tensor shapes (official names)."""
    g = g[0]
    hidden, dim_noise = _shape(g, 'fc1.weight', 2, path, 'generator')
    if hidden % 16:
        raise UserError(f"{path}: its generator fc1 has {hidden} outputs, not width x 4 x 4")
    kernel = _shape(g, 'conv1.weight', 4, path, 'generator')[2]
    img_size = {3: 28, 4: 32}.get(kernel)
    if img_size is None:
        raise UserError(f"{path}: its generator conv1 has kernel {kernel}; the official layout has 4 "
                        f"(32-px data) or 3 (28-px data)")
    channels = _shape(g, 'conv8.weight', 4, path, 'generator')[0]
    g_cfg = dict(num_classes=None, channels=channels, img_size=img_size, dim_noise=dim_noise, width=hidden // 16)
    if d is None:
        return g_cfg, None
    d = d[0]
    d_width, d_channels = _shape(d, 'conv1.weight', 4, path, 'discriminator')[:2]
    d_size = _shape(d, 'ln1.weight', 3, path, 'discriminator')[1]
    num_classes = _shape(d, 'fc10.weight', 2, path, 'discriminator')[0]
    if (d_size, d_channels) != (img_size, channels):
        raise UserError(f"{path}: its generator makes {img_size}-px {channels}-channel images, but its "
                        f"discriminator takes {d_size}-px {d_channels}-channel ones")
    if dim_noise < num_classes:
        raise UserError(f"{path}: its generator takes {dim_noise} noise inputs, fewer than its {num_classes} "
                        f"classes (the first entries of the noise hold the one-hot class)")
    g_cfg['num_classes'] = num_classes
    return g_cfg, dict(num_classes=num_classes, channels=channels, img_size=d_size, width=d_width)


def _listing(names, limit=4):
    return ', '.join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else '')


def _to_repo_names(state, layout, model, table, path, what):
    """The state dict under this repository's names, after checking every name and shape against
    `model` (built on the meta device from the inferred configuration)."""
    to_official = {repo: official for official, repo in table.items()}
    wanted = OrderedDict((_rename(name, to_official), (name, tuple(t.shape)))
                         for name, t in model.state_dict().items())

    def shown(key):  # the name as the file has it
        return wanted[key][0] if layout == 'repository' and key in wanted else key
    missing = [shown(k) for k in wanted if k not in state]
    unexpected = [shown(k) for k in state if k not in wanted]
    if missing or unexpected:
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"unexpected {_listing(unexpected)}"] if unexpected else [])
        raise UserError(f"{path}: its {what} does not have the layout of the DiM {what} ({'; '.join(parts)})")
    wrong = [f"{shown(k)} {list(state[k].shape)} (expected {list(shape)})"
             for k, (_, shape) in wanted.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise UserError(f"{path}: its {what} has tensors of the wrong shape: {_listing(wrong, 3)}")
    return OrderedDict((name, state[k]) for k, (name, _) in wanted.items())


def _remap_optimizer(opt, state, layout, model, table, path, key, what):
    """An optimizer state dict indexes parameters by their position in model.parameters(). The
    official module's order is the order of its parameters in its state dict as saved (registration
    order); re-index the per-parameter state (Adam's step, exp_avg, exp_avg_sq) to this repository's
    order, so every moment lands on the parameter it belongs to."""
    groups = opt.get('param_groups') if isinstance(opt, Mapping) else None
    if (not isinstance(opt, Mapping) or not isinstance(opt.get('state'), Mapping) or not isinstance(groups, list)
            or not all(isinstance(g, Mapping) and isinstance(g.get('params'), list) for g in groups)):
        raise UserError(f"{path}: its {key} is not an optimizer state dict")
    params = OrderedDict(model.named_parameters())  # this repository's order
    position = {name: i for i, name in enumerate(params)}
    order = [_rename(k, table) for k in state if _rename(k, table) in params]  # the file's order
    ids = [i for g in groups for i in g['params']]
    if len(groups) != 1 or len(ids) != len(order):
        raise UserError(f"{path}: its {key} holds {len(ids)} parameters in {len(groups)} group(s); its {what} "
                        f"has {len(order)} parameters (one group)")
    to_official = {repo: official for official, repo in table.items()}
    remapped = {}
    for old, name in zip(ids, order):
        if old not in opt['state']:
            continue  # a parameter the optimizer never stepped
        entry = opt['state'][old]
        for leaf, value in (entry.items() if isinstance(entry, Mapping) else ()):
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[name].shape:
                shown = name if layout == 'repository' else _rename(name, to_official)
                raise UserError(f"{path}: its {key} does not line up with its {what}: the {leaf} of {shown} has "
                                f"shape {list(value.shape)}, the parameter {list(params[name].shape)}")
        remapped[position[name]] = entry
    return {**opt, 'state': dict(sorted(remapped.items())),
            'param_groups': [{**groups[0], 'params': list(range(len(params)))}]}

