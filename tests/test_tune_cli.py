"""``dspark-lab tune``'s own text: option errors, the report's lines (restarts, budget), and where trials print."""

from __future__ import annotations

import pytest

from dspark_lab import cli


@pytest.mark.parametrize("argv, message", [
    (["--budget-steps", "9.5"], "argument --budget-steps: must be an int in 10..100000, got '9.5'"),
    (["--budget-steps", "9"], "argument --budget-steps: must be an int in 10..100000, got '9'"),
    (["--budget-steps", "100001"], "argument --budget-steps: must be an int in 10..100000, got '100001'"),
    (["--max-activation-mb", "0"], "argument --max-activation-mb: must be a number > 0 and <= 1073741824, got '0'"),
    (["--max-memory-gb", "nan"], "argument --max-memory-gb: must be a number > 0 and <= 1073741824, got 'nan'"),
    (["--max-memory-gb", "2e9"], "argument --max-memory-gb: must be a number > 0 and <= 1073741824, got '2e9'"),
])
def test_an_option_out_of_range_says_what_is_allowed_in_one_line(argv, message, capsys):
    assert cli.main(["tune", "RUN", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.rstrip().endswith(message)


def test_options_in_range_parse():
    args = cli.build_parser().parse_args(["tune", "RUN", "--budget-steps", "10", "--max-activation-mb", "0.5"])
    assert args.budget_steps == 10 and args.max_activation_mb == 0.5
