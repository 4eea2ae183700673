"""PolicySpec: construction checks, validation per type, and the one-line errors that name key and allowed values."""

from __future__ import annotations

import pytest

from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.policy import PolicySpec, parse_assignment


def spec(**overrides) -> PolicySpec:
    fields = dict(key="memory.offload", type="enum", default="off", choices=("off", "cpu"), doc="where to offload")
    return PolicySpec(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(key="offload"), "policy key 'offload' must be 'area.name'"),
    (dict(type="list"), "type must be one of enum, int, float, bool, str, got 'list'"),
    (dict(choices=()), "an enum needs choices"),
])
def test_bad_spec_is_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        spec(**overrides)


def test_default_must_be_valid():
    with pytest.raises(PolicyError, match=r"memory.offload: 'disk' is not allowed; allowed: off \| cpu"):
        spec(default="disk")


def test_enum():
    s = spec()
    assert s.validate(" cpu ") == "cpu" and s.area == "memory" and s.allowed() == "off | cpu"
    with pytest.raises(PolicyError, match="allowed: off | cpu"):
        s.validate("CPU")


@pytest.mark.parametrize("text, value", [("true", True), ("On", True), ("1", True), (False, False), ("no", False)])
def test_bool_accepts_words(text, value):
    assert spec(type="bool", default=False, choices=()).validate(text) is value


def test_bool_rejects_other_words():
    with pytest.raises(PolicyError, match="allowed: true | false"):
        spec(type="bool", default=False, choices=()).validate("maybe")


def test_int_range_and_parsing():
    s = spec(key="sched.micro_batches", type="int", default=4, choices=(), min=1, max=64)
    assert s.validate("8") == 8 and s.validate(64) == 64
    assert s.allowed() == "int in [1, 64]"
    for bad in ("0", "65", "1.5", "x", True):
        with pytest.raises(PolicyError, match=r"sched.micro_batches: .* is not allowed; allowed: int in \[1, 64\]"):
            s.validate(bad)


def test_an_int_bound_is_written_as_a_value_the_policy_takes():
    # moe.placement_interval said "allowed: int in [1, 1e+06]" and then refused '1e+06'
    s = spec(key="moe.placement_interval", type="int", default=10, choices=(), min=1, max=1_000_000)
    assert s.allowed() == "int in [1, 1000000]"
    assert s.validate("1000000") == 1_000_000


def test_float_open_ended():
    s = spec(key="comm.bucket_mb", type="float", default=25.0, choices=(), min=0.5)
    assert s.validate("0.5") == 0.5 and s.validate(1e6) == 1e6
    assert s.allowed() == "float in [0.5, inf)"
    with pytest.raises(PolicyError):
        s.validate("0.25")


def test_policy_error_is_a_cli_error():
    assert issubclass(PolicyError, DSparkError)


def test_as_dict_is_the_schema_row():
    row = spec(live=False, lossy_values=("cpu",)).as_dict()
    assert {k: row[k] for k in ("key", "type", "default", "allowed", "choices", "min", "max", "live", "lossless",
                                "doc")} == {
        "key": "memory.offload", "type": "enum", "default": "off", "allowed": "off | cpu", "choices": ["off", "cpu"],
        "min": None, "max": None, "live": False, "lossless": False, "doc": "where to offload"}


def test_lossy_values():
    assert not spec(lossy_values=("cpu",)).lossless and spec().lossless


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity", float("nan"), float("inf"), "1e400"])
def test_non_finite_numbers_are_refused(bad):
    # nan passed every range check (nan < min is False) and reached DDP's bucket size and run.json
    bucket = spec(key="comm.bucket_mb", type="float", default=25.0, choices=(), min=0.5)
    unbounded = spec(key="moe.move_cost", type="float", default=0.0, choices=())
    with pytest.raises(PolicyError, match=r"^comm.bucket_mb: .* is not allowed; allowed: float in \[0.5, inf\)$"):
        bucket.validate(bad)
    with pytest.raises(PolicyError, match=r"^moe.move_cost: .* allowed: float in \(-inf, inf\)$"):
        unbounded.validate(bad)


