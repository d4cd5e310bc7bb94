"""misc/reading_path.py's measures of one stage-1 iteration, one stage-2 iteration and a validate.py run: the
files and functions a reader follows stay within what issue 26 brought them down to (outside models/, the
models package)."""
from data.datasets import load_dataset
from misc.reading_path import STAGE_CEILING, VALIDATE_CEILING, stage_iterations, validate_run
from tests.helpers import save_tiny_generator


def test_validate_run_reads_few_files_and_functions(tmp_path):
    weight = str(tmp_path / 'g.pth')
    save_tiny_generator(weight, load_dataset('digits')[0], seed=0)
    counts = validate_run(weight, str(tmp_path))
    assert counts['files'] <= VALIDATE_CEILING['files'], counts
    assert counts['functions'] <= VALIDATE_CEILING['functions'], counts
    assert counts['files_all'] > counts['files']  # models/ is counted apart, not missed


def test_gan_stage_iterations_read_few_files_and_functions(tmp_path):
    stages, _ = stage_iterations(str(tmp_path))
    for name, counts in stages.items():
        assert counts['files'] <= STAGE_CEILING[name]['files'], (name, counts)
        assert counts['functions'] <= STAGE_CEILING[name]['functions'], (name, counts)
    assert stages['stage1']['files'] <= 4 and stages['stage2']['files'] <= 5  # issue 26's goals
