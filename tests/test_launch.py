"""`ptmst-ray launch`: cluster YAML checks, the dry-run plan, and one real job on a local 2-node cluster."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import S3_KEY, S3_SECRET, tiny_config
from ptmst_ray import storage, tensorio
from ptmst_ray.cluster import jobs, launch
from ptmst_ray.cluster.local import start_local_cluster
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
    import ray.autoscaler  # noqa: F401 - before Popen is replaced below: Ray subclasses it when first imported

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
    named = runner.invoke(_app(), ["launch", str(GPU_YAML), "--dry-run", "--config", "scenes",
                                   "--set", "run.root=s3://bucket/runs/scenes"])
    assert named.exit_code == 0, named.output  # a shipped recipe by name: the job gets its path in the project
    assert "ptmst-ray run --config configs/scenes.yaml --set run.root=s3://bucket/runs/scenes" in named.output
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


def test_a_cluster_yaml_given_from_another_folder_reaches_ray_as_the_same_file(monkeypatch):
    """Ray's launcher runs in the project folder (cluster/gpu.yaml's file_mounts "." is the project): a path the
    user gave relative to the folder they are in reaches it as that same file."""
    import ray.autoscaler  # noqa: F401 - its schema validates the YAML; imported here, as the other dry runs do

    monkeypatch.chdir(GPU_YAML.parent)
    steps = launch.plan_launch(GPU_YAML.name, address=None, follow=False, overrides=["run.root=s3://b/r"])
    up = next(step for step in steps if step.argv and step.argv[1] == "up")
    assert Path(up.cwd, up.argv[-1]).resolve() == GPU_YAML.resolve() and up.cwd == str(launch.PROJECT_ROOT)
    (down,) = launch.plan_down(GPU_YAML.name)
    assert Path(down.cwd, down.argv[-1]).resolve() == GPU_YAML.resolve()


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


@pytest.fixture
def local_cluster(monkeypatch):
    """A head (2 CPU, 2 logical GPU, train_driver 4) and a worker (1 CPU, 1 GPU) with token auth, on free
    ports, their own temp dir, the AWS_* variables of this process in their environment, each `ray start
    --block` in its own session, so that teardown ends exactly these processes (never `ray stop`, which would
    stop every Ray on the machine): ptmst_ray.cluster.local, the helper `ptmst-ray run --as-job` uses too."""
    token = secrets.token_hex(16)
    cluster = start_local_cluster(num_cpus=2, num_gpus=2, resources={"train_driver": 4}, token=token,
                                  single_machine=False, prefix="ptl")
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        cluster.add_worker(num_cpus=1, num_gpus=1, joined=lambda: _nodes_alive(cluster.dashboard_url) >= 2)
        yield cluster.dashboard_url, token
    finally:
        cluster.stop(grace_s=1.0)  # nothing of it is kept: no need to wait out the head's graceful exit


def _nodes_alive(address: str) -> int:
    text = jobs.cluster_status(jobs.job_client(address))
    return text.count("node_")


FAKE_RAY_START = """import os, pathlib, sys, time
starts = pathlib.Path(os.environ["FAKE_STARTS"])
n = len(starts.read_text().splitlines()) + 1 if starts.exists() else 1
starts.write_text("start\\n" * n)
if n <= int(os.environ["FAKE_FAILURES"]):
    print("Exception: The current node timed out during startup.")
    sys.exit(1)
