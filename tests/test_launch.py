"""`ptmst-ray launch`: cluster YAML checks, the dry-run plan, and one real job on a local 2-node cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from ptmst_ray.cluster import jobs, launch
from ptmst_ray.cluster.spec import LaunchError, validate_cluster_yaml
from ptmst_ray_cli.cluster_cmds import register

GPU_YAML = launch.PROJECT_ROOT / "cluster" / "gpu.yaml"
runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _broken(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(GPU_YAML.read_text())
    edit(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------- YAML checks


def test_gpu_yaml_validates():
    raw = validate_cluster_yaml(GPU_YAML)
    assert raw["provider"]["type"] == "aws"
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"]["train_driver"] == 16
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in raw["head_start_ray_commands"])


def test_typo_in_top_level_key(tmp_path):
    path = _broken(tmp_path, lambda r: r.__setitem__("setup_comands", r.pop("setup_commands")))
    with pytest.raises(LaunchError) as e:
        validate_cluster_yaml(path)
    msg = str(e.value)
    assert str(path) in msg and "setup_comands" in msg and "did you mean 'setup_commands'" in msg


def test_typo_in_node_type_key(tmp_path):
    def edit(r):
        node = r["available_node_types"]["ray.worker.gpu"]
        node["min_worker"] = node.pop("min_workers")

    path = _broken(tmp_path, edit)
    with pytest.raises(LaunchError) as e:
        validate_cluster_yaml(path)
    msg = str(e.value)
    assert str(path) in msg and "available_node_types.ray.worker.gpu.min_worker" in msg
    assert "did you mean 'min_workers'" in msg


def test_schema_type_error_names_key(tmp_path):
    path = _broken(tmp_path, lambda r: r.__setitem__("max_workers", "four"))
    with pytest.raises(LaunchError, match="max_workers"):
        validate_cluster_yaml(path)


@pytest.mark.parametrize("host", ["0.0.0.0", None])
def test_dashboard_beyond_loopback_rejected(tmp_path, host):
    def edit(r):
        cmd = r["head_start_ray_commands"][1]
        r["head_start_ray_commands"][1] = cmd.replace(
            "--dashboard-host=127.0.0.1", f"--dashboard-host={host}" if host else "")

    path = _broken(tmp_path, edit)
    with pytest.raises(LaunchError) as e:
        validate_cluster_yaml(path)
    msg = str(e.value)
    assert str(path) in msg and "head_start_ray_commands[1]" in msg
    if host:
        assert "CVE-2023-48022" in msg and "ShadowRay" in msg


def test_cli_error_exits_2(tmp_path):
    path = _broken(tmp_path, lambda r: r.__setitem__("max_worker", r.pop("max_workers")))
    result = runner.invoke(_app(), ["launch", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "max_worker" in result.output and "broken.yaml" in result.output


# --------------------------------------------------------------------------- plan and dry run


def test_dry_run_prints_steps_and_does_nothing(monkeypatch):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(launch, "submit_job", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(launch, "ensure_auth_token", lambda: ran.append("token"))
    result = runner.invoke(_app(), ["launch", str(GPU_YAML), "--dry-run", "--set", "distill.syn_steps=4",
                                    "--set", "run.root=s3://bucket/runs/toy"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"ray up -y {GPU_YAML}" in out
    assert f"ray dashboard {GPU_YAML}" in out
    assert "ray job submit --address http://127.0.0.1:8265" in out
    assert "ptmst-ray run --config configs/toy.yaml --set distill.syn_steps=4 --set run.root=s3://bucket/runs/toy" in out
    assert '"working_dir"' in out and ".venv" in out
    assert ran == []


def test_inputs_only_this_machine_reads_are_refused_before_ray_up(tmp_path):
    """A new cluster's nodes cannot read this machine's files: the run root and every input must be URLs."""
    local_root = runner.invoke(_app(), ["launch", str(GPU_YAML), "--dry-run"])  # the toy's ~/.cache root
    assert local_root.exit_code == 2 and "run.root" in local_root.output and "s3://" in local_root.output
    weights = runner.invoke(_app(), ["launch", str(GPU_YAML), "--dry-run", "--config", "configs/flickr30k_500.yaml",
                                     "--set", "run.root=s3://bucket/r", "--set", "data.annotations=s3://bucket/ann",
                                     "--set", "data.images=s3://bucket/img"])
    assert weights.exit_code == 2 and "model.image_pretrained" in weights.output, weights.output


@pytest.mark.parametrize("field", ["run.root", "data.annotations", "data.images", "model.image_pretrained",
                                   "model.text_pretrained", "model.pretrained"])
def test_each_input_only_this_machine_reads_is_named_on_a_cluster(field):
    """Every input of a cluster run (the run root, annotations, images, each weights file) must be a URL all
    nodes read: one local path among URLs is refused, naming exactly that field; URLs pass; open_clip's
    pretrained tags (no path) pass."""
    from ptmst_ray.config import ConfigError, load_config
    from ptmst_ray.stages.preflight import check_inputs_shared

    urls = {"run.root": "s3://b/r", "data.annotations": "s3://b/ann", "data.images": "s3://b/img",
            "model.image_pretrained": "s3://b/w/img.safetensors", "model.text_pretrained": "s3://b/w/txt",
            "model.pretrained": "s3://b/w/clip.safetensors"}
    base = ["data.dataset=flickr30k", "pretrain.enabled=false"]
    check_inputs_shared(load_config("configs/toy.yaml", base + [f"{k}={v}" for k, v in urls.items()]))
    check_inputs_shared(load_config("configs/toy.yaml", base + [f"{k}={v}" for k, v in urls.items()
                                                                 if k != "model.pretrained"] + ["model.pretrained=openai"]))
    local = {**urls, field: "/home/me/thing"}
    with pytest.raises(ConfigError) as e:
        check_inputs_shared(load_config("configs/toy.yaml", base + [f"{k}={v}" for k, v in local.items()]))
    assert str(e.value).startswith(f"{field}: ") and "every node reads it" in str(e.value)


def test_sweep_on_another_machines_cluster_refuses_local_inputs(tmp_path):
    """`ptmst-ray sweep --address` checks as `run` does, before connecting (exit 2, the field named)."""
    from ptmst_ray_cli.main import app

    result = CliRunner().invoke(app, ["sweep", "--address", "10.0.0.5:6379", "--set", f"run.root={tmp_path}"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "run.root" in out and "every node reads it" in out, out


def test_preflight_knows_a_cluster_address_from_a_local_one():
    from ptmst_ray.orchestration.runtime import is_cluster_address

    assert not any(is_cluster_address(a) for a in (None, "", "local", "auto", "127.0.0.1:6379", "localhost:6379",
                                                   "ray://127.0.0.1:10001"))
    assert all(is_cluster_address(a) for a in ("10.0.0.5:6379", "ray://head.example:10001", "head:6379"))


def test_plan_with_address_skips_ray_up():
    steps = launch.plan_launch(None, sweep=True, address="127.0.0.1:9999", follow=False)
    rendered = [s.render() for s in steps]
    assert len(steps) == 1 and "ray up" not in " ".join(rendered)
    assert "http://127.0.0.1:9999" in rendered[0] and "ptmst-ray sweep --config configs/toy.yaml" in rendered[0]


def test_config_outside_project_rejected(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text("run: {seed: 1}\n")
    with pytest.raises(LaunchError, match="outside the project"):
        launch.plan_launch(GPU_YAML, config_path=outside)


def test_bad_override_rejected_before_ray_up():
    with pytest.raises(LaunchError, match="distill.syn_steps"):
        launch.plan_launch(GPU_YAML, overrides=["distill.syn_steps=0"])


def test_down_dry_run():
    result = runner.invoke(_app(), ["down", str(GPU_YAML), "--dry-run"])
    assert result.exit_code == 0 and f"ray down -y {GPU_YAML}" in result.output


# --------------------------------------------------------------------------- a real job on a local 2-node cluster

PROBE = '''
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init()
pg = placement_group([{"GPU": 1}, {"GPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready())

@ray.remote(num_gpus=1, num_cpus=0)
def where():
    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

refs = [where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
        for i in range(2)]
nodes = ray.get(refs)
print("GPU_TASK_NODES", len({n for n, _ in nodes}), nodes)
print("RESOURCES", ray.cluster_resources())
'''


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    return [f"{name}={p}" for name, p in zip(names, _free_ports(len(names)))]


@pytest.fixture
def local_cluster(monkeypatch):
    """A head (2 CPU, 2 logical GPU, train_driver 4) and a worker (1 CPU, 1 GPU) with token auth, on
    free ports, their own temp dir, each `ray start --block` in its own session so that teardown ends
    exactly these processes (never `ray stop`, which would stop every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="ptl", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client_port = _free_ports(3)
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}", "--num-cpus=2", "--num-gpus=2",
            '--resources={"train_driver": 4}', f"--temp-dir={temp}", *_node_ports()]
    # each node its own temp dir, as on separate machines: nodes sharing one would share the runtime-env
    # folder, and a node re-extracting the job's working_dir deletes the running driver's cwd
    worker = [ray_bin, "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--num-gpus=1",
              f"--temp-dir={temp}/w", *_node_ports()]
    procs = []
    logs = []

    def start(argv, name):
        out = open(Path(temp) / f"{name}.log", "w")
        logs.append(out)
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    address = f"http://127.0.0.1:{dash}"
    try:
        start(head, "head")
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        _wait_for(lambda: jobs.job_client(address), 90, procs, temp)
        start(worker, "worker")
        _wait_for(lambda: _nodes_alive(address) >= 2, 90, procs, temp)
        yield address, token
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # `ray start --block` then stops the node's processes
        deadline = time.monotonic() + 8  # a graceful stop, briefly: the head alone took 30 s to exit
        for p in reversed(procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # leftovers of that session only (we created it)
            except ProcessLookupError:
                pass
        for out in logs:
            out.close()
        shutil.rmtree(temp, ignore_errors=True)


def _nodes_alive(address: str) -> int:
    text = jobs.cluster_status(jobs.job_client(address))
    return text.count("node_")


def _wait_for(check, timeout_s, procs, temp):
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.poll() is not None:
                logs = "\n".join(f.read_text()[-2000:] for f in Path(temp).glob("*.log"))
                raise RuntimeError(f"ray start exited with {p.returncode}:\n{logs}")
        try:
            if check():
                return
        except LaunchError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("local Ray cluster did not come up")
        time.sleep(1)


@pytest.mark.ray
@pytest.mark.slow
def test_job_on_local_two_node_cluster_with_its_run_root_in_a_bucket(s3, local_cluster, tmp_path, monkeypatch):
    """A GPU probe and then the tiny pipeline as Ray Jobs on a local two-node cluster (token auth). The run
    root is an S3 bucket (moto on loopback; the nodes' `ray start` has the AWS_* variables, as a cluster's
    nodes would: README "Run roots on object storage"), so both nodes write every artefact to it and
    nothing to local disk (issue #21 on two nodes)."""
    address, token = local_cluster
    (tmp_path / "gpu_probe.py").write_text(PROBE)

    # token auth: a wrong token is refused with a message that says what to do
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    with pytest.raises(LaunchError, match="auth token"):
        jobs.job_client(address).list_jobs()
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)

    status_text = jobs.cluster_status(jobs.job_client(address))
    assert "GPU" in status_text and "train_driver" in status_text

    steps = launch.plan_launch(None, address=address, entrypoint="python gpu_probe.py", root=tmp_path)
    out: list[str] = []
    ctx = launch.execute_plan(steps, address=address, on_log=out.append)
    logs = "".join(out)
    assert ctx.status == "SUCCEEDED", logs
    assert "GPU_TASK_NODES 2" in logs
    assert "'train_driver': 4.0" in logs and "'GPU': 3.0" in logs
    rows = jobs.list_jobs(jobs.job_client(address))
    assert rows[0]["submission_id"] == ctx.job_id and rows[0]["status"] == "SUCCEEDED"

    # the thin CLI over the same calls
    status = runner.invoke(_app(), ["status", "--address", address])
    assert status.exit_code == 0 and ctx.job_id in status.output and "SUCCEEDED" in status.output
    job_logs = runner.invoke(_app(), ["logs", ctx.job_id, "--address", address])
    assert job_logs.exit_code == 0 and "GPU_TASK_NODES 2" in job_logs.output

    # the tiny pipeline as a Ray Job through launch's own submission path (plan_launch + execute_plan):
    # 3 experts and 3 phase runs (2 phases + the single-phase baseline) each need 1 CPU + 1 GPU, and the
    # cluster has 3 of each over two nodes, so concurrent work must spread
    cfg = tiny_config(s3.url("run"), **{"experts.num_experts": 3, "eval.seeds": 1})  # 4 evaluation tasks, not 8
    (tmp_path / "tiny.yaml").write_text(cfg.to_yaml())
    steps = launch.plan_launch(None, config_path=tmp_path / "tiny.yaml", address=address, root=tmp_path)
    assert any("ptmst-ray run --config tiny.yaml" in s.description for s in steps)
    out = []
    ctx = launch.execute_plan(steps, address=address, on_log=out.append)
    assert ctx.status == "SUCCEEDED", "".join(out)[-5000:]
    keys = s3.keys("run/")

    def read(key: str):
        return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())

    assert set(read("run/eval/results.json")["methods"]) == {"ptm_st", "random", "single_phase", "full"}
    assert "run/distilled/distilled.parquet" in keys
    assert any(k.startswith("run/phases/phase0-") and "/checkpoint_" in k for k in keys)  # Train's, via pyarrow
    experts = [read(k) for k in keys if k.startswith("run/experts/attempts/")]
    phases = [read(k) for k in keys if k.startswith("run/phases/") and "/attempts/" in k]
    assert sorted(e["expert_id"] for e in experts) == [0, 1, 2]
    assert len(phases) == 3 and all(len(a["gpu_ids"]) == 1 for a in experts + phases)
    for group in (experts, phases):  # runs that overlap in time hold different (node, GPU) slots
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a["start"] < b.get("end", float("inf")) and b["start"] < a.get("end", float("inf")):
                    assert (a["node_id"], a["gpu_ids"]) != (b["node_id"], b["gpu_ids"]), (a, b)
    assert len({a["node_id"] for a in experts + phases}) == 2, "all work stayed on one node"
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("**/*.safetensors"))
