"""The README (and docs/) cannot drift from the code: every fenced shell command that starts a stage or a
misc/ script parses with that script's own parser, the files it names exist, the Outputs table names
files a digits run writes, the results table is what docs/results.json gives, and the sizes stay
within what a reader reads (README 12,000 characters, docs/*.md 50 KB; docs/results.json is data)."""
import argparse
import glob
import importlib
import json
import os
import re
import runpy
import shlex
import sys

import pytest

from tests.helpers import ROOT, run_script

README = os.path.join(ROOT, 'README.md')
DOCS = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
STAGES = ('gen_condense.py', 'pool_match.py', 'validate.py')
SHELL_BLOCK = re.compile(r'^```(bash|sh|shell|console)?\n(.*?)^```', re.M | re.S)
SEPARATORS = {'&&', '||', ';', '|', '&'}


def read(path):
    with open(path) as f:
        return f.read()


def shell_commands(text):
    """(script, argv) of every command in the fenced shell blocks of a markdown text: continuation
    lines joined, comments, environment assignments, `&&` chains and torchrun's own options handled;
    a literal `...` (an elided rest) is dropped. Unlabelled blocks count when they start with a
    command (the others hold output or BibTeX)."""
    out = []
    for lang, body in SHELL_BLOCK.findall(text):
        if not lang and not re.match(r'\s*(python|torchrun|bash)\b', body):
            continue
        for line in body.replace('\\\n', ' ').splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = '#'
            segment = []
            for token in [*lexer, ';']:
                if token in SEPARATORS:
                    command = _script_of(segment)
                    if command:
                        out.append(command)
                    segment = []
                else:
                    segment.append(token)
    return out


