"""Expert training on the tiny open_clip ViT (32x32 images, d_t = 64), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ptmst_ray.config import ExpertsConfig, ModelConfig
from ptmst_ray.models.student import build_student
from ptmst_ray.trajectories.expert import (aligned_lr, aligned_range_end, chord_alignment, displacement_cosines,
                                          expert_seed, train_expert)

CPU = torch.device("cpu")
TEXT_DIM = 64


def data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, TEXT_DIM, generator=g)


def cfg(**kw) -> ExpertsConfig:
    base = dict(num_experts=2, epochs=2, batch_size=8, seed=10)
    return ExpertsConfig(**{**base, **kw})


def image_part(snap):
    return {n: t for n, t in snap.items() if n.startswith("image.")}


def test_trajectory_shape_and_initial_snapshot():
    images, text = data()
    epochs = []
    traj = train_expert(cfg(), ModelConfig(), images, text, expert_id=1, on_epoch=lambda e, s: epochs.append((e, s)),
                        device=CPU)
    assert len(traj) == 3 and [e for e, _ in epochs] == [1, 2]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for _, s in epochs)
    initial = build_student(ModelConfig(), TEXT_DIM, seed=expert_seed(cfg(), 1))
    want = {n: p.detach() for n, p in initial.named_parameters() if p.requires_grad}
    assert list(traj[0]) == list(want)
    assert all(n.startswith(("image.", "head.")) for n in want)
    for n, t in want.items():
        assert torch.equal(traj[0][n], t)
        assert traj[0][n].device.type == "cpu" and not traj[0][n].requires_grad
    assert any(not torch.equal(traj[0][n], traj[2][n]) for n in want)  # it trained


def test_deterministic_per_id_and_seeded_per_expert():
    images, text = data()
    a = train_expert(cfg(epochs=1), ModelConfig(), images, text, 0, device=CPU)
    b = train_expert(cfg(epochs=1), ModelConfig(), images, text, 0, device=CPU)
    c = train_expert(cfg(epochs=1), ModelConfig(), images, text, 1, device=CPU)
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n])  # a retried actor reproduces the same trajectory
    # no pretrained weights: the image tower's random init is seeded per expert, as is the head
    assert not torch.equal(a[0]["head.projection.weight"], c[0]["head.projection.weight"])
    assert any(not torch.equal(a[0][n], c[0][n]) for n in image_part(a[0]))


def test_pretrained_image_tower_is_shared(tmp_path):
    tower = build_student(ModelConfig(), TEXT_DIM, seed=123).image
    ckpt = tmp_path / "image.safetensors"
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(ckpt))
    model_cfg = ModelConfig(image_pretrained=str(ckpt))
    images, text = data()
    a = train_expert(cfg(epochs=1), model_cfg, images, text, 0, device=CPU)
    c = train_expert(cfg(epochs=1), model_cfg, images, text, 1, device=CPU)
    for n, t in image_part(a[0]).items():
        assert torch.equal(t, c[0][n])
        assert torch.equal(t, tower.state_dict()[n[len("image."):]])
    assert not torch.equal(a[0]["head.projection.weight"], c[0]["head.projection.weight"])


def test_frozen_image_tower_records_head_only():
    images, text = data()
    traj = train_expert(cfg(epochs=1), ModelConfig(image_trainable=False), images, text, 0, device=CPU)
    assert traj[0] and all(n.startswith("head.") for n in traj[0])
    assert not torch.equal(traj[0]["head.fc.weight"], traj[1]["head.fc.weight"])


def test_frozen_tower_with_projection_records_projection_and_head(tmp_path):
    """CC3M's shape: a frozen (pretrained) tower, a trainable image projection (model.image_proj_dim)."""
    tower = build_student(ModelConfig(), TEXT_DIM, seed=123).image
    ckpt = tmp_path / "image.safetensors"
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(ckpt))
    images, text = data()
    traj = train_expert(cfg(epochs=1), ModelConfig(image_pretrained=str(ckpt), image_trainable=False, image_proj_dim=24),
                        images, text, 0, device=CPU)
    assert {n for n in traj[0] if not n.startswith("head.")} == {"image.proj.weight"}
    assert traj[0]["image.proj.weight"].shape[0] == 24 and traj[0]["head.fc.weight"].shape == (24, 24)
    assert not torch.equal(traj[0]["image.proj.weight"], traj[1]["image.proj.weight"])


