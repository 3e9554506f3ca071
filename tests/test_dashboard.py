"""The Ray dashboard as a user sees it, through its own REST API on the session's local cluster: the
token login (401 without it), the pipeline's actors and tasks by name, the phases' Train runs, and the
pipeline's metrics with their tags on the node's Prometheus endpoint; plus the Grafana dashboard JSON
against the metric list, and the CLI's login commands."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import copy_root, tiny_config

pytestmark = [pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "cluster" / "grafana" / "ptmst-ray.json"


def get(url: str, token: str | None, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def api(path: str, token: str) -> dict:
    from ptmst_ray.orchestration.runtime import dashboard_url

    status, body = get(dashboard_url() + path, token)
    assert status == 200, f"{path}: HTTP {status}: {body[:300]!r}"
    return json.loads(body)


def state_rows(path: str, token: str) -> list[dict]:
    """Rows of a State API listing (/api/v0/actors, /api/v0/tasks)."""
    return api(path, token)["data"]["result"]["result"]


def prometheus(port: int) -> str:
    status, body = get(f"http://127.0.0.1:{port}/metrics", None)
    assert status == 200
    return body.decode()


def samples(text: str, name: str) -> list[dict[str, str]]:
    """Label sets of every sample of metric ``name`` in Prometheus text format."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} ", line)
        if m:
            out.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))))
    return out


@pytest.fixture(scope="module")
def token(ray_session):
    from ptmst_ray.cluster.jobs import auth_token_path, read_auth_token

    path = auth_token_path()
    assert path.is_file(), f"{path}: a local start must create the token"
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
    return read_auth_token()


def test_dashboard_address_is_the_clusters_own_and_wants_the_token(ray_session, token):
    import ray

    from ptmst_ray.orchestration.runtime import dashboard_url, local_dashboards

    url = dashboard_url()
    # the address Ray itself recorded for this session (not a constant): the CLI prints this one
    assert url == "http://" + ray._private.worker.global_worker.node.webui_url
    assert ray_session.dashboard_url == url
    assert url in local_dashboards()
    assert get(url + "/api/v0/actors", None)[0] == 401
    assert get(url + "/api/v0/actors", "not-the-token")[0] in (401, 403)
    assert get(url + "/api/v0/actors", token)[0] == 200


def test_progress_board_shows_its_state(ray_session, token):
    import ray

    from ptmst_ray.orchestration.runtime import BOARD_NAME, progress_board

    board = progress_board()
    ray.get(board.update.remote("expert 3", 1, 3, "loss 0.5"))
    rows = [a for a in state_rows("/api/v0/actors?detail=1&limit=10000", token) if a.get("name") == BOARD_NAME]
    alive = [a for a in rows if a["state"] == "ALIVE"]  # boards of earlier runs in this session are listed DEAD
    assert len(alive) == 1, rows
    assert "progress" in (alive[0].get("repr_name") or "")


def test_a_stage_ends_with_its_last_progress_drawn_before_the_next_stage(ray_session):
    """A stage's last progress (an expert's final epoch) reaches the display before the next stage's header: in a
    log (a Ray Job's, CI's) each drawn change is a line, and the poll twice a second used to draw it after."""
    import ray

    from ptmst_ray.orchestration.pipeline import StageTimes
    from ptmst_ray.orchestration.runtime import ProgressBoard, make_poll, report_progress

    class Recorder:  # the UI protocol, keeping what it was asked to show, in order
        def __init__(self):
            self.shown: list = []

        def stage(self, name: str) -> None:
            self.shown.append(("stage", name))

        def update(self, tasks: dict) -> None:
            self.shown.append(("update", {n: t["done"] for n, t in tasks.items()}))

    ui, board = Recorder(), ProgressBoard.remote()  # a board of its own: the session's holds other tests' tasks
    try:
        times = StageTimes("", make_poll(board, ui))
        ui.stage("experts")
        with times.stage("experts") as out:
            report_progress(board, "expert 0", 6, 6, "loss 0.70")  # the last report; no poll after it
            out["ran"] = True
        ui.stage("phases")
    finally:
        ray.kill(board)
    assert ui.shown == [("stage", "experts"), ("update", {"expert 0": 6}), ("stage", "phases")]
    assert [(r["stage"], r["ran"]) for r in times.rows] == [("experts", True)]


