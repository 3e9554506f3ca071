"""One trajectory-matching iteration (docs/method.md#trajectory-matching) and its three gradient rules.

Why this file exists: this is the heart of PTM-ST. From a teacher start theta_s the student
takes N SGD steps on synthetic minibatches; the matching loss compares where it lands with the
teacher target theta_t, per modality (image tower, text head):

    M = sum_m || theta_s - alpha_m G_m - theta_t ||^2 / || theta_s - theta_t ||^2,  G = sum_i g_i.

Its gradient with respect to the synthetic images X, texts T, similarity S and step sizes
alpha reaches the data through every g_i. Three rules compute it:

* ``first_order`` (the paper's code, TESLA-style): holds each w_i constant. Constant memory:
  it keeps no unroll, only w_0 = theta_s; a first pass finds w_N and G, a second pass replays
  the N steps from w_0 and takes each step's data gradient on the way (two unrolls' time).
* ``exact`` (ptmst_ray's own): the adjoint recursion of docs/method.md#gradient-rules, equal to full
  autograd through the unroll. It needs w_N-1 .. w_0 in reverse order: a binomial checkpoint
  schedule (Griewank's "revolve") keeps a few w_i and replays the others: at least
  ``exact_checkpoints(N)`` parameter vectors (2 at N = 8, 6 at N = 32; fewer than N replayed
  steps), more when a phase's memory budget allows (:func:`budget_checkpoints`: fewer replays).
* ``unrolled``: plain autograd through all N steps (create_graph=True), the reference; its
  memory grows with N.

The student is any functional model ``logits_fn(w_img, w_txt, images, text_emb, seed)``;
the per-step seed makes the recomputation draw the same dropout masks as the unroll.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ptmst_ray.distill.synthetic import SyntheticSet
from ptmst_ray.vocab import GRAD_METHODS

log = logging.getLogger(__name__)

__all__ = ["Checkpointed", "LogitsFn", "LossFn", "MinibatchSampler", "default_keep_graphs", "exact_checkpoints",
           "matching_step", "METHODS"]

LogitsFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]
"""(w_img, w_txt, images, text_emb, seed) -> b x b logits; twice differentiable; same seed, same masks."""
LossFn = Callable[[Tensor, Tensor], Tensor]
"""(logits, target) -> scalar loss."""
Params = tuple[Tensor, Tensor]
METHODS = GRAD_METHODS
"""The gradient rules (:data:`ptmst_ray.vocab.GRAD_METHODS`)."""
MODALITIES = ("img", "txt")
SEED_RANGE = 2**62


class MinibatchSampler:
    """Minibatches of synthetic pair indices: a random permutation cut into chunks of ``batch``.

    A new permutation is drawn when the chunks run out. A remainder chunk of a single pair is
    merged into the previous chunk (contrastive losses need at least 2 pairs). Every draw,
    including each step's dropout seed, comes from ``generator``, so the sequence is a pure
    function of the generator's state; ``state_dict`` captures it for an exact resume.
    """

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        if batch < 2 or n < batch:
            raise ValueError(f"need 2 <= minibatch ({batch}) <= synthetic pairs ({n})")
        self.n, self.batch, self.generator = n, batch, generator
        self._chunks: list[Tensor] = []

    def _refill(self) -> None:
        chunks = list(torch.split(torch.randperm(self.n, generator=self.generator), self.batch))
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        self._chunks = chunks

    def next_indices(self) -> Tensor:
        if not self._chunks:
            self._refill()
        return self._chunks.pop(0)

    def next_seed(self) -> int:
        return int(torch.randint(SEED_RANGE, (1,), generator=self.generator).item())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "chunks": [c.clone() for c in self._chunks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._chunks = [c.clone() for c in state["chunks"]]


@dataclass(frozen=True)
class Step:
    """What one inner step saw: its minibatch and its dropout seed (replayed in recomputation)."""

    indices: Tensor
    seed: int


@dataclass
class _Context:
    """What every step needs: the student, the loss and the synthetic set."""

    logits_fn: LogitsFn
    loss_fn: LossFn
    syn: SyntheticSet

    def loss(self, w: Params, step: Step, mode: Literal["const", "leaf", "graph"]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """l_i at ``w`` on the step's minibatch; returns (loss, (x_B, t_B)).

        mode "const": data detached (the forward unroll); "leaf": x_B, t_B are fresh leaves and
        S_B keeps its graph to the similarity parameters (recomputation); "graph": everything
        keeps its graph to the synthetic set (the unrolled reference).
        """
        syn, idx = self.syn, step.indices.to(self.syn.images.device)
        x, t, s = syn.images[idx], syn.text[idx], syn.similarity.matrix(idx)
        if mode == "const":
            x, t, s = x.detach(), t.detach(), s.detach()
        elif mode == "leaf":
            x, t = x.detach().requires_grad_(), t.detach().requires_grad_()
        logits = self.logits_fn(w[0], w[1], x, t, step.seed)
        return self.loss_fn(logits, s), (x, t)


def _grads(out: Tensor, inputs: list[Tensor], create_graph: bool = False, retain_graph: bool | None = None) -> list[Tensor]:
    """autograd.grad with zeros (not None) for inputs ``out`` does not depend on."""
    grads = torch.autograd.grad(out, inputs, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _leaves(w: Params) -> Params:
    return tuple(v.detach().requires_grad_() for v in w)  # type: ignore[return-value]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


class _Accumulator:
    """Gradients of the synthetic set, summed over steps (minibatch rows scattered into place)."""

    def __init__(self, syn: SyntheticSet):
        self.syn = syn
        self.images = torch.zeros_like(syn.images)
        self.text = torch.zeros_like(syn.text)
        self.sim = [torch.zeros_like(p) for p in syn.similarity.parameters()]
        self.alphas = [torch.zeros_like(a) for a in syn.alphas]

    def add_batch(self, indices: Tensor, gx: Tensor, gt: Tensor, gsim: list[Tensor], sign: float = 1.0) -> None:
        idx = indices.to(self.images.device)
        self.images.index_add_(0, idx, gx, alpha=sign)
        self.text.index_add_(0, idx, gt, alpha=sign)
        for acc, g in zip(self.sim, gsim):
            acc.add_(g, alpha=sign)

    def write(self) -> dict[str, float]:
        """Accumulate into the ``.grad`` of the synthetic set (like ``backward``); return norms."""
        syn = self.syn
        pairs = [(syn.images, self.images), (syn.text, self.text), *zip(syn.alphas, self.alphas),
                 *zip(syn.similarity.parameters(), self.sim)]
        for p, g in pairs:
            p.grad = g.clone() if p.grad is None else p.grad + g
        sim_sq = sum((g.pow(2).sum() for g in self.sim), torch.zeros((), dtype=self.images.dtype))
        return {"grad_norm_images": float(self.images.norm()), "grad_norm_text": float(self.text.norm()),
                "grad_norm_similarity": float(sim_sq.sqrt()), "grad_alpha_img": float(self.alphas[0]),
                "grad_alpha_txt": float(self.alphas[1])}


# --------------------------------------------------------------------------- shared pieces


def _denominators(theta_s: Params, theta_t: Params) -> list[Tensor | None]:
    """D_m = ||theta_s - theta_t||^2 per modality; None for an empty block (e.g. a frozen tower)."""
    out: list[Tensor | None] = []
    for name, s, t in zip(MODALITIES, theta_s, theta_t):
        if s.numel() == 0:
            out.append(None)
            continue
        d = (s - t).pow(2).sum()
        if not d > 0:
            raise ValueError(f"the {name} start and target snapshots are identical (distance {float(d)}); "
                             "check the trajectory range and distill.expert_epochs")
        out.append(d)
    return out


def _matching_losses(w_n: Params, theta_t: Params, denoms: list[Tensor | None]) -> list[Tensor]:
    return [torch.zeros((), dtype=w.dtype, device=w.device) if d is None else (w - t).pow(2).sum() / d
            for w, t, d in zip(w_n, theta_t, denoms)]


def _sgd(w: Params, alphas: list[Tensor], g: list[Tensor]) -> Params:
    """w_{i+1} = w_i - alpha g_i, per modality."""
    return tuple(v - a * gm for v, a, gm in zip(w, alphas, g))  # type: ignore[return-value]


def _advance(ctx: _Context, w: Params, step: Step) -> tuple[Params, list[Tensor]]:
    """One student step without a graph: (w_{i+1}, g_i)."""
    leaves = _leaves(w)
    loss, _ = ctx.loss(leaves, step, "const")
    g = _grads(loss, list(leaves))
    return _sgd(w, [a.detach() for a in ctx.syn.alphas], g), g


def _sweep(ctx: _Context, theta_s: Params, steps: list[Step],
           graphs: list[tuple[Step, list[Tensor], list[Tensor]]] | None = None) -> tuple[Params, Params]:
    """w_N and G = sum_i g_i, keeping no intermediate w_i; with ``graphs``, each g_i is taken with its graph
    and (step, data leaves, g_i) appended there instead (the same values)."""
    w, big_g = theta_s, [torch.zeros_like(v) for v in theta_s]
    for step in steps:
        if graphs is None:
            w, g = _advance(ctx, w, step)
        else:
            _, data, g_graph = _recompute(ctx, w, step)
            graphs.append((step, data, g_graph))
            g = [gm.detach() for gm in g_graph]
            w = _sgd(w, [a.detach() for a in ctx.syn.alphas], g)
        big_g = [acc_m + gm for acc_m, gm in zip(big_g, g)]
    return w, tuple(big_g)  # type: ignore[return-value]


def _recompute(ctx: _Context, w: Params, step: Step) -> tuple[Params, list[Tensor], list[Tensor]]:
    """g_i at w_i WITH a graph: (w leaves, [x_B, t_B, *similarity params], g_i)."""
    leaves = _leaves(w)
    loss, (x, t) = ctx.loss(leaves, step, "leaf")
    g = _grads(loss, list(leaves), create_graph=True)
    return leaves, [x, t, *ctx.syn.similarity.parameters()], g


# --------------------------------------------------------------------------- checkpoints (exact)


@functools.lru_cache(maxsize=None)
def _reversal_plan(length: int, states: int, swept: bool) -> tuple[float, int]:
    """(replayed steps, first split) of the cheapest way to visit w_{length-1} .. w_0 in reverse.

    w_0 is held; at most ``states`` more may be alive at once, the one being visited included.
    The segment is split at ``m``: advance to w_m and keep it, reverse [m, length) with one
    state fewer, drop w_m, reverse [0, m) with all of them. ``swept``: the first forward sweep
    passes over this segment anyway, so advancing to the split costs nothing. With one state,
    each w_i is replayed from w_0 in turn. This is the binomial checkpointing of Griewank and
    Walther (2000, "revolve"), optimal for a given number of states; infinite cost means
    infeasible (no state to hold w_i while it is visited).
    """
    if length <= 1:
        return 0, 0
    if states == 0:
        return math.inf, 0
    best: tuple[float, int] = (math.inf, 0)
    for m in range(1, length):
        cost = (0 if swept else m) + _reversal_plan(length - m, states - 1, swept)[0] \
            + _reversal_plan(m, states, False)[0]
        if cost < best[0]:
            best = (cost, m)
    return best


def exact_checkpoints(n: int) -> int:
    """Parameter vectors ``exact`` holds besides w_0 at N = ``n``: the fewest whose schedule replays < n steps.

    So ``exact`` costs at most one extra forward-backward step per step over the two passes it
    shares with ``first_order``. The count grows like sqrt(2N): 1 for N = 2..4, 2 for N = 5..8
    (the paper's N = 8), 3 for 9..13, 4 for 14..19, 5 for 20..26, 6 for 27..34. (Segments of
    sqrt(N) steps would hold 9 at N = 32 for 25 replays; this schedule needs 7 for 24.)
    Planning costs O(N^2 states) once per process (well under a second for N <= 100).
    """
    states = 0 if n <= 1 else 1
    while _reversal_plan(n, states, True)[0] > n - 1:
        states += 1
    return states


CHECKPOINT_MEMORY_FRACTION = 0.1
"""The phase default of ``exact``: extra w_i it holds may take this share of one step's graph memory."""


