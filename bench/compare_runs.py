"""Compare two run roots bit for bit: every stored tensor (pretraining, experts, shortcuts, phase subsets, the
distilled set; not Train's checkpoints) and results.json's figures per method and per seed.

Why this file exists: a change that must not change behaviour (a refactor) is checked by running the same
config into two fresh roots, one per version, and comparing them:

    .venv/bin/ptmst-ray run --set run.root=/tmp/before      # on the old commit
    .venv/bin/ptmst-ray run --set run.root=/tmp/after       # on the new one
    .venv/bin/python bench/compare_runs.py /tmp/before /tmp/after
"""
import glob
import json
import sys

import torch
from safetensors.torch import load_file
a_root, b_root = sys.argv[1], sys.argv[2]
bad = 0
files = sorted(glob.glob(f"{a_root}/**/*.safetensors", recursive=True))
files = [f for f in files if "/checkpoint_" not in f]
for f in files:
    g = f.replace(a_root, b_root, 1)
    a, b = load_file(f), load_file(g)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad += not same
    print("SAME" if same else "DIFF", f[len(a_root):])
ra, rb = (json.load(open(f"{r}/eval/results.json")) for r in (a_root, b_root))
for m in ra["methods"]:
    same = ra["methods"][m] == rb["methods"][m]
    bad += not same
    print("SAME" if same else "DIFF", "results", m, ra["methods"][m]["r_mean"], rb["methods"][m]["r_mean"])
print("runs", [(x["method"], x["seed"], x["best"]["r_mean"]) for x in ra["runs"]] == [(x["method"], x["seed"], x["best"]["r_mean"]) for x in rb["runs"]])
print("ALL SAME" if not bad else f"{bad} DIFFERENT")
