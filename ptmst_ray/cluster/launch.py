"""Bring a Ray cluster up with Ray's own cluster launcher and run the pipeline on it as a Ray Job.

Why this file exists: `ptmst-ray launch cluster/gpu.yaml` is a short, inspectable plan of steps
(`ray up`, port-forward, job submission, log following) that `--dry-run` shows without doing;
`ptmst-ray down` is the plan that tears the cluster down. No printing here: the CLI renders steps.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ptmst_ray.cluster.jobs import (
    DEFAULT_ADDRESS, PROJECT_ROOT, ensure_auth_token, follow_logs, job_client, job_runtime_env, normalize_address, submit_job,
)
from ptmst_ray.cluster.spec import LaunchError, validate_cluster_yaml
from ptmst_ray.vocab import DASHBOARD_PORT

log = logging.getLogger(__name__)

DEFAULT_CONFIG_REL = "configs/toy.yaml"
"""The recipe a launch runs without --config (relative to the project root, as the job sees it)."""
RAY = "ray"
"""Ray's command line (run from this interpreter's environment when it is there: see :func:`_resolve_argv`)."""


def is_project_clone(root: Path) -> bool:
    """Whether ``root`` is the project's folder (a clone, installed editable), not an installed wheel's parent."""
    return (root / "pyproject.toml").is_file() and (root / "ptmst_ray" / "__init__.py").is_file()


def job_config_path(config: Optional[str | os.PathLike], root: Path = PROJECT_ROOT) -> str:
    """The config path as the job sees it: relative to the uploaded project root, or a URL."""
    from ptmst_ray.config import find_config

    if config is None:
        return DEFAULT_CONFIG_REL
    text = find_config(config)  # a shipped recipe's name: its file under configs/
    if "://" in text:
        return text
    p = Path(text).expanduser().resolve()
    if not p.is_file():
        raise LaunchError(f"{config}: config file not found")
    try:
        return p.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise LaunchError(
            f"{config}: the config is outside the project ({root}), so the job would not receive it; "
            "put it under configs/ or give an fsspec URL (s3://...)"
        ) from None


def build_entrypoint(config: Optional[str | os.PathLike] = None, sweep: bool = False,
                     overrides: Optional[list[str]] = None, root: Path = PROJECT_ROOT) -> str:
    """`ptmst-ray run|sweep --config C --set k=v ...` as one shell-quoted string."""
    argv = ["ptmst-ray", "sweep" if sweep else "run", "--config", job_config_path(config, root)]
    for item in overrides or []:
        argv += ["--set", item]
    return shlex.join(argv)


@dataclass
class LaunchContext:
    """What the steps of one launch share while they run."""

    address: str
    on_log: Callable[[str], None] = lambda text: None
    job_id: Optional[str] = None
    status: Optional[str] = None
    procs: list = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """One step of a launch: a command (argv) or a library call; ``shown`` is how --dry-run prints it."""

    description: str
    argv: Optional[tuple[str, ...]] = None
    call: Optional[Callable[[LaunchContext], Any]] = None
    shown: Optional[str] = None
    cwd: Optional[str] = None
    background: bool = False
    """Keep running while later steps run (the dashboard port-forward); ended after the last step."""

    def render(self) -> str:
        if self.shown:
            return self.shown
        return shlex.join(self.argv) if self.argv else self.description


def _resolve_argv(argv: tuple[str, ...]) -> list[str]:
    """Run `ray` from this interpreter's environment (its version matches the client) when it is there."""
    sibling = Path(sys.executable).parent / argv[0]
    return [str(sibling), *argv[1:]] if argv[0] == "ray" and sibling.is_file() else list(argv)


