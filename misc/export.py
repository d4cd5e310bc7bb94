"""Write a fixed distilled set drawn from a DiM generator, for other benchmarks to load.

    python misc/export.py --pretrain-weight results/match/model_dict_convnet.pth --ipc 10 [--out DIR] [--seed S] [--png]
                          [--soft-labels TEACHER]

DIR (default results/export/<dataset>_ipc<N>_seed<S>) receives
  images.pt  float32 [N * classes, C, H, W], class-major (all of class 0, then class 1, ...),
             normalised with the dataset statistics: (x - mean) / std with x in [0, 1]
  labels.pt  int64 [N * classes]
  meta.json  dataset, mean, std, ipc, seed, shapes, generator checkpoint path and sha256
  png/<class>/<index>.png  with --png: the same images de-normalised to [0, 1], one folder per class
  soft_labels.pt  with --soft-labels TEACHER: float32 [N * classes, classes], the teacher's logits for
             each image (eval mode, not augmented, not divided by a temperature): what DD-Ranking's
             soft-label mode "S" reads as the stored labels of a set (its loss applies the temperature)
The images are exactly those `validate.py --protocol fixed --set-seed S` trains on (one drawing
function, validate.draw_fixed_set). See docs/EVALUATION.md.
"""
import hashlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python misc/export.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.datasets import DATASET_CHOICES, DATASETS, IMAGEFOLDER, info_from_dict, load_dataset  # noqa: E402
from utils.checkpoint import check_compatible, is_official, load_checkpoint, load_generator, load_teacher  # noqa: E402
from utils.cli import OneLineParser, run  # noqa: E402
from data.errors import UserError  # noqa: E402
from validate import DRAW_CHUNK, draw_fixed_set, write_json  # noqa: E402
from utils.runtime import select_device  # noqa: E402

EXPORT_FORMAT = 'dim-export/1'


def get_parser():
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument('--pretrain-weight', required=True, help='generator checkpoint (stage 1 or 2)')
    p.add_argument('--ipc', type=int, required=True, help='images per class')
    p.add_argument('--out', default=None, help='output folder (default: results/export/<dataset>_ipc<N>_seed<S>)')
    p.add_argument('--seed', type=int, default=3407, help='seed of the noise (validate.py --set-seed)')
    p.add_argument('--png', action='store_true', help='also write png/<class>/<index>.png')
    p.add_argument('--soft-labels', default=None, metavar='TEACHER',
                   help='also write soft_labels.pt: the logits of TEACHER (a validate.py --save-classifier file) '
                        'for every image, [N, classes], as DD-Ranking\'s soft-label mode reads them')
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'))
    g = p.add_argument_group('only for checkpoints in the official format (they do not record these)')
    g.add_argument('--data', default=None, metavar='{' + ','.join(DATASET_CHOICES) + '}')
    g.add_argument('--data-dir', default='./data', help='dataset root (imagefolder: to compute its statistics)')
    g.add_argument('--img-size', type=int, default=32, choices=(28, 32), help='image size for imagefolder')
    g.add_argument('--dim-noise', type=int, default=100, help='ignored: the checkpoint\'s tensors give it')
    g.add_argument('--width', type=int, default=196, help='ignored: the checkpoint\'s tensors give it')
    return p


def dataset_info(args, ckpt):
    """The dataset facts: from the checkpoint, else from --data (official checkpoints store none)."""
    if not is_official(ckpt):
        info = info_from_dict(ckpt['dataset'])
        if args.data and args.data != info.name:
            raise UserError(f"{args.pretrain_weight} was trained on {info.name}, not --data {args.data}")
        return info
    if not args.data:
        raise UserError(f"{args.pretrain_weight} is an official-format checkpoint: give --data")
    if args.data == IMAGEFOLDER:
        return load_dataset(IMAGEFOLDER, args.data_dir, args.img_size)[0]
    if args.data not in DATASETS:
        raise UserError(f"unknown dataset '{args.data}'; choose from: {', '.join(DATASET_CHOICES)}")
    return DATASETS[args.data]


@torch.no_grad()
def teacher_outputs(teacher, images, device, chunk=DRAW_CHUNK):
    """The teacher's logits for every image of a set, float32 on the CPU (the teacher is in eval mode:
    each image is labelled alone, so the chunking changes nothing)."""
    return torch.cat([teacher(part.to(device)).float().cpu() for part in images.split(chunk)])


def export(G, info, ipc, seed, out, device, checkpoint, png=False, teacher=None):
    """Draw the set and write images.pt, labels.pt, meta.json (and png/; with `teacher`, (model,
    description) of utils.checkpoint.load_teacher, soft_labels.pt). Returns (images, labels)."""
    images, labels = draw_fixed_set(G, info, ipc, seed, device)
    images, labels = images.cpu().contiguous(), labels.cpu().long()
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
    torch.save(images, os.path.join(out, 'images.pt'))
    torch.save(labels, os.path.join(out, 'labels.pt'))
    if teacher is not None:
        torch.save(teacher_outputs(teacher[0], images, device), os.path.join(out, 'soft_labels.pt'))
    if png:
        import torchvision

        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        pixels = (images * std + mean).clamp(0, 1)
        width = len(str(info.num_classes - 1))
        for c in range(info.num_classes):
            folder = os.path.join(out, 'png', str(c).zfill(width))  # sorted names = class order
            os.makedirs(folder, exist_ok=True)
            for i, img in enumerate(pixels[labels == c]):
                torchvision.utils.save_image(img, os.path.join(folder, f'{i:05d}.png'))
    with open(checkpoint, 'rb') as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    write_json({
        'format': EXPORT_FORMAT,
        'dataset': info.name,
        'num_classes': info.num_classes,
        'channels': info.channels,
        'img_size': info.img_size,
        'mean': list(info.mean),
        'std': list(info.std),
        'normalised': 'images.pt holds (x - mean) / std per channel, x in [0, 1]',
        'order': 'class-major: rows [c * ipc, (c + 1) * ipc) are class c',
        'ipc': ipc,
        'seed': seed,
        'images_shape': list(images.shape),
        'generator_checkpoint': os.path.abspath(checkpoint),
        'generator_sha256': sha256,
        'png': png,
        'soft_labels': None if teacher is None else {
            'file': 'soft_labels.pt', 'shape': [len(labels), info.num_classes],
            'what': "the teacher's logits (pre-softmax, no temperature) of each image of images.pt, in eval mode",
            'teacher': teacher[1]},
    }, os.path.join(out, 'meta.json'))
    return images, labels


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {args.ipc}")
    ckpt = load_checkpoint(args.pretrain_weight)
    info = dataset_info(args, ckpt)
    check_compatible(ckpt, info, args.pretrain_weight)  # an official file: its sizes against --data
    device = select_device(args.device)
    G = load_generator(ckpt, info, args.pretrain_weight, device)
    teacher = load_teacher(args.soft_labels, info, device) if args.soft_labels else None
    out = args.out or os.path.join('results', 'export', f'{info.name}_ipc{args.ipc}_seed{args.seed}')
    images, _ = export(G, info, args.ipc, args.seed, out, device, args.pretrain_weight, args.png, teacher)
    print(f"wrote {len(images)} images ({args.ipc} per class, {info.name}) to {out}: images.pt, labels.pt, "
          f"{'soft_labels.pt, ' if teacher else ''}meta.json{', png/' if args.png else ''}")


if __name__ == '__main__':
    run(main)
