"""The Ray pipeline on tiny data: experts on actors, re-runs that skip, a phase's recall and its reports to
Train, and the checkpoints a finished Train run keeps. Elsewhere: phases as concurrent Train runs with one
logical GPU each (tests/test_dashboard.py, whose run the dashboard tests read); `ptmst-ray run` end to end,
a killed phase worker resuming from its checkpoint and a rerun that skips every stage (tests/test_launch.py,
a Ray Job on two nodes with its run root in a bucket); four interrupted and resumed drivers on a local root
(tests/test_faults.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copy_root, tiny_config
from ptmst_ray import layout
from ptmst_ray.stages import phase as phase_stage

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ready_root(tmp_path_factory, prepared_root):
    """A copy of the session's prepared root: data, pretrained towers, embeddings, experts and shortcuts."""
    return copy_root(prepared_root, tmp_path_factory.mktemp("pipeline"))


def test_experts_exist_once_and_rerun_does_nothing(ready_root, monkeypatch):
    from ptmst_ray.orchestration import experts
    from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore, sidecar_url

    cfg = tiny_config(ready_root)
    trajectories = TrajectoryStore(layout.Layout(cfg.run.root).experts)
    assert trajectories.complete_ids(layout.experts_hash(cfg), cfg.experts.epochs) == [0, 1]
    for a, b in layout.needed_ranges(cfg):
        assert ShortcutStore(layout.Layout(cfg.run.root).shortcuts).complete_ids(a, b, layout.experts_hash(cfg)) == [0, 1]
    def refuse(what: str):  # a rerun starts no worker: no expert actor (nothing to train), no shortcut actor
        def start(*args, **kwargs):
            raise AssertionError(f"a rerun with every expert and shortcut stored started {what}")
        return start

    monkeypatch.setattr(experts.ExpertActor, "options", refuse("an expert actor"))
    monkeypatch.setattr(experts, "_shortcut_actor", refuse("a shortcut actor"))
    again = experts.run_experts(cfg)
    assert again["trained"] == 0 and again["shortcuts_written"] == 0
    monkeypatch.undo()
    shortcuts = ShortcutStore(layout.Layout(cfg.run.root).shortcuts)
    a, b = layout.needed_ranges(cfg)[-1]
    for url in (sidecar_url(shortcuts.url(a, b, 1)), shortcuts.url(a, b, 1)):  # one shortcut never written
        Path(url).unlink()
    again = experts.run_experts(cfg)
    assert again["trained"] == 0 and again["shortcuts_written"] == 1
    assert shortcuts.complete_ids(a, b, layout.experts_hash(cfg)) == [0, 1]


def test_pretrain_on_a_finished_root_says_it_skipped(ready_root, tmp_path, monkeypatch):
    """`ptmst-ray pretrain` where the towers are pretrained: nothing trained, and it says so with the stored towers'
    zero-shot recall (not as if it had just pretrained them)."""
    from typer.testing import CliRunner

    from ptmst_ray import storage
    from ptmst_ray.stages import pretrain
    from ptmst_ray_cli.main import app

    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 4000)  # each message on one line
    cfg = tiny_config(ready_root)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.to_yaml())
    monkeypatch.setattr(pretrain, "pretrain_runs", lambda *a: pytest.fail("a finished root was pretrained again"))
    result = CliRunner().invoke(app, ["pretrain", "--config", str(config)])
    assert result.exit_code == 0, result.output
    stored = storage.read_manifest(layout.Layout.of(cfg).pretrain)
    assert (f"skipped (complete): pretrained towers: {cfg.model.pretrained}; zero-shot test r_mean "
            f"{stored['zero_shot']['r_mean']:.1f}") in result.output, result.output


