"""Writes to torchrun's store by someone without the run's token, against real 2-rank gloo jobs: an announcement
deleted or overwritten right after rank 0 wrote it, a JSON value nested deeper than Python's parser recurses, an
8 MB value kept at the next announcement's key, and an old sealed announcement written again. None may stall the
job for more than rank 0's decision window (3 s here), leave a rank behind on the sequence, or apply anything.

The races are won on purpose: the ``late_rank0_boundary`` fixture plugin makes rank 0 reach each boundary 50 ms
after rank 1, so rank 1 has checked for the announcement before rank 0 writes it, and the attacker's thread (a
``store.wait`` on the key) deletes or overwrites it a whole step before rank 1 looks again.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time

import pytest

from conftest import FIXTURE_PLUGINS, wait_for_step
from dspark_lab.localhost import free_port
from dspark_lab.runtime import commands
from dspark_lab.runtime.limits import MAX_STORE_VALUE
from dspark_lab.runtime.sealed import Sealer
from test_control_live import DEMO, SMALL, home, kill_all, steps_by_rank, tree, wait_steps  # noqa: F401 (fixture)

CHANGE, NEXT = "memory.activation_checkpointing=full", "memory.activation_checkpointing=every-2"
DEEP = b"[" * 50_000  # under the size bound; json.loads raises RecursionError on it
STALL_S = 12  # a change must end (applied or rolled back) within this: the 3 s window, a few steps, a loaded machine


def store_client(port: int, run_id: str):
    """An attacker's client of the job's store, under the run's keys (as the runtime's own: ``run_store``)."""
    import torch.distributed as dist

    return dist.PrefixStore(f"dspark/{run_id}/", dist.TCPStore("127.0.0.1", port, is_master=False,
                                                      timeout=datetime.timedelta(seconds=30)))


@pytest.fixture
def live():
    """Start a 2-rank job (rank 0 late at each boundary unless ``late=False``); yield it with an attacker's store
    client under its keys; kill what is left at the end."""
    started = []

    def start(name: str, late: bool = True, args=SMALL):
        port = free_port()
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FIXTURE_PLUGINS), os.environ.get("PYTHONPATH")]))}
        if late:
            env["DSPARK_PLUGIN_MODULES"] = "late_rank0_boundary"
        job = commands.launch(DEMO, args, nproc=2, name=name, env=env, options={"master_port": port})
        wait_for_step(job, 2)
        started.append(tree(job))
        return job, port

    yield start
    for processes in started:
        kill_all(processes)


def attack(port: int, run_id: str, key: str, action: str, value: bytes = b"") -> dict:
    """In a thread: wait for ``key`` to appear, then (at once) delete or overwrite it; the stolen value is kept."""
    store = store_client(port, run_id)
    done: dict = {}

    def run():
        store.wait([key], datetime.timedelta(seconds=60))
        if action == "steal":
            done["stolen"] = store.get(key)
        if action in ("delete", "steal"):
            store.delete_key(key)
        else:
            store.set(key, value)
        done["at"] = time.monotonic()

    done["thread"] = threading.Thread(target=run, daemon=True)
    done["thread"].start()
    return done


def by_rank(job, change_id: str, kind: str) -> list[int]:
    return sorted(e["rank"] for e in job.run_dir.events() if e["change_id"] == change_id and e["kind"] == kind)


def assert_rolled_back_everywhere_then_next_applies(job, attacked: dict) -> dict:
    """The attacked change ends rolled back on both ranks within STALL_S, saying rank 1 did not answer; the job
    steps on; the next change applies on both ranks."""
    started = time.monotonic()
    report = commands.set_policies(job.id, [CHANGE], timeout=STALL_S)
    took = time.monotonic() - started
    attacked["thread"].join(5)
    assert "at" in attacked, "the attacker never saw the announcement"
    assert report.data["state"] == "rolled_back", report.data
    assert "rank 1 did not answer within" in report.data["reason"], report.data
    assert took < STALL_S, took
    print(f"{job.id}: the attacked change rolled back in {took:.1f} s")
    wait_steps(job.run_dir, 3, timeout=30)  # both ranks step on
    change_id = report.data["change_id"]
    assert by_rank(job, change_id, "rollback") == [0, 1]
    assert by_rank(job, change_id, "apply") == []
    theirs = next(e for e in job.run_dir.events() if e["change_id"] == change_id and e["rank"] == 1)
    assert "did not answer" in theirs["reason"], theirs  # rank 1 logs rank 0's true reason
    after = commands.set_policies(job.id, [NEXT], timeout=STALL_S)
    assert after.data["state"] == "applied", after.data
    assert by_rank(job, after.data["change_id"], "apply") == [0, 1]
    return {"report": report, "took": took}


@pytest.mark.slow
def test_a_deleted_announcement_rolls_back_on_both_ranks_in_seconds_and_the_next_change_applies(live):
    job, port = live("f2-delete")
    attacked = attack(port, job.id, "announce/1", "delete")
    assert_rolled_back_everywhere_then_next_applies(job, attacked)
    assert commands.stop(job.id, timeout=30).data["state"] == "stopped"
    assert job.wait(60) == 0


@pytest.mark.slow
def test_an_announcement_overwritten_with_junk_rolls_back_and_the_next_change_applies(live):
    job, port = live("f2-junk")
    attacked = attack(port, job.id, "announce/1", "set", b'{"body": "{}", "mac": "00"}')
    assert_rolled_back_everywhere_then_next_applies(job, attacked)
    ignored = [e for e in job.run_dir.events() if e["kind"] == "refuse" and "announce/1" in e["reason"]]
    assert [e["rank"] for e in ignored] == [1] and "HMAC" in ignored[0]["reason"]


@pytest.mark.slow
def test_deeply_nested_json_is_never_parsed(live):
    job, port = live("f3-deep")
    store = store_client(port, job.id)
    store.set("announce/1", DEEP)  # before any change: rank 1 reads it at its next boundary
    wait_steps(job.run_dir, 3, timeout=30)
    events = job.run_dir.events()
    assert not [e for e in events if e["kind"] == "error"], [e for e in events if e["kind"] == "error"]
    assert [e["rank"] for e in events if e["kind"] == "refuse" and "announce/1" in e["reason"]] == [1]
    # and written over rank 0's announcement, before rank 1 read it
    attacked = attack(port, job.id, "announce/1", "set", DEEP)
    assert_rolled_back_everywhere_then_next_applies(job, attacked)
    assert not [e for e in job.run_dir.events() if e["kind"] == "error"]


def rank1_rate(job, seconds: float) -> tuple[int, float]:
    start, began = steps_by_rank(job.run_dir).get(1, 0), time.monotonic()
    time.sleep(seconds)
    return steps_by_rank(job.run_dir).get(1, 0) - start, time.monotonic() - began


@pytest.mark.slow
def test_an_8mb_value_at_the_next_announcement_is_fetched_a_bounded_number_of_times(live):
    """The attacker keeps an 8 MB value at ``announce/1`` (writes it again whenever it is gone). Rank 1 used to
    fetch it at every step boundary (20 ms a fetch here); now once, then after 1, 2, 4 ... 32 steps. Steps are short
    (5 ms sleep) so a fetch per step would halve the rate; periods with and without the value alternate, so load
    from other work on the machine weighs on both alike."""
    fast = [a if a != "0.02" else "0.005" for a in SMALL]
    job, port = live("f5-big", late=False, args=fast)
    store = store_client(port, job.id)
    junk, key = b"x" * (8 * 1024 * 1024 - 4096), "announce/1"
    assert len(junk) > MAX_STORE_VALUE
    writes, there, stop = [0], threading.Event(), threading.Event()

    def keep_it_there():
        while not stop.is_set():
            if there.is_set() and not store.check([key]):
                store.set(key, junk)
                writes[0] += 1
            stop.wait(0.02)

    keeper = threading.Thread(target=keep_it_there, daemon=True)
    keeper.start()
    totals = {False: [0, 0.0], True: [0, 0.0]}
    try:
        for with_junk in (False, True) * 3:
            (there.set if with_junk else there.clear)()
            if not with_junk:
                store.delete_key(key)
            steps, seconds = rank1_rate(job, 1.5)
            totals[with_junk][0] += steps
            totals[with_junk][1] += seconds
    finally:
        stop.set()
        keeper.join(5)
    before, during = (totals[w][0] / totals[w][1] for w in (False, True))
    print(f"rank 1: {before:.1f} steps/s without, {during:.1f} with the 8 MB value; {writes[0]} writes (each "
          f"fetched at most once) in {totals[True][0]} steps")
    assert during > 0.75 * before, (before, during)
    # Each write replaces a copy rank 1 fetched, rejected and deleted, or starts a period with the value (3). The
    # backoff counts steps with and without the value: 6 fetches in its first 31 steps (after 1, 2, 4, 8, 16), then
    # one per 32. A fetch per step would be a write per step with the value (about 90 to 300 of them).
    steps = totals[False][0] + totals[True][0]
    assert writes[0] <= 3 + 6 + 1 + steps // 32, (writes[0], totals)
    store.delete_key(key)
    after = commands.set_policies(job.id, [NEXT], timeout=STALL_S)  # may be rolled back by one backoff
    assert after.data["state"] in ("applied", "rolled_back"), after.data
    assert commands.set_policies(job.id, [CHANGE], timeout=STALL_S).data["state"] == "applied"


@pytest.mark.slow
def test_an_old_sealed_announcement_written_again_is_not_applied(live):
    """An attacker steals rank 0's sealed ``announce/1`` before rank 1 reads it (the change rolls back), then writes
    it back once rank 1 has moved on, at its own key and at the next one: nothing of it applies anywhere."""
    job, port = live("replay")
    stolen = attack(port, job.id, "announce/1", "steal")
    assert_rolled_back_everywhere_then_next_applies(job, stolen)  # seq 1 rolled back, seq 2 applied
    store = store_client(port, job.id)
    old = stolen["stolen"]
    body = json.loads(old.split(b"\n", 1)[1])
    assert body["seq"] == 1 and body["changes"] == {"memory.activation_checkpointing": "full"}
    for key in ("announce/1", "announce/3"):
        store.set(key, old)
    wait_steps(job.run_dir, 3, timeout=30)
    third = commands.set_policies(job.id, ["memory.activation_checkpointing=none"], timeout=STALL_S)
    assert third.data["state"] == "applied", third.data
    assert by_rank(job, third.data["change_id"], "apply") == [0, 1]
    assert by_rank(job, body["change_id"], "apply") == []
    policies = {e["rank"]: e["new"] for e in job.run_dir.events() if e["kind"] == "apply"
                and e["key"] == "memory.activation_checkpointing"}
    assert policies == {0: "none", 1: "none"}


def test_a_sealed_value_opens_only_for_its_key_run_and_restart_group_and_is_authenticated_before_parsing():
    sealer = Sealer("token", "run")
    raw = sealer.seal("announce/1", {"seq": 1})
    assert sealer.open("announce/1", raw) == {"seq": 1}
    for other, key in ((Sealer("token", "run", scope="a1b2c3d4e5f6"), "announce/1"),  # a later restart group
                       (Sealer("token", "another-run"), "announce/1"), (Sealer("other", "run"), "announce/1"),
                       (sealer, "announce/2")):
        with pytest.raises(ValueError, match="HMAC"):
            other.open(key, raw)
    for junk in (DEEP, b"\xff\x00", b"", raw[:-1], b"0" * 64 + b"\n" + DEEP):
        with pytest.raises(ValueError):  # never RecursionError: nothing is parsed before the HMAC matched
            sealer.open("announce/1", junk)
    with pytest.raises(ValueError, match="limit"):
        sealer.open("announce/1", b"x" * (MAX_STORE_VALUE + 1))
    assert sealer.scoped("a1b2c3d4e5f6").open("k", Sealer("token", "run", "a1b2c3d4e5f6").seal("k", [1])) == [1]
