"""Fault injection (issue #10): killed actors, interrupted drivers, corrupt artefacts, divergence, bad
input, a full disk, and what must never be unpickled or exposed. Each test fails if work is lost,
redone needlessly, or a broken artefact is taken for a finished one.

Cost: the session's prepared root (conftest.prepared_root: data, pretrained towers, embeddings, 2 experts)
is copied by the tests that damage it; the driver-interruption test is one chain of four CLI runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import copy_root, tiny_config
from ptmst_ray import storage
from ptmst_ray import layout
from ptmst_ray.stages import data as data_stage
from ptmst_ray.stages import embed as embed_stage
from ptmst_ray.stages import experts as experts_stage
from ptmst_ray.stages import phase as phase_stage

pytestmark = [pytest.mark.faults]
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---------------------------------------------------------------- shared roots and helpers


@pytest.fixture
def prepared(prepared_root) -> Path:
    """The session's prepared tiny root (data, pretrained towers, embeddings, 2 experts, shortcuts): copy, never write."""
    return prepared_root


def copy_config(prepared: Path, root: Path, **overrides):
    """The tiny config of a copied root. Its towers are read from ``prepared``: the experts' identity
    includes the pretrained checkpoint's path, so the copied experts stay valid only this way."""
    return tiny_config(root, **{"model.pretrained": str(prepared / "pretrain" / "clip.safetensors"), **overrides})


def tree_files(d: Path) -> dict[str, float]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


def invoke(args: list[str]):
    from ptmst_ray_cli.main import app

    return runner.invoke(app, args)


def write_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / f"cfg-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(cfg.to_yaml())
    return path


CHEAP_EVAL = {"eval.baselines": [], "eval.seeds": 1}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """CLI messages on one line each (the rich console would wrap long paths at 80 columns)."""
    from ptmst_ray_cli.common import console

    monkeypatch.setattr(console, "width", 4000)


# ---------------------------------------------------------------- 0. the phase resume scan


def test_phase_resume_takes_the_furthest_intact_stored_state(tmp_path, monkeypatch):
    """A SIGKILLed phase worker can be handed an older checkpoint than one already uploaded
    (uploaded, not yet registered): the resume takes the furthest intact state on storage and
    skips a partial upload."""
    from ptmst_ray import tensorio
    from ptmst_ray.orchestration.phases import furthest_state, latest_stored_state

    run_dir = tmp_path / "phase0-abc"
    for n, it in enumerate((5, 10, 15)):
        tensorio.save_state(str(run_dir / f"checkpoint_{n:06d}"), {"iteration": it, "x": torch.full((3,), float(it))})
    (run_dir / "checkpoint_000002" / tensorio.TENSORS).write_bytes(b"partial")  # a kill mid-upload
    (run_dir / "checkpoint_tmp_000003").mkdir()  # an upload that wrote nothing yet
    (run_dir / "checkpoint_000003").mkdir()
    loaded = []
    real_load = tensorio.load_state
    monkeypatch.setattr(tensorio, "load_state", lambda d: loaded.append(Path(d).name) or real_load(d))
    stored = latest_stored_state(str(run_dir))
    assert stored["iteration"] == 10 and torch.equal(stored["x"], torch.full((3,), 10.0))
    # tensors are read from the furthest state down until one is intact: never the older ones
    assert loaded == ["checkpoint_000002", "checkpoint_000001"]
    loaded.clear()
    assert latest_stored_state(str(run_dir), above=5)["iteration"] == 10
    assert latest_stored_state(str(run_dir), above=10) is None and loaded == ["checkpoint_000002", "checkpoint_000001",
                                                                             "checkpoint_000002"]
    given = {"iteration": 5}  # what Train handed over
    assert furthest_state(given, stored) is stored and furthest_state(None, given) is given
    assert furthest_state(None, None) is None and latest_stored_state(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------- 1. an expert actor killed mid-expert


@pytest.mark.ray
def test_killed_expert_actor_redoes_its_expert_exactly_once(prepared, tmp_path, ray_session):
    import ray
    from ray.util.state import list_actors

    from ptmst_ray.orchestration.experts import run_experts
    from ptmst_ray.orchestration.runtime import progress_board
    from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore

    root = copy_root(prepared, tmp_path / "kill", parts=("data", "pretrain"))
    cfg = tiny_config(root, **{"experts.epochs": 12})
    board = progress_board()
    ray.get(board.clear.remote())
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run_experts(cfg, board)))
    worker.start()
    attempts_dir = Path(layout.Layout(cfg.run.root).expert_attempt(0, 0)).parent
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline and worker.is_alive():
        tasks = ray.get(board.snapshot.remote())
        running = {int(n.split()[1]): t["done"] for n, t in tasks.items()
                   if re.fullmatch(r"expert \d+", n) and 1 <= t["done"] < t["total"]}
        if running:  # an expert is mid-training, its epochs so far stored: kill the actor training it
            alive = {a.pid for a in list_actors(address=ray_session.dashboard_url,  # this session's Ray only
                                                filters=[("class_name", "=", "ExpertActor"), ("state", "=", "ALIVE")])}
            for expert_id, done in running.items():
                pids = {int(p.stem.split("-")[1]) for p in attempts_dir.glob(f"expert{expert_id:04d}-*.json")} & alive
                if pids:
                    victim = (pids.pop(), expert_id, done)
                    os.kill(victim[0], signal.SIGKILL)
                    break
        time.sleep(0.2)
    worker.join(timeout=300)
    assert victim is not None, "no expert was ever seen mid-training"
    assert result.get("trained") == 2 and result["actor_restarts"] >= 1, result
    chash = layout.experts_hash(cfg)
    store = TrajectoryStore(layout.Layout(cfg.run.root).experts)
    assert store.complete_ids(chash, cfg.experts.epochs) == [0, 1]
    names = {p.relative_to(root / "experts").as_posix() for p in (root / "experts").glob("expert_*/*")}
    assert names == {f"expert_{i:04d}/{name}" for i in (0, 1) for name in ["trajectory.json"] + [
        f"epoch_{e:04d}.{ext}" for e in range(cfg.experts.epochs + 1) for ext in ("safetensors", "json")]}
    # the killed expert's successor continued from the epochs its actor had stored (each stored as it ended)
    pid, expert_id, done = victim
    runs = sorted((json.loads(p.read_text()) for p in attempts_dir.glob(f"expert{expert_id:04d}-*.json")),
                  key=lambda a: a["start"])
    assert [a["pid"] for a in runs][0] == pid and len(runs) == 2, runs
    assert runs[0]["from_epoch"] == 0 and done <= runs[1]["from_epoch"] < cfg.experts.epochs, (done, runs)
    shortcuts = ShortcutStore(layout.Layout(cfg.run.root).shortcuts)
    for i in (0, 1):
        snaps = store.load_expert(i, chash)  # sha256 against the sidecar: the complete file, not a partial one
        assert len(snaps) == cfg.experts.epochs + 1
        for a, b in layout.needed_ranges(cfg):
            assert shortcuts.is_complete(a, b, i, chash)
            traj = shortcuts.load(a, b, i)  # the shortcut was made from the final file
            for name, t in traj.snapshot(b - a).items():
                assert torch.equal(t, snaps[b][name]), (i, a, b, name)


