"""The prepared device check: everything a first contact with one GPU (H100 / H200) should measure, in one
command that ends within about 8 minutes.

    python misc/gpu_check.py                    # on the GPU; writes to $OUT if set, else ./gpu_check
    python misc/gpu_check.py --cpu --out /tmp/c # the same code paths on the CPU, in about a minute
    python misc/gpu_check.py --parts bench      # some parts only

Parts, in this order (each one's failure is recorded and the next one still runs):
  tests     the whole test suite with DIM_TEST_DEVICE=cuda, not stopping at the first failure
            (--cpu: tests/test_graphs.py on the CPU, which checks the same invocation and its parsing)
  bench     misc/benchmark.py on CIFAR shapes: stage 1, stage 2 with a ConvNet-3 and a ResNet-18 pool model,
            validation; the plain path, each speed switch alone and their bundle: median ms per iteration
            (CUDA events, after warm-up), the ratio to plain, how far each one's losses are from plain fp32
            after the same iterations, operators and host syncs per iteration (--cpu: misc/benchmark.py --quick)
  pipeline  the three stages chained as the README runs them (gen_condense.py, pool_match.py --match logit
            --match-aug --weight CKPT, validate.py --pretrain-weight CKPT), one short pass on digits
            (--cpu: width 8, one GAN epoch, two validation epochs, one pool step per iteration)
Writes gpu_check.json (everything), gpu_check.md (the tables) and one log per part to the output folder,
with the GPU's name and the torch version. Exit status: the number of parts that failed.

Time on one H200, estimated from the per-iteration figures measured there before (stage 1 41 ms, stage 2
96 ms with ConvNet-3 and 266 ms with ResNet-18, validation 6 ms): the bench part runs each loop about 41
times per config (1 FLOP count, 3 checked, 5 warm-up, 30 timed, 2 counted), 7-8 configs: about 3 minutes;
the CPU suite takes 4-5 minutes on 2 cores and is capped at --tests-timeout (300 s); the pipeline under a
minute.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PARTS = ('tests', 'bench', 'pipeline')
# one short pass of the README's three commands, on digits (bundled with scikit-learn: no download)
PIPELINE = ['--data', 'digits', '--width', '32', '--ipc', '10', '--epochs-eval', '20', '--test-interval', '10',
            '--no-progress', '--print-freq', '20']
# --cpu: the same commands at sizes that take seconds on 2 cores (later flags override earlier ones)
PIPELINE_CPU = ['--width', '8', '--epochs-eval', '2', '--test-interval', '1', '--batch-size', '64']


def sh(cmd, log, timeout, env=None):
    """Run `cmd` in the repository root, its output to `log`; (exit status, seconds, output)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, 'PYTHONPATH': ROOT, 'PYTHONUNBUFFERED': '1', **(env or {})})
        status, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = 124
        output = (e.stdout or b'').decode(errors='replace') if isinstance(e.stdout, bytes) else (e.stdout or '')
        output += f'\n(stopped after {timeout} s)\n'
    with open(log, 'a') as f:
        f.write(f'$ {" ".join(cmd)}\n{output}\n')
    return status, time.perf_counter() - t0, output


def pytest_counts(output):
    """pytest's closing counts: {'passed': N, 'failed': N, ...} (empty if it printed none)."""
    lines = [line for line in output.splitlines() if re.search(r'\d+ (passed|failed|error)', line)]
    return {k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)', lines[-1])} \
        if lines else {}


