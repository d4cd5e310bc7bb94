"""validate.py --select: a fixed set drawn at random (the default, unchanged) or chosen by k-means in a
classifier's penultimate features (utils/selection.py)."""
import contextlib
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

import validate
from data.datasets import load_dataset
from data.errors import UserError
from models import create_model
from utils.checkpoint import load_teacher, save_teacher
from utils.selection import embed, kmeans_per_class
from validate import draw_fixed_set, hold_out, random_subset_indices, run_evaluation, training_sets

from helpers import eval_args, run_script, save_tiny_generator

CPU, NOCTX = torch.device('cpu'), contextlib.nullcontext()


@pytest.fixture(scope='module')
def digits():
    return load_dataset('digits')


@pytest.fixture(scope='module')
def features_file(digits, tmp_path_factory):
    """A ConvNet-3 kept as --save-classifier keeps a teacher (untrained: its features are as good as any
    for checking the geometry of the choice)."""
    info = digits[0]
    torch.manual_seed(0)
    model = create_model('convnet', info.num_classes, info.channels, info.img_size)
    path = str(tmp_path_factory.mktemp('features') / 'features.pth')
    save_teacher(path, 'convnet', model.state_dict(), info, test_top1=10.0, test_top5=50.0, seed=0)
    return path


def test_random_subsets_are_the_ones_drawn_before_select_existed(digits, tmp_path):
    """Without --select the sets are today's: the indices the code drew before --select existed (pinned
    from it: a seeded CPU randperm, the same on every machine) and exactly draw_fixed_set's generated set."""
    info, train, _ = digits
    _, rest = hold_out(train, info.num_classes, 10)
    pinned = {3407: [391, 349, 773, 84, 426, 1037, 2, 904, 1085, 1097, 738, 1239, 1038, 819, 404, 637, 994, 458,
                     147, 80],
              3408: [592, 1304, 954, 323, 1096, 955, 1211, 280, 176, 87, 964, 657, 1280, 952, 1072, 1159, 800, 200,
                     900, 288]}
    args = eval_args(baseline='random', ipc=2)
    sets = training_sets(args, 'random', None, info, rest, list(pinned), CPU)
    for (images, labels), (seed, idx) in zip(sets, pinned.items()):
        assert random_subset_indices(rest.labels, info.num_classes, 2, seed).tolist() == idx
        assert torch.equal(images, rest.images[idx]) and torch.equal(labels, rest.labels[idx])
    G = save_tiny_generator(str(tmp_path / 'g.pth'), info, seed=0)
    (images, labels), = training_sets(eval_args(ipc=3), 'dim', G, info, rest, [5], CPU)
    want_images, want_labels = draw_fixed_set(G, info, 3, 5, CPU)
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_without_select_a_seeded_run_is_bit_identical_to_select_random(tmp_path, digits):
    G = tmp_path / 'g.pth'
    save_tiny_generator(str(G), digits[0], seed=1)
    common = ['--pretrain-weight', G, '--protocol', 'fixed', '--ipc', '2', '--num-eval', '2', '--epochs-eval', '2',
              '--test-interval', '1', '--no-progress', '--device', 'cpu']
    for tag, extra in (('plain', []), ('random', ['--select', 'random'])):
        out = run_script('validate.py', *common, '--tag', tag, *extra, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    plain, random = (json.loads((tmp_path / 'results' / t / 'eval.json').read_text()) for t in ('plain', 'random'))
    assert plain['select'] == random['select'] == 'random' and plain['select_features'] is None
    for key in ('top1', 'best_top1', 'top5', 'test_curves'):
        assert plain['rows'][0][key] == random['rows'][0][key]


def test_kmeans_picks_are_distinct_per_class_nearest_their_centroids_and_seeded(digits, features_file):
    from sklearn.cluster import KMeans

    from utils.selection import KMEANS_RESTARTS
    info, train, _ = digits
    model, about = load_teacher(features_file, info, CPU, flag='--select-features')
    features = embed(model, train.images, info, CPU)
    assert features.shape == (len(train), model.fc.in_features)  # what the classifier head reads
    ipc = 4
    idx = kmeans_per_class(features, train.labels, info.num_classes, ipc, seed=11)
    assert len(set(idx.tolist())) == len(idx) == ipc * info.num_classes
    assert train.labels[idx].tolist() == [c for c in range(info.num_classes) for _ in range(ipc)]
    for c in range(info.num_classes):
        members = np.flatnonzero(train.labels.numpy() == c)
        km = KMeans(n_clusters=ipc, n_init=KMEANS_RESTARTS, random_state=11).fit(features[members])
        picks = idx[c * ipc:(c + 1) * ipc].numpy()
        for j, pick in enumerate(picks):  # the member of cluster j nearest centroid j
            cluster = members[km.labels_ == j]
            distances = ((features[cluster] - km.cluster_centers_[j]) ** 2).sum(1)
            assert pick == cluster[distances.argmin()]
    assert torch.equal(idx, kmeans_per_class(features, train.labels, info.num_classes, ipc, seed=11))
    assert not torch.equal(idx, kmeans_per_class(features, train.labels, info.num_classes, ipc, seed=12))


def test_kmeans_sets_for_a_generator_and_real_images(digits, features_file, tmp_path):
    info, train, test = digits
    test = type(test)(test.images[:40], test.labels[:40])
    features = load_teacher(features_file, info, CPU, flag='--select-features')
    G = save_tiny_generator(str(tmp_path / 'g.pth'), info, seed=0)
    args = eval_args(ipc=2, num_eval=2, select='kmeans', candidates=3)
    report = run_evaluation(args, info, train, test, CPU, NOCTX, G=G, features=features)
    assert report['select'] == 'kmeans' and report['candidates'] == 3 and report['train_images'] == 20
    assert report['select_features']['sha256'] == features[1]['sha256']
    # each seed chooses among its own draw of 3 x 2 per class: the picks are some of those draws
    sets = training_sets(args, 'dim', G, info, train, [7, 8], CPU, features)
    candidates, _ = draw_fixed_set(G, info, 6, 7, CPU)
    assert all(any(torch.equal(x, c) for c in candidates) for x in sets[0][0])
    assert not torch.equal(sets[0][0], sets[1][0])
    real = run_evaluation(eval_args(baseline='random', ipc=2, val_per_class=3), info, train, test, CPU, NOCTX,
                          features=features)
    assert real['select'] == 'kmeans' and real['candidates'] is None and real['train_images'] == 20


def refused(monkeypatch, argv, message):
    monkeypatch.setattr(sys, 'argv', ['validate.py', '--data', 'digits', '--device', 'cpu', *argv])
    with pytest.raises(UserError, match=message):
        validate.main()


def test_select_flags_that_do_not_fit_are_refused(monkeypatch, tmp_path, digits, features_file):
    G = str(tmp_path / 'g.pth')
    save_tiny_generator(G, digits[0], seed=0)
    kmeans = ['--select', 'kmeans', '--select-features', features_file]
    refused(monkeypatch, ['--pretrain-weight', G, *kmeans], '--protocol onthefly draws fresh images')
    refused(monkeypatch, ['--baseline', 'full', *kmeans], '--baseline full trains on every image')
    refused(monkeypatch, ['--baseline', 'random', '--select', 'kmeans'], 'give --select-features PATH')
    refused(monkeypatch, ['--pretrain-weight', G, '--protocol', 'fixed', *kmeans, '--candidates', '0'],
            '--candidates must be at least 1')
    refused(monkeypatch, ['--baseline', 'random', *kmeans, '--candidates', '3'], 'every real training image')
    refused(monkeypatch, ['--baseline', 'random', '--select-features', features_file], 'add --select kmeans')
    refused(monkeypatch, ['--baseline', 'random', '--select', 'kmeans', '--select-features', G],
            '--select-features: .* is a generator checkpoint, not a teacher')
    other = str(tmp_path / 'other.pth')  # a classifier of digits with another class count
    save_teacher(other, 'convnet', create_model('convnet', 5, 1, 28).state_dict(),
                 dataclasses.replace(digits[0], num_classes=5), test_top1=1.0)
    refused(monkeypatch, ['--baseline', 'random', '--select', 'kmeans', '--select-features', other],
            'was trained with 5 classes')


def test_select_exits_2_with_one_line(tmp_path):
    out = run_script('validate.py', '--data', 'digits', '--protocol', 'onthefly', '--select', 'kmeans',
                     '--select-features', 'x.pth', '--pretrain-weight', 'g.pth', cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count('\n') == 0 and out.stderr.startswith('error: ')
