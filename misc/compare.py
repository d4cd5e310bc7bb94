"""Print several validate.py reports (results/<tag>/eval.json) as one markdown table.

    python misc/compare.py results/quickstart-test/eval.json results/quickstart-random/eval.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from validate import markdown_table  # noqa: E402


def main(paths):
    lines, header = [], None
    for path in paths:
        with open(path) as f:
            table = markdown_table(json.load(f)).splitlines()
        if table[0] != header:  # reports with other columns (e.g. --val-per-class) start a table of their own
            lines += ([''] if lines else []) + table[:2]
            header = table[0]
        lines += table[2:]
    print('\n'.join(lines))


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit("usage: python misc/compare.py EVAL_JSON [EVAL_JSON ...]")
    main(sys.argv[1:])
