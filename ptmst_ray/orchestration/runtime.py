"""Connecting to Ray (laptop or cluster), reading its resources, the shared progress board, and the
few scheduling helpers every stage's scheduler uses (waiting with a poll, a bounded pool, attempts).

Why this file exists: every command starts Ray the same way: a local instance whose dashboard
is bound to loopback (never 0.0.0.0: the dashboard and Jobs API run code for whoever reaches
them), or an existing cluster given by --address / RAY_ADDRESS. Work is sized from the
cluster's resources, and progress from actors and Train workers flows through one named actor
that the CLI polls to draw its bars.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import ray

from ptmst_ray import storage
from ptmst_ray.cluster.jobs import ensure_auth_token
from ptmst_ray.cluster.spec import LOOPBACK_HOSTS

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
BOARD_NAME = "ptmst-progress"
NAMESPACE = "ptmst-ray"
TRAIN_DRIVER = "train_driver"
"""Custom resource that Tune trial drivers hold instead of CPUs: a trial holding a CPU while its Train
runs wait for CPUs deadlocks a small cluster (docs/design.md#ray-topology)."""


@dataclass(frozen=True)
class ClusterInfo:
    cpus: float
    gpus: float
    nodes: int
    dashboard_url: str | None = None
    """The dashboard of the cluster this process is connected to (http://host:port), as Ray reports it:
    a second local Ray gets the next free port, so 8265 is not always this run's."""

    autoscaler_gpus: float = 0.0
    """GPUs the cluster's autoscaler can add (GPU node types x their max_workers; :func:`autoscaler_gpus`),
    0 without an autoscaler or when its config cannot be read."""

    node_cpus: float = 0.0
    """The CPUs of the largest node up now (0: not known): what one worker can be given at most."""

    @property
    def has_gpus(self) -> bool:
        return self.gpus >= 1

    def parallel_slots(self, gpus_per_job: float = 1.0) -> int:
        """How many one-accelerator jobs can run at once (CPUs when there are no GPUs)."""
        return self.slots(gpus_per_job, self.has_gpus)

    def cpu_share(self, jobs: int) -> int:
        """CPUs for each of ``jobs`` CPU jobs that run at once (a stage's expert actors, pretraining runs or phase
        workers): an equal share of the CPUs there now, at most one node's, at least one. A worker's torch
        threads follow from what it was given (:func:`worker_threads`), so a stage with fewer jobs than CPUs
        (two phases on an 8-core laptop, one phase left to resume) leaves no core idle."""
        share = self.cpus // max(1, jobs)
        if self.node_cpus:
            share = min(share, self.node_cpus)
        return max(1, int(share))

    def slots(self, gpus_per_job: float, use_gpus: bool) -> int:
        """How many jobs can run at once: on GPUs (those there now or, if more, those the autoscaler can add,
        ``gpus_per_job`` each), else on the CPUs there now (one each)."""
        if use_gpus:
            return max(1, int(max(self.gpus, self.autoscaler_gpus) // max(gpus_per_job, 1e-6)))
        return max(1, int(self.cpus))


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropTokenAuthEnabled(logging.Filter):
    """Drops Ray 2.60's warning that token authentication is enabled, which every local start prints: the CLI says
    where the token is instead (README: how to turn it off). Ray's warning that it is *disabled* is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def quiet_token_auth_warning() -> None:
    """Install :class:`_DropTokenAuthEnabled` on Ray's authentication logger (once)."""
    logger = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthEnabled) for f in logger.filters):
        logger.addFilter(_DropTokenAuthEnabled())


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            train_drivers: int = 16) -> ClusterInfo:
    """Start or join Ray. A local start binds the dashboard to loopback only."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            problem = address_problem(address)
            if problem:
                raise LocalRayError(f"cannot join the Ray cluster at {address}: {problem}")
            log.info("joining the Ray cluster at %s", address)
            send_auth_token()
            try:
                with loopback_only() if listens_on_loopback_only(address) else contextlib.nullcontext():
                    ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
            except ConnectionError as e:  # an OSError: not a storage problem, whatever the caller's handler says
                raise LocalRayError(
                    f"cannot join the Ray cluster at {address}: it answers but did not let this process join ({e}). "
                    "A cluster with token auth refuses a missing or different token: put the cluster's token in "
                    "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (on the head: `ptmst-ray token`)"
                ) from None
        else:
            # the token Ray's dashboard asks for: created now (owner-only) so the CLI can say where it is
            if (os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
                    and not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH")):
                ensure_auth_token()
                quiet_token_auth_warning()
            _STARTED_LOCAL[0] = True
            _start_local(num_cpus, num_gpus, train_drivers)
    return cluster_info()


def send_auth_token() -> None:
    """Make this process send the Ray auth token when it joins a cluster, when there is one (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE does not say otherwise: Ray 2.60 enables token auth
    by itself only for a local cluster it finds, never for an explicit address, so `--address` to a cluster started
    with token auth (as `ptmst-ray launch`'s and a local start's are) was refused although the token was there. A
    cluster without token auth ignores it."""
    from ptmst_ray.cluster.jobs import read_auth_token

    if "RAY_AUTH_MODE" not in os.environ and read_auth_token():
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # this process and its children (Ray caches the mode: refreshed by this call)


class LocalRayError(RuntimeError):
    """Ray could not be started or joined; the message says what to do (nothing of the run had started)."""


STARTUP_TIMEOUT = "timed out during startup"
"""Ray 2.60's error when a local node's raylet has not registered with the GCS 30 s after it started (a fixed wait,
``ray/_private/node.py``): seen on 2 cores with other Rays starting beside it. Nothing of the project has run then;
the processes that attempt started are ended and Ray is started once more."""
PORT_TAKEN = "Failed to find a valid port for dashboard"
"""Ray 2.60's error when the dashboard cannot bind the port :func:`_init_local` picked free a moment before (another
process took it in between: seen with several Rays starting on one machine). Handled as :data:`STARTUP_TIMEOUT`:
that attempt's processes are ended and Ray is started again, on a new port."""
STARTUP_ATTEMPTS = 2


