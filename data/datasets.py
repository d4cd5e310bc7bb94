"""Dataset facts and loaders: the one place that knows channels, size, classes, mean and std.

Every split is loaded once into memory as a uint8 tensor [N, C, H, W] plus int64 labels, exactly the
pixels torchvision's ToTensor would see (times 255). Batches are then shuffled, converted and
normalised on the training device (`BatchStream`), so no worker processes are spawned per pass and
the numbers equal the reference's ToTensor + Normalize pipeline. Test sets are read in their dataset's
order, except an image folder's, which is read in one fixed, seeded, class-mixed order
(IMAGEFOLDER_TEST_ORDER_SEED).
"""
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from data.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    img_size: int
    num_classes: int
    mean: tuple
    std: tuple
    # ResNets use the CIFAR stem (3x3, no max pool) on CIFAR and the ImageNet stem elsewhere, as the
    # reference does; image folders of 32 px or less get the CIFAR stem.
    resnet_stem: str = 'imagenet'

    def to_dict(self):
        return asdict(self)


# Classifier statistics are the reference's (they are not all pixel std: keep them for faithfulness).
DATASETS = {
    'cifar10': DatasetInfo('cifar10', 3, 32, 10, (0.491, 0.482, 0.447), (0.202, 0.199, 0.201), 'cifar'),
    'cifar100': DatasetInfo('cifar100', 3, 32, 100, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), 'cifar'),
    'svhn': DatasetInfo('svhn', 3, 32, 10, (0.437, 0.444, 0.473), (0.198, 0.201, 0.197)),
    'fashion': DatasetInfo('fashion', 1, 28, 10, (0.286,), (0.353,)),
    'mnist': DatasetInfo('mnist', 1, 28, 10, (0.131,), (0.308,)),
    # sklearn's 8x8 digits upsampled to 28x28; statistics of the fixed training split below.
    'digits': DatasetInfo('digits', 1, 28, 10, (0.305,), (0.325,)),
}
IMAGEFOLDER = 'imagefolder'
DATASET_CHOICES = sorted(DATASETS) + [IMAGEFOLDER]


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    order_seed: int | None = None  # seed of the fixed order it is read in (None: the data's own order)

    def __len__(self):
        return len(self.labels)


def resolve_data(args, stored_name=None, stored_dir=None):
    """Fill --data / --data-dir from a checkpoint's dataset (`stored_name`, `stored_dir`) or the
    defaults, load the data, and refuse flags the data does not fit. Returns (info, train, test)."""
    if stored_name and args.data and args.data != stored_name:  # refuse before loading anything
        raise UserError(f"the checkpoint was trained on {stored_name}, but --data is {args.data}")
    args.data = args.data or stored_name or 'cifar10'
    args.data_dir = args.data_dir or stored_dir or './data'
    info, train, test = load_dataset(args.data, args.data_dir, args.img_size, num_workers=args.num_workers)
    if args.num_classes is not None and args.num_classes != info.num_classes:
        raise UserError(f"--num-classes {args.num_classes} but {info.name} has {info.num_classes} classes")
    if args.dim_noise < info.num_classes:
        raise UserError(f"--dim-noise {args.dim_noise} is smaller than the {info.num_classes} classes "
                        "(the first entries of the noise hold the one-hot class)")
    if args.batch_size > len(train):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train)} training images")
    return info, train, test


def load_dataset(name, data_dir='./data', img_size=32, download=True, num_workers=4):
    """Return (info, train Split, test Split) for a dataset name (see DATASET_CHOICES)."""
    if name == IMAGEFOLDER:
        return _load_imagefolder(data_dir, img_size, num_workers)
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose from: {', '.join(DATASET_CHOICES)}")
    if name == 'digits':
        train, test = _load_digits()
    else:
        train, test = (_load_torchvision(name, data_dir, split, download) for split in ('train', 'test'))
    return DATASETS[name], train, test


# ----------------------------------------------------------------------------------------------
# torchvision datasets

