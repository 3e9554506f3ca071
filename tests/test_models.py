"""Models: functional forward equals the module, double backward works, checkpoints load by path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from ptmst_ray.config import ModelConfig
from ptmst_ray.models.functional import FunctionalStudent, ParamSpec
from ptmst_ray.models.student import ProjectionHead, build_student
from ptmst_ray.models.towers import ModelError, build_clip, build_text_encoder, load_state_dict

CFG = ModelConfig()


def test_param_spec_round_trip():
    named = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    spec = ParamSpec.from_named(named.items())
    flat = spec.flatten(named)
    assert flat.shape == (10,) and spec.numel == 10
    back = spec.unflatten(flat)
    assert all(torch.equal(back[k], named[k]) for k in named)
    with pytest.raises(KeyError):
        spec.flatten({"a": named["a"]})


def test_functional_forward_equals_module():
    student = build_student(CFG, text_dim=64, seed=0)
    fs = FunctionalStudent(student)
    w_img, w_txt = fs.params()
    assert w_img.numel() == sum(p.numel() for p in student.image.parameters())
    x, t = torch.randn(5, 3, 32, 32), torch.randn(5, 64)
    torch.testing.assert_close(fs.logits(w_img, w_txt, x, t), student(x, t))
    # a snapshot plugs in: perturbed flat vectors give the module's output after load_
    w_img2, w_txt2 = w_img + 0.01 * torch.randn_like(w_img), w_txt + 0.01 * torch.randn_like(w_txt)
    out = fs.logits(w_img2, w_txt2, x, t)
    fs.load_(w_img2, w_txt2)
    torch.testing.assert_close(out, student(x, t))
    torch.testing.assert_close(fs.split_snapshot(student.trainable_state())[1], w_txt2)


def test_logits_formula():
    student = build_student(CFG, text_dim=64, seed=0)
    x, t = torch.randn(3, 3, 32, 32), torch.randn(3, 64)
    fi, ft = student.image(x), student.head(t)
    ref = (1 / CFG.temperature) * (fi / fi.norm(dim=1, keepdim=True)) @ (ft / ft.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(student(x, t), ref)


def test_double_backward_through_functional_vit():
    student = build_student(CFG, text_dim=64, seed=0).double()
    fs = FunctionalStudent(student)
    w_img, w_txt = (w.double().requires_grad_() for w in fs.params())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        loss = fs.logits(w_img, w_txt, x, t).logsumexp(1).mean()
        g_img, g_txt = torch.autograd.grad(loss, (w_img, w_txt), create_graph=True)
        q = (g_img * torch.randn_like(g_img)).sum() + (g_txt * torch.randn_like(g_txt)).sum()
        dx, dt = torch.autograd.grad(q, (x, t))
    assert dx.abs().sum() > 0 and dt.abs().sum() > 0


def test_seeded_dropout_is_reproducible():
    cfg = ModelConfig(head_dropout=0.5)
    fs = FunctionalStudent(build_student(cfg, text_dim=64, seed=0).train())
    w_img, w_txt = fs.params()
    x, t = torch.randn(4, 3, 32, 32), torch.randn(4, 64)
    a, b, c = (fs.logits(w_img, w_txt, x, t, seed=s) for s in (7, 7, 8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_students_share_pretrained_image_tower_and_differ_in_head(tmp_path):
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in build_clip(CFG, seed=123).state_dict().items()}, str(ckpt))
    cfg = ModelConfig(pretrained=str(ckpt))
    s0, s1 = build_student(cfg, 64, seed=0), build_student(cfg, 64, seed=1)
    for (n, a), (_, b) in zip(s0.image.state_dict().items(), s1.image.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(s0.head.projection.weight, s1.head.projection.weight)
    # without pretrained weights the image tower's random init differs per seed
    r0, r1 = build_student(CFG, 64, seed=0), build_student(CFG, 64, seed=1)
    assert not torch.equal(r0.image.conv1.weight, r1.image.conv1.weight)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    ref = build_clip(CFG, seed=5).eval()
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    torch.save({"state_dict": ref.state_dict()}, str(pt))
    x = torch.randn(2, 3, 32, 32)
    for path in (st, pt):
        model = build_clip(ModelConfig(pretrained=str(path)), seed=99).eval()
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x))
    # tower-only checkpoints
    img_only = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in ref.visual.state_dict().items()}, str(img_only))
    model = build_clip(ModelConfig(image_pretrained=str(img_only)), seed=99).eval()
    torch.testing.assert_close(model.encode_image(x), ref.encode_image(x))


def test_image_tower_alone_equals_the_whole_models_image_tower(tmp_path):
    """build_image_tower (the students' tower, no text tower built) gives build_clip's visual: the same random
    draws from a seed, the same weights from a whole-model or a tower checkpoint."""
    from ptmst_ray.models.towers import build_image_tower

    ckpt, tower = tmp_path / "clip.safetensors", tmp_path / "visual.safetensors"
    whole = build_clip(CFG, seed=123)
    save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, str(ckpt))
    save_file({k: v.contiguous() for k, v in build_clip(CFG, seed=7).visual.state_dict().items()}, str(tower))
    for cfg, seed in ((CFG, 0), (CFG, 1), (ModelConfig(pretrained=str(ckpt)), 5), (ModelConfig(image_pretrained=str(tower)), 5),
                      (ModelConfig(pretrained=str(ckpt), image_pretrained=str(tower)), 5)):
        ref, got = build_clip(cfg, seed=seed).visual.state_dict(), build_image_tower(cfg, seed=seed).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), (cfg, seed)
    assert not torch.equal(build_image_tower(CFG, seed=0).conv1.weight, build_image_tower(CFG, seed=1).conv1.weight)


def test_checkpoint_through_fsspec_memory_url():
    import fsspec

    ref = build_clip(CFG, seed=6).eval()
    from safetensors.torch import save

    url = "memory://ckpt/test_models/clip.safetensors"
    with fsspec.open(url, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in ref.state_dict().items()}))
    import open_clip

    enc = build_text_encoder(ModelConfig(pretrained=url))
    assert enc.dim == 64 and enc.key == build_text_encoder(ModelConfig(pretrained=url)).key
    tokens = open_clip.get_tokenizer(CFG.name)(["a red circle", "two blue squares"])
    with torch.no_grad():  # the weights read through fsspec give the reference model's text embedding
        torch.testing.assert_close(enc.encode(["a red circle", "two blue squares"]),
                                   ref.encode_text(tokens, normalize=False))
    assert build_text_encoder(CFG).key != enc.key  # different weights, different cache key


def test_bad_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.safetensors"):
        load_state_dict(str(bad))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelError, match="missing"):
        build_clip(ModelConfig(pretrained=str(wrong)))
    with pytest.raises(ModelError, match="not an open_clip model"):
        build_clip(ModelConfig(name="no-such-model"))


def test_text_encoder_batches_consistently():
    enc = build_text_encoder(CFG)
    caps = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "white")]
    torch.testing.assert_close(enc.encode(caps, batch_size=2), enc.encode(caps, batch_size=64))


def test_projection_head_follows_its_formula():
    """LayerNorm(Dropout(fc(GELU(proj(x)))) + proj(x)), written out with the head's own weights."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    head = ProjectionHead(12, 20, dropout=0.1).eval()
    with torch.no_grad():
        head.layer_norm.weight.normal_()
        head.layer_norm.bias.normal_()
    x = torch.randn(3, 12)
    p = F.linear(x, head.projection.weight, head.projection.bias)
    y = F.linear(F.gelu(p), head.fc.weight, head.fc.bias) + p
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    ref = (y - mu) / torch.sqrt(var + head.layer_norm.eps) * head.layer_norm.weight + head.layer_norm.bias
    torch.testing.assert_close(head(x), ref)
    assert head.train()(x).shape == (3, 20)


def test_paper_image_tower_loads_a_timm_imagenet_checkpoint(tmp_path, caplog):
    """The paper configs' NFNet-L0: a timm ImageNet state dict (classifier included) fills every tensor of
    the tower, whose output is timm's pooled 2304-d feature (num_classes=0), with no extra random layer."""
    import logging

    import open_clip
    import timm
    from open_clip.model import _build_vision_tower

    from ptmst_ray.models.towers import load_image_tower

    torch.manual_seed(0)
    ref = timm.create_model("nfnet_l0", num_classes=1000).eval()
    ckpt = tmp_path / "nfnet_l0.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    mcfg = open_clip.get_model_config("ptmst-nfnet_l0-bert")
    visual = _build_vision_tower(mcfg["embed_dim"], mcfg["vision_cfg"]).eval()
    with caplog.at_level(logging.WARNING, logger="ptmst_ray.models.towers"):
        load_image_tower(visual, str(ckpt))
    assert "head.fc" in caplog.text  # the ImageNet classifier is left out, and said so
    own, theirs = visual.state_dict(), ref.state_dict()
    assert all(torch.equal(t, theirs[k.removeprefix("trunk.")]) for k, t in own.items())
    ref.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = visual(x)
        torch.testing.assert_close(out, ref(x))
    assert out.shape == (2, 2304)


def test_mismatched_shapes_and_head_dim_are_model_errors(tmp_path):
    from ptmst_ray.models.towers import load_image_tower

    visual = build_clip(CFG, seed=0).visual
    sd = {k: v.clone() for k, v in visual.state_dict().items()}
    name = next(k for k, v in sd.items() if v.dim() == 2)
    sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
    bad = tmp_path / "other_width.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ModelError, match=rf"other_width.safetensors: 1 tensors have the wrong shape.*{name}"):
        load_image_tower(visual, str(bad))
    dim = build_student(CFG, text_dim=64, seed=0).head.layer_norm.normalized_shape[0]
    with pytest.raises(ModelError, match=rf"model.head_dim {dim + 1} differs .* {dim}"):
        build_student(ModelConfig(head_dim=dim + 1), text_dim=64, seed=0)


def test_image_projection_follows_its_formula_and_leaves_other_draws_alone():
    """model.image_proj_dim: logits = s <norm(P f(x)), norm(h(t))>; a frozen tower freezes only f, the projection
    trains; the tower starts exactly where it starts without a projection."""
    import torch.nn.functional as F

    plain = build_student(ModelConfig(), text_dim=64, seed=5)
    student = build_student(ModelConfig(image_trainable=False, image_proj_dim=24), text_dim=64, seed=5).eval()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"image.proj.weight"} | {f"head.{n}" for n, _ in student.head.named_parameters()}
    for n, t in plain.image.state_dict().items():
        assert torch.equal(t, student.image.tower.state_dict()[n])
    assert student.head.layer_norm.normalized_shape == (24,)
    torch.manual_seed(0)
    x, t = torch.randn(3, 3, 32, 32), torch.randn(4, 64)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        feats = student.image.tower(x) @ student.image.proj.weight.T
        ref = (1 / 0.07) * F.normalize(feats, dim=-1) @ F.normalize(student.head(t), dim=-1).T
        torch.testing.assert_close(student(x, t), ref)
        fs = FunctionalStudent(student)
        assert fs.img_spec.names == ("image.proj.weight",)
        torch.testing.assert_close(fs.logits(*fs.params(), x, t), ref)
    with pytest.raises(ModelError, match="head_dim 23 differs .* 24"):
        build_student(ModelConfig(image_proj_dim=24, head_dim=23), text_dim=64, seed=5)
