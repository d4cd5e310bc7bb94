"""How much of the repository one step of each stage runs: the files and functions a reader follows.

    python misc/reading_path.py            # digits, tiny widths, on the CPU; about a minute

For one stage-1 iteration and one stage-2 iteration (the second of the run, so one-off set-up is
out) it records, with sys.setprofile, every function of this repository that runs between the
loop's fetch of a batch and its next fetch: the step, the bookkeeping after it, and what those call.
For `validate.py --protocol fixed --num-eval 3` it records every repository function of the whole
run. It prints the count of files and functions, in all and outside models/ (the models package,
which issue 26's goals leave out), and lists them: the measure of issues 12 and 26.
tests/test_reading_path.py keeps the validate.py run from growing back (VALIDATE_CEILING).
"""
import os
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import gen_condense  # noqa: E402
import pool_match  # noqa: E402
import validate  # noqa: E402

SKIP = (os.path.join(ROOT, '.venv'), os.path.join(ROOT, 'tests'), os.path.join(ROOT, 'misc'))
MODELS = 'models' + os.sep
# a validate.py run reads at most this many files and functions outside models/: issue 26's 60, raised to
# 62 by issues 42 and 44 (the report and the set building each a function of their own, so that
# run_evaluation reads as a page; the tensorboard curves add none)
VALIDATE_GOAL = {'files': 8, 'functions': 62}
# what the run reads now, which tests/test_reading_path.py keeps it from exceeding: the goal. Of the 62
# functions, 41 are in data/, utils/augment.py, cli, runtime, run and checkpoint, and 21 in validate.py and
# utils/evaluate.py (no cache in the path any more, so a first run in a fresh process counts the same)
VALIDATE_CEILING = {'files': 8, 'functions': 62}
# issue 26's goals for one iteration of the GAN stages (stage 1: at most 4 files outside models/; stage 2:
# at most 5 files and 30 functions), which they meet and the test suite holds them to: stage 2's 30
# functions are 4 in pool_match.py, 6 in gen_condense.py, 5 in data/, 5 in utils/run.py (the print every
# --print-freq steps included: this measure prints every step) and 10 in utils/augment.py, of which 7 are
# the DSA ops, their shift and their random draw
STAGE_GOAL = {'stage1': {'files': 4}, 'stage2': {'files': 5, 'functions': 30}}
STAGE_CEILING = {'stage1': {'files': 4, 'functions': 15}, 'stage2': {'files': 5, 'functions': 30}}


class Recorder:
    """Repository functions called while `on`, as {file: {function}}, and the calls back into the
    script from the rest of the repository (a callback: the reader jumps back into the script from
    inside a utils/ function)."""

    def __init__(self, script=None):
        self.on, self.seen, self.callbacks = False, defaultdict(set), 0
        self.script = os.path.abspath(script.__file__) if script is not None else None

    def __call__(self, frame, event, arg):
        if event != 'call' or not self.on:
            return
        code = frame.f_code
        if code.co_filename.startswith('<'):
            return  # frozen standard-library modules and generated dataclass methods
        path = os.path.abspath(code.co_filename)
        if not path.startswith(ROOT + os.sep) or path.startswith(SKIP):
            return
        name = code.co_qualname if hasattr(code, 'co_qualname') else code.co_name
        if code.co_name.startswith('<') and code.co_name != '<lambda>':
            return  # comprehensions and module bodies are part of the function around them
        self.seen[os.path.relpath(path, ROOT)].add(name)
        caller = os.path.abspath(frame.f_back.f_code.co_filename) if frame.f_back is not None else ''
        if path == self.script and caller != path and caller.startswith(ROOT + os.sep):
            self.callbacks += 1

    def report(self, title):
        """Print the counts and the functions per file; return the counts, {'files', 'functions',
        'files_all', 'functions_all'}: outside models/, and in all."""
        outside = [path for path in self.seen if not path.startswith(MODELS)]
        counts = {'files': len(outside), 'functions': sum(len(self.seen[p]) for p in outside),
                  'files_all': len(self.seen), 'functions_all': sum(len(v) for v in self.seen.values())}
        print(f"{title}: {counts['files']} files, {counts['functions']} functions outside models/ "
              f"({counts['files_all']} files, {counts['functions_all']} functions in all), {self.callbacks} calls "
              f"back into the script from other repository files")
        for path in sorted(self.seen):
            print(f"  {path}: {', '.join(sorted(self.seen[path]))}")
        return counts