time.sleep(120)
"""


@pytest.mark.parametrize("failures", [1, 2])
def test_a_worker_node_whose_start_exits_is_started_once_more(tmp_path, monkeypatch, caplog, failures):
    """`ray start` of a worker node exiting while it starts (Ray's fixed 30 s for a raylet to register, missed on a
    loaded machine) is started again once, with a log of its own; a second exit is the error, with both logs.
    Here `ray start` is a script that exits ``failures`` times before it stays up."""
    from ptmst_ray.cluster import local

    (tmp_path / "fake_ray.py").write_text(FAKE_RAY_START)
    monkeypatch.setattr(local, "ray_command", lambda: [sys.executable, str(tmp_path / "fake_ray.py")])
    starts = tmp_path / "starts"
    cluster = local.LocalCluster(temp_dir=str(tmp_path / "ray"), gcs_address="127.0.0.1:1", dashboard_url="",
                                 token=None, single_machine=False,
                                 env={**os.environ, "FAKE_STARTS": str(starts), "FAKE_FAILURES": str(failures)})
    (tmp_path / "ray").mkdir()

    def joined() -> bool:  # the start that stays up has written its line
        return len(starts.read_text().splitlines()) > failures if starts.exists() else False

    try:
        if failures < local.START_ATTEMPTS:
            cluster.add_worker(num_cpus=1, joined=joined, timeout_s=30)
            assert len(cluster.procs) == 1 and cluster.procs[0].poll() is None
            assert "worker0's `ray start` exited with 1 while starting; starting it again" in caplog.text
        else:
            with pytest.raises(LaunchError, match="exited with 1 before worker1 joined") as e:
                cluster.add_worker(num_cpus=1, joined=joined, timeout_s=30)
            assert "worker0.log" in str(e.value) and "worker1.log" in str(e.value)
        assert sorted(p.name for p in (tmp_path / "ray").glob("*.log")) == ["worker0.log", "worker1.log"]
    finally:
        cluster.stop(grace_s=0.5)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.faults
def test_job_on_two_node_cluster_with_run_root_in_a_bucket(s3, local_cluster, tmp_path, monkeypatch):
    """A GPU probe and then the tiny pipeline as Ray Jobs on a local two-node cluster (token auth), its run
    root an S3 bucket (moto on loopback; the nodes' `ray start` has the AWS_* variables, as a cluster's nodes
    would: README "Run roots on object storage"). Both nodes write every artefact to the bucket and nothing to
    local disk; a phase worker SIGKILLed mid-phase resumes from its checkpoint in the bucket and the untracked
    checkpoint prefixes are cleaned up; results.json holds every method, metric and stage; the same job again
    redoes nothing before evaluation; `data show` and a laptop-mode `eval` read the bucket; no credential is
    written (issue #21 end to end, on two nodes)."""
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
    # 3 experts and the 2 phase runs each need 1 CPU + 1 GPU, and the cluster has 3 of each over two nodes,
    # so the experts must spread; one phase worker is SIGKILLed once a checkpoint of it is intact in the bucket
    cfg = tiny_config(s3.url("run"), **{"experts.num_experts": 3, **SMALL})
    (tmp_path / "tiny.yaml").write_text(cfg.to_yaml())
    steps = launch.plan_launch(None, config_path=tmp_path / "tiny.yaml", address=address, root=tmp_path)
    assert any("ptmst-ray run --config tiny.yaml" in s.description for s in steps)
    out = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(launch.execute_plan, steps, address=address, on_log=out.append)
        _kill_phase_worker_after_a_checkpoint(cfg, "phase1", 4, job, out)
        ctx = job.result(timeout=900)
    first_log = "".join(out)
    assert ctx.status == "SUCCEEDED", first_log[-5000:]
    keys = s3.keys("run/")

    def read(key: str):
        return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())

    experts = [read(k) for k in keys if k.startswith("run/experts/attempts/")]
    phases = [read(k) for k in keys if k.startswith("run/phases/") and "/attempts/" in k]
    assert sorted(e["expert_id"] for e in experts) == [0, 1, 2]
    assert len(phases) >= 3 and all(len(a["gpu_ids"]) == 1 for a in experts + phases)
    killed = [a for a in phases if "end" not in a]
    assert len(killed) == 1 and killed[0]["pid"] not in [a["pid"] for a in phases if a is not killed[0]]
    for group in (experts, [a for a in phases if "end" in a]):  # runs overlapping in time hold different slots
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a["start"] < b.get("end", math.inf) and b["start"] < a.get("end", math.inf):
                    assert (a["node_id"], a["gpu_ids"]) != (b["node_id"], b["gpu_ids"]), (a, b)
    assert len({a["node_id"] for a in experts + phases}) == 2, "all work stayed on one node"
    _assert_run_in_bucket(s3, cfg, keys, first_log)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("**/*.safetensors"))

    # the same job again redoes nothing: every stage is complete, every evaluation score stored in the bucket
    stamps, results = _etags(s3, "run/"), read("run/eval/results.json")
    assert len([k for k in stamps if k.startswith("run/eval/scores/")]) == len(results["runs"]) == 3
    out = []
    ctx = launch.execute_plan(steps, address=address, on_log=out.append)
    assert ctx.status == "SUCCEEDED", "".join(out)[-5000:]
    again_results = read("run/eval/results.json")
    assert [(r["stage"], r["ran"]) for r in again_results["stages"]] == [(st, False) for st in STAGES]
    # each stage's time of the run that built it stays on record
    assert [r["built_seconds"] for r in again_results["stages"]] == [r["seconds"] for r in results["stages"]]
    words = " ".join("".join(out).split())  # the driver's log lines as words (its handler wraps long lines)
    assert "skipped (complete; built in" in words and "3 of 3 (method, seed) scores reused" in words
    assert again_results["experts"]["trained"] == 0 and again_results["experts"]["skipped"] == 3
    assert {n: s.get("skipped") for n, s in again_results["phases"].items()} == {"phase0": True, "phase1": True}
    assert again_results["methods"] == results["methods"]
    again = _etags(s3, "run/")
    rewritten = ("run/eval/results.json", "run/eval/plot.png", "run/config.yaml")
    redone = [k for k in stamps if k not in rewritten and again.get(k) != stamps[k]]
    assert redone == [], redone
    assert [k for k in again if k not in stamps] == []  # no worker started

    # `data show` and `eval` (laptop mode: its own local Ray, whose workers inherit AWS_*) read the bucket; the
    # evaluation under other settings (2 epochs) scores afresh: a student in that local Ray reads the bucket
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PTMST_RAY_CACHE=str(tmp_path / "cache"))
    (tmp_path / "bucket.yaml").write_text(cfg.to_yaml())
    show = _cli(["data", "show", "--config", str(tmp_path / "bucket.yaml")], cwd, env)
    assert show.returncode == 0 and "train" in show.stdout, show.stdout + show.stderr
    ev = _cli(["eval", "--config", str(tmp_path / "bucket.yaml"), "-m", "ptm_st", "--json", str(tmp_path / "ev.json"),
               "--set", "eval.epochs=2"], cwd, env)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    scored = json.loads((tmp_path / "ev.json").read_text())
    assert scored["methods"]["ptm_st"]["pairs"] == cfg.total_pairs
    assert [bool(r.get("reused")) for r in scored["runs"]] == [False], scored["runs"]
    # its log (no terminal: one line per change) ends the seed's progress before the table, not after or never
    assert -1 < ev.stderr.find("eval ptm_st seed 0: 1/1 r_mean") < ev.stderr.find("retrieval recall"), ev.stderr
    assert list(cwd.iterdir()) == [], "a command wrote to the local working directory"
    assert S3_SECRET not in show.stdout + show.stderr + ev.stdout + ev.stderr


