"""Stage `eval`: the distilled set and its baselines scored on the same budget, one seed at a time.

Why this file exists: `ptmst-ray run` and `ptmst-ray eval` compare PTM-ST's distilled set with a
random coreset, a single-phase (LoRS-style) distillation of the same total budget, and the full
train split. Each (method, seed) is one independent job (a Ray task in the driver); this module
is the plain function it runs and the aggregation into results.json. No Ray here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ptmst_ray import storage
from ptmst_ray.config import Config, EvalConfig, PhaseConfig, section_hash
from ptmst_ray.evaluate.protocol import (
    SELECTION_TEST, SELECTION_VAL, Subset, aggregate, arrange_subsets, coreset_subset, evaluate_one_seed,
    per_seed_difference, random_coreset,
)
from ptmst_ray.evaluate.student import RetrievalSet
from ptmst_ray.layout import Layout, StageError, data_hash, data_order, model_hash
from ptmst_ray.stages import features
from ptmst_ray.stages.embed import RealData, load_real, stream_split, train_stream
from ptmst_ray.vocab import BASELINES, METHODS, PTM_ST, SINGLE_PHASE

log = logging.getLogger(__name__)


def subset_from_dir(directory: str) -> Subset:
    """A stored phase subset (complete, partial or diverged) as an evaluation :class:`Subset`."""
    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.stages.aggregate import check_usable

    sub = load_subset(directory)
    check_usable(directory, sub)
    return Subset(images=sub.images.float(), text_emb=sub.text.float(), similarity=sub.similarity.float(),
                  lr_img=sub.alpha_img, lr_txt=sub.alpha_txt)


def subset_from_state(phase: PhaseConfig, ema: dict) -> Subset:
    """A phase's EMA state (``SyntheticSet.tensors()`` names) as an evaluation :class:`Subset`."""
    from ptmst_ray.distill.export import similarity_matrix

    state = {k: v.detach().float().cpu() for k, v in ema.items()}
    return Subset(images=state["images"], text_emb=state["text"],
                  similarity=similarity_matrix(phase.similarity, state).float(),
                  lr_img=float(state["alpha_img"]), lr_txt=float(state["alpha_txt"]))


def check_stored_sets(cfg: Config, methods: list[str]) -> None:
    """Before any work: the sets of ``methods`` that only an earlier run makes (ptm_st's distilled set, the
    single-phase subset) are stored, else a StageError naming the folder and the command that makes them."""
    layout = Layout.of(cfg)
    if PTM_ST in methods and storage.read_manifest(layout.distilled) is None:
        raise StageError(f"{layout.distilled}: no distilled set here (no manifest); run `ptmst-ray run` first, or "
                         "score the baselines alone (-m random -m full)")
    if SINGLE_PHASE in methods and storage.read_manifest(layout.subset(SINGLE_PHASE)) is None:
        raise StageError(f"{layout.subset(SINGLE_PHASE)}: no single-phase subset here (no manifest); run `ptmst-ray "
                         "run --set 'eval.baselines=[random, single_phase, full]'` first")


