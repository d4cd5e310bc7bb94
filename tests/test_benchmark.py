"""misc/benchmark.py --device cpu --quick runs, as a separate process, and writes the JSON it promises."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = {'loop', 'config', 'fast_path', 'batch', 'iters', 'warmup', 'ms_median', 'ms_min', 'ms_max',
              'images_per_s', 'flops_per_iter', 'gflop_per_image', 'tflops_achieved', 'fraction_of_peak',
              'peak_memory_mb', 'peak_memory_kind', 'host_syncs_per_iter', 'amp_vs_fp32_max_rel_diff',
              'amp_check_iters', 'seconds_total'}


def benchmark(tmp_path, *flags):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'benchmark.py'), '--device', 'cpu', '--quick',
                           '--json', str(out), *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_cpu_benchmark_writes_json(tmp_path):
    proc, result = benchmark(tmp_path)
    assert result['meta']['device'] == 'cpu' and result['meta']['quick'] is True
    assert result['meta']['torch'] and result['meta']['torch_threads'] == 1
    peak = result['peak']
    assert peak['dtype'] == 'float32' and peak['tflops'] > 0
    rows = {r['loop']: r for r in result['results']}
    assert set(rows) == {'stage1', 'stage2_convnet', 'validation_convnet'}
    for name, row in rows.items():
        assert ROW_FIELDS <= set(row), (name, ROW_FIELDS - set(row))
        assert row['config'] == 'fast' and row['iters'] == 3 and row['batch'] == 8
        assert row['ms_min'] <= row['ms_median'] <= row['ms_max'] and row['ms_median'] > 0
        assert row['images_per_s'] == row['batch'] / row['ms_median'] * 1e3
        assert row['flops_per_iter'] > 0 and row['tflops_achieved'] > 0
        assert abs(row['fraction_of_peak'] - row['tflops_achieved'] / peak['tflops']) < 1e-9
        assert row['host_syncs_per_iter'] is None  # only counted on CUDA
        assert row['peak_memory_mb'] > 0
        assert row['amp_vs_fp32_max_rel_diff'] is None  # --amp auto is fp32 on the CPU: nothing to compare
    # a stage-2 iteration holds two pool steps, a G step through the pool model, and a D step: it does
    # more work than a stage-1 iteration at this size
    assert rows['stage2_convnet']['flops_per_iter'] > rows['stage1']['flops_per_iter']
    assert rows['validation_convnet']['test_ms_10k_images'] > 0
    assert result['projection'] == {}  # only projected from the default sizes
    for name in rows:
        assert f'[fast] {name}' in proc.stdout


def test_bf16_losses_are_compared_with_fp32(tmp_path):
    proc, result = benchmark(tmp_path, '--amp', 'bf16', '--loops', 'stage1', 'validation')
    rows = {r['loop']: r for r in result['results']}
    expected = {'stage1': {'loss_g', 'loss_d', 'gp', 'wasserstein'}, 'validation_convnet': {'loss'}}
    for name, keys in expected.items():
        diff = rows[name]['amp_vs_fp32_max_rel_diff']
        assert rows[name]['amp_check_iters'] == 2 and keys <= set(diff)
        # bf16 keeps 8 bits of mantissa: the losses move, but by percent, not by their size
        assert 0 < diff['loss_g' if name == 'stage1' else 'loss'] < 0.2, diff
        assert all(0 <= v < 1 for v in diff.values()), diff
        assert f'[fast] {name}' in proc.stdout and 'vs fp32:' in proc.stdout


def test_cuda_graphs_on_the_cpu_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'benchmark.py'), '--device', 'cpu', '--quick',
                           '--loops', 'stage2', '--cuda-graphs', 'on'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'error: --cuda-graphs needs a CUDA device (this run is on cpu)'
