"""Issue #27 item 7: on Ray's fake autoscaling cluster (a CPU head, a GPU worker type with logical GPUs and
``min_workers: 0``), a tiny run asks for GPUs from its config, the autoscaler adds GPU nodes, and the
experts, phases and evaluation run on them (the node of each is asserted), never on the head.

The cluster is this test's own: `ray start --head --block` with the fake multi-node provider
(``RAY_FAKE_CLUSTER=1``), on free loopback ports and its own temp dir, in its own session so that teardown
ends exactly its processes (never `ray stop`, which stops every Ray on the machine). The driver runs in a
subprocess, apart from the test session's shared Ray (tests/conftest.py ``ray_session``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import tiny_config

GPU_TYPE = "ray.worker.gpu"


ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the decision (no Ray needed)


def test_gpus_an_autoscaler_config_can_add():
    """GPU node types x max_workers, capped by the cluster's max_workers; the head and CPU types count 0."""
    import yaml

    from ptmst_ray.orchestration.runtime import node_types_gpus

    assert node_types_gpus(yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())) == 4  # 4 x g5.xlarge
    assert node_types_gpus(fake_autoscaler_config(1, gpu_workers=3)) == 3
    two_types = {"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"GPU": 8}, "max_workers": 0}, "cpu": {"resources": {"CPU": 4}, "max_workers": 5},
        "g4": {"resources": {"CPU": 8, "GPU": 4}, "max_workers": 10}}}
    assert node_types_gpus(two_types) == 12  # capped at the cluster's 3 workers
    assert node_types_gpus({"available_node_types": {"cpu": {"resources": {"CPU": 4}, "max_workers": 5}}}) == 0


@pytest.mark.parametrize("setting,gpus,can_add,use", [
    ("auto", 0, None, False), ("auto", 0, 0.0, False), ("auto", 2, None, True), ("auto", 0, 4.0, True),
    ("cpu", 2, 4.0, False), ("gpu", 0, 4.0, True), ("gpu", 0, None, True), ("gpu", 1, None, True)])
def test_accelerator_follows_the_config_and_what_the_cluster_can_have(setting, gpus, can_add, use, monkeypatch):
    """auto: GPUs when there are some now or the autoscaler can add them; gpu/cpu as given. The reason
    names the setting and what was seen (it is logged once per run and kept in results.json). A cluster
    joined, not a local Ray this process started (the test session's own Ray may be up: that case is
    test_laptop_stays_on_cpus_and_refuses_gpu_without_any)."""
    from ptmst_ray.orchestration import runtime
    from ptmst_ray.orchestration.runtime import ClusterInfo, plan_accelerator

    monkeypatch.setattr(runtime, "_STARTED_LOCAL", [False])

    plan = plan_accelerator(setting, ClusterInfo(cpus=2, gpus=gpus, nodes=1), (can_add, "autoscaler.yaml"))
    assert plan.use_gpus is use
    assert plan.reason.startswith(f"run.accelerator={setting}: ") and f"{gpus} GPU(s) now" in plan.reason


def test_laptop_stays_on_cpus_and_refuses_gpu_without_any(monkeypatch):
    """A local Ray this command started has no autoscaler: auto means its GPUs (none: CPUs), and gpu
    without GPUs is a one-line error naming run.accelerator rather than work that waits forever."""
    from ptmst_ray.config import ConfigError
    from ptmst_ray.orchestration import runtime

    monkeypatch.setattr(runtime, "_STARTED_LOCAL", [True])
    assert runtime.autoscaler_gpus()[0] is None
    info = runtime.ClusterInfo(cpus=2, gpus=0, nodes=1)
    assert not runtime.plan_accelerator("auto", info, runtime.autoscaler_gpus()).use_gpus
    with pytest.raises(ConfigError, match="run.accelerator"):
        runtime.plan_accelerator("gpu", info, runtime.autoscaler_gpus())