def method_subsets(cfg: Config, method: str, seed: int, distilled_dir: str | None = None,
                   cached: features.CachedFeatures | None = None) -> list[Subset]:
    """The method's training subsets; with ``cached`` (a frozen tower's features) real pairs come as their
    images' features (synthetic subsets stay pixels: :func:`score_one_seed` runs the tower on them once)."""
    from ptmst_ray.stages.aggregate import load_distilled

    layout = Layout.of(cfg)
    if method == PTM_ST:
        return load_distilled(distilled_dir or layout.distilled)
    # the full baseline reads every train image (decoded once per process and held as uint8, or streamed per
    # batch: data.stream); a coreset only its own; with cached features, none
    streamed = method == "full" and stream_split(cfg, "train")
    real = load_real(cfg, whole_train=method == "full" and not streamed and cached is None)
    # cached: the full baseline's rows read the split's features once (never, streamed), a coreset only its own
    train_images = real.train_images if cached is None else \
        features.FeatureRows(cached, real.train_image_index, keep=method == "full")
    if method == "random":
        idx = random_coreset(real.train_images.shape[0], cfg.total_pairs, cfg.eval.seed + seed, real.train_image_index)
        return [coreset_subset(train_images, real.train_text, idx)]
    if method == SINGLE_PHASE:
        return [subset_from_dir(layout.subset(SINGLE_PHASE))]
    if method == "full":
        stream = _streamed_full(cfg, real, cached) if streamed else None
        return [Subset(images=train_images, text_emb=real.train_text, stream=stream)]
    raise StageError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _streamed_full(cfg: Config, real: RealData, cached: features.CachedFeatures | None = None):
    """(seed, epoch) -> the full train split's batches streamed: every row once an epoch (min_batch 1, as the held
    permutation), in the order of the student's seed (with ``cached``: the images' features, same order)."""
    if cached is not None:
        batches = features.feature_stream(cfg, cached, real.train_text, cfg.eval.batch_size, seed=0, min_batch=1,
                                          image_index=real.train_image_index)
    else:
        batches = train_stream(cfg, "train", real.train_text, cfg.eval.batch_size, seed=0, min_batch=1,
                               image_index=real.train_image_index)

    def stream(seed: int, epoch: int):
        return batches.epoch(epoch, seed=seed)

    return stream


def score_one_seed(cfg: Config, method: str, seed: int, distilled_dir: str | None = None,
                   progress: Callable[[dict], None] | None = None,
                   subsets: list[Subset] | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Train a fresh student (seed ``cfg.eval.seed + seed``) on the method's subsets (or the given
    ``subsets``, e.g. a sweep round's partial phases) and score it, on ``device`` (default: the worker's,
    ``device.worker_device``): the student lives there, minibatches move there."""
    from ptmst_ray.device import worker_device
    from ptmst_ray.models.student import build_student

    real = load_real(cfg, whole_train=False)  # the test split and the text width; the method's subsets bring the rest
    cached = features.find(cfg)  # a frozen tower's features: the student trains and scores without its tower
    subsets = subsets if subsets is not None else method_subsets(cfg, method, seed, distilled_dir, cached)
    pairs = sum(int(s.images.shape[0]) for s in subsets)
    device = worker_device(device)
    student = build_student(cfg.model, real.text_dim, seed=cfg.eval.seed + seed)
    test = RetrievalSet(real.test_images, real.test_text, real.txt2img)
    val = real.val
    if cached is not None:
        subsets, test, val = _on_features(student, cached, subsets, test, val, device)
    subsets = arrange_subsets(subsets, cfg.eval.phase_training)
    student = student.to(device)
    plan = schedule(cfg.eval, method, has_val=val is not None)
    out = evaluate_one_seed(subsets, student, test, cfg.eval, loss=cfg.eval_loss, seed=seed, epochs=plan["epochs"],
                            progress=progress, val_set=val, eval_at=plan["eval_at"], early_stop=plan["patience"])
    return {"method": method, "seed": seed, "pairs": pairs,
            "final": out["final"], "best": out["best"], "best_epoch": out["best_epoch"],
            "best_on_test": out["best_on_test"], "best_on_test_epoch": out["best_on_test_epoch"],
            "selection": out["selection"], "best_val": out["best_val"], "epochs_run": out["epochs_run"],
            "diverged_at": out["diverged_at"], "device": str(device)}


SCORE_IGNORED = ("seeds", "baselines")
"""``eval`` settings that no single (method, seed) score depends on: how many seeds and which methods run."""
FULL_SCORE_IGNORED = SCORE_IGNORED + ("epochs", "phase_training")
"""... for the full-data baseline also the other methods' schedule and use of their subsets (:func:`schedule`),"""
SUBSET_SCORE_IGNORED = SCORE_IGNORED + ("full_data_epochs", "full_data_patience", "full_data_max_epochs",
                                        "full_data_val_every")
"""... and for the other methods the full-data baseline's schedule."""


