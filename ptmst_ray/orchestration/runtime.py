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
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import ray

from ptmst_ray import storage
from ptmst_ray.vocab import DASHBOARD_PORT

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

    @property
    def has_gpus(self) -> bool:
        return self.gpus >= 1

    def parallel_slots(self, gpus_per_job: float = 1.0) -> int:
        """How many one-accelerator jobs can run at once (CPUs when there are no GPUs)."""
        if self.has_gpus:
            return max(1, int(self.gpus // max(gpus_per_job, 1e-6)))
        return max(1, int(self.cpus))


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            train_drivers: int = 16) -> ClusterInfo:
    """Start or join Ray. A local start binds the dashboard to loopback only."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        else:
            log.info("starting a local Ray instance (dashboard on http://%s:%d)", LOOPBACK, DASHBOARD_PORT)
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, namespace=NAMESPACE, include_dashboard=True,
                     dashboard_host=LOOPBACK, resources={TRAIN_DRIVER: train_drivers}, log_to_driver=False,
                     configure_logging=True, logging_level=logging.WARNING)
    return cluster_info()


def cluster_info() -> ClusterInfo:
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)), nodes=nodes)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Named actor: tasks report (done, total, info); the CLI polls :meth:`snapshot`."""

    def __init__(self):
        self.tasks: dict[str, dict] = {}

    def update(self, name: str, done: float, total: float, info: str = "") -> None:
        self.tasks[name] = {"done": done, "total": total, "info": info, "time": time.time()}

    def snapshot(self) -> dict[str, dict]:
        return dict(self.tasks)

    def clear(self) -> None:
        self.tasks.clear()


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


Poll = Callable[[], None]


def make_poll(board, ui: UI) -> Poll:
    """A poll for the driver's wait loops: Ctrl-C check, and the board's state to ``ui`` twice a second."""
    last = [0.0]

    def poll() -> None:
        check_interrupted()
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            try:
                ui.update(ray.get(board.snapshot.remote(), timeout=5))
            except Exception as e:  # noqa: BLE001 - the display must not fail the run
                log.debug("progress poll failed: %s", e)

    return poll


def wait_all(refs: list, poll: Poll | None = None) -> list:
    """``ray.get(refs)``, polling every half second while they run."""
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if poll is not None:
            poll()
    return ray.get(refs)


def as_completed(queue: collections.deque, submit: Callable[[Any], Any], slots: int,
                 poll: Poll | None = None) -> Iterator[tuple[Any, Any]]:
    """Submit the items of ``queue`` with at most ``slots`` in flight; yield (item, ref) as each finishes.

    The caller ``ray.get``s the ref and may put an item back into ``queue`` (a retry) while iterating.
    """
    pending: dict = {}
    while queue or pending:
        while queue and len(pending) < slots:
            item = queue.popleft()
            pending[submit(item)] = item
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        if poll is not None:
            poll()
        for ref in ready:
            yield pending.pop(ref), ref


def record_attempt(url: str, info: dict | None = None, **fields) -> dict:
    """Write one worker attempt's record to ``url`` and return it: where it ran (pid, node, GPU ids),
    when it started, plus ``fields``; pass a returned record as ``info`` to update it (e.g. its end)."""
    info = {**(info or {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                        "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "start": time.time()}), **fields}
    storage.write_json(url, info)
    return info