def _script_of(tokens):
    tokens = [t for t in tokens if t != '...']
    while tokens and (re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', tokens[0]) or tokens[0] in ('do', 'then')):
        tokens = tokens[1:]
    if not tokens:
        return None
    head, rest = os.path.basename(tokens[0]), tokens[1:]
    if head == 'torchrun':
        scripts = [i for i, t in enumerate(rest) if t.endswith('.py')]
        return (rest[scripts[0]], rest[scripts[0] + 1:]) if scripts else None
    if re.fullmatch(r'python[0-9.]*|\$\{?PY(THON)?\}?', head) and rest and rest[0] != '-m':
        return rest[0], rest[1:]
    if head in ('bash', 'sh') and rest:
        return rest[0], rest[1:]
    return None


class _Parsed(Exception):
    pass


def parse(script, argv, monkeypatch):
    """Parse argv with the script's own parser, running nothing: get_parser() where the script has one;
    else its main() up to the parse (argparse stopped there); a script without argparse takes no flags."""
    path = os.path.join(ROOT, script)
    source = read(path)
    if 'def get_parser' in source:
        module = importlib.import_module(script[:-3].replace('/', '.'))
        module.get_parser().parse_args(argv)
    elif 'parse_args(' in source:
        parse_args = argparse.ArgumentParser.parse_args

        def parse_and_stop(self, args=None, namespace=None):
            raise _Parsed(parse_args(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_and_stop)
        monkeypatch.setattr(sys, 'argv', [path, *argv])
        with pytest.raises(_Parsed):
            runpy.run_path(path, run_name='__main__')
    else:
        assert not argv, f'{script} reads no flags, but is given {argv}'


@pytest.mark.parametrize('doc', ['README.md'] + [os.path.relpath(d, ROOT) for d in DOCS])
def test_every_command_parses(doc, monkeypatch, capsys):
    monkeypatch.syspath_prepend(ROOT)
    commands = shell_commands(read(os.path.join(ROOT, doc)))
    for script, argv in commands:
        assert os.path.isfile(os.path.join(ROOT, script)), f'{doc}: {script} is not a file of the repository'
        if script in STAGES or (script.startswith('misc/') and script.endswith('.py')):
            try:
                parse(script, argv, monkeypatch)
            except SystemExit as e:
                pytest.fail(f'{doc}: python {script} {" ".join(argv)}: {capsys.readouterr().err.strip() or e}')
            monkeypatch.undo()
            monkeypatch.syspath_prepend(ROOT)
    if doc == 'README.md':
        named = {script for script, _ in commands}
        assert {*STAGES, 'misc/quickstart.sh', 'misc/reproduce.py'} <= named, named


def test_the_command_parser_sees_what_a_user_types():
    text = ('```bash\nCUDA_VISIBLE_DEVICES=0 python gen_condense.py --data x \\\n    --tag y  # note\n'
            'python3 -m venv .venv && PYTHON=.venv/bin/python bash misc/quickstart.sh\n'
            'torchrun --nproc_per_node 4 pool_match.py --tag m ...\n```\n```\n@article{x,\n```\n')
    assert shell_commands(text) == [('gen_condense.py', ['--data', 'x', '--tag', 'y']),
                                    ('misc/quickstart.sh', []), ('pool_match.py', ['--tag', 'm'])]


def test_an_unknown_flag_fails(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    with pytest.raises(SystemExit):
        parse('validate.py', ['--no-such-flag'], monkeypatch)
    monkeypatch.undo()
    monkeypatch.syspath_prepend(ROOT)
    with pytest.raises(SystemExit):
        parse('misc/compare.py', ['a.json', '--no-such-flag'], monkeypatch)


def test_links_resolve():
    for doc in [README, *DOCS]:
        for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', read(doc)):
            if not re.match(r'[a-z]+://', target):
                path = os.path.normpath(os.path.join(os.path.dirname(doc), target))
                assert os.path.exists(path), f'{os.path.relpath(doc, ROOT)}: link to {target}, which does not exist'


def test_sizes():
    assert len(read(README)) <= 12_000, len(read(README))
    sizes = {os.path.basename(d): os.path.getsize(d) for d in DOCS}
    assert sum(sizes.values()) <= 50_000, sizes


def test_results_table_is_what_results_json_gives(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from misc import readme_table
    text = read(README)
    assert readme_table.replace(text, readme_table.build(json.loads(read(readme_table.RESULTS_JSON)))) == text, \
        'run python misc/readme_table.py --write'


def outputs_patterns():
    section = read(README).split('\n## Outputs\n', 1)[1].split('\n## ', 1)[0]
    rows = [line for line in section.splitlines() if line.startswith('| `')]
    names = [name for row in rows for name in re.findall(r'`([^`]+)`', row.split('|')[1])]
    assert len(names) >= 7, names
    return names


def test_outputs_table_names_files_a_digits_run_writes(tmp_path):
    tiny = ['--data', 'digits', '--width', '8', '--ipc', '1', '--epochs-eval', '1', '--test-interval', '1',
            '--print-freq', '50', '--no-progress', '--device', 'cpu', '--batch-size', '256']
    stages = (('gen_condense.py', ['--tag', 'gan', '--epochs', '1', '--eval-interval', '1']),
              ('pool_match.py', ['--tag', 'match', '--match', 'logit', '--match-aug', '--weight',
                                 'results/gan/model_dict_0.pth', '--epochs', '1', '--eval-interval', '1',
                                 '--epochs-match-train', '1', '--pool', 'convnet']),
              ('validate.py', ['--tag', 'test', '--pretrain-weight', 'results/match/model_dict_convnet.pth']))
    for script, flags in stages:
        done = run_script(script, *tiny, *flags, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    placeholders = {'<tag>': '*', '<epoch>': '[0-9]*', '<eval model>': '[a-z]*'}
    for name in outputs_patterns():
        pattern = name
        for placeholder, wildcard in placeholders.items():
            pattern = pattern.replace(placeholder, wildcard)
        assert '<' not in pattern, f'README Outputs: unknown placeholder in {name}'
        assert glob.glob(str(tmp_path / pattern)), f'README Outputs: a digits run writes no {name}'


def test_results_figure_is_what_results_json_gives(tmp_path, monkeypatch):
    """misc/results_figure.py draws figs/results.png from docs/results.json alone: redrawn now, it gives the
    committed picture (compared as pixels: a font of another matplotlib may move a few)."""
    import numpy as np
    from PIL import Image
    monkeypatch.syspath_prepend(ROOT)
    from misc import results_figure
    out = tmp_path / 'results.png'
    results_figure.main(['--out', str(out)])
    drawn, committed = (np.asarray(Image.open(p).convert('RGB'), dtype=np.float64)
                        for p in (out, os.path.join(ROOT, 'figs', 'results.png')))
    assert drawn.shape == committed.shape, 'run python misc/results_figure.py'
    assert np.abs(drawn - committed).mean() < 1.0, 'run python misc/results_figure.py'