def score_key(cfg: Config, method: str, seed: int) -> str | None:
    """What one (method, seed) score is computed from, as a hash: the method and seed, the evaluation settings,
    the data, the student's starting point (model and pretraining), and the method's own input: the content
    hashes of the distilled set (ptm_st) or of the single-phase subset, the budget of the random coreset.
    None while that input is not complete: such a score is neither stored nor reused."""
    layout = Layout.of(cfg)
    ignored = FULL_SCORE_IGNORED if method == "full" else SUBSET_SCORE_IGNORED
    settings = {k: v for k, v in cfg.to_dict()["eval"].items() if k not in ignored}
    # the loss the students use counts (cfg.eval_loss, hashed below), not whether eval.loss names it or inherits it
    # from distill.loss: `eval.loss: InfoNCE` beside `distill.loss: WBCE` reuses the InfoNCE-scored baselines
    settings["loss"] = None
    source: Any = None
    if method in (PTM_ST, SINGLE_PHASE):
        manifest = storage.read_manifest(layout.distilled if method == PTM_ST else layout.subset(SINGLE_PHASE))
        if manifest is None:
            return None
        source = manifest.get("files")
    elif method == "random":
        source = cfg.total_pairs
    # run.seed draws the distillation, which reaches a score only through the distilled set's content (source);
    # the random coreset and the full-data student are drawn from eval.seed alone, so another draw reuses their
    # scores. The subsets' keys keep run.seed (redundant with their content) so that their stored scores stay valid.
    drawn = (cfg.run.seed,) if method in (PTM_ST, SINGLE_PHASE) else ()
    return section_hash(method, seed, settings, cfg.eval_loss, data_hash(cfg), model_hash(cfg), data_order(cfg),
                        *drawn, source)[:16]


def stored_score(cfg: Config, method: str, seed: int) -> dict[str, Any] | None:
    """The scores of (method, seed) stored by an earlier evaluation with the same :func:`score_key`, marked
    ``reused``; None when there are none (or they were computed from anything else, or cannot be read)."""
    key, url = score_key(cfg, method, seed), Layout.of(cfg).score(method, seed)
    if key is None or not storage.exists(url):
        return None
    try:
        entry = storage.read_json(url)
    except storage.StorageError as e:  # a damaged score file is only a score to compute again
        log.warning("%s; this score is computed again", e)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("run"), dict):
        return None
    return {**entry["run"], "reused": True}


def store_score(cfg: Config, method: str, seed: int, run: dict[str, Any], key: str | None) -> None:
    """Keep one finished (method, seed) score under the :func:`score_key` it was computed with (taken before
    scoring began): a later run or ``ptmst-ray eval`` with the same inputs reuses it instead of training the
    student again."""
    if key is not None:
        storage.write_json(Layout.of(cfg).score(method, seed), {"key": key, "run": run})


def schedule(cfg: EvalConfig, method: str, has_val: bool) -> dict[str, Any]:
    """How long a method's student trains: {"epochs" (the most), "eval_at" (None: ``eval_points`` evenly spaced),
    "patience" (None: the fixed schedule)}. The full-data baseline with a val split and
    ``full_data_patience`` > 0 trains until val r_mean stops improving (at most ``full_data_max_epochs``,
    evaluated every ``full_data_val_every`` epochs and at the last); otherwise every method has its fixed
    schedule (``full_data_epochs`` for the baseline, ``epochs`` for the rest)."""
    if method != "full":
        return {"epochs": cfg.epochs, "eval_at": None, "patience": None}
    if not has_val or cfg.full_data_patience == 0:
        return {"epochs": cfg.full_data_epochs, "eval_at": None, "patience": None}
    most, every = cfg.full_data_max_epochs, cfg.full_data_val_every
    return {"epochs": most, "eval_at": sorted(set(range(every, most + 1, every)) | {most}),
            "patience": cfg.full_data_patience}


def _on_features(student, cached: features.CachedFeatures, subsets: list[Subset], test: RetrievalSet,
                 val: RetrievalSet | None, device: torch.device
                 ) -> tuple[list[Subset], RetrievalSet, RetrievalSet | None]:
    """The subsets and the test (and val) split as the frozen tower's features, and ``student`` without its
    tower: real images from the cache; pixel subsets (synthetic images, whose pixels do not change during
    evaluation) through the tower once here, instead of once an epoch."""
    from ptmst_ray.models.student import drop_frozen_tower

    tower = student.frozen_tower()
    cached.check_tower(tower)
    tower = tower.to(device)
    subsets = [dataclasses.replace(s, images=features.featurize(tower, s.images, device))
               if len(s.images.shape) == 4 else s for s in subsets]  # pixels (N x 3 x H x W), not feature rows
    drop_frozen_tower(student)
    if val is not None:
        val = RetrievalSet(cached.split("val"), val.text_emb, val.txt2img)
    return subsets, RetrievalSet(cached.split("test"), test.text_emb, test.txt2img), val