SMALL = {"phases.0.iterations": 4, "phases.1.iterations": 10, "distill.checkpoint_every": 2,
         "eval.seeds": 1, "eval.epochs": 1, "eval.eval_points": 1, "eval.baselines": ["random", "full"]}
"""The tiny config with one short evaluation seed and the baselines that read the bucket's data (the single-phase
baseline is one more Train run of the phases' code: tests/test_paper_recipes.py runs it through `ptmst-ray run
--address`)."""
METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")
STAGES = ["data", "pretrain", "embed", "experts", "phases", "aggregate", "eval"]


def _cli(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptmst_ray_cli", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _etags(s3, prefix: str) -> dict[str, str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _kill_phase_worker_after_a_checkpoint(cfg, phase: str, at_least: int, job, out: list[str]) -> None:
    """SIGKILL ``phase``'s Train worker (all nodes are this machine's processes) once a checkpoint of at least
    ``at_least`` iterations is intact in the run root, before the phase ends."""
    from ptmst_ray.layout import Layout, phase_hash
    from ptmst_ray.orchestration.phases import latest_stored_state

    layout = Layout.of(cfg)
    index = int(phase.removeprefix("phase"))
    run_dir = layout.train_run(f"{phase}-{phase_hash(cfg, cfg.phases[index])}")
    attempts = storage.join(layout.phase(phase), "attempts")
    deadline = time.time() + 600
    while time.time() < deadline and not job.done():
        tries = [storage.read_json(storage.join(attempts, n)) for n in storage.listdir(attempts)]
        if tries and "end" not in tries[-1] and storage.exists(run_dir):
            stored = latest_stored_state(run_dir)
            if stored is not None and at_least <= int(stored["iteration"]) < cfg.phases[index].iterations:
                os.kill(tries[-1]["pid"], signal.SIGKILL)
                return
        time.sleep(0.5)
    raise AssertionError(f"{phase} never had an intact checkpoint in the run root while it ran (job "
                         f"{'ended' if job.done() else 'still running'}):\n{''.join(out)[-3000:]}")


def _assert_run_in_bucket(s3, cfg, keys: list[str], log: str) -> None:
    """What a user reads after a run on a bucket: every artefact there, the killed phase resumed from its
    checkpoint and its untracked checkpoint prefixes removed, no temporary object, no credential."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ptmst_ray.layout import Layout, phase_hash
    from ptmst_ray.orchestration.phases import checkpoint_dirs

    layout, root = Layout.of(cfg), cfg.run.root
    attempts = [storage.read_json(storage.join(layout.phase("phase1"), "attempts", n))
                for n in storage.listdir(storage.join(layout.phase("phase1"), "attempts"))]
    assert len(attempts) >= 2 and max(a.get("resumed_from") or 0 for a in attempts) >= 4, attempts
    history = [m["iteration"] for m in storage.read_json(layout.metrics("phase1"))]
    assert history == sorted(set(history)) and history[-1] == 10  # every reported iteration once
    run_dir = layout.train_run(f"phase1-{phase_hash(cfg, cfg.phases[1])}")
    assert len(checkpoint_dirs(run_dir)) <= 2, checkpoint_dirs(run_dir)  # untracked prefixes cleaned up
    for part in ("config.yaml", "data/train/manifest.json", "data/text_cache/", "data/embedded/",
                 "pretrain/manifest.json", "experts/expert_0001/trajectory.json", "shortcuts/range_0_3/",
                 "phases/phase0/subset/manifest.json", "phases/phase1/metrics.json", "distilled/distilled.parquet",
                 "distilled/manifest.json", "eval/results.json", "eval/plot.png"):
        assert any(k.startswith(f"run/{part}") for k in keys), (part, keys)
    ckpts = [k for k in keys if k.startswith(f"run/phases/phase0-{phase_hash(cfg, cfg.phases[0])}/checkpoint_")]
    assert any(k.endswith(tensorio.TENSORS) for k in ckpts), keys  # Train's checkpoints, through pyarrow
    assert not [k for k in keys if storage.TMP_MARK in k], "a temporary object was left behind"
    for k in ("config.yaml", "eval/results.json"):
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"run/{k}")["Body"].read().decode()
        assert S3_SECRET not in body and S3_KEY not in body, k
    assert S3_SECRET not in log

    results = json.loads(storage.read_bytes(storage.join(root, "eval", "results.json")))
    assert set(results["methods"]) == {"ptm_st", *cfg.eval.baselines} == {"ptm_st", "random", "full"}
    for method, m in results["methods"].items():
        for k in METRICS:
            assert set(m[k]) == {"mean", "std"} and 0.0 <= m[k]["mean"] <= 100.0, (method, k)
        assert m["seeds"] == cfg.eval.seeds
    assert results["methods"]["ptm_st"]["pairs"] == cfg.total_pairs == results["methods"]["random"]["pairs"]
    assert [r["stage"] for r in results["stages"]] == STAGES and all(r["ran"] for r in results["stages"])
    assert sum(r["seconds"] for r in results["stages"]) <= results["wall_seconds"] + 1
    assert "stages:" in log and "skipped (complete)" not in log
    table = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(root, "distilled", "distilled.parquet"))))
    assert table.num_rows == cfg.total_pairs and table.column("phase").to_pylist() == [0] * 6 + [1] * 8
    assert {"image_png", "text_embedding", "nearest_caption", "similarity_row", "alpha_img"} <= set(table.column_names)
    for png in ("distilled/grid.png", "eval/plot.png"):
        assert storage.read_bytes(storage.join(root, png))[:4] == b"\x89PNG", png
    assert storage.read_json(storage.join(root, "distilled", "card.json"))["pairs"] == cfg.total_pairs


def _session_pids(leader: int) -> list[int]:
    """Pids of the processes in the session led by ``leader`` (a node's `ray start --block`: its raylet, agents
    and workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == leader:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.faults
def test_a_node_lost_mid_expert_leaves_the_rest_to_the_other_node(prepared_root, tmp_path, monkeypatch):
    """`ptmst-ray experts --address` on a two-node cluster (1 CPU each, so one expert actor a node) that does not
    replace lost nodes: the worker node is SIGKILLed (its raylet, agents and workers) while an expert trains there,
    after some of its epochs are stored. The run finishes on the head alone: the lost expert goes to the head's
    actor once its own expert is done, which continues it from its last stored epoch (the epochs stored before the
    loss are not written again), and every expert is complete."""
    from conftest import copy_root
    from ptmst_ray.layout import Layout, experts_hash
    from ptmst_ray.trajectories.store import TrajectoryStore

    root = copy_root(prepared_root, tmp_path / "run", parts=("data", "pretrain"))
    # experts of 40 epochs of 15 steps (batch 8): seconds each, so that the loss lands mid-expert
    cfg = tiny_config(f"file://{root}", **{"experts.num_experts": 2, "experts.epochs": 40, "experts.batch_size": 8})
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    token = secrets.token_hex(16)
    cluster = start_local_cluster(num_cpus=1, num_gpus=0, token=token, single_machine=False, prefix="ptn")
    driver = None
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # for the Jobs API's status that counts the nodes
        cluster.add_worker(num_cpus=1, num_gpus=0, joined=lambda: _nodes_alive(cluster.dashboard_url) >= 2)
        worker = cluster.procs[1].pid  # the worker node's `ray start --block`, leader of its session
        # the token alone, as a user's shell on the head has it (no RAY_AUTH_MODE: the join must send it anyway)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        env.update(RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
        log = tmp_path / "experts.log"
        driver = subprocess.Popen([sys.executable, "-m", "ptmst_ray_cli", "experts", "--config",
                                   str(tmp_path / "cfg.yaml"), "--address", cluster.gcs_address],
                                  env=env, cwd=Path(__file__).parents[1], stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        layout = Layout.of(cfg)
        store = TrajectoryStore(layout.experts)
        attempts_dir = Path(layout.experts.removeprefix("file://")) / "attempts"
        experts_dir = Path(layout.experts.removeprefix("file://"))

        def on_worker_node() -> dict | None:
            """The attempt of an expert training on the worker node with epochs 0-2 stored, not all."""
            for path in sorted(attempts_dir.glob("*.json")):
                a = json.loads(path.read_text())
                stored = len(list((experts_dir / f"expert_{a['expert_id']:04d}").glob("epoch_*.json")))
                if a["pid"] in _session_pids(worker) and 3 <= stored < cfg.experts.epochs + 1:
                    return a
            return None

        deadline, lost = time.time() + 240, None
        while lost is None:
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no expert trained on the worker node:\n" + log.read_text()[-3000:]
            lost = on_worker_node()
            time.sleep(0.1)
        for pid in _session_pids(worker):  # the node goes, all at once
            os.kill(pid, signal.SIGKILL)
        folder = experts_dir / f"expert_{lost['expert_id']:04d}"
        last = max(int(p.stem.removeprefix("epoch_")) for p in folder.glob("epoch_*.json"))  # stored when the node went
        kept = {f"epoch_{k:04d}.{ext}": (folder / f"epoch_{k:04d}.{ext}").stat().st_mtime_ns
                for k in range(last + 1) for ext in ("json", "safetensors")}

        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
        out = " ".join(log.read_text().split())
        assert "its actor died" in out and "experts: 2 trained" in out, out[-3000:]
        assert store.complete_ids(experts_hash(cfg), cfg.experts.epochs) == [0, 1]
        assert {n: (folder / n).stat().st_mtime_ns for n in kept} == kept, "epochs stored before the loss written again"
        again = [json.loads(p.read_text()) for p in attempts_dir.glob("*.json")]
        again = [a for a in again if a["expert_id"] == lost["expert_id"] and a["pid"] != lost["pid"]]
        assert len(again) == 1 and again[0]["node_id"] != lost["node_id"], again  # on the head
        assert again[0]["from_epoch"] >= last, (again, last)  # continued from its last stored epoch
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        cluster.stop(grace_s=1.0)