def _start_local(num_cpus: int | None, num_gpus: int | None, train_drivers: int) -> None:
    """Start the local Ray; after Ray's startup timeout, end the processes that attempt left and start again."""
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        before = _descendants()
        try:
            _init_local(num_cpus, num_gpus, train_drivers)
            return
        except Exception as e:
            if STARTUP_TIMEOUT not in str(e) and PORT_TAKEN not in str(e):
                raise
            left = _descendants() - before
            why = ("Ray waits a fixed 30 s for its node to register, too short on a loaded machine"
                   if STARTUP_TIMEOUT in str(e) else "another process took the dashboard's port first")
            if attempt < STARTUP_ATTEMPTS:
                log.warning("the local Ray did not come up (%s: %s); ending its %d processes and starting it again",
                            str(e).strip().splitlines()[0], why, len(left))
            _end_processes(left)
            if attempt == STARTUP_ATTEMPTS:
                raise LocalRayError(
                    f"the local Ray did not come up in {STARTUP_ATTEMPTS} attempts ({e}); the machine is too busy: "
                    "stop other work (`ray stop` ends the Rays you started), then run the same command again"
                ) from None


def _init_local(num_cpus: int | None, num_gpus: int | None, train_drivers: int) -> None:
    from ptmst_ray.cluster.local import free_ports

    (port,) = free_ports(1)
    log.info("starting a local Ray instance (dashboard on %s:%d)", LOOPBACK, port)
    with (loopback_only(), _env_default(PREEMPTION_WATCHER_VAR, "0"),
          _env_set(API_SERVER_VAR, f"http://{LOOPBACK}:{port}")):
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, namespace=NAMESPACE, include_dashboard=True,
                 dashboard_host=LOOPBACK, dashboard_port=port, resources={TRAIN_DRIVER: train_drivers},
                 log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)