def test_loss_decreases_on_learnable_pairs():
    """16 pairs whose caption embedding is a fixed linear map of the image: the CLIP loss must fall."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(16, 3, 32, 32, generator=g)
    text = images.flatten(1) @ torch.randn(3 * 32 * 32, TEXT_DIM, generator=g) / 50
    losses = []
    train_expert(cfg(epochs=30, batch_size=16), ModelConfig(), images, text, 0,
                 on_epoch=lambda e, s: losses.append(s["loss"]), device=CPU)
    # the paper's lr 0.1 is bumpy at first on this tiny problem; compare the ends, not neighbours
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


def test_mismatched_inputs_rejected():
    images, text = data()
    with pytest.raises(ValueError, match="pair up"):
        train_expert(cfg(), ModelConfig(), images, text[:-1], 0, device=CPU)


def test_displacement_cosines_known_geometry():
    """Moves +e1, +e1, +e2, -e2, spread over two named tensors: cosines 1, 0, -1."""
    pts = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (2, 1, 0), (2, 0, 0)]
    traj = [{"image.w": torch.tensor([float(a)]), "head.w": torch.tensor([float(b), float(c)])} for a, b, c in pts]
    assert displacement_cosines(traj) == pytest.approx([1.0, 0.0, -1.0], abs=1e-12)


def test_displacement_cosines_match_numpy():
    """Random snapshots of two tensors: the cosines of the flat displacements, computed by numpy."""
    g = torch.Generator().manual_seed(1)
    traj = [{"image.a": torch.randn(3, 4, generator=g), "head.b": torch.randn(5, generator=g)} for _ in range(5)]
    flat = [np.concatenate([s["image.a"].numpy().ravel(), s["head.b"].numpy().ravel()]).astype(np.float64)
            for s in traj]
    steps = np.diff(np.stack(flat), axis=0)
    want = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(steps, steps[1:])]
    assert displacement_cosines(traj) == pytest.approx(want, abs=1e-9)


def test_aligned_lr_rule():
    """The largest lr whose first 4 epochs (3 cosines) stay >= 0.5; later epochs do not count; 0.5 passes."""
    cosines = {0.1: [0.37, 0.26, 0.18, 0.1], 0.03: [0.6, 0.5, 0.7, -0.2], 0.01: [0.9, 0.9, 0.9, 0.9]}
    assert aligned_lr(cosines) == 0.03
    assert aligned_lr({0.1: [0.6, 0.49, 0.9], 0.01: [0.9, 0.8, 0.7]}) == 0.01
    assert aligned_lr({0.1: [0.6, 0.4, 0.9]}) is None
    assert aligned_lr({0.1: [0.6, 0.4, 0.9]}, min_cosine=0.3) == 0.1
    assert aligned_lr({0.1: [0.6, 0.4]}, epochs=2) == 0.1
    with pytest.raises(ValueError, match="lr 0.1 has 3 epochs"):
        aligned_lr({0.1: [0.6, 0.7]})


def test_chord_alignment_known_geometry():
    """The text side moves +e1 three epochs, then +e2 twice; the image side +e1 throughout. For the target epochs
    0-2 the chord to epoch 3 is 3 e1 (cosine 1 with each), to 4 it is 3 e1 + e2 (3 / sqrt 10), to 5 3 e1 + 2 e2
    (3 / sqrt 13); the image side scores 1 at every end; the score is the towers' mean. The rule takes b = 3."""
    text = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2)]
    traj = [{"image.w": torch.tensor([float(i)]), "head.w": torch.tensor([float(a), float(b)])}
            for i, (a, b) in enumerate(text)]
    want = {3: 1.0, 4: (1 + 3 / 10 ** 0.5) / 2, 5: (1 + 3 / 13 ** 0.5) / 2}
    assert chord_alignment(traj, 0, [0, 1, 2], [3, 4, 5]) == pytest.approx(want, abs=1e-12)
    b, scores = aligned_range_end([traj], 0, [0, 1, 2], 5)
    assert b == 3 and scores == pytest.approx(want, abs=1e-12)
    # targets at epochs 3-4 (along e2): the chord from 0 to 5 is the best there is; from a range start of 3, exact
    assert aligned_range_end([traj], 0, [3, 4], 5)[0] == 5
    assert chord_alignment(traj, 3, [3, 4], [5]) == pytest.approx({5: 1.0}, abs=1e-12)
    # a tower that never moves is left out of the mean, not counted as 0
    frozen = [{"image.w": torch.zeros(1), "head.w": s["head.w"]} for s in traj]
    assert chord_alignment(frozen, 0, [0, 1, 2], [4]) == pytest.approx({4: 3 / 10 ** 0.5}, abs=1e-12)


