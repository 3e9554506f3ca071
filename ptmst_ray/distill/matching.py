"""One trajectory-matching iteration (ALGORITHM.md section 6) and its three gradient rules.

Why this file exists: this is the heart of PTM-ST. From a teacher start theta_s the student
takes N SGD steps on synthetic minibatches; the matching loss compares where it lands with the
teacher target theta_t, per modality (image tower, text head):

    M = sum_m || theta_s - alpha_m G_m - theta_t ||^2 / || theta_s - theta_t ||^2,  G = sum_i g_i.

Its gradient with respect to the synthetic images X, texts T, similarity S and step sizes
alpha reaches the data through every g_i. Three rules compute it:

* ``first_order`` (the paper's code, TESLA-style): holds each w_i constant; N+1 parameter
  vectors and one graph at a time.
* ``exact`` (ptmst_ray's own): the adjoint recursion of ALGORITHM.md 6.5, same memory, equal
  to full autograd through the unroll.
* ``unrolled``: plain autograd through all N steps (create_graph=True), the reference; its
  memory grows with N.

The student is any functional model ``logits_fn(w_img, w_txt, images, text_emb, seed)``;
the per-step seed makes the recomputation draw the same dropout masks as the unroll.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ptmst_ray.distill.synthetic import SyntheticSet

log = logging.getLogger(__name__)

__all__ = ["LogitsFn", "LossFn", "MinibatchSampler", "matching_step", "METHODS"]

LogitsFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]
"""(w_img, w_txt, images, text_emb, seed) -> b x b logits; twice differentiable; same seed, same masks."""
LossFn = Callable[[Tensor, Tensor], Tensor]
"""(logits, target) -> scalar loss."""
Params = tuple[Tensor, Tensor]
METHODS = ("first_order", "exact", "unrolled")
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


def _unroll(ctx: _Context, theta_s: Params, steps: list[Step]) -> tuple[list[Params], Params]:
    """w_0..w_N (no graph kept) and G = sum_i g_i."""
    alphas = [a.detach() for a in ctx.syn.alphas]
    w: Params = tuple(v.detach().clone() for v in theta_s)  # type: ignore[assignment]
    ws, big_g = [w], [torch.zeros_like(v) for v in w]
    for step in steps:
        leaves = _leaves(w)
        loss, _ = ctx.loss(leaves, step, "const")
        g = _grads(loss, list(leaves))
        w = tuple(v - a * gm for v, a, gm in zip(w, alphas, g))  # type: ignore[assignment]
        ws.append(w)
        big_g = [acc + gm for acc, gm in zip(big_g, g)]
    return ws, tuple(big_g)  # type: ignore[return-value]


def _recompute(ctx: _Context, w: Params, step: Step) -> tuple[Params, list[Tensor], list[Tensor]]:
    """g_i at the stored w_i WITH a graph: (w leaves, [x_B, t_B, *similarity params], g_i)."""
    leaves = _leaves(w)
    loss, (x, t) = ctx.loss(leaves, step, "leaf")
    g = _grads(loss, list(leaves), create_graph=True)
    return leaves, [x, t, *ctx.syn.similarity.parameters()], g


# --------------------------------------------------------------------------- the three rules


def _first_order(ctx: _Context, ws: list[Params], big_g: Params, steps: list[Step], theta_t: Params,
                 denoms: list[Tensor | None], acc: _Accumulator) -> None:
    """TESLA-style: c = alpha (theta_t - theta_s) + alpha^2 G; data grad = sum_i d/dData (2/D) c . g_i."""
    alphas = [a.detach() for a in ctx.syn.alphas]
    w_n = ws[-1]  # = theta_s - alpha G
    coef = [None if d is None else 2.0 * a * (t - w) / d for a, t, w, d in zip(alphas, theta_t, w_n, denoms)]
    for m, (c, g, w, t, d) in enumerate(zip(coef, big_g, w_n, theta_t, denoms)):
        if d is not None:
            acc.alphas[m] += 2.0 * _dot(w - t, -g) / d
    for w_i, step in zip(ws[:-1], steps):
        _, data, g = _recompute(ctx, w_i, step)
        q = sum(_dot(c, gm) for c, gm in zip(coef, g) if c is not None)
        gx, gt, *gsim = _grads(q, data)
        acc.add_batch(step.indices, gx, gt, gsim)


def _exact(ctx: _Context, ws: list[Params], steps: list[Step], theta_t: Params,
           denoms: list[Tensor | None], acc: _Accumulator) -> None:
    """Adjoint recursion: a_N = dM/dw_N; a_i = a_{i+1} - d/dw_i (A a_{i+1}) . g_i; data -= dq_i/dData."""
    alphas = [a.detach() for a in ctx.syn.alphas]
    adj = [torch.zeros_like(w) if d is None else 2.0 * (w - t) / d for w, t, d in zip(ws[-1], theta_t, denoms)]
    for i in reversed(range(len(steps))):
        leaves, data, g = _recompute(ctx, ws[i], steps[i])
        for m, (a_m, g_m) in enumerate(zip(adj, g)):
            acc.alphas[m] -= _dot(a_m, g_m.detach())
        q = sum(_dot(alpha * a_m, g_m) for alpha, a_m, g_m in zip(alphas, adj, g))
        gx, gt, *rest = _grads(q, [*data, *leaves])
        gsim, gw = rest[: len(rest) - 2], rest[len(rest) - 2:]
        acc.add_batch(steps[i].indices, gx, gt, gsim, sign=-1.0)
        adj = [a_m - gw_m for a_m, gw_m in zip(adj, gw)]


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
) -> dict[str, float]:
    """One distillation iteration: unroll ``syn_steps`` student steps from ``theta_s``, match ``theta_t``.

    ``theta_s``/``theta_t`` are (w_img, w_txt) flat vectors. ``batches`` is a
    :class:`MinibatchSampler` (state carried across iterations), or a generator from which a
    fresh sampler of ``minibatch`` pairs is made. Gradients are ACCUMULATED into ``.grad`` of
    the synthetic images, texts, similarity parameters and both step sizes (zero them first).
    Returns floats: ``loss`` (total M), ``loss_img``, ``loss_txt``, grad norms, alphas.
    """
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; use one of {', '.join(METHODS)}")
    if syn_steps < 1:
        raise ValueError(f"syn_steps must be >= 1, got {syn_steps}")
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
        if method == "unrolled":
            losses = _unrolled(ctx, theta_s, steps, theta_t, denoms, acc)
        else:
            ws, big_g = _unroll(ctx, theta_s, steps)
            losses = _matching_losses(ws[-1], theta_t, denoms)
            if method == "first_order":
                _first_order(ctx, ws, big_g, steps, theta_t, denoms, acc)
            else:
                _exact(ctx, ws, steps, theta_t, denoms, acc)
    out = {"loss": float(sum(losses)), "loss_img": float(losses[0]), "loss_txt": float(losses[1])}
    out.update(acc.write())
    out.update(alpha_img=float(synthetic.alpha_img.detach()), alpha_txt=float(synthetic.alpha_txt.detach()))
    return out
