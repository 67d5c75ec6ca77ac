"""AReAM (wsss_fast.methods.aream) on a tiny ViT: model, pseudo-label rules, one training step on
every backend, and the evaluation CAMs."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from utils import assert_close

import wsss_fast
from wsss_fast.methods import AReAM, AReAMConfig
from wsss_fast.methods.aream import (
    IGNORE_INDEX,
    ClassTokenViT,
    _refined_cams,
    cam_to_labels,
    cams,
    combine_labels,
    first_deep_layer,
    mask_outside_box,
    token_labels,
)

timm = pytest.importorskip("timm")

C = 3
TINY = dict(embed_dim=32, depth=4, num_heads=2)  # head dim 16: every backend takes it


def tiny_config(**overrides) -> AReAMConfig:
    kwargs = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(TINY),
        img_size=48,
        num_classes=C,
        layer_index=0.5,  # L0 = 2 of 4
        cls_epochs=1,
        drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    return AReAMConfig(**kwargs)


@pytest.fixture(scope="module")
def method_and_model():
    torch.manual_seed(0)
    method = AReAM(tiny_config())
    return method, method.build_model()


def make_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(2, 3, 48, 48, generator=g),
        "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "crop_box": torch.tensor([[0, 48, 0, 48], [8, 40, 0, 32]]),
        "name": ["a", "b"],
    }


def test_model_output_shapes(method_and_model):
    _, model = method_and_model
    assert first_deep_layer(0.5, model.depth) == 2
    assert first_deep_layer(7, 12) == 7
    for H, W in [(48, 48), (64, 32)]:  # the second resamples the position embedding
        out = model(torch.randn(2, 3, H, W))
        assert out["class_logits"].shape == (2, C)
        assert out["patch_logits"].shape == (2, C)
        assert out["maps"].shape == (2, C, H // 16, W // 16)
        assert_close(out["patch_logits"], out["maps"].mean((2, 3)), name="patch_logits")


def test_one_class_token_reproduces_timm_forward():
    # With C = 1 the token sequence is timm's own; the published forward skips the final norm.
    torch.manual_seed(4)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, **TINY).eval()
    vit.norm = torch.nn.Identity()
    model = ClassTokenViT(vit, num_classes=1).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        features = vit.forward_features(x)  # [B, 1 + 9, 32]
        out = model(x)
        patches = features[:, 1:].transpose(1, 2).reshape(2, 32, 3, 3)
        assert_close(out["class_logits"], features[:, :1].mean(-1), name="class_logits")
        assert_close(out["maps"], model.head(patches), name="maps")


@pytest.mark.parametrize("fmt", ["state_dict", "deit_model_key", "safetensors"])
def test_class_tokens_repeat_pretrained_and_state_dict_loads(tmp_path, fmt):
    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, **TINY)
    if fmt == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        path = tmp_path / "vit_tiny.safetensors"
        safetensors_torch.save_file(vit.state_dict(), str(path))
    else:
        path = tmp_path / "vit_tiny.pth"
        # DeiT's released files hold {"model": state_dict}.
        torch.save(
            {"model": vit.state_dict()} if fmt == "deit_model_key" else vit.state_dict(), path
        )

    model = AReAM(tiny_config(pretrained=str(path))).build_model()
    assert model.cls_token.shape == (1, C, 32)
    for c in range(C):
        assert torch.equal(model.cls_token[0, c], vit.cls_token[0, 0])
        assert torch.equal(model.cls_pos_embed[0, c], vit.pos_embed[0, 0])
    assert torch.equal(model.pos_embed, vit.pos_embed[:, 1:])
    assert torch.equal(model.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)

    other = AReAM(tiny_config()).build_model()
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    x = torch.randn(1, 3, 48, 48)
    a, b = model(x), other(x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cam_to_labels_and_combination_rule_by_hand():
    # Six pixels in one row; classes 1 and 3 present, class 2 absent (its map must be ignored).
    # Per pixel (class1, class2, class3), and by hand with bg 0.55 (high) / 0.35 (low):
    cam = torch.tensor(
        [
            [0.90, 0.00, 0.10],  # high: 1      low: 1      -> 1
            [0.45, 0.00, 0.20],  # high: bg     low: 1      -> 255
            [0.10, 0.00, 0.20],  # high: bg     low: bg     -> 0
            [0.30, 0.99, 0.60],  # high: 3      low: 3      -> 3 (class 2 absent)
            [0.00, 0.99, 0.00],  # high: bg     low: bg     -> 0 (class 2 absent)
            [0.50, 0.00, 0.40],  # high: bg     low: 1      -> 255
        ]
    ).T.reshape(1, C, 1, 6)
    label = torch.tensor([[1.0, 0.0, 1.0]])
    image = torch.rand(1, 3, 1, 6)
    kw = dict(down_scale=1, par_iters=0)  # no resizing, PAR the identity: the rule alone
    high = cam_to_labels(cam, image, label, 0.55, **kw)
    low = cam_to_labels(cam, image, label, 0.35, **kw)
    assert high.tolist() == [[[1, 0, 0, 3, 0, 0]]]
    assert low.tolist() == [[[1, 1, 0, 3, 0, 1]]]
    assert combine_labels(low, high).tolist() == [[[1, 255, 0, 3, 0, 255]]]


def test_combination_rule_on_label_maps():
    high = torch.tensor([[[0, 0, 2, 2], [1, 0, 0, 0]]])
    low = torch.tensor([[[0, 1, 2, 0], [1, 3, 0, 2]]])
    expected = [[[0, 255, 2, 2], [1, 255, 0, 255]]]
    assert combine_labels(low, high).tolist() == expected


def test_token_labels_nearest_downsampling():
    y = torch.full((1, 32, 48), 7, dtype=torch.long)
    # The top-left pixel of each 16 x 16 patch decides; the rest of the patch says 7.
    y[0, 0, 0], y[0, 0, 16], y[0, 0, 32] = 1, 255, 2
    y[0, 16, 0], y[0, 16, 16], y[0, 16, 32] = 0, 3, 255
    assert token_labels(y, (2, 3)).tolist() == [[1, 255, 2, 0, 3, 255]]


def test_pixels_outside_crop_box_are_ignored():
    labels = torch.zeros(2, 4, 5, dtype=torch.long)
    box = torch.tensor([[1, 3, 2, 5], [0, 4, 0, 5]])  # [y0, y1, x0, x1]
    x = IGNORE_INDEX
    expected = [
        [[x, x, x, x, x], [x, x, 0, 0, 0], [x, x, 0, 0, 0], [x, x, x, x, x]],
        [[0] * 5] * 4,
    ]
    assert mask_outside_box(labels, box).tolist() == expected


def test_pseudo_labels_respect_labels_and_crop_box(method_and_model):
    method, model = method_and_model
    batch = make_batch()
    seg = method.pseudo_labels(model, batch["image"], batch["label"], batch["crop_box"])
    assert seg.shape == (2, 48, 48) and seg.dtype == torch.long
    assert set(seg[0].unique().tolist()) <= {0, 1, 3, IGNORE_INDEX}
    assert set(seg[1].unique().tolist()) <= {0, 2, IGNORE_INDEX}
    assert (seg[1, :8] == IGNORE_INDEX).all() and (seg[1, 40:] == IGNORE_INDEX).all()
    assert (seg[1, :, 32:] == IGNORE_INDEX).all()
    assert model.training  # the eval-mode pseudo-label pass restores the mode


def test_classification_only_before_cls_epochs(method_and_model):
    method, model = method_and_model
    terms = method.training_step(model, make_batch(), SimpleNamespace(epoch=0, step=0))
    assert set(terms) == {"loss", "cls_loss", "patch_loss"}
    assert_close(terms["loss"], terms["cls_loss"] + terms["patch_loss"], name="loss")


def _step(method, model, backend: str):
    with wsss_fast.use_backend(backend):
        seg = method.pseudo_labels(model, **{k: make_batch()[k] for k in ("image", "label")})
        terms = method.training_step(model, make_batch(), {"epoch": 1, "step": 5})
        deep = [blk.attn.qkv.weight for blk in model.blocks[2:]]
        grads = torch.autograd.grad(terms["aff_loss"], deep)
    return seg, {k: v.detach() for k, v in terms.items()}, grads


def test_training_step_same_on_every_backend(method_and_model):
    method, model = method_and_model
    seg, terms, grads = _step(method, model, "torch")
    assert set(terms) == {"loss", "cls_loss", "patch_loss", "aff_loss"}
    expected_loss = terms["cls_loss"] + terms["patch_loss"] + 0.1 * terms["aff_loss"]
    assert_close(terms["loss"], expected_loss, name="loss")
    assert all(g.abs().sum() > 0 for g in grads), "the affinity loss reaches no qkv weight"
    for backend in ("triton", "reference"):
        other_seg, other_terms, other_grads = _step(method, model, backend)
        assert torch.equal(other_seg, seg), f"{backend}: pseudo labels differ"
        for key in terms:
            assert_close(other_terms[key], terms[key], name=f"{backend} {key}")
        for i, (g, e) in enumerate(zip(other_grads, grads)):
            assert_close(g, e, name=f"{backend} d aff_loss / d blocks.{i + 2}.attn.qkv.weight")


def test_cams_normalised_and_absent_classes_zero(method_and_model):
    _, model = method_and_model
    model.eval()
    try:
        image = torch.randn(2, 3, 40, 56)  # not multiples of 16: padded inside
        label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        maps = cams(model, image, label)
        unmasked = cams(model, image)
    finally:
        model.train()
    assert maps.shape == (2, C, 40, 56) and not maps.requires_grad
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps[0, 1] == 0).all() and (maps[1, 0] == 0).all() and (maps[1, 2] == 0).all()
    for b, c in [(0, 0), (0, 2), (1, 1)]:
        # An untrained model's attention is nearly uniform, so the maps are nearly flat and
        # AReAM's eps (1e-6) keeps the maximum visibly below 1.
        assert maps[b, c].max() > 0.5 and maps[b, c].min() == 0
        assert torch.equal(maps[b, c], unmasked[b, c])


def published_refined_cams(model, image, layers: slice) -> torch.Tensor:
    """The published ``gen_msf_cam`` / ``generate_attention_maps`` at scale 1, written with the
    materialised ``[L, 2B, N, N]`` head-mean softmax attention, un-normalised."""
    B = image.shape[0]
    x = torch.cat([image, image.flip(-1)])
    with wsss_fast.capture(model, keep_qkv=True) as cap:
        maps = model(x)["maps"]
    A = torch.stack(
        [
            (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)
            for q, k in zip(cap.q, cap.k)
        ]
    )
    h, w = maps.shape[-2:]
    cam = F.relu(maps).flatten(2) * A.mean(0)[:, :C, C:]
    cam = torch.einsum("bmn,bcn->bcm", A[layers].mean(0)[:, C:, C:], cam)
    cam = F.interpolate(cam.reshape(2 * B, C, h, w), size=x.shape[-2:], mode="bilinear")
    return cam[:B] + cam[B:].flip(-1)


@pytest.mark.parametrize("layers", [slice(None), slice(0, 2)], ids=["all-layers", "shallow"])
def test_refined_cams_match_published_formula(method_and_model, layers):
    _, model = method_and_model
    model.eval()
    try:
        image = torch.randn(2, 3, 48, 64)
        image[..., 40:, :] = 0
        image[..., 56:] = 0
        with torch.no_grad():
            expected = published_refined_cams(model, image, layers)
            for backend in ("torch", "reference"):
                with wsss_fast.use_backend(backend):
                    got = _refined_cams(model, image, layers, (48, 64))
                assert_close(got, expected, name=f"{backend} refined CAM")
            with wsss_fast.use_backend("torch"):
                # Bottom/right zero padding to 48 x 64 inside; the flipped half too.
                normalised = cams(model, image[..., :40, :56])
    finally:
        model.train()
    if layers == slice(None):
        expected = expected[..., :40, :56].clamp_min(0)
        lo, hi = expected.amin((2, 3), keepdim=True), expected.amax((2, 3), keepdim=True)
        assert_close(normalised, (expected - lo) / (hi - lo + 1e-6), name="cams", atol=1e-3)


def test_cam_to_labels_with_par_follows_colour_edge():
    # Left 20 columns red, right 12 blue; the CAM of class 1 is a coarse blob that spills 4
    # columns over the edge at half resolution. PAR (10 iterations on the half-resolution image)
    # pulls the label back to the colour edge: by hand, class 1 exactly on the red part.
    image = torch.zeros(1, 3, 16, 32)
    image[:, 0, :, :20] = 1.0
    image[:, 2, :, 20:] = 1.0
    cam = torch.zeros(1, C, 16, 32)
    cam[:, 0, :, :24] = 1.0
    label = torch.tensor([[1.0, 0.0, 0.0]])
    got = cam_to_labels(cam, image, label, 0.55)
    expected = torch.zeros(1, 16, 32, dtype=torch.long)
    expected[:, :, :20] = 1
    assert torch.equal(got, expected)


def test_build_model_takes_an_engine_config_section():
    cfg = tiny_config(num_classes=5)
    engine_cfg = SimpleNamespace(sections={"aream": cfg})
    method = AReAM()
    model = method.build_model(engine_cfg)
    assert method.config is cfg and model.num_classes == 5
    groups = method.param_groups(model, engine_cfg)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert id(model.cls_token) in no_decay and id(model.head.bias) in no_decay
    assert id(model.head.weight) not in no_decay
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(TypeError, match="aream"):
        method.build_model(SimpleNamespace(sections={}))


def test_pseudo_labels_compose_the_published_steps(method_and_model):
    # Shallow-layer refined CAMs -> ReLU, min-max, absent classes zeroed -> labels at both
    # background scores (steps tested by hand above) -> combination -> crop box.
    method, model = method_and_model
    batch = make_batch(seed=7)
    image, label = batch["image"], batch["label"]
    with torch.no_grad():
        cam = published_refined_cams(model, image, slice(0, 2)).clamp_min(0)
        lo, hi = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
        cam = (cam - lo) / (hi - lo + 1e-6) * label[:, :, None, None]
        image01 = image * torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        image01 = image01 + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        low, high = (cam_to_labels(cam, image01, label, t) for t in (0.35, 0.55))
        expected = mask_outside_box(combine_labels(low, high), batch["crop_box"])
        with wsss_fast.use_backend("reference"):
            got = method.pseudo_labels(model, image, label, batch["crop_box"])
    assert torch.equal(got, expected)
    assert (got == 0).any() and ((got > 0) & (got < IGNORE_INDEX)).any()


def test_preview_gives_images_cams_and_pseudo_labels(method_and_model):
    method, model = method_and_model
    model.train()
    batch = make_batch()
    shown = method.preview(model, batch, n=2)
    assert model.training  # the preview leaves the training mode as it was
    assert shown["image"].shape == (2, 3, 48, 48)
    assert 0.0 <= float(shown["image"].min()) and float(shown["image"].max()) <= 1.0
    assert shown["cam"].shape == (2, 48, 48)
    pseudo = shown["pseudo"]
    assert pseudo.shape == (2, 48, 48)
    # Image 1 has only class 1 (id 2): its labels are background, class id 2 or ignored, and
    # everything outside its crop box [8, 40) x [0, 32) is ignored.
    assert set(np.unique(pseudo[1])) <= {0, 2, IGNORE_INDEX}
    assert (pseudo[1, :8] == IGNORE_INDEX).all() and (pseudo[1, :, 32:] == IGNORE_INDEX).all()