# ---------------------------------------------------------------- 3. the driver interrupted and run again


def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (everything a test's subprocess started, however deep)."""
    needle = f"PTMST_FAULT_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                pids.append(int(entry))
    return pids


def _reap(tag: str) -> list[int]:
    """Kill what this test started (only processes carrying its tag); returns what was still alive."""
    alive = _tagged_pids(tag)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process: not a zombie, and not one that exited since it was listed."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _gone(tag: str, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in _tagged_pids(tag) if _running(p)]
        if not left:
            return []
        time.sleep(0.5)
    return left


class Driver:
    """`ptmst-ray COMMAND --config X` (``run`` by default) as a subprocess with its own local Ray, tagged for
    clean-up."""

    def __init__(self, config: Path, tag: str, log: Path, command: str = "run"):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PTMST_FAULT_TAG=tag, OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "ptmst_ray_cli", command, "--config", str(config)],
                                     env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_for(self, path: Path, timeout: float = 240) -> None:
        self.wait_for_any(path.parent, path.name, timeout)

    def wait_for_any(self, folder: Path, pattern: str, timeout: float = 240) -> None:
        """Until a file matching the glob ``pattern`` is in ``folder``."""
        deadline = time.time() + timeout
        while not list(folder.glob(pattern)):
            assert self.proc.poll() is None, \
                f"the run ended before {folder / pattern} appeared:\n{self.output()[-3000:]}"
            assert time.time() < deadline, f"no {folder / pattern} in {timeout}s:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def wait_for_text(self, text: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while text not in self.output():
            assert self.proc.poll() is None and time.time() < deadline, f"no {text!r}:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_driver_resumes_without_redoing_work(prepared, tmp_path):
    """SIGINT during `ptmst-ray experts`, then `ptmst-ray run`: SIGKILL during the phase (after two of its
    checkpoints), SIGINT during evaluation; then the same command finishes. One phase: two at once are the
    dashboard's and the two-node job's tests."""
    from ptmst_ray.layout import Layout, phase_hash
    from ptmst_ray.orchestration.phases import latest_stored_state

    root = copy_root(prepared, tmp_path / "run", parts=("data", "pretrain"))
    # experts of 15 steps an epoch (batch 8): seconds each, so that the interruption lands before the 4th is stored
    cfg = tiny_config(root, **{"experts.num_experts": 4, "experts.epochs": 8, "experts.batch_size": 8,
                               "phases.0.iterations": 60, "distill.checkpoint_every": 4, **CHEAP_EVAL,
                               "eval.epochs": 20})  # C's Ctrl-C lands in it: a task's start alone is seconds
    cfg = cfg.replace(phases=cfg.phases[:1])
    config = write_config(tmp_path, cfg)
    run_dir = Layout.of(cfg).train_run(f"phase0-{phase_hash(cfg, cfg.phases[0])}")
    tag = uuid.uuid4().hex
    experts, phases = root / "experts", root / "phases"
    try:
        # A: `experts`, Ctrl-C once the first expert is stored -> exit 130, what is kept, no traceback, no Ray left
        a = Driver(config, tag, tmp_path / "a.log", command="experts")
        a.wait_for_any(experts, "expert_*/epoch_0008.json")  # its last epoch
        a.proc.send_signal(signal.SIGINT)
        assert a.finish(timeout=90) == 130, a.output()[-3000:]
        said = " ".join(a.output().split())
        assert "interrupted: finished experts and every stored epoch are kept" in said, said[-3000:]
        assert "Traceback" not in said and "Aborted!" not in said, said[-3000:]
        assert _gone(tag, 30) == [], "the interrupted driver left Ray processes behind"
        done = {d.name for d in experts.glob("expert_*") if (d / "trajectory.json").exists()
                and json.loads((d / "trajectory.json").read_text())["epochs"] == cfg.experts.epochs}
        assert done and len(done) < 4, done  # 2 actors: the 4th expert had not started
        # kept: every stored epoch, i.e. one its expert's index counts (an expert cut short is continued, not
        # retrained; a tensor file whose sidecar and count had not landed is mid-write and is written again), and
        # the finished experts' indexes
        counted = {d.name: json.loads((d / "trajectory.json").read_text())["epochs"]
                   for d in experts.glob("expert_*") if (d / "trajectory.json").exists()}
        kept = {n: t for n, t in tree_files(experts).items()
                if ((m := re.fullmatch(r"(expert_\d{4})/epoch_(\d{4})\.(json|safetensors)", n))
                    and int(m.group(2)) <= counted.get(m.group(1), -1)) or n.split("/")[0] in done}

        # B: SIGKILL once the phase has stored its checkpoint of iteration 8 -> nothing to say, but nothing lost
        b = Driver(config, tag, tmp_path / "b.log")
        deadline = time.time() + 240
        while (latest_stored_state(run_dir) or {}).get("iteration", 0) < 8:
            assert b.proc.poll() is None and time.time() < deadline, f"no checkpoint of 8:\n{b.output()[-3000:]}"
            time.sleep(0.1)
        b.proc.kill()
        b.finish(timeout=30)
        _gone(tag, 5)  # Ray's reaper normally stops a killed driver's local Ray by itself ...
        _reap(tag)  # ... and this test removes whatever it started that is still there
        assert _gone(tag, 10) == []
        after_b = tree_files(experts)
        assert {n: after_b.get(n) for n in kept} == kept, "epochs stored before the interruption were written again"
        assert not (phases / "phase0" / "subset" / storage.MANIFEST).exists(), "the phase ended before the kill"

        # C: the phase resumes from its checkpoint; Ctrl-C during evaluation (after the distilled set is written)
        c = Driver(config, tag, tmp_path / "c.log")
        c.wait_for(root / "distilled" / storage.MANIFEST)
        c.wait_for_text("evaluation (")
        c.proc.send_signal(signal.SIGINT)
        assert c.finish(timeout=90) == 130, c.output()[-3000:]
        assert not (root / "eval" / "results.json").exists(), "evaluation finished before the interruption"
        assert _gone(tag, 30) == []
        distilled = tree_files(root / "distilled")
        phase0 = tree_files(phases / "phase0" / "subset")
        phase0_attempts = sorted((phases / "phase0" / "attempts").glob("*.json"))
        resumed = [json.loads(p.read_text()).get("resumed_from") or 0 for p in phase0_attempts]
        assert max(resumed) >= 8, resumed  # C's attempt went on from B's checkpoint

        # D: the same command finishes, redoing nothing but the evaluation
        d = Driver(config, tag, tmp_path / "d.log")
        assert d.finish(timeout=300) == 0, d.output()[-3000:]
        assert "Token authentication is enabled" not in d.output()  # Ray's warning; the CLI names the token
        results = json.loads((root / "eval" / "results.json").read_text())
        assert results["experts"] == {"trained": 0, "skipped": 4, "actor_restarts": 0, "shortcuts_written": 0,
                                      "windows": []}
        assert {n: s.get("skipped") for n, s in results["phases"].items()} == {"phase0": True}
        assert tree_files(experts) == after_b
        assert tree_files(phases / "phase0" / "subset") == phase0
        assert sorted((phases / "phase0" / "attempts").glob("*.json")) == phase0_attempts
        assert tree_files(root / "distilled") == distilled
        assert results["methods"]["ptm_st"]["pairs"] == cfg.total_pairs
    finally:
        _reap(tag)