class Scraper:
    """Reads the node's Prometheus endpoint every second in a thread, keeping every label set seen per
    metric: Ray's agent drops a process's metrics some seconds after the process ends (expert actors and
    Train workers end with their stage), so a user, like this test, sees them while the work runs."""

    def __init__(self, port: int):
        import threading

        self.port, self.seen, self.stop = port, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                text = prometheus(self.port)
            except Exception:  # noqa: BLE001 - the agent may be busy; next second
                text = ""
            for line in text.splitlines():
                m = re.match(r"^(ray_ptmst_\w+)\{", line)
                if m:
                    self.seen.setdefault(m.group(1), []).extend(samples(line + "\n", m.group(1)))
            self.stop.wait(1.0)

    def close(self) -> dict[str, list[dict[str, str]]]:
        self.stop.set()
        self.thread.join()
        return self.seen


RAN = {"experts.epochs": 2, "phases.1.range_end": 2, "phases.1.start_max": 1, "phases.0.iterations": 4,
       "phases.1.iterations": 4, "distill.recall_every": 4}
"""The tiny config of the `ran` fixture's run (2-epoch experts, two 4-iteration phases)."""


@pytest.fixture(scope="module")
def ran(tmp_path_factory, prepared_root, ray_session):
    """The tiny config's experts (actor pool + shortcut actor) and its two phases as concurrent Train runs, on
    a copy of the session's prepared data and towers, with the Prometheus samples seen meanwhile."""
    from ptmst_ray.orchestration.experts import run_experts
    from ptmst_ray.orchestration.phases import run_phases
    from ptmst_ray.orchestration.runtime import metrics_export_port

    root = copy_root(prepared_root, tmp_path_factory.mktemp("dash"), parts=("data", "pretrain"))
    cfg = tiny_config(root, **RAN)
    scraper = Scraper(metrics_export_port())
    try:
        experts = run_experts(cfg)
        status = run_phases(cfg, with_baseline=False)
        deadline = time.monotonic() + 60  # a bound, not a timing: the agent's last export of the ended workers
        while missing_metrics(scraper.seen) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        seen = scraper.close()
    assert experts["trained"] == 2
    assert {n: s["status"] for n, s in status.items()} == {"phase0": "done", "phase1": "done"}
    return cfg, seen


def attempts(root: str, name: str) -> list[dict]:
    d = Path(root) / "phases" / name / "attempts"
    return sorted((json.loads(p.read_text()) for p in d.glob("*.json")), key=lambda a: a["start"])


def train_runs(token: str) -> dict[str, dict]:
    """The dashboard's Train runs by name (Train V2's listing; plain /runs is Train V1's)."""
    return {r["name"]: r for r in api("/api/train/v2/runs/v1", token)["train_runs"]}


@pytest.mark.slow
def test_phases_ran_at_once_on_different_logical_gpus(ran, token):
    """The driver starts the two phases together: both launcher tasks are in the dashboard's task list, the second
    created before the first ended, and each Train run is listed. Each worker held one GPU of the session's two, a
    different one when the workers overlapped. Neither the Train runs' nor the workers' own spans need overlap: the
    cluster gives each its processes when it can (under CI's load one run's controller has started after the other
    run had ended), which is Ray's scheduling, not the driver's."""
    from ptmst_ray.layout import phase_jobs

    cfg, _ = ran
    by_name = train_runs(token)
    jobs = phase_jobs(cfg, with_baseline=False)
    deadline = time.monotonic() + 60  # a bound, not a timing: workers report task events to the GCS in batches
    while True:
        tasks = state_rows("/api/v0/tasks?detail=1&limit=10000", token)
        launchers = [max((t for t in tasks if t["name"] == f"phase {job.run_name}"),
                         key=lambda t: t["creation_time_ms"]) for job in jobs]
        if all(t["end_time_ms"] for t in launchers) or time.monotonic() > deadline:
            break
        time.sleep(1)
    l0, l1 = launchers
    assert l0["creation_time_ms"] < l1["end_time_ms"] and l1["creation_time_ms"] < l0["end_time_ms"], \
        "the driver started one phase after the other had ended: " + \
        str([(t["name"], t["creation_time_ms"], t["end_time_ms"]) for t in launchers])
    assert all(by_name[job.run_name]["status"] == "FINISHED" for job in jobs)
    (a0,), (a1,) = attempts(cfg.run.root, "phase0"), attempts(cfg.run.root, "phase1")
    assert len(a0["gpu_ids"]) == 1 and len(a1["gpu_ids"]) == 1
    if a0["start"] < a1["end"] and a1["start"] < a0["end"]:
        assert a0["gpu_ids"] != a1["gpu_ids"]