def test_chord_alignment_matches_numpy_and_averages_experts():
    """Random trajectories of two towers: each tower's cosines by numpy, averaged over towers and target epochs;
    the rule's scores are the mean over experts and its pick their argmax."""
    g = torch.Generator().manual_seed(3)

    def random_traj():
        return [{"image.a": torch.randn(3, 4, generator=g), "head.b": torch.randn(5, generator=g)} for _ in range(7)]

    def numpy_score(traj, start, epochs, b):
        out = []
        for k in epochs:
            cos = []
            for name in ("image.a", "head.b"):
                x = {e: traj[e][name].numpy().ravel().astype(np.float64) for e in (start, b, k, k + 1)}
                c, d = x[b] - x[start], x[k + 1] - x[k]
                cos.append(c @ d / np.linalg.norm(c) / np.linalg.norm(d))
            out.append(np.mean(cos))
        return float(np.mean(out))

    trajs = [random_traj(), random_traj()]
    for start, epochs in ((0, [0, 1, 2]), (1, [1, 2])):
        want = {b: np.mean([numpy_score(t, start, epochs, b) for t in trajs]) for b in range(3, 7)}
        b, scores = aligned_range_end(trajs, start, epochs, 6)
        assert scores == pytest.approx(want, abs=1e-9)
        assert b == max(want, key=want.get)


def test_chord_alignment_rejects_epochs_outside_the_trajectory():
    traj = [{"image.w": torch.tensor([float(i)])} for i in range(4)]  # 3 epochs
    with pytest.raises(ValueError, match=r"ends \[4\] outside \[1, 3\]"):
        chord_alignment(traj, 0, [0], [4])
    with pytest.raises(ValueError, match=r"epochs \[3\] outside \[0, 2\]"):
        chord_alignment(traj, 0, [3], [3])
    with pytest.raises(ValueError, match="no range end past the last target epoch 2"):
        aligned_range_end([traj], 0, [0, 1, 2], 2)
    with pytest.raises(ValueError, match="at least one expert"):
        aligned_range_end([], 0, [0], 3)


def test_a_longer_expert_begins_with_the_shorter_ones_trajectory():
    """The experts' SGD has a constant learning rate, draws each epoch's order from one seeded generator and its
    dropout masks from its own seed, so training for more epochs changes none of the earlier snapshots (E only sets
    how far the phase windows may reach: docs/method.md, "A recipe for new data"), and what ran before in the
    process (the global generator's state) changes nothing. With the paper recipes' head dropout, against the same
    expert trained for fewer epochs."""
    images, text = data()
    model = ModelConfig(head_dropout=0.1)
    torch.manual_seed(1)
    short = train_expert(cfg(epochs=2), model, images, text, 1, device=CPU)
    torch.manual_seed(2)
    long = train_expert(cfg(epochs=4), model, images, text, 1, device=CPU)
    assert len(short) == 3 and len(long) == 5
    for epoch in range(3):
        assert all(torch.equal(short[epoch][n], long[epoch][n]) for n in short[epoch]), epoch
    assert any(not torch.equal(long[2][n], long[4][n]) for n in long[2])  # the longer one went on
    no_dropout = train_expert(cfg(epochs=1), ModelConfig(), images, text, 1, device=CPU)
    assert any(not torch.equal(no_dropout[1][n], short[1][n]) for n in short[1])  # the masks were drawn


