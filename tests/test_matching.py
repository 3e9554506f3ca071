"""The matching step's gradient rules against independent autograd references (float64, tiny model)."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from ptmst_ray.config import SimilarityConfig
from ptmst_ray.distill import matching
from ptmst_ray.distill.matching import Checkpointed, MinibatchSampler, Step, exact_checkpoints, matching_step
from ptmst_ray.distill.synthetic import SyntheticSet
from ptmst_ray.models.losses import contrastive_loss

DT = torch.float64
IMG_SHAPE = (3, 4, 4)
D_IN, HID, EMB, D_T = 48, 8, 6, 5


def wbce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return contrastive_loss("WBCE", logits, target)


class TinyStudent:
    """flatten -> linear -> tanh -> linear (image); linear -> gelu -> dropout -> linear + residual (text)."""

    img_shapes = [(HID, D_IN), (HID,), (EMB, HID), (EMB,)]
    txt_shapes = [(EMB, D_T), (EMB,), (EMB, EMB), (EMB,)]

    def __init__(self, dropout: float = 0.0, scale: float = 5.0):
        self.dropout, self.scale = dropout, scale

    @staticmethod
    def _split(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        out, off = [], 0
        for s in shapes:
            n = math.prod(s)
            out.append(flat[off:off + n].view(s))
            off += n
        return out

    def numels(self) -> tuple[int, int]:
        return sum(math.prod(s) for s in self.img_shapes), sum(math.prod(s) for s in self.txt_shapes)

    def init(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        n_img, n_txt = self.numels()
        return 0.3 * torch.randn(n_img, generator=g, dtype=DT), 0.3 * torch.randn(n_txt, generator=g, dtype=DT)

    def logits(self, w_img, w_txt, images, text, seed):
        w1, b1, w2, b2 = self._split(w_img, self.img_shapes)
        f = torch.tanh(images.flatten(1) @ w1.T + b1) @ w2.T + b2
        v1, c1, v2, c2 = self._split(w_txt, self.txt_shapes)
        proj = text @ v1.T + c1
        hidden = F.gelu(proj)
        if self.dropout > 0:
            gen = torch.Generator().manual_seed(seed)
            keep = (torch.rand(hidden.shape, generator=gen) >= self.dropout).to(hidden.dtype)
            hidden = hidden * keep / (1 - self.dropout)
        h = hidden @ v2.T + c2 + proj
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(h, dim=-1).T


def make_synthetic(n: int = 10, kind: str = "full", seed: int = 0) -> SyntheticSet:
    g = torch.Generator().manual_seed(seed)
    syn = SyntheticSet.from_noise(n, IMG_SHAPE, D_T, SimilarityConfig(kind=kind, rank=3), 0.1, g, dtype=DT)
    with torch.no_grad():  # move away from the init so every parameter gets a nontrivial gradient
        for p in syn.similarity.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
        syn.alpha_img.fill_(0.3)
        syn.alpha_txt.fill_(0.2)
    return syn


def make_thetas(student: TinyStudent, seed: int = 1):
    theta_s = student.init(seed)
    g = torch.Generator().manual_seed(seed + 100)
    theta_t = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in theta_s)
    return theta_s, theta_t


def grads_of(syn: SyntheticSet) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in syn.named_parameters()}


def run(method: str, steps: int, kind: str = "full", dropout: float = 0.0, n: int = 10, batch: int = 4,
        wrap=lambda logits_fn: logits_fn, **kwargs):
    student = TinyStudent(dropout)
    syn = make_synthetic(n, kind)
    theta_s, theta_t = make_thetas(student)
    out = matching_step(wrap(student.logits), "WBCE", syn, theta_s, theta_t, steps,
                        MinibatchSampler(n, batch, torch.Generator().manual_seed(7)), method=method, **kwargs)
    return out, grads_of(syn)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close(got: dict, ref: dict, tol: float) -> None:
    for name in ref:
        assert ref[name].norm() > 0, f"{name}: reference gradient is zero, the test is vacuous"
        assert rel_err(got[name], ref[name]) < tol, f"{name}: relative error {rel_err(got[name], ref[name]):.3e}"


@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_exact_equals_unrolled(steps, kind):
    out_e, g_e = run("exact", steps, kind)
    out_u, g_u = run("unrolled", steps, kind)
    assert math.isclose(out_e["loss"], out_u["loss"], rel_tol=1e-10)
    assert set(g_e) >= {"images", "text", "alpha_img", "alpha_txt"}
    assert_close(g_e, g_u, 1e-6)


def test_exact_equals_unrolled_with_dropout():
    """The recomputation replays the unroll's dropout masks (same per-step seed)."""
    out_e, g_e = run("exact", 5, "lowrank", dropout=0.3)
    out_u, g_u = run("unrolled", 5, "lowrank", dropout=0.3)
    assert_close(g_e, g_u, 1e-6)
    _, g_nodrop = run("unrolled", 5, "lowrank", dropout=0.0)
    assert rel_err(g_nodrop["text"], g_u["text"]) > 1e-3  # the dropout really changes things


