"""Stage 1 of DiM: train a class-conditional GAN (WGAN-GP critic with an auxiliary classifier).

    python gen_condense.py --data cifar10 --tag gan

Every epoch writes results/<tag>/outputs/img_<epoch>.png; every --eval-interval epochs writes
results/<tag>/model_dict_<epoch>.pth and validates the generator (classifiers trained on its images).
Epochs are numbered from 0 in file names, as the official code names them: with the defaults the
files are model_dict_9.pth, model_dict_19.pth, ..., model_dict_149.pth and img_0.png ... img_149.png.
"""
from data.datasets import to_gan_range
from utils import distributed
from utils.adversarial import discriminator_step, generator_step
from utils.checkpoint import LAST
from utils.cli import add_resume_flags, check_flags, run, stage_parser
from utils.stage import GanRun


def get_parser():
    p = stage_parser(__doc__.splitlines()[0], batch_size=128, epochs=150, lr=1e-4)
    add_resume_flags(p, save_every=2000)
    distributed.add_flags(p)
    return p


def train_iteration(nets, images, labels, ctx, gp_amp=False):
    """One GAN iteration on a real batch (uint8 images): generator step, then discriminator step."""
    real = to_gan_range(images)
    metrics = generator_step(nets.G_train, nets.D_train, nets.opt_g, labels, ctx, nets.scaler_g)
    metrics.update(discriminator_step(nets.G_train, nets.D_train, nets.opt_d, real, labels, ctx, nets.scaler_d,
                                      gp_amp=gp_amp))
    return metrics


def train(r):
    args = r.args
    print(f"stage 1: {r.info.name}, {len(r.train_split)} training images, {len(r.train_stream)} "
          f"iterations per epoch, {args.epochs} epochs, device {r.device}, {r.fast.describe()}")
    while r.epoch < args.epochs or r.validate_pending:
        if not r.validate_pending:  # else: resumed in the middle of a validation; finish it first
            bar = r.runlog.progress(r.epoch_batches(), total=len(r.train_stream) - r.epoch_iteration,
                                    desc=f'epoch {r.epoch + 1}/{args.epochs}')
            for images, labels in bar:
                r.after_iteration(train_iteration(r.nets, images, labels, r.ctx, r.fast.gp_amp))
            r.end_epoch()
            if r.epoch % args.eval_interval == 0:
                r.save(f'model_dict_{r.epoch - 1}.pth')  # the epoch's index from 0, the official name
                r.validate_pending = True
            r.save(LAST)  # before validating: a stop during validation resumes into the same validation
        if r.validate_pending:
            for name, result in r.validate().items():
                r.best[name] = max(r.best.get(name, 0.0), result['best_top1'])
            r.validate_pending = False
            r.save(LAST)
    print("done; best top-1 per eval model (selected on test): "
          + ', '.join(f'{k} {v:.2f}' for k, v in r.best.items()))


def main():
    args = get_parser().parse_args()
    check_flags(args)  # every refusal the flags alone decide, before anything is loaded
    GanRun(args, 'gen_condense', init_weight=args.weight).execute(train)


if __name__ == '__main__':
    run(main)
