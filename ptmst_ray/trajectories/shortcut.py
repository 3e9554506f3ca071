"""Shortcut trajectories (docs/method.md#shortcut-trajectories): an expert's range [a, b] as a straight path.

Why this file exists: PTM-ST matches against a *shortcut* of each expert trajectory. For
every parameter tensor l the shortcut keeps the two end points theta_a, theta_b and the
expert's per-tensor pace, beta_l(k) = (distance travelled in steps p < k) / (total
distance), but drops the oscillation between the end points:

    theta~_l(k) = (1 - beta_l(k)) * theta_{a,l} + beta_l(k) * theta_{b,l},   k = 0..K.

So the compact form (theta_a, theta_b and a (K+1) x layers table of betas, about 2P floats)
is all that has to be stored; any snapshot is rebuilt on demand. The paper's code writes
the materialised (K+1) x P form instead. :class:`RawTrajectory` offers the same
``snapshot(k)`` interface over the unmodified expert snapshots (the no-shortcut ablation).

Pure PyTorch: no Ray here (the Ray layer calls these functions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Snapshot = dict[str, Tensor]

BETA_DTYPE = torch.float64
"""The beta table is kept in float64: it is tiny and the cumulative sums stay exact enough."""

FORMAT = "ptmst-shortcut/1"


def _check_range(num_snapshots: int, start: int, end: int) -> None:
    if not 0 <= start < end < num_snapshots:
        raise ValueError(
            f"shortcut range [{start}, {end}] is not inside the trajectory's epochs 0..{num_snapshots - 1} "
            "with start < end; choose range_start < range_end <= experts.epochs"
        )


def _check_same_layout(snapshots: Sequence[Mapping[str, Tensor]]) -> None:
    """Every snapshot must hold the same tensor names with the same shapes."""
    ref = snapshots[0]
    for i, snap in enumerate(snapshots[1:], start=1):
        if snap.keys() != ref.keys():
            missing = sorted(set(ref) ^ set(snap))[:3]
            raise ValueError(f"snapshot {i} has different parameter names than the first one (e.g. {missing})")
        for name, t in snap.items():
            if t.shape != ref[name].shape:
                raise ValueError(f"snapshot {i}: {name} has shape {tuple(t.shape)}, expected {tuple(ref[name].shape)}")


def _beta_row(steps: Sequence[Tensor]) -> Tensor:
    """beta(0..K) of one tensor from its K+1 snapshots: cumulative path length / total length."""
    d = torch.stack([(steps[p + 1].to(BETA_DTYPE) - steps[p].to(BETA_DTYPE)).norm() for p in range(len(steps) - 1)])
    cumulative = torch.cat([torch.zeros(1, dtype=BETA_DTYPE), torch.cumsum(d.cpu(), 0)])
    total = cumulative[-1]
    if total.item() == 0.0:  # the tensor never moved: both end points are equal, any beta works
        return torch.zeros_like(cumulative)
    beta = (cumulative / total).clamp_(0.0, 1.0)
    beta[-1] = 1.0  # exact end point even with rounding in the sum
    return beta


def _check_k(k: int, num_steps: int, what: str) -> None:
    if not 0 <= k <= num_steps:
        raise IndexError(
            f"{what} index {k} is outside 0..{num_steps}: indices are relative to the range start "
            f"(k = epoch - start) and the range has {num_steps} steps"
        )


def _nbytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class ShortcutTrajectory:
    """Compact shortcut of epochs [start, end]: end points plus a per-tensor beta table."""

    theta_a: Snapshot
    theta_b: Snapshot
    beta: dict[str, Tensor]
    """{name: float64 tensor of K+1}: beta[name][k] is tensor name's position at step k."""
    start: int = 0
    """Absolute epoch a of the range (index k = 0)."""

    @property
    def num_steps(self) -> int:
        """K = end - start."""
        return len(next(iter(self.beta.values()))) - 1

    @property
    def end(self) -> int:
        return self.start + self.num_steps

    @property
    def names(self) -> list[str]:
        return list(self.theta_a)

    @property
    def nbytes(self) -> int:
        """Bytes of the compact form: theta_a + theta_b + the beta table."""
        return _nbytes(self.theta_a) + _nbytes(self.theta_b) + _nbytes(self.beta)

    @property
    def materialised_nbytes(self) -> int:
        """Bytes of the same K+1 snapshots written out in full ((K+1) * P * itemsize)."""
        return (self.num_steps + 1) * _nbytes(self.theta_a)

    def snapshot(self, k: int) -> Snapshot:
        """theta~(k) for k = 0..K (relative to ``start``), on the end points' device and dtype."""
        _check_k(k, self.num_steps, "shortcut snapshot")
        out = {}
        for name, a in self.theta_a.items():
            beta = float(self.beta[name][k])
            out[name] = a * (1.0 - beta) + self.theta_b[name] * beta
        return out

    def materialise(self) -> list[Snapshot]:
        """All K+1 snapshots (the form the paper's code stores)."""
        return [self.snapshot(k) for k in range(self.num_steps + 1)]

    def to(self, device: torch.device | str) -> "ShortcutTrajectory":
        """A copy with the end points on ``device`` (snapshots are then rebuilt there)."""
        return ShortcutTrajectory(
            {n: t.to(device) for n, t in self.theta_a.items()},
            {n: t.to(device) for n, t in self.theta_b.items()},
            dict(self.beta),
            self.start,
        )