def test_first_order_equals_exact_for_one_step():
    _, g_f = run("first_order", 1, "lowrank")
    _, g_e = run("exact", 1, "lowrank")
    assert_close(g_f, g_e, 1e-6)


def first_order_surrogate(student, syn, theta_s, theta_t, steps: list[Step]):
    """Independent reference: autograd of M where each step's w_i is a detached constant."""
    w = [t.clone() for t in theta_s]
    big_g = [torch.zeros_like(t) for t in theta_s]
    for step in steps:
        w_const = [v.detach().requires_grad_() for v in w]
        idx = step.indices
        logits = student.logits(*w_const, syn.images[idx], syn.text[idx], step.seed)
        loss = wbce(logits, syn.similarity.matrix(idx))
        g = torch.autograd.grad(loss, w_const, create_graph=True)
        w = [v.detach() - a.detach() * gm.detach() for v, a, gm in zip(w, syn.alphas, g)]
        big_g = [acc + gm for acc, gm in zip(big_g, g)]
    total = 0
    for s, t, a, gm in zip(theta_s, theta_t, syn.alphas, big_g):
        total = total + (s - a * gm - t).pow(2).sum() / (s - t).pow(2).sum()
    total.backward()


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_first_order_equals_surrogate(kind):
    n, batch, n_steps = 10, 4, 6
    student = TinyStudent(dropout=0.2)
    out, g_f = run("first_order", n_steps, kind, dropout=0.2)
    syn = make_synthetic(n, kind)
    theta_s, theta_t = make_thetas(student)
    sampler = MinibatchSampler(n, batch, torch.Generator().manual_seed(7))
    steps = [Step(sampler.next_indices(), sampler.next_seed()) for _ in range(n_steps)]
    first_order_surrogate(student, syn, theta_s, theta_t, steps)
    assert_close(g_f, grads_of(syn), 1e-9)
    _, g_e = run("exact", n_steps, kind, dropout=0.2)
    assert rel_err(g_f["images"], g_e["images"]) > 1e-3  # first-order is not the exact gradient


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_first_order_keeping_its_graphs_gives_the_same_bits_without_the_replay(kind):
    """keep_graphs: the first pass's N step graphs are kept and differentiated, so each step is taken once (N
    student calls instead of 2N) and all N w_i live at once; every gradient and statistic is bit for bit the
    replaying rule's (which test_first_order_equals_surrogate checks against an independent reference)."""
    n_steps, probe = 6, VectorProbe()
    out, g = run("first_order", n_steps, kind, dropout=0.2)
    out_k, g_k = run("first_order", n_steps, kind, dropout=0.2, wrap=probe.wrap, keep_graphs=True)
    assert probe.calls == n_steps and probe.most == n_steps
    assert out_k == out
    assert set(g_k) == set(g) and all(torch.equal(g_k[name], g[name]) for name in g), \
        {name: rel_err(g_k[name], g[name]) for name in g}


def test_first_order_keeping_its_graphs_on_the_open_clip_student():
    """The same on the real functional student (open_clip toy ViT + projection head with dropout), float32."""
    from ptmst_ray.config import ModelConfig
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student

    text_dim, n = 16, 6
    fs = FunctionalStudent(build_student(ModelConfig(head_dropout=0.1), text_dim=text_dim, seed=0).train())
    theta_s = fs.params()
    theta_t = tuple(t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) for t in theta_s)
    outs, grads = {}, {}
    for keep in (False, True):
        syn = SyntheticSet.from_noise(n, (3, 32, 32), text_dim, SimilarityConfig(), 0.1,
                                      torch.Generator().manual_seed(1))
        outs[keep] = matching_step(fs.logits, "WBCE", syn, theta_s, theta_t, 3,
                                   MinibatchSampler(n, 3, torch.Generator().manual_seed(2)), keep_graphs=keep)
        grads[keep] = grads_of(syn)
    assert outs[True] == outs[False]
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False]) and grads[False]["images"].norm() > 0