@pytest.mark.slow
def test_actors_and_tasks_carry_readable_names(ran, token):
    from ptmst_ray.layout import phase_jobs
    from ptmst_ray.orchestration.runtime import RUN_ID

    cfg, _ = ran
    actors = state_rows("/api/v0/actors?detail=1&limit=10000", token)
    names = {a["class_name"]: set() for a in actors}
    for a in actors:
        names[a["class_name"]].add(a.get("name") or "")
    assert f"shortcut-{RUN_ID}" in names["ShortcutActor"]
    assert {n for n in names["ExpertActor"] if n.endswith(RUN_ID)} == {f"expert-actor-{k}-{RUN_ID}" for k in range(2)}
    tasks = {t["name"] for t in state_rows("/api/v0/tasks?detail=1&limit=10000", token)}
    for i in range(cfg.experts.num_experts):
        assert f"expert-{i:04d}" in tasks and f"shortcut expert-{i:04d}" in tasks
    for job in phase_jobs(cfg, with_baseline=False):
        assert f"phase {job.run_name}" in tasks


@pytest.mark.slow
def test_train_runs_are_listed_by_phase_name_without_a_failed_state_actor(ran, token):
    from ptmst_ray.layout import phase_jobs

    cfg, _ = ran
    by_name = train_runs(token)
    for job in phase_jobs(cfg, with_baseline=False):
        assert job.run_name in by_name, f"{job.run_name} not among {sorted(by_name)}"
        assert by_name[job.run_name]["status"] == "FINISHED"
    failed = [t for t in state_rows("/api/v0/tasks?detail=1&limit=10000&filter_keys=state&filter_predicates=%3D"
                                    "&filter_values=FAILED", token)
              if "train_v2_state_actor" in json.dumps(t)]
    assert not failed, failed


@pytest.mark.slow
def test_phase_runs_start_no_dataset_manager(ran, ray_session, token):
    """A phase passes Train no Ray Dataset, so its Train run starts no ``DatasetManager`` actor (Train 2.60 starts
    one for every run; ``PhaseTrainer`` leaves it out): one process fewer a run. The synchronisation actors that
    the same runs' controllers create are seen, so the State API has caught up with them."""
    from conftest import finished_tasks
    from ptmst_ray.layout import phase_jobs

    cfg, _ = ran
    # the latest run of each phase's name: an earlier test of this session may have run the same tiny phases
    runs = api("/api/train/v2/runs/v1", token)["train_runs"]
    since_ms = min(max(r["start_time_ns"] for r in runs if r["name"] == job.run_name)
                   for job in phase_jobs(cfg, with_baseline=False)) / 1e6
    sync = finished_tasks(ray_session.dashboard_url, "SynchronizationActor.__init__", 2, since_ms=since_ms)
    assert len(sync) == 2, sync
    managers = finished_tasks(ray_session.dashboard_url, "DatasetManager.__init__", 0, since_ms=since_ms, timeout=0)
    assert managers == [], managers


def test_a_phase_trainer_given_a_dataset_keeps_trains_dataset_manager(ray_session):
    """The other side of the above: a ``PhaseTrainer`` given a Ray Dataset keeps Train's callback that serves it."""
    import ray.data
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from ptmst_ray.orchestration.phases import PhaseTrainer

    def has_manager(**kw) -> bool:
        return any(isinstance(c, DatasetsCallback) for c in PhaseTrainer(lambda: None, **kw)._create_default_callbacks())

    assert has_manager(datasets={"train": ray.data.range(1)}) and not has_manager()