_TORCHVISION = {
    # name: (class name, sub-folder under --data-dir, folder torchvision looks for, where to get it)
    'cifar10': ('CIFAR10', '', 'cifar-10-batches-py', 'cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/'),
    'cifar100': ('CIFAR100', '', 'cifar-100-python', 'cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/'),
    'svhn': ('SVHN', 'svhn', '', 'train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/'),
    'mnist': ('MNIST', '', 'MNIST/raw', 'the four *-ubyte.gz files of MNIST'),
    'fashion': ('FashionMNIST', '', 'FashionMNIST/raw', 'the four *-ubyte.gz files of Fashion-MNIST'),
}


def _load_torchvision(name, data_dir, split, download):
    import torchvision

    cls_name, sub, folder, what = _TORCHVISION[name]
    root = os.path.join(data_dir, sub) if sub else data_dir
    cls = getattr(torchvision.datasets, cls_name)
    kwargs = {'split': split} if name == 'svhn' else {'train': split == 'train'}
    try:
        ds = cls(root, download=download, **kwargs)
    except Exception as e:  # offline download failures come as URLError, OSError or RuntimeError
        looked = os.path.join(root, folder) if folder else root
        raise UserError(f"cannot load {name} ({split}): nothing usable in {looked} and the download "
                        f"failed ({type(e).__name__}); put {what} there") from None
    if name == 'svhn':
        images, labels = torch.as_tensor(ds.data), torch.as_tensor(ds.labels)
    elif name.startswith('cifar'):
        images, labels = torch.as_tensor(ds.data).permute(0, 3, 1, 2), torch.as_tensor(ds.targets)
    else:
        images, labels = ds.data.unsqueeze(1), torch.as_tensor(ds.targets)
    return Split(images.contiguous(), labels.long())


# ----------------------------------------------------------------------------------------------
# sklearn digits: real data that ships with scikit-learn, for the quick start and the tests

def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values are 0..16
    x = F.interpolate(x, size=28, mode='bilinear', align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    y = torch.as_tensor(digits.target).long()
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2,
                                           stratify=y.numpy(), random_state=0)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx])


# ----------------------------------------------------------------------------------------------
# any DIR/train/<class>/* and DIR/test/<class>/* tree

STATS_FILE = 'dim_stats.json'


def _load_imagefolder(data_dir, img_size, num_workers=4):
    from concurrent.futures import ThreadPoolExecutor

    splits, classes = {}, None
    for split in ('train', 'test'):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise UserError(f"--data imagefolder needs {root}/<class>/<images>; no such folder")
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if classes is None:
            classes = found
        elif found != classes:
            raise UserError(f"class folders of {root} differ from those of the train split")
        files = [(os.path.join(root, cls, fname), label) for label, cls in enumerate(classes)
                 for fname in sorted(os.listdir(os.path.join(root, cls)))]
        # Pillow releases the GIL while decoding, so threads decode in parallel
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            decoded = list(pool.map(lambda f: _read_image(f[0], img_size), files))
        kept = [(img, label) for img, (_, label) in zip(decoded, files) if img is not None]
        if not kept:
            raise UserError(f"no images found under {root}/<class>/")
        splits[split] = ([img for img, _ in kept], [label for _, label in kept])
    if len(classes) < 2:
        raise UserError(f"{data_dir}/train has {len(classes)} class folder(s); at least 2 are needed")
    channels = 3 if any(t.shape[0] == 3 for t in splits['train'][0]) else 1
    train, test = (Split(torch.stack([t.expand(channels, -1, -1) for t in imgs]), torch.tensor(labs))
                   for imgs, labs in (splits['train'], splits['test']))
    test = _class_mixed(test)
    mean, std = _cached_stats(data_dir, train.images, img_size)
    info = DatasetInfo(IMAGEFOLDER, channels, img_size, len(classes), mean, std,
                       'cifar' if img_size <= 32 else 'imagenet')
    return info, train, test


