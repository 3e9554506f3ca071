"""Cluster commands of `ptmst-ray`: launch, status, logs, stop, down (thin: parse, call ptmst_ray.cluster, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from ptmst_ray.cluster import jobs, launch
from ptmst_ray.cluster.spec import LaunchError
from ptmst_ray_cli.common import ConfigOpt, SetOpt, bold, console, fail, get_config, refuse_held_root, say

JobAddressOpt = typer.Option(
    None, "--address", metavar="ADDRESS",
    help=f"Dashboard (Jobs API) address of a running cluster, e.g. {jobs.DEFAULT_ADDRESS} "
         f"(default: RAY_API_SERVER_ADDRESS, else {jobs.DEFAULT_ADDRESS}, where `ray dashboard CLUSTER_YAML` forwards).",
)


def _client(address: Optional[str]):
    try:
        return jobs.job_client(address)
    except LaunchError as e:
        fail(str(e))


def _echo_log(text: str) -> None:
    typer.echo(text, nl=False)


def launch_cmd(
    cluster_yaml: Optional[Path] = typer.Argument(None, metavar="CLUSTER_YAML", help="Cluster-launcher YAML, e.g. cluster/gpu.yaml (optional with --address)."),
    config: Optional[str] = ConfigOpt,
    sweep: bool = typer.Option(False, "--sweep", help="Submit `ptmst-ray sweep` instead of `ptmst-ray run`."),
    set_: Optional[list[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every step without doing it."),
    no_follow: bool = typer.Option(False, "--no-follow", help="Return after submitting; see `ptmst-ray logs JOB`."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDRESS", help=f"Skip `ray up`: submit to this running cluster's dashboard, e.g. {jobs.DEFAULT_ADDRESS}."),
) -> None:
    """Bring the cluster up (`ray up`), port-forward its dashboard, submit the pipeline as a Ray Job, follow it."""
    try:
        steps = launch.plan_launch(str(cluster_yaml) if cluster_yaml else None, config, sweep, list(set_ or []),
                                   address=address, follow=not no_follow)
    except LaunchError as e:
        fail(str(e))
    if dry_run:
        say("dry run", "bold", "nothing is executed; the steps would be:")
        for i, step in enumerate(steps, 1):
            typer.echo(f"{i}. {step.description}\n   $ {step.render()}")
        return
    if config is None or "://" not in str(config):  # a root another command holds: refused before `ray up`
        refuse_held_root(get_config(config, set_))
    try:
        ctx = launch.execute_plan(
            steps, address=address,
            on_step=lambda s: console.rule(bold(s.description)),
            on_log=_echo_log,
        )
    except LaunchError as e:
        fail(str(e))
    hint = f" --address {address}" if address else ""
    if ctx.job_id and ctx.status is None:
        console.print(Text.assemble("submitted job ", bold(ctx.job_id), f"; follow it with `ptmst-ray logs {ctx.job_id}{hint} --follow`"))
    if ctx.status is not None:
        console.print(f"job {ctx.job_id}: {ctx.status}")
        if ctx.status != "SUCCEEDED":
            raise typer.Exit(1)


def status_cmd(address: Optional[str] = JobAddressOpt) -> None:
    """Cluster resources (the `ray status` view) and the cluster's jobs."""
    client = _client(address)
    try:
        typer.echo(jobs.cluster_status(client))
        rows = jobs.list_jobs(client)
    except LaunchError as e:
        fail(str(e))
    from rich.table import Table

    table = Table("job", "status", "entrypoint", title="Jobs")
    for j in rows:
        table.add_row(j["submission_id"] or "-", j["status"], j["entrypoint"])
    console.print(table)


def logs_cmd(job: str = typer.Argument(..., metavar="JOB", help="Job (submission) id."), address: Optional[str] = JobAddressOpt,
             follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends.")) -> None:
    """Print a job's logs."""
    client = _client(address)
    try:
        if follow:
            status = jobs.follow_logs(client, job, _echo_log)
            console.print(f"job {job}: {status}")
        else:
            typer.echo(client.get_job_logs(job), nl=False)
    except LaunchError as e:
        fail(str(e))
    except RuntimeError as e:  # the SDK's "job does not exist" and HTTP errors
        fail(f"job {job}: {e}")


def stop_cmd(job: str = typer.Argument(..., metavar="JOB", help="Job (submission) id."), address: Optional[str] = JobAddressOpt) -> None:
    """Stop a running job."""
    client = _client(address)
    try:
        stopped = jobs.stop_job(client, job)
    except RuntimeError as e:
        fail(f"job {job}: {e}")
    console.print(f"job {job}: {'stop requested' if stopped else 'already finished'}")


def down_cmd(cluster_yaml: Path = typer.Argument(..., metavar="CLUSTER_YAML", help="Cluster-launcher YAML, e.g. cluster/gpu.yaml."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the step without doing it.")) -> None:
    """Tear the cluster down (`ray down -y`): every node is terminated."""
    try:
        steps = launch.plan_down(str(cluster_yaml))
    except LaunchError as e:
        fail(str(e))
    if dry_run:
        for i, step in enumerate(steps, 1):
            typer.echo(f"{i}. {step.description}\n   $ {step.render()}")
        return
    try:
        launch.execute_plan(steps, on_step=lambda s: console.rule(bold(s.description)))
    except LaunchError as e:
        fail(str(e))


def register(app: typer.Typer) -> None:
    """Add launch, status, logs, stop and down to the `ptmst-ray` app."""
    app.command("launch")(launch_cmd)
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
    app.command("stop")(stop_cmd)
    app.command("down")(down_cmd)