PROTOCOL_TEST = "best of evaluation points (paper); 'final' = final epoch"
PROTOCOL_VAL = ("best evaluation point chosen on val, its test recall (honest); 'best_on_test' = best on test "
                "(paper); 'final' = final epoch")


def summarise(runs: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """results.json: per method, the six recalls and r_mean as mean/std over seeds.

    Top-level figures are the test recall at each run's best evaluation point, chosen on the val split when
    the data has one (``selection: val``, the honest figure), else on the test split (``selection: test``,
    the paper's protocol). "best_on_test" holds the paper's best-on-test figures (with a val split, the
    optimistic figure beside the honest one), "final" the final-epoch figures of the same runs, "val" the
    val recall at the chosen points (with a val split), "epochs_run" each seed's trained epochs.
    """
    selection = _selection(runs)
    methods: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        plan = schedule(cfg.eval, method, has_val=selection == SELECTION_VAL)
        methods[method] = {
            **aggregate(r["best"] for r in mine),
            "final": aggregate(r["final"] for r in mine),
            "best_on_test": aggregate(r.get("best_on_test", r["best"]) for r in mine),
            **({"val": aggregate(r["best_val"] for r in mine)} if selection == SELECTION_VAL else {}),
            "pairs": mine[0]["pairs"],
            "seeds": len(mine),
            "epochs": plan["epochs"],
            "epochs_run": [r.get("epochs_run") for r in mine],
            **({"patience": plan["patience"]} if plan["patience"] is not None else {}),
        }
    out = {"protocol": PROTOCOL_VAL if selection == SELECTION_VAL else PROTOCOL_TEST, "selection": selection,
           "methods": methods, "ratios": _ratios(methods, lambda m: m["r_mean"]["mean"]), "per_seed": _per_seed(runs)}
    if selection == SELECTION_VAL:
        out["ratios_best_on_test"] = _ratios(methods, lambda m: m["best_on_test"]["r_mean"]["mean"])
    out["eval"] = {"epochs": cfg.eval.epochs, "seeds": cfg.eval.seeds, "eval_points": cfg.eval.eval_points,
                   "loss": cfg.eval_loss, "phase_training": cfg.eval.phase_training}
    return out


def _selection(runs: list[dict[str, Any]]) -> str:
    """The split that chose every run's best point (runs before the val protocol chose on test)."""
    chosen = {r.get("selection", SELECTION_TEST) for r in runs}
    if len(chosen) > 1:
        raise StageError(f"evaluation runs chose their best points on different splits ({', '.join(sorted(chosen))}); "
                         "rerun the evaluation (`ptmst-ray run --rebuild eval`) so all use the same data")
    return chosen.pop() if chosen else SELECTION_TEST


def _per_seed(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """PTM-ST's r_mean against each baseline's seed by seed (:func:`per_seed_difference`), keyed as the ratios."""
    scores = {m: {r["seed"]: r["best"]["r_mean"] for r in runs if r["method"] == m} for m in (PTM_ST, *BASELINES)}
    out = {}
    for base in BASELINES:
        diff = per_seed_difference(scores[PTM_ST], scores[base])
        if diff is not None:
            out[f"{PTM_ST}/{base}"] = diff
    return out


def _ratios(methods: dict[str, Any], r_mean: Callable[[dict], float]) -> dict[str, float]:
    """PTM-ST's r_mean over each baseline's (those with a positive r_mean)."""
    ratios = {}
    if PTM_ST in methods:
        for base in BASELINES:
            if base in methods and r_mean(methods[base]) > 0:
                ratios[f"{PTM_ST}/{base}"] = r_mean(methods[PTM_ST]) / r_mean(methods[base])
    return ratios