def graph_bytes(logits_fn: LogitsFn, loss: str | LossFn, synthetic: SyntheticSet, theta: Params,
                minibatch: int) -> int:
    """Bytes one inner step's double-backward graph saves (what both constant-memory rules hold per step).

    Runs one recomputation (forward, backward with a graph) of a ``minibatch`` of ``synthetic`` at
    ``theta`` and sums the distinct storages autograd saves for it, leaving out those that live anyway
    (the synthetic set, the parameter vectors). Values do not matter, only shapes.
    """
    ref = synthetic.images
    w = tuple(v.detach().to(device=ref.device, dtype=ref.dtype) for v in theta)
    resident = {t.untyped_storage().data_ptr() for t in (*w, *synthetic.tensors().values())}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ctx = _Context(logits_fn, resolve_loss(loss), synthetic)
    step = Step(torch.arange(min(minibatch, synthetic.n)), 0)
    with _double_backward_ready(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        graph = _recompute(ctx, w, step)
    del graph
    return sum(saved.values())


def budget_checkpoints(n: int, graph: int, vector: int, fraction: float = CHECKPOINT_MEMORY_FRACTION) -> int:
    """w_i ``exact`` holds at N = ``n`` when extra vectors may take ``fraction`` of a step's ``graph`` bytes.

    ``vector``: bytes of one parameter vector (both modalities). At least :func:`exact_checkpoints`
    (its replays stay below N), at most N - 1 (which keeps every w_i: no replays). Where the budget
    allows more than the replay rule, ``exact`` replays fewer steps at no memory above the budget
    (a small model, whose vectors are small against its step graph, holds more and replays less).
    """
    if n <= 1:
        return exact_checkpoints(n)
    by_memory = 1 + int(fraction * graph // max(vector, 1))
    return min(n - 1, max(exact_checkpoints(n), by_memory))


def default_exact_checkpoints(logits_fn: LogitsFn, loss: str | LossFn, synthetic: SyntheticSet, theta: Params,
                              minibatch: int, n: int) -> int:
    """The phase default of ``distill.exact_checkpoints``: :func:`budget_checkpoints` of this student's graph."""
    vector = sum(v.numel() for v in theta) * synthetic.images.element_size()
    graph = graph_bytes(logits_fn, loss, synthetic, theta, minibatch)
    held = budget_checkpoints(n, graph, vector)
    log.info("exact holds %d parameter vectors at N=%d (one step's graph %.1f MiB, a vector %.2f MiB)",
             held, n, graph / 2**20, vector / 2**20)
    return held


KEEP_GRAPHS_BYTES = 256 * 2**20
"""The phase default of ``first_order``'s ``keep_graphs``: keep the N step graphs when they take at most this
(the toy's 8 graphs of 11 MiB: kept; NFNet-L0's 2 of 193 MiB with their 146 MiB vectors: replayed, as a worker
of the paper recipe test took 3.2 GB with them kept and the machine ran out of memory)."""


def default_keep_graphs(logits_fn: LogitsFn, loss: str | LossFn, synthetic: SyntheticSet, theta: Params,
                        minibatch: int, n: int) -> bool:
    """The phase default of ``distill.keep_graphs``: whether N step graphs (each with its w_i) fit in
    :data:`KEEP_GRAPHS_BYTES`."""
    vector = sum(v.numel() for v in theta) * synthetic.images.element_size()
    graph = graph_bytes(logits_fn, loss, synthetic, theta, minibatch)
    keep = n * (graph + vector) <= KEEP_GRAPHS_BYTES
    log.info("first_order %s its %d step graphs (one %.1f MiB, a vector %.2f MiB; budget %.0f MiB)",
             "keeps" if keep else "replays instead of keeping", n, graph / 2**20, vector / 2**20,
             KEEP_GRAPHS_BYTES / 2**20)
    return keep


State = Any


class Checkpointed:
    """w_0 .. w_N of a deterministic recurrence, visited in reverse from a few kept states.

    ``advance(w_i, i)`` returns w_{i+1}. :meth:`sweep` runs w_0 -> w_N once, keeping the first
    checkpoints of the schedule; :meth:`reverse` then yields (i, w_i) for i = N-1 .. 0,
    replaying steps from the nearest kept state. Besides w_0, at most ``states`` states are
    alive at any time, the yielded one included (if the caller drops it before the next); the
    number of replayed steps is ``_reversal_plan(N, states, True)[0]`` (counted in ``replayed``).
    """

    def __init__(self, n: int, states: int, advance: Callable[[State, int], State]):
        if n > 1 and states < 1:
            raise ValueError(f"reversing {n} steps needs at least 1 state besides w_0, got {states}")
        self.n, self.states, self.advance = n, states, advance
        self.replayed = 0
        self._bounds: list[int] = []
        self._kept: dict[int, State] = {}

    def sweep(self, w0: State) -> State:
        """w_N, keeping the first-level checkpoints on the way."""
        points, position, free = [], 0, self.states
        while self.n - position > 1:
            position += _reversal_plan(self.n - position, free, True)[1]
            points.append(position)
            free -= 1
        self._bounds, self._kept = [0, *points, self.n], {0: w0}
        w = w0
        for i in range(self.n):
            w = self.advance(w, i)
            if i + 1 in points:
                self._kept[i + 1] = w
        return w

    def reverse(self) -> Iterator[tuple[int, State]]:
        """(i, w_i) for i = N-1 .. 0; call after :meth:`sweep`."""
        for j in reversed(range(len(self._bounds) - 1)):
            start, end = self._bounds[j], self._bounds[j + 1]
            yield from self._segment(start, end, self._kept.pop(start), self.states - j)

    def _replay(self, w: State, start: int, stop: int) -> State:
        for i in range(start, stop):
            w = self.advance(w, i)
        self.replayed += stop - start
        return w

    def _segment(self, start: int, end: int, w_start: State, free: int) -> Iterator[tuple[int, State]]:
        """Visit w_{end-1} .. w_start; w_start is kept by the caller, ``free`` more states may live."""
        if end - start == 1:
            yield start, w_start
        elif free == 1:  # the plan's only choice: replay each w_i from w_start
            for i in reversed(range(start + 1, end)):
                yield i, self._replay(w_start, start, i)
            yield start, w_start
        else:
            mid = start + _reversal_plan(end - start, free, False)[1]
            w_mid = self._replay(w_start, start, mid)
            yield from self._segment(mid, end, w_mid, free - 1)
            del w_mid
            yield from self._segment(start, mid, w_start, free)


# --------------------------------------------------------------------------- the three rules


def _first_order(ctx: _Context, theta_s: Params, steps: list[Step], theta_t: Params,
                 denoms: list[Tensor | None], acc: _Accumulator, keep_graphs: bool = False) -> list[Tensor]:
    """TESLA-style: c = alpha (theta_t - theta_s) + alpha^2 G; data grad = sum_i d/dData (2/D) c . g_i.

    Pass 1 finds w_N and G; pass 2 replays the steps from w_0 = theta_s, each g_i with a graph
    (its detached value is pass 1's g_i, bit for bit on CPU), so only w_0 and the current w_i
    live. ``keep_graphs``: pass 1 takes each g_i with its graph and keeps all N graphs, so pass 2
    only differentiates them (no replayed forward and backward: the same result in fewer
    operations, for N graphs' memory). Returns the per-modality matching losses.
    """
    alphas = [a.detach() for a in ctx.syn.alphas]
    graphs: list[tuple[Step, list[Tensor], list[Tensor]]] | None = [] if keep_graphs else None
    w_n, big_g = _sweep(ctx, theta_s, steps, graphs)
    losses = _matching_losses(w_n, theta_t, denoms)
    coef = [None if d is None else 2.0 * a * (t - w) / d for a, t, w, d in zip(alphas, theta_t, w_n, denoms)]
    for m, d in enumerate(denoms):
        if d is not None:
            acc.alphas[m] += 2.0 * _dot(w_n[m] - theta_t[m], -big_g[m]) / d
    del w_n, big_g
    if graphs is not None:
        for step, data, g in graphs:
            _add_data_grads(step, data, g, coef, acc)
        return losses
    w = theta_s
    for step in steps:
        w = _first_order_step(ctx, w, step, coef, alphas, acc)
    return losses


def _first_order_step(ctx: _Context, w: Params, step: Step, coef: list[Tensor | None], alphas: list[Tensor],
                      acc: _Accumulator) -> Params:
    """Add d/dData c . g_i at w_i; return w_{i+1} (the spent graph, which holds w_i, dies here)."""
    _, data, g = _recompute(ctx, w, step)
    _add_data_grads(step, data, g, coef, acc)
    return _sgd(w, alphas, [gm.detach() for gm in g])


def _add_data_grads(step: Step, data: list[Tensor], g: list[Tensor], coef: list[Tensor | None],
                    acc: _Accumulator) -> None:
    """Add d/dData c . g_i, through g_i's graph (spent here)."""
    q = sum(_dot(c, gm) for c, gm in zip(coef, g) if c is not None)
    gx, gt, *gsim = _grads(q, data)
    acc.add_batch(step.indices, gx, gt, gsim)


def _exact(ctx: _Context, theta_s: Params, steps: list[Step], theta_t: Params,
           denoms: list[Tensor | None], acc: _Accumulator, checkpoints: int) -> list[Tensor]:
    """Adjoint recursion: a_N = dM/dw_N; a_i = a_{i+1} - d/dw_i (A a_{i+1}) . g_i; data -= dq_i/dData.

    The w_i come in reverse order from :class:`Checkpointed`, at most ``checkpoints`` alive.
    The sweep takes the last step (w_N-1 -> w_N) with a graph and the reversal differentiates
    that graph first, so step N-1 runs once, not twice (the other steps' graphs would have to
    outlive later steps). Returns the per-modality matching losses.
    """
    alphas, last, taped = [a.detach() for a in ctx.syn.alphas], len(steps) - 1, []

    def advance(w: Params, i: int) -> Params:
        if i < last:  # only the sweep reaches step N-1 (every replay ends before it)
            return _advance(ctx, w, steps[i])[0]
        taped.append(_recompute(ctx, w, steps[i]))
        return _sgd(w, alphas, [gm.detach() for gm in taped[-1][2]])

    reversal = Checkpointed(len(steps), checkpoints, advance)
    w_n = reversal.sweep(theta_s)
    losses = _matching_losses(w_n, theta_t, denoms)
    adj = [torch.zeros_like(w) if d is None else 2.0 * (w - t) / d for w, t, d in zip(w_n, theta_t, denoms)]
    del w_n
    for i, w_i in reversal.reverse():
        adj = _adjoint_step(taped.pop() if i == last else _recompute(ctx, w_i, steps[i]), steps[i], alphas, adj, acc)
        del w_i
    return losses


def _adjoint_step(graph: tuple[Params, list[Tensor], list[Tensor]], step: Step, alphas: list[Tensor],
                  adj: list[Tensor], acc: _Accumulator) -> list[Tensor]:
    """One double backward of q_i = (A a_{i+1}) . g_i at w_i: data -= dq_i/dData; return a_i = a_{i+1} - dq_i/dw_i.

    ``graph`` is :func:`_recompute` at w_i; it dies here.
    """
    leaves, data, g = graph
    del graph
    for m, (a_m, g_m) in enumerate(zip(adj, g)):
        acc.alphas[m] -= _dot(a_m, g_m.detach())
    q = sum(_dot(alpha * a_m, g_m) for alpha, a_m, g_m in zip(alphas, adj, g))
    gx, gt, *rest = _grads(q, [*data, *leaves])
    gsim, gw = rest[: len(rest) - 2], rest[len(rest) - 2:]
    acc.add_batch(step.indices, gx, gt, gsim, sign=-1.0)
    return [a_m - gw_m for a_m, gw_m in zip(adj, gw)]


def _unrolled(ctx: _Context, theta_s: Params, steps: list[Step], theta_t: Params,
              denoms: list[Tensor | None], acc: _Accumulator) -> list[Tensor]:
    """Autograd through all N steps (the reference); returns the per-modality matching losses."""
    syn = ctx.syn
    w: Params = _leaves(theta_s)
    for step in steps:
        loss, _ = ctx.loss(w, step, "graph")
        g = _grads(loss, list(w), create_graph=True)
        w = tuple(v - a * gm for v, a, gm in zip(w, syn.alphas, g))  # type: ignore[assignment]
    losses = _matching_losses(w, theta_t, denoms)
    sim_params = list(syn.similarity.parameters())
    gx, gt, ga_img, ga_txt, *gsim = _grads(sum(losses), [syn.images, syn.text, *syn.alphas, *sim_params])
    acc.images += gx
    acc.text += gt
    acc.alphas[0] += ga_img
    acc.alphas[1] += ga_txt
    for a, g in zip(acc.sim, gsim):
        a += g
    return [m.detach() for m in losses]


# --------------------------------------------------------------------------- entry point


def resolve_loss(loss: str | LossFn) -> LossFn:
    """A loss callable from a name of ptmst_ray.models.losses (e.g. "WBCE") or a callable."""
    if callable(loss):
        return loss
    from ptmst_ray.models.losses import contrastive_loss

    return functools.partial(contrastive_loss, loss)


@contextlib.contextmanager
def _double_backward_ready() -> Iterator[None]:
    """Grad mode on, and the math SDPA kernel (fused CPU attention has no double backward)."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def matching_step(
    logits_fn: LogitsFn,
    loss: str | LossFn,
    synthetic: SyntheticSet,
    theta_s: Params,
    theta_t: Params,
    syn_steps: int,
    batches: MinibatchSampler | torch.Generator,
    method: str = "first_order",
    minibatch: int | None = None,
    checkpoints: int | None = None,
    keep_graphs: bool = False,
) -> dict[str, float]:
    """One distillation iteration: unroll ``syn_steps`` student steps from ``theta_s``, match ``theta_t``.

    ``theta_s``/``theta_t`` are (w_img, w_txt) flat vectors. ``batches`` is a
    :class:`MinibatchSampler` (state carried across iterations), or a generator from which a
    fresh sampler of ``minibatch`` pairs is made. Gradients are ACCUMULATED into ``.grad`` of
    the synthetic images, texts, similarity parameters and both step sizes (zero them first).
    ``checkpoints``: parameter vectors ``exact`` may hold at once besides ``theta_s``, the w_i
    being differentiated included (default ``exact_checkpoints(syn_steps)``); fewer cost more
    replayed steps, never a different result. ``keep_graphs`` (first_order): keep the N step graphs
    of the first pass instead of replaying the steps: fewer operations, N graphs' memory, the same
    result.
    Returns floats: ``loss`` (total M), ``loss_img``, ``loss_txt``, grad norms, alphas.
    """
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; use one of {', '.join(METHODS)}")
    if syn_steps < 1:
        raise ValueError(f"syn_steps must be >= 1, got {syn_steps}")
    if checkpoints is not None and checkpoints < 1:
        raise ValueError(f"checkpoints must be >= 1 (the w_i being differentiated), got {checkpoints}")
    sampler = batches if isinstance(batches, MinibatchSampler) else MinibatchSampler(
        synthetic.n, minibatch or synthetic.n, batches)
    ref = synthetic.images
    theta_s = tuple(v.detach().to(device=ref.device, dtype=ref.dtype) for v in theta_s)  # type: ignore[assignment]
    theta_t = tuple(v.detach().to(device=ref.device, dtype=ref.dtype) for v in theta_t)  # type: ignore[assignment]
    steps = [Step(sampler.next_indices(), sampler.next_seed()) for _ in range(syn_steps)]
    ctx = _Context(logits_fn, resolve_loss(loss), synthetic)
    denoms = _denominators(theta_s, theta_t)
    acc = _Accumulator(synthetic)
    with _double_backward_ready():
        if method == "exact":
            held = exact_checkpoints(syn_steps) if checkpoints is None else checkpoints
            losses = _exact(ctx, theta_s, steps, theta_t, denoms, acc, held)
        elif method == "first_order":
            losses = _first_order(ctx, theta_s, steps, theta_t, denoms, acc, keep_graphs)
        else:
            losses = _unrolled(ctx, theta_s, steps, theta_t, denoms, acc)
    out = {"loss": float(sum(losses)), "loss_img": float(losses[0]), "loss_txt": float(losses[1])}
    out.update(acc.write())
    out.update(alpha_img=float(synthetic.alpha_img.detach()), alpha_txt=float(synthetic.alpha_txt.detach()))
    return out