# The seed of the one order an image folder's test set is read in (recorded in eval.json as
# `test_order_seed`). A folder lists its test images class by class; unshuffled, a test batch then holds
# one class, and the official test mode (BatchNorm in train mode on each test batch) normalises away
# what tells the classes apart. torchvision's test sets are not class-ordered, so the official code
# never met this: a fixed, seeded, class-mixed order gives the official test mode on a folder the
# meaning it has on torchvision data, and the same batches in every run.
IMAGEFOLDER_TEST_ORDER_SEED = 0


def _class_mixed(split):
    """The split in one fixed random order, drawn from a generator seeded IMAGEFOLDER_TEST_ORDER_SEED
    (the same folder gives the same order in every run, on every machine)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(IMAGEFOLDER_TEST_ORDER_SEED))
    return Split(split.images[order].contiguous(), split.labels[order], IMAGEFOLDER_TEST_ORDER_SEED)


def _read_image(path, img_size):
    """uint8 [C, H, W] tensor of an image file, or None for a file that is not an image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _image_to_tensor(img, img_size)
    except OSError:
        return None  # a README, a thumbnail cache...


def _image_to_tensor(img, img_size):
    from PIL import Image

    img = img.convert('L' if img.mode in ('1', 'L', 'I;16', 'I') else 'RGB')
    if img.size != (img_size, img_size):
        # Pillow >= 9.1 moved the constant to Image.Resampling
        img = img.resize((img_size, img_size), resample=getattr(Image, 'Resampling', Image).BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(img_size, img_size, -1).permute(2, 0, 1).contiguous()


def _cached_stats(data_dir, images, img_size):
    """Per-channel mean/std of the training images, computed once and cached next to them."""
    path = os.path.join(data_dir, STATS_FILE)
    key = f'{images.shape[1]}x{img_size}'
    cache = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    if key in cache and cache[key].get('count') == len(images):
        return tuple(cache[key]['mean']), tuple(cache[key]['std'])
    x = images.double() / 255
    mean = tuple(round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(round(v, 4) for v in x.std(dim=(0, 2, 3)).tolist())
    cache[key] = {'mean': mean, 'std': std, 'count': len(images)}
    try:
        with open(path, 'w') as f:
            json.dump(cache, f, indent=1)
    except OSError:
        pass  # read-only data folder: the stats are recomputed next time, nothing else changes
    return mean, std


def info_from_dict(d):
    """A DatasetInfo from its to_dict() form (as stored in checkpoints)."""
    d = dict(d)
    return DatasetInfo(**{**d, 'mean': tuple(d['mean']), 'std': tuple(d['std'])})


# ----------------------------------------------------------------------------------------------
# batches on the device

def to_gan_range(x_uint8):
    """uint8 pixels -> [-1, 1], as ToTensor then Normalize(0.5, 0.5) computes it, in torch's default
    float dtype (float32 unless a float64 check asked for more)."""
    return (x_uint8.to(torch.get_default_dtype()).div(255) - 0.5) / 0.5


def to_classifier_input(x_uint8, info):
    """uint8 pixels -> classifier input normalised by the dataset statistics (test images)."""
    return normalize(x_uint8.to(torch.get_default_dtype()).div(255), info.mean, info.std)


_CHANNEL_CONSTANTS = {}  # normalize's mean and std as [C, 1, 1] tensors, per (mean, std, device, dtype)


def normalize(x, mean, std):
    """Per-channel ``(x - mean) / std`` for [B, C, H, W] or [C, H, W] input."""
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device, x.dtype)
    if key not in _CHANNEL_CONSTANTS:
        # Made once per (mean, std, device, dtype): building them from Python lists on every call copies
        # them host-to-device from pageable memory, which on CUDA waits for all queued GPU work (a sync
        # per call on the hot path). Never in inference mode, so autograd may save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            _CHANNEL_CONSTANTS[key] = tuple(torch.tensor(v, dtype=x.dtype).view(-1, 1, 1).to(x.device)
                                            for v in key[:2])
    m, s = _CHANNEL_CONSTANTS[key]
    return (x - m) / s



