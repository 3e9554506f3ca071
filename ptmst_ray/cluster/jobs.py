"""The Ray Jobs API client behind `ptmst-ray launch / status / logs / stop`.

Token auth (Ray 2.60, checked on a local head started with RAY_AUTH_MODE=token): a client
without the token gets HTTP 401, a wrong token 403. The Jobs SDK only attaches the token by
itself when the *client* process has RAY_AUTH_MODE=token, so :func:`job_client` sends
``Authorization: Bearer <token>`` explicitly, the token taken from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (where `ray get-auth-token --generate` writes it).
No printing here: the CLI renders log lines.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from ptmst_ray.cluster.spec import LOOPBACK_HOSTS, LaunchError
from ptmst_ray.vocab import DASHBOARD_PORT

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The project folder a job uploads as its working_dir."""
DEFAULT_ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"
"""Where `ray dashboard CLUSTER_YAML` forwards the head's loopback-bound dashboard to."""
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "bench/out"]
"""Left out of the job's working_dir upload (Ray caps the package at a few hundred MB)."""
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


def normalize_address(address: Optional[str]) -> str:
    """Dashboard address for the Jobs API: http://host:port (default: the port-forward on loopback)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise LaunchError(f"--address {address}: give the dashboard address (e.g. {DEFAULT_ADDRESS}), not a ray:// one")
    return address if "://" in address else f"http://{address}"


def job_runtime_env(working_dir: str | os.PathLike = PROJECT_ROOT, extra: Optional[dict] = None) -> dict:
    """runtime_env of the job: the project as working_dir (minus .venv/.git/runs), plus ``extra`` merged in."""
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"},
    }
    for key, value in (extra or {}).items():
        if key == "env_vars":
            env["env_vars"] = {**env["env_vars"], **value}
        elif key == "excludes":
            env["excludes"] = env["excludes"] + list(value)
        else:
            env[key] = value
    return env


def read_auth_token() -> Optional[str]:
    """The Ray auth token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = auth_token_path()
    return path.read_text().strip() if path.is_file() else None


def ensure_auth_token() -> Path:
    """Create ~/.ray/auth_token if missing (what `ray get-auth-token --generate` does); return its path.

    gpu.yaml copies this file to every node, so the head, the workers and this client share it.
    """
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )

    path = _get_default_token_path()
    if not path.is_file():
        generate_and_save_token()
        log.info("generated a Ray auth token in %s", path)
    if path.stat().st_mode & 0o077:  # Ray writes it with the umask (often world-readable): owner only
        path.chmod(0o600)
    return path


def auth_token_path() -> Path:
    """Where the token the dashboard asks for is read from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def job_client(address: Optional[str] = None, token: Optional[str] = None):
    """A JobSubmissionClient for the dashboard at ``address``, sending the auth token when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    token = token or read_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    host = urlparse(address).hostname or ""
    if token and address.startswith("http://") and host not in LOOPBACK_HOSTS:
        log.warning("sending the Ray auth token in clear text to %s; prefer the port-forward on 127.0.0.1", address)
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do about it
        raise _client_error(address, e) from None


def _client_error(address: str, e: Exception) -> LaunchError:
    text = str(e)
    if "Authentication" in type(e).__name__ or "401" in text or "403" in text or "authentication" in text.lower():
        return LaunchError(
            f"{address}: the cluster wants its auth token (RAY_AUTH_MODE=token): put it in ~/.ray/auth_token, "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (on the head: `ray get-auth-token`); server said: "
            f"{text.splitlines()[0] if text else type(e).__name__}"
        )
    return LaunchError(
        f"{address}: cannot reach the Ray dashboard ({type(e).__name__}: {text.splitlines()[0] if text else ''}); "
        "is the cluster up and the port-forward running (`ray dashboard CLUSTER_YAML`)?"
    )


def submit_job(address: Optional[str], entrypoint: str, working_dir: str | os.PathLike = PROJECT_ROOT,
               runtime_env_extra: Optional[dict] = None, submission_id: Optional[str] = None,
               client=None, **resources: Any) -> str:
    """Submit ``entrypoint`` as a Ray Job; return its submission id. ``resources``: entrypoint_num_cpus etc."""
    client = client or job_client(address)
    runtime_env = job_runtime_env(working_dir, runtime_env_extra)
    try:
        job_id = submit_once(client, entrypoint, runtime_env, submission_id, **resources)
    except Exception as e:  # noqa: BLE001 - re-raised with the address and entrypoint
        raise LaunchError(f"{normalize_address(address)}: job submission of {entrypoint!r} failed: {e}") from None
    log.info("submitted job %s: %s", job_id, entrypoint)
    return job_id


TRANSIENT_RETRY_S = 60.0
"""How long a dropped connection to the dashboard is retried before a call gives up (a port-forward or a busy
head that drops a request recovers within seconds)."""


