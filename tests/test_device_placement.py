"""GPU-ready by construction, checked without a GPU (issue #20 item 6): an expert's training, a matching
iteration and an evaluation student run with the configured device set to one that is not the default, and
a dispatch-level recorder sees the device of every tensor of every operator.

The configured device is torch's ``meta`` device: real operators run on it (shapes, dtypes, autograd, the
optimisers), so a tensor the code creates without ``device=`` (on the CPU, the default) and mixes with the
model's is caught exactly as CUDA would refuse it, and any heavy operator left on the CPU is seen. Meta
tensors hold no values, so the recorder answers the few reads of a value (``.item()``, a copy back to the
CPU) with a placeholder; what is checked is placement, not arithmetic (the other tests check that).
Last, the heavy Ray tasks (evaluation students, pretraining runs) ask for a GPU where the cluster has them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import tiny_config
from ptmst_ray.config import DistillConfig, ExpertsConfig, ModelConfig, PhaseConfig, SimilarityConfig

aten = torch.ops.aten
DEVICE = torch.device("meta")
HEAVY = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "linear", "matmul",
         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math", "native_layer_norm"}
"""Operators whose cost is the model's; on a GPU run they must all run on the GPU."""
DATA_SIDE = {"index", "_to_copy", "randperm", "split", "slice", "select", "view", "unbind", "lift_fresh", "detach",
             "alias", "clone", "copy_", "empty", "_unsafe_view", "squeeze", "unsqueeze", "t", "stack", "cat",
             "_local_scalar_dense"}
"""What may legitimately happen on the CPU inside a step: picking a minibatch from the CPU-held data (a
permutation, an index, reading a drawn seed) and copying it to the device, and bringing results back."""


