"""The CLI's surface: --help lists every command, exit codes, config show/validate."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from ptmst_ray.config import CONFIG_DIR
from ptmst_ray_cli.main import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "config" in result.output


def test_version_names_this_package_and_what_it_runs_on():
    import platform
    from importlib.metadata import version

    import ptmst_ray

    assert ptmst_ray.__version__ == version("ptmst-ray")  # the package says what pyproject.toml installed
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"ptmst-ray {version('ptmst-ray')} (ray {version('ray')}, torch {version('torch')}, "
                                     f"open_clip {version('open_clip_torch')}, python {platform.python_version()})")


def _commands(group, path=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def test_every_value_in_help_is_named_for_what_it_takes():
    """Options that take a value and arguments show a name (FILE, KEY=VALUE, ADDRESS, N ...) in --help, not the
    Python type typer prints otherwise (`<list[str]>` for --set)."""
    import typer.main

    unnamed = [f"{name} {p.name}" for name, cmd in _commands(typer.main.get_command(app)) for p in cmd.params
               if not getattr(p, "is_flag", False) and not p.metavar]
    assert unnamed == []
    run = runner.invoke(app, ["run", "--help"], terminal_width=120)
    assert "KEY=VALUE" in run.output and "list[str]" not in run.output, run.output


def test_validate_ok_and_broken(tmp_path):
    ok = runner.invoke(app, ["config", "validate", str(CONFIG_DIR / "toy.yaml"), "--set", f"run.root={tmp_path}"])
    assert ok.exit_code == 0, ok.output
    # a paper recipe as shipped: its FILL paths do not exist on this machine; the first is named, nothing runs
    shipped = runner.invoke(app, ["config", "validate", str(CONFIG_DIR / "flickr30k_500.yaml"),
                                  "--set", f"run.root={tmp_path}"])
    assert shipped.exit_code == 2 and "data.annotations" in shipped.output and "does not exist" in shipped.output
    size = runner.invoke(app, ["config", "validate", str(CONFIG_DIR / "toy.yaml"), "--set", f"run.root={tmp_path}",
                               "--set", "data.image_size=64"])  # a ViT's position embeddings fix its input size
    assert size.exit_code == 2 and "data.image_size" in size.output, size.output
    raw = yaml.safe_load((CONFIG_DIR / "flickr30k_500.yaml").read_text())
    raw["phases"][1]["start_max"] = 8
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(raw))
    bad = runner.invoke(app, ["config", "validate", str(broken)])
    assert bad.exit_code == 2
    assert "phases[1].start_max" in bad.output.replace("\n", "")



def test_an_error_prints_the_users_value_whole(tmp_path, monkeypatch):
    """Brackets in a value reach the terminal (rich would read ``[rnd]`` as a style tag and drop it)."""
    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 4000)  # each message on one line
    bad = runner.invoke(app, ["config", "validate", str(CONFIG_DIR / "toy.yaml"), "--set", "eval.baselines=[rnd]"])
    assert bad.exit_code == 2 and "--set eval.baselines=[rnd] (over" in bad.output, bad.output
    missing = runner.invoke(app, ["config", "validate", str(tmp_path / "[draft] run.yaml")])
    assert missing.exit_code == 2 and "[draft] run.yaml" in missing.output, missing.output

def test_missing_file_exit_2(tmp_path):
    result = runner.invoke(app, ["config", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_a_folder_given_as_the_config_is_named_as_one(tmp_path):
    result = runner.invoke(app, ["run", "--config", str(tmp_path)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{tmp_path}: is a folder, not a config file" in said and "Traceback" not in said, said


def test_show_applies_overrides():
    result = runner.invoke(app, ["config", "show", "--set", "distill.syn_steps=3"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout)["distill"]["syn_steps"] == 3


def test_config_commands_take_the_config_as_every_command_does(tmp_path):
    """`config show|validate` take FILE, or --config/-c as run, sweep and eval do; two different configs are refused."""
    by_option = runner.invoke(app, ["config", "show", "--config", "scenes"])
    assert by_option.exit_code == 0, by_option.output
    assert yaml.safe_load(by_option.stdout) == yaml.safe_load(runner.invoke(app, ["config", "show", "scenes"]).stdout)
    assert yaml.safe_load(by_option.stdout)["run"]["root"] != yaml.safe_load(
        runner.invoke(app, ["config", "show"]).stdout)["run"]["root"]  # the recipe's, not the default's
    valid = runner.invoke(app, ["config", "validate", "-c", str(CONFIG_DIR / "toy.yaml"), "--set", f"run.root={tmp_path}"])
    assert valid.exit_code == 0 and "toy.yaml: ok" in valid.output, valid.output
    shipped = runner.invoke(app, ["config", "validate", "--config", "flickr30k_500", "--set", f"run.root={tmp_path}"])
    assert shipped.exit_code == 2 and "data.annotations" in shipped.output, shipped.output
    both = runner.invoke(app, ["config", "show", "toy", "--config", "scenes"])
    assert both.exit_code == 2 and "toy" in both.output and "scenes" in both.output, both.output


def test_sweep_samples_below_one_is_refused_as_the_option_typed():
    result = runner.invoke(app, ["sweep", "--samples", "0"])
    assert result.exit_code == 2 and "--samples" in result.output and "sweep.num_samples" not in result.output, \
        result.output


def test_run_on_another_machines_cluster_refuses_local_inputs(tmp_path):
    """Before connecting: with a cluster address, a run root only this machine can read is named (exit 2)."""
    result = runner.invoke(app, ["run", "--address", "10.0.0.5:6379", "--set", f"run.root={tmp_path}"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "run.root" in out and "every node reads it" in out, out


def test_logging_shows_this_projects_info_and_other_libraries_warnings(capsys):
    """open_clip logs each tokenizer lookup at INFO on the root logger: the CLI shows its own INFO lines, not
    those; ``--verbose`` shows everything."""
    import logging

    from ptmst_ray_cli.common import OWN_LOGGERS, setup_logging

    root, touched = logging.getLogger(), [logging.getLogger(n) for n in OWN_LOGGERS]
    saved = (root.level, list(root.handlers), [lg.level for lg in touched])
    try:
        for verbose in (False, True):
            setup_logging(verbose)
            logging.info("third-party info %s", verbose)  # what open_clip does
            logging.warning("third-party warning %s", verbose)
            logging.getLogger("ptmst_ray.stages.experts").info("our info %s", verbose)
            logging.getLogger("ptmst_ray_cli.commands").debug("our debug %s", verbose)
            shown = capsys.readouterr().err
            assert "our info" in shown and "third-party warning" in shown
            assert ("third-party info" in shown) is verbose and ("our debug" in shown) is verbose
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for lg, level in zip(touched, saved[2]):
            lg.setLevel(level)


def test_a_background_import_is_complete_after_join_and_a_failing_one_fails_again_where_used(tmp_path, monkeypatch):
    import importlib
    import sys

    import pytest

    from ptmst_ray_cli.common import import_in_background

    (tmp_path / "bg_import_ok.py").write_text("VALUE = 42\n")
    (tmp_path / "bg_import_bad.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("bg_import_ok", "bg_import_bad"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import_in_background("bg_import_ok").join()
    assert sys.modules["bg_import_ok"].VALUE == 42
    import_in_background("bg_import_bad").join()  # nothing escapes the thread ...
    assert "bg_import_bad" not in sys.modules
    with pytest.raises(RuntimeError, match="broken on purpose"):  # ... and the import that needs it says why
        importlib.import_module("bg_import_bad")


def test_commands_that_build_models_import_them_while_ray_starts(monkeypatch):
    """connect_ray starts the model stack's import before it starts Ray and waits for it after; `data prepare`
    (decoding tasks only) does not import it."""
    import threading

    from ptmst_ray.config import load_config
    from ptmst_ray.orchestration import runtime
    from ptmst_ray.orchestration.runtime import ClusterInfo
    from ptmst_ray_cli import common

    events = []

    class Recorded(threading.Thread):
        def join(self, timeout=None):
            events.append("joined")
            return super().join(timeout)

    def fake_import(module):
        events.append(f"import {module}")
        thread = Recorded(target=lambda: None)
        thread.start()
        return thread

    def fake_connect(address=None, **kwargs):
        events.append("connect")
        return ClusterInfo(cpus=2, gpus=0, nodes=1)

    monkeypatch.setattr(common, "import_in_background", fake_import)
    monkeypatch.setattr(runtime, "connect", fake_connect)
    cfg = load_config(None)
    common.connect_ray(cfg, None)
    assert events == [f"import {common.MODEL_STACK}", "connect", "joined"]
    events.clear()
    common.connect_ray(cfg, None, models=False)
    assert events == ["connect"]


def test_data_prepare_needs_the_data_not_the_weights(tiny_flickr_dir, tmp_path, monkeypatch):
    """A paper recipe as shipped names weights that are not on this machine: `data prepare` (data only) runs all the
    same, while a command that trains still names the first missing weights before any work."""
    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 4000)  # each message on one line
    data = [f"data.annotations={tiny_flickr_dir}", f"data.images={tiny_flickr_dir}", f"run.root={tmp_path / 'run'}",
            "data.workers=1"]  # in this process: no Ray
    args = [a for s in data for a in ("--set", s)]
    prepared = runner.invoke(app, ["data", "prepare", "--config", "flickr30k_500", *args])
    assert prepared.exit_code == 0, prepared.output
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir() if p.is_dir()) == ["test", "train", "val"]
    # `data show` reads it: every split, or the one --split names; a split it does not have is named with those it has
    shown = runner.invoke(app, ["data", "show", "--config", "flickr30k_500", *args])
    assert shown.exit_code == 0 and set(json.loads(shown.stdout)["splits"]) == {"train", "val", "test"}, shown.output
    shown = runner.invoke(app, ["data", "show", "--config", "flickr30k_500", "--split", "val", *args])
    assert shown.exit_code == 0 and list(json.loads(shown.stdout)["splits"]) == ["val"], shown.output
    sheet = tmp_path / "sheet.png"
    unknown = runner.invoke(app, ["data", "show", "--config", "flickr30k_500", "--split", "pretrain", "--sheet",
                                  str(sheet), *args])
    assert unknown.exit_code == 2 and not sheet.exists(), unknown.output
    said = " ".join(unknown.output.split())
    assert "--split pretrain: no split 'pretrain' in the data prepared at" in said and "{" not in said, said
    assert said.endswith("; it has test, train, val"), said
    validate = runner.invoke(app, ["config", "validate", "--config", "flickr30k_500", *args])
    assert validate.exit_code == 2 and "model.image_pretrained" in validate.output, validate.output


def test_data_prepare_with_workers_starts_ray_only_when_a_split_is_to_prepare(tiny_flickr_dir, tmp_path, monkeypatch):
    """`data prepare --workers 2` on data prepared from the same annotations and settings starts no Ray (~10 s);
    with an annotation file changed it does (here refused, to stop before any work)."""
    import shutil

    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 4000)
    folder = tmp_path / "ann"
    shutil.copytree(tiny_flickr_dir, folder)
    args = [a for s in (f"data.annotations={folder}", f"data.images={folder}", f"run.root={tmp_path / 'run'}")
            for a in ("--set", s)]
    assert runner.invoke(app, ["data", "prepare", "--config", "flickr30k_500", "--workers", "1", *args]).exit_code == 0
    connects = []

    def refuse(*a, **k):
        connects.append(a)
        raise SystemExit(3)

    monkeypatch.setattr("ptmst_ray_cli.commands.connect_ray", refuse)
    again = runner.invoke(app, ["data", "prepare", "--config", "flickr30k_500", "--workers", "2", *args])
    assert again.exit_code == 0 and connects == [], again.output
    test = folder / "flickr30k_test.json"
    test.write_text(test.read_text().replace("}", ', "note": 1}', 1))  # the same rows, another file
    changed = runner.invoke(app, ["data", "prepare", "--config", "flickr30k_500", "--workers", "2", *args])
    assert changed.exit_code == 3 and len(connects) == 1, changed.output


def test_an_annotation_folder_without_the_split_files_says_where_they_come_from(tmp_path, monkeypatch):
    """A folder with neither the per-split files nor the dataset's Karpathy file (here COCO's, under a Flickr30k
    recipe): named, with BLIP's files of the same splits and the dataset the file there is of, before any work."""
    import json

    monkeypatch.setattr("ptmst_ray_cli.common.console.width", 4000)
    folder = tmp_path / "ann"
    folder.mkdir()
    (folder / "dataset_coco.json").write_text(json.dumps({"images": [], "dataset": "coco"}))
    result = runner.invoke(app, ["data", "prepare", "--config", "flickr30k_500", "--set", f"data.annotations={folder}",
                                 "--set", f"data.images={folder}", "--set", f"run.root={tmp_path / 'run'}"])
    assert result.exit_code == 2, result.output
    for text in ("data.annotations", "no flickr30k_train.json or flickr30k_test.json", "dataset_flickr30k.json",
                 "sfr-vision-language-research/datasets/flickr30k_", "dataset_coco.json, which is coco's: "
                 "set data.dataset=coco"):
        assert text in result.output, (text, result.output)
    assert not (tmp_path / "run" / "data").exists()