@dataclass
class RawTrajectory:
    """The expert's own snapshots of epochs [start, end], with the shortcut's interface (ablation)."""

    snapshots: list[Snapshot]
    start: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.snapshots) - 1

    @property
    def end(self) -> int:
        return self.start + self.num_steps

    @property
    def names(self) -> list[str]:
        return list(self.snapshots[0])

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(s) for s in self.snapshots)

    @property
    def materialised_nbytes(self) -> int:
        return self.nbytes

    def snapshot(self, k: int) -> Snapshot:
        _check_k(k, self.num_steps, "raw trajectory snapshot")
        return dict(self.snapshots[k])

    def materialise(self) -> list[Snapshot]:
        return [dict(s) for s in self.snapshots]


def shortcut_trajectory(snapshots: Sequence[Mapping[str, Tensor]], start: int, end: int) -> ShortcutTrajectory:
    """The shortcut of ``snapshots[start..end]`` (epochs 0..K_e of one expert); see module doc."""
    _check_range(len(snapshots), start, end)
    window = list(snapshots[start : end + 1])
    _check_same_layout(window)
    beta = {name: _beta_row([s[name] for s in window]) for name in window[0]}
    theta_a = {n: t.detach() for n, t in window[0].items()}
    theta_b = {n: t.detach() for n, t in window[-1].items()}
    return ShortcutTrajectory(theta_a, theta_b, beta, start)


def raw_trajectory(snapshots: Sequence[Mapping[str, Tensor]], start: int, end: int) -> RawTrajectory:
    """``snapshots[start..end]`` unchanged, behind the shortcut's interface."""
    _check_range(len(snapshots), start, end)
    window = [dict(s) for s in snapshots[start : end + 1]]
    _check_same_layout(window)
    return RawTrajectory(window, start)


# --------------------------------------------------------------------------- (de)serialisation


def to_tensors(traj: ShortcutTrajectory) -> dict[str, Tensor]:
    """Flat {key: tensor} of the compact form: "a/<name>", "b/<name>", "beta/<name>"."""
    out: dict[str, Tensor] = {}
    for prefix, part in (("a", traj.theta_a), ("b", traj.theta_b), ("beta", traj.beta)):
        for name, t in part.items():
            out[f"{prefix}/{name}"] = t.detach().to("cpu").contiguous().clone()
    return out


def from_tensors(tensors: Mapping[str, Tensor], names: Sequence[str], start: int) -> ShortcutTrajectory:
    """Inverse of :func:`to_tensors`; ``names`` gives the parameter order."""
    missing = [f"{p}/{n}" for n in names for p in ("a", "b", "beta") if f"{p}/{n}" not in tensors]
    if missing:
        raise KeyError(f"shortcut file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    theta_a = {n: tensors[f"a/{n}"] for n in names}
    theta_b = {n: tensors[f"b/{n}"] for n in names}
    beta = {n: tensors[f"beta/{n}"] for n in names}
    return ShortcutTrajectory(theta_a, theta_b, beta, start)


def shortcut_sidecar(traj: ShortcutTrajectory, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON sidecar's content (without the file hash, which the writer adds)."""
    return {
        "format": FORMAT,
        "start": traj.start,
        "end": traj.end,
        "num_steps": traj.num_steps,
        "params": [
            {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in traj.theta_a.items()
        ],
        "nbytes": traj.nbytes,
        "materialised_nbytes": traj.materialised_nbytes,
        "meta": dict(meta),
    }


# --------------------------------------------------------------------------- storage figures


def storage_figures(
    param_count: int,
    ranges: Sequence[tuple[int, int]],
    num_experts: int,
    itemsize: int = 4,
    num_tensors: int = 0,
) -> dict[str, Any]:
    """Materialised vs compact bytes per shortcut range (per expert and for all experts).

    materialised = (K+1) * P * itemsize; compact = 2 * P * itemsize + (K+1) * num_tensors * 8
    (the float64 beta table; pass ``num_tensors`` = parameter tensors per snapshot to count it).
    """
    rows = []
    for a, b in ranges:
        k = b - a
        materialised = (k + 1) * param_count * itemsize
        compact = 2 * param_count * itemsize + (k + 1) * num_tensors * torch.finfo(BETA_DTYPE).bits // 8
        rows.append(
            {
                "range": [a, b],
                "steps": k,
                "materialised_bytes_per_expert": materialised,
                "compact_bytes_per_expert": compact,
                "materialised_bytes": materialised * num_experts,
                "compact_bytes": compact * num_experts,
                "ratio": materialised / compact,
            }
        )
    return {
        "param_count": param_count,
        "num_tensors": num_tensors,
        "itemsize": itemsize,
        "num_experts": num_experts,
        "ranges": rows,
        "materialised_bytes": sum(r["materialised_bytes"] for r in rows),
        "compact_bytes": sum(r["compact_bytes"] for r in rows),
    }
