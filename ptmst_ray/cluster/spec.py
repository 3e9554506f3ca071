"""Checks of a Ray cluster-launcher YAML before any money is spent.

Ray's own schema (ray/autoscaler/ray-schema.json), typo hints for keys, and the dashboard bound to
loopback: the dashboard and Jobs API run code for anyone who reaches them (CVE-2023-48022,
"ShadowRay"), so a head that binds it elsewhere is refused.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
from pathlib import Path

import yaml


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class LaunchError(ValueError):
    """A cluster problem the user can fix; the message names the file and key path where there is one."""


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


