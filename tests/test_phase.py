"""The phase loop: exact resume, divergence handling, reporting; the subset export round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ptmst_ray.config import DistillConfig, PhaseConfig, SimilarityConfig
from ptmst_ray.distill import matching
from ptmst_ray.distill.export import image_grid_png, load_subset, nearest_captions, save_subset
from ptmst_ray.distill.phase import LR_PROBE_DRAWS, DivergenceError, PhaseTrainer
from ptmst_ray.distill.synthetic import SyntheticSet
from test_matching import D_T, DT, IMG_SHAPE, TinyStudent

N_PAIRS = 8


class FakeTrajectories:
    """num_experts random-walk trajectories of the tiny student (4 snapshots each)."""

    def __init__(self, student: TinyStudent, num_experts: int = 3, length: int = 4):
        self.num_experts = num_experts
        g = torch.Generator().manual_seed(11)
        self.snaps = []
        for e in range(num_experts):
            w = student.init(20 + e)
            walk = [w]
            for _ in range(length - 1):
                w = tuple(v + 0.05 * torch.randn(v.shape, generator=g, dtype=DT) for v in w)
                walk.append(w)
            self.snaps.append(walk)
        self.calls: list[tuple[int, int]] = []

    def snapshot(self, expert: int, k: int):
        self.calls.append((expert, k))
        return self.snaps[expert][k]


def configs(iterations: int = 6, similarity: SimilarityConfig | None = None,
            **distill) -> tuple[PhaseConfig, DistillConfig]:
    phase = PhaseConfig(range_start=0, range_end=3, start_min=0, start_max=2, pairs=N_PAIRS, iterations=iterations,
                        minibatch=4, similarity=similarity or SimilarityConfig(kind="lowrank", rank=2))
    base = dict(syn_steps=2, grad_method="exact", lr_img=1.0, lr_txt=1.0, lr_lr=1e-3, lr_sim=0.1, ema_decay=0.9,
                checkpoint_every=3, report_every=2, min_alpha=1e-4)
    base.update(distill)
    return phase, DistillConfig(**base)


def make_trainer(iterations: int = 6, saves=None, reports=None, similarity: SimilarityConfig | None = None,
                 **distill) -> PhaseTrainer:
    student = TinyStudent(dropout=0.2)
    phase_cfg, distill_cfg = configs(iterations, similarity, **distill)
    syn = SyntheticSet.from_noise(N_PAIRS, IMG_SHAPE, D_T, phase_cfg.similarity, distill_cfg.alpha_init,
                                  torch.Generator().manual_seed(5), dtype=DT)
    return PhaseTrainer(phase_cfg, distill_cfg, syn, student.logits, FakeTrajectories(student), phase=1, seed=3,
                        save_checkpoint=None if saves is None else saves.append,
                        report=None if reports is None else (lambda m, c: reports.append((m, c))))


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("derived", [{}, {"rel_lr_img": 0.02, "rel_lr_txt": 0.05, "rel_lr_lr": 0.03,
                                           "rel_lr_sim": 0.01, "ema_decay": "auto"}])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(derived):
    """Also with the settings derived at the start (relative learning rates, the auto EMA decay): a resume keeps
    the learning rates the first iteration set."""
    straight = make_trainer(**derived)
    ema_straight = straight.run()
    saves: list[dict] = []
    first = make_trainer(saves=saves, **derived)
    first.run(until=3)
    assert [s["iteration"] for s in saves] == [3]
    second = make_trainer(**derived)
    second.resume(roundtrip(saves[-1]))
    ema_resumed = second.run()
    assert second.iteration == straight.iteration == 6
    for name, value in ema_straight.items():
        assert torch.equal(value, ema_resumed[name]), name
    for (name, p), q in zip(straight.synthetic.named_parameters(), second.synthetic.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(ema_straight["images"], make_trainer().ema.shadow["images"])  # it did learn
    assert second.learning_rates() == straight.learning_rates()


def test_loop_picks_teachers_reports_and_checkpoints():
    saves, reports = [], []
    trainer = make_trainer(saves=saves, reports=reports)
    trainer.run()
    calls = trainer.trajectories.calls
    starts, targets = calls[0::2], calls[1::2]
    assert all(t == (e, k + 1) and 0 <= k <= 2 for (e, k), t in zip(starts, targets))
    assert sorted(e for e, _ in starts[:3]) == [0, 1, 2]  # each expert once per shuffled cycle
    assert [s["iteration"] for s in saves] == [3, 6]
    assert [(m["iteration"], c) for m, c in reports] == [(2, False), (3, True), (4, False), (6, True)]
    metrics = reports[-1][0]
    for key in ("loss", "loss_img", "loss_txt", "alpha_img", "alpha_txt", "grad_norm_images", "sec_per_iter",
                "peak_rss_mb"):
        assert math.isfinite(metrics[key]), key
    assert metrics["phase"] == 1


def test_non_finite_loss_stops_with_clear_error_and_keeps_finite_ema():
    saves: list[dict] = []
    trainer = make_trainer(saves=saves, lr_lr=1e300, min_alpha=None)
    with pytest.raises(DivergenceError, match=r"phase 1 diverged at iteration \d+.*alpha_init"):
        trainer.run()
    assert trainer.ema.is_finite()
    assert saves and "diverged" in saves[-1]
    assert all(torch.isfinite(v).all() for v in saves[-1]["ema"]["shadow"].values())


def test_a_step_size_turned_non_positive_is_a_divergence_unless_min_alpha_clamps_it(monkeypatch):
    """Without distill.min_alpha a learned alpha that the optimiser step takes to <= 0 stops the phase as a
    divergence at that iteration (detail naming the alpha and the field); the EMA kept is that of the
    iterations before, whose step sizes are positive. With min_alpha the same step is clamped and runs on."""
    def push_alpha_txt_below_zero(self):  # the optimiser step of iteration 3 takes alpha_txt to -0.5
        original_step()
        if self.iteration == 2:
            with torch.no_grad():
                self.synthetic.alpha_txt.fill_(-0.5)

    saves: list[dict] = []
    trainer = make_trainer(saves=saves, min_alpha=None)
    original_step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda: push_alpha_txt_below_zero(trainer))
    with pytest.raises(DivergenceError, match=r"iteration 3: the learned step size alpha_txt = -0.5 is not positive"
                                              r" \(no floor: distill.min_alpha and rel_min_alpha are unset\)"
                                              r".*distill.min_alpha"):
        trainer.run()
    assert saves[-1]["diverged"]["iteration"] == 3 and saves[-1]["iteration"] == 2
    shadow = saves[-1]["ema"]["shadow"]
    assert float(shadow["alpha_txt"]) > 0 and float(shadow["alpha_img"]) > 0

    clamped = make_trainer(min_alpha=1e-4)
    original_step = clamped.optimizer.step
    monkeypatch.setattr(clamped.optimizer, "step", lambda: push_alpha_txt_below_zero(clamped))
    clamped.run()
    assert clamped.iteration == clamped.cfg.iterations and float(clamped.synthetic.alpha_txt.detach()) >= 1e-4

    # each step size has its own floor (Config.alpha_floors: rel_min_alpha x its own start)
    floors = make_trainer(min_alpha=None)
    floors.alpha_floors = (1e-4, 0.3)
    original_step = floors.optimizer.step
    monkeypatch.setattr(floors.optimizer, "step", lambda: push_alpha_txt_below_zero(floors))
    floors.run()
    assert float(floors.synthetic.alpha_txt.detach()) == pytest.approx(0.3)
    assert 1e-4 <= float(floors.synthetic.alpha_img.detach()) < 0.3


class CountingLogits:
    """A student's logits_fn that counts its calls (one per student step taken or replayed)."""

    def __init__(self, logits_fn):
        self.logits_fn, self.calls = logits_fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.logits_fn(*args)


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_exact_checkpoints_reach_the_matching_step_and_never_change_the_result(k):
    """distill.exact_checkpoints sets how many w_i exact holds, hence how many steps it replays (the binomial
    plan's count, null/0 = the default schedule), and gives the default run's state bit for bit."""
    n_steps, iterations = 8, 2
    reference = make_trainer(iterations, syn_steps=n_steps)
    reference.run()
    trainer = make_trainer(iterations, syn_steps=n_steps, exact_checkpoints=k)
    trainer.logits_fn = counter = CountingLogits(trainer.logits_fn)
    ema = trainer.run()
    states = k or trainer._checkpoints  # null/0: the memory-budget default, chosen at the first step
    measured = 0 if k else 1  # that choice measures one step's graph once per phase
    if not k:
        theta = trainer.trajectories.snapshot(0, 0)
        vector = sum(v.numel() for v in theta) * DT.itemsize
        graph = matching.graph_bytes(reference.logits_fn, "WBCE", trainer.synthetic, theta, 4)
        assert states == matching.budget_checkpoints(n_steps, graph, vector) >= matching.exact_checkpoints(n_steps)
    replays = matching._reversal_plan(n_steps, states, True)[0]
    assert counter.calls == iterations * (2 * n_steps - 1 + replays) + measured
    for name, value in reference.ema.state().items():
        assert torch.equal(ema[name], value), name
    for (name, p), q in zip(reference.synthetic.named_parameters(), trainer.synthetic.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("keep, budget", [(None, matching.KEEP_GRAPHS_BYTES), (None, 1), (True, 1), (False, None)])
def test_keep_graphs_reaches_the_matching_step_and_never_changes_the_result(keep, budget, monkeypatch):
    """first_order's distill.keep_graphs: null keeps the N step graphs when N x (one step's graph + a vector)
    fits the budget (measured once per phase), true/false force it; each step is then taken once or twice,
    and the state is bit for bit the same."""
    n_steps, iterations = 4, 2
    reference = make_trainer(iterations, syn_steps=n_steps, grad_method="first_order", keep_graphs=False)
    reference.run()
    if budget is not None:
        monkeypatch.setattr(matching, "KEEP_GRAPHS_BYTES", budget)
    trainer = make_trainer(iterations, syn_steps=n_steps, grad_method="first_order", keep_graphs=keep)
    trainer.logits_fn = counter = CountingLogits(trainer.logits_fn)
    ema = trainer.run()
    if keep is None:
        theta = trainer.trajectories.snapshot(0, 0)
        vector = sum(v.numel() for v in theta) * DT.itemsize
        graph = matching.graph_bytes(reference.logits_fn, "WBCE", trainer.synthetic, theta, 4)
        assert trainer._keep == (n_steps * (graph + vector) <= budget) == (budget > 1)
    kept = trainer._keep
    assert counter.calls == iterations * n_steps * (1 if kept else 2) + (keep is None)
    for name, value in reference.ema.state().items():
        assert torch.equal(ema[name], value), name
    for (name, p), q in zip(reference.synthetic.named_parameters(), trainer.synthetic.parameters()):
        assert torch.equal(p, q), name


def test_export_round_trip_and_grid(tmp_path):
    trainer = make_trainer(iterations=2)
    ema = trainer.run()
    out = str(tmp_path / "phase1")
    save_subset(out, ema, trainer.cfg, init_indices=trainer.synthetic.init_indices, iterations=2,
                config_hash="abc")
    subset = load_subset(out)
    assert torch.equal(subset.images, ema["images"]) and torch.equal(subset.text, ema["text"])
    expected = torch.diag(ema["similarity.diag"]) + 0.5 * ema["similarity.left"] @ ema["similarity.right"].T
    assert torch.allclose(subset.similarity, expected)
    assert subset.alpha_img == pytest.approx(float(ema["alpha_img"]))
    assert subset.meta["iterations"] == 2 and subset.meta["phase"]["pairs"] == N_PAIRS

    real = torch.randn(5, D_T, dtype=DT)
    captions = [f"caption {i}" for i in range(5)]
    syn_text = real[[3, 1]] * 2.0 + 1e-3
    assert nearest_captions(syn_text, real, captions) == ["caption 3", "caption 1"]
    png = str(tmp_path / "grid.png")
    image_grid_png(subset.images[:4], ["a dog", "two red squares on a blue field", "x", "y"], png)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 0 and im.mode == "RGB"


def test_optimiser_groups_momentum_and_ema_follow_their_recurrences(monkeypatch):
    """docs/method.md#update-ema-and-divergence: SGD with momentum on X, T, the alphas and the similarity, each with its own lr;
    then the EMA of every learned tensor. Gradients are injected, so the check is of the update alone."""
    lrs = {"images": 3.0, "text": 5.0, "alpha": 0.07, "sim": 11.0}
    trainer = make_trainer(lr_img=lrs["images"], lr_txt=lrs["text"], lr_lr=lrs["alpha"], lr_sim=lrs["sim"],
                           momentum=0.5, ema_decay=0.9, min_alpha=None, report_every=100, checkpoint_every=100,
                           alpha_init=1.0)  # two steps of lr 0.07 on N(0, 1) gradients keep the alphas positive
    syn = trainer.synthetic
    names = list(syn.tensors())
    assert {"images", "text"} <= set(names) and len(names) == 2 + 2 + len(list(syn.similarity.parameters()))
    lr_of = {n: lrs["images"] if n == "images" else lrs["text"] if n == "text"
             else lrs["alpha"] if "alpha" in n else lrs["sim"] for n in names}
    gen = torch.Generator().manual_seed(0)
    grads = [{n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in syn.tensors().items()} for _ in range(2)]

    def fake_matching_step(*_args, **_kw):
        for n, p in syn.tensors().items():
            p.grad = grads[len(seen)][n].clone()
        seen.append(1)
        return {"loss": 0.5}

    seen: list = []
    monkeypatch.setattr("ptmst_ray.distill.phase.matching_step", fake_matching_step)
    p0 = {n: p.detach().clone() for n, p in syn.tensors().items()}
    trainer.step()
    trainer.step()
    for n in names:
        buf1 = grads[0][n]
        p1 = p0[n] - lr_of[n] * buf1
        buf2 = 0.5 * buf1 + grads[1][n]
        p2 = p1 - lr_of[n] * buf2
        torch.testing.assert_close(syn.tensors()[n].detach(), p2, msg=n)
        e2 = 0.9 * (0.9 * p0[n] + 0.1 * p1) + 0.1 * p2
        torch.testing.assert_close(trainer.ema.state()[n], e2, msg=n)


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_lr_sim_zero_keeps_the_similarity_at_its_init_while_the_rest_learns(kind):
    """distill.lr_sim = 0 (the fixed-similarity ablation) freezes S at its initialisation, the identity, in the raw
    state, the EMA and the exported matrix, although S receives non-zero gradients; the images still learn. The
    same run at lr_sim > 0 moves S (the check can fail)."""
    from ptmst_ray.distill.export import similarity_matrix

    sim_cfg = SimilarityConfig(kind=kind, rank=2)
    frozen, learned = (make_trainer(similarity=sim_cfg, lr_sim=lr) for lr in (0.0, 0.1))
    start = {n: p.detach().clone() for n, p in frozen.synthetic.tensors().items()}
    ema_frozen, ema_learned = frozen.run(), learned.run()
    sim_names = [n for n in start if n.startswith("similarity.")]
    assert sim_names
    assert any(frozen.synthetic.tensors()[n].grad is not None and frozen.synthetic.tensors()[n].grad.abs().max() > 0
               for n in sim_names), "S got no gradient: the freeze would be vacuous"
    for n in sim_names:
        assert torch.equal(frozen.synthetic.tensors()[n].detach(), start[n]), n
        assert torch.equal(ema_frozen[n], start[n]), n
    eye = torch.eye(N_PAIRS, dtype=DT)
    assert torch.equal(similarity_matrix(sim_cfg, ema_frozen), eye)
    assert not torch.equal(frozen.synthetic.images.detach(), start["images"])
    assert not torch.equal(similarity_matrix(sim_cfg, ema_learned), eye)


def test_aggregate_refuses_a_subset_whose_learned_step_size_is_not_positive(tmp_path):
    """A phase whose learned alpha ended at or below zero (possible without distill.min_alpha, as in the
    paper recipes) cannot train a student (SGD refuses a negative lr): aggregation stops before any
    evaluation, naming the subset, the value and the fields to change; with positive alphas it succeeds."""
    from conftest import tiny_config

    from ptmst_ray.layout import Layout, StageError, phase_jobs
    from ptmst_ray.stages.aggregate import aggregate

    cfg = tiny_config(tmp_path / "run")
    layout = Layout.of(cfg)

    def write(alpha_txt: float) -> None:
        for job in phase_jobs(cfg, with_baseline=False):
            syn = SyntheticSet.from_noise(job.phase.pairs, (3, cfg.data.image_size, cfg.data.image_size), 16,
                                          job.phase.similarity, 0.01, torch.Generator().manual_seed(0))
            ema = {k: v.detach().clone() for k, v in syn.tensors().items()}
            ema["alpha_txt"] = torch.tensor(alpha_txt)
            save_subset(layout.subset(job.name), ema, job.phase, iterations=job.phase.iterations,
                        config_hash=job.hash)

    write(-0.003)
    with pytest.raises(StageError) as err:
        aggregate(cfg)
    assert "alpha_txt = -0.003" in str(err.value) and "distill.min_alpha" in str(err.value)
    assert "distill.lr_lr" in str(err.value) and layout.subset(phase_jobs(cfg)[0].name) in str(err.value)
    write(0.002)
    assert aggregate(cfg)["pairs"] == cfg.total_pairs


def test_auto_ema_decay_is_the_papers_at_2000_iterations_and_averages_the_last_5_percent_of_any_phase():
    """ema_decay: auto = 1 - 20 / iterations: 0.99 at the paper's 2000; the EMA's mean weight age (brute force
    over its weights (1 - d) d^k) is then about 5% of the phase at every length; a phase of at most 20
    iterations saves its raw state."""
    cfg = DistillConfig(ema_decay="auto")
    assert cfg.ema_decay_for(2000) == pytest.approx(0.99)
    for iterations in (150, 600, 2000, 5000):
        d = cfg.ema_decay_for(iterations)
        k = torch.arange(200_000, dtype=torch.float64)
        mean_age = float(((1 - d) * d ** k * k).sum())
        assert mean_age == pytest.approx(0.05 * iterations - 1, rel=1e-6)  # 5% of the phase, less one iteration
    assert cfg.ema_decay_for(20) == cfg.ema_decay_for(10) == 0.0
    assert DistillConfig(ema_decay=0.9).ema_decay_for(150) == 0.9
    reports: list = []
    trainer = make_trainer(iterations=40, reports=reports, ema_decay="auto")
    assert trainer.ema.decay == pytest.approx(0.5)
    trainer.run(until=2)
    assert reports[-1][0]["ema_decay"] == pytest.approx(0.5)


def rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


RELATIVE = {"rel_lr_img": 0.02, "rel_lr_txt": 0.05, "rel_lr_lr": 0.03, "rel_lr_sim": 0.01}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_relative_learning_rates_move_the_set_by_that_fraction_of_its_rms_at_the_first_update(monkeypatch):
    """distill.rel_lr_img / rel_lr_txt / rel_lr_lr / rel_lr_sim with the gradient RMS of one draw: the first
    optimiser update (plain SGD: lr x gradient) moves the images, the texts, the two step sizes and the similarity's
    parameters by exactly that fraction of their RMS, whatever the gradient's scale; the learning rates then stay;
    the reports carry them."""
    monkeypatch.setattr("ptmst_ray.distill.phase.LR_PROBE_DRAWS", 1)

    reports: list = []
    for scale in (1.0, 0.1):  # the same relative move whatever the images' (and so their gradients') scale
        trainer = make_trainer(reports=reports, **RELATIVE, lr_img=1.0, lr_txt=1.0, report_every=1, min_alpha=None)
        syn = trainer.synthetic
        with torch.no_grad():
            syn.images.mul_(scale)
        before = {"images": [syn.images], "text": [syn.text], "alphas": list(syn.alphas),
                  "similarity": list(syn.similarity.parameters())}
        start = {k: flat(v).clone() for k, v in before.items()}
        trainer.run(until=1)
        for key, rel in zip(before, RELATIVE.values()):
            assert rms(flat(before[key]) - start[key]) / rms(start[key]) == pytest.approx(rel, rel=1e-6), key
        lrs = trainer.learning_rates()
        assert set(lrs) == {"lr_img", "lr_txt", "lr_lr", "lr_sim"}
        assert all(lrs[k] != v for k, v in configs()[1].__dict__.items() if k in lrs)
        trainer.run(until=3)
        assert trainer.learning_rates() == lrs
        assert {k: reports[-1][0][k] for k in lrs} == lrs
    fixed = make_trainer(lr_img=1.5, lr_txt=2.5, lr_lr=0.25, lr_sim=0.75)
    fixed.run(until=1)
    assert fixed.learning_rates() == {"lr_img": 1.5, "lr_txt": 2.5, "lr_lr": 0.25, "lr_sim": 0.75}


def test_a_relative_learning_rate_with_a_zero_gradient_is_a_clear_error(monkeypatch):
    trainer = make_trainer(rel_lr_img=0.02)
    syn = trainer.synthetic

    def zero_gradients(*_args, **_kw):
        for p in syn.parameters():
            p.grad = torch.zeros_like(p)
        return {"loss": 0.5}

    monkeypatch.setattr("ptmst_ray.distill.phase.matching_step", zero_gradients)
    with pytest.raises(ValueError, match=r"distill.rel_lr_img cannot set lr_img.*is 0.0 over.*set distill.lr_img"):
        trainer.run(until=1)


def test_relative_learning_rates_average_the_gradient_over_probe_draws_and_step_with_the_first(monkeypatch):
    """The gradient RMS is the root mean square over LR_PROBE_DRAWS draws (injected gradients of known scale:
    draw k has every entry k + 1); the first update uses the first draw's gradient."""
    draws = 4
    monkeypatch.setattr("ptmst_ray.distill.phase.LR_PROBE_DRAWS", draws)
    trainer = make_trainer(**RELATIVE, momentum=0.0, min_alpha=None)
    syn = trainer.synthetic
    calls: list[int] = []

    def scaled_gradients(*_args, **_kw):
        for p in syn.parameters():
            p.grad = torch.full_like(p, float(len(calls) + 1))
        calls.append(1)
        return {"loss": 0.5, "alpha_img": 0.1, "alpha_txt": 0.1}

    monkeypatch.setattr("ptmst_ray.distill.phase.matching_step", scaled_gradients)
    x0, t0 = syn.images.detach().clone(), syn.text.detach().clone()
    a0, s0 = flat(syn.alphas).clone(), flat(syn.similarity.parameters()).clone()
    trainer.run(until=1)
    assert len(calls) == draws
    grad_rms = math.sqrt(sum((k + 1) ** 2 for k in range(draws)) / draws)
    lrs = trainer.learning_rates()
    for name, x in (("lr_img", x0), ("lr_txt", t0), ("lr_lr", a0), ("lr_sim", s0)):
        assert lrs[name] == pytest.approx(RELATIVE[f"rel_{name}"] * rms(x) / grad_rms, rel=1e-9), name
    torch.testing.assert_close(syn.images.detach(), x0 - lrs["lr_img"] * 1.0)  # the first draw's gradient: 1
    torch.testing.assert_close(syn.text.detach(), t0 - lrs["lr_txt"] * 1.0)
    torch.testing.assert_close(flat(syn.alphas), a0 - lrs["lr_lr"] * 1.0)
    torch.testing.assert_close(flat(syn.similarity.parameters()), s0 - lrs["lr_sim"] * 1.0)


def test_the_probe_draws_leave_the_run_as_a_run_with_those_fixed_learning_rates():
    """The extra draws use their own generator and the first iteration's own gradients: a run that derives its
    learning rates is bit for bit the run with those learning rates fixed."""
    derived = make_trainer(**RELATIVE)
    ema_derived = derived.run()
    lrs = derived.learning_rates()
    fixed = make_trainer(**lrs)
    ema_fixed = fixed.run()
    for name, value in ema_derived.items():
        assert torch.equal(value, ema_fixed[name]), name
    probes = 2 * (LR_PROBE_DRAWS - 1)  # (start, target) snapshots of the extra draws, after the first iteration's
    calls = derived.trajectories.calls
    assert len(calls) == len(fixed.trajectories.calls) + probes
    assert calls[:2] + calls[2 + probes:] == fixed.trajectories.calls