def test_loss_and_grad_accumulate_and_report():
    out, _ = run("exact", 2)
    for key in ("loss", "loss_img", "loss_txt", "grad_norm_images", "grad_norm_text", "grad_norm_similarity",
                "alpha_img", "alpha_txt", "grad_alpha_img", "grad_alpha_txt"):
        assert math.isfinite(out[key]), key
    assert math.isclose(out["loss"], out["loss_img"] + out["loss_txt"])
    assert out["alpha_img"] == pytest.approx(0.3)


def test_sampler_is_deterministic_and_covers_all_pairs():
    a = MinibatchSampler(11, 4, torch.Generator().manual_seed(3))
    b = MinibatchSampler(11, 4, torch.Generator().manual_seed(3))
    chunks = [a.next_indices() for _ in range(3)]
    assert sorted(torch.cat(chunks).tolist()) == list(range(11))  # 4 + 4 + 3
    assert all(torch.equal(c, b.next_indices()) for c in chunks)
    state = a.state_dict()
    nxt = [a.next_indices() for _ in range(4)], a.next_seed()
    a.load_state_dict(state)
    again = [a.next_indices() for _ in range(4)], a.next_seed()
    assert all(torch.equal(x, y) for x, y in zip(nxt[0], again[0])) and nxt[1] == again[1]
    single = MinibatchSampler(9, 4, torch.Generator().manual_seed(0))  # 4 + 5: no chunk of one pair
    assert sorted(len(single.next_indices()) for _ in range(2)) == [4, 5]


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="first_order"):
        run("second_order", 1)


def test_exact_equals_unrolled_on_open_clip_student():
    """The real functional student (open_clip toy ViT + projection head with dropout), float64, N=2."""
    from ptmst_ray.config import ModelConfig
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student

    text_dim, n = 16, 6
    student = build_student(ModelConfig(head_dropout=0.1), text_dim=text_dim, seed=0).double().train()
    fs = FunctionalStudent(student)
    g = torch.Generator().manual_seed(0)
    theta_s = fs.params()
    theta_t = tuple(t + 0.01 * torch.randn(t.shape, generator=g, dtype=DT) for t in theta_s)
    grads = {}
    for method in ("exact", "unrolled"):
        syn = SyntheticSet.from_noise(n, (3, 32, 32), text_dim, SimilarityConfig(), 0.1,
                                      torch.Generator().manual_seed(1), dtype=DT)
        matching_step(fs.logits, "WBCE", syn, theta_s, theta_t, 2,
                      MinibatchSampler(n, 3, torch.Generator().manual_seed(2)), method=method)
        grads[method] = grads_of(syn)
    assert_close(grads["exact"], grads["unrolled"], 1e-6)


# --------------------------------------------------------------------------- memory: no stored unroll


class _State:
    """A stand-in for a student state w_i whose liveness can be watched."""

    __slots__ = ("i", "__weakref__")

    def __init__(self, i: int):
        self.i = i


@pytest.mark.parametrize("states", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 32])
def test_checkpointed_visits_every_state_in_reverse_from_few_kept(n, states):
    alive: weakref.WeakSet = weakref.WeakSet()  # every state but w_0

    def advance(w: _State, i: int) -> _State:
        assert w.i == i, "a step was applied to the wrong state"
        nxt = _State(i + 1)
        alive.add(nxt)
        return nxt

    reversal = Checkpointed(n, states, advance)
    assert reversal.sweep(_State(0)).i == n
    visited, most = [], 0
    for i, w in reversal.reverse():
        assert w.i == i
        visited.append(i)
        most = max(most, len(alive))
        del w
    assert visited == list(reversed(range(n)))
    assert most <= states  # the kept states, the one being visited among them
    assert reversal.replayed == matching._reversal_plan(n, states, True)[0]


def test_checkpointed_needs_a_state_to_visit():
    with pytest.raises(ValueError, match="at least 1 state"):
        Checkpointed(3, 0, lambda w, i: w)
    with pytest.raises(ValueError, match="checkpoints must be >= 1"):
        run("exact", 3, checkpoints=0)


