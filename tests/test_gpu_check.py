"""misc/gpu_check.py --cpu: the prepared device check runs its three parts through the same code as on a
GPU (pytest with DIM_TEST_DEVICE, the benchmark's configs, the README's three commands chained), so the
first contact with a GPU does not fail on a typo."""
import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_cpu_mode_runs_every_part_and_writes_its_report(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'gpu_check.py'), '--cpu', '--out', str(out),
                           '--configs', 'plain', 'fused', 'bundle'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '2'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / 'gpu_check.json').read_text())
    env, parts = report['environment'], report['parts']
    assert env['torch'] and env['hardware'] and env['device'] == 'cpu'
    assert list(parts) == ['tests', 'bench', 'pipeline'] and all(p['ok'] for p in parts.values())
    assert parts['tests']['counts']['passed'] > 0 and parts['tests']['counts'].get('failed', 0) == 0
    rows = parts['bench']['results']
    assert {r['config'] for r in rows} == {'plain', 'fused', 'bundle'}
    assert {r['loop'] for r in rows} == {'stage1', 'stage2_convnet', 'validation_convnet'}
    for row in rows:
        assert row['speedup_vs_plain'] > 0 and row['ops_per_iter'] > 0
        assert all(v < 1e-3 for v in row['vs_plain_max_rel_diff'].values())  # fp32 switches keep the numbers
    assert [s['script'] for s in parts['pipeline']['steps']] == ['gen_condense.py', 'pool_match.py', 'validate.py']
    assert parts['pipeline']['eval'] is not None
    table = (out / 'gpu_check.md').read_text()
    assert '| stage2_convnet | bundle |' in table and 'Pipeline: gen_condense.py exit 0' in table
    for log in ('tests.log', 'bench.log', 'pipeline.log'):
        assert (out / log).stat().st_size > 0


def test_test_summary_is_read_from_pytest_output():
    from misc.gpu_check import pytest_counts
    assert pytest_counts('...\nFAILED tests/x.py::t - boom\n3 failed, 540 passed, 4 skipped in 250.1s\n') == \
        {'failed': 3, 'passed': 540, 'skipped': 4}
    assert pytest_counts('1 passed, 1 error in 2s') == {'passed': 1, 'error': 1}
    assert pytest_counts('no summary') == {}