def second_iteration(script, argv, title):
    """Record from the loop's second batch fetch to its third."""
    recorder = Recorder(script)
    fetches = {'n': 0}
    import data.datasets as datasets
    original = datasets.BatchStream.batches

    def batches(self, order, start=0):
        for item in original(self, order, start):
            fetches['n'] += 1
            recorder.on = fetches['n'] == 2
            yield item
            recorder.on = False
    datasets.BatchStream.batches = batches
    sys.argv = [script.__file__] + argv
    sys.setprofile(recorder)
    try:
        script.main()
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
        datasets.BatchStream.batches = original
    return recorder.report(title)


def whole_run(script, argv, title):
    recorder = Recorder(script)
    recorder.on = True
    argv_before, sys.argv = sys.argv, [script.__file__] + argv
    sys.setprofile(recorder)
    try:
        script.main()
    finally:
        sys.setprofile(None)
        sys.argv = argv_before
    return recorder.report(title)


def validate_run(weight, out):
    """The whole of `validate.py --protocol fixed --num-eval 3` on the generator checkpoint `weight`
    (digits, ipc 1, 2 epochs, on the CPU), writing under `out`; returns its counts."""
    return whole_run(validate, ['--device', 'cpu', '--no-progress', '--output-dir', out, '--logs-dir', out, '--tag',
                                'v', '--pretrain-weight', weight, '--protocol', 'fixed', '--num-eval', '3', '--ipc',
                                '1', '--epochs-eval', '2', '--test-interval', '1'],
                     'validate.py --protocol fixed --num-eval 3')


def stage_iterations(out):
    """One stage-1 and one stage-2 iteration (digits, width 8, on the CPU, printing every step), writing
    under `out`; returns ({'stage1': counts, 'stage2': counts}, the stage-1 checkpoint)."""
    common = ['--data', 'digits', '--device', 'cpu', '--width', '8', '--no-progress', '--output-dir', out,
              '--logs-dir', out, '--print-freq', '1', '--eval-model', 'convnet', '--epochs-eval', '1',
              '--ipc', '1']
    stage1 = second_iteration(gen_condense, common + ['--tag', 's1', '--epochs', '1', '--batch-size', '512',
                                                      '--eval-interval', '1'], 'one stage-1 iteration')
    weight = os.path.join(out, 's1', 'model_dict_0.pth')
    stage2 = second_iteration(pool_match, common + ['--tag', 's2', '--epochs', '1', '--batch-size', '512',
                                                    '--weight', weight, '--match-aug', '--epochs-match-train', '2',
                                                    '--pool', 'convnet', '--eval-interval', '1'],
                              'one stage-2 iteration')
    return {'stage1': stage1, 'stage2': stage2}, weight


def main():
    out = tempfile.mkdtemp(prefix='reading-path-')
    stages, weight = stage_iterations(out)
    for name, counts in stages.items():
        print(f"issue 26's goal for {name}: {STAGE_GOAL[name]} outside models/; measured {counts['files']} files "
              f"and {counts['functions']} functions (the test suite holds it to {STAGE_CEILING[name]})")
    counts = validate_run(weight, out)
    print(f"the goal for the validate.py run: at most {VALIDATE_GOAL['files']} files and "
          f"{VALIDATE_GOAL['functions']} functions outside models/; measured {counts['files']} and "
          f"{counts['functions']} (the test suite holds it to {VALIDATE_CEILING['files']} and "
          f"{VALIDATE_CEILING['functions']})")
    lines = {d: sum(1 for f in os.listdir(os.path.join(ROOT, d)) if f.endswith('.py')
                    for _ in open(os.path.join(ROOT, d, f))) for d in ('utils', 'data', 'models')}
    print('lines of .py files: ' + ', '.join(f'{d}/ {n}' for d, n in lines.items()))


if __name__ == '__main__':
    main()
