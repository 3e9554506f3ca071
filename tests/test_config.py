"""Config loading: each class of error names the file and field path; overrides; round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ptmst_ray.config import CONFIG_DIR, Config, ConfigError, find_config, from_dict, load_config, section_hash

ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.total_pairs == sum(p.pairs for p in cfg.phases)


def test_a_bare_name_is_a_shipped_recipe_unless_a_file_here_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = CONFIG_DIR / "scenes.yaml"
    assert find_config("scenes") == find_config("scenes.yaml") == str(shipped)
    assert load_config("scenes") == load_config(shipped)
    for given in ("nothing", "configs/scenes.yaml", "s3://bucket/scenes.yaml"):  # no such recipe; a folder; a URL
        assert find_config(given) == given
    (tmp_path / "scenes.yaml").write_text("run: {seed: 3}\n")  # a file of that name here is what was meant
    assert find_config("scenes.yaml") == "scenes.yaml" and load_config("scenes.yaml").run.seed == 3
    assert find_config("scenes") == str(shipped)  # "scenes" itself is no file here


def test_paper_recipes_follow_algorithm_table():
    f500 = load_config(CONFIG_DIR / "flickr30k_500.yaml")
    assert [(p.range_start, p.range_end, p.start_min, p.start_max, p.pairs) for p in f500.phases] == [
        (0, 6, 0, 1, 200), (0, 8, 1, 2, 299)]
    assert all(p.minibatch == 40 for p in f500.phases)
    assert (f500.distill.lr_img, f500.distill.lr_lr, f500.distill.lr_sim, f500.distill.syn_steps) == (1000, 0.01, 10, 8)
    assert load_config(CONFIG_DIR / "coco_200.yaml").distill.lr_sim == 50
    assert load_config(CONFIG_DIR / "cc3m_100.yaml").model.image_trainable is False
    assert len(load_config(CONFIG_DIR / "flickr30k_100.yaml").phases) == 1


# docs/method.md#paper-settings, row by row: phases as (range, starts, pairs); the same for every dataset
PAPER_PHASES = {100: [(0, 6, 0, 1, 99)], 200: [(0, 6, 0, 1, 99), (0, 8, 1, 2, 100)],
                500: [(0, 6, 0, 1, 200), (0, 8, 1, 2, 299)]}


@pytest.mark.parametrize("dataset", ["flickr30k", "coco", "cc3m"])
@pytest.mark.parametrize("pairs", [100, 200, 500])
def test_every_paper_recipe_matches_its_table_row(dataset, pairs):
    cfg = load_config(CONFIG_DIR / f"{dataset}_{pairs}.yaml")
    assert [(p.range_start, p.range_end, p.start_min, p.start_max, p.pairs) for p in cfg.phases] == PAPER_PHASES[pairs]
    assert all(p.iterations == 2000 and p.similarity.kind == "full" for p in cfg.phases)
    assert {p.minibatch for p in cfg.phases} == {40 if (dataset, pairs) == ("flickr30k", 500) else 20}
    d = cfg.distill
    assert (d.syn_steps, d.expert_epochs, d.lr_img, d.lr_txt, d.lr_lr, d.alpha_init, d.ema_decay, d.momentum) == \
        (8, 1, 1000, 1000, 0.01, 0.1, 0.99, 0.5)
    assert (d.loss, d.grad_method, d.lr_sim) == ("WBCE", "first_order", 10 if dataset == "flickr30k" else 50)
    e = cfg.experts
    assert (e.num_experts, e.epochs, e.lr_img, e.lr_txt, e.momentum, e.weight_decay, e.batch_size, e.loss) == \
        (20, 10, 0.1, 0.1, 0.0, 0.0, 128, "InfoNCE")
    assert cfg.model.name == "ptmst-nfnet_l0-bert" and cfg.model.temperature == 0.07
    assert cfg.model.image_trainable is (dataset != "cc3m")
    assert cfg.model.image_proj_dim == (2048 if dataset == "cc3m" else None)
    assert cfg.eval.phase_training == "sequential"


@pytest.mark.parametrize(
    "raw, field_path",
    [
        ({"distill": {"bogus": 1}}, "distill.bogus"),                       # unknown key
        ({"bogus_section": {}}, "bogus_section"),                           # unknown section
        ({"distill": {"syn_steps": "eight"}}, "distill.syn_steps"),         # wrong type
        ({"distill": {"syn_steps": 2.5}}, "distill.syn_steps"),             # float for int
        ({"shortcut": {"enabled": "yes"}}, "shortcut.enabled"),             # str for bool
        ({"distill": {"grad_method": "magic"}}, "distill.grad_method"),     # not a choice
        ({"distill": {"exact_checkpoints": -1}}, "distill.exact_checkpoints"),    # negative
        ({"distill": {"exact_checkpoints": "all"}}, "distill.exact_checkpoints"),  # str for int
        ({"phases": []}, "phases"),                                         # empty phase list
        ({"phases": [{"pairs": 5, "minibatch": 10}]}, "phases[0].pairs"),   # budget < minibatch
        ({"phases": [{"range_end": 12}]}, "phases[0].range_end"),           # range past expert epochs
        ({"phases": [{}, {"start_max": 6}]}, "phases[1].start_max"),        # window + m past range
        ({"phases": [{"similarity": {"kind": "diag"}}]}, "phases[0].similarity.kind"),
        ({"data": {"dataset": "coco"}}, "data.annotations"),                # missing location
        ({"eval": {"baselines": ["random", "oracle"]}}, "eval.baselines[1]"),
        ({"model": {"image_trainable": False}}, "model.image_trainable"),      # frozen tower, no weights
        ({"model": {"image_proj_dim": 0}}, "model.image_proj_dim"),
        ({"distill": {"ema_decay": "often"}}, "distill.ema_decay"),         # neither a number nor auto
        ({"distill": {"ema_decay": 1.0}}, "distill.ema_decay"),
        ({"distill": {"rel_lr_img": 0}}, "distill.rel_lr_img"),
        ({"distill": {"rel_lr_sim": 0.01, "lr_sim": 0}}, "distill.rel_lr_sim"),  # derives what 0 keeps fixed
    ],
)
def test_config_errors_name_file_and_field(tmp_path, raw, field_path):
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.path == field_path
    assert str(path) in str(err.value) and field_path in str(err.value)


def test_own_data_with_pretraining_names_the_way_to_the_tiny_towers():
    own = {"data": {"dataset": "karpathy", "annotations": "/data/mine"}}
    with pytest.raises(ConfigError) as err:
        from_dict({**own, "pretrain": {"enabled": True}, "model": {"pretrained": "${run.root}/pretrain/clip.safetensors"}})
    assert err.value.path == "pretrain.enabled" and "pretrain.enabled=false" in err.value.message
    assert "pretrain/clip.safetensors" in err.value.message
    # the way it names is a valid config
    cfg = from_dict({**own, "pretrain": {"enabled": False}, "model": {"pretrained": "/runs/toy/pretrain/clip.safetensors"}})
    assert cfg.model.pretrained == "/runs/toy/pretrain/clip.safetensors"


def test_a_number_or_auto_field_says_both():
    with pytest.raises(ConfigError, match=r"distill\.ema_decay: expected a number or 'auto', got 'often'"):
        from_dict({"distill": {"ema_decay": "often"}})
    assert from_dict({"distill": {"ema_decay": "auto"}}).distill.ema_decay == "auto"


def test_window_error_says_what_to_do():
    with pytest.raises(ConfigError, match="lower start_max to at most 5"):
        from_dict({"phases": [{"range_end": 6, "start_max": 6}]})


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, {"phases": [{}, {"range_end": 8, "start_max": 2}]})
    cfg = load_config(path, ["distill.syn_steps=4", "phases.1.pairs=50", "phases[0].similarity.kind=lowrank",
                             "run.address=null"])
    assert cfg.distill.syn_steps == 4 and cfg.phases[1].pairs == 50 and cfg.phases[0].similarity.kind == "lowrank"
    with pytest.raises(ConfigError) as err:  # a place the file does not have: the override's fault too
        load_config(path, ["phases.5.pairs=3"])
    assert str(err.value).startswith("--set phases.5.pairs=3 (over ") and "index '5' is not in a list" in str(err.value)
    with pytest.raises(ConfigError):
        load_config(path, ["distill.syn_steps"])  # no '='
    # a bad value from --set is named as the override, not as the file's
    with pytest.raises(ConfigError, match=r"^--set phases\.1\.pairs=-3 \(over .*\): phases\[1\]\.pairs: must be >= 1"):
        load_config(path, ["phases.1.pairs=-3"])
    with pytest.raises(ConfigError, match=r"^--set distill=\{syn_steps: 0\} \(over .*\): distill\.syn_steps"):
        load_config(path, ["distill={syn_steps: 0}"])
    with pytest.raises(ConfigError) as err:  # the file's own error keeps the file's name
        load_config(write(tmp_path, {"distill": {"syn_steps": 0}}), ["phases.0.pairs=5"])
    assert str(err.value).startswith(str(tmp_path)) and "distill.syn_steps" in str(err.value)
    # a misspelled section in an override: the override made it, so the override is named
    with pytest.raises(ConfigError, match=r"^--set distil\.syn_steps=4 \(over .*\): distil: unknown key"):
        load_config(CONFIG_DIR / "toy.yaml", ["distil.syn_steps=4"])
    # ... and the same misspelling in the file stays the file's, whatever an override adds to it
    typo = tmp_path / "typo.yaml"
    typo.write_text("distil:\n  syn_steps: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(typo, ["distil.lr_img=5"])
    assert str(err.value).startswith(f"{typo}: distil: unknown key"), err.value


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; the divergence message suggests `distill.min_alpha=1e-4`."""
    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4"  # the reason for the rule
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  lr_lr: 1e-5\n")
    cfg = load_config(path, ["distill.min_alpha=1e-4", "distill.lr_img=2E+2"])
    assert (cfg.distill.lr_lr, cfg.distill.min_alpha, cfg.distill.lr_img) == (1e-5, 1e-4, 200.0)
    for bad in ("abc", "1e", "e5"):
        with pytest.raises(ConfigError, match="expected a number"):
            load_config(path, [f"distill.lr_img={bad}"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIG_DIR / "toy.yaml", ["run.root=" + str(tmp_path)])
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert section_hash(again.phases[0]) == section_hash(cfg.phases[0])


def test_relative_root_becomes_absolute_and_placeholder_expands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({"run": {"root": "runs/x"}, "model": {"pretrained": "${run.root}/pretrain/clip.safetensors"}})
    assert cfg.run.root == str(tmp_path / "runs/x")
    assert cfg.model.pretrained == str(tmp_path / "runs/x/pretrain/clip.safetensors")
    assert from_dict({"model": {"pretrained": "openai"}}).model.pretrained == "openai"  # tags stay tags


def test_section_hash_changes_with_content():
    a, b = Config(), Config().replace(**{"distill.syn_steps": 3})
    assert section_hash(a.distill) != section_hash(b.distill)
    assert section_hash(a.experts) == section_hash(b.experts)


def test_exact_checkpoints_is_validated_and_leaves_the_phase_hash_alone():
    """The checkpoint count trades memory for recomputed steps, never the result: a finished phase stays valid."""
    from ptmst_ray.layout import phase_hash

    with pytest.raises(ConfigError, match=r"exact_checkpoints: must be >= 1 .*null/0.*got -2"):
        Config().replace(**{"distill.exact_checkpoints": -2})
    cfg = Config()
    reference = phase_hash(cfg, cfg.phases[0])
    for k in (0, 1, 5):
        assert phase_hash(cfg.replace(**{"distill.exact_checkpoints": k}), cfg.phases[0]) == reference
    assert phase_hash(cfg.replace(**{"distill.syn_steps": 3}), cfg.phases[0]) != reference


def test_max_concurrent_is_validated_and_leaves_the_phase_hash_alone():
    """Running the phases in turn instead of side by side changes when they run, never what they compute."""
    from ptmst_ray.layout import phase_hash

    with pytest.raises(ConfigError, match=r"max_concurrent: must be >= 0"):
        Config().replace(**{"distill.max_concurrent": -1})
    cfg = Config()
    for phase in cfg.phases:
        assert phase_hash(cfg.replace(**{"distill.max_concurrent": 1}), phase) == phase_hash(cfg, phase)


def test_max_concurrent_caps_the_distillation_runs_at_once(monkeypatch, tmp_path):
    """run_phases hands the scheduler min(the cluster's slots, distill.max_concurrent) runs at once."""
    from ptmst_ray.orchestration import phases as orch

    from ptmst_ray.orchestration.runtime import ClusterInfo

    seen = []
    monkeypatch.setattr(orch, "cluster_info", lambda: ClusterInfo(cpus=3, gpus=0, nodes=1))  # 3 slots on CPUs
    monkeypatch.setattr(orch, "resolve_accelerator", lambda cfg: cfg)
    monkeypatch.setattr(orch, "request_gpus", lambda *a, **k: None)
    monkeypatch.setattr(orch, "ensure_train_state_actor", lambda: None)
    monkeypatch.setattr(orch, "run_all", lambda todo, submit, slots, done, poll: seen.append(slots))
    for cap, expected in ((0, 3), (1, 1), (2, 2), (5, 3)):
        cfg = from_dict({"run": {"root": str(tmp_path / "r"), "accelerator": "cpu"},
                         "distill": {"max_concurrent": cap}})
        orch.run_phases(cfg)
        assert seen[-1] == expected, (cap, seen)


def test_every_config_field_has_a_docstring():
    """Each field of each config section carries a one-line docstring right after it (the user's reference)."""
    import ast
    import inspect

    import ptmst_ray.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    sections = {name for name, obj in vars(config_module).items()
                if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__}
    undocumented = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in sections:
            for st, nxt in zip(node.body, node.body[1:] + [None]):
                if isinstance(st, ast.AnnAssign) and not (
                        isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                    undocumented.append(f"{node.name}.{st.target.id}")
    assert len(sections) >= 10 and not undocumented, undocumented


def test_replace_leaves_the_callers_values_alone():
    """A later dotted key below an earlier one edits the config's copy of the earlier value, not the caller's (a
    sweep's whole-phase values are applied so, once per trial and once per check)."""
    cfg = load_config(CONFIG_DIR / "toy.yaml")
    phases = [dataclasses.asdict(p) for p in cfg.phases]
    given = [dict(p) for p in phases]
    out = cfg.replace(**{"phases": given, "phases.0.pairs": 17, "phases.1": {**phases[1], "iterations": 3}})
    assert (out.phases[0].pairs, out.phases[1].iterations) == (17, 3)
    assert given == phases



def test_step_sizes_in_units_of_the_experts_learning_rates():
    """distill.rel_alpha starts each step size at that multiple of its tower's expert lr, rel_min_alpha floors it
    at that fraction of its start; without them alpha_init and min_alpha hold for both."""
    cfg = load_config(CONFIG_DIR / "toy.yaml", ["experts.lr_img=0.02", "experts.lr_txt=0.05", "distill.min_alpha=null"])
    assert cfg.alpha_starts() == (cfg.distill.alpha_init, cfg.distill.alpha_init) and cfg.alpha_floors() is None
    ruled = cfg.replace(**{"distill.rel_alpha": 0.5, "distill.rel_min_alpha": 0.1})
    assert ruled.alpha_starts() == pytest.approx((0.01, 0.025)) and ruled.alpha_floors() == pytest.approx((1e-3, 2.5e-3))
    assert cfg.replace(**{"distill.min_alpha": 1e-4}).alpha_floors() == (1e-4, 1e-4)
    with pytest.raises(ConfigError, match="rel_min_alpha.*set one of them"):
        cfg.replace(**{"distill.min_alpha": 1e-4, "distill.rel_min_alpha": 0.1})
    with pytest.raises(ConfigError, match="rel_alpha.*must be > 0"):
        cfg.replace(**{"distill.rel_alpha": 0})
