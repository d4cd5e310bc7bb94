import os
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from conftest import make_imagefolder
from data.datasets import (DATASETS, IMAGEFOLDER_TEST_ORDER_SEED, BatchStream, load_dataset, to_classifier_input,
                           to_gan_range)
from data.datasets import test_batches as read_test_batches  # (a name pytest does not collect)
from tests.helpers import TEST_DATA, TEST_DATA_VARIABLE, eval_args
from data.errors import UserError
from validate import run_evaluation

CPU = torch.device('cpu')


def test_digits_is_real_balanced_data_with_table_statistics():
    info, train, test = load_dataset('digits')
    assert (info.channels, info.img_size, info.num_classes) == (1, 28, 10)
    assert train.images.dtype == torch.uint8 and train.images.shape == (1437, 1, 28, 28)
    assert test.images.shape == (360, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [36] * 10 or torch.bincount(test.labels).min() >= 35
    x = train.images.float() / 255
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(info.std[0], abs=1e-3)


def test_normalisations_match_totensor_normalize():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ref = (x.float() / 255 - 0.5) / 0.5
    assert torch.equal(to_gan_range(x), ref)
    info = DATASETS['cifar10']
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose(to_classifier_input(x, info), (x.float() / 255 - mean) / std)


def test_mnist_and_fashion_test_sets_use_their_own_statistics():
    # the reference normalised their test sets with the GAN's (0.5, 0.5): fixed
    assert DATASETS['mnist'].mean == (0.131,) and DATASETS['mnist'].std == (0.308,)
    assert DATASETS['fashion'].mean == (0.286,) and DATASETS['fashion'].std == (0.353,)


def test_batch_stream_is_a_shuffled_drop_last_pass_and_resumes_mid_way():
    _, train, _ = load_dataset('digits')
    stream = BatchStream(train, 100, torch.device('cpu'), torch.Generator().manual_seed(0))
    assert len(stream) == 14
    order = stream.new_order()
    batches = list(stream.batches(order))
    seen = torch.cat([y for _, y in batches])
    assert len(seen) == 1400 and len(set(order[:1400].tolist())) == 1400
    tail = list(stream.batches(order, start=10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[10:], tail))


def _make_tree(root, classes, per_class, mode='RGB', size=32):
    for split in ('train', 'test'):
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(per_class):
                color = (40 * c + i) % 256
                Image.new(mode, (size, size), color if mode == 'L' else (color, 255 - color, 7)).save(
                    os.path.join(folder, f'{i}.png'))


def test_imagefolder_takes_channels_size_and_classes_from_the_data(tmp_path):
    _make_tree(tmp_path, ['cat', 'dog', 'eel'], 4, size=40)
    info, train, test = load_dataset('imagefolder', str(tmp_path), img_size=32)
    assert (info.channels, info.img_size, info.num_classes) == (3, 32, 3)
    assert train.images.shape == (12, 3, 32, 32) and train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert os.path.exists(tmp_path / 'dim_stats.json')  # cached next to the data
    info2, _, _ = load_dataset('imagefolder', str(tmp_path), img_size=32)
    assert info2.mean == info.mean and info2.std == info.std


def test_imagefolder_grayscale_28(tmp_path):
    _make_tree(tmp_path, ['a', 'b'], 3, mode='L', size=28)
    info, train, _ = load_dataset('imagefolder', str(tmp_path), img_size=28)
    assert (info.channels, info.img_size, info.num_classes) == (1, 28, 2)


def test_imagefolder_test_set_is_read_in_one_fixed_class_mixed_order(tmp_path):
    """A folder lists its test images class by class; read so, every test batch of a class's size would
    hold one class, and the official test mode (BatchNorm on each test batch) would normalise it away.
    The test set comes in one seeded random order instead: batches hold several classes, every load
    gives the same order, and each image keeps its own label."""
    classes, per_class, batch = 4, 16, 16
    make_imagefolder(tmp_path, classes=classes, train=2, test=per_class)
    _, train, test = load_dataset('imagefolder', str(tmp_path), img_size=28)
    assert torch.bincount(test.labels).tolist() == [per_class] * classes
    assert train.labels.tolist() == sorted(train.labels.tolist())  # training order is drawn elsewhere
    batches = [labels for _, labels in read_test_batches(test, CPU, batch)]
    assert len(batches) == classes
    assert all(len(labels.unique()) >= 3 for labels in batches), [b.tolist() for b in batches]
    # each image went with its label: class c's pixels are about 30 + c * 190 / 3 bright (make_imagefolder)
    brightness = test.images.float().mean(dim=(1, 2, 3))
    assert torch.equal(((brightness - 30) / (190 / (classes - 1))).round().long(), test.labels)
    _, _, again = load_dataset('imagefolder', str(tmp_path), img_size=28)
    assert torch.equal(again.labels, test.labels) and torch.equal(again.images, test.images)
    expected = torch.randperm(classes * per_class, generator=torch.Generator().manual_seed(IMAGEFOLDER_TEST_ORDER_SEED))
    assert torch.equal(test.labels, expected // per_class)  # the named seed's permutation of the class-by-class list


def test_eval_json_records_the_test_order_seed(tmp_path):
    make_imagefolder(tmp_path, classes=3, train=4, test=4)
    info, train, test = load_dataset('imagefolder', str(tmp_path), img_size=28)
    report = run_evaluation(eval_args(baseline='random', epochs_eval=1), info, train, test, CPU,
                            torch.autocast('cpu', enabled=False))
    assert report['test_order_seed'] == IMAGEFOLDER_TEST_ORDER_SEED
    info, train, test = load_dataset('digits')
    test = type(test)(test.images[:20], test.labels[:20])
    report = run_evaluation(eval_args(baseline='random', epochs_eval=1), info, train, test, CPU,
                            torch.autocast('cpu', enabled=False))
    assert report['test_order_seed'] is None  # read in the dataset's own order


@pytest.mark.parametrize('classes', [[], ['only']])
def test_imagefolder_needs_two_classes(tmp_path, classes):
    _make_tree(tmp_path, classes, 2)
    os.makedirs(tmp_path / 'train', exist_ok=True)
    os.makedirs(tmp_path / 'test', exist_ok=True)
    with pytest.raises(UserError):
        load_dataset('imagefolder', str(tmp_path))


CIFAR10_JPEG_TAR, CIFAR10_JPEG_TREE = (os.path.join(TEST_DATA, name) for name in ('cifar10-jpeg.tar.gz', 'cifar10-jpeg'))


def _first_images(name):
    """A slice of the CIFAR-10 JPEG tree (images 0000-0004 of each class and split): the whole is 60000 files."""
    return name.endswith('.jpg') and int(os.path.basename(name).split('.')[0]) < 5


@pytest.mark.skipif(not (os.path.exists(CIFAR10_JPEG_TAR) or os.path.isdir(CIFAR10_JPEG_TREE)),
                    reason=f'no cifar10-jpeg.tar.gz or extracted cifar10-jpeg/ in {TEST_DATA}: '
                           f'set {TEST_DATA_VARIABLE}=DIR to the folder holding one')
def test_cifar10_jpeg_tree_works_unchanged(tmp_path):
    if os.path.isdir(CIFAR10_JPEG_TREE):  # extracted already: copy the slice
        wanted = 0
        for folder, _, files in os.walk(CIFAR10_JPEG_TREE):
            for name in filter(_first_images, files):
                target = tmp_path / 'cifar10-jpeg' / os.path.relpath(folder, CIFAR10_JPEG_TREE)
                os.makedirs(target, exist_ok=True)
                shutil.copyfile(os.path.join(folder, name), target / name)
                wanted += 1
    else:
        with tarfile.open(CIFAR10_JPEG_TAR) as tar:
            members = [m for m in tar if m.isdir() or (m.isfile() and _first_images(m.name))]
            tar.extractall(tmp_path, members=members)
        wanted = sum(1 for m in members if m.isfile())
    info, train, test = load_dataset('imagefolder', str(tmp_path / 'cifar10-jpeg'))
    assert (info.channels, info.img_size, info.num_classes) == (3, 32, 10)
    assert len(train) + len(test) == wanted and len(test) > 0
    assert info.resnet_stem == 'cifar'


@pytest.mark.skipif(not os.path.isdir(os.path.join(TEST_DATA, 'MNIST', 'raw')),
                    reason=f'no MNIST/raw/ (torchvision\'s download) in {TEST_DATA}: '
                           f'set {TEST_DATA_VARIABLE}=DIR to the folder holding it')
def test_mnist_loads_offline_through_torchvision(tmp_path):
    shutil.copytree(os.path.join(TEST_DATA, 'MNIST'), tmp_path / 'MNIST')
    info, train, test = load_dataset('mnist', str(tmp_path))
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert (train.images.float().mean() / 255).item() == pytest.approx(0.1307, abs=1e-4)


def test_offline_without_files_names_the_folder(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset('cifar10', str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and 'cifar-10' in msg and '\n' not in msg


def test_unknown_dataset():
    with pytest.raises(UserError, match='unknown dataset'):
        load_dataset('imagenet21k')