class Placement(TorchDispatchMode):
    """Records (operator, devices of its tensor arguments) for every operator; answers value reads of meta
    tensors with placeholders (a finite float, True, 1; zeros for a copy back to the CPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # 0-dim CPU tensors (Python scalars wrapped by torch) mix with any device, on CUDA too
        devices = tuple(sorted({t.device.type for t in tensors if t.dim() > 0 or t.device.type != "cpu"}))
        self.ops.append((func.overloadpacket.__name__, devices))
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            t = args[0]
            return True if t.dtype == torch.bool else (0.5 if t.is_floating_point() else 1)
        if (func is aten._to_copy.default and args[0].device.type == "meta"
                and torch.device(kwargs.get("device") or "meta").type == "cpu"):
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)

    def mixed(self) -> list[tuple[str, tuple[str, ...]]]:
        """Operators given tensors on two devices (CUDA raises on these)."""
        return [op for op in self.ops if len(op[1]) > 1]

    def on(self, device: str) -> Counter:
        return Counter(name for name, devs in self.ops if devs == (device,))


def assert_on_device(rec: Placement, min_heavy: int, cpu_heavy_allowed: Counter | None = None,
                     data_side_only: bool = True) -> None:
    """No operator mixes devices, at least ``min_heavy`` heavy ones ran on the device and none on the CPU
    (besides ``cpu_heavy_allowed``); with ``data_side_only``, the CPU did nothing but data picking."""
    assert rec.mixed() == [], f"operators given tensors on two devices: {rec.mixed()[:5]}"
    on_device = rec.on(DEVICE.type)
    assert sum(on_device[h] for h in HEAVY) >= min_heavy, on_device.most_common(10)
    cpu = rec.on("cpu")
    heavy_on_cpu = Counter({h: cpu[h] for h in HEAVY if cpu[h]})
    assert heavy_on_cpu == (cpu_heavy_allowed or Counter()), f"heavy operators on the CPU: {heavy_on_cpu}"
    stray = {name: n for name, n in cpu.items() if name not in DATA_SIDE | HEAVY}
    assert not (data_side_only and stray), f"operators on the CPU besides picking and copying data: {stray}"


def pairs(n: int = 12, dim: int = 16, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randn(n, dim, generator=gen)


def test_recorder_catches_a_tensor_left_on_the_default_device():
    """The check can fail: a target built without device= next to device logits is reported as mixed."""
    logits = torch.zeros(4, 4, device=DEVICE)
    with Placement() as rec, pytest.raises(Exception):
        logits - torch.eye(4)  # the bug placement guards against: eye() on the default device
    assert rec.mixed() == [("sub", ("cpu", "meta"))]
    with Placement() as rec:
        torch.mm(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(AssertionError, match="heavy operators on the CPU"):
        assert_on_device(rec, min_heavy=0)


def test_expert_training_runs_on_the_configured_device():
    """train_expert: the student, every step's forward, backward and SGD update on the device; only the
    minibatch picking (CPU-held data) and the per-epoch CPU snapshot copy touch the CPU."""
    from ptmst_ray.models.student import build_student
    from ptmst_ray.trajectories.expert import batches, make_optimizer, train_epoch, train_expert

    images, text = pairs()
    cfg = ExpertsConfig(epochs=1, batch_size=4)
    with Placement() as rec:
        trajectory = train_expert(cfg, ModelConfig(), images, text, 0, device=DEVICE)
    assert len(trajectory) == 2 and all(v.device.type == "cpu" for v in trajectory[-1].values())  # stored on CPU
    assert rec.mixed() == [] and sum(rec.on("meta")[h] for h in HEAVY) > 0
    # one step, the model built outside: nothing but data picking on the CPU
    model = build_student(ModelConfig(), text_dim=text.shape[1], seed=0).to(DEVICE)
    optimizer = make_optimizer(model, cfg)
    order = batches(len(images), 4, torch.Generator().manual_seed(0))
    with Placement() as rec:
        train_epoch(model, optimizer, images, text, cfg.loss, order, DEVICE)
    assert_on_device(rec, min_heavy=3 * 4)


class MemoryTrajectories:
    """Two experts' snapshots (flat image and text vectors) on the device."""

    num_experts = 2

    def __init__(self, w_img: torch.Tensor, w_txt: torch.Tensor, epochs: int):
        gen = torch.Generator().manual_seed(1)
        self.snaps = [[(w_img + 0.01 * k * torch.randn(w_img.shape, generator=gen),
                        w_txt + 0.01 * k * torch.randn(w_txt.shape, generator=gen)) for k in range(epochs + 1)]
                      for _ in range(self.num_experts)]

    def to(self, device: torch.device) -> "MemoryTrajectories":
        self.snaps = [[(a.to(device), b.to(device)) for a, b in e] for e in self.snaps]
        return self

    def snapshot(self, expert: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.snaps[expert][k]


@pytest.mark.parametrize("method", ["first_order", "exact"])
def test_matching_iteration_runs_on_the_configured_device(method):
    """PhaseTrainer.step (teacher snapshots, N unrolled student steps, the meta-gradient, the optimiser, the
    alpha clamp and the EMA) with the student, synthetic set and trajectories on the device."""
    from ptmst_ray.distill.phase import PhaseTrainer
    from ptmst_ray.distill.synthetic import SyntheticSet
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student

    images, text = pairs()
    fs = FunctionalStudent(build_student(ModelConfig(), text_dim=text.shape[1], seed=0))
    w_img, w_txt = fs.params()
    source = MemoryTrajectories(w_img.detach(), w_txt.detach(), epochs=2).to(DEVICE)
    fs = FunctionalStudent(fs.student.to(DEVICE).train())
    phase = PhaseConfig(range_start=0, range_end=2, start_min=0, start_max=1, pairs=6, iterations=1, minibatch=3,
                        similarity=SimilarityConfig(kind="full"))
    dcfg = DistillConfig(syn_steps=3, grad_method=method, checkpoint_every=1, report_every=1)
    syn = SyntheticSet.from_real(images, text, 6, phase.similarity, 0.1, torch.Generator().manual_seed(0),
                                 device=DEVICE)
    trainer = PhaseTrainer(phase, dcfg, syn, fs.logits, source, seed=0)
    with Placement() as rec:
        trainer.step()
    assert all(t.device == DEVICE for t in syn.tensors().values())
    assert_on_device(rec, min_heavy=3 * 2)


def test_evaluation_student_trains_and_scores_on_the_configured_device(tmp_path):
    """score_one_seed(device=...): the student is put on the device, its training steps and its test
    encodings run there; the only heavy CPU operator is the final image x caption score matrix of the
    embeddings brought back (as the code intends: recall is ranked on the CPU, the student is built on the
    CPU and then moved)."""
    from ptmst_ray.stages import data as data_stage
    from ptmst_ray.stages import embed as embed_stage
    from ptmst_ray.stages.score import score_one_seed

    cfg = tiny_config(tmp_path / "run").replace(**{"pretrain.enabled": False, "model.pretrained": None,
                                                   "eval.epochs": 1, "eval.eval_points": 1, "eval.batch_size": 8})
    data_stage.prepare(cfg)
    embed_stage.embed(cfg)
    with Placement() as rec:
        out = score_one_seed(cfg, "random", 0, device=DEVICE)
    assert out["device"] == "meta"
    assert_on_device(rec, min_heavy=4, cpu_heavy_allowed=Counter({"mm": 1}), data_side_only=False)


@pytest.mark.ray
def test_heavy_tasks_ask_for_a_gpu_where_the_cluster_has_them(ray_session, tmp_path):
    """Evaluation students and pretraining runs: run.gpus_per_task GPUs on a cluster with GPUs (the
    session's has 2 logical ones), one CPU otherwise or with 0; a task so submitted is given a GPU id."""
    import ray

    from ptmst_ray.orchestration.pipeline import task_resources

    cfg = tiny_config(tmp_path)
    assert task_resources(cfg) == {"num_cpus": 1, "num_gpus": 1.0}
    assert task_resources(cfg.replace(**{"run.gpus_per_task": 0.5})) == {"num_cpus": 1, "num_gpus": 0.5}
    assert task_resources(cfg.replace(**{"run.gpus_per_task": 0})) == {"num_cpus": 1}

    @ray.remote
    def given() -> list:
        return [str(g) for g in ray.get_gpu_ids()]

    assert len(ray.get(given.options(**task_resources(cfg)).remote())) == 1


@pytest.mark.ray
def test_a_task_given_a_gpu_runs_in_a_process_of_its_own(ray_session, tmp_path):
    """A call that asks for a GPU runs in a worker that ends with it (a reused one would keep an earlier task's
    GPU memory and CUDA device); calls on CPUs share Ray's pooled workers. Ray's own remote function given GPUs
    per call reuses its worker (what ``runtime.Task`` is for); the pipeline's GPU-capable tasks are Tasks."""
    import os
    import time

    import ray

    from ptmst_ray.orchestration import pipeline
    from ptmst_ray.orchestration.runtime import Task

    def pid_and_gpus() -> tuple[int, list[str]]:
        return os.getpid(), [str(g) for g in ray.get_gpu_ids()]

    gpu = pipeline.task_resources(tiny_config(tmp_path))
    probe = Task(pid_and_gpus, num_cpus=1)
    on_gpus = [ray.get(probe.options(**gpu).remote()) for _ in range(3)]
    assert all(len(ids) == 1 for _, ids in on_gpus), on_gpus
    pids = [pid for pid, _ in on_gpus]
    assert len(set(pids)) == 3, pids

    def ended(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.time() + 60
    while not all(ended(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert all(ended(p) for p in pids), [p for p in pids if not ended(p)]

    on_cpus = [ray.get(probe.options(num_cpus=1).remote())[0] for _ in range(3)]
    assert len(set(on_cpus)) < 3, on_cpus
    plain = ray.remote(num_cpus=1)(pid_and_gpus)
    reused = [ray.get(plain.options(**gpu).remote())[0] for _ in range(3)]
    assert len(set(reused)) < 3, reused
    for name in ("_pretrain_run_task", "_embed_task", "_features_task", "_score_task"):
        assert isinstance(getattr(pipeline, name), Task), name


@pytest.mark.ray
def test_actor_queue_redoes_the_item_of_a_dead_actor_once_and_raises_other_errors(ray_session, tmp_path):
    """``runtime.ActorQueue`` (the experts' and the GPU evaluation's pools): every item is done exactly once, two
    at a time on two actors; the item whose actor died mid-call is redone by the next free actor, and the dead
    actor is back once Ray has restarted it; a restart that never comes (its node gone, no room
    elsewhere) holds nothing up: the surviving actor does the rest; an error the work raises is raised, not
    retried; a queue whose actors have all ended for good says so."""
    import concurrent.futures
    import os
    import time

    import ray

    from ptmst_ray.orchestration import pipeline
    from ptmst_ray.orchestration.runtime import ActorQueue

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
    class Worker:
        def __init__(self, hang_on_restart: bool = False):
            if hang_on_restart and (tmp_path / "died-3").exists():
                time.sleep(3600)  # a restart that does not come: pending, as on a lost node of a fixed cluster

        def ready(self) -> bool:
            return True

        def work(self, item: int) -> tuple[int, int]:
            marker = tmp_path / "died-3"
            if item == 3 and not marker.exists():  # the first attempt at item 3 dies with its process
                marker.touch()
                os._exit(1)
            if item == 99:
                raise ValueError("bad item 99")
            time.sleep(0.2)  # the two actors' calls overlap
            return item * 10, os.getpid()

    # a restart that comes: the dead actor is back in the pool, as a new process
    actors = [Worker.remote(), Worker.remote()]
    pids = [pid for _, pid in ray.get([a.work.remote(0) for a in actors])]
    queue = ActorQueue(actors, lambda actor, item: actor.work.remote(item), label=lambda i: f"item {i}")
    done = list(queue.run(range(12)))
    assert sorted(item for item, _ in done) == list(range(12)) and queue.restarts == 1, done
    assert all(value == item * 10 for item, (value, _) in done), done
    assert (tmp_path / "died-3").exists()
    new_pids = [pid for _, pid in ray.get([a.work.remote(100) for a in actors])]
    assert len(set(new_pids) - set(pids)) == 1, (pids, new_pids)  # the dead one is back, a new process
    with pytest.raises(ray.exceptions.RayTaskError, match="bad item 99"):
        list(ActorQueue(actors, lambda actor, item: actor.work.remote(item)).run([1, 99]))
    for actor in actors:
        ray.kill(actor)

    # a restart that never comes: every item done once, those after the death by the surviving actor
    (tmp_path / "died-3").unlink()
    actors = [Worker.remote(hang_on_restart=True), Worker.remote(hang_on_restart=True)]
    pids = [pid for _, pid in ray.get([a.work.remote(0) for a in actors])]
    queue = ActorQueue(actors, lambda actor, item: actor.work.remote(item), label=lambda i: f"item {i}")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a bound: waiting for the restart would never end
        done = pool.submit(lambda: list(queue.run(range(8)))).result(timeout=120)
    assert sorted(item for item, _ in done) == list(range(8)) and queue.restarts == 1, done
    order = [item for item, _ in done]
    after = {pid for item, (_, pid) in done[order.index(3):]}  # item 3 redone and every item finished after it
    assert len(after) == 1 and after <= set(pids), (pids, done)
    for actor in actors:
        ray.kill(actor)

    # actors ended for good (ray.kill): a clear error, not a wait for ever
    with pytest.raises(RuntimeError, match="ended for good; 2 item"):
        list(ActorQueue(actors, lambda actor, item: actor.work.remote(item)).run([1, 2]))
    # the evaluation's actors are restartable and can be waited on while they restart
    assert pipeline.ScoreActor._default_options.get("max_restarts") == -1
    assert callable(getattr(pipeline.ScoreActor, "ready", None))


# --------------------------------------------------------------------------- the phase worker's teachers


def _stored_experts(root, shortcut: bool):
    """A tiny config whose 3 experts (random 4-epoch trajectories of two tensors) are in its expert store,
    compressed into the shortcut ranges its phases need; returns (cfg, expert snapshots as written)."""
    from ptmst_ray.layout import experts_hash
    from ptmst_ray.stages.experts import compress_expert, expert_store

    cfg = tiny_config(root, **{"experts.num_experts": 3, "shortcut.enabled": shortcut})
    gen = torch.Generator().manual_seed(0)
    written = []
    for i in range(3):
        snaps = [{"w": torch.randn(5, 3, generator=gen), "b": torch.randn(4, generator=gen)}
                 for _ in range(cfg.experts.epochs + 1)]
        expert_store(cfg).write_expert(i, snaps, seed=i, config_hash=experts_hash(cfg))
        compress_expert(cfg, i)
        written.append(snaps)
    return cfg, written


def _split(snap: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return snap["w"].flatten(), snap["b"]


@pytest.mark.parametrize("shortcut", [True, False])
def test_phase_teachers_are_bit_identical_on_cpu_and_one_expert_at_a_time_on_the_device(tmp_path, shortcut):
    """StoredTrajectories (the phase worker's teachers): every (expert, k) snapshot equals the one built
    independently from the written expert (the shortcut formula of trajectories/shortcut.py over the
    written snapshots, or the written snapshot itself for the ablation) bit for bit on the CPU; on another
    device only the expert in use is there, the others stay in host memory (shortcuts) or unread (raw)."""
    from ptmst_ray.stages.phase import StoredTrajectories
    from ptmst_ray.trajectories.shortcut import shortcut_trajectory

    cfg, written = _stored_experts(tmp_path, shortcut)
    phase = cfg.phases[1]
    a, b = phase.range_start, phase.range_end
    source = StoredTrajectories(cfg, phase, _split, torch.device("cpu"))
    order = [(e, k) for e in (0, 2, 1, 1, 0) for k in (0, b - a, 1)]  # as the loop asks: expert by expert
    for e, k in order:
        want = shortcut_trajectory(written[e], a, b).snapshot(k) if shortcut else written[e][a + k]
        got = source.snapshot(e, k)
        assert all(torch.equal(x, y) for x, y in zip(got, _split(want))), (e, k)
        assert all(t.device.type == "cpu" for t in got)

    source = StoredTrajectories(cfg, phase, _split, DEVICE)  # a device that is not the host's
    for e, k in order:
        got = source.snapshot(e, k)
        assert all(t.device == DEVICE for t in got)
        if shortcut:  # all experts' shortcuts on the host, one expert's copy on the device
            assert all(t.device.type == "cpu" for traj in source.trajs for t in [*traj.theta_a.values(),
                                                                                  *traj.theta_b.values()])
            held = source._on_device
            assert held[0] == e and all(t.device == DEVICE for t in held[1].theta_a.values())
        else:  # nothing held: ids only, each snapshot read when asked for
            assert not any(isinstance(t, torch.Tensor) for t in source.trajs)
    with pytest.raises(IndexError, match="outside"):
        source.snapshot(0, b - a + 1)
