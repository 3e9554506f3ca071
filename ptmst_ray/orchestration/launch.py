"""Bring a Ray cluster up with Ray's own cluster launcher and run the pipeline on it as a Ray Job.

Why this file exists: `ptmst-ray launch cluster/gpu.yaml` is a short, inspectable plan of steps
(`ray up`, port-forward, job submission, log following) that `--dry-run` shows without doing,
plus the small Jobs-API helpers behind `ptmst-ray status / logs / stop`. The cluster YAML is
checked before any money is spent: Ray's own schema (ray/autoscaler/ray-schema.json), typo
hints for keys, and the dashboard bound to loopback (CVE-2023-48022, "ShadowRay": the dashboard
and Jobs API run code for anyone who reaches them).

Token auth (Ray 2.60, checked on a local head started with RAY_AUTH_MODE=token): a client
without the token gets HTTP 401, a wrong token 403. The Jobs SDK only attaches the token by
itself when the *client* process has RAY_AUTH_MODE=token, so :func:`job_client` sends
``Authorization: Bearer <token>`` explicitly, the token taken from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (where `ray get-auth-token --generate` writes it).
No printing here: the CLI renders steps and log lines.
"""

from __future__ import annotations

import difflib
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
from urllib.parse import urlparse

import yaml

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_REL = "configs/toy.yaml"
"""The recipe a launch runs without --config (relative to the project root, as the job sees it)."""
DASHBOARD_PORT = 8265
DEFAULT_ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"
"""Where `ray dashboard CLUSTER_YAML` forwards the head's loopback-bound dashboard to."""
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "bench/out"]
"""Left out of the job's working_dir upload (Ray caps the package at a few hundred MB)."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


class LaunchError(ValueError):
    """A launch problem the user can fix; the message names the file and key path where there is one."""


# --------------------------------------------------------------------------- cluster YAML checks


def _schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _check_keys(raw: dict, allowed: list[str], where: str, source: str) -> None:
    for key in raw:
        if key not in allowed:
            raise LaunchError(
                f"{source}: {where}{key}: unknown key; {_did_you_mean(str(key), allowed)}"
                f"allowed: {', '.join(sorted(allowed))}"
            )


def _check_dashboard_host(commands: list, source: str) -> None:
    """The head must start Ray with its dashboard on loopback; Ray's AWS defaults say 0.0.0.0."""
    starts = [(i, c) for i, c in enumerate(commands) if isinstance(c, str) and "ray start" in c and "--head" in c]
    if not starts:
        raise LaunchError(f"{source}: head_start_ray_commands: no `ray start --head ...` command found")
    for i, cmd in starts:
        tokens = shlex.split(cmd.replace(";", " ; "), posix=True)
        host = None
        for k, tok in enumerate(tokens):
            if tok.startswith("--dashboard-host="):
                host = tok.split("=", 1)[1]
            elif tok == "--dashboard-host" and k + 1 < len(tokens):
                host = tokens[k + 1]
        where = f"{source}: head_start_ray_commands[{i}]"
        if host is None:
            raise LaunchError(
                f"{where}: add --dashboard-host=127.0.0.1 (Ray's default for the cluster launcher exposes the "
                "dashboard and Jobs API; reach it by port-forward with `ray dashboard CLUSTER_YAML`)"
            )
        if host not in LOOPBACK_HOSTS:
            raise LaunchError(
                f"{where}: --dashboard-host={host} exposes the dashboard and Jobs API, which run code for anyone "
                "who reaches them (CVE-2023-48022, \"ShadowRay\"); use --dashboard-host=127.0.0.1 and port-forward "
                "with `ray dashboard CLUSTER_YAML`"
            )


def validate_cluster_yaml(path: str | os.PathLike) -> dict:
    """Load a cluster-launcher YAML and check it; raise :class:`LaunchError` naming file and key path."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"{source}: cluster YAML not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LaunchError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LaunchError(f"{source}: the top level must be a mapping (cluster_name, provider, ...)")
    schema = _schema()
    _check_keys(raw, list(schema["properties"]), "", source)
    node_props = schema["properties"]["available_node_types"]["patternProperties"][".*"]["properties"]
    for name, node in (raw.get("available_node_types") or {}).items():
        if isinstance(node, dict):
            _check_keys(node, list(node_props), f"available_node_types.{name}.", source)
    import jsonschema

    try:
        jsonschema.validate(raw, schema)
    except jsonschema.ValidationError as e:
        key = ".".join(str(k) for k in e.absolute_path) or "<root>"
        raise LaunchError(f"{source}: {key}: {e.message}") from None
    head = raw.get("head_node_type")
    types_ = raw.get("available_node_types") or {}
    if types_ and head not in types_:
        raise LaunchError(
            f"{source}: head_node_type: {head!r} is not in available_node_types; "
            f"{_did_you_mean(str(head), list(types_))}have: {', '.join(types_)}"
        )
    _check_dashboard_host(raw.get("head_start_ray_commands") or [], source)
    return raw


# --------------------------------------------------------------------------- the job


def normalize_address(address: Optional[str]) -> str:
    """Dashboard address for the Jobs API: http://host:port (default: the port-forward on loopback)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise LaunchError(f"--address {address}: give the dashboard address (e.g. {DEFAULT_ADDRESS}), not a ray:// one")
    return address if "://" in address else f"http://{address}"