def test_the_autoscaler_config_file_is_read_when_the_gcs_has_none(tmp_path, monkeypatch):
    from ptmst_ray.orchestration import runtime

    monkeypatch.setattr(runtime, "_STARTED_LOCAL", [False])
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(fake_autoscaler_config(1, gpu_workers=2)))
    monkeypatch.setenv(runtime.AUTOSCALER_CONFIG_ENV, str(config))
    assert runtime.autoscaler_gpus() == (2.0, str(config))  # no Ray connected: the GCS has nothing to say
    monkeypatch.setenv(runtime.AUTOSCALER_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    gpus, why = runtime.autoscaler_gpus()
    assert gpus is None and "missing.yaml" in why and runtime.AUTOSCALER_CONFIG_ENV in why


def test_stages_ask_for_gpus_from_the_config_while_none_are_up(tmp_path, monkeypatch):
    """run.accelerator=gpu on a cluster with no GPU node up yet: expert actors, phase workers and
    evaluation/pretraining tasks ask for GPUs, and the autoscaler is told the bundles ahead; cpu asks none."""
    from ptmst_ray.orchestration import experts, phases, pipeline, runtime

    requests = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda **kw: requests.append(kw))
    monkeypatch.setattr(runtime, "_STARTED_LOCAL", [False])
    monkeypatch.setattr(runtime, "cluster_info", lambda: runtime.ClusterInfo(cpus=2, gpus=0, nodes=1,
                                                                              autoscaler_gpus=4))
    monkeypatch.setattr(experts, "cluster_info", runtime.cluster_info)
    cfg = tiny_config(tmp_path, **{"run.accelerator": "gpu"})
    options = experts._actor_options(cfg, 2)
    assert options["num_gpus"] == 1.0 and options["num_cpus"] == 1
    trainer = phases.make_trainer(cfg.to_dict(), "phase_0", {}, 0, "run")
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.resources_per_worker["GPU"] == 1.0
    assert pipeline.task_resources(cfg)["num_gpus"] == 1.0
    assert runtime.request_gpus(cfg, 6, 1.0, "phases") == 4  # what the autoscaler can add at most
    assert requests == [{"bundles": [{"CPU": 1, "GPU": 1.0}] * 4}]
    assert runtime.request_gpus(cfg, 1, 1.0, "embed", keep_larger=True) == 0 and len(requests) == 1  # kept
    assert runtime.request_gpus(cfg, 2, 1.0, "eval") == 2 and requests[-1] == {"bundles": [{"CPU": 1, "GPU": 1.0}] * 2}
    runtime.release_gpus()
    assert requests[-1] == {"bundles": []}  # withdrawn: idle GPU nodes may go
    runtime.release_gpus()
    assert len(requests) == 3  # nothing standing: nothing to withdraw

    cpu = cfg.replace(**{"run.accelerator": "cpu"})
    assert "num_gpus" not in experts._actor_options(cpu, 2) and "num_gpus" not in pipeline.task_resources(cpu)
    assert not phases.make_trainer(cpu.to_dict(), "phase_0", {}, 0, "run").scaling_config.use_gpu
    assert runtime.request_gpus(cpu, 6, 1.0, "phases") == 0 and len(requests) == 3


