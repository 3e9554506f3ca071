"""Pipeline stage commands of `ptmst-ray` (each: load config, start/join Ray, call the library, show progress)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ptmst_ray.config import find_config
from ptmst_ray_cli.common import (
    ConfigOpt, RichUI, SetOpt, connect_ray, console, explain, fail, get_config, get_run_config, interrupted,
    library_errors, progress_bars, refuse_held_root, root_lease, say,
)
from ptmst_ray_cli.main import app

data_app = typer.Typer(help="Prepare and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

AddressOpt = typer.Option(None, "--address", metavar="ADDRESS", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")


def results_table(results: dict) -> Table:
    """One row per method: the recalls at the chosen evaluation point, then r_mean at the final epoch; with a val
    split (``selection: val``) also r_mean at the best point on test (the paper's figure) and val r_mean there."""
    from ptmst_ray.vocab import METRICS as METRIC_COLUMNS

    def stat(s: dict) -> str:
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    by_val = results.get("selection") == "val"
    table = Table(title=f"retrieval recall (%), mean ± std over seeds; {results['protocol']}")
    table.add_column("method", no_wrap=True)
    table.add_column("pairs", justify="right")
    for c in METRIC_COLUMNS:
        table.add_column(c, justify="right")
    table.add_column("r_mean final", justify="right")
    if by_val:
        table.add_column("r_mean best on test", justify="right")
        table.add_column("val r_mean", justify="right")
    for method, m in results["methods"].items():
        extra = [stat(m["best_on_test"]["r_mean"]), stat(m["val"]["r_mean"])] if by_val else []
        table.add_row(method, str(m["pairs"]), *[stat(m[c]) for c in METRIC_COLUMNS], stat(m["final"]["r_mean"]),
                      *extra)
    return table


def stage_table(results: dict) -> Table:
    """Each stage's wall time and whether it did work or found everything complete."""
    table = Table(title=f"stages: {results.get('wall_seconds', 0):.0f} s in all")
    for c, justify in (("stage", "left"), ("seconds", "right"), ("", "left")):
        table.add_column(c, justify=justify)
    for row in results.get("stages", []):
        built = f"; built in {row['built_seconds']:.1f} s" if "built_seconds" in row else ""
        table.add_row(row["stage"], f"{row['seconds']:.1f}", "ran" if row["ran"] else f"skipped (complete{built})")
    return table


@app.command()
def run(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt, address: Optional[str] = AddressOpt,
        json_out: bool = typer.Option(False, "--json", help="Also print results.json to stdout."),
        rebuild: Optional[str] = typer.Option(
            None, "--rebuild", metavar="STAGE",
            help="Delete STAGE's artefacts and every later stage's, then run: data, pretrain, embed, experts, "
                 "shortcut, phases, aggregate or eval (e.g. after a corrupt-file error)."),
        as_job: bool = typer.Option(
            False, "--as-job",
            help="Run as a Ray Job of a local Ray this command starts on free ports (so it works beside another "
                 "Ray) and stops when the job ends: the dashboard's Jobs page has the run's log; the terminal "
                 "follows that log (plain lines, no progress bars).")) -> None:
    """Run the whole pipeline (data, pretrain, experts, shortcuts, phases, aggregate, eval); resumes."""
    from ptmst_ray import layout
    from ptmst_ray.orchestration.pipeline import run_pipeline
    from ptmst_ray.vocab import STAGES

    cfg = get_run_config(config, set_, address, joins_ray=not as_job)  # --as-job starts a Ray of its own
    if rebuild is not None and rebuild not in STAGES:
        fail(f"--rebuild {rebuild!r}: not a stage; choose one of {', '.join(STAGES)}")
    if as_job:
        from ptmst_ray_cli.dashboard_cmd import run_as_job

        if address or cfg.run.address:
            fail("--as-job starts its own local Ray; on a running cluster use `ptmst-ray launch --address URL`")
        refuse_held_root(cfg)  # before a Ray is started for a job whose driver would be refused
        raise typer.Exit(run_as_job(cfg, [*(["--config", config if "://" in config else str(Path(find_config(config)).resolve())]
                                            if config else []),
                                          *[a for s in set_ or [] for a in ("--set", s)],
                                          *(["--rebuild", rebuild] if rebuild else []),
                                          *(["--json"] if json_out else [])]))
    with root_lease(cfg, "run"):
        try:
            if rebuild is not None:
                if not layout.rebuild(cfg, rebuild):  # what it removes is logged folder by folder as it goes
                    console.print(f"rebuild {rebuild}: nothing to remove (not built yet)")
            connect_ray(cfg, address)
            with progress_bars() as progress:
                results = run_pipeline(cfg, RichUI(progress))
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        except KeyboardInterrupt:
            interrupted()
    for w in results.get("warnings", []):
        say("warning", "bold yellow", w)
    for line in window_lines(results["experts"].get("windows", [])):
        console.print(line)
    console.print(results_table(results))
    console.print(stage_table(results))
    for line in ratio_lines(results):
        console.print(line)
    paths = layout.Layout.of(cfg)
    console.print(f"results: {paths.results}, plot: {paths.plot}, distilled set: {paths.distilled}/", soft_wrap=True)
    if json_out:
        typer.echo(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


def ratio_lines(results: dict) -> list[str]:
    """PTM-ST against each baseline: the ratio of r_means (with a val split, the best-on-test ratio beside) and
    the same seed by seed (each seed's students start alike for every method)."""
    on_test = results.get("ratios_best_on_test", {})
    per_seed = results.get("per_seed", {})
    lines = []
    for k, v in results.get("ratios", {}).items():
        line = f"{k}: {v:.2f}x" + (f" (best on test: {on_test[k]:.2f}x)" if k in on_test else "")
        if k in per_seed:
            d = per_seed[k]
            line += (f"; ahead in {d['ahead']} of {d['seeds']} seed{'s' if d['seeds'] != 1 else ''} "
                     f"({d['mean']:+.1f} ± {d['std']:.1f} r_mean a seed)")
        lines.append(line)
    return lines


@data_app.command("prepare")
def data_prepare(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                 workers: Optional[int] = typer.Option(
                     None, "--workers", metavar="N", help="Decode images in up to N Ray tasks at once (same output; "
                                             "default: data.workers, 1 = in this process).")) -> None:
    """Read annotations + images (any fsspec URL) into Parquet shards with manifests under the run root."""
    from ptmst_ray.data.prepare import is_prepared
    from ptmst_ray.layout import Layout
    from ptmst_ray.stages.data import prepare

    cfg = get_run_config(config, [*(set_ or []), *([f"data.workers={workers}"] if workers is not None else [])],
                         data_only=True)
    with root_lease(cfg, "data prepare"):
        try:
            if cfg.data.workers > 1 and not is_prepared(cfg.data, Layout.of(cfg).data):
                connect_ray(cfg, None, models=False)  # decoding tasks only
            with progress_bars() as progress:
                ids: dict = {}

                def cb(split: str, done: int, total: int) -> None:
                    if split not in ids:
                        ids[split] = progress.add_task(f"data {split}", total=total, info="")
                    progress.update(ids[split], completed=done, total=total)

                prepare(cfg, progress=cb)
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        except KeyboardInterrupt:
            interrupted("the splits already prepared are kept; run the same command again to prepare the rest")
    console.print(f"prepared: {Layout.of(cfg).data}")


@data_app.command("show")
def data_show(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
              split: Optional[str] = typer.Option(None, metavar="SPLIT", help="Only this split (train, test, val, "
                                                  "pretrain: those prepared), in the summary and on the sheet "
                                                  "(default: every split; the sheet draws train)."),
              sheet: Optional[Path] = typer.Option(None, metavar="PNG", help="Write a PNG contact sheet of images with captions."),
              n: int = typer.Option(16, metavar="N", help="Images on the contact sheet.")) -> None:
    """Counts and sample rows of the prepared data; optionally a PNG contact sheet."""
    from ptmst_ray import storage
    from ptmst_ray.data.show import UnknownSplit, contact_sheet, summarize
    from ptmst_ray.layout import Layout

    cfg = get_config(config, set_)
    data_dir = Layout.of(cfg).data
    try:
        storage.check_readable(cfg.run.root)  # an unreachable or refused store: one line, in seconds
    except storage.StorageError as e:
        fail(f"{config or 'the default config'}: run.root: {e}")
    try:
        typer.echo(json.dumps(summarize(data_dir, split=split), indent=2, default=str))
        if sheet is not None:
            contact_sheet(data_dir, split or "train", str(sheet.resolve()), n=n)
            console.print(f"contact sheet: {sheet}")
    except UnknownSplit as e:  # before anything is printed
        fail(f"--split {split}: {e}")
    except library_errors() as e:
        fail(explain(cfg, e), code=1)


@app.command()
def pretrain(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Pretrain the (tiny) towers on the built-in dataset's disjoint pretraining split."""
    from ptmst_ray import storage
    from ptmst_ray.stages.data import prepare
    from ptmst_ray.stages.pretrain import pretrain as pretrain_stage

    cfg = get_run_config(config, set_)
    if not cfg.pretrain.enabled:
        fail("pretrain.enabled is false in this config; nothing to do", code=2)
    with root_lease(cfg, "pretrain"):
        try:
            prepare(cfg)
            writes = storage.writes()  # the stage writes no file when the towers are pretrained already
            with progress_bars() as progress:
                task = progress.add_task("pretrain", total=cfg.pretrain.epochs, info="")
                manifest = pretrain_stage(cfg, progress=lambda d, t: progress.update(task, completed=d, total=t))
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        except KeyboardInterrupt:
            interrupted("the prepared data is kept; run the same command again to pretrain")
    console.print(f"{'skipped (complete): ' if storage.writes() == writes else ''}pretrained towers: {cfg.model.pretrained}; zero-shot "
                  f"test r_mean {manifest['zero_shot']['r_mean']:.1f} (the towers the experts start from, before any "
                  "training on the train split)", soft_wrap=True)


def _ready_for_experts(cfg) -> None:
    from ptmst_ray.stages.data import prepare
    from ptmst_ray.stages.embed import embed
    from ptmst_ray.stages.features import compute as frozen_tower_features
    from ptmst_ray.stages.pretrain import pretrain as pretrain_stage

    prepare(cfg)
    pretrain_stage(cfg)
    embed(cfg)
    frozen_tower_features(cfg)  # a frozen image tower's features, once (nothing when the tower trains)


@app.command()
def experts(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt, address: Optional[str] = AddressOpt,
            rebuild: bool = typer.Option(False, "--rebuild", help="Delete stored experts, shortcuts and later stages first.")) -> None:
    """Train the expert trajectories on Ray actors (and their shortcut trajectories); skips finished experts.

    With experts.lr_img auto the learning-rate rule's probe experts run first (one per experts.lr_candidates); with
    a phase's range_end auto the windows' rule picks it from expert 0 before any shortcut is written."""
    from ptmst_ray.layout import rebuild as rebuild_stage
    from ptmst_ray.orchestration.experts import experts_stored, run_expert_lr, run_experts, stored_experts_summary
    from ptmst_ray.orchestration.runtime import make_poll, progress_board

    cfg = get_run_config(config, set_, address, joins_ray=True)
    with root_lease(cfg, "experts"):
        try:
            _ready_for_experts(cfg)
            if rebuild:  # the same as `run --rebuild experts`: later stages were computed from these experts
                rebuild_stage(cfg, "experts")
            if experts_stored(cfg):  # nothing to train or write: the summary needs no Ray (~10 s to start one)
                out = stored_experts_summary(cfg)
            else:
                connect_ray(cfg, address)
                with progress_bars() as progress:
                    board = progress_board()
                    poll = make_poll(board, RichUI(progress))
                    cfg, _ = run_expert_lr(cfg, board, poll)  # experts.lr_img auto: the rule first
                    out = run_experts(cfg, board, poll)
                    poll(force=True)  # the last lines before the summary
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        except KeyboardInterrupt:
            interrupted("finished experts and every stored epoch are kept; run the same command again to continue")
    for line in window_lines(out["windows"]):
        console.print(line)
    console.print(f"experts: {out['trained']} trained, {out['skipped']} already complete, "
                  f"{out['actor_restarts']} actor restart(s)")


def window_lines(picks: list[dict]) -> list[str]:
    """One line per range end the windows' rule picked (``range_end: auto``): the range and each end's score."""
    return [f"phase {w['phase']}: range [{w['range'][0]}, {w['range'][1]}], the windows' rule's pick from expert "
            f"{w['expert']} (chord alignment by end: " + ", ".join(f"{b} {v:.3f}" for b, v in w["scores"].items())
            + ")" for w in picks]


@app.command()
def shortcut(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             address: Optional[str] = AddressOpt) -> None:
    """Compress the stored expert trajectories into the shortcut ranges the phases need."""
    from ptmst_ray.orchestration.experts import run_shortcuts, shortcuts_stored
    from ptmst_ray.stages import expert_lr

    cfg = get_run_config(config, set_, address, joins_ray=True)
    with root_lease(cfg, "shortcut"):
        try:
            cfg = expert_lr.resolved(cfg)  # experts.lr_img auto: the rate the rule picked under this root
            stored = shortcuts_stored(cfg)  # before a Ray starts: nothing to compress without experts
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        if not stored:  # every shortcut stored: the summary needs no Ray (a local one takes ~10 s to start)
            connect_ray(cfg, address)
        try:
            out = run_shortcuts(cfg)
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        except KeyboardInterrupt:
            interrupted("the shortcuts written are kept; run the same command again to write the rest")
    for line in window_lines(out["windows"]):
        console.print(line)
    console.print(f"shortcuts for {out['experts']} experts, ranges {out['ranges']}: {out['written']} written")


@app.command("eval")
def eval_(config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt, address: Optional[str] = AddressOpt,
          method: list[str] = typer.Option(["ptm_st"], "--method", "-m", metavar="METHOD",
                                           help="ptm_st (the saved distilled set), random, single_phase, full."),
          json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the results JSON here.")) -> None:
    """Score a saved distilled set and/or baselines by retrieval recall (mean ± std over seeds).

    The seeds an earlier evaluation scored from the same inputs (eval/scores/) are reused, the rest trained."""
    from ptmst_ray.layout import Layout
    from ptmst_ray.orchestration.pipeline import evaluate, scores_stored
    from ptmst_ray.orchestration.runtime import make_poll, progress_board
    from ptmst_ray.stages import expert_lr, windows
    from ptmst_ray.stages.score import check_stored_sets
    from ptmst_ray.vocab import METHODS

    cfg = get_run_config(config, set_, address, joins_ray=True)
    bad = [m for m in method if m not in METHODS]
    if bad:
        fail(f"--method {bad[0]!r} is not one of {', '.join(METHODS)}")
    if json_path is not None:  # its folder made now (as `data show --sheet` does), not found missing after the work
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--json {json_path}: cannot create its folder ({e.strerror or e})")
    with root_lease(cfg, "eval"):
        try:
            cfg = expert_lr.resolved(cfg)  # experts.lr_img auto: the rate the rule picked under this root
            cfg = windows.resolved(cfg)  # range_end auto: the ends the windows' rule picked under this root
            check_stored_sets(cfg, list(method))  # before data, pretraining and a Ray: nothing to score without them
            _ready_for_experts(cfg)
            if scores_stored(cfg, list(method)):  # every score stored: the table needs no Ray (~10 s to start one)
                results = evaluate(cfg, list(method), None, None)
            else:
                connect_ray(cfg, address)
                with progress_bars() as progress:
                    board = progress_board()
                    poll = make_poll(board, RichUI(progress))
                    results = evaluate(cfg, list(method), board, poll)
                    poll(force=True)  # the last lines before the table
        except library_errors() as e:
            fail(explain(cfg, e), code=1)
        except KeyboardInterrupt:
            interrupted("the scores of the students that finished are kept (eval/scores/); the same command reuses them")
    console.print(results_table(results))
    for line in ratio_lines(results):
        console.print(line)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(results, indent=2))
        except OSError as e:
            fail(f"--json {json_path}: cannot write it ({e.strerror or e}); the scores are stored under "
                 f"{Layout.of(cfg).eval}: the same command with another --json writes them without training", code=1)
        console.print(f"wrote {json_path}")
    else:  # eval/results.json is `run`'s record, left as it was
        console.print(f"scores stored under {Layout.of(cfg).eval}/scores/; --json FILE writes this table's results")
