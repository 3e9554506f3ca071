"""`ptmst-ray dashboard` and `ptmst-ray token`: how to get into the Ray dashboard of a run (thin: print)."""

from __future__ import annotations

import os
import sys

import typer

from ptmst_ray.cluster import jobs
from ptmst_ray_cli.common import console, fail


def login_hint() -> str:
    """One line: where the dashboard's token is and the command that prints it (or that there is none)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "token authentication is off (RAY_AUTH_MODE=disabled): the dashboard asks for no token"
    return (f"log in with the token in {jobs.auth_token_path()} (`ptmst-ray token` prints it; "
            "the dashboard asks once per browser)")


def dashboard_cmd() -> None:
    """Print the dashboards of the Ray clusters on this machine, the token file and how to log in.

    A cluster's dashboard (cluster/gpu.yaml) is reached through `ray dashboard CLUSTER_YAML`, which
    forwards it to http://127.0.0.1:8265 (`ptmst-ray launch` starts that forward itself).
    """
    from ptmst_ray.orchestration.runtime import local_dashboards

    urls = local_dashboards()
    if urls:
        for url in urls:
            console.print(f"dashboard: {url}", highlight=False)
    else:
        console.print("no Ray cluster is running on this machine (a `ptmst-ray run` prints its dashboard's address)")
    console.print(f"cluster: `ray dashboard cluster/gpu.yaml`, then {jobs.DEFAULT_ADDRESS}", highlight=False)
    console.print(login_hint(), highlight=False)


def token_cmd() -> None:
    """Print the Ray auth token (what the dashboard's login dialog asks for) on stdout."""
    token = jobs.read_auth_token()
    if not token:
        fail(f"{jobs.auth_token_path()}: no Ray auth token yet; a local `ptmst-ray run` creates it, "
             "or run `ray get-auth-token --generate`", code=1)
    typer.echo(token)


def register(app: typer.Typer) -> None:
    """Add dashboard and token to the `ptmst-ray` app."""
    app.command("dashboard")(dashboard_cmd)
    app.command("token")(token_cmd)


LOCAL_JOB = "PTMST_LOCAL_JOB"
"""Set in the environment of a job `--as-job` submits: its driver joins a cluster on this machine, whose
dashboard is the address it prints, not a cluster head's to port-forward."""


def run_as_job(cfg, args: list[str]) -> int:
    """`ptmst-ray run --as-job`: start a local Ray of its own (`ray start --head` on free loopback ports, so it
    works beside any other Ray on the machine), submit `ptmst-ray run ARGS` to it as a Ray Job, follow its log
    here until it ends, then stop that Ray. Ctrl-C stops the job first (finished work is kept). Returns the
    exit code."""
    from ptmst_ray.cluster.local import start_local_cluster
    from ptmst_ray.cluster.spec import LaunchError
    from ptmst_ray.orchestration.runtime import TRAIN_DRIVER

    console.print("starting a local Ray for the job (its own ports and temp dir; stopped when the job ends)",
                  highlight=False)
    try:  # the resources connect() gives a local start: what Ray detects, plus the Tune drivers' resource
        cluster = start_local_cluster(resources={TRAIN_DRIVER: 16},
                                      env={**os.environ, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"})
    except LaunchError as e:
        fail(str(e), code=1)
    keep_logs = True  # Ray's logs are what is left to read when the run fails
    try:
        status = submit_and_follow(cluster, cfg, args)
        keep_logs = status != "SUCCEEDED"
        return 0 if status == "SUCCEEDED" else 1
    except typer.Exit:  # Ctrl-C (the job is stopped, the user knows why)
        keep_logs = False
        raise
    except (LaunchError, RuntimeError) as e:
        fail(f"{cluster.dashboard_url}: the run could not be submitted to or followed on the local Ray as a Ray "
             f"Job: {e}", code=1)
        raise
    finally:
        stop_cluster(cluster, keep_logs=keep_logs)


def submit_and_follow(cluster, cfg, args: list[str]) -> str:
    """Submit `ptmst-ray run ARGS` to ``cluster`` as a Ray Job, print its log as it comes; its final status.
    Ctrl-C: the job is stopped, its last lines printed, and the command exits 130."""
    import shlex

    from ptmst_ray_cli.common import interrupted

    console.print(f"local Ray: {cluster.gcs_address}, logs in {cluster.temp_dir}", highlight=False)
    console.print(f"dashboard: {cluster.dashboard_url}; {login_hint()}", highlight=False)
    client = jobs.job_client(cluster.dashboard_url, token=cluster.token)
    if "://" not in cfg.run.root and not os.path.isabs(cfg.run.root):  # the job's driver runs in another folder
        args = [*args, "--set", f"run.root={os.path.abspath(cfg.run.root)}"]
    entrypoint = shlex.join([sys.executable, "-m", "ptmst_ray_cli", "run", *args])
    env = {"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160",
                        LOCAL_JOB: "1"}}
    job_id = submit_when_ready(client, entrypoint, env)
    console.print(f"job {job_id}: its log is on the dashboard's Jobs page, {cluster.dashboard_url}/#/jobs/{job_id}",
                  highlight=False)
    try:
        status = jobs.follow_logs(client, job_id, lambda text: typer.echo(text, nl=False))
    except KeyboardInterrupt:
        jobs.stop_job(client, job_id)
        jobs.follow_logs(client, job_id, lambda text: typer.echo(text, nl=False), timeout_s=60)
        interrupted()
    console.print(f"job {job_id}: {status}", highlight=False)
    return status


def submit_when_ready(client, entrypoint: str, runtime_env: dict, wait_s: float = 120.0) -> str:
    """Submit the job once (:func:`ptmst_ray.cluster.jobs.submit_once`), retrying for up to ``wait_s`` while the
    fresh cluster's job agent has not registered yet or a connection drops; the submission id."""
    return jobs.submit_once(client, entrypoint, runtime_env, retry_s=wait_s)


def stop_cluster(cluster, keep_logs: bool) -> None:
    """Stop the job's local Ray, Ctrl-C ignored meanwhile (a second one would leave its processes behind);
    its temp dir (Ray's logs of the run) is kept when the job did not succeed, and said where."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        console.print("stopping the job's local Ray", highlight=False)
        cluster.stop(keep_temp=keep_logs)
    finally:
        signal.signal(signal.SIGINT, previous)
    if keep_logs:
        console.print(f"Ray's logs of this run are kept in {cluster.temp_dir}", highlight=False)
