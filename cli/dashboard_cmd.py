"""`ptmst-ray dashboard` and `ptmst-ray token`: how to get into the Ray dashboard of a run (thin: print)."""

from __future__ import annotations

import typer

from ptmst_ray.cluster import jobs
from ptmst_ray_cli.common import console, fail


def login_hint() -> str:
    """One line: where the dashboard's token is and the command that prints it."""
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


def _agent_port_holder() -> str | None:
    """``ip:port`` when something on this machine already listens on the port a new local Ray's job agent
    takes (Ray's DEFAULT_DASHBOARD_AGENT_LISTEN_PORT, on the node's IP); None when it is free. Found by
    connecting, never by binding."""
    import socket

    import ray
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT as port

    ip = ray.util.get_node_ip_address()
    try:
        with socket.create_connection((ip, port), timeout=1.0):
            return f"{ip}:{port}"
    except OSError:
        return None


def run_as_job(cfg, args: list[str]) -> int:
    """`ptmst-ray run --as-job`: start a local Ray, submit `ptmst-ray run ARGS` to it as a Ray Job, follow its
    log here until it ends; Ctrl-C stops the job (finished work is kept). Returns the exit code."""
    import os
    import shlex
    import sys
    import time

    from ptmst_ray_cli.common import connect_ray, interrupted

    holder = _agent_port_holder()
    if holder is not None:
        fail(f"another Ray on this machine already serves its job agent on {holder}, and a second local Ray "
             "cannot serve Ray Jobs beside it (Ray 2.60 fixes that port); stop the other one (`ray stop`), or run "
             "without --as-job", code=2)
    info = connect_ray(cfg, None)
    client = jobs.job_client(info.dashboard_url)
    if "://" not in cfg.run.root and not os.path.isabs(cfg.run.root):  # the job's driver runs in another folder
        args = [*args, "--set", f"run.root={os.path.abspath(cfg.run.root)}"]
    entrypoint = shlex.join([sys.executable, "-m", "ptmst_ray_cli", "run", *args])
    env = {"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}}
    for attempt in range(60):  # a fresh Ray's job agent registers some seconds after ray.init returns
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 59:
                raise
            time.sleep(2)
    console.print(f"job {job_id}: its log is on the dashboard's Jobs page, {info.dashboard_url}/#/jobs/{job_id}",
                  highlight=False)
    try:
        status = jobs.follow_logs(client, job_id, lambda text: typer.echo(text, nl=False))
    except KeyboardInterrupt:
        jobs.stop_job(client, job_id)
        jobs.follow_logs(client, job_id, lambda text: typer.echo(text, nl=False), timeout_s=60)
        interrupted()
    console.print(f"job {job_id}: {status}", highlight=False)
    return 0 if status == "SUCCEEDED" else 1
