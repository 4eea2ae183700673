"""``dspark-lab moe balance``: JSON shape and numbers, the three file formats, --current/--move-cost, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dspark_lab import cli
from dspark_lab.moe import balance as B
from dspark_lab.output import SCHEMA_VERSION


def run(capsys, *argv):
    code = cli.main(["moe", "balance", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def loads(tmp_path):
    weight = np.random.default_rng(0).lognormal(0, 1, (3, 16))
    path = tmp_path / "loads.npy"
    np.save(path, weight)
    return weight, path


def test_json_report(capsys, loads):
    weight, path = loads
    code, out, _ = run(capsys, "--loads", str(path), "--replicas", "20", "--groups", "4", "--nodes", "2",
                       "--gpus", "4", "--json")
    doc = json.loads(out)
    assert code == 0 and (doc["schema_version"], doc["kind"]) == (SCHEMA_VERSION, "moe.balance")
    assert doc["mode"] == "node-limited" and doc["before"]["source"] == "default"
    phy2log = np.array(doc["phy2log"])
    assert phy2log.shape == (3, 20)
    assert doc["after"]["balancedness"] == pytest.approx(B.balancedness(weight, phy2log, 4))
    # before: no redundancy, expert e on GPU floor(e * 4 / 16)
    before = np.stack([weight[:, g * 4:(g + 1) * 4].sum(1) for g in range(4)], 1)
    assert doc["before"]["balancedness"] == pytest.approx(float(B.balancedness_of_loads(before).mean()))
    assert doc["after"]["balancedness"] > doc["before"]["balancedness"]
    # moved: (expert, GPU) pairs absent before
    new_has = B.presence(phy2log, 16, 4) > 0
    old_has = np.zeros_like(new_has)
    old_has[:, np.arange(16) // 4, np.arange(16)] = True
    assert doc["experts_moved"] == int((new_has & ~old_has).sum())
    assert [row["layer"] for row in doc["per_layer"]] == [0, 1, 2]


def test_text_output_and_formats(capsys, tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"loads": [5, 1, 1, 1, 1, 1, 1, 1]}))
    torch.save(torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 1]), tmp_path / "w.pt")
    outputs = []
    for name in ("w.json", "w.pt"):
        code, out, _ = run(capsys, "--loads", str(tmp_path / name), "--replicas", "10", "--groups", "1",
                           "--nodes", "1", "--gpus", "2")
        assert code == 0 and "layer 0: g0[" in out and "balancedness" in out
        outputs.append(out)
    assert outputs[0] == outputs[1]


def test_current_and_move_cost(capsys, tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.lognormal(0, 1, (4, 32))
    np.save(tmp_path / "w.npy", weight)
    current = B.rebalance_experts(weight * rng.lognormal(0, 0.5, weight.shape), 40, 4, 2, 4)[0]
    torch.save(current, tmp_path / "current.pt")
    moved = {}
    for cost in ("0", "1"):
        code, out, _ = run(capsys, "--loads", str(tmp_path / "w.npy"), "--replicas", "40", "--groups", "4",
                           "--nodes", "2", "--gpus", "4", "--current", str(tmp_path / "current.pt"),
                           "--move-cost", cost, "--json")
        doc = json.loads(out)
        assert code == 0 and doc["before"]["source"] == "current"
        assert doc["before"]["balancedness"] == pytest.approx(B.balancedness(weight, current, 4))
        moved[cost] = doc["experts_moved"]
    assert moved["1"] < moved["0"]


@pytest.mark.parametrize("argv, needle", [
    (["--replicas", "21"], "--replicas (21) must be a multiple of --gpus (4)"),
    (["--groups", "3", "--nodes", "1", "--gpus", "3", "--replicas", "18"], "--groups"),
    (["--gpus", "3"], "--gpus (3) must be a multiple of --nodes (2)"),
    (["--current", "nope.npy"], "--current: no such file"),
])
def test_errors_are_one_line(capsys, loads, argv, needle):
    _, path = loads
    base = {"--loads": str(path), "--replicas": "20", "--groups": "4", "--nodes": "2", "--gpus": "4"}
    for key, value in zip(argv[::2], argv[1::2]):
        base[key] = value
    code, out, err = run(capsys, *[x for pair in base.items() for x in pair])
    assert code == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1


def test_bad_load_files(capsys, tmp_path):
    (tmp_path / "w.txt").write_text("1 2 3")
    np.save(tmp_path / "neg.npy", np.array([[1.0, -1.0]]))
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2)))
    for name, needle in (("w.txt", "must end in one of"), ("neg.npy", "--loads must be non-negative"),
                         ("cube.npy", "expected shape")):
        code, _, err = run(capsys, "--loads", str(tmp_path / name), "--replicas", "2", "--groups", "1",
                           "--nodes", "1", "--gpus", "1")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