def plan_launch(cluster_yaml: Optional[str | os.PathLike], config_path: Optional[str | os.PathLike] = None,
                sweep: bool = False, overrides: Optional[list[str]] = None, address: Optional[str] = None,
                follow: bool = True, entrypoint: Optional[str] = None, runtime_env_extra: Optional[dict] = None,
                root: Path = PROJECT_ROOT) -> list[Step]:
    """The steps of a launch. With ``address``, skip `ray up` and submit to that (existing) cluster."""
    if root == PROJECT_ROOT and not is_project_clone(root):
        raise LaunchError(f"a launch uploads the project's clone as the job's working_dir, and this installation of "
                          f"ptmst-ray ({Path(__file__).resolve().parents[1]}) is not in one: clone the repository and "
                          f"install it with `pip install -e .`, then launch from there")
    if cluster_yaml is not None:
        validate_cluster_yaml(cluster_yaml)
    if cluster_yaml is None and address is None:
        raise LaunchError("give a cluster YAML (e.g. cluster/gpu.yaml) or --address of a running cluster's dashboard")
    if entrypoint is None:
        entrypoint = build_entrypoint(config_path, sweep, overrides, root)  # the config reaches the job
        _check_pipeline_config(config_path, overrides, cluster_mode=address is None)
    runtime_env = job_runtime_env(root, runtime_env_extra)
    steps: list[Step] = []
    target = normalize_address(address) if address else DEFAULT_ADDRESS
    if address is None:
        yaml_arg = str(Path(cluster_yaml).expanduser().resolve())  # the steps run in the project folder
        steps.append(Step("ensure the Ray auth token ~/.ray/auth_token exists (copied to every node by file_mounts)",
                          call=lambda ctx: ensure_auth_token(), shown="ray get-auth-token --generate  # if missing"))
        steps.append(Step(f"bring the cluster up (or update it) from {yaml_arg}",
                          argv=(RAY, "up", "-y", yaml_arg), cwd=str(root)))
        steps.append(Step(f"port-forward the head's loopback dashboard to {DEFAULT_ADDRESS} "
                          f"(dashboard hint: run `ray dashboard {yaml_arg}` to reopen it later)",
                          argv=(RAY, "dashboard", yaml_arg, "--port", str(DASHBOARD_PORT)),
                          cwd=str(root), background=True))
        steps.append(Step(f"wait for the Jobs API at {target}", call=lambda ctx: wait_for_dashboard(ctx.address),
                          shown=f"(poll {target} until the port-forward answers, up to 2 min)"))
    shown_submit = shlex.join(["ray", "job", "submit", "--address", target,
                               "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *shlex.split(entrypoint)])
    steps.append(Step(f"submit the job to {target}: {entrypoint}",
                      call=lambda ctx: _submit_step(ctx, entrypoint, root, runtime_env_extra), shown=shown_submit))
    if follow:
        steps.append(Step("follow the job's logs until it ends", call=_follow_step,
                          shown=f"ray job logs --address {target} --follow <job id>"))
    return steps


def _check_pipeline_config(config_path, overrides, cluster_mode: bool) -> None:
    """Reject a bad recipe here, before a cluster is paid for: a bad value, or (``cluster_mode``, a new
    cluster) an input or run root that only this machine can read."""
    from ptmst_ray import storage
    from ptmst_ray.config import DEFAULT_CONFIG, ConfigError, load_config
    from ptmst_ray.stages.preflight import check_inputs_shared

    if config_path is not None and "://" in str(config_path):
        try:  # a URL the job reads on the cluster: checked here too where this machine can read it
            storage.read_text(str(config_path))
        except storage.StorageError as e:
            log.warning("%s: not checked before the launch, this machine cannot read it (%s); the job reads it on "
                        "the cluster", config_path, e)
            return
    source = str(config_path or DEFAULT_CONFIG)
    try:
        cfg = load_config(config_path or DEFAULT_CONFIG, overrides or [])
        if cluster_mode:
            check_inputs_shared(cfg)
    except ConfigError as e:
        raise LaunchError(str(e) if str(e).startswith((source, "--set")) else f"{source}: {e}") from None


def _submit_step(ctx: LaunchContext, entrypoint: str, root: Path, runtime_env_extra: Optional[dict]) -> str:
    ctx.job_id = submit_job(ctx.address, entrypoint, root, runtime_env_extra)
    return ctx.job_id


def _follow_step(ctx: LaunchContext) -> str:
    ctx.status = follow_logs(job_client(ctx.address), ctx.job_id, ctx.on_log)
    return ctx.status


def wait_for_dashboard(address: str, timeout_s: float = 120.0, poll_s: float = 2.0) -> None:
    """Retry until the Jobs API answers (the port-forward takes a few seconds to open)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job_client(address)
            return
        except LaunchError as e:
            if "auth token" in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(poll_s)


def execute_plan(steps: list[Step], address: Optional[str] = None, on_step: Callable[[Step], None] = lambda s: None,
                 on_log: Callable[[str], None] = lambda t: None) -> LaunchContext:
    """Run the steps in order; background commands are ended (by their own handle) after the last step."""
    ctx = LaunchContext(address=normalize_address(address), on_log=on_log)
    try:
        for step in steps:
            on_step(step)
            if step.call is not None:
                step.call(ctx)
            elif step.background:
                ctx.procs.append(subprocess.Popen(_resolve_argv(step.argv), cwd=step.cwd, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, start_new_session=True))
            else:
                done = subprocess.run(_resolve_argv(step.argv), cwd=step.cwd)
                if done.returncode != 0:
                    raise LaunchError(f"`{step.render()}` failed with exit code {done.returncode}")
    finally:
        for proc in ctx.procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return ctx


def plan_down(cluster_yaml: str | os.PathLike, root: Path = PROJECT_ROOT) -> list[Step]:
    """`ray down -y CLUSTER_YAML` (terminates every node of the cluster)."""
    validate_cluster_yaml(cluster_yaml)
    yaml_arg = str(Path(cluster_yaml).expanduser().resolve())  # the step runs in the project folder
    return [Step(f"tear the cluster down ({cluster_yaml})", argv=(RAY, "down", "-y", yaml_arg), cwd=str(root))]