def missing_metrics(scraped: dict[str, list[dict[str, str]]]) -> dict:
    """The pipeline metrics the `ran` fixture's run must export (per phase, per expert) that are not among the
    ``scraped`` samples: {metric: (expected tag values, seen tag values)}."""
    from ptmst_ray.orchestration import metrics

    expected = {
        metrics.MATCHING_LOSS: {"phase0", "phase1"}, metrics.ALPHA_IMG: {"phase0", "phase1"},
        metrics.ALPHA_TXT: {"phase0", "phase1"}, metrics.SEC_PER_ITER: {"phase0", "phase1"},
        metrics.PHASE_RECALL: {"phase0", "phase1"},
        metrics.EXPERT_LOSS: {"expert-0000", "expert-0001"}, metrics.EXPERT_EPOCH: {"expert-0000", "expert-0001"},
    }
    missing = {}
    for metric, values in expected.items():
        seen = {s.get(metric.tags[0]) for s in list(scraped.get(metrics.PROMETHEUS_PREFIX + metric.name, []))}
        if not values <= seen:
            missing[metric.name] = (values, seen)
    return missing


@pytest.mark.slow
def test_pipeline_metrics_reach_prometheus_with_their_tags(ran):
    cfg, scraped = ran
    missing = missing_metrics(scraped)
    assert not missing, missing
    assert all(s.get("trial") == "" for s in scraped["ray_ptmst_matching_loss"])  # not a sweep trial


def test_stage_metric_is_exported_from_the_driver(ray_session):
    from ptmst_ray.orchestration import metrics
    from ptmst_ray.orchestration.runtime import metrics_export_port

    metrics.stage_started("phases", "/tmp/dash-run")
    metrics.stage_started("eval", "/tmp/dash-run")
    deadline, found = time.monotonic() + 120, {}  # a bound, not a timing: the agent exports every few s
    while time.monotonic() < deadline:
        rows = samples(prometheus(metrics_export_port()), "ray_ptmst_stage")
        text = prometheus(metrics_export_port())
        found = {s["stage"]: line for s in rows if s.get("run") == "/tmp/dash-run"
                 for line in text.splitlines() if line.startswith("ray_ptmst_stage{") and f'stage="{s["stage"]}"' in line
                 and 'run="/tmp/dash-run"' in line}
        if {"phases", "eval"} <= set(found):
            break
        time.sleep(2)
    assert float(found["eval"].rsplit(" ", 1)[1]) == 1.0
    assert float(found["phases"].rsplit(" ", 1)[1]) == 0.0
    metrics.stage_started("", "/tmp/dash-run")


def test_grafana_dashboard_plots_every_exported_metric():
    from ptmst_ray.orchestration import metrics

    board = json.loads(GRAFANA.read_text())
    exprs = " ".join(t.get("expr", "") for p in board["panels"] for t in p.get("targets", []))
    plotted = set(re.findall(r"\bray_(ptmst_\w+)", exprs))
    assert plotted == {m.name for m in metrics.ALL}