def test_cpu_stages_share_the_cpus_between_the_jobs_they_run_at_once(tmp_path, monkeypatch, ray_session):
    """On CPUs, expert actors, pretraining runs and phase workers each ask for an equal share of the cluster's
    CPUs (at most one node's, at least one) and take as many torch threads: two phases on an 8-CPU machine used
    to compute on 2 of its cores, one phase left to resume on 1. GPU workers keep one CPU."""
    import ray

    from ptmst_ray.orchestration import experts, phases, pipeline, runtime

    info = runtime.ClusterInfo(cpus=8, gpus=0, nodes=1, node_cpus=8)
    assert [info.cpu_share(j) for j in (1, 2, 3, 4, 8, 20)] == [8, 4, 2, 2, 1, 1]
    two_nodes = runtime.ClusterInfo(cpus=8, gpus=0, nodes=2, node_cpus=4)  # a worker lives on one node
    assert [two_nodes.cpu_share(j) for j in (1, 2, 3)] == [4, 4, 2]
    assert runtime.ClusterInfo(cpus=2, gpus=0, nodes=1).cpu_share(1) == 2  # node size unknown: no cap

    for module in (experts, pipeline, phases):
        monkeypatch.setattr(module, "cluster_info", lambda: info)
    cpu = tiny_config(tmp_path, **{"run.accelerator": "cpu"})
    assert experts._actor_options(cpu, 3)["num_cpus"] == 2
    assert [pipeline.pretrain_run_options(cpu, n)["num_cpus"] for n in (1, 2)] == [8, 4]
    trainer = phases.make_trainer(cpu.to_dict(), "phase_0", {}, 0, "run", cpus=4)
    assert trainer.scaling_config.resources_per_worker["CPU"] == 4 and trainer.train_loop_config["threads"] == 4
    fixed = cpu.replace(**{"run.threads_per_worker": 1})  # the setting wins over the share
    assert phases.make_trainer(fixed.to_dict(), "phase_0", {}, 0, "run", cpus=4).train_loop_config["threads"] == 1
    gpu = tiny_config(tmp_path, **{"run.accelerator": "gpu"})
    assert phases.make_trainer(gpu.to_dict(), "phase_0", {}, 0, "run", cpus=4).scaling_config.resources_per_worker["CPU"] == 1
    assert pipeline.pretrain_run_options(gpu, 1)["num_cpus"] == 1

    submitted: list[int] = []

    class Launcher:  # fit_phase as run_phases calls it, without starting a Train run
        def options(self, **kw):
            return self

        def remote(self, cfg_dict, name, phase, seed, run_name, board, cpus, memory):
            assert memory == phases.phase_memory(cpu)  # sized by the driver: the launcher imports no torch
            submitted.append(cpus)
            return ray.put({"name": name, "status": "finished"})

    monkeypatch.setattr(phases, "fit_phase", Launcher())
    monkeypatch.setattr(phases, "ensure_train_state_actor", lambda: None)
    phases.run_phases(cpu, with_baseline=False)  # two phases at once: half the CPUs each
    phases.run_phases(cpu.replace(**{"distill.max_concurrent": 1}), with_baseline=False)  # in turn: all of them
    assert submitted == [4, 4, 8, 8]


def test_worker_threads_follow_what_ray_gave_the_worker(ray_session):
    """A worker on a logical GPU without CUDA computes on its CPU share (1 thread for 1 CPU: two expert actors
    with 2 threads each on 2 cores ran 2.6x slower), a CPU worker gets its CPUs, the setting wins."""
    import ray
    import torch

    from ptmst_ray.orchestration.runtime import worker_threads

    @ray.remote
    def threads(setting: int) -> int:
        return worker_threads(setting)

    assert not torch.cuda.is_available()  # the session's GPUs are logical ones
    assert ray.get(threads.options(num_cpus=1, num_gpus=1).remote(0)) == 1
    assert ray.get(threads.options(num_cpus=2).remote(0)) == 2
    assert ray.get(threads.options(num_cpus=1, num_gpus=1).remote(3)) == 3


def test_more_threads_than_a_cpu_workers_share_are_named(ray_session):
    """run.threads_per_worker above the CPUs a worker computing on its CPUs was given oversubscribes the cores
    (the toy's phases 5-6x slower side by side): the worker warns, naming the setting; within its share, not."""
    import ray

    from ptmst_ray.orchestration.runtime import check_threads

    @ray.remote
    def check(threads: int) -> str | None:
        return check_threads(threads)

    warned = ray.get(check.options(num_cpus=1, num_gpus=1).remote(2))  # a logical GPU computes on the CPU
    assert "run.threads_per_worker=2" in warned and "1 CPU" in warned
    assert ray.get(check.options(num_cpus=2).remote(2)) is None
    assert ray.get(check.options(num_cpus=1).remote(1)) is None


