"""Every result row of docs/RESULTS.md for one dataset: DiM after stage 1 and after stages 1 + 2, under
both protocols, beside a random real subset and the full training set, all through the same code.

    python misc/reproduce.py digits                      # the cpu schedule (2 CPU cores)
    python misc/reproduce.py mnist --data-dir data       # torchvision MNIST under data/
    python misc/reproduce.py cifar10-jpeg --data-dir /scratch/cifar10-jpeg   # shared/datasets' JPEG copy
    python misc/reproduce.py cifar10 --schedule paper    # the paper's schedule, for a GPU
    python misc/reproduce.py digits --collect            # only gather the finished rows into docs/
    python misc/reproduce.py digits --labels soft --resume   # add the soft-label rows to a finished run

It runs the three scripts as a user would (subprocesses, tags repro-<dataset>-<schedule>-*), so each
step is resumable: after an interruption, run the same command with --resume; a finished step (its
final checkpoint or eval.json exists) is skipped, a stopped stage continues where it stopped. Without
--resume it refuses to touch an earlier run's results. It prints the schedule, and the wall
time of every step; at the end it writes docs/results.json and docs/RESULTS.md (all datasets found) and
copies the final sample grids to figs/.

Evaluation rows use held-out real training images for selection (--val-per-class), several seeds each
drawing its own set (--num-eval), and the generator of the last epoch of each stage (no selection on
the test set anywhere in the pipeline).

--select kmeans (or --select random kmeans) adds the fixed-set and random-real rows with their sets
chosen by k-means in the teacher's features (validate.py --select kmeans), tags ending in -kmeans.

--labels soft (or --labels hard soft) adds rows trained on a teacher's soft labels (validate.py
--soft-labels): first the teacher (the full row's first classifier, kept with --save-classifier; when the
full row ran without keeping one, a one-seed row of its own, tag `teacher`; a schedule with teacher_epochs
trains one per length and keeps the best on held-out images), then, at each ipc, the soft
twin of every hard row but the full one (tags ending in -soft), at the default temperature. --teacher PATH
takes a classifier file kept by another run instead.

--only TAG... runs those rows alone: two one-thread processes can share a reproduction (one training stage
1 and its DiM rows, the other --only real-image rows, which train no generator).

--schedule cpu-3x (MNIST, stage 1 three times longer) runs the DiM rows only, read beside the cpu schedule's
real-image rows; its teacher is the one the cpu schedule's run kept.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS_JSON = os.path.join(ROOT, 'docs', 'results.json')
RESULTS_MD = os.path.join(ROOT, 'docs', 'RESULTS.md')

from misc.schedules import (KMEANS_SUFFIX, SCHEDULES, SOFT_SUFFIX, TEACHER_FILE, TEACHER_TAG, beside,  # noqa: E402
                            schedule_for)

# Datasets of this script that the stages read under another --data: the lossy JPEG copy of CIFAR-10 in
# shared/datasets is an image folder (train/<class>/, test/<class>/), kept apart from real CIFAR-10 so
# that its numbers are never mistaken for the original's.
IMAGE_FOLDERS = {'cifar10-jpeg': 'the extracted cifar10-jpeg folder (train/<class>/*.jpg, test/<class>/*.jpg)'}


def run(script, *flags, log):
    """Run one of the repository's scripts; stop the whole reproduction if it fails."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
    print('$ ' + ' '.join(cmd[1:]), flush=True)
    start = time.time()
    with open(log, 'a') as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if code != 0:
        raise SystemExit(f"error: {script} exited with {code}; see {log}. Run the same command with --resume to continue.")
    print(f"  done in {seconds / 60:.1f} min", flush=True)
    return seconds


