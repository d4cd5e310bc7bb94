"""misc/benchmark.py --device cpu --quick runs, as a separate process, and writes the JSON it promises."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = {'loop', 'config', 'fast_path', 'batch', 'iters', 'warmup', 'ms_median', 'ms_min', 'ms_max',
              'images_per_s', 'flops_per_iter', 'gflop_per_image', 'tflops_achieved', 'fraction_of_peak',
              'peak_memory_mb', 'peak_memory_kind', 'host_syncs_per_iter', 'ops_per_iter', 'host_reads_per_iter',
              'losses', 'vs_plain_max_rel_diff', 'check_iters', 'speedup_vs_plain', 'seconds_total'}


def benchmark(tmp_path, *flags):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'benchmark.py'), '--device', 'cpu', '--quick',
                           '--json', str(out), *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_cpu_benchmark_writes_json(tmp_path):
    proc, result = benchmark(tmp_path, '--configs', 'plain', 'fused')
    assert result['meta']['device'] == 'cpu' and result['meta']['quick'] is True
    assert result['meta']['torch'] and result['meta']['torch_threads'] == 1
    peak = result['peak']
    assert peak['dtype'] == 'float32' and peak['tflops'] > 0
    rows = {(r['config'], r['loop']): r for r in result['results']}
    loops = {'stage1', 'stage2_convnet', 'validation_convnet'}
    assert set(rows) == {(c, loop) for c in ('plain', 'fused') for loop in loops}
    for (config, name), row in rows.items():
        assert ROW_FIELDS <= set(row), (name, ROW_FIELDS - set(row))
        assert row['iters'] == 3 and row['batch'] == 8 and row['check_iters'] == 2
        assert row['ms_min'] <= row['ms_median'] <= row['ms_max'] and row['ms_median'] > 0
        assert row['images_per_s'] == row['batch'] / row['ms_median'] * 1e3
        assert row['flops_per_iter'] > 0 and row['tflops_achieved'] > 0
        assert abs(row['fraction_of_peak'] - row['tflops_achieved'] / peak['tflops']) < 1e-9
        assert row['host_syncs_per_iter'] is None  # only counted on CUDA
        assert row['peak_memory_mb'] > 0
        plain = rows[('plain', name)]
        assert row['speedup_vs_plain'] == plain['ms_median'] / row['ms_median']
        # fp32 either way: the same losses to rounding (a fused Adam sums in another order)
        assert all(v < 1e-4 for v in row['vs_plain_max_rel_diff'].values()), row['vs_plain_max_rel_diff']
        # the only host reads left: F.one_hot's label check (min and max) in each of the (at most two)
        # conditional draws, on the CPU only (tests/test_fastpath.py names their site)
        assert row['host_reads_per_iter'] <= 4 and row['ops_per_iter'] > 100
        assert f'[{config}] {name}' in proc.stdout
    assert all(v == 0 for v in rows[('plain', 'stage1')]['vs_plain_max_rel_diff'].values())
    # a fused optimizer is one operator per step instead of several per parameter
    assert rows[('fused', 'stage1')]['ops_per_iter'] < rows[('plain', 'stage1')]['ops_per_iter']
    # a stage-2 iteration holds two pool steps, a G step through the pool model, and a D step: it does
    # more work than a stage-1 iteration at this size
    assert rows[('plain', 'stage2_convnet')]['flops_per_iter'] > rows[('plain', 'stage1')]['flops_per_iter']
    assert rows[('plain', 'validation_convnet')]['test_ms_10k_images'] > 0
    assert result['projection'] == {}  # only projected from the default sizes


def test_bf16_losses_are_compared_with_fp32(tmp_path):
    proc, result = benchmark(tmp_path, '--configs', 'bf16', '--loops', 'stage1', 'validation')
    rows = {r['loop']: r for r in result['results']}
    expected = {'stage1': {'loss_g', 'loss_d', 'gp', 'wasserstein'}, 'validation_convnet': {'loss'}}
    for name, keys in expected.items():
        diff = rows[name]['vs_plain_max_rel_diff']
        assert rows[name]['check_iters'] == 2 and keys <= set(diff)
        # bf16 keeps 8 bits of mantissa: the losses move, but by percent, not by their size
        assert 0 < diff['loss_g' if name == 'stage1' else 'loss'] < 0.2, diff
        assert all(0 <= v < 1 for v in diff.values()), diff
        assert f'[bf16] {name}' in proc.stdout and 'losses vs plain:' in proc.stdout


def test_cuda_graphs_on_the_cpu_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'benchmark.py'), '--device', 'cpu', '--quick',
                           '--loops', 'stage2', '--configs', 'fast', '--cuda-graphs', 'on'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'error: --cuda-graphs needs a CUDA device (this run is on cpu)'