def test_token_and_dashboard_commands(token):
    cli = [sys.executable, "-m", "ptmst_ray_cli"]
    out = subprocess.run([*cli, "token"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == token
    out = subprocess.run([*cli, "dashboard"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    from ptmst_ray.orchestration.runtime import dashboard_url

    assert out.returncode == 0 and f"dashboard: {dashboard_url()}" in out.stderr + out.stdout


def test_login_hint_names_the_token_file_or_says_there_is_none(monkeypatch, tmp_path):
    from ptmst_ray_cli.dashboard_cmd import login_hint

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert str(tmp_path / "tok") in login_hint() and "`ptmst-ray token`" in login_hint()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "RAY_AUTH_MODE=disabled" in login_hint() and str(tmp_path / "tok") not in login_hint()


def test_rays_token_enabled_warning_is_dropped_and_its_disabled_warning_kept():
    """Every local start printed Ray 2.60's warning that token authentication is enabled (the CLI says where the
    token is instead); the filter drops that warning only: Ray's warning that authentication is disabled stays.
    Ray's own warning functions are called, before and after the filter."""
    import logging

    from ray._private.authentication import authentication_token_setup as ray_auth

    from ptmst_ray.orchestration import runtime

    logger = logging.getLogger(runtime.RAY_AUTH_LOGGER)
    assert ray_auth.logger is logger
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    kept_filters, kept_level = list(logger.filters), logger.level
    for f in kept_filters:
        logger.removeFilter(f)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        ray_auth._warn_token_auth_enabled()
        ray_auth._warn_token_auth_disabled()
        assert [m.split(".")[0] for m in seen] == ["Token authentication is enabled for this Ray cluster",
                                                   "Token authentication is disabled for this Ray cluster"]
        seen.clear()
        runtime.quiet_token_auth_warning()
        runtime.quiet_token_auth_warning()
        assert len(logger.filters) == 1
        ray_auth._warn_token_auth_enabled()
        ray_auth._warn_token_auth_disabled()
        assert [m.split(".")[0] for m in seen] == ["Token authentication is disabled for this Ray cluster"]
    finally:
        logger.removeHandler(handler)
        for f in list(logger.filters):
            logger.removeFilter(f)
        for f in kept_filters:
            logger.addFilter(f)
        logger.setLevel(kept_level)


def test_run_as_job_refuses_an_address(tmp_path):
    from typer.testing import CliRunner

    from ptmst_ray_cli.main import app

    out = CliRunner().invoke(app, ["run", "--as-job", "--address", "127.0.0.1:6379", "--set", f"run.root={tmp_path}"])
    assert out.exit_code == 2 and "ptmst-ray launch --address" in " ".join(out.output.split()), out.output
    assert not any(tmp_path.iterdir()), "refused, yet it wrote to the run root"


def processes_naming(text: str) -> list[str]:
    """``pid: command line`` of the processes whose command line or environment contains ``text`` (this
    process aside): read from /proc, independently of the library's own bookkeeping."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:  # gone, or another user's
            continue
        if int(pid) != os.getpid() and (text in cmdline or text in environ):
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.mark.slow
def test_run_as_job_beside_the_sessions_ray_is_a_ray_job_with_the_runs_log(ray_session, ran, tmp_path):
    """`ptmst-ray run --as-job` while the session's Ray runs on this machine (which holds Ray's default ports,
    the job agent's 52365 among them): it starts a Ray of its own on free loopback ports, submits the run there
    as a Ray Job, follows the job's log (the results table) in the terminal, writes results.json, then stops
    that Ray: none of its processes is left, and the session's Ray still works. The run root is a copy of the
    `ran` fixture's (data, towers, experts, shortcuts, both phases done) with one evaluation seed: the job
    resumes at the aggregate (Train runs inside a Ray Job: tests/test_launch.py)."""
    import os

    import ray

    root = copy_root(ran[0].run.root, tmp_path / "run", parts=("data", "pretrain", "experts", "shortcuts", "phases"))
    cfg = tiny_config(root, **{**RAN, "eval.seeds": 1, "eval.baselines": [], "eval.epochs": 1,
                               "eval.eval_points": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "ptmst_ray_cli", "run", "--config", str(path), "--as-job"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    job_id = re.search(r"job (\S+): its log is on the dashboard's Jobs page", text).group(1)
    assert f"job {job_id}: SUCCEEDED" in text
    assert "retrieval recall" in text and "ptm_st" in text  # the results table, printed by the job's driver
    assert "dashboard: http://" in text and "CLUSTER_YAML" not in text  # a local cluster: no port-forward hint
    results = json.loads((root / "eval" / "results.json").read_text())
    assert [r["stage"] for r in results["stages"] if r["ran"]] == ["aggregate", "eval"], results["stages"]
    url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+);", text).group(1)
    assert url != ray_session.dashboard_url  # that cluster's own dashboard, not the session's
    temp = re.search(r"local Ray: 127\.0\.0\.1:\d+, logs in (\S+)", text).group(1)
    assert temp.startswith("/tmp/") and len(temp) > len("/tmp/")
    assert processes_naming(temp) == []  # the nodes, workers and the job's driver all ended
    assert not Path(temp).exists()  # Ray's logs removed after a successful run
    assert ray.get(ray.remote(num_cpus=0)(lambda: 1).remote(), timeout=120) == 1


# ---------------------------------------------------------------- the Jobs API through a connection that drops


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of the dashboard whose connections each follow the next entry of
    ``plan`` ("pass" when it runs out): "pass" forwards both ways; "lost-answer" forwards the request and
    closes the client's connection once the server has answered, without passing the answer on (the server
    did the work, the client sees RemoteDisconnected); "refuse" closes at once. ``served`` counts the
    connections by what was done with them."""

    def __init__(self, upstream: str, plan: list[str]):
        import collections
        import socket
        import threading
        from urllib.parse import urlparse

        up = urlparse(upstream)
        self.upstream, self.plan = (up.hostname, up.port), list(plan)
        self.served: collections.Counter = collections.Counter()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            mode = self.plan.pop(0) if self.plan else "pass"
            self.served[mode] += 1
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client, mode: str) -> None:
        import socket
        import threading

        if mode == "refuse":
            client.close()
            return
        server = socket.create_connection(self.upstream)

        def pipe(src, dst, first_only: bool = False) -> None:
            try:
                while data := src.recv(65536):
                    if first_only:
                        return  # the server's answer arrived: drop it and the connection
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(client, server), daemon=True).start()
        pipe(server, client, first_only=mode == "lost-answer")
        client.close()
        server.close()

    def close(self) -> None:
        self.sock.close()


def test_a_submission_whose_answer_is_lost_runs_one_job_and_a_dropped_log_poll_is_retried(tmp_path):
    """Through connections that drop: the first submission reaches the server but its answer is lost, the
    retry finds its own submission id and returns it (one job, not two); log polls that drop are retried and
    the job's log arrives whole. On a local cluster of its own (cluster/local.py): a second Ray on the machine
    beside the session's cannot take jobs on ray.init()'s fixed agent port."""
    from ptmst_ray.cluster import jobs
    from ptmst_ray.cluster.local import start_local_cluster

    cluster = start_local_cluster(num_cpus=1, num_gpus=0, prefix="ptj")
    proxy = DroppingProxy(cluster.dashboard_url, [])
    try:
        direct = jobs.job_client(cluster.dashboard_url, token=cluster.token)
        client = jobs.job_client(proxy.url, token=cluster.token)  # its version check passes
        proxy.plan.append("lost-answer")  # the submission's
        marker = f"hello-{time.time_ns()}"
        job_id = jobs.submit_once(client, f"{sys.executable} -c \"print('{marker}')\"", {}, retry_s=120, pause_s=0.5)
        assert proxy.served["lost-answer"] == 1
        assert [j.submission_id for j in direct.list_jobs()] == [job_id]  # one job: the retry did not submit a second
        proxy.plan += ["refuse", "lost-answer", "refuse"]  # the next polls drop
        seen: list[str] = []
        status = jobs.follow_logs(client, job_id, seen.append, poll_s=0.2, retry_s=30)
        assert status == "SUCCEEDED" and marker in "".join(seen), (status, seen)
        assert proxy.served["refuse"] == 2
    finally:
        proxy.close()
        cluster.stop(grace_s=1.0)


def test_follow_logs_gives_up_on_a_dashboard_gone_quiet_and_says_how_to_follow_again(ray_session, token):
    from ptmst_ray.cluster import jobs
    from ptmst_ray.cluster.spec import LaunchError
    from ptmst_ray.orchestration.runtime import dashboard_url

    proxy = DroppingProxy(dashboard_url(), [])
    try:
        client = jobs.job_client(proxy.url, token=token)  # its version check passes; then every poll is refused
        proxy.plan += ["refuse"] * 1000
        with pytest.raises(LaunchError, match=r"job raysubmit_x: the dashboard stopped answering .*"
                                              r"`ptmst-ray logs raysubmit_x --follow`"):
            jobs.follow_logs(client, "raysubmit_x", lambda text: None, poll_s=0.1, retry_s=1)
        assert proxy.served["refuse"] >= 2  # retried before giving up
    finally:
        proxy.close()


def test_cluster_status_rides_out_dropped_connections(ray_session, token):
    """`ptmst-ray status`'s call: connections that drop (a head still starting drops some) are retried and the
    status text arrives; the CI run of a two-node cluster once failed on one such drop while waiting for its
    second node."""
    from ptmst_ray.cluster import jobs
    from ptmst_ray.orchestration.runtime import dashboard_url

    proxy = DroppingProxy(dashboard_url(), [])
    try:
        client = jobs.job_client(proxy.url, token=token)  # its version check passes
        deadline = time.monotonic() + 60  # a fresh Ray reports "No cluster status" for its first seconds
        while "node_" not in jobs.cluster_status(client) and time.monotonic() < deadline:
            time.sleep(1)
        proxy.plan += ["lost-answer", "refuse", "refuse"]
        text = jobs.cluster_status(client, retry_s=30, pause_s=0.1)
        assert proxy.served["lost-answer"] == 1 and proxy.served["refuse"] == 2
        assert re.search(r"\bnode_[0-9a-f]+", text) and "CPU" in text, text[:500]
    finally:
        proxy.close()