def _alive(address: str, class_names: set[str]) -> set[str]:
    """Ids of the live actors of those classes on the Ray whose dashboard is ``address``."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=10_000)
            if a.class_name in class_names}


def _reserved_groups(address: str) -> set[str]:
    from ray.util.state import list_placement_groups

    return {g.placement_group_id for g in list_placement_groups(address=address, limit=10_000) if g.state != "REMOVED"}


def _until(check, timeout: float = 30):
    """``check()`` once it is truthy, else its last (falsy) value after ``timeout`` s."""
    deadline = time.time() + timeout
    while not (value := check()) and time.time() < deadline:
        time.sleep(0.2)
    return value


@pytest.mark.ray
def test_a_wait_loop_left_by_an_exception_cancels_the_tasks_it_waits_for(ray_session):
    """`wait_all` stopped by Ctrl-C (a notebook's) and `run_all` left by an error of its callback: the tasks
    still in flight are cancelled, not left running; nothing more is submitted. A cancel that lands while Ray
    deserialises the task's arguments can fail the task with Ray's own error (seen once under load: "'Handlers'
    object is not callable" from Ray's deferred SIGINT) rather than TaskCancelledError: either way it ended."""
    import collections

    import ray
    from ray.exceptions import GetTimeoutError, RayError

    from ptmst_ray.orchestration.runtime import run_all, wait_all

    @ray.remote(num_cpus=0)
    def sleepy(seconds: float) -> float:
        end = time.time() + seconds
        while time.time() < end:  # Ray's cancel lands between two bytecodes: one long C call would not see it
            time.sleep(0.05)
        return seconds

    def ctrl_c():
        raise KeyboardInterrupt

    def stopped(ref) -> None:  # ended, not left to run its 1000 s: cancelled, or failed by Ray's cancel itself
        with pytest.raises(RayError) as ended:
            ray.get(ref, timeout=30)
        assert not isinstance(ended.value, GetTimeoutError), "the task was left running"

    refs = [sleepy.remote(1000) for _ in range(2)]
    with pytest.raises(KeyboardInterrupt):
        wait_all(refs, ctrl_c)
    for ref in refs:
        stopped(ref)

    submitted = []

    def submit(seconds):
        submitted.append(sleepy.remote(seconds))
        return submitted[-1]

    def failed(item, ref):
        raise ValueError(f"the run of {ray.get(ref)} s failed")

    with pytest.raises(ValueError, match="the run of 0 s failed"):
        run_all(collections.deque([0, 1000, 1000]), submit, 2, failed)
    assert len(submitted) == 2  # the third never started
    stopped(submitted[1])


def test_a_cli_commands_ctrl_c_leaves_its_tasks_to_the_ending_driver(monkeypatch):
    """After the CLI's own Ctrl-C (its handler set the flag) the wait loops cancel nothing: the driver ends and
    Ray with it; a library call (no flag) cancels."""
    from ptmst_ray.orchestration import runtime

    cancelled = []
    monkeypatch.setattr(runtime.ray, "cancel", lambda ref, **kw: cancelled.append(ref))
    monkeypatch.setattr(runtime.ray, "wait", lambda refs, **kw: (refs, []))
    monkeypatch.setattr(runtime, "_INTERRUPTED", threading.Event())
    runtime._INTERRUPTED.set()
    runtime.stop_tasks(["a", "b"])
    assert cancelled == []
    runtime._INTERRUPTED.clear()
    runtime.stop_tasks(["a", "b"])
    assert cancelled == ["a", "b"]


@pytest.mark.ray
@pytest.mark.slow
def test_library_calls_stopped_in_a_notebook_end_their_actors_and_train_runs(prepared, tmp_path, ray_session):
    """Ctrl-C in a notebook (KeyboardInterrupt from the calls' poll, the traceback kept as IPython keeps it):
    `run_experts` ends its expert actors; `run_phases` aborts its Train run mid-phase (its controller, worker and
    placement group go), and the same call made again resumes from the phase's checkpoint and finishes."""
    from ptmst_ray.layout import Layout, phase_hash
    from ptmst_ray.orchestration.experts import run_experts
    from ptmst_ray.orchestration.phases import latest_stored_state, run_phases

    def ctrl_c():
        raise KeyboardInterrupt

    root = copy_root(prepared, tmp_path / "run", parts=("data", "pretrain", "experts", "shortcuts"))
    cfg = copy_config(prepared, root, **{"phases.0.iterations": 60, "distill.checkpoint_every": 4})
    cfg = cfg.replace(phases=cfg.phases[:1])
    ray_ui = ray_session.dashboard_url  # this session's Ray only (the other xdist worker runs another)
    experts_before = _alive(ray_ui, {"ExpertActor"})
    with pytest.raises(KeyboardInterrupt) as kept:  # experts 2 and 3 to train: their actors start
        run_experts(cfg.replace(**{"experts.num_experts": 4}), poll=ctrl_c)
    assert _until(lambda: not _alive(ray_ui, {"ExpertActor"}) - experts_before), "expert actors left running"

    train = {"TrainController", "RayTrainWorker"}
    train_before, groups_before = _alive(ray_ui, train), _reserved_groups(ray_ui)
    run_dir = Layout.of(cfg).train_run(f"phase0-{phase_hash(cfg, cfg.phases[0])}")

    def ctrl_c_after_a_checkpoint():
        if (latest_stored_state(run_dir) or {}).get("iteration", 0) >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as kept:
        run_phases(cfg, poll=ctrl_c_after_a_checkpoint, with_baseline=False)
    assert _until(lambda: not (_alive(ray_ui, train) - train_before)), "the phase's Train run went on"
    assert _until(lambda: not (_reserved_groups(ray_ui) - groups_before)), "its placement group stays reserved"
    assert latest_stored_state(run_dir)["iteration"] < 60, "the phase went on to its end after the interruption"
    del kept

    assert run_phases(cfg, with_baseline=False)["phase0"]["status"] == "done"
    attempts = sorted((root / "phases" / "phase0" / "attempts").glob("*.json"))
    assert max(json.loads(p.read_text()).get("resumed_from") or 0 for p in attempts) >= 8


# ---------------------------------------------------------------- 4. corrupt artefacts


def _corrupt_expert(root: Path) -> Path:
    p = sorted((root / "experts" / "expert_0001").glob("epoch_*.safetensors"))[-1]  # the last epoch: checked first
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _corrupt_embeddings(root: Path) -> Path:
    (p,) = (root / "data" / "embedded").glob("*/train.safetensors")
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the manifest's hash can tell
    p.write_bytes(bytes(data))
    # the driver finds finished embeddings from their manifest and hashes none; their first reader checks the bytes
    # it reads: with an expert left to train, that is an expert actor, before any phase starts
    shutil.rmtree(root / "experts" / "expert_0001")
    return p


def _delete_shard(root: Path) -> Path:
    (p,) = (root / "data" / "train").glob("captions-*.parquet")
    p.unlink()
    return p


@pytest.mark.ray
@pytest.mark.parametrize("damage, stage", [(_corrupt_expert, "experts"), (_corrupt_embeddings, "embed"),
                                           (_delete_shard, "data")])
def test_corrupt_artefact_is_named_before_use(prepared, tmp_path, damage, stage):
    root = copy_root(prepared, tmp_path / "root")
    cfg = copy_config(prepared, root, **CHEAP_EVAL)
    damaged = damage(root)
    assert layout.owning_stage(cfg, str(damaged)) == stage
    result = invoke(["run", "--config", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 1, result.output
    assert str(damaged) in result.output and "Traceback" not in result.output, result.output
    hint = "ptmst-ray experts --rebuild" if stage == "experts" else f"ptmst-ray run --rebuild {stage}"
    assert hint in result.output, result.output
    assert not (root / "phases").exists(), "a stage after the corrupt artefact started"


def test_rebuild_removes_the_stage_and_later_ones(prepared, tmp_path):
    root = copy_root(prepared, tmp_path / "root")
    cfg = copy_config(prepared, root)
    (root / "phases" / "phase0").mkdir(parents=True)
    (root / "eval").mkdir()
    removed = layout.rebuild(cfg, "embed")
    assert {Path(p).name for p in removed} == {"embedded", "text_cache", "experts", "shortcuts", "phases", "eval"}
    assert (root / "data" / "train" / storage.MANIFEST).exists() and (root / "pretrain").exists()
    assert embed_stage.embed(cfg) and embed_stage.load_real(cfg).train_text.isfinite().all()
    shared = tiny_config(tmp_path / "other", **{"run.shared_root": str(root)})
    with pytest.raises(layout.StageError, match="shared_root"):
        layout.rebuild(shared, "experts")
    assert layout.rebuild(shared, "phases") == []


# ---------------------------------------------------------------- 4 + 5. `run --rebuild experts`, with one phase diverging


@pytest.mark.ray
@pytest.mark.slow
def test_rebuild_experts_and_a_diverged_phase(prepared, tmp_path, ray_session):
    """One full run (to save time) checks two scenarios: `run --rebuild experts` after a truncated expert
    redoes the experts and what follows, not what precedes; and a phase whose matching loss turns NaN
    stops, keeps its last finite EMA state, and is marked in the distilled set's card and results.json,
    while the other phase and the run's outputs are complete. Neither phase's Train controller outlives its run
    (Train's SIGINT handler in the launcher task kept them, ~700 MB each)."""
    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.stages.aggregate import load_distilled
    from ptmst_ray.trajectories.store import TrajectoryStore

    root = copy_root(prepared, tmp_path / "root")
    # a huge low-rank similarity scale on phase 1 only: its matching loss is NaN at iteration 2
    cfg = copy_config(prepared, root, **{"phases.1.similarity": {"kind": "lowrank", "rank": 2, "alpha": 1e15},
                                         "phases.0.iterations": 4, **CHEAP_EVAL})
    _corrupt_expert(root)
    before = {d: tree_files(root / d) for d in ("data/train", "data/test", "data/embedded", "pretrain")}
    config = write_config(tmp_path, cfg)
    assert invoke(["run", "--config", str(config), "--rebuild", "bogus"]).exit_code == 2
    result = invoke(["run", "--config", str(config), "--rebuild", "experts"])
    assert result.exit_code == 0, result.output
    assert "warning: phase1 diverged" in result.output, result.output
    said = " ".join(result.output.split())
    assert f"rebuild experts: removing {root / 'experts'}" in said and "experts: removed" not in said, said  # said once
    results = json.loads((root / "eval" / "results.json").read_text())
    # rebuild: experts redone, earlier stages untouched
    assert results["experts"]["trained"] == 2
    assert {d: tree_files(root / d) for d in before} == before
    trajectories = TrajectoryStore(layout.Layout(str(root)).experts)
    assert trajectories.complete_ids(layout.experts_hash(cfg), cfg.experts.epochs) == [0, 1]
    # divergence: phase 1 stopped and kept its last finite state; phase 0 and the outputs are complete
    assert results["phases"]["phase0"]["status"] == "done"
    assert results["phases"]["phase1"]["status"] == "diverged" and "nan" in results["phases"]["phase1"]["detail"]
    assert results["diverged_phases"] == ["phase1"]
    assert any("phase1 diverged" in w and "--rebuild phases" in w for w in results["warnings"])
    kept = load_subset(layout.Layout.of(cfg).diverged("phase1"))
    assert kept.meta["iterations"] == 1 and kept.meta["diverged"]["iteration"] == 2
    assert all(bool(t.isfinite().all()) for t in (kept.images, kept.text, kept.similarity))
    assert not storage.is_complete(layout.Layout(cfg.run.root).subset("phase1"))  # never taken for a finished one
    done = load_subset(layout.Layout(cfg.run.root).subset("phase0"))
    assert done.meta["iterations"] == cfg.phases[0].iterations
    card = json.loads((root / "distilled" / "card.json").read_text())
    assert [p["status"] for p in card["phases"]] == ["done", "diverged"]
    assert card["phases"][1]["diverged"]["iteration"] == 2
    subsets = load_distilled(str(root / "distilled"))
    assert [s.images.shape[0] for s in subsets] == [6, 8] and torch.equal(subsets[0].images, done.images.float())
    assert results["methods"]["ptm_st"]["pairs"] == 14
    from ray.util.state import list_actors

    def controllers() -> list:
        return [a for a in list_actors(address=ray_session.dashboard_url, filters=[("state", "=", "ALIVE")])
                if a.class_name == "TrainController"]

    deadline = time.monotonic() + 30
    while controllers() and time.monotonic() < deadline:
        time.sleep(1)
    assert not controllers(), "a finished phase's Train controller is still alive"


# ---------------------------------------------------------------- 6. bad configs and bad paths


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join Ray."""
    import ray

    from ptmst_ray.orchestration import runtime

    calls = []

    def refuse(*a, **k):
        calls.append((a, k))
        raise AssertionError("Ray must not start for a bad config")

    monkeypatch.setattr(runtime, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    return calls


@pytest.mark.parametrize("args, field", [
    (["--set", "distill.bogus=1"], "distill.bogus"),
    (["--set", "experts.epochs=abc"], "experts.epochs"),
    (["--set", "phases.0.pairs=-3"], "phases[0].pairs"),
    (["--config", "/nonexistent/ptmst.yaml"], "not found"),
    (["--set", "data.dataset=flickr30k", "--set", "data.annotations=/nonexistent/flickr",
      "--set", "pretrain.enabled=false"], "data.annotations"),
    (["--set", "run.root={file}/sub"], "run.root"),
])
def test_bad_config_or_path_exits_2_before_ray(tmp_path, no_ray, args, field):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, tiny_config(tmp_path / "root"))
    argv = ["run"] + ([] if "--config" in args else ["--config", str(config)])
    result = invoke(argv + [a.replace("{file}", str(blocker)) for a in args])
    assert result.exit_code == 2, result.output
    assert field in result.output and "Traceback" not in result.output, result.output
    assert no_ray == []



@pytest.mark.parametrize("method, missing", [("ptm_st", "distilled"), ("single_phase", "phases/single_phase/subset")])
def test_eval_of_a_set_no_run_made_says_so_before_any_work(tmp_path, no_ray, method, missing):
    """`eval -m ptm_st` (or single_phase) on a root without that set: exit 1 naming the folder and the command
    that makes it, before data, pretraining or a Ray (it prepared the data and pretrained the towers first, a
    minute of work, and then failed in the scoring task)."""
    root = tmp_path / "root"
    config = write_config(tmp_path, tiny_config(root))
    result = invoke(["eval", "--config", str(config), "-m", "random", "-m", method])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"{root / missing}: no" in text and "run `ptmst-ray run" in text and "--rebuild" not in text, text
    assert no_ray == [] and [p.name for p in root.iterdir()] == [], list(root.iterdir())



def test_shortcut_without_experts_says_so_before_ray(tmp_path, no_ray):
    config = write_config(tmp_path, tiny_config(tmp_path / "root"))
    result = invoke(["shortcut", "--config", str(config)])
    assert result.exit_code == 1 and "no complete experts" in result.output and "ptmst-ray experts" in result.output
    assert no_ray == [], result.output



def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_is_checked_in_seconds(monkeypatch):
    """An address whose port nothing answers, a dashboard's http address or a malformed one is named at once;
    Ray 2.60 itself waited minutes on such an address. A port that answers (a socket this test listens on) is
    left to Ray, as are "auto" and "local"."""
    import socket

    import ray

    from ptmst_ray.orchestration import runtime

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert runtime.address_problem(f"127.0.0.1:{server.getsockname()[1]}") is None
    closed = _closed_port()
    problem = runtime.address_problem(f"127.0.0.1:{closed}")
    assert f"127.0.0.1:{closed}: Connection refused" in problem and "ray status" in problem, problem
    assert "dashboard (Jobs API) address" in runtime.address_problem("http://127.0.0.1:8265")
    assert "expected host:port" in runtime.address_problem("head-node")
    assert runtime.address_problem("auto") is None and runtime.address_problem("local") is None
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(runtime.LocalRayError, match=f"cannot join the Ray cluster at 127.0.0.1:{closed}"):
        runtime.connect(f"127.0.0.1:{closed}")


def test_a_cluster_that_refuses_the_join_is_named_with_the_token_hint(tmp_path, monkeypatch):
    """A cluster that answers but refuses the join (Ray 2.60: ConnectionError "Failed to connect to Ray cluster",
    after ~20 s of retries, when the token is missing or wrong) is named with what to do about the token, not taken
    for a storage error (ConnectionError is an OSError); and a join sends the token there is (RAY_AUTH_TOKEN) when
    RAY_AUTH_MODE says nothing: Ray enables token auth by itself only for a local cluster it finds."""
    import ray
    from ray._private.authentication import authentication_token_setup

    from ptmst_ray import layout
    from ptmst_ray.orchestration import runtime

    with socket_listening() as address:
        enabled = []
        monkeypatch.setattr(authentication_token_setup, "_enable_token_auth", lambda: enabled.append(True))
        monkeypatch.setattr(ray, "is_initialized", lambda: False)

        def refused(*args, **kwargs):
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

        monkeypatch.setattr(ray, "init", refused)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
        with pytest.raises(runtime.LocalRayError) as caught:
            runtime.connect(address)
        assert enabled == [True]  # the token was to be sent
        text = str(caught.value)
        assert f"cannot join the Ray cluster at {address}" in text and "RAY_AUTH_TOKEN" in text, text
        explained = layout.explain(tiny_config(tmp_path / "root"), caught.value)
        assert "token" in explained and "free space" not in explained, explained
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice stands
        with pytest.raises(runtime.LocalRayError):
            runtime.connect(address)
        assert enabled == [True]


@contextlib.contextmanager
def socket_listening():
    """``127.0.0.1:port`` of a socket listening for the block (something answers there)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_a_command_given_a_dead_ray_address_exits_2_before_any_work(tmp_path, no_ray, monkeypatch, how):
    root = tmp_path / "root"
    config = write_config(tmp_path, tiny_config(root))
    address = f"127.0.0.1:{_closed_port()}"
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    result = invoke(["eval", "--config", str(config), "-m", "random", *(["--address", address] if how == "--address"
                                                                        else [])])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{how} {address}: cannot join a Ray cluster there: nothing answers" in text, text
    assert no_ray == [] and not (root / "data").exists()  # eval prepared data before it connected


# ---------------------------------------------------------------- 7. a full disk


class FullDisk:
    """Writing a file whose name ends with ``victim`` fails half way with ENOSPC: through storage.filesystem (every
    artefact), and through os.pwrite on a file descriptor (the caption-embedding file, written in place by rows)."""

    def __init__(self, monkeypatch, victim: str):
        self.victim, self.hits = victim, 0
        real, real_pwrite = storage.filesystem, os.pwrite

        def filesystem(url):
            fs, path = real(url)
            return (self._wrap(fs), path)

        def pwrite(fd, data, offset):
            if os.readlink(f"/proc/self/fd/{fd}").split(storage.TMP_MARK)[0].endswith(self.victim):
                self.hits += 1
                real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(storage, "filesystem", filesystem)
        monkeypatch.setattr(os, "pwrite", pwrite)

    def _wrap(self, fs):
        outer = self

        class Proxy:
            def __getattr__(self, name):
                return getattr(fs, name)

            def open(self, path, mode="rb", **kw):
                f = fs.open(path, mode, **kw)
                if "w" in mode and path.split(storage.TMP_MARK)[0].endswith(outer.victim):
                    outer.hits += 1
                    write = f.write

                    def half_then_full(data):
                        write(data[: len(data) // 2])
                        raise OSError(errno.ENOSPC, "No space left on device")

                    f.write = half_then_full
                return f

        return Proxy()


def _no_tmp_left(d: Path) -> bool:
    return not [p for p in d.rglob("*") if storage.TMP_MARK in p.name]


@pytest.mark.parametrize("victim", ["test.safetensors", "manifest.json"])
def test_disk_full_during_a_stage_marks_nothing_complete(prepared, tmp_path, monkeypatch, victim):
    root = copy_root(prepared, tmp_path / "root", parts=("data", "pretrain"))
    shutil.rmtree(root / "data" / "embedded")
    cfg = copy_config(prepared, root)
    disk = FullDisk(monkeypatch, victim)
    with pytest.raises(storage.StorageError, match=f"{victim}: cannot write \\(no space left on device\\)"):
        embed_stage.embed(cfg)
    assert disk.hits == 1
    (out,) = (root / "data" / "embedded").iterdir()
    assert not (out / storage.MANIFEST).exists() and not (out / victim).exists()
    assert _no_tmp_left(root)
    monkeypatch.undo()
    key = embed_stage.embed(cfg)  # space again: the same call finishes the stage
    assert storage.is_complete(str(out), key) and embed_stage.load_real(cfg).test_text.shape[0] > 0


def test_disk_full_in_cli_exits_1_with_clear_message(prepared, tmp_path, monkeypatch):
    root = tmp_path / "root"
    cfg = tiny_config(root)
    FullDisk(monkeypatch, "train/manifest.json")
    result = invoke(["data", "prepare", "--config", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 1, result.output
    assert "train/manifest.json: cannot write (no space left on device)" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (root / "data" / "train" / storage.MANIFEST).exists()
    assert not (root / "data" / storage.MANIFEST).exists() and _no_tmp_left(root)


def test_disk_full_while_saving_an_expert_or_subset(tmp_path, monkeypatch):
    from ptmst_ray.config import PhaseConfig
    from ptmst_ray.distill.export import load_subset, save_subset
    from ptmst_ray.trajectories.store import TrajectoryStore

    store = TrajectoryStore(str(tmp_path / "experts"))
    snaps = [{"w": torch.full((3,), float(k))} for k in range(3)]
    FullDisk(monkeypatch, "expert_0000/epoch_0001.json")
    with pytest.raises(storage.StorageError, match="no space left"):
        store.write_expert(0, snaps, seed=0, config_hash="h")
    # epoch 1's tensor file may be there, its sidecar (written after it) is not: epoch 0 alone counts
    assert store.complete_epochs(0, "h") == 0 and store.missing_ids(1, "h", 2) == [0]
    monkeypatch.undo()
    FullDisk(monkeypatch, "manifest.json")
    ema = {"images": torch.zeros(2, 3, 8, 8), "text": torch.zeros(2, 4), "alpha_img": torch.tensor(0.1),
           "alpha_txt": torch.tensor(0.1), "similarity.sim": torch.eye(2)}
    with pytest.raises(storage.StorageError, match="no space left"):
        save_subset(str(tmp_path / "subset"), ema, PhaseConfig(pairs=2, minibatch=2, range_end=2), config_hash="h")
    assert not storage.is_complete(str(tmp_path / "subset"))
    with pytest.raises(storage.StorageError, match="no manifest"):
        load_subset(str(tmp_path / "subset"))
    assert _no_tmp_left(tmp_path)


def test_an_os_error_past_the_storage_layer_says_what_to_do_for_its_cause(tmp_path):
    """A full or read-only run root asks for space or permissions; any other OSError (a reset connection, an
    object replaced mid-read on a store) asks only for the same command again: both name the file."""
    from ptmst_ray import layout

    cfg = tiny_config(tmp_path / "root")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        text = layout.explain(cfg, OSError(code, os.strerror(code), "/r/experts/e.safetensors"))
        assert text.startswith(f"/r/experts/e.safetensors: {os.strerror(code)};") and "free space" in text, text
    for error in (OSError(errno.EBUSY, "The remote file ... no longer exists.", "b/run/trajectory.json"),
                  ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")):
        text = layout.explain(cfg, error)
        assert "free space" not in text and "run the same command again" in text, text
        assert text.startswith(f"{error.filename or cfg.run.root}: {error.strerror};"), text


# ---------------------------------------------------------------- 8. no pickle from the run root; loopback only


UNSAFE = [
    (re.compile(r"\b(c?pickle|cloudpickle|dill|joblib|marshal)\.loads?\("), "unpickling"),
    (re.compile(r"\bUnpickler\("), "unpickling"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load with pickles"),
]


def _call_text(text: str, open_paren: int) -> str:
    depth = 0
    for k in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[k], 0)
        if depth == 0:
            return text[open_paren: k + 1]
    return text[open_paren:]


def test_source_never_unpickles():
    found = []
    for path in sorted([*(REPO / "ptmst_ray").rglob("*.py"), *(REPO / "cli").rglob("*.py")]):
        text = path.read_text()
        for pattern, what in UNSAFE:
            found += [f"{path.relative_to(REPO)}: {what}: {m.group(0)}" for m in pattern.finditer(text)]
        for m in re.finditer(r"(?<![\w.])torch\.load\(", text):  # not safetensors.torch.load
            call = _call_text(text, m.end() - 1)
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True: {call}")
    assert found == []


@pytest.fixture
def pickle_forbidden(monkeypatch):
    import pickle

    import numpy as np

    def forbidden(*a, **k):
        raise AssertionError("something was unpickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(mod, name, forbidden)


def test_pipeline_reads_its_run_root_without_pickle(prepared, tmp_path, pickle_forbidden):
    """Every stage function that reads the run root, in this process, with pickle/torch.load/np.load disabled."""
    from ptmst_ray import tensorio
    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.stages.aggregate import aggregate
    from ptmst_ray.stages.score import score_one_seed

    torch.set_num_threads(2)
    root = copy_root(prepared, tmp_path / "root", parts=("data", "pretrain", "experts"))
    cfg = copy_config(prepared, root, **{"phases.0.iterations": 2, "phases.1.iterations": 2, **CHEAP_EVAL})
    data_stage.prepare(cfg)
    embed_stage.embed(cfg)
    for i in range(cfg.experts.num_experts):  # reads the expert files
        assert experts_stage.compress_expert(cfg, i)
    for job in layout.phase_jobs(cfg, with_baseline=False):  # reads shortcuts + pretrained towers
        name, phase, seed = job.name, job.phase, job.seed
        saved = {}
        out = phase_stage.distill_phase(cfg, name, phase, device=torch.device("cpu"), seed=seed,
                                   save_checkpoint=lambda s: saved.update(state=s))
        assert out["status"] == "done"
        tensorio.save_state(str(tmp_path / "ckpt" / name), saved["state"])  # a phase checkpoint round trip
        assert tensorio.load_state(str(tmp_path / "ckpt" / name))[0]["iteration"] == phase.iterations
        assert load_subset(layout.Layout(cfg.run.root).subset(name)).images.shape[0] == phase.pairs
    assert aggregate(cfg)["pairs"] == cfg.total_pairs
    scored = score_one_seed(cfg, "ptm_st", 0)  # reads the distilled set
    assert scored["pairs"] == cfg.total_pairs


def _listening(port: int) -> set[str]:
    """Addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    hosts = set()
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            ip_hex, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                if width == 8:
                    hosts.add(".".join(str(b) for b in bytes.fromhex(ip_hex)[::-1]))
                else:
                    hosts.add("::" if set(ip_hex) == {"0"} else ("::1" if ip_hex == "0" * 24 + "01000000" else ip_hex))
    return hosts


@pytest.mark.ray
def test_dashboard_and_jobs_api_listen_on_loopback_only(ray_session):
    import ray._private.worker as worker

    url = worker.global_worker.node.address_info["webui_url"]  # the dashboard, which also serves the Jobs API
    host, port = url.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert _listening(int(port)) == {"127.0.0.1"}


def _listening_sockets() -> dict[str, str]:
    """inode -> "address:port" of every listening TCP socket on this machine (Linux /proc/net/tcp, tcp6)."""
    import ipaddress

    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            ip_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(ip_hex)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, host order
            out[fields[9]] = f"{ipaddress.ip_address(raw)}:{int(port_hex, 16)}"
    return out


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.ray
def test_a_local_ray_listens_on_loopback_only(ray_session):
    """A local start (laptop mode; here the test session's Ray, started by the same ``runtime.connect``) runs in
    Ray's single-machine mode: its GCS, raylet, dashboard, agents and workers listen on 127.0.0.1 and nowhere
    else (by default Ray listens on every interface)."""
    import ray

    @ray.remote(num_cpus=0)
    def hello() -> int:
        return os.getpid()

    worker = ray.get(hello.remote())
    sockets = _listening_sockets()
    held = {}
    for pid in _descendants(os.getpid()) | {os.getpid()}:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in sockets:
                held.setdefault(pid, []).append(sockets[inode])
    assert worker in _descendants(os.getpid()) and len(held) >= 3, held  # GCS, raylet, dashboard, ... and the worker
    exposed = {pid: [a for a in addresses if not _is_loopback(a)] for pid, addresses in held.items()}
    assert {pid: a for pid, a in exposed.items() if a} == {}, {
        pid: (Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:80], a) for pid, a in exposed.items() if a}


@pytest.mark.ray
def test_a_second_driver_joins_the_loopback_only_ray_by_its_loopback_address(ray_session):
    """`ptmst-ray run --address 127.0.0.1:PORT` of a local Ray (here the session's, loopback only): Ray 2.60 would
    swap 127.0.0.1 for this machine's address, where nothing listens, and retry for minutes; ``connect`` joins in
    Ray's single-machine mode instead. Only a machine with an address besides loopback can tell the two apart."""
    import ray

    from ray._common.network_utils import is_localhost, node_ip_address_from_perspective

    from ptmst_ray.orchestration.runtime import listens_on_loopback_only

    address = ray.get_runtime_context().gcs_address
    assert is_localhost(address.rsplit(":", 1)[0])
    assert listens_on_loopback_only(address) == (not is_localhost(node_ip_address_from_perspective()))
    assert not listens_on_loopback_only("10.0.0.5:6379")  # not loopback: joined as Ray does it, nothing probed
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("import ray; from ptmst_ray.orchestration.runtime import connect; "
            f"print('cpus', int(connect({address!r}).cpus)); ray.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "cpus 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


STARTUP_TIMEOUT = """
import json, logging, os, subprocess
import ray
from ray._private import node as ray_node
from ptmst_ray.orchestration import runtime


def living():  # pid -> parent of every process that is not a zombie, as ps sees them
    rows = [r.split() for r in subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat="], capture_output=True,
                                              text=True).stdout.splitlines()]
    return {int(pid): int(ppid) for pid, ppid, stat in rows if not stat.startswith("Z")}


def below_me():
    procs, found, todo = living(), set(), [os.getpid()]
    while todo:
        parent = todo.pop()
        for pid, ppid in procs.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return sorted(found)


real_init, started, fail = ray_node.Node.__init__, [], [1]


def timed_out(self, *args, **kwargs):  # a local start: Ray's processes come up, then Ray's own error
    real_init(self, *args, **kwargs)
    started.append(below_me())
    if kwargs.get("head") and fail[0] > 0:
        fail[0] -= 1
        raise Exception(TIMED_OUT)


TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed to "
             "startup or the GCS has become overloaded.")
ray_node.Node.__init__ = timed_out
logging.basicConfig(level=logging.WARNING)
cpus = runtime.connect(num_cpus=1).cpus  # once: its processes ended, started again
print(json.dumps({"cpus": cpus, "first": started[0], "alive": sorted(set(started[0]) & set(living())),
                  "second": started[1]}))
ray.shutdown()
"""

TWICE = """
import json, logging, subprocess, sys
from ptmst_ray.orchestration import runtime

TIMED_OUT = "The current node timed out during startup."
children = []


def timed_out(num_cpus, num_gpus, train_drivers):  # an attempt that leaves a process of its own, then Ray's error
    children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]).pid)
    raise Exception(TIMED_OUT)


runtime._init_local = timed_out
logging.basicConfig(level=logging.WARNING)
try:
    runtime.connect(num_cpus=1)
    error = None
except runtime.LocalRayError as e:
    error = str(e)
print(json.dumps({"error": error, "children": children, "alive": sorted(set(children) & set(runtime._processes()))}))
"""


@pytest.mark.ray
def test_a_local_ray_that_times_out_at_startup_is_ended_and_started_again(ray_session):
    """Ray 2.60 gives a local node's raylet a fixed 30 s to register (on 2 cores with other Rays starting beside
    it, not always enough) and then raises, leaving the processes it started. ``connect`` ends every one of them
    and starts Ray once more. The fault is injected into real starts: Ray's processes come up, then Ray's error."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", STARTUP_TIMEOUT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["first"]) >= 3, out  # GCS, raylet, dashboard, ... of the first start
    assert out["alive"] == [], out  # every one ended
    assert out["cpus"] == 1 and out["second"] and not set(out["second"]) & set(out["first"]), out
    assert "did not come up" in proc.stderr and "starting it again" in proc.stderr, proc.stderr[-2000:]


def test_a_local_ray_that_times_out_twice_ends_both_attempts_and_says_what_to_do():
    """A second timeout in a row ends that attempt's processes too and stops with what to do (the real processes
    of a failed start and their ending: the test above; here each attempt leaves a process of its own)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", TWICE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] and "did not come up in 2 attempts" in out["error"] and "ray stop" in out["error"], out
    assert len(out["children"]) == 2 and out["alive"] == [], out  # both attempts' processes ended
    assert "starting it again" in proc.stderr and proc.stderr.count("did not come up") == 1, proc.stderr[-2000:]


def test_a_dashboard_port_taken_at_startup_starts_the_local_ray_again(monkeypatch, caplog):
    """The port `_init_local` picked free can be taken before Ray's dashboard binds it (several Rays starting on one
    machine: a fresh-clone suite's interrupted driver exited 1 on "Failed to find a valid port for dashboard"). That
    error is handled as Ray's startup timeout: the attempt's processes are ended and Ray starts again; any other
    error is raised as it is."""
    import logging

    from ptmst_ray.orchestration import runtime

    calls = []

    def init(num_cpus, num_gpus, train_drivers):
        calls.append(num_cpus)
        if len(calls) == 1:
            raise Exception("\nThe last 20 lines of dashboard.log:\nException: Failed to find a valid port for "
                            "dashboard after 0 retries: [Errno 98] address already in use")

    monkeypatch.setattr(runtime, "_init_local", init)
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        runtime._start_local(2, 0, 2)
    assert calls == [2, 2]
    assert "took the dashboard's port" in caplog.text and "starting it again" in caplog.text

    def other(num_cpus, num_gpus, train_drivers):
        raise ValueError("something else")

    monkeypatch.setattr(runtime, "_init_local", other)
    with pytest.raises(ValueError, match="something else"):
        runtime._start_local(2, 0, 2)


@pytest.mark.ray
def test_a_local_ray_starts_train_runs_without_a_preemption_watcher(ray_session):
    """A local start (the session's Ray, by ``runtime.connect``) gives its processes RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0,
    so a Train run's controller starts no node-drain watcher actor (a one-machine Ray has no node to drain)."""
    import ray

    from ptmst_ray.orchestration.runtime import PREEMPTION_WATCHER_VAR

    @ray.remote(num_cpus=0)
    def env() -> str | None:
        return os.environ.get(PREEMPTION_WATCHER_VAR)

    assert ray.get(env.remote()) == "0"


def test_a_train_run_polls_its_worker_every_half_second_unless_the_user_chose(tmp_path, monkeypatch):
    """`make_trainer` (in the process that calls fit()) sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S to 0.5, among the
    variables Ray Train hands its controller (Train's own ``get_env_vars_to_propagate``); a value already in the
    environment is kept."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from ptmst_ray.orchestration import phases

    cfg = tiny_config(tmp_path, **{"run.accelerator": "cpu"}).to_dict()  # no cluster to ask about GPUs
    monkeypatch.delenv(phases.HEALTH_CHECK_VAR, raising=False)
    phases.make_trainer(cfg, "phase_0", {}, 0, "run")
    assert get_env_vars_to_propagate()[phases.HEALTH_CHECK_VAR] == "0.5"
    monkeypatch.setenv(phases.HEALTH_CHECK_VAR, "3")
    phases.make_trainer(cfg, "phase_0", {}, 0, "run")
    assert get_env_vars_to_propagate()[phases.HEALTH_CHECK_VAR] == "3"


def test_a_phase_runs_train_controller_loads_no_torch(tmp_path):
    """A phase's Train run is one worker with no collectives: its backend config (which Train's controller
    unpickles for its callbacks; the training function reaches it only as an object reference) must not pull torch
    into the controller, as TorchTrainer's TorchConfig did (~1.3 CPU-s and a gloo group per run). Checked in a
    fresh interpreter, against the config TorchTrainer would have carried."""
    from ray import cloudpickle
    from ray.train.torch import TorchConfig

    from ptmst_ray.orchestration import phases

    cfg = tiny_config(tmp_path, **{"run.accelerator": "cpu"}).to_dict()
    trainer = phases.make_trainer(cfg, "phase_0", {}, 0, "run")
    probe = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"

    def loads_torch(obj) -> bool:
        out = subprocess.run([sys.executable, "-c", probe], input=cloudpickle.dumps(obj), capture_output=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        return out.stdout.decode().strip() == "True"

    assert loads_torch(TorchConfig(backend="gloo"))  # the probe sees the import it looks for
    assert not loads_torch((trainer.backend_config, trainer.scaling_config, trainer.run_config))


def test_a_killed_train_controller_frees_its_placement_group_beside_another_ray(ray_session, tmp_path):
    """Ray's OOM killer (or any SIGKILL) ends a Train run's controller: Ray Train's cleaner actor must then remove
    the run's placement group, or a retried run waits forever for the CPUs it holds. The cleaner asks the State
    API with no address; with a second Ray on the machine (here: a local cluster) that fails unless the Ray that
    ``runtime.connect`` started told its processes where its dashboard is (RAY_API_SERVER_ADDRESS)."""
    import ray
    from ray.train import ScalingConfig
    from ray.util.state import list_actors

    from ptmst_ray.cluster.local import start_local_cluster
    from ptmst_ray.orchestration.phases import HEALTH_CHECK_S, HEALTH_CHECK_VAR, PhaseTrainer
    from ptmst_ray.orchestration.runtime import API_SERVER_VAR

    @ray.remote(num_cpus=0)
    def env() -> str | None:
        return os.environ.get(API_SERVER_VAR)

    assert ray.get(env.remote()) == ray_session.dashboard_url
    assert API_SERVER_VAR not in os.environ  # this process's own environment is left as it was

    def sleep_forever(config):
        Path(config["marker"]).touch()
        time.sleep(3600)

    @ray.remote(num_cpus=0)
    def fit(marker: str) -> None:  # the phases' trainer, polled as theirs are
        os.environ[HEALTH_CHECK_VAR] = HEALTH_CHECK_S
        PhaseTrainer(sleep_forever, train_loop_config={"marker": marker},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1})).fit()

    def live_groups() -> set[str]:
        return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}

    def controllers() -> dict[str, int]:
        return {a.actor_id: a.pid for a in list_actors(address=ray_session.dashboard_url,
                                                        filters=[("state", "=", "ALIVE")])
                if a.class_name == "TrainController"}

    other = start_local_cluster(num_cpus=1)
    run = None
    try:
        before, earlier, marker = live_groups(), controllers(), tmp_path / "training"
        run = fit.remote(str(marker))
        deadline = time.monotonic() + 180
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), "the Train run never started training"
        time.sleep(5)  # the controller hands its placement group to the cleaner once the worker group is up
        held = live_groups() - before
        assert held, "the Train run holds no placement group"
        ours = [pid for actor_id, pid in controllers().items() if actor_id not in earlier]
        assert len(ours) == 1, ours
        os.kill(ours[0], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while held & live_groups() and time.monotonic() < deadline:
            time.sleep(1)
        assert not held & live_groups(), "the dead controller's placement group was never removed"
    finally:
        if run is not None:
            ray.cancel(run, force=True)
        other.stop(grace_s=1.0)


def test_cluster_yaml_binds_the_dashboard_to_loopback(tmp_path):
    import yaml

    from ptmst_ray.cluster.spec import LaunchError, validate_cluster_yaml

    raw = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    validate_cluster_yaml(REPO / "cluster" / "gpu.yaml")
    raw["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in raw["head_start_ray_commands"]]
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text(yaml.safe_dump(raw))
    with pytest.raises(LaunchError, match="0.0.0.0"):
        validate_cluster_yaml(exposed)
