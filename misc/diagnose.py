"""Why does a generator's fixed set train classifiers worse (or better) than real images? A few
measurements of one checkpoint against its real data.

    python misc/diagnose.py --pretrain-weight results/repro-digits-cpu-s1/model_dict_49.pth

- conditioning: a ConvNet-3 trained on the real training set (--epochs epochs) classifies `--per-class`
  generated images of every class; its accuracy says how often the generator draws the class it was
  asked for (weak class conditioning shows here), next to its accuracy on the real test set;
- BatchNorm mode of the generator: the same with G in train mode (batch statistics of the draw) instead
  of eval mode (running statistics, what every protocol uses);
- pixel statistics: per-channel mean and std of the generated images against the real training images
  in [0, 1], and the mean distance between two draws of the same class against two real images of the
  same class (a collapsed generator draws near-copies).
Prints a table and writes results/<tag>/diagnose.json.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.datasets import load_dataset, normalize, to_classifier_input  # noqa: E402
from utils.checkpoint import check_compatible, checkpoint_data, load_checkpoint, load_generator  # noqa: E402
from utils.cli import run  # noqa: E402
from data.errors import UserError  # noqa: E402
from utils.evaluate import build_classifier, test  # noqa: E402
from validate import write_json  # noqa: E402
from utils.runtime import seed_everything  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pretrain-weight', required=True)
    p.add_argument('--data', default=None)
    p.add_argument('--data-dir', default=None)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=5, help='epochs of the real-data ConvNet that judges the draws')
    p.add_argument('--per-class', type=int, default=100, help='generated images per class')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--tag', default=None, help='results/<tag>/diagnose.json (default: next to the checkpoint)')
    return p


def train_judge(info, train, epochs, batch_size=128):
    """A ConvNet-3 trained on the real training set (SGD 0.01, momentum 0.9, weight decay 5e-4)."""
    model = build_classifier('convnet', info, torch.device('cpu'))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(batch_size):
            loss = F.cross_entropy(model(to_classifier_input(train.images[idx], info)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def draw(G, info, per_class, train_mode):
    labels = torch.arange(info.num_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), G.dim_noise)
    z[:, :info.num_classes] = F.one_hot(labels, info.num_classes).float()
    G.train(train_mode)
    images = (G(z).float() + 1) / 2
    G.eval()
    return images.clamp(0, 1), labels


def within_class_distance(images, labels, num_classes):
    """Mean L2 distance between two different images of the same class (pairs of neighbours)."""
    d = []
    for c in range(num_classes):
        x = images[labels == c].flatten(1)
        if len(x) > 1:
            d.append((x[1:] - x[:-1]).norm(dim=1).mean())
    return float(torch.stack(d).mean())


def main():
    args = get_parser().parse_args()
    if args.per_class < 2 or args.epochs < 1:
        raise UserError("--per-class must be at least 2 and --epochs at least 1")
    seed_everything(args.seed)
    ckpt = load_checkpoint(args.pretrain_weight)
    name = args.data or checkpoint_data(ckpt)[0]
    if name is None:
        raise UserError(f"{args.pretrain_weight} is an official-format checkpoint: say its dataset with --data")
    data_dir = args.data_dir or (ckpt.get('args') or {}).get('data_dir') or './data'
    info, train, test_split = load_dataset(name, data_dir, args.img_size)
    check_compatible(ckpt, info, args.pretrain_weight)
    G = load_generator(ckpt, info, args.pretrain_weight).eval()
    judge = train_judge(info, train, args.epochs)
    ctx = torch.autocast('cpu', enabled=False)
    real_test = test(judge, test_split, info, torch.device('cpu'), ctx)[0]
    report = {'checkpoint': os.path.abspath(args.pretrain_weight), 'judge_epochs': args.epochs,
              'judge_real_test_top1': real_test}
    real = train.images.float() / 255
    report['real_pixel_mean'] = real.mean((0, 2, 3)).tolist()
    report['real_pixel_std'] = real.std((0, 2, 3)).tolist()
    report['real_within_class_distance'] = within_class_distance(real[:2000], train.labels[:2000], info.num_classes)
    for mode, train_mode in (('eval', False), ('train', True)):
        images, labels = draw(G, info, args.per_class, train_mode)
        with torch.no_grad():
            pred = judge(normalize(images, info.mean, info.std)).argmax(1)
        per_class = [float((pred[labels == c] == c).float().mean()) * 100 for c in range(info.num_classes)]
        report[f'G_{mode}_mode'] = {
            'conditioning_top1': float((pred == labels).float().mean()) * 100,
            'conditioning_top1_per_class': per_class,
            'pixel_mean': images.mean((0, 2, 3)).tolist(), 'pixel_std': images.std((0, 2, 3)).tolist(),
            'within_class_distance': within_class_distance(images, labels, info.num_classes)}
    path = os.path.join(os.path.dirname(os.path.abspath(args.pretrain_weight)) if args.tag is None
                        else os.path.join('results', args.tag), 'diagnose.json')
    write_json(report, path)
    print(f"real-data ConvNet-3 ({args.epochs} epochs): {real_test:.1f}% on the real test set")
    for mode in ('eval', 'train'):
        r = report[f'G_{mode}_mode']
        print(f"G in {mode} mode: the judge gives the asked class to {r['conditioning_top1']:.1f}% of the draws "
              f"(worst class {min(r['conditioning_top1_per_class']):.0f}%); pixel mean "
              f"{[round(v, 3) for v in r['pixel_mean']]} std {[round(v, 3) for v in r['pixel_std']]}; "
              f"within-class distance {r['within_class_distance']:.2f}")
    print(f"real training images: pixel mean {[round(v, 3) for v in report['real_pixel_mean']]} std "
          f"{[round(v, 3) for v in report['real_pixel_std']]}; within-class distance "
          f"{report['real_within_class_distance']:.2f}\nwrote {path}")


if __name__ == '__main__':
    run(main)