def test_stored_experts_serve_fewer_epochs_and_are_continued_for_more(ready_root, tmp_path):
    """The experts' epochs are not part of their identity (an expert's first k epochs are the same whatever it
    trains for): a config asking for fewer epochs finds them complete, one asking for more trains only the missing
    epochs of each and stores the expert trained in one go, and the phases' identity does not change with it."""
    import torch

    from ptmst_ray.orchestration.experts import (complete_experts, compress_nbytes, shortcut_nbytes, snapshot_nbytes,
                                                 stored_epochs)
    from ptmst_ray.stages.experts import expert_store, expert_trajectory, train_and_store_expert

    cfg = tiny_config(copy_root(ready_root, tmp_path / "run", parts=("data", "pretrain", "experts")))  # 3 epochs
    store, chash = expert_store(cfg), layout.experts_hash(cfg)
    store.remove(0)  # trained again here, on this process's threads (the stored one: an actor's, other roundings)
    train_and_store_expert(cfg, 0)
    stored = store.load_expert(0, chash)
    fewer = cfg.replace(**{"experts.epochs": 2, "phases.1.range_end": 2, "phases.1.start_max": 1})
    assert layout.experts_hash(fewer) == chash and complete_experts(fewer) == [0, 1]

    more = cfg.replace(**{"experts.epochs": 5})
    assert [layout.phase_hash(more, p) for p in more.phases] == [layout.phase_hash(cfg, p) for p in cfg.phases]
    assert store.missing_ids(2, chash, 5) == [0, 1] and store.missing_ids(2, chash, 3) == []
    assert stored_epochs(more, 0) == 3 and stored_epochs(fewer, 0) == 2  # what an actor's progress starts from
    seen: list[int] = []
    train_and_store_expert(more, 0, on_epoch=lambda e, _: seen.append(e))
    assert seen == [4, 5]
    longer = store.load_expert(0, chash)
    assert len(longer) == 6 and store.missing_ids(2, chash, 5) == [1]
    assert stored_epochs(more, 0) == 5 and stored_epochs(more.replace(**{"experts.momentum": 0.9}), 1) == 0
    assert all(torch.equal(a[n], b[n]) for a, b in zip(stored, longer) for n in a)  # the stored epochs kept
    whole = expert_trajectory(more, 0)  # the same expert trained for 5 epochs in one go
    assert all(torch.equal(a[n], b[n]) for a, b in zip(whole, longer) for n in a)
    assert snapshot_nbytes(more) == store.index(0)["snapshot_nbytes"] == sum(t.numel() * 4 for t in whole[0].values())
    vector = snapshot_nbytes(more)  # a worker compressing into [1, 3] and [2, 5] holds epochs 1..5 and 2 shortcuts
    assert shortcut_nbytes(cfg) == 2 * vector and compress_nbytes(cfg, [(1, 3), (2, 5)]) == 5 * vector + 2 * 2 * vector


def test_an_expert_cut_short_continues_from_its_last_stored_epoch(ready_root, tmp_path, monkeypatch):
    """Each epoch is stored as it ends: an expert whose training stops mid-way (its actor or node lost) keeps the
    epochs before the stop (at least its starting point, epoch 0, stored before it trains), and the next call trains
    only the rest, writing no stored epoch again and reading none but the first and the last; the expert is the one
    trained in one go."""
    import torch

    from ptmst_ray.orchestration.experts import stored_epochs
    from ptmst_ray.stages.experts import expert_store, expert_trajectory, train_and_store_expert
    from ptmst_ray.trajectories import store as store_mod

    cfg = tiny_config(copy_root(ready_root, tmp_path / "run", parts=("data", "pretrain")), **{"experts.epochs": 4})
    store, chash = expert_store(cfg), layout.experts_hash(cfg)

    class Lost(Exception):
        pass

    real_write = store_mod.TrajectoryStore.write_epoch

    def lost_writing_1(self, expert_id: int, epoch: int, *args, **kwargs):
        if epoch == 1:
            raise Lost
        return real_write(self, expert_id, epoch, *args, **kwargs)
    monkeypatch.setattr(store_mod.TrajectoryStore, "write_epoch", lost_writing_1)
    with pytest.raises(Lost):
        train_and_store_expert(cfg, 1)
    monkeypatch.undo()
    assert store.complete_epochs(1, chash) == 0 and stored_epochs(cfg, 1) == 0  # its starting point alone
    first = Path(store.url(1, 0)).stat().st_mtime_ns

    def lost_at_2(epoch: int, _stats: dict) -> None:
        if epoch == 2:
            raise Lost
    with pytest.raises(Lost):
        train_and_store_expert(cfg, 1, on_epoch=lost_at_2)
    assert store.complete_epochs(1, chash) == 2 and stored_epochs(cfg, 1) == 2  # epoch 2 was stored before the stop
    assert Path(store.url(1, 0)).stat().st_mtime_ns == first  # continued from its epoch 0, not written again
    read, real = [], store_mod.TrajectoryStore._load_epoch
    monkeypatch.setattr(store_mod.TrajectoryStore, "_load_epoch",
                        lambda self, i, e, index: read.append(e) or real(self, i, e, index))
    seen: list[int] = []
    train_and_store_expert(cfg, 1, on_epoch=lambda e, _: seen.append(e))
    assert seen == [3, 4] and read == [0, 2]
    monkeypatch.undo()
    whole = expert_trajectory(cfg, 1)
    stored = store.load_expert(1, chash)
    assert len(stored) == 5 and all(torch.equal(a[n], b[n]) for a, b in zip(whole, stored) for n in a)