def test_exact_checkpoints_replay_fewer_steps_than_the_unroll():
    for n in range(1, 65):
        states = exact_checkpoints(n)
        assert matching._reversal_plan(n, states, True)[0] <= max(0, n - 1), n
        assert states <= math.ceil(math.sqrt(2 * n)), n
    assert [exact_checkpoints(n) for n in (1, 2, 8, 32)] == [0, 1, 2, 6]


@pytest.mark.parametrize("states", [1, 2, 4, 8])
def test_exact_does_not_depend_on_the_checkpoint_count(states):
    """Replays are deterministic, so any schedule gives the same bits (8 states at N=8 keep every w_i)."""
    _, g_default = run("exact", 8, "lowrank", dropout=0.2)
    _, g = run("exact", 8, "lowrank", dropout=0.2, checkpoints=states)
    for name in g_default:
        assert torch.equal(g[name], g_default[name]), name


class VectorProbe:
    """Wraps a student's ``logits_fn``; at every call, counts the distinct w_img vectors passed in so far
    that are still alive (held by the matching step, not yet freed)."""

    def __init__(self):
        self.logits_fn, self.calls, self.most = None, 0, 0
        self.refs: dict[int, StorageWeakRef] = {}

    def wrap(self, logits_fn):
        self.logits_fn = logits_fn
        return self

    def __call__(self, w_img, w_txt, images, text, seed):
        self.calls += 1
        self.refs = {k: r for k, r in self.refs.items() if not r.expired()}
        self.refs[w_img.untyped_storage().data_ptr()] = StorageWeakRef(w_img.untyped_storage())
        self.most = max(self.most, len(self.refs))
        return self.logits_fn(w_img, w_txt, images, text, seed)


@pytest.mark.parametrize("method", ["first_order", "exact", "unrolled"])
def test_parameter_vectors_alive_do_not_grow_with_steps(method):
    """first_order holds w_0 and the current w_i; exact w_0 and exact_checkpoints(N); unrolled all of them."""
    n_steps, probe = 24, VectorProbe()
    run(method, n_steps, "lowrank", dropout=0.2, wrap=probe.wrap)
    if method == "first_order":
        assert probe.most <= 2 and probe.calls == 2 * n_steps
    elif method == "exact":
        states = exact_checkpoints(n_steps)
        assert states == 5 and probe.most <= states + 1
        # the sweep tapes step N-1 and the reversal differentiates that graph: 2N - 1 steps plus the replays
        assert probe.calls == 2 * n_steps - 1 + matching._reversal_plan(n_steps, states, True)[0] < 3 * n_steps
    else:  # the probe sees what a stored unroll looks like
        assert probe.most == n_steps and probe.calls == n_steps


def test_budget_checkpoints_hold_what_fits_in_the_budget_within_the_replay_rule_and_n():
    mib = 2 ** 20
    for n in range(1, 40):
        low = exact_checkpoints(n)
        assert matching.budget_checkpoints(n, graph=0, vector=mib) == low  # no budget: the replay rule
        for graph_mib, vector_mib in ((10, 1), (35, 0.5), (1000, 1)):
            got = matching.budget_checkpoints(n, graph=int(graph_mib * mib), vector=int(vector_mib * mib))
            fit = 1 + math.floor(0.1 * graph_mib / vector_mib)  # extra vectors within 10% of the graph
            assert got == (0 if n == 1 else min(n - 1, max(low, fit))), (n, graph_mib, vector_mib)
    # n - 1 held vectors already keep every w_i: no replays
    assert all(matching._reversal_plan(n, n - 1, True)[0] == 0 for n in range(2, 20))


def test_graph_bytes_follows_the_minibatch_not_the_set_and_leaves_no_trace():
    student = TinyStudent()
    theta, _ = make_thetas(student)
    small, big = make_synthetic(n=8), make_synthetic(n=64)
    g4 = matching.graph_bytes(student.logits, wbce, small, theta, 4)
    assert g4 > 0
    assert matching.graph_bytes(student.logits, wbce, big, theta, 4) == g4  # the set's size is not graph
    g8 = matching.graph_bytes(student.logits, wbce, big, theta, 8)
    assert g4 < g8 < 2.5 * g4  # activations grow with the minibatch (plus a fixed part)
    # at least the image activations of the first layer's output and the minibatch itself are saved
    assert g4 >= 4 * (D_IN + HID) * DT.itemsize
    assert all(p.grad is None for p in big.parameters())