def _processes() -> dict[int, int]:
    """Every living (not zombie) process and its parent, from /proc (empty where there is none)."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    return parents


def _descendants(root: int | None = None) -> set[int]:
    """Every living process below ``root`` (this process)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, parent in _processes().items():
        children[parent].append(pid)
    found, todo = set(), [os.getpid() if root is None else root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _end_processes(pids: set[int], grace_s: float = 1.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` for those still there (processes this process started; those of a
    failed Ray start hold nothing: its GCS, raylet and agents outlast a SIGTERM by 10 s or more)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while (pids := pids & _processes().keys()) and time.monotonic() < deadline:  # orphans count too
            time.sleep(0.2)
        if not pids:
            return


API_SERVER_VAR = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API clients in this Ray's processes find its dashboard. Ray Train's placement-group cleaner
(one actor per Train run, which removes the run's placement group when its controller dies, e.g. killed by
Ray's OOM killer) asks the State API with no address: without this it looks for "the" local Ray, and with a
second Ray on the machine fails ("Found multiple active Ray instances") and stops watching, so the dead
run's placement group holds its CPUs or GPUs and a retried run waits for them forever. :func:`connect` sets it
for the processes of the Ray it starts (they inherit the environment of ``ray.init()``); the clusters of
`ptmst_ray.cluster.local` set RAY_ADDRESS instead."""


PREEMPTION_WATCHER_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
"""Ray Train 2.60 starts one more actor process per Train run (a ``PreemptionWatcher``, ~1.5 CPU-s to start) that
polls for node drains (spot preemption) unless this is "0"; a local Ray of one machine has no node to drain, so
:func:`connect` starts it with "0" (a value the user set is kept). Read by each run's TrainController, which
inherits the environment of the Ray started here; a cluster joined by address keeps its own setting."""


@contextlib.contextmanager
def _env_set(name: str, value: str) -> Iterator[None]:
    """``os.environ[name]`` is ``value`` inside the block (for the processes started there), then is restored."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _env_default(name: str, value: str) -> contextlib.AbstractContextManager:
    """``os.environ[name]`` defaults to ``value`` inside the block (for the processes started there), then is restored."""
    return contextlib.nullcontext() if name in os.environ else _env_set(name, value)


@contextlib.contextmanager
def loopback_only():
    """Around a local ``ray.init()``: Ray's single-machine mode for the processes it starts (they read
    :data:`SINGLE_MACHINE_VAR` from the environment they inherit; workers inherit the raylet's) and for this
    process's choice of the node address (read when Ray was imported); both restored after, so that a later
    `ray start` of a multi-node cluster from this process is not affected. A user who set the variable to
    another value than "0" gets Ray's own behaviour."""
    from ray._private import ray_constants

    from ptmst_ray.cluster.local import SINGLE_MACHINE_VAR

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    if saved_env not in (None, "0"):
        yield
        return
    os.environ[SINGLE_MACHINE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_VAR, None)


def listens_on_loopback_only(address: str, timeout: float = 2.0) -> bool:
    """Whether ``address`` (host:port of a GCS) names a loopback host whose port answers on loopback but not on this
    machine's own address: a local Ray started in single-machine mode (:func:`loopback_only`: laptop mode, a test
    session's Ray). Ray 2.60 replaces a loopback GCS host by this machine's address before it connects (so that
    the driver's node address matches a raylet's), except in its single-machine mode; without that mode, joining
    such a Ray waits on an address nothing listens on (minutes of retries, then a timeout), so
    :func:`connect` joins it in that mode. False for any other address (a cluster that listens on every
    interface is joined as Ray does it)."""
    from ray._common.network_utils import is_localhost, node_ip_address_from_perspective, parse_address
    from ray._private import ray_constants

    parsed = parse_address(address) if "://" not in address else None
    if not parsed or not is_localhost(parsed[0]) or not ray_constants.ENABLE_RAY_CLUSTER:
        return False
    port = int(parsed[1])
    own = node_ip_address_from_perspective()
    return (not is_localhost(own) and _refused(LOOPBACK, port, timeout) is None
            and _refused(own, port, timeout) is not None)


def _refused(host: str, port: int, timeout: float) -> OSError | None:
    """Why a TCP connection to ``host:port`` failed within ``timeout``; None when something answers."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e


def address_problem(address: str, timeout: float = 5.0) -> str | None:
    """Why Ray cannot be joined at ``address``, found in seconds before anything starts: Ray 2.60 waits minutes on a
    port nothing answers before it gives up. None when the port answers (on loopback or this machine's own address
    for a local host: Ray joins either) or for "auto" / "local", which Ray resolves itself."""
    from ray._common.network_utils import is_localhost, node_ip_address_from_perspective, parse_address

    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        return ("that is a dashboard (Jobs API) address, for `ptmst-ray status`, `logs` and `launch --address`; "
                "a run joins Ray at its GCS address, host:6379, or through Ray Client at ray://host:10001")
    parsed = parse_address(address.split("://", 1)[-1])
    if not parsed or not parsed[1].isdigit():
        return "expected host:port (the head's GCS address, e.g. 10.0.0.5:6379) or ray://host:10001"
    host, port = parsed[0], int(parsed[1])
    hosts = [host] + ([node_ip_address_from_perspective()] if is_localhost(host) else [])
    errors = []
    for h in hosts:
        if (e := _refused(h, port, timeout)) is None:
            return None
        errors.append(f"{h}:{port}: {e.strerror or e}")
    return (f"nothing answers ({'; '.join(errors)}); is the cluster up (`ray status --address {address}`)? "
            "Without an address (no --address, run.address or RAY_ADDRESS) a local Ray is started instead")


def cluster_info() -> ClusterInfo:
    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)), nodes=len(alive),
                       dashboard_url=dashboard_url(), autoscaler_gpus=autoscaler_gpus()[0] or 0.0,
                       node_cpus=max((float(n.get("Resources", {}).get("CPU", 0)) for n in alive), default=0.0))


def _address_info() -> dict:
    node = getattr(ray._private.worker.global_worker, "node", None)
    return dict(node.address_info) if node is not None else {}


def dashboard_url() -> str | None:
    """``http://host:port`` of the connected cluster's dashboard (None without one), as Ray reports it.

    A driver joining a cluster sees the head's address (a port-forward makes it 127.0.0.1:8265).
    """
    url = _address_info().get("webui_url")
    return (url if "://" in url else f"http://{url}") if url else None


def metrics_export_port() -> int | None:
    """This node's Prometheus metrics port (Ray's metrics agent; ``ray_``-prefixed names), or None."""
    port = _address_info().get("metrics_export_port")
    return int(port) if port else None


def local_dashboards() -> list[str]:
    """Dashboard URLs of the Ray clusters running on this machine (read from each one's GCS), oldest
    port first; for `ptmst-ray dashboard` when no run printed its address."""
    if "RAY_AUTH_MODE" not in os.environ:  # the GCS checks the token: send it (Ray caches the mode at import)
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    from ray._private.services import find_gcs_addresses
    from ray._raylet import GcsClient

    urls = []
    for address in find_gcs_addresses():
        try:
            url = GcsClient(address=address).internal_kv_get(b"webui:url", namespace=b"dashboard", timeout=3)
        except Exception as e:  # noqa: BLE001 - a cluster going down, another user's cluster
            log.debug("%s: no dashboard address (%s)", address, e)
            continue
        if url:
            urls.append(f"http://{url.decode()}")
    return sorted(set(urls))


def ensure_train_state_actor() -> None:
    """Create Ray Train's state actor (``train_v2_state_actor``) once, before concurrent Train runs start.

    Every Train 2.60 controller calls ``get_or_create_state_actor`` with ``get_if_exists=True`` under a
    lock that is per process only: two runs starting at the same moment from two launcher tasks both try
    to create the named actor, one of them loses with ``AlreadyExists`` and the dashboard's Jobs page
    shows a failed task on a healthy run. Created here first, every controller finds it.
    """
    if os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING", "0") not in ("1", "true", "True"):
        return
    try:
        from ray.train.v2._internal.state.state_actor import get_or_create_state_actor

        ray.get(get_or_create_state_actor().__ray_ready__.remote(), timeout=60)
    except Exception as e:  # noqa: BLE001 - only the dashboard's Train view depends on it
        log.warning("Ray Train's state actor could not be created up front (%s); the dashboard may show "
                    "a spurious failed task", e)


def actor_name(base: str) -> str:
    """A dashboard name for an actor this driver starts: ``base`` plus this driver's short id, so two runs
    on one cluster (or a re-run before the last one's actors are gone) never collide."""
    return f"{base}-{RUN_ID}"


RUN_ID = uuid.uuid4().hex[:6]
"""This driver process's short id, in the names of the actors it starts."""


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Named actor: tasks report (done, total, info); the CLI polls :meth:`snapshot`."""

    def __init__(self):
        self.tasks: dict[str, dict] = {}

    def update(self, name: str, done: float, total: float, info: str = "") -> None:
        now = time.time()
        last = self.tasks.get(name)
        self.tasks[name] = {"done": done, "total": total, "info": info, "time": now}
        # the board's log (dashboard: Actors > ptmst-progress > Logs) follows the run: one line per task
        # when it starts, finishes, or at most every 10 s while it moves
        finished = done >= total and (last is None or last["done"] < last["total"])
        if last is None or finished or (int(done) != int(last["done"]) and now - last.get("logged", 0) >= 10):
            print(f"{name}: {done:.0f}/{total:.0f} {info}", flush=True)
            self.tasks[name]["logged"] = now
        elif last is not None:
            self.tasks[name]["logged"] = last.get("logged", 0)

    def snapshot(self) -> dict[str, dict]:
        return dict(self.tasks)

    def clear(self) -> None:
        self.tasks.clear()

    def __repr__(self) -> str:
        """The dashboard's "Repr" of this actor. Ray reads it once, at creation, so it says what the actor is
        (and the state then); the live state is in the board's log (printed by :meth:`update`)."""
        busy = [f"{n} {t['done']:.0f}/{t['total']:.0f}" + (f" {t['info']}" if t["info"] else "")
                for n, t in sorted(self.tasks.items()) if t["done"] < t["total"]]
        done = sum(1 for t in self.tasks.values() if t["done"] >= t["total"])
        text = "; ".join(busy) if busy else "idle"
        return f"progress: {text} ({done} done)"[:500]


def progress_board():
    """The run's progress board (created on first use)."""
    return ProgressBoard.options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True).remote()


def report_progress(board, name: str, done: float, total: float, info: str = "") -> None:
    """Fire-and-forget update; progress must never fail the work it describes."""
    if board is None:
        return
    try:
        board.update.remote(name, done, total, info)
    except Exception as e:  # noqa: BLE001 - a dead board only costs the display
        log.debug("progress board unavailable: %s", e)


_INTERRUPTED = threading.Event()


def install_interrupt_handler() -> None:
    """Make Ctrl-C stop the driver at its next progress poll even if the first KeyboardInterrupt is lost.

    Python raises KeyboardInterrupt wherever the main thread happens to be; inside Ray's blocking
    calls that exception can be swallowed (seen here: a SIGINT during the experts stage was ignored
    and the run went on). The handler also sets a flag that every wait loop checks
    (:func:`check_interrupted`), so the interrupt lands within one poll interval. Main thread only.
    """
    _INTERRUPTED.clear()

    def handler(signum, frame):
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt when Ctrl-C was pressed (see :func:`install_interrupt_handler`)."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt



# --------------------------------------------------------------------------- waiting and pools


class UI(Protocol):
    """What the driver shows: a header per stage and the progress board's tasks."""

    def stage(self, name: str) -> None: ...

    def update(self, tasks: dict[str, dict]) -> None: ...


class NullUI:
    def stage(self, name: str) -> None:
        log.info("== %s", name)

    def update(self, tasks: dict[str, dict]) -> None:
        pass


Poll = Callable[..., None]
"""``poll()`` in the driver's wait loops; :func:`make_poll`'s also takes ``force=True``."""


def make_poll(board, ui: UI) -> Poll:
    """A poll for the driver's wait loops: Ctrl-C check, and the board's state to ``ui`` twice a second;
    ``poll(force=True)`` draws it now (at a stage's end, so that its last lines come before the next stage's
    header: in a log, where each change is a line, they came after it)."""
    last = [0.0]

    def poll(force: bool = False) -> None:
        check_interrupted()
        now = time.monotonic()
        if force or now - last[0] >= 0.5:
            last[0] = now
            try:
                ui.update(ray.get(board.snapshot.remote(), timeout=5))
            except Exception as e:  # noqa: BLE001 - the display must not fail the run
                log.debug("progress poll failed: %s", e)

    return poll


class Task:
    """A function as a Ray task whose resources each call gives (``.options(num_gpus=...)``): a call that asks for
    GPUs runs in a worker process of its own, which ends with the task; other calls run in Ray's pooled workers.

    Ray ends a worker after one task only for functions declared with GPUs (``@ray.remote(num_gpus=...)`` sets
    ``max_calls=1``: CUDA libraries keep a process's GPU memory after the task, ray-project/ray#29624, and CUDA keeps
    the device a process first bound whatever CUDA_VISIBLE_DEVICES Ray sets for its next task); GPUs given per call
    in ``.options`` bypass that, and a reused worker would hold memory on, and compute on, the GPU of an earlier
    task. On CPUs, reusing a worker saves its start-up (torch and open_clip imported again: seconds a task)."""

    def __init__(self, fn: Callable, **options):
        self._pooled = ray.remote(**options)(fn)
        self._own_process = ray.remote(max_calls=1, **options)(fn)
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def options(self, **call_options):
        chosen = self._own_process if call_options.get("num_gpus") else self._pooled
        return chosen.options(**call_options)

    def remote(self, *args, **kwargs):
        return self._pooled.remote(*args, **kwargs)


def task(**options) -> Callable[[Callable], Task]:
    """Decorator: ``@task(num_cpus=1)`` makes a :class:`Task` (``@ray.remote``'s options)."""
    return lambda fn: Task(fn, **options)


def wait_all(refs: list, poll: Poll | None = None) -> list:
    """``ray.get(refs)``, polling every half second while they run. Left by an exception (Ctrl-C, an error raised
    by ``poll``), it stops the tasks still running first (:func:`stop_tasks`)."""
    pending = list(refs)
    try:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if poll is not None:
                poll()
    except BaseException:
        stop_tasks(pending)
        raise
    return ray.get(refs)


def run_all(queue: collections.deque, submit: Callable[[Any], Any], slots: int, done: Callable[[Any, Any], None],
            poll: Poll | None = None) -> None:
    """Submit the items of ``queue`` with at most ``slots`` in flight; ``done(item, ref)`` as each finishes.

    ``done`` may ``ray.get`` the ref and put an item back into ``queue`` (a retry). Left by an exception (Ctrl-C,
    an error raised by ``done`` or ``poll``), it stops the tasks still in flight first (:func:`stop_tasks`).
    """
    pending: dict = {}
    try:
        while queue or pending:
            while queue and len(pending) < slots:
                item = queue.popleft()
                pending[submit(item)] = item
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if poll is not None:
                poll()
            for ref in ready:
                done(pending.pop(ref), ref)
    except BaseException:
        stop_tasks(list(pending))
        raise


CANCEL_ROUNDS = 5
"""How often :func:`stop_tasks` asks Ray to cancel a task whose result has not turned into a cancellation within
2 s, before it kills the task's worker (Ray's ``force``). Ray 2.60 loses a cancel that reaches a task on its way to a
worker that is still starting: seen on a loaded machine (3 busy loops beside a 2-CPU Ray), once in 16 cancels a
second cancel took, and for the first tasks of a fresh Ray no cancel took in 10 s while ``force`` did."""


def stop_tasks(refs: list) -> None:
    """Cancel the tasks of ``refs`` (and the tasks they started): a wait loop left by an exception stops the work it
    started. A CLI command's work ends with its driver anyway; a library call (a notebook's ``run_pipeline``
    stopped by Ctrl-C) would otherwise leave it running, and the same call made again would run beside it on the
    same run root. Ray's cancel raises KeyboardInterrupt in a running task; a phase's launcher, blocked in Train's
    ``fit()``, takes it as Train's own Ctrl-C: Train aborts the run, removes its placement group and ends the
    launcher's worker (the raylet then prints that a worker died while executing a task). A task that a cancel
    does not reach (:data:`CANCEL_ROUNDS`) has its worker killed. After a CLI command's Ctrl-C
    (:func:`install_interrupt_handler`) nothing is cancelled: the command's driver is ending, and Ray ends its work
    with it, without those messages."""
    left = list(refs)
    if not left or _INTERRUPTED.is_set():
        return
    log.info("stopping %d task(s) still running", len(left))
    try:
        for _ in range(CANCEL_ROUNDS):
            for ref in left:
                ray.cancel(ref)
            _, left = ray.wait(left, num_returns=len(left), timeout=2)
            if not left:
                return
        log.warning("%d task(s) did not stop when cancelled %d times: killing their workers", len(left),
                    CANCEL_ROUNDS)
        for ref in left:
            ray.cancel(ref, force=True)
        _, left = ray.wait(left, num_returns=len(left), timeout=10)
    except Exception as e:  # noqa: BLE001 - Ray itself is going (its driver shuts down): nothing left to stop
        log.warning("could not stop %d task(s) (%s); Ray ends them with this driver", len(left), e)
        return
    if left:
        log.warning("%d task(s) did not stop; Ray ends them with this driver (in a notebook: restart its Ray)",
                    len(left))


def restarted(actor):
    """An ObjectRef that is ready once a dead restartable actor is up again (its ``ready()`` method, which must
    return at once). While Ray restarts it, a call to it fails at once (ActorUnavailableError, "The actor is
    restarting"), so handing it work straight away spins: one failure a second for as long as the restart takes
    (minutes on a loaded node; for ever when its node is gone and no other node has room for it)."""
    return actor.ready.options(max_task_retries=-1).remote()


class ActorQueue:
    """Items of work handed to a fixed set of restartable actors (``max_restarts=-1``, a ``ready()`` method), one
    item at a time to each free actor: ``call(actor, item)`` submits it and returns its ObjectRef. :meth:`run`
    yields (item, value) as each finishes. An item whose actor died (RayActorError: killed, out of memory, its
    node gone) is redone first, by the next free actor: another one, or that one once Ray has restarted it. Nothing
    waits for a restart: a node lost from a cluster that does not replace it leaves its actors pending (no room
    for them elsewhere), and the surviving actors do the rest. ``restarts`` counts the deaths. Any other error
    raises (the actors stay up: the caller ends them)."""

    def __init__(self, actors: list, call: Callable[[Any, Any], Any], poll: Poll | None = None,
                 label: Callable[[Any], str] = str):
        self.actors, self.call, self.poll, self.label = list(actors), call, poll, label
        self.restarts = 0

    def run(self, items) -> Iterator[tuple[Any, Any]]:
        from ray.exceptions import RayActorError

        queue, free = collections.deque(items), list(self.actors)
        working: dict = {}  # ref of a call -> (actor, item)
        restarting: dict = {}  # ref of a restarted actor's ready() -> actor
        while queue or working:
            if not (free or working or restarting):
                raise RuntimeError(f"every actor of this queue has ended for good; {len(queue)} item(s) not done "
                                   f"({', '.join(self.label(i) for i in list(queue)[:3])} ...)")
            while queue and free:
                actor, item = free.pop(), queue.popleft()
                working[self.call(actor, item)] = (actor, item)
            ready, _ = ray.wait([*working, *restarting], num_returns=1, timeout=0.5)
            if self.poll is not None:
                self.poll()
            for ref in ready:
                if ref in restarting:
                    actor = restarting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError:  # ended for good (ray.kill): not restarted any more
                        continue
                    free.append(actor)
                    continue
                actor, item = working.pop(ref)
                try:
                    value = ray.get(ref)
                except RayActorError as e:
                    self.restarts += 1
                    log.warning("%s: its actor died (%s); it is redone by the next free actor (that one once Ray has "
                                "restarted it, or another)", self.label(item), type(e).__name__)
                    restarting[restarted(actor)] = actor
                    queue.appendleft(item)
                    continue
                free.append(actor)
                yield item, value


def record_attempt(url: str, info: dict | None = None, **fields) -> dict:
    """Write one worker attempt's record to ``url`` and return it: where it ran (pid, node, GPU ids, the CPUs Ray
    gave it), when it started, plus ``fields``; pass a returned record as ``info`` to update it (e.g. its end)."""
    if info is None:
        context = ray.get_runtime_context()
        in_worker = context.worker.mode == ray.WORKER_MODE  # a driver has no resources of its own
        info = {"pid": os.getpid(), "node_id": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cpus": context.get_assigned_resources().get("CPU") if in_worker else None, "start": time.time()}
    info = {**info, **fields}
    storage.write_json(url, info)
    return info


# --------------------------------------------------------------------------- GPUs from the config, not the moment

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where `ray up` puts the autoscaler config on the head (cluster/gpu.yaml's head starts Ray with it); a
`ptmst-ray launch` job's driver runs on the head, so it reads the GPU node types there."""
AUTOSCALER_CONFIG_ENV = "PTMST_AUTOSCALER_CONFIG"
"""Environment variable naming the autoscaler config the head was started with (``ray start
--autoscaling-config=PATH``) when it is not :data:`BOOTSTRAP_CONFIG` (a hand-started head, a test's
fake autoscaling cluster)."""
_STARTED_LOCAL = [False]
"""True once :func:`connect` started a local Ray in this process: it has no autoscaler to ask."""
_ANNOUNCED: set[str] = set()
"""Accelerator decisions (gpu, cpu) already logged by this process: each is said once."""
_REQUESTED = [0]
"""Bundles of this process's resource request standing with the autoscaler (0: none; see :func:`release_gpus`)."""


def node_types_gpus(autoscaler_config: dict) -> float:
    """GPUs an autoscaler config lets the cluster add: each worker node type's ``resources.GPU`` x its
    ``max_workers`` (capped by the cluster's ``max_workers``); node types without declared resources
    count 0 (Ray may detect them at launch, but they cannot be read ahead)."""
    cap = autoscaler_config.get("max_workers")
    total = 0.0
    for name, node_type in (autoscaler_config.get("available_node_types") or {}).items():
        if name == autoscaler_config.get("head_node_type") or not isinstance(node_type, dict):
            continue  # the head is up already: its GPUs are in the cluster's resources
        gpus = float((node_type.get("resources") or {}).get("GPU", 0))
        count = node_type.get("max_workers", cap if cap is not None else 0)
        total += gpus * (min(count, cap) if cap is not None else count)
    return total


def autoscaler_gpus() -> tuple[float | None, str]:
    """(GPUs the autoscaler can add, where that was read), or (None, why it could not be read).

    Read from Ray's own cluster config in the GCS (``ray._private.state``: what Ray Train reads; set where
    the autoscaler reports it, e.g. KubeRay), else from the autoscaler config file on this machine:
    ``$PTMST_AUTOSCALER_CONFIG``, else `ray up`'s :data:`BOOTSTRAP_CONFIG`. A local Ray this process
    started has no autoscaler.
    """
    if _STARTED_LOCAL[0]:
        return None, "a local Ray started by this command (no autoscaler)"
    try:
        from ray._private.state import state

        reported = state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - an older GCS, a Ray client connection: try the file
        log.debug("no cluster config in the GCS (%s)", e)
        reported = None
    if reported:
        return float(min(reported.get("GPU", 0), 1e6)), "the cluster config in Ray's GCS"
    path = os.path.expanduser(os.environ.get(AUTOSCALER_CONFIG_ENV) or BOOTSTRAP_CONFIG)
    if not os.path.isfile(path):
        return None, (f"no autoscaler config found (none in Ray's GCS, no {path} here; set "
                      f"{AUTOSCALER_CONFIG_ENV} to the file the head was started with)")
    try:
        import yaml  # JSON is YAML: Ray's fake cluster writes JSON

        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        return node_types_gpus(raw), path
    except Exception as e:  # noqa: BLE001 - a broken file must not stop the run: say so, decide without it
        return None, f"{path} could not be read ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class AcceleratorPlan:
    """Where the heavy stages go, and the sentence that says why (logged once, kept in results.json)."""

    use_gpus: bool
    reason: str


def plan_accelerator(setting: str, info: ClusterInfo, autoscaler: tuple[float | None, str]) -> AcceleratorPlan:
    """``run.accelerator`` against the cluster: ``gpu``/``cpu`` as given; ``auto`` = GPUs when the cluster
    has them now or its autoscaler (``autoscaler``: :func:`autoscaler_gpus`) can add them, else CPUs."""
    can_add, source = autoscaler
    now = f"{info.gpus:.0f} GPU(s) now"
    later = (f"the autoscaler can add {can_add:.0f} GPU(s) ({source})" if can_add is not None
             else source)
    if setting == "cpu":
        return AcceleratorPlan(False, f"run.accelerator=cpu: heavy stages on CPUs ({now})")
    if setting == "gpu":
        if not info.has_gpus and not can_add:
            if _STARTED_LOCAL[0]:
                from ptmst_ray.config import ConfigError

                raise ConfigError("run.accelerator", "gpu, but this command's local Ray has no GPUs and no "
                                  "autoscaler; use auto or cpu, or join a GPU cluster with --address")
            return AcceleratorPlan(True, f"run.accelerator=gpu: heavy stages ask for GPUs ({now}; {later}); "
                                   "they wait until GPU nodes join")
        return AcceleratorPlan(True, f"run.accelerator=gpu: heavy stages ask for GPUs ({now}; {later})")
    if info.has_gpus:
        return AcceleratorPlan(True, f"run.accelerator=auto: GPUs ({now})")
    if can_add:
        return AcceleratorPlan(True, f"run.accelerator=auto: GPUs ({now}, {later}); the autoscaler is asked "
                               "for GPU nodes before each stage")
    return AcceleratorPlan(False, f"run.accelerator=auto: CPUs ({now}; {later}); set run.accelerator=gpu to "
                           "ask for GPUs anyway")


def resolve_accelerator(cfg):
    """The config with ``run.accelerator`` decided (``gpu`` or ``cpu``) for this run; the decision is logged
    the first time this process makes it.

    Called by the driver's entry points before any stage, so every task, actor and Train run of the run
    (they receive the resolved config) asks for the same thing, whatever the cluster holds at the moment.
    """
    plan = plan_accelerator(cfg.run.accelerator, cluster_info(), autoscaler_gpus())
    resolved = "gpu" if plan.use_gpus else "cpu"
    if resolved not in _ANNOUNCED:
        _ANNOUNCED.add(resolved)
        log.info("accelerator: %s", plan.reason)
    return cfg.replace(**{"run.accelerator": resolved})


def uses_gpus(cfg) -> bool:
    """Whether the heavy work of ``cfg`` asks Ray for GPUs: ``run.accelerator`` once resolved
    (:func:`resolve_accelerator`); an unresolved ``auto`` (a library call) follows the GPUs there now."""
    if cfg.run.accelerator == "auto":
        return cluster_info().has_gpus
    return cfg.run.accelerator == "gpu"


def request_gpus(cfg, jobs: int, gpus_per_job: float, what: str, keep_larger: bool = False) -> int:
    """Tell the autoscaler what a stage is about to ask for: ``jobs`` bundles of {1 CPU, ``gpus_per_job``
    GPU} (at most what the cluster can hold), so GPU nodes start before the work waits on them
    (``ray.autoscaler.sdk.request_resources``; the request replaces the last one and stands until the next
    or :func:`release_gpus`). ``keep_larger``: a short stage ahead of a bigger one leaves a larger standing
    request as it is. Nothing on CPUs or on a local Ray. Returns the bundles requested."""
    if not uses_gpus(cfg) or jobs <= 0 or gpus_per_job <= 0 or _STARTED_LOCAL[0]:
        return 0
    n = min(jobs, cluster_info().slots(gpus_per_job, True))
    if keep_larger and _REQUESTED[0] >= n:
        return 0
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"CPU": 1, "GPU": gpus_per_job} for _ in range(n)])
    except Exception as e:  # noqa: BLE001 - the work still asks for GPUs; Ray's autoscaler sees it waiting
        log.warning("%s: could not ask the autoscaler for %d GPU bundle(s) (%s); the work waits for GPU nodes "
                    "the autoscaler adds on its own", what, n, e)
        return 0
    _REQUESTED[0] = n
    log.info("%s: asked the autoscaler for %d bundle(s) of 1 CPU + %g GPU", what, n, gpus_per_job)
    return n


def release_gpus() -> None:
    """Withdraw this process's standing resource request, so idle GPU nodes can be removed after the run."""
    if not _REQUESTED[0]:
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
        _REQUESTED[0] = 0
    except Exception as e:  # noqa: BLE001 - the nodes then stay until the request is replaced
        log.warning("could not withdraw the autoscaler request (%s); GPU nodes stay until the next run", e)


# --------------------------------------------------------------------------- where a run goes


def is_cluster_address(address: str | None) -> bool:
    """A Ray address on another machine (not loopback, not one of this machine's own addresses, not
    "local"/"auto"); None means a local Ray. A cluster whose head is this machine (a Ray Job's driver
    on the head) is checked by `ptmst-ray launch` instead, before `ray up`."""
    if not address or address in ("local", "auto"):
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host not in LOOPBACK_HOSTS and not _is_this_machine(host)


def _is_this_machine(host: str) -> bool:
    """``host`` resolves to one of the addresses this machine's own name resolves to (no traffic sent)."""
    import socket

    def addresses(name: str) -> set[str]:
        try:
            return {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            return set()

    own = addresses(socket.gethostname()) | addresses(socket.getfqdn())
    try:
        from ray.util import get_node_ip_address  # the address Ray gives this machine's node

        own.add(get_node_ip_address())
    except Exception:  # noqa: BLE001 - no route to look up: the names above are all there is
        pass
    return bool(addresses(host) & own)


def worker_threads(threads_per_worker: int) -> int:
    """torch threads of the Ray worker calling this: ``run.threads_per_worker`` when set, else 2 when it computes on
    a real GPU (threads that feed it), else its CPU share. A logical GPU without CUDA computes on the CPU, so it
    gets its CPU share too: 2 threads each for workers given 1 CPU would oversubscribe the node's cores
    (bench/RESULTS.md, "Test suite")."""
    if threads_per_worker:
        check_threads(threads_per_worker)
        return threads_per_worker
    resources = ray.get_runtime_context().get_assigned_resources()
    return 2 if _on_real_gpu(resources) else max(1, int(resources.get("CPU", 1)))


def _on_real_gpu(resources: dict) -> bool:
    """Whether a worker given ``resources`` computes on a GPU (one Ray gave it, with CUDA present)."""
    import torch

    return bool(resources.get("GPU")) and torch.cuda.is_available()


def check_threads(threads: int) -> str | None:
    """Warn (and return the warning) when the Ray worker calling this computes on its CPUs with more torch threads
    than the CPUs Ray gave it (``run.threads_per_worker``): beside the other workers on the same cores its threads
    wait on each other; two side-by-side phase workers of 2 threads on 2 cores ran the toy's phases 5-6x slower
    (bench/RESULTS.md "Scaling")."""
    if threads <= 1:  # one thread cannot oversubscribe
        return None
    resources = ray.get_runtime_context().get_assigned_resources()
    cpus = resources.get("CPU", 0)
    if threads <= max(1, cpus) or _on_real_gpu(resources):
        return None
    message = (f"run.threads_per_worker={threads} in a worker given {cpus:g} CPU(s) that computes on its CPUs: "
               "its torch threads share the cores with other workers' and wait on each other (several times "
               "slower); leave it at 0 (each worker's CPU share) unless the workers hold the cores to themselves")
    log.warning(message)
    return message


def student_threads(threads_per_worker: int) -> int:
    """torch threads of an evaluation student's task: :func:`worker_threads` when Ray gave it a GPU, else 1 (its
    one CPU)."""
    gpu = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return worker_threads(threads_per_worker) if gpu else 1