def job_config_path(config: Optional[str | os.PathLike], root: Path = PROJECT_ROOT) -> str:
    """The config path as the job sees it: relative to the uploaded project root, or a URL."""
    if config is None:
        return DEFAULT_CONFIG_REL
    text = str(config)
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
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
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
        path.chmod(0o600)
        log.info("generated a Ray auth token in %s", path)
    return path


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
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   **resources)
    except Exception as e:  # noqa: BLE001 - re-raised with the address and entrypoint
        raise LaunchError(f"{normalize_address(address)}: job submission of {entrypoint!r} failed: {e}") from None
    log.info("submitted job %s: %s", job_id, entrypoint)
    return job_id


def job_status(client, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def follow_logs(client, job_id: str, on_log: Callable[[str], None], poll_s: float = 1.0,
                timeout_s: Optional[float] = None) -> str:
    """Pass new log text to ``on_log`` until the job ends; return its final status.

    Polls get_job_logs (plain HTTP, works through any proxy) rather than the websocket tail.
    """
    seen = 0
    start = time.monotonic()
    while True:
        status = job_status(client, job_id)
        logs = client.get_job_logs(job_id)
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


def cluster_status(client) -> str:
    """The `ray status` text (nodes, resources, demands) as the dashboard reports it."""
    r = client._do_request("GET", "/api/cluster_status?format=1")  # no public SDK call for this in 2.60
    if r.status_code != 200:
        raise LaunchError(f"cluster status: HTTP {r.status_code}: {r.text[:200]}")
    data = r.json().get("data", {})
    return data.get("clusterStatus") or data.get("cluster_status") or json.dumps(data, indent=1)


# --------------------------------------------------------------------------- the plan


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


def _ray_cli() -> str:
    return "ray"


def _resolve_argv(argv: tuple[str, ...]) -> list[str]:
    """Run `ray` from this interpreter's environment (its version matches the client) when it is there."""
    sibling = Path(sys.executable).parent / argv[0]
    return [str(sibling), *argv[1:]] if argv[0] == "ray" and sibling.is_file() else list(argv)


def plan_launch(cluster_yaml: Optional[str | os.PathLike], config_path: Optional[str | os.PathLike] = None,
                sweep: bool = False, overrides: Optional[list[str]] = None, address: Optional[str] = None,
                follow: bool = True, entrypoint: Optional[str] = None, runtime_env_extra: Optional[dict] = None,
                root: Path = PROJECT_ROOT) -> list[Step]:
    """The steps of a launch. With ``address``, skip `ray up` and submit to that (existing) cluster."""
    if cluster_yaml is not None:
        validate_cluster_yaml(cluster_yaml)
    if cluster_yaml is None and address is None:
        raise LaunchError("give a cluster YAML (e.g. cluster/gpu.yaml) or --address of a running cluster's dashboard")
    if entrypoint is None:
        _check_pipeline_config(config_path, overrides, cluster_mode=address is None)
        entrypoint = build_entrypoint(config_path, sweep, overrides, root)
    runtime_env = job_runtime_env(root, runtime_env_extra)
    steps: list[Step] = []
    target = normalize_address(address) if address else DEFAULT_ADDRESS
    if address is None:
        yaml_arg = str(cluster_yaml)
        steps.append(Step("ensure the Ray auth token ~/.ray/auth_token exists (copied to every node by file_mounts)",
                          call=lambda ctx: ensure_auth_token(), shown="ray get-auth-token --generate  # if missing"))
        steps.append(Step(f"bring the cluster up (or update it) from {yaml_arg}",
                          argv=(_ray_cli(), "up", "-y", yaml_arg), cwd=str(root)))
        steps.append(Step(f"port-forward the head's loopback dashboard to {DEFAULT_ADDRESS} "
                          f"(dashboard hint: run `ray dashboard {yaml_arg}` to reopen it later)",
                          argv=(_ray_cli(), "dashboard", yaml_arg, "--port", str(DASHBOARD_PORT)),
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
    """Reject a bad recipe here, before a cluster is paid for; warn when a multi-node run root is local."""
    from ptmst_ray.config import DEFAULT_CONFIG, ConfigError, load_config

    if config_path is not None and "://" in str(config_path):
        return
    try:
        cfg = load_config(config_path or DEFAULT_CONFIG, overrides or [])
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    if cluster_mode and "://" not in cfg.run.root:
        log.warning("run.root is a local path (%s) on the head node; for a multi-node cluster pass "
                    "--set run.root=s3://<bucket>/ptmst-runs/<name>", cfg.run.root)


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
    return [Step(f"tear the cluster down ({cluster_yaml})", argv=(_ray_cli(), "down", "-y", str(cluster_yaml)),
                 cwd=str(root))]
