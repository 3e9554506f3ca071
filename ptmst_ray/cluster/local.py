"""A local Ray cluster of `ray start --block` child processes on free loopback ports, and its exact stop.

Why not ``ray.init()``: Ray 2.60's dashboard agent, which serves the Jobs API on every node, listens on
the fixed port 52365 unless `ray start --dashboard-agent-listen-port` says otherwise, and ``ray.init()``
cannot say so: a second local Ray beside a notebook's or a test session's could not take Ray Jobs. Here
every port is picked free, the dashboard binds to 127.0.0.1, and the cluster has its own temp dir (its logs).
A single-machine cluster (the default) also has 127.0.0.1 as its node address, so that Ray binds its own
servers (GCS, raylet, agents, Ray Client) to loopback only: Ray 2.60 replaces a ``--node-ip-address`` of
127.0.0.1 by the machine's address, except in its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
the default on macOS and Windows), in which no worker node can join. Each node's `ray start --block` runs in a
session of its own and every process of the cluster inherits ``RAY_TMPDIR=<its temp dir>``, so
:meth:`LocalCluster.stop` ends exactly this cluster's processes, including the Ray Job drivers, which Ray
starts in sessions of their own (never `ray stop`: it stops every Ray on the machine).

Used by `ptmst-ray run --as-job` and by the two-node test fixture (tests/test_launch.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Optional

from ptmst_ray.cluster import jobs
from ptmst_ray.cluster.spec import LaunchError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
"""The ports every node opens; each gets a free one (Ray's defaults, e.g. the agent's 52365, collide with
another Ray on the machine)."""
HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port")
"""The head's own ports (GCS, dashboard, Ray client server), free ones as well."""
SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch of its single-machine mode ("0"; Ray's default on macOS and Windows): the node address is
127.0.0.1, so every server Ray starts (GCS, raylet, agents, workers) listens on loopback only and no other
machine can join. Elsewhere Ray's default is to listen on every interface. Also used by a laptop-mode
``ray.init()`` (``orchestration.runtime.loopback_only``)."""
SINGLE_MACHINE_ENV = {SINGLE_MACHINE_VAR: "0"}
START_ATTEMPTS = 2
"""A head that exits while starting is started again once on new ports: a free port picked here can be
taken by another process before Ray binds it."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 now (bound together, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def ray_command() -> list[str]:
    """The `ray` CLI of this Python (the venv's, whether or not it is activated)."""
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def auth_env(env: Mapping[str, str], token: Optional[str]) -> tuple[dict[str, str], Optional[str]]:
    """(``env`` with the cluster's token auth, the token a client sends).

    ``token`` given: the cluster checks exactly that token (RAY_AUTH_TOKEN). Otherwise as a local start by
    :func:`ptmst_ray.orchestration.runtime.connect`: token mode unless RAY_AUTH_MODE says otherwise, the
    token read from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, created (owner-only) if
    missing, so `ptmst-ray token` prints the one the dashboard asks for.
    """
    env = dict(env)
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env, token
    if env.get("RAY_AUTH_MODE", "token").lower() != "token":
        return env, None
    env["RAY_AUTH_MODE"] = "token"
    if env.get("RAY_AUTH_TOKEN"):
        return env, env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise LaunchError(f"RAY_AUTH_TOKEN_PATH={path}: no such token file; create it with "
                              "`ray get-auth-token --generate` or unset RAY_AUTH_TOKEN_PATH")
        return env, path.read_text().strip()
    return env, jobs.ensure_auth_token().read_text().strip()


def process_environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with ({} when it cannot be read: another user's, gone, a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def processes_with_tmpdir(temp_dir: str) -> list[int]:
    """Pids of the processes that inherited ``RAY_TMPDIR=temp_dir``: every process of a cluster started
    by :func:`start_local_cluster` (nodes, workers, Ray Job drivers and their watchers). Linux /proc."""
    own = os.getpid()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []
    return sorted(p for p in pids if p != own and process_environ(p).get("RAY_TMPDIR") == temp_dir)


@dataclass
class LocalCluster:
    """A running local cluster: its addresses, its temp dir, its `ray start --block` processes."""

    temp_dir: str
    """Root of every node's Ray temp dir (sessions, logs, sockets); ``<temp_dir>/<node>.log`` holds each
    node's `ray start` output."""
    gcs_address: str
    """``127.0.0.1:port`` of the GCS, what ``ray.init(address=...)`` and `ray start --address` take."""
    dashboard_url: str
    """``http://127.0.0.1:port`` of the dashboard (and its Jobs API)."""
    token: Optional[str]
    """The token the cluster checks (None with token auth disabled)."""
    env: dict[str, str]
    """The environment every node starts with (and so every worker and job driver)."""
    single_machine: bool = True
    """Nodes on 127.0.0.1 only (see the module's docstring); False lets worker nodes join (:meth:`add_worker`)."""
    procs: list[subprocess.Popen] = field(default_factory=list)
    """The nodes' `ray start --block` processes, head first; each leads a session of its own."""
    logs: list[IO] = field(default_factory=list)
    """The nodes' open `ray start` output files, closed by :meth:`stop`."""

    def start_node(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start `ray start --block ARGS` as node ``name`` (its output in ``<temp_dir>/<name>.log``)."""
        out = open(Path(self.temp_dir) / f"{name}.log", "w")
        self.logs.append(out)
        proc = subprocess.Popen([*ray_command(), "start", "--block", *args], env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def add_worker(self, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
                   resources: Optional[Mapping[str, float]] = None, joined: Optional[Callable[[], bool]] = None,
                   timeout_s: float = 120.0) -> None:
        """Start a worker node joining this cluster, in its own temp dir under :attr:`temp_dir` (nodes sharing
        one would share the runtime-env folder, and a node re-extracting a job's working_dir deletes the running
        driver's cwd). Without ``joined`` it returns at once (wait with :meth:`wait_until`); with it (a check
        that the node is up, e.g. the cluster's node count) it waits up to ``timeout_s`` s, and a node whose `ray
        start` exits while starting is started once more on new ports: Ray 2.60 gives a node's raylet a fixed 30 s
        to register ("The current node timed out during startup"), which a loaded machine can miss."""
        if self.single_machine:
            raise LaunchError(f"local Ray {self.temp_dir}: started single_machine=True, so no worker node can join "
                              "(Ray's single-machine mode); start it with single_machine=False")
        for attempt in range(1, START_ATTEMPTS + 1):
            name = f"worker{len(self.logs)}"  # a node started again gets a log and a temp dir of its own
            proc = self.start_node(name, [f"--address={self.gcs_address}", f"--temp-dir={self.temp_dir}/{name}",
                                          *_resource_args(num_cpus, num_gpus, resources), *_port_args(NODE_PORT_FLAGS)])
            if joined is None:
                return
            try:
                self.wait_until(joined, timeout_s, f"{name} joined")
                return
            except LaunchError:
                if proc.poll() is None or attempt == START_ATTEMPTS:
                    raise
                log.warning("local Ray %s: %s's `ray start` exited with %s while starting; starting it again",
                            self.temp_dir, name, proc.returncode)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # what that start left in its session
                self.procs.remove(proc)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of each node's `ray start` output, for an error message."""
        return "\n".join(f"{p.name}: ...{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(Path(self.temp_dir).glob("*.log")))

    def wait_until(self, check, timeout_s: float, what: str) -> None:
        """Poll ``check()`` each second until it is true; LaunchError (with the nodes' output) when a node's
        `ray start` exits or ``timeout_s`` passes. A LaunchError from ``check`` means "not yet"."""
        deadline = time.monotonic() + timeout_s
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise LaunchError(f"local Ray ({self.temp_dir}): `ray start` exited with {p.returncode} "
                                      f"before {what}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except LaunchError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(f"local Ray ({self.temp_dir}): no {what} after {timeout_s:.0f} s; its nodes "
                                  f"said:\n{self.log_tail()}")
            time.sleep(1)

    def processes(self) -> list[int]:
        """Pids of every process of this cluster still there (see :func:`processes_with_tmpdir`)."""
        return processes_with_tmpdir(self.temp_dir)

    def stop(self, grace_s: float = 8.0, keep_temp: bool = False) -> None:
        """End exactly this cluster: SIGTERM to each `ray start --block` (which then stops its node), at most
        ``grace_s`` for that, then SIGKILL to whatever of the cluster is left (a head alone took 30 s to exit
        gracefully); the temp dir removed unless ``keep_temp``. Safe to call twice."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_rest()
        for out in self.logs:
            out.close()
        self.logs.clear()
        if not keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_rest(self, timeout_s: float = 10.0) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # a session we created: only this cluster is in it
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout_s
        while (left := self.processes()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("`ray start` (pid %d) of %s did not exit", p.pid, self.temp_dir)
        if left:
            log.warning("local Ray %s: processes %s still there after SIGKILL", self.temp_dir, left)


def start_local_cluster(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
                        resources: Optional[Mapping[str, float]] = None, env: Optional[Mapping[str, str]] = None,
                        token: Optional[str] = None, single_machine: bool = True, timeout_s: float = 120.0,
                        prefix: str = "ptr") -> LocalCluster:
    """Start a head node (`ray start --head --block`) and return once its dashboard answers.

    ``num_cpus``/``num_gpus`` None: what Ray detects (as ``ray.init()``); ``resources``: custom ones (e.g.
    ``train_driver``); ``env``: the nodes' environment (default: this process's), plus RAY_TMPDIR, token auth
    (:func:`auth_env`), this Python's bin folder first on PATH and RAY_ADDRESS set to this cluster: Ray code that
    looks for "the" local cluster (Ray Train's state actor asks the State API) otherwise finds every Ray on the
    machine and fails with "Found multiple active Ray instances"; ``single_machine``:
    everything on 127.0.0.1 and no worker nodes (False: the machine's address, :meth:`LocalCluster.add_worker`
    works; Ray's gRPC servers then listen on every interface). Raises LaunchError
    with the head's output when it does not come up; a head that exits while starting is retried on new ports.
    """
    dropped = {"RAY_ADDRESS", SINGLE_MACHINE_VAR}  # the mode is this call's choice, never the caller's env's
    base = {k: v for k, v in (os.environ if env is None else env).items() if k not in dropped}
    base, token = auth_env(base, token)
    error: Optional[LaunchError] = None
    for _ in range(START_ATTEMPTS):
        temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
        gcs, dash, client = free_ports(len(HEAD_PORT_FLAGS))
        cluster = LocalCluster(
            temp_dir=temp, gcs_address=f"{LOOPBACK}:{gcs}", dashboard_url=f"http://{LOOPBACK}:{dash}", token=token,
            single_machine=single_machine,
            env={**base, **(SINGLE_MACHINE_ENV if single_machine else {}), "RAY_TMPDIR": temp,
                 "RAY_ADDRESS": f"{LOOPBACK}:{gcs}", "RAY_USAGE_STATS_ENABLED": "0",
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"})
        try:
            cluster.start_node("head", [
                "--head", f"--port={gcs}", f"--dashboard-host={LOOPBACK}",
                f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--temp-dir={temp}",
                *_resource_args(num_cpus, num_gpus, resources), *_port_args(NODE_PORT_FLAGS)])
            cluster.wait_until(lambda: jobs.job_client(cluster.dashboard_url, token=token) is not None,
                               timeout_s, "dashboard answering")
            return cluster
        except LaunchError as e:
            exited = any(p.poll() is not None for p in cluster.procs)
            cluster.stop()
            if not exited:
                raise
            error = e
        except BaseException:
            cluster.stop()
            raise
    assert error is not None
    raise error


def _port_args(flags: tuple[str, ...]) -> list[str]:
    return [f"{flag}={port}" for flag, port in zip(flags, free_ports(len(flags)))]


def _resource_args(num_cpus: Optional[int], num_gpus: Optional[int],
                   resources: Optional[Mapping[str, float]]) -> list[str]:
    args = [] if num_cpus is None else [f"--num-cpus={num_cpus}"]
    args += [] if num_gpus is None else [f"--num-gpus={num_gpus}"]
    return args + ([f"--resources={json.dumps(dict(resources))}"] if resources else [])