def test_recall_during_distillation_matches_the_saved_subset_and_changes_nothing(ready_root):
    """distill.recall_every reports the phase subset's own recall; it must not perturb the distillation."""
    import torch

    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.evaluate.protocol import Subset
    from ptmst_ray.stages.score import score_one_seed

    cfg = tiny_config(ready_root, **{"phases.0.iterations": 12, "distill.report_every": 3, "distill.recall_every": 6,
                                     "eval.epochs": 4, "eval.eval_points": 2})
    phase, reports = cfg.phases[0], {"on": [], "off": []}
    for tag, every in (("on", 6), ("off", 0)):
        run_cfg = cfg.replace(**{"distill.recall_every": every})
        out = phase_stage.distill_phase(run_cfg, f"recall_{tag}", phase, device=torch.device("cpu"), seed=3,
                                   report=lambda m, _c, t=tag: reports[t].append(m))
        assert out["status"] == "done"
    paths = layout.Layout(cfg.run.root)
    on, off = load_subset(paths.subset("recall_on")), load_subset(paths.subset("recall_off"))
    assert torch.equal(on.images, off.images) and torch.equal(on.text, off.text) and on.alpha_img == off.alpha_img
    scored = [m["iteration"] for m in reports["on"] if "recall/r_mean" in m]
    assert scored == [6, 12] and not any("recall/r_mean" in m for m in reports["off"])
    # the live figure at the last iteration is the saved subset's recall, scored independently
    sub = Subset(images=on.images.float(), text_emb=on.text.float(), similarity=on.similarity.float(),
                 lr_img=on.alpha_img, lr_txt=on.alpha_txt)
    ref = score_one_seed(cfg, "ptm_st", 0, subsets=[sub])["best"]["r_mean"]
    assert reports["on"][-1]["recall/r_mean"] == pytest.approx(ref, abs=1e-6)



def test_kmeans_init_gives_each_phase_its_slice_of_one_clustering_and_the_baseline_all(ready_root, tmp_path):
    """distill.init: kmeans through distill_phase: each phase starts from its own rows of one clustering of the whole
    budget (disjoint), the single-phase baseline from all of them, as its subset records; another run.seed draws
    another clustering."""
    import torch

    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.distill.synthetic import kmeans_init_indices
    from ptmst_ray.stages.embed import load_real
    from ptmst_ray.vocab import SINGLE_PHASE

    cfg = tiny_config(ready_root, **{"distill.init": "kmeans", "phases.0.iterations": 1, "phases.1.iterations": 1,
                                     "eval.baselines": ["single_phase"]})
    cfg = cfg.replace(**{"run.root": str(tmp_path / "run"), "run.shared_root": str(ready_root)})  # phases apart
    assert layout.phase_hash(cfg, cfg.phases[0]) != layout.phase_hash(cfg.replace(**{"distill.init": "real"}),
                                                                         cfg.phases[0])
    text = load_real(cfg, whole_train=False).train_text
    rows = {}
    for job in layout.phase_jobs(cfg):
        assert phase_stage.distill_phase(cfg, job.name, job.phase, device=torch.device("cpu"),
                                         seed=job.seed)["status"] == "done"
        rows[job.name] = load_subset(layout.Layout(cfg.run.root).subset(job.name)).meta["init_indices"]
    total = cfg.total_pairs
    assert rows["phase0"] == kmeans_init_indices(text, total, 0, 6, cfg.run.seed).tolist()
    assert rows["phase1"] == kmeans_init_indices(text, total, 6, 8, cfg.run.seed).tolist()
    assert not set(rows["phase0"]) & set(rows["phase1"])
    assert sorted(rows["phase0"] + rows["phase1"]) == rows[SINGLE_PHASE] and len(rows[SINGLE_PHASE]) == total
    other = phase_stage.init_rows(cfg.replace(**{"run.seed": 1}), SINGLE_PHASE, layout.single_phase_config(cfg), text)
    assert other.tolist() != rows[SINGLE_PHASE]