def test_a_skipped_stage_keeps_the_time_of_the_run_that_built_it(tmp_path):
    """A second `run` on a finished root records its stages as skipped and, beside, the time each took in the run that
    built it (carried on through later skipped runs); the stage table says both."""
    from rich.console import Console

    from ptmst_ray.orchestration.pipeline import built_times
    from ptmst_ray_cli.commands import stage_table

    record = tmp_path / "results.json"
    assert built_times([{"stage": "data", "seconds": 0.1, "ran": False}], str(record)) == [
        {"stage": "data", "seconds": 0.1, "ran": False}]  # no earlier record: nothing to carry
    record.write_text(json.dumps({"stages": [{"stage": "data", "seconds": 4.5, "ran": True},
                                             {"stage": "pretrain", "seconds": 0.2, "ran": False, "built_seconds": 57.2},
                                             {"stage": "experts", "seconds": 29.8, "ran": True}]}))
    rows = built_times([{"stage": "data", "seconds": 0.1, "ran": False},
                        {"stage": "pretrain", "seconds": 0.1, "ran": False},
                        {"stage": "experts", "seconds": 12.0, "ran": True},  # ran again: its own time only
                        {"stage": "phases", "seconds": 0.3, "ran": False}], str(record))  # not in the record
    assert rows == [{"stage": "data", "seconds": 0.1, "ran": False, "built_seconds": 4.5},
                    {"stage": "pretrain", "seconds": 0.1, "ran": False, "built_seconds": 57.2},
                    {"stage": "experts", "seconds": 12.0, "ran": True},
                    {"stage": "phases", "seconds": 0.3, "ran": False}]
    record.write_text("{not json")
    assert built_times([{"stage": "data", "seconds": 0.1, "ran": False}], str(record)) == [
        {"stage": "data", "seconds": 0.1, "ran": False}]  # an unreadable record: nothing carried, the run goes on
    console = Console(width=200, record=True)
    console.print(stage_table({"wall_seconds": 12.6, "stages": rows}))
    text = console.export_text()
    assert "skipped (complete; built in 4.5 s)" in text and "skipped (complete; built in 57.2 s)" in text
    assert "│ ran" in text and "skipped (complete)" in text  # phases: skipped, no earlier time known
