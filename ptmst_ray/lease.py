"""One command at a time on a run root: a lease file that names its holder.

Why this file exists: two drivers on the same run root (``make demo`` in two terminals, an ``eval`` started while
the ``run`` on that root is still going, a second ``launch`` of the same recipe) would train the same experts
twice, race on the same files and let one driver's ``--rebuild`` delete what the other is writing. Every CLI
command that writes under a run root first takes its lease: ``<root>/run.lock.json`` records the command, host,
process id and a heartbeat that a thread renews every :data:`HEARTBEAT_S` seconds. Another command finds the
file and refuses, naming the holder, unless the holder is gone: a process of this host that no longer exists,
or a heartbeat older than :data:`STALE_S` (a driver on another machine that was killed). The file works the same
on a local disk and on an object store (fsspec): it is advisory, not a mutual exclusion of the storage system;
two commands started within the same second on an object store can both pass (a local disk creates the file
exclusively).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ptmst_ray import storage

log = logging.getLogger(__name__)

LEASE_FILE = "run.lock.json"
HEARTBEAT_S = 15.0
"""How often the holder rewrites its heartbeat."""
STALE_S = 120.0
"""A lease whose heartbeat is older than this is free (its holder was killed or lost its machine)."""


class RootInUse(RuntimeError):
    """The run root's lease is held by another live command; the message names it and what to do."""


def lease_url(root: str) -> str:
    return storage.join(root, LEASE_FILE)


def _read(url: str) -> dict[str, Any] | None:
    """The lease at ``url``; None if there is none, ``{}`` if the file is damaged (it names no holder)."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)  # another process wrote it: an object store's cached listing would not know
    try:
        text = storage.read_whole(fs, path, url)  # its holder rewrites it at each heartbeat
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not isinstance(holder, dict):
        log.warning("%s: not a lease (unreadable JSON); it names no holder", url)
        return {}
    return holder


def holder_gone(holder: dict[str, Any]) -> str | None:
    """Why ``holder``'s lease is free (its process ended, its heartbeat is old), or None while it holds it."""
    age = _age(holder)
    if holder.get("host") == socket.gethostname() and not storage.process_alive(holder.get("pid")):
        return f"process {holder.get('pid')} on this host has ended"
    if age > STALE_S:
        return f"its last heartbeat was {age:.0f} s ago (more than {STALE_S:.0f} s)"
    return None


def _age(holder: dict[str, Any]) -> float:
    """Seconds since ``holder``'s last heartbeat (a lease without a readable one is as old as can be)."""
    try:
        beat = float(holder.get("heartbeat", 0))
    except (TypeError, ValueError):
        beat = 0.0
    return time.time() - beat


def describe(holder: dict[str, Any]) -> str:
    age = _age(holder)
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}, last heartbeat {max(age, 0):.0f} s ago)")


def refusal(root: str, holder: dict[str, Any]) -> RootInUse:
    """The error for a command refused on ``root``: who holds it and what to do."""
    return RootInUse(
        f"run root {root} is in use by {describe(holder)}. Wait for it to end (or stop it), or use another run "
        f"root (--set run.root=...). If that command is no longer running, delete {lease_url(root)}")


def live_holder(root: str) -> dict[str, Any] | None:
    """The command that holds ``root``'s lease now, or None (no lease, or its holder is gone)."""
    holder = _read(lease_url(root))
    return holder if holder and holder_gone(holder) is None else None


class RootLease:
    """The lease of one run root, held from :meth:`acquire` to :meth:`release` (or ``with``)."""

    def __init__(self, root: str, command: str, heartbeat_s: float = HEARTBEAT_S):
        self.root, self.url, self.heartbeat_s = root, lease_url(root), heartbeat_s
        self.record = {"command": command, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                       "heartbeat": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mine(self, holder: dict[str, Any] | None) -> bool:
        return holder is not None and holder.get("token") == self.record["token"]

    def _write(self, exclusive: bool) -> None:
        self.record["heartbeat"] = time.time()
        data = json.dumps(self.record, indent=2).encode()  # not through storage's writers: a lease is not an
        # artefact, and a stage that wrote no artefact while the heartbeat ran did no work (storage.writes)
        local = storage.local_path(self.url)
        if exclusive and local is not None:  # a local disk: create it only if no one else just did
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
                f.write(data)
        elif local is not None:  # a temporary sibling, then a rename: a reader never sees half a lease
            tmp = f"{local}{storage.TMP_MARK}{uuid.uuid4().hex[:12]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
        else:  # one PUT: an object appears whole
            fs, path = storage.filesystem(self.url)
            fs.pipe_file(path, data)

    def acquire(self) -> "RootLease":
        """Take the lease, or raise :class:`RootInUse` naming the live holder. A lease whose holder is gone is
        taken over with a warning."""
        holder = _read(self.url)
        if holder and holder.get("host") == self.record["host"] and holder.get("pid") == os.getpid():
            holder = {}  # this process's own (a command run in-process after another): no one else's work
        if holder:
            gone = holder_gone(holder)
            if gone is None:
                raise refusal(self.root, holder)
            log.warning("%s: taking over the lease of %s: %s", self.url, describe(holder), gone)
        try:
            self._write(exclusive=holder is None)
        except FileExistsError:  # another command created it between the read and the write
            raise refusal(self.root, _read(self.url) or {}) from None
        back = _read(self.url)  # on an object store the last writer wins: the one that reads itself back holds it
        if not self._mine(back):
            raise refusal(self.root, back or {})
        self._thread = threading.Thread(target=self._beat, name="ptmst-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = _read(self.url)
                if not self._mine(holder):
                    log.error("%s: the run root's lease is now held by %s; this command's writes may collide "
                              "with it", self.url, describe(holder) if holder else "no one (the file was deleted)")
                    return
                self._write(exclusive=False)
            except (OSError, storage.StorageError) as e:  # a storage hiccup: the next beat tries again
                log.warning("%s: could not renew the lease (%s)", self.url, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this command's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 30)
        try:
            holder = _read(self.url)
            if self._mine(holder):
                storage.remove(self.url)
            elif holder is not None:
                log.warning("%s: left in place: the lease is now held by %s", self.url, describe(holder))
        except (OSError, storage.StorageError) as e:
            log.warning("%s: could not remove the lease (%s); the next command will take it over", self.url, e)

    def __enter__(self) -> "RootLease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