def _transient(e: Exception) -> bool:
    """A dropped or refused connection (requests' ConnectionError and Timeout, http.client's
    RemoteDisconnected, an OSError): the request may be retried; an HTTP error answer may not."""
    import http.client

    import requests

    return isinstance(e, (requests.ConnectionError, requests.Timeout, http.client.HTTPException, ConnectionError))


def retried(call: Callable[[], Any], what: str, retry_s: float = TRANSIENT_RETRY_S,
            also: Callable[[Exception], bool] = lambda e: False, pause_s: float = 2.0) -> Any:
    """``call()``, retried every ``pause_s`` while it fails with a transient connection error (or one ``also``
    accepts) for up to ``retry_s``; then the last error is raised."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - only transient errors are retried; the rest re-raised at once
            if not (_transient(e) or also(e)) or time.monotonic() >= deadline:
                raise
            log.warning("%s: %s: %s; retrying", what, type(e).__name__, e)
            time.sleep(pause_s)


def submit_once(client, entrypoint: str, runtime_env: dict, submission_id: Optional[str] = None,
                retry_s: float = TRANSIENT_RETRY_S, also: Callable[[Exception], bool] = lambda e: False,
                pause_s: float = 2.0, **resources: Any) -> str:
    """Submit a job exactly once, retrying a submission whose connection dropped or that a fresh cluster refused
    with "No available agent" (its job agent registers some seconds after the dashboard answers): the submission
    id is fixed before the first attempt, so when a dropped attempt had reached the server, the retry's "already
    exists" answer means the job is ours and running, not a second job. ``also``: further errors to retry."""
    import uuid

    submission_id = submission_id or f"raysubmit_{uuid.uuid4().hex[:16]}"
    attempts = [0]

    def submit() -> str:
        attempts[0] += 1
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                     **resources)
        except RuntimeError as e:
            if attempts[0] > 1 and f"{submission_id} already exists" in str(e):
                return submission_id  # an earlier attempt reached the server before its connection dropped
            raise

    def retry(e: Exception) -> bool:
        return (isinstance(e, RuntimeError) and "No available agent" in str(e)) or also(e)

    return retried(submit, f"submitting job {submission_id}", retry_s, retry, pause_s)


def job_status(client, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def follow_logs(client, job_id: str, on_log: Callable[[str], None], poll_s: float = 1.0,
                timeout_s: Optional[float] = None, retry_s: float = TRANSIENT_RETRY_S) -> str:
    """Pass new log text to ``on_log`` until the job ends; return its final status.

    Polls get_job_logs (plain HTTP, works through any proxy) rather than the websocket tail. A poll whose
    connection drops is retried for up to ``retry_s`` (the job runs on regardless); after that a
    :class:`LaunchError` says how to follow the job again.
    """
    seen = 0
    start = time.monotonic()
    while True:
        try:
            status = retried(lambda: job_status(client, job_id), f"job {job_id}: status", retry_s, pause_s=poll_s)
            logs = retried(lambda: client.get_job_logs(job_id), f"job {job_id}: logs", retry_s, pause_s=poll_s)
        except Exception as e:  # noqa: BLE001 - only transient errors reach here after their retries
            if not _transient(e):
                raise
            raise LaunchError(f"job {job_id}: the dashboard stopped answering for {retry_s:.0f} s ({type(e).__name__}: "
                              f"{e}); the job itself runs on: follow it again with "
                              f"`ptmst-ray logs {job_id} --follow`") from None
        if len(logs) > seen:
            on_log(logs[seen:])
            seen = len(logs)
        if status in TERMINAL_STATUSES:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise LaunchError(f"job {job_id}: still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def stop_job(client, job_id: str) -> bool:
    return bool(client.stop_job(job_id))


def list_jobs(client) -> list[dict]:
    """Jobs as plain dicts (submission_id, status, entrypoint, start_time, message), newest first."""
    rows = []
    for j in client.list_jobs():
        rows.append({"submission_id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
                     "start_time": j.start_time, "message": j.message})
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def cluster_status(client, retry_s: float = TRANSIENT_RETRY_S, pause_s: float = 2.0) -> str:
    """The `ray status` text (nodes, resources, demands) as the dashboard reports it; a dropped connection is
    retried for up to ``retry_s`` (a head that is still starting, or busy, drops some requests)."""
    r = retried(lambda: client._do_request("GET", "/api/cluster_status?format=1"),  # no public SDK call in 2.60
                "cluster status", retry_s, pause_s=pause_s)
    if r.status_code != 200:
        raise LaunchError(f"cluster status: HTTP {r.status_code}: {r.text[:200]}")
    data = r.json().get("data", {})
    return data.get("clusterStatus") or data.get("cluster_status") or json.dumps(data, indent=1)