def test_ints_stay_within_64_bits():
    s = spec(key="sched.micro_batches", type="int", default=4, choices=())
    assert s.validate(str(2**63 - 1)) == 2**63 - 1
    for bad in (str(2**63), str(-2**64), "9" * 5000):
        with pytest.raises(PolicyError, match="sched.micro_batches: "):
            s.validate(bad)


def test_every_validated_value_is_plain_json():
    import json
    for s, value in [(spec(), "cpu"), (spec(type="bool", default=False, choices=()), "on"),
                     (spec(key="a.b", type="float", default=0.0, choices=()), "-1e308")]:
        parsed = s.validate(value)
        assert json.loads(json.dumps(parsed, allow_nan=False)) == parsed


def test_a_huge_refused_value_is_quoted_short():
    with pytest.raises(PolicyError) as info:
        spec().validate("x" * 50_000_000)
    assert len(str(info.value)) < 200 and "(50000002 chars)" in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(type="float", default=1.0, choices=(), min=float("nan")), "min must be a finite number or None"),
    (dict(type="float", default=1.0, choices=(), max=float("inf")), "max must be a finite number or None"),
    (dict(type="int", default=1, choices=(), min=3, max=2), "min 3 is above max 2"),
])
def test_spec_bounds_must_be_finite_and_ordered(overrides, message):
    with pytest.raises(ValueError, match=message):
        spec(**overrides)


def test_parse_assignment():
    assert parse_assignment(" memory.offload = cpu ") == ("memory.offload", "cpu")
    assert parse_assignment("comm.codec=a=b") == ("comm.codec", "a=b")
    for bad in ("memory.offload", "=cpu", "memory.offload="):
        with pytest.raises(PolicyError, match="policy: expected KEY=VALUE .*, got"):
            parse_assignment(bad)


def test_a_key_given_twice_is_refused_in_one_line_not_silently_the_last():
    # `set RUN k=none k=every-2` applied every-2 and said nothing of the none
    from dspark_lab.policy import parse_assignments

    assert parse_assignments(["a.b=1", "c.d=2"]) == {"a.b": "1", "c.d": "2"}
    with pytest.raises(PolicyError, match=r"^memory.activation_checkpointing: given twice \('none', then "
                                          r"'every-2'\); give each key once$"):
        parse_assignments(["memory.activation_checkpointing=none", "memory.activation_checkpointing=every-2"])


def test_set_and_run_policy_refuse_a_key_given_twice(tmp_path, capsys):
    from dspark_lab import cli

    script = tmp_path / "train.py"
    script.write_text("")
    for argv in (["set", "somerun", "comm.grad_sync=ring", "comm.grad_sync=tree"],
                 ["run", "--policy", "comm.grad_sync=ring", "--policy", "comm.grad_sync=tree", str(script)]):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == ("error: comm.grad_sync: given twice ('ring', then 'tree'); give each "
                                           "key once\n")


@pytest.mark.parametrize("assignment, message", [
    ("comm.bucket_mb=nan", r"^comm.bucket_mb: 'nan' is not allowed; allowed: float in \["),
    ("moe.move_cost=inf", r"^moe.move_cost: 'inf' is not allowed; allowed: float in \["),
])
def test_launch_and_live_policies_refuse_non_finite_numbers(assignment, message):
    from dspark_lab.runtime.launch import parse_policies

    with pytest.raises(PolicyError, match=message):
        parse_policies([assignment])


def test_str_policies_take_printable_text_of_bounded_length():
    from dspark_lab.policy import MAX_STR

    s = spec(key="comm.topology", type="str", default="backend", choices=())
    assert s.validate(" dgx1-v100 ") == "dgx1-v100" and s.allowed().startswith("a string of 1 to")
    for bad in ("", "   ", "a\nb", "x" * (MAX_STR + 1), True, None):
        with pytest.raises(PolicyError, match="^comm.topology: "):
            s.validate(bad)