# --------------------------------------------------------------------------- Ray's fake autoscaling cluster


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fake_autoscaler_config(gcs_port: int, gpu_workers: int = 2) -> dict:
    """The autoscaler config of the fake cluster: a CPU head (2 CPUs, the sweep's train_driver slots) and
    GPU workers of 1 CPU + 1 logical GPU that start at 0 nodes (cluster/gpu.yaml's shape, scaled down)."""
    return {
        "cluster_name": "ptmst-fake-gpu",
        "max_workers": gpu_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "train_driver": 4}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                       "max_workers": gpu_workers},
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def fake_gpu_cluster():
    """(gcs address, autoscaler config path, env) of a running fake autoscaling cluster; torn down after."""
    temp = tempfile.mkdtemp(prefix="pta", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, *node = _free_ports(9)
    config = Path(temp) / "autoscaler.json"
    config.write_text(json.dumps(fake_autoscaler_config(gcs, gpu_workers=1)))  # one node: 2 cores here
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    head = [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
            f"--autoscaling-config={config}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", "--num-cpus=2", "--num-gpus=0", '--resources={"train_driver": 4}',
            f"--temp-dir={temp}", *[f"{n}={p}" for n, p in zip(names, node)]]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(head, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"127.0.0.1:{gcs}", config, env, temp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops the head's processes
        try:
            proc.wait(timeout=2)  # nothing of it is kept: no need to wait out the head's graceful exit
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of that session (the fake GPU nodes): ours only
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


DRIVER = r'''
import json, sys, time
import ray
from ptmst_ray.config import load_config
from ptmst_ray.layout import Layout
from ptmst_ray.orchestration.pipeline import run_pipeline
from ptmst_ray import storage

address, config, out = sys.argv[1:4]
t0 = time.time()
for _ in range(60):
    try:
        ray.init(address=address, namespace="ptmst-ray", log_to_driver=False)
        break
    except Exception:
        time.sleep(1)
cfg = load_config(config, [])
first_gpu = []

import threading
def watch():
    while not first_gpu:
        if any(n["Alive"] and n["Resources"].get("GPU") for n in ray.nodes()):
            first_gpu.append(time.time() - t0)
        time.sleep(0.5)
threading.Thread(target=watch, daemon=True).start()
results = run_pipeline(cfg)
layout = Layout.of(cfg)
def attempts(folder):
    found = []
    for entry in storage.listdir(folder):
        url = storage.join(folder, entry)
        if storage.isdir(url):
            found += attempts(url)
        elif entry.endswith(".json"):
            found.append(storage.read_json(url))
    return found
nodes = {n["NodeID"]: {"gpus": n["Resources"].get("GPU", 0), "alive": n["Alive"], "ip": n["NodeManagerAddress"]}
         for n in ray.nodes()}
starts = [a["start"] for a in attempts(storage.join(layout.experts, "attempts")) + attempts(layout.phases)
          + [results["embed"]] if "start" in a]
json.dump({"accelerator": results["accelerator"], "eval_nodes": [r["node_id"] for r in results["runs"]],
           "embed_nodes": [results["embed"]["node_id"]],
           "expert_nodes": [a.get("node_id") for a in attempts(storage.join(layout.experts, "attempts"))],
           "phase_nodes": [a.get("node_id") for a in attempts(layout.phases) if "node_id" in a],
           "nodes": nodes, "head": ray.get_runtime_context().get_node_id(), "first_gpu_s": first_gpu,
           "first_gpu_task_s": min(starts) - t0 if starts else None,
           "stages": results["stages"], "wall_s": time.time() - t0}, open(out, "w"))
'''


@pytest.mark.ray
@pytest.mark.slow
def test_autoscaler_adds_gpu_nodes_and_heavy_stages_run_there(fake_gpu_cluster, tmp_path):
    address, autoscaler_config, env, temp = fake_gpu_cluster
    # small: no pretraining (random towers), 2 experts (one per GPU node), one phase, one baseline, one seed
    cfg = tiny_config(tmp_path / "run", **{"pretrain.enabled": False, "model.pretrained": None, "eval.seeds": 1,
                                           "eval.baselines": ["random"]})
    cfg = cfg.replace(phases=cfg.phases[:1])
    (tmp_path / "tiny.yaml").write_text(cfg.to_yaml())
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "out.json"
    driver_env = {**env, "PTMST_AUTOSCALER_CONFIG": str(autoscaler_config)}
    driver_env.pop("RAY_FAKE_CLUSTER")
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), address, str(tmp_path / "tiny.yaml"), str(out)],
                          env=driver_env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in Path(temp).glob("session_latest/logs/monitor.*"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:] + logs
    got = json.loads(out.read_text())
    gpu_nodes = {n for n, v in got["nodes"].items() if v["gpus"] >= 1}
    assert got["accelerator"] == "gpu"
    assert gpu_nodes and got["head"] not in gpu_nodes  # the autoscaler added GPU nodes; the head has none
    for stage in ("embed_nodes", "expert_nodes", "phase_nodes", "eval_nodes"):
        assert got[stage] and set(got[stage]) <= gpu_nodes, (stage, got)
    summary = {k: got[k] for k in ("first_gpu_s", "first_gpu_task_s", "stages", "wall_s")}
    print(json.dumps(summary))
    if os.environ.get("PTMST_BENCH_OUT"):  # bench/autoscale_fake.py: the figures for bench/RESULTS.md
        Path(os.environ["PTMST_BENCH_OUT"]).write_text(json.dumps(summary))