def test_an_expert_continued_from_its_stored_epochs_is_the_one_trained_in_one_go():
    """`start` (an expert's stored first epochs) continues training after its last epoch: bit for bit the expert
    trained in one go, from held rows and from a stream of epochs, with dropout; a config asking for fewer epochs
    gets the first ones; another expert's snapshots and SGD with momentum (state between epochs) are refused."""
    images, text = data()
    model = ModelConfig(head_dropout=0.1)
    whole = train_expert(cfg(epochs=4), model, images, text, 1, device=CPU)
    first = train_expert(cfg(epochs=2), model, images, text, 1, device=CPU)
    seen = []
    more = train_expert(cfg(epochs=4), model, images, text, 1, device=CPU, start=first,
                        on_epoch=lambda e, s: seen.append(e))
    assert seen == [3, 4] and len(more) == 5
    for epoch in range(5):
        assert all(torch.equal(whole[epoch][n], more[epoch][n]) for n in whole[epoch]), epoch
    fewer = train_expert(cfg(epochs=1), model, images, text, 1, device=CPU, start=whole)
    assert len(fewer) == 2 and all(torch.equal(fewer[1][n], whole[1][n]) for n in whole[1])

    def stream(epoch: int):  # batches that depend on the epoch only, as a streamed split's do
        g = torch.Generator().manual_seed(100 + epoch)
        return ((images[i], text[i]) for i in torch.randperm(len(images), generator=g).split(8))

    streamed = train_expert(cfg(epochs=3), model, images, text, 1, device=CPU, epoch_batches=stream)
    resumed = train_expert(cfg(epochs=3), model, images, text, 1, device=CPU, epoch_batches=stream,
                           start=streamed[:2])
    assert all(torch.equal(streamed[3][n], resumed[3][n]) for n in streamed[3])

    with pytest.raises(ValueError, match="starting point"):
        train_expert(cfg(epochs=4), model, images, text, 0, device=CPU, start=first)
    with pytest.raises(ValueError, match="momentum"):
        train_expert(cfg(epochs=4, momentum=0.9), model, images, text, 1, device=CPU, start=first)


def test_snapshots_handed_over_as_they_come_are_the_trajectory():
    """``on_snapshot`` sees every epoch's snapshot once, in order and before ``on_epoch``, whether or not the
    trajectory is kept; continuing hands over only the new epochs; ``keep=False`` returns nothing to hold."""
    images, text = data()
    whole = train_expert(cfg(epochs=3), ModelConfig(), images, text, 2, device=CPU)
    calls: list = []
    kept = train_expert(cfg(epochs=3), ModelConfig(), images, text, 2, device=CPU, keep=False,
                        on_snapshot=lambda e, s: calls.append(("snapshot", e, s)),
                        on_epoch=lambda e, _: calls.append(("epoch", e)))
    assert kept == []
    assert [c[:2] for c in calls] == [("snapshot", 0)] + [c for e in (1, 2, 3) for c in (("snapshot", e), ("epoch", e))]
    handed = [c[2] for c in calls if c[0] == "snapshot"]
    assert all(torch.equal(a[n], b[n]) for a, b in zip(whole, handed, strict=True) for n in a)
    more: list = []
    train_expert(cfg(epochs=3), ModelConfig(), images, text, 2, device=CPU, start=whole[:2], keep=False,
                 on_snapshot=lambda e, s: more.append((e, s)))
    assert [e for e, _ in more] == [2, 3] and all(torch.equal(more[1][1][n], whole[3][n]) for n in whole[3])


def test_dropout_seeds_differ_for_every_expert_and_epoch():
    """Consecutive experts' seeds differ by 1: an epoch offset alone would give expert i's epoch e + 1 the masks of
    expert i + 1's epoch e."""
    from ptmst_ray.trajectories.expert import dropout_seed

    seeds = [dropout_seed(cfg().seed + i, e) for i in range(50) for e in range(1, 40)]
    assert len(set(seeds)) == len(seeds)
