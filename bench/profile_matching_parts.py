"""CPU time of one matching iteration split by part, first_order and exact side by side in one process.

Why this file exists: ``exact`` costs more than ``first_order`` per iteration (issue #6 asks for at most
1.3x). torch.profiler's operator tables say which kernels run, not which part of the algorithm pays for
them, and its overhead distorts a model this small. This script wraps the parts of
``ptmst_ray.distill.matching`` in cheap exclusive timers (``time.process_time``; a part's time excludes
the parts it calls) and runs the cases round-robin in one process, so load drift on a shared machine
hits every case alike. Parts:

* plain step: one student step without a graph (``_advance``: forward + backward); first_order's first
  sweep, exact's sweep and its checkpoint replays.
* recompute: the forward of a step recomputed with a graph; "bwd w/ graph": its backward (create_graph).
* double backward: first_order's d(c.g_i)/dData, or exact's one double backward w.r.t. data AND w_i.
* step rest: vector work around the double backward (q, the step-size dot products, w_{i+1} or a_i).

    PYTHONPATH=. .venv/bin/python bench/profile_matching_parts.py --steps 32 --exact 0 32 --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

import bench_matching as bm
import ptmst_ray.distill.matching as M

_acc: dict[str, float] = collections.defaultdict(float)
_stack: list[list] = []


def _timed(label: str, f):
    @functools.wraps(f)
    def g(*args, **kwargs):
        now = time.process_time()
        if _stack:
            _acc[_stack[-1][0]] += now - _stack[-1][1]
        _stack.append([label, now])
        try:
            return f(*args, **kwargs)
        finally:
            end = time.process_time()
            label_, start = _stack.pop()
            _acc[label_] += end - start
            if _stack:
                _stack[-1][1] = end
    return g


def _instrument() -> None:
    grads = M._grads

    def grads_labelled(out, inputs, create_graph=False, retain_graph=None):
        top = _stack[-1][0] if _stack else ""
        if top == "plain step":
            return grads(out, inputs, create_graph, retain_graph)
        label = "bwd w/ graph (recompute)" if create_graph else "double backward" if top == "step rest" else "other"
        return _timed(label, grads)(out, inputs, create_graph, retain_graph)

    M._grads = grads_labelled
    M._advance = _timed("plain step", M._advance)
    M._recompute = _timed("recompute forward", M._recompute)
    M._first_order_step = _timed("step rest", M._first_order_step)
    M._adjoint_step = _timed("step rest", M._adjoint_step)
    M._Accumulator.add_batch = _timed("add_batch", M._Accumulator.add_batch)
    M.matching_step = _timed("iteration rest", M.matching_step)  # bench_matching imports it at call time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=32, help="N")
    p.add_argument("--exact", type=int, nargs="+", default=[0], metavar="K",
                   help="exact_checkpoints values to profile (0 = the phase default)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    _instrument()
    cases = {"first_order": bm._setup("first_order", args.steps)[0]}
    cases.update({f"exact k={k or 'default'}": bm._setup("exact", args.steps, k or None)[0] for k in args.exact})
    for iteration in cases.values():
        iteration()  # warm-up
    res: dict[str, dict[str, list[float]]] = {c: collections.defaultdict(list) for c in cases}
    for _ in range(args.rounds):
        for name, iteration in cases.items():
            _acc.clear()
            t0 = time.process_time()
            iteration()
            res[name]["TOTAL"].append(time.process_time() - t0)
            for label, t in _acc.items():
                res[name][label].append(t)
    labels = sorted({label for r in res.values() for label in r}, key=lambda s: (s == "TOTAL", s))
    print(f"N={args.steps}: ms per iteration, median of {args.rounds} round-robin rounds (CPU time)\n")
    print("| part | " + " | ".join(cases) + " |\n|---|" + "---:|" * len(cases))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{statistics.median(res[c][label]) * 1e3:.1f}" if res[c][label] else "0"
                                         for c in cases) + " |")


if __name__ == "__main__":
    main()
