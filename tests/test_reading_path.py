"""misc/reading_path.py's measure of a validate.py run: the files and functions a reader follows stay
within what issue 26 brought them down to (outside models/, the models package)."""
from data.datasets import load_dataset
from misc.reading_path import VALIDATE_CEILING, validate_run
from tests.helpers import save_tiny_generator


def test_validate_run_reads_few_files_and_functions(tmp_path):
    weight = str(tmp_path / 'g.pth')
    save_tiny_generator(weight, load_dataset('digits')[0], seed=0)
    counts = validate_run(weight, str(tmp_path))
    assert counts['files'] <= VALIDATE_CEILING['files'], counts
    assert counts['functions'] <= VALIDATE_CEILING['functions'], counts
    assert counts['files_all'] > counts['files']  # models/ is counted apart, not missed
