"""One command at a time on a run root (ptmst_ray/lease.py): a second command is refused while the first lives,
naming it; a killed holder's or a silent machine's lease is taken over; the heartbeat renews; release removes only
its own lease; the same on an S3 bucket. Holders are real processes (the lease tells processes apart)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptmst_ray import lease, storage
from ptmst_ray.lease import RootInUse, RootLease

HOLD = ("import sys, time\n"
        "from ptmst_ray.lease import RootLease\n"
        "RootLease(sys.argv[1], 'ptmst-ray run').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def holder():
    """Start a process that takes a root's lease and keeps it; killed at the end."""
    procs = []

    def start(root: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, root], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def _write_lease(root: Path, **fields) -> dict:
    record = {"command": "ptmst-ray run", "host": "another-host", "pid": 1, "started": "then",
              "heartbeat": time.time(), "token": "theirs", **fields}
    root.mkdir(parents=True, exist_ok=True)
    (root / lease.LEASE_FILE).write_text(json.dumps(record))
    return record


def test_a_second_command_is_refused_while_the_first_holds_the_root(tmp_path, holder):
    root = tmp_path / "root"
    proc = holder(str(root))
    with pytest.raises(RootInUse) as err:
        RootLease(str(root), "ptmst-ray eval").acquire()
    message = str(err.value)
    for part in (str(root), "`ptmst-ray run`", f"pid {proc.pid}", socket.gethostname(), "--set run.root=",
                 str(root / lease.LEASE_FILE)):
        assert part in message, (part, message)
    assert json.loads((root / lease.LEASE_FILE).read_text())["pid"] == proc.pid  # the holder's lease untouched


def test_a_killed_holders_lease_is_taken_over(tmp_path, holder, caplog):
    root = tmp_path / "root"
    proc = holder(str(root))
    proc.send_signal(signal.SIGKILL)
    deadline = time.time() + 30  # not reaped yet (no wait()): a zombie, which has ended all the same
    while not Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        assert time.time() < deadline
        time.sleep(0.05)
    assert (root / lease.LEASE_FILE).exists()  # a killed process cannot remove it
    with caplog.at_level(logging.WARNING, logger="ptmst_ray.lease"):
        mine = RootLease(str(root), "ptmst-ray run").acquire()
    try:
        assert f"process {proc.pid} on this host has ended" in caplog.text
        assert json.loads((root / lease.LEASE_FILE).read_text())["token"] == mine.record["token"]
    finally:
        mine.release()
    assert not (root / lease.LEASE_FILE).exists()


def test_another_hosts_lease_holds_until_its_heartbeat_is_stale(tmp_path):
    root = tmp_path / "root"
    _write_lease(root, heartbeat=time.time() - 10)
    with pytest.raises(RootInUse, match="on host another-host"):
        RootLease(str(root), "ptmst-ray run").acquire()
    _write_lease(root, heartbeat=time.time() - lease.STALE_S - 5)
    with RootLease(str(root), "ptmst-ray run") as mine:
        assert json.loads((root / lease.LEASE_FILE).read_text())["token"] == mine.record["token"]


def test_a_damaged_lease_names_no_holder_and_is_taken_over(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / lease.LEASE_FILE).write_text('{"command": "ptmst-ru')
    with RootLease(str(root), "ptmst-ray run") as mine:
        assert json.loads((root / lease.LEASE_FILE).read_text())["token"] == mine.record["token"]