def test_workers_holding_an_expert_or_a_split_ask_for_that_memory(tmp_path, monkeypatch):
    """Sizes from the run's own records: a snapshot's bytes (the vector) from an expert's index; an expert actor
    holds the vector, its gradient and momentum while training and one epoch's snapshot and file bytes while storing
    it (its earlier epochs are in the store), the shortcut actor the epochs its ranges span and a shortcut (2
    snapshots) per range, a phase worker every expert's shortcut, and the workers the real data (each image once as
    uint8, a float32 embedding per caption, from the prepared manifests)."""
    from ptmst_ray import storage
    from ptmst_ray import layout
    from ptmst_ray.layout import Layout, experts_hash
    from ptmst_ray.orchestration import experts, phases, pipeline, runtime
    from ptmst_ray.stages.experts import expert_store

    monkeypatch.setattr(runtime, "_STARTED_LOCAL", [False])
    cfg = tiny_config(tmp_path, **{"run.accelerator": "gpu", "experts.num_experts": 3})
    assert experts.snapshot_nbytes(cfg) == 0 and "memory" not in experts._actor_options(cfg, 1)  # nothing known
    import torch

    snaps = [{"w": torch.zeros(10, 10), "b": torch.zeros(20)} for _ in range(cfg.experts.epochs + 1)]
    expert_store(cfg).write_expert(0, snaps, seed=0, config_hash=experts_hash(cfg))
    vector = 120 * 4
    assert experts.snapshot_nbytes(cfg) == vector
    ranges = layout.needed_ranges(cfg)  # the tiny config's: [0, 2] and [0, 3]
    assert ranges == [(0, 2), (0, 3)] and experts.compress_nbytes(cfg, ranges) == 4 * vector + 2 * 2 * vector
    for split, images, captions in (("train", 60, 120), ("test", 20, 100)):
        storage.write_manifest(Layout.of(cfg).split(split), {"images": images, "captions": captions})
    data = 80 * 3 * cfg.data.image_size ** 2 + 220 * experts.TEXT_WIDTH_BOUND * 4
    assert experts.split_nbytes(cfg) == data
    # the data, the parameters, gradients and momentum while it trains, and the epoch it stores with its bytes
    assert experts._actor_options(cfg, 1)["memory"] == data + 3 * vector + 2 * vector
    text = 220 * experts.TEXT_WIDTH_BOUND * 4  # a phase decodes only its initial images
    assert experts.split_nbytes(cfg, images=False) == text
    assert phases.phase_memory(cfg) == {"memory": text + 3 * 2 * vector}
    assert phases.phase_memory(cfg.replace(**{"shortcut.enabled": False})) == {"memory": text + 2 * vector}
    assert pipeline.score_resources(cfg)["memory"] == data
    trainer = phases.make_trainer(cfg.to_dict(), "phase_0", {}, 0, "run")
    assert trainer.scaling_config.resources_per_worker["memory"] == text + 3 * 2 * vector
    # a pretraining run holds the pretrain split's images once (nothing known before it is prepared)
    assert "memory" not in pipeline.pretrain_resources(cfg)
    storage.write_manifest(Layout.of(cfg).split("pretrain"), {"images": 50, "captions": 100})
    assert pipeline.pretrain_resources(cfg)["memory"] == 50 * 3 * cfg.data.image_size ** 2
    # a streamed train split (data.stream): its cache and buffer, not its pixels; the test images stay held
    streamed = cfg.replace(**{"data.stream": "on", "data.image_cache_mb": 1.0, "data.stream_buffer": 10})
    assert experts.split_nbytes(streamed) == 2**20 + 10 * 3 * cfg.data.image_size ** 2 + 20 * 3 * cfg.data.image_size ** 2 + text
    assert pipeline.pretrain_resources(streamed)["memory"] == 2**20 + 10 * 3 * cfg.data.image_size ** 2