def test_step_sizes_set_by_the_experts_learning_rate_are_the_run_with_those_values_fixed(ready_root):
    """distill.rel_alpha / rel_min_alpha (configs/scenes.yaml's rule) distil bit for bit the phase whose
    alpha_init and min_alpha are the products written out."""
    import torch

    from ptmst_ray.distill.export import load_subset

    cfg = tiny_config(ready_root, **{"phases.0.iterations": 4, "distill.lr_lr": 1e-3})
    lr = cfg.experts.lr_img
    assert cfg.experts.lr_txt == lr  # one fixed alpha_init can then express the rule's two starts
    ruled = cfg.replace(**{"distill.rel_alpha": 0.5, "distill.rel_min_alpha": 0.2, "distill.min_alpha": None})
    fixed = cfg.replace(**{"distill.alpha_init": 0.5 * lr, "distill.min_alpha": 0.2 * 0.5 * lr})
    subsets = {}
    for name, run_cfg in (("alpha_ruled", ruled), ("alpha_fixed", fixed)):
        assert phase_stage.distill_phase(run_cfg, name, run_cfg.phases[0], device=torch.device("cpu"),
                                         seed=3)["status"] == "done"
        subsets[name] = load_subset(layout.Layout(cfg.run.root).subset(name))
    a, b = subsets.values()
    assert torch.equal(a.images, b.images) and torch.equal(a.text, b.text)
    assert (a.alpha_img, a.alpha_txt) == (b.alpha_img, b.alpha_txt) and a.alpha_img != 0.5 * lr  # they were learned

def test_phase_worker_reports_to_train_only_with_its_checkpoints(ready_root, monkeypatch):
    """Ray Train 2.60 takes one report per worker per controller poll (2 s) and blocks the next one until
    then (bench/RESULTS.md "Ray Train's report"), so a report per iteration paced a phase at 2 s an
    iteration. The worker function (called here without Train) passes Train only its checkpoints; every
    iteration still reaches metrics.json."""
    import ray.train

    from ptmst_ray.orchestration import phases

    calls: list[tuple[float, bool]] = []
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: calls.append(
        (metrics["iteration"], checkpoint is not None)))
    cfg = tiny_config(ready_root, **{"phases.0.iterations": 7, "distill.checkpoint_every": 3, "distill.report_every": 1})
    phases.phase_train_func({"cfg": cfg.to_dict(), "name": "report_probe", "phase": cfg.to_dict()["phases"][0],
                             "seed": 0, "threads": 1})
    assert calls == [(3.0, True), (6.0, True), (7.0, True)]  # every 3rd and the last (a resume point)
    history = json.loads((Path(cfg.run.root) / "phases" / "report_probe" / "metrics.json").read_text())
    assert [m["iteration"] for m in history] == [1, 2, 3, 4, 5, 6, 7]


def test_a_worker_resuming_past_trains_checkpoint_registers_the_stored_one(ready_root, monkeypatch):
    """A worker killed after uploading checkpoints but before Train registered them is restarted with an older
    checkpoint; it resumes from the furthest intact folder on storage and registers that folder with Train (no
    copy), so that Train's retention and the clean-up after fit() hold the real resume point. Seen in a suite: a
    kill after the phase's last upload left Train holding iterations 4 and 6 while 8 and 10 stayed beside them."""
    import shutil

    import ray.train

    from ptmst_ray.orchestration import phases

    cfg = tiny_config(ready_root, **{"phases.0.iterations": 6, "distill.checkpoint_every": 2})
    run_dir = Path(layout.Layout.of(cfg).train_run("probe-run"))
    folders: dict[int, Path] = {}

    def upload(metrics, checkpoint=None):  # what Train's report does with a checkpoint: a folder in the run
        if checkpoint is not None:
            folders[int(metrics["iteration"])] = dst = run_dir / f"checkpoint_2000-01-01_00-00-0{len(folders)}.000000"
            shutil.copytree(checkpoint.path, dst)

    def work(given: int | None) -> list[tuple[str, float]]:
        registered: list[tuple[str, float]] = []
        monkeypatch.setattr(ray.train, "get_checkpoint",
                            lambda: None if given is None else ray.train.Checkpoint.from_directory(folders[given]))
        monkeypatch.setattr(phases, "register_stored_checkpoint",
                            lambda folder, metrics: registered.append((folder, metrics["iteration"])))
        phases.phase_train_func({"cfg": cfg.to_dict(), "name": "resume_probe", "phase": cfg.to_dict()["phases"][0],
                                 "seed": 0, "threads": 1, "run_name": "probe-run"})
        return registered

    run_dir.mkdir(parents=True)
    monkeypatch.setattr(ray.train, "report", upload)
    assert work(given=None) == [] and sorted(folders) == [2, 4, 6]
    subset = layout.Layout.of(cfg).subset("resume_probe")
    first = {p.name: p.read_bytes() for p in Path(subset).iterdir()}
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: pytest.fail("reported again"))
    assert work(given=2) == [(folders[6].name, 6.0)]  # Train handed out 2; 4 and 6 were never registered
    assert {p.name: p.read_bytes() for p in Path(subset).iterdir()} == first
    assert work(given=6) == []  # Train's checkpoint is the furthest: nothing to register