def test_heartbeat_renews_without_counting_as_an_artefact_write_and_release_keeps_anothers_lease(tmp_path, caplog):
    root = tmp_path / "root"
    writes = storage.writes()
    mine = RootLease(str(root), "ptmst-ray run", heartbeat_s=0.1).acquire()
    first = json.loads((root / lease.LEASE_FILE).read_text())["heartbeat"]
    deadline = time.time() + 30
    while json.loads((root / lease.LEASE_FILE).read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads((root / lease.LEASE_FILE).read_text())["heartbeat"] > first
    # a stage that wrote no artefact did no work (pipeline's stage table reads storage.writes): beats are not writes
    assert storage.writes() == writes
    theirs = _write_lease(root, host=socket.gethostname(), pid=1)  # someone took it over (judged it stale)
    with caplog.at_level(logging.WARNING, logger="ptmst_ray.lease"):
        mine.release()
    assert json.loads((root / lease.LEASE_FILE).read_text()) == theirs  # not removed: it is not ours
    assert "now held by" in caplog.text


runner = CliRunner()

COMMANDS = [["run"], ["run", "--rebuild", "experts"], ["run", "--as-job"], ["eval", "-m", "random"], ["experts"],
            ["shortcut"], ["pretrain"], ["data", "prepare"], ["sweep"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_every_writing_command_is_refused_on_a_held_root_before_ray_starts(tmp_path, holder, monkeypatch, args):
    import ray

    from ptmst_ray_cli.main import app

    def refuse(*a, **k):
        raise AssertionError("Ray was started on a root another command holds")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 400)  # the message on one line
    root = tmp_path / "root"
    (root / "experts" / "expert_0000").mkdir(parents=True)
    (root / "experts" / "expert_0000" / "trajectory.json").write_text("{}")  # what --rebuild experts would delete
    proc = holder(str(root))
    result = runner.invoke(app, [*args, "--set", f"run.root={root}"])
    assert result.exit_code == 2, result.output
    assert f"run root {root} is in use by `ptmst-ray run` (pid {proc.pid}" in result.output, result.output
    assert sorted(p.name for p in root.iterdir()) == ["experts", lease.LEASE_FILE]
    assert (root / "experts" / "expert_0000" / "trajectory.json").exists()


def test_lease_on_a_bucket(s3, holder):
    url = s3.url("runs", "r1")
    proc = holder(url)
    with pytest.raises(RootInUse, match=f"pid {proc.pid}"):
        RootLease(url, "ptmst-ray eval").acquire()
    proc.kill()
    proc.wait(timeout=30)
    with RootLease(url, "ptmst-ray run") as mine:  # the killed holder (this host) is taken over
        assert json.loads(storage.read_text(lease.lease_url(url)))["token"] == mine.record["token"]
        assert s3.keys() == [f"runs/r1/{lease.LEASE_FILE}"]
    assert s3.keys() == []


def test_launch_refuses_a_held_run_root_before_any_cluster_step(s3, monkeypatch):
    """`ptmst-ray launch` reads the run root's lease before its first step (`ray up`): a root another live command
    holds (here a driver on another machine, its heartbeat fresh) is refused and no step runs."""
    import ptmst_ray.cluster.launch as launch_mod
    from ptmst_ray_cli.main import app

    ran = []
    monkeypatch.setattr(launch_mod, "execute_plan", lambda steps, **k: ran.append(steps) or pytest.fail("ran"))
    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 400)
    root = s3.url("runs", "held")
    record = {"command": "ptmst-ray run", "host": "head-node", "pid": 4242, "started": "then",
              "heartbeat": time.time() - 5, "token": "theirs"}
    storage.write_json(lease.lease_url(root), record)
    cluster_yaml = str(Path(__file__).resolve().parents[1] / "cluster" / "gpu.yaml")
    result = runner.invoke(app, ["launch", cluster_yaml, "--set", f"run.root={root}"])
    assert result.exit_code == 2, result.output
    assert f"run root {root} is in use by `ptmst-ray run` (pid 4242 on host head-node" in result.output
    assert ran == []
    storage.write_json(lease.lease_url(root), {**record, "heartbeat": time.time() - lease.STALE_S - 5})
    monkeypatch.setattr(launch_mod, "execute_plan", lambda steps, **k: ran.append(steps) or launch_mod.LaunchContext("x"))
    result = runner.invoke(app, ["launch", cluster_yaml, "--set", f"run.root={root}"])
    assert ran and result.exit_code == 0, result.output  # a silent holder: the launch goes on, its job takes over
