"""Stage 3 of DiM: train classifiers only on images the generator draws, test them on the real test set.

    python validate.py --tag test --pretrain-weight results/match/model_dict_convnet.pth

Each --eval-model is trained for --epochs-eval epochs of (classes x --ipc) fresh generated images and
tested every --test-interval epochs; the table gives the final top-1 and, as the paper reports it, the
best top-1 over those tests (selected on the test set).
"""
from models import Generator
from utils.checkpoint import check_compatible, gan_configs, load_checkpoint, load_state
from utils.cli import run, stage_parser
from utils.errors import UserError
from utils.evaluate import iterations_per_epoch, validate
from utils.runlog import RunLog
from utils.runtime import autocast, resolve_amp, seed_everything, select_device, setup_backend
from utils.stage import resolve_data


def get_parser():
    p = stage_parser(__doc__.splitlines()[0], batch_size=128, epochs=250, lr=1e-4)
    p.add_argument('--pretrain-weight', default='', help='generator checkpoint (stage 1 or 2)')
    return p


def main():
    args = get_parser().parse_args()
    if not args.pretrain_weight:
        raise UserError("validate.py needs --pretrain-weight CHECKPOINT")
    ckpt = load_checkpoint(args.pretrain_weight)
    device = select_device(args.device)
    setup_backend(device, args.deterministic)
    args.amp = resolve_amp(args.amp, device)
    info, _, test_split = resolve_data(args, ckpt)
    check_compatible(ckpt, info, args.pretrain_weight)
    g_cfg, _ = gan_configs(ckpt, info, args.dim_noise, args.width)
    G = Generator(**g_cfg).to(device)
    load_state(G, ckpt['generator'], args.pretrain_weight, 'generator')
    runlog = RunLog(args)
    seed_everything(args.seed)
    iters = iterations_per_epoch(info.num_classes, args.ipc, args.batch_size, extra_iteration=False)
    print(f"validate {args.pretrain_weight} on {info.name}: ipc {args.ipc}, one epoch = {iters} iterations "
          f"x {args.batch_size} = {iters * args.batch_size} generated images, {args.epochs_eval} epochs, "
          f"device {device}, amp {args.amp}")
    try:
        results = validate(G, info, test_split, args, device, autocast(args.amp, device), runlog, step=0,
                           extra_iteration=False)
        print(f"\n| eval model | top-1 (final) | top-1 (best, selected on test) | top-5 (final) |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['top1']:.2f} | {r['best_top1']:.2f} | {r['top5']:.2f} |")
    finally:
        runlog.close()


if __name__ == '__main__':
    run(main)