def test_finished_run_keeps_only_the_checkpoints_train_holds(tmp_path, ray_session, monkeypatch):
    """A state Train never registered (a resume point taken from storage) or a cut upload is deleted after
    fit(); a stored state further than every registered one is kept; Train's own checkpoints stay."""
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig

    from ptmst_ray import tensorio
    from ptmst_ray.orchestration.phases import (HEALTH_CHECK_S, HEALTH_CHECK_VAR, PhaseTrainer, fit_and_prune,
                                                latest_stored_state)

    def reporting_train_func(config: dict) -> None:  # local: pickled by value (workers cannot import tests)
        import tempfile

        import ray.train

        if config.get("register"):
            from ptmst_ray.orchestration.phases import register_stored_checkpoint

            register_stored_checkpoint(config["register"], {"iteration": 99})
        for it in config["iterations"]:
            d = tempfile.mkdtemp()
            tensorio.save_state(d, {"iteration": it, "x": torch.full((2,), float(it))})
            ray.train.report({"iteration": it}, checkpoint=ray.train.Checkpoint.from_directory(d))

    run_dir = tmp_path / "phases" / "phase0-abc"
    orphan, further, partial = (run_dir / f"checkpoint_2000-01-01_00-00-0{i}.000000" for i in range(3))
    tensorio.save_state(str(orphan), {"iteration": 15, "x": torch.zeros(2)})
    tensorio.save_state(str(further), {"iteration": 99, "x": torch.zeros(2)})
    partial.mkdir()
    (partial / "tensors.safetensors").write_bytes(b"cut")
    def trainer(iterations, register=None):  # the phases' trainer, polled as theirs are
        monkeypatch.setenv(HEALTH_CHECK_VAR, HEALTH_CHECK_S)
        return PhaseTrainer(reporting_train_func, train_loop_config={"iterations": iterations, "register": register},
                            scaling_config=ScalingConfig(num_workers=1),
                            run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))

    result = fit_and_prune(trainer([10, 20, 30]), str(run_dir))
    held = sorted(Path(c.path).name for c, _ in result.best_checkpoints)
    left = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(held) == 2 and left == sorted(held + [further.name]), (held, left)
    assert sorted(tensorio.load_state(str(run_dir / n))[0]["iteration"] for n in held) == [20, 30]
    assert latest_stored_state(str(run_dir))["iteration"] == 99
    # the same run again (a restarted worker, a rerun): Train restores from its snapshot, which requires
    # every checkpoint it tracks to exist; the worker resumes from the stored 99 and registers that folder
    # in place (register_stored_checkpoint), reports 100, and Train keeps its newest two: 99 and 100
    again = fit_and_prune(trainer([100], register=further.name), str(run_dir))
    held = sorted(Path(c.path).name for c, _ in again.best_checkpoints)
    left = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert further.name in held and left == held, (held, left)
    assert sorted(tensorio.load_state(str(run_dir / n))[0]["iteration"] for n in held) == [99, 100]


def _refuse(monkeypatch) -> None:
    """Any evaluation student started from here on fails the test (a task on CPUs, an actor on GPUs)."""
    from ptmst_ray.orchestration import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("an evaluation of stored scores started a student")

    monkeypatch.setattr(pipeline._score_task, "options", refuse)
    monkeypatch.setattr(pipeline.ScoreActor, "options", refuse)


