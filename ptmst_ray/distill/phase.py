"""The distillation loop of one phase: matching iterations, optimiser, EMA, checkpoints, metrics.

Why this file exists: a phase (docs/method.md#phases) is a long, independent run that a
Ray Train worker executes on its own accelerator, so it must resume exactly after a crash
and stop loudly when it diverges. Everything Ray-specific stays outside: the caller supplies
``save_checkpoint(state)`` and ``report(metrics, is_checkpoint)``; this module is plain PyTorch.

Randomness: the expert order and start epochs come from one torch generator (``seed``),
the minibatches and dropout seeds from another (``seed + BATCH_SEED_OFFSET``); both states are
in every checkpoint, so 3 + resume + 3 iterations equal 6 straight iterations bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
import resource
import sys
import time
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from ptmst_ray.config import DistillConfig, PhaseConfig
from ptmst_ray.distill.ema import EMA
from ptmst_ray.distill.matching import (
    LogitsFn, LossFn, MinibatchSampler, default_exact_checkpoints, default_keep_graphs, matching_step,
)
from ptmst_ray.distill.synthetic import SyntheticSet

log = logging.getLogger(__name__)

__all__ = ["DivergenceError", "PhaseTrainer", "TrajectorySource", "run_phase"]

BATCH_SEED_OFFSET = 7919
LR_PROBE_SEED_OFFSET = 104729
LR_PROBE_DRAWS = 8
"""distill.rel_lr_*: the gradient RMS is the root mean square over the first iteration's draw and this many
less one extra (expert, start, minibatches) draws from their own generator (a single draw varies ~3x)."""
SaveFn = Callable[[dict], None]
ReportFn = Callable[[dict, bool], None]


class TrajectorySource(Protocol):
    """Teacher snapshots of one phase range: shortcut (or raw) trajectories of several experts."""

    num_experts: int

    def snapshot(self, expert: int, k: int) -> tuple[Tensor, Tensor]:
        """(w_img, w_txt) flat vectors of ``expert`` at index k, relative to the range start."""
        ...


class DivergenceError(RuntimeError):
    """The matching loss or the synthetic state stopped being finite; the last finite EMA is kept."""

    def __init__(self, phase: int | str, iteration: int, detail: str):
        self.phase, self.iteration, self.detail = phase, iteration, detail
        super().__init__(
            f"phase {phase} diverged at iteration {iteration}: {detail}. The last finite EMA state was kept "
            "(and checkpointed). Lower distill.lr_img / lr_txt / lr_sim / lr_lr or distill.alpha_init, "
            "or set distill.min_alpha (or rel_min_alpha), then resume or rerun the phase."
        )

    def __reduce__(self):  # pickled by its fields, as ConfigError
        return type(self), (self.phase, self.iteration, self.detail)


def _mean_square(tensors: list[Tensor], over: list[Tensor]) -> float:
    """The sum of the squares of ``tensors`` over the number of entries of ``over`` (float64)."""
    return sum(float(t.detach().double().pow(2).sum()) for t in tensors) / sum(t.numel() for t in over)


def _peak_memory_mb(device_tensor: Tensor) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}
    if device_tensor.is_cuda:
        out["peak_accel_mb"] = torch.cuda.max_memory_allocated(device_tensor.device) / 2**20
    return out


class PhaseTrainer:
    """Distils one phase's synthetic set against a trajectory source; resumable, loud on divergence."""

    def __init__(self, phase_cfg: PhaseConfig, distill_cfg: DistillConfig, synthetic: SyntheticSet,
                 logits_fn: LogitsFn, trajectories: TrajectorySource, *, phase: int | str = 0, seed: int = 0,
                 save_checkpoint: SaveFn | None = None, report: ReportFn | None = None,
                 loss: str | LossFn | None = None, alpha_floors: tuple[float, float] | None = None):
        if synthetic.n != phase_cfg.pairs:
            raise ValueError(f"phase {phase}: synthetic set has {synthetic.n} pairs, the phase config {phase_cfg.pairs}")
        if trajectories.num_experts < 1:
            raise ValueError(f"phase {phase}: the trajectory source has no experts; train experts first")
        self.cfg, self.dcfg, self.synthetic = phase_cfg, distill_cfg, synthetic
        self.logits_fn, self.trajectories, self.phase = logits_fn, trajectories, phase
        self.loss = loss if loss is not None else distill_cfg.loss
        self.save_checkpoint, self.report = save_checkpoint, report
        self.alpha_floors = alpha_floors if alpha_floors is not None else \
            (None if distill_cfg.min_alpha is None else (distill_cfg.min_alpha, distill_cfg.min_alpha))
        """(img, txt) floors of the learned step sizes (``Config.alpha_floors``; default: distill.min_alpha)."""
        self.optimizer = self._build_optimizer()
        self.ema = EMA(synthetic.tensors(), distill_cfg.ema_decay_for(phase_cfg.iterations))
        self.traj_gen = torch.Generator().manual_seed(seed)
        self.sampler = MinibatchSampler(synthetic.n, phase_cfg.minibatch,
                                        torch.Generator().manual_seed(seed + BATCH_SEED_OFFSET))
        self.seed = seed
        self.iteration = 0
        self._expert_order: list[int] = []
        self._timer = (time.perf_counter(), 0)
        self._checkpoints: int | None = distill_cfg.exact_checkpoints or None  # 0 = the default
        self._keep: bool | None = distill_cfg.keep_graphs

    def _build_optimizer(self) -> torch.optim.Optimizer:
        syn, d = self.synthetic, self.dcfg
        groups = [
            {"params": [syn.images], "lr": d.lr_img},
            {"params": [syn.text], "lr": d.lr_txt},
            {"params": list(syn.alphas), "lr": d.lr_lr},
            {"params": list(syn.similarity.parameters()), "lr": d.lr_sim},
        ]
        return torch.optim.SGD(groups, lr=d.lr_img, momentum=d.momentum)

    # ------------------------------------------------------------------ the loop

    def run(self, until: int | None = None) -> dict[str, Tensor]:
        """Iterate up to ``until`` (default: the phase's iterations), checkpointing there; return the EMA state."""
        until = self.cfg.iterations if until is None else min(until, self.cfg.iterations)
        log.info("phase %s: iterations %d -> %d (%s, N=%d, b=%d)", self.phase, self.iteration, until,
                 self.dcfg.grad_method, self.dcfg.syn_steps, self.cfg.minibatch)
        while self.iteration < until:
            stats = self.step()
            self.iteration += 1
            is_checkpoint = (self.iteration % self.dcfg.checkpoint_every == 0
                             or self.iteration == until)  # a run stopped at `until` can resume there
            if is_checkpoint and self.save_checkpoint is not None:
                self.save_checkpoint(self.state_dict())
            if is_checkpoint or self.iteration % self.dcfg.report_every == 0:
                self._report(stats, is_checkpoint)
        return self.ema.state()

    def step(self) -> dict[str, Any]:
        """One iteration: pick teacher, match, optimiser step, clamp, EMA."""
        expert, start = self._next_expert(), self._draw_start(self.traj_gen)
        stats = self._match(expert, start, self.sampler)
        self._check_finite(stats)
        if self.iteration == 0:
            self._derive_learning_rates()
        self.optimizer.step()
        self._clamp_alphas()
        self._check_state()
        self.ema.update(self.synthetic.tensors())
        return {**stats, "expert": expert, "start_epoch": start}

    # ------------------------------------------------------------------ pieces

    def _match(self, expert: int, start: int, sampler: MinibatchSampler) -> dict[str, Any]:
        """The matching step against ``expert``'s segment from ``start``; fresh gradients on the synthetic set."""
        offset = start - self.cfg.range_start
        theta_s = self.trajectories.snapshot(expert, offset)
        theta_t = self.trajectories.snapshot(expert, offset + self.dcfg.expert_epochs)
        self.optimizer.zero_grad(set_to_none=True)
        return matching_step(self.logits_fn, self.loss, self.synthetic, theta_s, theta_t,
                             self.dcfg.syn_steps, sampler, method=self.dcfg.grad_method,
                             checkpoints=self._exact_checkpoints(theta_s), keep_graphs=self._keep_graphs(theta_s))

    def _exact_checkpoints(self, theta: tuple[Tensor, Tensor]) -> int | None:
        """``exact``'s held vectors: the config's, else the memory-budget default (measured once per phase)."""
        if self.dcfg.grad_method != "exact" or self._checkpoints is not None:
            return self._checkpoints
        self._checkpoints = default_exact_checkpoints(self.logits_fn, self.loss, self.synthetic, theta,
                                                      self.cfg.minibatch, self.dcfg.syn_steps)
        return self._checkpoints

    def _keep_graphs(self, theta: tuple[Tensor, Tensor]) -> bool:
        """``first_order``'s keep_graphs: the config's, else whether the N graphs fit (measured once per phase)."""
        if self.dcfg.grad_method != "first_order" or self._keep is not None:
            return bool(self._keep)
        self._keep = default_keep_graphs(self.logits_fn, self.loss, self.synthetic, theta, self.cfg.minibatch,
                                         self.dcfg.syn_steps)
        return self._keep

    def _next_expert(self) -> int:
        """Cycle through a shuffled order of the experts (a new shuffle when it runs out)."""
        if not self._expert_order:
            self._expert_order = torch.randperm(self.trajectories.num_experts, generator=self.traj_gen).tolist()
        return self._expert_order.pop(0)

    def _draw_start(self, gen: torch.Generator) -> int:
        span = self.cfg.start_max - self.cfg.start_min + 1
        return self.cfg.start_min + int(torch.randint(span, (1,), generator=gen).item())

    GROUPS = (("lr_img", "images"), ("lr_txt", "texts"), ("lr_lr", "step sizes"), ("lr_sim", "similarity"))
    """The optimiser's parameter groups, in order: their learning rate's name and what they hold."""

    def _derive_learning_rates(self) -> None:
        """distill.rel_lr_img / rel_lr_txt / rel_lr_lr / rel_lr_sim: set the group's lr to rel x RMS(x) / RMS(dM/dx)
        over the group's tensors, the gradient's RMS taken over this first iteration's draw and LR_PROBE_DRAWS - 1
        more (their own generator: the run's draws are unchanged), so that a typical update moves the images
        (texts, step sizes, similarity) by that fraction of their RMS. The first iteration's own gradients are
        restored for its update. Later iterations and resumes keep the learning rates (they are in the
        optimiser's state). A group without parameters (a similarity with none) is left as it is."""
        rels = (self.dcfg.rel_lr_img, self.dcfg.rel_lr_txt, self.dcfg.rel_lr_lr, self.dcfg.rel_lr_sim)
        wanted = [(group, name, what, rel) for group, (name, what), rel in zip(
            self.optimizer.param_groups, self.GROUPS, rels) if rel is not None and group["params"]]
        if not wanted:
            return
        syn = self.synthetic

        def mean_square(xs: list[Tensor]) -> float:  # of the gradients; a missing one counts as zeros
            return _mean_square([x.grad for x in xs if x.grad is not None], xs)

        squares = [[mean_square(group["params"])] for group, *_ in wanted]
        first = {n: p.grad for n, p in syn.named_parameters()}
        gen = torch.Generator().manual_seed(self.seed + LR_PROBE_SEED_OFFSET)
        sampler = MinibatchSampler(syn.n, self.cfg.minibatch, gen)
        for _ in range(LR_PROBE_DRAWS - 1):
            expert = int(torch.randint(self.trajectories.num_experts, (1,), generator=gen).item())
            self._match(expert, self._draw_start(gen), sampler)
            for sq, (group, *_) in zip(squares, wanted):
                sq.append(mean_square(group["params"]))
        for n, p in syn.named_parameters():
            p.grad = first[n]
        for sq, (group, name, what, rel) in zip(squares, wanted):
            grad_rms = math.sqrt(sum(sq) / len(sq))
            if grad_rms == 0.0 or not math.isfinite(grad_rms):
                raise ValueError(f"phase {self.phase}: distill.rel_{name} cannot set {name}: the matching gradient "
                                 f"of the synthetic {what} is {grad_rms} over the first iteration's draws; set "
                                 f"distill.{name} instead")
            group["lr"] = rel * math.sqrt(_mean_square(group["params"], group["params"])) / grad_rms
            log.info("phase %s: %s = %.4g (distill.rel_%s %.4g x RMS / gradient RMS over %d draws)", self.phase, name,
                     group["lr"], name, rel, len(sq))

    def learning_rates(self) -> dict[str, float]:
        """The current learning rates of the images, texts, step sizes and similarity (derived ones after the
        first iteration)."""
        return {name: group["lr"] for group, (name, _) in zip(self.optimizer.param_groups, self.GROUPS)}

    @torch.no_grad()
    def _clamp_alphas(self) -> None:
        if self.alpha_floors is not None:
            for a, floor in zip(self.synthetic.alphas, self.alpha_floors):
                a.clamp_(min=floor)

    def _check_finite(self, stats: dict[str, Any]) -> None:
        if not math.isfinite(stats["loss"]):
            self._diverge(f"matching loss is {stats['loss']}")
        bad = [n for n, p in self.synthetic.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            self._diverge(f"non-finite gradient for {', '.join(bad)}")

    def _check_state(self) -> None:
        """After the optimiser step: every learned tensor finite, and (unless distill.min_alpha clamps them)
        both learned step sizes positive: a student cannot train with a step size at or below zero, so the
        EMA of the iterations before is kept, as for any divergence."""
        bad = [n for n, p in self.synthetic.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self._diverge(f"the optimiser step made {', '.join(bad)} non-finite")
        if self.alpha_floors is None:
            low = [f"{n} = {float(a.detach()):.4g}" for n, a in zip(("alpha_img", "alpha_txt"), self.synthetic.alphas)
                   if float(a.detach()) <= 0]
            if low:
                self._diverge(f"the learned step size {', '.join(low)} is not positive (no floor: distill.min_alpha "
                              "and rel_min_alpha are unset)")

    def _diverge(self, detail: str) -> None:
        """Checkpoint the (finite) EMA and raise; the raw state of this iteration is not averaged in."""
        error = DivergenceError(self.phase, self.iteration + 1, detail)
        log.error("%s", error)
        if self.save_checkpoint is not None:
            state = self.state_dict()
            state["diverged"] = {"iteration": self.iteration + 1, "detail": detail}
            self.save_checkpoint(state)
        raise error

    def _report(self, stats: dict[str, Any], is_checkpoint: bool) -> None:
        start, done = self._timer
        now = time.perf_counter()
        metrics = {"phase": self.phase, "iteration": self.iteration, **stats, **self.learning_rates(),
                   "ema_decay": self.ema.decay,
                   "sec_per_iter": (now - start) / max(1, self.iteration - done),
                   **_peak_memory_mb(self.synthetic.images)}
        self._timer = (now, self.iteration)
        log.info("phase %s it %d: M=%.4g alpha=(%.4g, %.4g)", self.phase, self.iteration, stats["loss"],
                 stats["alpha_img"], stats["alpha_txt"])
        if self.report is not None:
            self.report(metrics, is_checkpoint)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (deep copies: later steps do not alter it)."""
        return copy.deepcopy({
            "phase": self.phase,
            "iteration": self.iteration,
            "synthetic": self.synthetic.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"trajectory": self.traj_gen.get_state(), "batches": self.sampler.state_dict()},
            "expert_order": list(self._expert_order),
        })

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output (e.g. ``ray.train.get_checkpoint()`` contents)."""
        if state["iteration"] > self.cfg.iterations:
            raise ValueError(f"phase {self.phase}: checkpoint is at iteration {state['iteration']}, "
                             f"past the configured {self.cfg.iterations}")
        self.synthetic.load_state_dict(state["synthetic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.traj_gen.set_state(state["rng"]["trajectory"])
        self.sampler.load_state_dict(state["rng"]["batches"])
        self._expert_order = list(state["expert_order"])
        self.iteration = int(state["iteration"])
        self._timer = (time.perf_counter(), self.iteration)
        log.info("phase %s: resumed at iteration %d", self.phase, self.iteration)


def run_phase(phase_cfg: PhaseConfig, distill_cfg: DistillConfig, synthetic: SyntheticSet, logits_fn: LogitsFn,
              trajectories: TrajectorySource, *, phase: int | str = 0, seed: int = 0,
              save_checkpoint: SaveFn | None = None, report: ReportFn | None = None,
              resume_from: dict[str, Any] | None = None, loss: str | LossFn | None = None) -> dict[str, Tensor]:
    """Distil one phase (resuming from ``resume_from`` if given); return the final EMA state."""
    trainer = PhaseTrainer(phase_cfg, distill_cfg, synthetic, logits_fn, trajectories, phase=phase, seed=seed,
                           save_checkpoint=save_checkpoint, report=report, loss=loss)
    if resume_from is not None:
        trainer.resume(resume_from)
    return trainer.run()