class Reproduction:
    def __init__(self, args):
        self.args = args
        self.dataset, self.schedule_name = args.dataset, args.schedule
        self.s = schedule_for(args.dataset, args.schedule)
        self.prefix = f'repro-{self.dataset}-{self.schedule_name}'
        self.results = os.path.join(ROOT, 'results')
        self.log = os.path.join(ROOT, 'logs', f'{self.prefix}.log')
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        data = 'imagefolder' if self.dataset in IMAGE_FOLDERS else self.dataset
        self.common = ['--data', data, '--device', args.device, '--no-progress']
        if args.data_dir:
            self.common += ['--data-dir', args.data_dir]
        self.times_path = os.path.join(self.results, f'{self.prefix}-times.json')
        self.times = json.load(open(self.times_path)) if os.path.exists(self.times_path) else {}
        # classifiers other than the schedule's are rows of their own: their tags carry the model names
        self.models = tuple(args.eval_model or self.s['eval_models'])
        self.model_suffix = '' if self.models == tuple(self.s['eval_models']) else '-' + '-'.join(self.models)
        self.labels = tuple(getattr(args, 'labels', None) or ('hard',))
        self.selects = tuple(getattr(args, 'select', None) or ('random',))
        self.only = getattr(args, 'only', None)
        self.given_teacher = getattr(args, 'teacher', None)
        # a variant schedule (cpu-3x) runs its DiM rows only: the real-image rows and the teacher are its base's
        self.base = beside(self.dataset, self.schedule_name)

    def started(self):
        """Whether an earlier run of this reproduction left anything under results/."""
        return bool(glob.glob(os.path.join(self.results, f'{self.prefix}-*')))

    def path(self, tag, name):
        return os.path.join(self.results, f'{self.prefix}-{tag}', name)

    def timed(self, key, seconds):
        """Add a step's wall time (summed over resumed parts) and the commit it ran at."""
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
        if os.path.exists(self.times_path):  # another process of this reproduction (--only) may have added steps
            with open(self.times_path) as f:
                self.times = json.load(f)
        before = self.times.get(key, {}).get('seconds', 0.0)
        self.times[key] = {'seconds': before + seconds, 'commit': commit}
        os.makedirs(self.results, exist_ok=True)
        with open(self.times_path, 'w') as f:
            json.dump(self.times, f, indent=1)

    def stage(self, key, script, tag, flags, done):
        if os.path.exists(done):
            print(f"{key}: done ({os.path.relpath(done, ROOT)})")
            return
        resume = ['--resume'] if os.path.exists(self.path(tag, 'last.pth')) else []
        self.timed(key, run(script, *self.common, '--tag', f'{self.prefix}-{tag}', *flags, *resume, log=self.log))

    def stage1(self):
        st = self.s['stage1']
        flags = ['--width', self.s['width'], '--epochs', st['epochs'], '--lr', st['lr'],
                 '--batch-size', st['batch_size'], '--eval-interval', st['epochs'], *self.stage_eval_flags()]
        final = self.path('s1', f"model_dict_{st['epochs'] - 1}.pth")
        self.stage('stage1', 'gen_condense.py', 's1', flags, final)
        return final

    def stage2(self, weight):
        st = self.s['stage2']
        flags = ['--weight', weight, '--match', 'logit', '--match-aug', '--epochs', st['epochs'], '--lr', st['lr'],
                 '--batch-size', st['batch_size'], '--epochs-match-train', st['epochs_match_train'],
                 '--eval-interval', st['epochs'], *self.stage_eval_flags()]
        final = self.path('s2', 'final.pth')
        self.stage('stage2', 'pool_match.py', 's2', flags, final)
        if not os.path.exists(final):  # the generator of the last epoch, not the one selected on test
            shutil.copyfile(self.path('s2', 'last.pth'), final)
        return final

    def stage_eval_flags(self):
        """The validation each stage runs after its last epoch (one ConvNet, printed in its log)."""
        return ['--eval-model', 'convnet', '--ipc', self.s['stage_eval_ipc'], *self.eval_flags()]

    def eval_flags(self):
        e = self.s['eval']
        return ['--epochs-eval', e['epochs_eval'], '--test-interval', e['test_interval']]

    def evaluate(self, key, tag, flags):
        e = self.s['eval']
        key, tag = key + self.model_suffix, tag + self.model_suffix
        report = self.path(tag, 'eval.json')
        if os.path.exists(report):
            print(f"{key}: done")
            return
        self.timed(key, run('validate.py', *self.common, '--tag', f'{self.prefix}-{tag}', *self.eval_flags(),
                            '--num-eval', e['num_eval'], '--val-per-class', e['val_per_class'],
                            # --stack: the published rows trained their seeds stacked (the same numbers
                            # up to float rounding as one after another; this keeps reruns bit-identical)
                            '--stack', '--eval-model', *self.models, *flags, log=self.log))

    def rows(self, generators=None, labels=None, selects=None):
        """(tag, validate.py flags) of every evaluation row of the schedule asked for (--rows, --labels,
        --select), in the order they run: ipc 1 and 10, the full training set, then ipc 50 (the cheapest rows
        first). Without generators, labels and selects, only the tags are right (for checking --only)."""
        generators = generators or {'1': None, **({'1+2': None} if self.s.get('stage2') else {})}
        labels = labels or [(SOFT_SUFFIX if mode == 'soft' else '', []) for mode in self.labels]
        # which images the fixed sets keep: (tag suffix, validate.py flags); on-the-fly rows keep none
        selects = selects or [(KMEANS_SUFFIX if mode == 'kmeans' else '', []) for mode in self.selects]
        ipcs = [i for i in self.s['ipcs'] if i <= 10] + ['full'] + [i for i in self.s['ipcs'] if i > 10]
        for ipc in ipcs:
            if self.args.rows and str(ipc) not in self.args.rows:
                continue
            if ipc == 'full':  # hard labels only: the full row is where the teacher comes from
                if 'hard' in self.labels and not self.base:
                    yield 'full', self.full_flags()
                continue
            for suffix, flags in labels:
                for stages, weight in generators.items():
                    dim = f"dim-s{stages.replace('+', '')}"
                    yield (f"{dim}-onthefly-ipc{ipc}{suffix}",
                           ['--pretrain-weight', weight, '--protocol', 'onthefly', '--ipc', ipc, *flags])
                    for chosen, select in selects:
                        yield (f"{dim}-fixed-ipc{ipc}{chosen}{suffix}",
                               ['--pretrain-weight', weight, '--protocol', 'fixed', '--ipc', ipc, *select, *flags])
                for chosen, select in selects if not self.base else ():
                    yield f'random-ipc{ipc}{chosen}{suffix}', ['--baseline', 'random', '--ipc', ipc, *select, *flags]

    def full_flags(self):
        return ['--baseline', 'full', '--epochs-eval', self.s['full_epochs'],
                '--test-interval', max(1, self.s['full_epochs'] // 3)]

    def teacher(self):
        """The soft rows' teacher file, trained first if need be: the full row keeps its first classifier
        (--save-classifier) when it has yet to run; a full row that ran without keeping one gets a teacher
        row of its own (one seed, the full row's recipe). A schedule with teacher_epochs trains its own."""
        if self.base:
            return self.base_teacher()
        if self.s.get('teacher_epochs'):
            return self.teacher_chosen_on_held_out(self.s['teacher_epochs'])
        kept = self.path('full' + self.model_suffix, TEACHER_FILE)
        if os.path.exists(kept) or not os.path.exists(self.path('full' + self.model_suffix, 'eval.json')):
            self.evaluate('eval full', 'full', self.full_flags() + ['--save-classifier', kept])
            return kept
        own = self.path(TEACHER_TAG + self.model_suffix, TEACHER_FILE)
        # --num-eval 1 after evaluate()'s own --num-eval: the last one given counts
        self.evaluate(f'eval {TEACHER_TAG}', TEACHER_TAG,
                      self.full_flags() + ['--num-eval', 1, '--save-classifier', own])
        return own

    def base_teacher(self):
        """A variant schedule's teacher: the one its base schedule's run kept (the same full-set recipe)."""
        base = f'repro-{self.dataset}-{self.base}'
        # the two files teacher() keeps: the full row's classifier, or its own teacher row's
        for tag in ('full', TEACHER_TAG):
            path = os.path.join(self.results, f'{base}-{tag}{self.model_suffix}', TEACHER_FILE)
            if os.path.exists(path):
                return path
        raise SystemExit(f"error: the {self.schedule_name} schedule takes its teacher from the {self.base} schedule's run, "
                         f"which kept none under results/{base}-*: run misc/reproduce.py {self.dataset} --schedule "
                         f"{self.base} --labels soft (or --select kmeans) first, or give --teacher")

    def teacher_chosen_on_held_out(self, candidates):
        """A teacher longer trained than the full row: one seed of the full-set recipe per candidate number
        of epochs (tags teacher-e<E>), each tested once, after its last epoch; the one whose top-1 on the
        held-out real training images is highest teaches (the fewest epochs on a tie). Never chosen on
        the test set."""
        held_out, files = {}, {}
        for epochs in candidates:
            tag = f'{TEACHER_TAG}-e{epochs}'
            files[epochs] = self.path(tag + self.model_suffix, TEACHER_FILE)
            # the flags given last count: one seed, the candidate's epochs, one test at the end
            self.evaluate(f'eval {tag}', tag, self.full_flags() + ['--num-eval', 1, '--epochs-eval', epochs,
                                                                   '--test-interval', epochs,
                                                                   '--save-classifier', files[epochs]])
            with open(self.path(tag + self.model_suffix, 'eval.json')) as f:
                held_out[epochs] = json.load(f)['rows'][0]['val_top1'][0]
        chosen = max(candidates, key=lambda e: (held_out[e], -e))
        print(f"teacher: {chosen} epochs (held-out top-1 "
              f"{', '.join(f'{e} epochs {acc:.2f}' for e, acc in held_out.items())})", flush=True)
        return files[chosen]

    def all(self):
        print(f"{self.dataset}, schedule {self.schedule_name}: {json.dumps(self.s)}")
        print(f"log of every step: {os.path.relpath(self.log, ROOT)}")
        # rows of real images alone (--only random-ipc10 full) need no generator: the stages run for DiM rows
        wanted = [tag for tag, _ in self.rows() if not self.only or tag in self.only]
        generators = None
        if any(tag.startswith('dim-') for tag in wanted):
            generators = {'1': self.stage1()}
            if self.s.get('stage2'):
                generators['1+2'] = self.stage2(generators['1'])
        # each set of labels asked for: (tag suffix, extra validate.py flags); the teacher comes first
        labels = [('', [])] if 'hard' in self.labels else []
        teacher = None
        if 'soft' in self.labels or 'kmeans' in self.selects:
            teacher = self.given_teacher or self.teacher()
        if 'soft' in self.labels:
            labels.append((SOFT_SUFFIX, ['--soft-labels', teacher]))
        # --select kmeans clusters in the teacher's features (the full-set classifier)
        selects = [(KMEANS_SUFFIX, ['--select', 'kmeans', '--select-features', teacher]) if mode == 'kmeans'
                   else ('', []) for mode in self.selects]
        for tag, flags in self.rows(generators, labels, selects):
            if not self.only or tag in self.only:
                self.evaluate(f'eval {tag}', tag, flags)
        grids = sorted(glob.glob(self.path('s1', os.path.join('outputs', 'img_*.png'))),
                       key=lambda p: int(p.rsplit('_', 1)[1][:-4]))
        if grids:
            shutil.copyfile(grids[-1], os.path.join(ROOT, 'figs', f'{self.dataset}_{self.schedule_name}_stage1.png'))
        grids2 = sorted(glob.glob(self.path('s2', os.path.join('outputs', 'img_*.png'))),
                        key=lambda p: int(p.rsplit('_', 1)[1][:-4]))
        if grids2:
            shutil.copyfile(grids2[-1], os.path.join(ROOT, 'figs', f'{self.dataset}_{self.schedule_name}_stage2.png'))


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('dataset', help='digits, mnist, cifar10-jpeg (cpu schedule) or any dataset of gen_condense.py (paper)')
    p.add_argument('--schedule', default='cpu', choices=tuple(SCHEDULES),
                   help="cpu: 2 CPU cores; cpu-3x: MNIST's with 3x stage 1 (misc/schedules.py); paper: the official")
    p.add_argument('--data-dir', default=None, help='passed to every script')
    p.add_argument('--device', default='auto')
    p.add_argument('--rows', nargs='+', default=None, metavar='ROW',
                   help="only these rows: ipc values and/or 'full' (default: every row of the schedule); "
                        "the stages they need still run (or are skipped when done)")
    p.add_argument('--only', nargs='+', default=None, metavar='TAG',
                   help="only the evaluation rows of these tags (results/repro-DATASET-SCHEDULE-TAG without the "
                        "-MODEL suffix, e.g. dim-s12-fixed-ipc50 random-ipc50-soft), among those --rows and "
                        "--labels select; the stages and the teacher they need still run")
    p.add_argument('--eval-model', nargs='+', default=None, metavar='MODEL',
                   help="classifiers of the evaluation rows (default: the schedule's); other than the "
                        "schedule's, they are rows of their own (tags ending in -MODEL)")
    p.add_argument('--labels', nargs='+', default=['hard'], choices=('hard', 'soft'),
                   help="hard: the rows on the sets' own labels; soft: the same rows (but the full one) on the "
                        "labels of a teacher trained on the full training set (validate.py --soft-labels), "
                        "tags ending in -soft; the teacher is trained first if no row kept one")
    p.add_argument('--select', nargs='+', default=['random'], choices=('random', 'kmeans'),
                   help="random: the fixed sets and the real subsets drawn at random; kmeans: the same rows with "
                        "their sets chosen by k-means in the teacher's features (validate.py --select kmeans), tags "
                        "ending in -kmeans; the teacher is trained first if no row kept one")
    p.add_argument('--teacher', default=None, metavar='PATH',
                   help="a classifier file (validate.py --save-classifier) to use as the teacher of --labels soft and "
                        "--select kmeans instead of training one (default: the full row's, or a variant schedule's "
                        "base schedule's)")
    p.add_argument('--resume', action='store_true',
                   help='continue the earlier run of this reproduction (also to add rows or models to it): '
                        'finished steps are skipped, a stopped stage continues where it stopped')
    p.add_argument('--collect', action='store_true', help='only write docs/results.json and docs/RESULTS.md')
    return p


def main():
    args = get_parser().parse_args()
    if args.eval_model:
        from models import list_models
        unknown = [m for m in args.eval_model if m not in list_models()]
        if unknown:
            raise SystemExit(f"error: --eval-model {' '.join(unknown)}: not a model; choose from {', '.join(list_models())}")
    if args.rows:
        known = [str(i) for i in schedule_for(args.dataset, args.schedule)['ipcs']] + ['full']
        unknown = [r for r in args.rows if r not in known]
        if unknown:
            raise SystemExit(f"error: --rows {' '.join(unknown)}: this schedule's rows are {', '.join(known)}")
    if args.teacher and not os.path.isfile(args.teacher):
        raise SystemExit(f"error: --teacher {args.teacher}: no such file (validate.py --save-classifier writes one)")
    if args.dataset in IMAGE_FOLDERS and not args.data_dir and not args.collect:
        raise SystemExit(f"error: {args.dataset} needs --data-dir: {IMAGE_FOLDERS[args.dataset]}")
    if not args.collect:
        reproduction = Reproduction(args)
        unknown = sorted(set(args.only or ()) - {tag for tag, _ in reproduction.rows()})
        if unknown:
            raise SystemExit(f"error: --only {' '.join(unknown)}: not a row of this schedule, --rows and --labels; "
                             f"its rows are {', '.join(tag for tag, _ in reproduction.rows())}")
        if reproduction.started() and not args.resume:
            raise SystemExit(f"error: results/{reproduction.prefix}-* hold an earlier run of this reproduction; "
                             "add --resume to continue it, or move them away to start over")
        reproduction.all()
    from misc.results import collect
    collect(os.path.join(ROOT, 'results'), RESULTS_JSON, RESULTS_MD)


if __name__ == '__main__':
    main()