def test_evaluation_keeps_each_score_and_reuses_it_for_the_same_inputs(ready_root, tmp_path, monkeypatch,
                                                                       ray_session):
    """`evaluate` stores every (method, seed) score as its student ends; on the session's 2 logical GPUs the 3
    students run on 2 actors, one process per GPU. An evaluation of the same inputs reuses the scores and starts
    no student, one with a seed more computes only that seed, one with other settings computes afresh."""
    from ray.util.state import list_actors

    from ptmst_ray import storage
    from ptmst_ray.orchestration import pipeline

    root = copy_root(ready_root, tmp_path / "run", parts=("data", "pretrain"))
    cfg = tiny_config(root, **{"eval.seeds": 3, "eval.epochs": 1, "eval.eval_points": 1})

    def score_actors() -> set[str]:  # the GCS's actor table (task events may be lost when an actor is killed)
        return {a.actor_id for a in list_actors(address=ray_session.dashboard_url, limit=10_000,
                                                filters=[("class_name", "=", "ScoreActor")])}

    before = score_actors()
    first = pipeline.evaluate(cfg, ["random"], None, None)
    assert [r.get("reused") for r in first["runs"]] == [None, None, None]
    assert [storage.exists(layout.Layout.of(cfg).score("random", s)) for s in (0, 1, 2)] == [True, True, True]
    assert all(len(r["gpu_ids"]) == 1 for r in first["runs"]), first["runs"]
    assert len(score_actors() - before) == 2

    _refuse(monkeypatch)
    again = pipeline.evaluate(cfg, ["random"], None, None)
    monkeypatch.undo()
    assert [r["reused"] for r in again["runs"]] == [True, True, True]
    assert again["methods"] == first["methods"]
    assert [r["best"] for r in again["runs"]] == [r["best"] for r in first["runs"]]

    more = pipeline.evaluate(cfg.replace(**{"eval.seeds": 4}), ["random"], None, None)
    assert [bool(r.get("reused")) for r in more["runs"]] == [True, True, True, False]
    other = pipeline.evaluate(cfg.replace(**{"eval.epochs": 2, "eval.seeds": 1}), ["random"], None, None)
    assert [bool(r.get("reused")) for r in other["runs"]] == [False]  # seed 0 is stored, under 1 epoch

    # `ptmst-ray eval --json` (the scores stored above): its folder is made; a path it cannot write is named after the
    # table, with where the scores are kept
    from typer.testing import CliRunner

    from ptmst_ray_cli.main import app

    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 4000)  # each message on one line
    config = tmp_path / "eval.yaml"
    config.write_text(cfg.to_yaml())
    out = tmp_path / "new" / "folder" / "scores.json"
    runner = CliRunner()
    ok = runner.invoke(app, ["eval", "--config", str(config), "-m", "random", "--json", str(out)])
    # (seed 0 computed again: the score stored for it is `other`'s, of 2 epochs)
    assert ok.exit_code == 0 and json.loads(out.read_text())["methods"]["random"]["seeds"] == 3, ok.output
    out.unlink()
    out.mkdir()  # a folder where the file should go
    _refuse(monkeypatch)  # every score is stored now: no student, and no Ray joined
    monkeypatch.setattr("ptmst_ray_cli.commands.connect_ray", lambda *a, **k: pytest.fail("the command joined Ray"))
    bad = runner.invoke(app, ["eval", "--config", str(config), "-m", "random", "--json", str(out)])
    text = " ".join(bad.output.split())
    assert bad.exit_code == 1 and f"--json {out}: cannot write it" in text, text
    assert f"stored under {layout.Layout.of(cfg).eval}" in text and "Traceback" not in text, text
    # without --json: the table, and where its scores are (run's eval/results.json is not this command's to write)
    record = layout.Layout.of(cfg).results
    before = storage.exists(record) and storage.read_bytes(record)
    plain = runner.invoke(app, ["eval", "--config", str(config), "-m", "random"])
    text = " ".join(plain.output.split())
    assert plain.exit_code == 0 and "r_mean" in text, text
    assert text.endswith(f"scores stored under {layout.Layout.of(cfg).eval}/scores/; --json FILE writes this table's "
                         "results"), text
    assert (storage.exists(record) and storage.read_bytes(record)) == before
