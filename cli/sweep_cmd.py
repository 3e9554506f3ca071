"""`ptmst-ray sweep`: Ray Tune search over the config's sweep.space (thin: parse, call sweep.py, print)."""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import typer
from rich.table import Table

from ptmst_ray_cli.common import ConfigOpt, SetOpt, console, fail, get_run_config, progress_bars, say

from ptmst_ray.vocab import RECALLS

SWEEP_METRICS = ("r_mean", *RECALLS)


PHASE_WINDOW = {"range_start", "range_end", "start_min", "start_max"}


def _varying(dicts: list[dict]) -> list[str]:
    """The keys whose values differ between ``dicts`` (a missing key counts as a value), in first-seen order."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return [k for k in keys if len({repr(d.get(k)) for d in dicts}) > 1]


def cell_text(value, peers: list) -> str:
    """``value`` of one trial as a table cell, ``peers`` the same parameter's values in every trial. A whole phase
    shows only the settings in which the trials' phases differ (its window as ``[0, 10] starts 2-4``, others as
    ``pairs=20``), a phase list each phase so, joined by " + ": the full dicts wrapped a narrow column into a dozen
    lines a trial."""
    if isinstance(value, dict):
        keys = _varying([p for p in peers if isinstance(p, dict)]) or list(value)
        parts = []
        if PHASE_WINDOW <= set(value) and PHASE_WINDOW & set(keys):  # a phase's window, as the docs write it
            parts.append(f"[{value['range_start']}, {value['range_end']}] starts {value['start_min']}-"
                         f"{value['start_max']}")
            keys = [k for k in keys if k not in PHASE_WINDOW]
        parts += [f"{k}={value[k]}" for k in keys if k in value]
        return ", ".join(parts) or "{}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return " + ".join(
            f"({cell_text(v, [p[i] for p in peers if isinstance(p, list) and len(p) > i])})"
            if isinstance(v, dict) else str(v) for i, v in enumerate(value))
    return str(value)


def sweep_table(summary: dict, params: list[str]) -> Table:
    """One row a trial, best first. Where the data has a val split the trials were ranked on val recall (the
    columns' split), and each trial's test r_mean stands beside it, as in results.csv."""
    on_val = summary.get("selection") == "val"
    table = Table(title=f"sweep {summary['name']}: last-round quick evaluation (1 seed), best first"
                        + ("; recalls on val (what ranks the trials), test r_mean beside them" if on_val else ""))
    table.add_column("trial", no_wrap=True)
    for p in params:
        table.add_column(p, justify="right")
    metrics = list(SWEEP_METRICS)
    if on_val:
        metrics.insert(1, "test_r_mean")
    for m in metrics:
        table.add_column({"test_r_mean": "test r_mean", "r_mean": "val r_mean" if on_val else m}.get(m, m),
                         justify="right")
    for c in ("iters", "stopped", "status"):
        table.add_column(c)
    peers = {p: [r[p] for r in summary["rows"]] for p in params}
    for r in summary["rows"]:
        status = "error" if r["error"] else "diverged" if r["diverged"] else "ok"
        table.add_row(r["trial_id"], *[cell_text(r[p], peers[p]) for p in params],
                      *["-" if r.get(m) is None else f"{r[m]:.1f}" for m in metrics],
                      str(r["iterations"]), "yes" if r["stopped_early"] else "no", status)
    return table


def sweep_cmd(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
              samples: Optional[int] = typer.Option(None, "--samples", "-n", metavar="N", min=1, help="Trials to sample (sweep.num_samples)."),
              address: Optional[str] = typer.Option(None, "--address", metavar="ADDRESS",
                                                    help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
              ) -> None:
    """Search sweep.space with Ray Tune (ASHA stops poor trials); the same command resumes; writes best.yaml."""
    from ptmst_ray.orchestration.sweep import SweepError, SweepInterrupted, grid_trials, run_sweep, validate_sweep
    from ptmst_ray_cli.common import RichUI, connect_ray, interrupted, library_errors, root_lease

    overrides = list(set_ or []) + ([f"sweep.num_samples={samples}"] if samples is not None else [])
    cfg = get_run_config(config, overrides, address, joins_ray=True)
    try:
        validate_sweep(cfg)
    except SweepError as e:
        fail(str(e), code=2)
    if samples is not None and cfg.sweep.searcher == "grid":
        fail(f"--samples {samples}: the grid searcher runs every combination of sweep.space once "
             f"({grid_trials(cfg)} trials here); --samples counts the trials of the random and model-based searchers "
             "(--set sweep.searcher=random)")
    with root_lease(cfg, "sweep"):
        connect_ray(cfg, address)
        try:
            # Tune prints its trial tables to stdout; they are progress, and stdout is kept for what scripts read
            with contextlib.redirect_stdout(sys.stderr), progress_bars() as progress:
                summary = run_sweep(cfg, RichUI(progress))
        except (SweepError, *library_errors()) as e:
            fail(str(e), code=1)
        except SweepInterrupted as e:
            interrupted(f"Tune saved the sweep under {e.url}: the same command resumes it (finished trials are kept, "
                        "the others go on from their last round)")
        except KeyboardInterrupt:
            interrupted("finished work is kept (data, experts, shortcuts, finished trials); run the same command "
                        "again to resume the sweep")
    console.print(sweep_table(summary, list(cfg.sweep.space)))
    for err in summary["errors"]:
        say("trial error", "red", err)
    if "best" in summary:
        on = "val r_mean" if summary.get("selection") == "val" else "r_mean"
        console.print(f"best: {summary['best']['values']} ({on} {summary['best']['r_mean']:.1f}); "
                      f"run it: ptmst-ray run --config {summary['best']['yaml']}", soft_wrap=True)  # pasteable
    console.print(f"table: {summary['dir']}/results.csv (+ .parquet), plot: {summary['dir']}/r_mean.png", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `sweep` to the `ptmst-ray` app."""
    app.command("sweep")(sweep_cmd)
