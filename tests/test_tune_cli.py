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


def test_the_default_budget_is_left_to_the_driver():
    # None: the driver gives the search covering_budget(space), 110 steps per candidate (was a fixed 200)
    assert cli.build_parser().parse_args(["tune", "RUN"]).budget_steps is None


def trial(change, verdict):
    return {"change": change, "verdict": verdict, "steps": 0 if verdict == "skipped_budget" else 98}


def state(trials, **extra):
    return {"id": "t1", "state": "done", "options": {"budget_steps": 200},
            "space": {"keys": {"memory.activation_checkpointing": ["none", "full", "every-2", "every-4"]},
                      "needs_restart": [{"key": "comm.bucket_mb", "value": 25.0, "would_try": [1.0, 2.0]}],
                      "bit_exact": True},
            "trials": trials, **extra}


def test_the_report_ends_saying_how_many_candidates_the_budget_skipped_and_how_to_try_them():
    from dspark_lab.tune.commands import report

    trials = [trial({"memory.activation_checkpointing": "full"}, "tie"),
              trial({"memory.activation_checkpointing": "every-2"}, "skipped_budget"),
              trial({"memory.activation_checkpointing": "every-4"}, "skipped_budget")]
    lines = report(state(trials, budget_for_all=336)).to_text().splitlines()
    assert lines[-2:] == ["skipped for budget: 2 of 3 candidates not tried within --budget-steps 200; "
                          "--budget-steps 336 (the default) tries them all", "tune t1: done"]
    assert "skipped for budget" not in report(state(trials[:1], budget_for_all=336)).to_text()
    assert "needs a restart: comm.bucket_mb (now 25.0, would try [1.0, 2.0])" in lines


def test_status_of_a_job_that_never_ran_a_tune_says_so_in_one_line():
    # it printed an empty trial table and "tune None: none"
    from dspark_lab.tune.commands import report

    done = report({"id": None, "state": "none"})
    assert done.to_text() == "no tune has run on this job; start one with `dspark-lab tune RUN`"
    assert (done.data["state"], done.data["exit_code"]) == ("none", 0)