def run_tests(opts, out):
    device = 'cpu' if opts.cpu else 'cuda'
    targets = ['tests/test_graphs.py'] if opts.cpu else ['tests']
    status, seconds, output = sh([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rfE', *targets],
                                 os.path.join(out, 'tests.log'), opts.tests_timeout, {'DIM_TEST_DEVICE': device})
    failures = [line for line in output.splitlines() if line.startswith(('FAILED', 'ERROR'))]
    return {'ok': status == 0, 'exit': status, 'seconds': seconds, 'device': device, 'targets': targets,
            'counts': pytest_counts(output), 'failures': failures}


def run_bench(opts, out):
    import misc.benchmark as benchmark
    argv = ['--device', 'cpu' if opts.cpu else 'cuda', '--configs', *opts.configs,
            '--json', os.path.join(out, 'bench.json')]
    argv += ['--quick'] if opts.cpu else ['--pool-models', 'convnet', 'resnet18', '--iters', '30', '--warmup', '5',
                                          '--check-iters', '3']
    t0 = time.perf_counter()
    log = open(os.path.join(out, 'bench.log'), 'w')
    stdout = sys.stdout
    sys.stdout = log
    try:
        result = benchmark.main(argv)
    finally:
        sys.stdout = stdout
        log.close()
    return {'ok': True, 'seconds': time.perf_counter() - t0, 'argv': argv, **result}


def run_pipeline(opts, out):
    device = ['--device', 'cpu', *PIPELINE_CPU] if opts.cpu else ['--device', 'cuda']
    work = os.path.join(out, 'pipeline')
    dirs = ['--output-dir', os.path.join(work, 'results'), '--logs-dir', os.path.join(work, 'logs')]
    log = os.path.join(out, 'pipeline.log')
    epochs = 1 if opts.cpu else 2
    steps = [
        ('gen_condense.py', ['--tag', 'gan', '--lr', '1e-3', '--epochs', str(epochs), '--eval-interval', str(epochs)]),
        ('pool_match.py', ['--tag', 'match', '--match', 'logit', '--match-aug', '--epochs', '1', '--eval-interval', '1',
                           '--epochs-match-train', '1' if opts.cpu else '4', '--weight', os.path.join(work, 'results', 'gan', f'model_dict_{epochs - 1}.pth')]),
        ('validate.py', ['--tag', 'test', '--pretrain-weight', os.path.join(work, 'results', 'match', 'last.pth')]),
    ]
    done = []
    for script, flags in steps:
        status, seconds, _ = sh([sys.executable, script, *PIPELINE, *device, *dirs, *flags], log, 300)
        done.append({'script': script, 'exit': status, 'seconds': seconds})
        if status:
            break
    report = os.path.join(work, 'results', 'test', 'eval.json')
    evaluation = json.load(open(report)) if os.path.exists(report) else None
    return {'ok': len(done) == len(steps) and all(d['exit'] == 0 for d in done), 'steps': done,
            'seconds': sum(d['seconds'] for d in done), 'eval': evaluation}


def environment(cpu):
    import torch
    from utils.runtime import hardware
    device = 'cpu' if cpu else 'cuda'
    return {'torch': torch.__version__, 'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            'device': device, 'hardware': hardware(device), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}


def markdown(report):
    env = report['environment']
    lines = [f"# Device check: {env['hardware']}, torch {env['torch']} (CUDA {env['cuda']}), {env['date']}", '']
    for part, result in report['parts'].items():
        lines.append(f"- {part}: {'ok' if result.get('ok') else 'FAILED'} in {result.get('seconds', 0):.0f} s"
                     + (f" — {result['counts']}" if result.get('counts') else '')
                     + (f" — {result['error']}" if result.get('error') else ''))
        for failure in result.get('failures', [])[:20]:
            lines.append(f"  - {failure}")
    bench = report['parts'].get('bench', {})
    if bench.get('results'):
        lines += ['', '| loop | config | ms / iteration (median) | speed-up vs plain | largest loss deviation vs plain '
                  '| operators / it | host reads / it | host syncs / it |', '|---|---|---|---|---|---|---|---|']
        for row in bench['results']:
            diff = row['vs_plain_max_rel_diff']
            worst = max(diff.items(), key=lambda kv: kv[1]) if diff else None
            lines.append(f"| {row['loop']} | {row['config']} | {row['ms_median']:.2f} | "
                         f"{row['speedup_vs_plain']:.2f} | {f'{worst[1]:.1e} ({worst[0]})' if worst else '-'} | "
                         f"{row['ops_per_iter']} | {row['host_reads_per_iter']} | "
                         f"{'-' if row['host_syncs_per_iter'] is None else row['host_syncs_per_iter']} |")
        for config, p in bench.get('projection', {}).items():
            lines.append(f"\nDefault CIFAR-10 pipeline projected from the {config} rows: {p['pipeline_h']:.2f} h")
    pipe = report['parts'].get('pipeline', {})
    if pipe.get('steps'):
        lines += ['', 'Pipeline: ' + ', '.join(f"{s['script']} exit {s['exit']} in {s['seconds']:.0f} s"
                                               for s in pipe['steps'])]
    return '\n'.join(lines) + '\n'


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=os.environ.get('OUT') or os.path.join(ROOT, 'gpu_check'),
                   help='output folder (default: $OUT when set, else ./gpu_check)')
    p.add_argument('--cpu', action='store_true', help='the same code paths on the CPU at tiny sizes (seconds)')
    p.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
    p.add_argument('--configs', nargs='+', default=None,
                   help='benchmark configs (default: plain, every switch but compile, bundle)')
    p.add_argument('--tests-timeout', type=int, default=300, help='seconds the test part may take')
    return p


def main(argv=None):
    opts = get_parser().parse_args(argv)
    from misc.benchmark import SWITCHES
    if opts.configs is None:
        # compile is left out by default: its compilation alone takes minutes per loop
        opts.configs = ['plain', *(s for s in SWITCHES if s != 'compile'), 'bundle']
    os.makedirs(opts.out, exist_ok=True)
    report = {'environment': environment(opts.cpu), 'argv': sys.argv[1:] if argv is None else argv, 'parts': {}}
    print(f"device check on {report['environment']['hardware']}, torch {report['environment']['torch']}", flush=True)
    for part in opts.parts:
        t0 = time.perf_counter()
        try:
            result = {'tests': run_tests, 'bench': run_bench, 'pipeline': run_pipeline}[part](opts, opts.out)
        except Exception as e:  # noqa: BLE001 -- record it and go on to the next part
            result = {'ok': False, 'error': f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}',
                      'seconds': time.perf_counter() - t0}
        report['parts'][part] = result
        print(f"{part}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s"
              + (f" {result['counts']}" if result.get('counts') else '') + (f" {result.get('error', '')}"), flush=True)
        with open(os.path.join(opts.out, 'gpu_check.json'), 'w') as f:  # after every part: a timeout keeps the rest
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(opts.out, 'gpu_check.md'), 'w') as f:
            f.write(markdown(report))
    print(f"wrote {os.path.join(opts.out, 'gpu_check.md')} and gpu_check.json")
    return sum(not r['ok'] for r in report['parts'].values())


if __name__ == '__main__':
    sys.exit(main())