def storage_device(split, device, max_gb=8.0):
    """Keep the images on the training device when they fit (CIFAR-10 is 150 MB), else on the host."""
    return device if split.images.numel() / 2**30 <= max_gb else torch.device('cpu')


def local_batch_size(batch_size, world):
    """One process's share of the global --batch-size under torchrun; a one-line UserError unless it
    divides evenly."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                        f"{world} processes (e.g. --batch-size {max(world, batch_size // world * world)})")
    return batch_size // world


class BatchStream:
    """Shuffled, drop-last batches of a Split, like the reference's DataLoader(shuffle, drop_last).

    The permutation comes from `generator` (a CPU torch.Generator whose state goes into checkpoints),
    so the data order is reproducible; `batches(order, start)` resumes a pass mid-way.

    Under torchrun (`world` processes, this one `rank`) `batch_size` is the global batch: every rank
    walks the same global batches, from the same generator state, and takes its own slice of each,
    so the union over the ranks of an epoch is the single-process epoch; `len()` counts global batches.
    """

    def __init__(self, split, batch_size, device, generator, shuffle=True, drop_last=True, rank=0, world=1):
        self.batch_size, self.device, self.generator = batch_size, device, generator
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world, self.local_batch = rank, world, local_batch_size(batch_size, world)
        where = storage_device(split, device)
        self.images = split.images.to(where)
        self.labels = split.labels.to(where)
        if where.type == 'cpu' and device.type == 'cuda':
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def new_order(self):
        """A fresh data order for one pass (checkpoints store it, so a resume continues the same pass)."""
        n = len(self.labels)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def batches(self, order, start=0):
        """Yield (uint8 images, labels) on the device for the pass `order`, skipping `start` batches."""
        order = order.to(self.images.device)
        for i in range(start, len(self)):
            yield self._take(order[i * self.batch_size:(i + 1) * self.batch_size])

    def first_batches(self, count):
        """The first `count` batches of a fresh shuffled pass (fewer if a pass has fewer): the pool
        model's training batches of one generator step. The official code restarts its shuffled,
        drop-last loader for every generator step and stops after --epochs-match-train batches, so the
        batches are disjoint. The pass is the argsort of float64 uniform keys (ties practically never
        happen) drawn where the images are, with torch's global RNG of that device (checkpointed with
        the other RNG states): a CPU randperm cost milliseconds of host time per step, and its copy to
        the GPU waited for the GPU. Under torchrun the keys come from the data generator instead: the
        global RNGs differ between ranks, it is in the same state on all, so they agree on each global
        batch without communicating."""
        count = min(count, len(self.labels) // self.batch_size)  # a drop-last pass
        if self.world == 1:
            order = pass_order(len(self.labels), self.images.device)
        else:
            order = pass_order(len(self.labels), 'cpu', self.generator).to(self.images.device)
        for i in range(count):
            yield self._take(order[i * self.batch_size:(i + 1) * self.batch_size])

    def _take(self, global_batch):
        """This process's slice of a global batch of indices, on the device (all of it in one process)."""
        idx = global_batch[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        return (self.images[idx].to(self.device, non_blocking=True),
                self.labels[idx].to(self.device, non_blocking=True))


def pass_order(n, device, generator=None):
    """A uniformly random permutation of range(n) on `device`, from sorting uniform float64 keys
    (no host round trip on a GPU, and a CUDA graph can replay it)."""
    return torch.rand(n, dtype=torch.float64, device=device, generator=generator).argsort()


TEST_BATCH = 500  # test batch size where it changes nothing but speed (BatchNorm in eval mode)


def test_batches(split, device, batch_size=TEST_BATCH):
    """The test set in order (no shuffle, the last batch smaller), on the device."""
    for i in range(0, len(split), batch_size):
        yield (split.images[i:i + batch_size].to(device, non_blocking=True),
               split.labels[i:i + batch_size].to(device, non_blocking=True))
