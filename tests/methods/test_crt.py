"""CRT (wsss_fast.methods.crt) on tiny branches: tiling and merging, the summed class-token
attention, the CNN branch's freezing rules, the loss on every backend, CAMs and pseudo masks."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close

import wsss_fast
from wsss_fast.methods import METHODS, method_class
from wsss_fast.methods.crt import (
    CRT,
    CRTConfig,
    cams,
    class_token_attention,
    merge,
    padded_size,
    tile,
)

pytest.importorskip("timm")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
C = 3
TILE, STRIDE, PATCH = 32, 16, 8  # a 48 crop is a 2 x 2 grid of tiles, as 336 = 224 + 112
TINY_VIT = dict(patch_size=PATCH, embed_dim=32, depth=2, num_heads=2)  # head dim 16


def tiny_config(**overrides) -> CRTConfig:
    kwargs = dict(
        cnn_backbone="resnet18",
        vit_backbone="vit_tiny_patch16_224",
        vit_kwargs=dict(TINY_VIT),
        num_classes=C,
        tile_size=TILE,
        tile_stride=STRIDE,
    )
    kwargs.update(overrides)
    return CRTConfig(**kwargs)


@pytest.fixture(scope="module")
def method_and_model():
    torch.manual_seed(0)
    method = CRT(tiny_config())
    return method, method.build_model()


def make_batch(seed: int = 1, size: int = 48) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(2, 3, size, size, generator=g),
        "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    }


# ---------------------------------------------------------------------------- tiling


def test_padded_size_follows_published_rule_by_hand():
    # max((floor(side / 112) + 1) * 112, 224), worked out by hand.
    for side, expected in [(1, 224), (111, 224), (112, 224), (223, 224), (224, 336), (336, 448),
                           (375, 448), (500, 560)]:  # fmt: skip
        assert padded_size(side, 224, 112) == expected, side


@pytest.mark.parametrize("side_h, side_w", [(1, 1), (5, 31), (32, 32), (37, 50), (48, 64),
                                            (63, 17), (95, 96), (130, 41)])  # fmt: skip
def test_tile_then_merge_is_identity_for_every_size(side_h, side_w):
    H, W = padded_size(side_h, TILE, STRIDE), padded_size(side_w, TILE, STRIDE)
    assert H >= max(side_h + 1, TILE) and H % STRIDE == 0
    image = torch.randn(2, 3, H, W)
    tiles, (nh, nw) = tile(image, TILE, STRIDE)
    assert (nh, nw) == ((H - TILE) // STRIDE + 1, (W - TILE) // STRIDE + 1)
    assert tiles.shape == (2 * nh * nw, 3, TILE, TILE)
    # Tile b * nh * nw + i * nw + j starts at (i * stride, j * stride) of image b.
    i, j = nh - 1, nw // 2
    expected = image[1, :, i * STRIDE : i * STRIDE + TILE, j * STRIDE : j * STRIDE + TILE]
    assert torch.equal(tiles[nh * nw + i * nw + j], expected)
    # Overlaps hold equal values, so their average is the image itself.
    assert_close(merge(tiles, (nh, nw), STRIDE), image, name="merge(tile(x))")
    # Constant maps at token resolution (what the ViT head gives) merge to the constant.
    g, s = TILE // PATCH, STRIDE // PATCH
    ones = torch.full((2 * nh * nw, C, g, g), 0.7)
    merged = merge(ones, (nh, nw), s)
    assert merged.shape == (2, C, H // PATCH, W // PATCH)
    assert_close(merged, torch.full_like(merged, 0.7), name="merged constant")


def test_merge_averages_overlaps_by_hand():
    # Two 1 x 2 tiles in a row with stride 1 over a 1 x 3 strip: [a, (a + b) / 2, b] per tile
    # value; then a 2 x 2 grid of 2 x 2 tiles, stride 1: the centre pixel is the mean of all four.
    maps = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
    assert merge(maps, (1, 2), 1).tolist() == [[[[1.0, 4.0, 7.0]]]]
    grid = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, 2.0, 3.0, 6.0)])
    merged = merge(grid, (2, 2), 1)[0, 0]
    assert merged.tolist() == [[1.0, 1.5, 2.0], [2.0, 3.0, 4.0], [3.0, 4.5, 6.0]]


def test_tiling_errors_name_the_fix():
    with pytest.raises(ValueError, match="padded_size"):
        tile(torch.zeros(1, 3, 40, 48), TILE, STRIDE)  # 40 is not 32 + k * 16
    with pytest.raises(ValueError, match="padded_size"):
        tile(torch.zeros(1, 3, 16, 48), TILE, STRIDE)  # smaller than a tile
    with pytest.raises(ValueError, match="does not divide"):
        tile(torch.zeros(1, 3, 64, 64), 32, 12)
    with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
        tile(torch.zeros(3, 64, 64), TILE, STRIDE)
    with pytest.raises(ValueError, match="grids"):
        merge(torch.zeros(5, 1, 4, 4), (2, 2), 2)


# ---------------------------------------------------------------------------- the model


def test_model_outputs_and_logits_are_gap(method_and_model):
    _, model = method_and_model
    out = model(make_batch()["image"])
    assert out["cnn_maps"].shape == (2, C, 3, 3)  # output stride 16
    assert out["vit_maps"].shape == (2, C, 6, 6)  # 2 x 2 tiles of 4 x 4 tokens, stride 2
    assert_close(out["cnn_logits"], out["cnn_maps"].mean((2, 3)), name="cnn logits")
    assert_close(out["vit_logits"], out["vit_maps"].mean((2, 3)), name="vit logits")
    assert model.cnn.classifier.bias is None and model.cnn.classifier.kernel_size == (1, 1)


def test_block_stack_applied_three_times_with_shared_weights(method_and_model):
    # The tiled forward by hand from the ViT's modules: x <- x + blocks(x) three times, final norm,
    # 3x3 head, merge.
    _, model = method_and_model
    vit = model.vit
    image = make_batch(seed=3)["image"]
    tiles = torch.cat(
        [image[:, :, y : y + TILE, x : x + TILE] for y in (0, 16) for x in (0, 16)], 0
    )  # tile-major here: index t * B + b
    with torch.no_grad():
        x = vit.patch_embed(tiles)
        x = torch.cat([vit.cls_token.expand(len(tiles), -1, -1), x], 1) + vit.pos_embed
        for _ in range(3):
            y = x
            for blk in vit.blocks:
                y = blk(y)
            x = x + y
        x = vit.norm(x)
        maps = vit.head(x[:, 1:].transpose(1, 2).reshape(len(tiles), -1, 4, 4))
        maps = maps.reshape(4, 2, C, 4, 4)
        total = torch.zeros(2, C, 6, 6)
        count = torch.zeros(6, 6)
        for t, (y0, x0) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
            total[:, :, y0 : y0 + 4, x0 : x0 + 4] += maps[t]
            count[y0 : y0 + 4, x0 : x0 + 4] += 1
        got, _ = vit(image)
    assert_close(got, total / count, name="tiled ViT maps")


def test_summed_class_token_attention_matches_materialised(method_and_model):
    _, model = method_and_model
    vit = model.vit.eval()
    tiles = torch.randn(3, 3, TILE, TILE)
    try:
        with torch.no_grad():
            # The oracle: the reference backend's materialised head-mean N x N maps.
            with wsss_fast.use_backend("reference"):
                with wsss_fast.capture(vit, export="mean") as cap:
                    vit.tile_maps(tiles)
            assert len(cap.exports) == 3 * vit.depth  # every application of every block
            expected = torch.stack([A[:, 0, 1:] for A in cap.exports]).sum(0)
            for backend in ("torch", "triton"):
                with wsss_fast.use_backend(backend):
                    maps, R = class_token_attention(vit, tiles)
                assert maps.shape == (3, C, 4, 4)
                assert_close(R.reshape(3, 16), expected, name=f"{backend} summed cls attention")
    finally:
        vit.train()
    # Sanity: 6 applications of rows that sum to 1 over all 17 keys.
    assert (expected.sum(-1) < 6).all() and (expected.sum(-1) > 0).all()


def test_cnn_branch_frozen_bn_stem_and_detach(method_and_model):
    method, model = method_and_model
    model.train()
    bns = [m for m in model.cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.vit.training and model.cnn.classifier.training
    stats = {id(m): m.running_mean.clone() for m in bns}
    model.zero_grad(set_to_none=True)
    terms = method.training_step(model, make_batch(), {"epoch": 0})
    terms["loss"].backward()
    assert all(torch.equal(m.running_mean, stats[id(m)]) for m in bns), "BN statistics moved"
    stem = [*model.cnn.stem.parameters(), *model.cnn.stages[0].parameters()]
    stem += list(model.cnn.stages[1].parameters())
    assert all(not p.requires_grad and p.grad is None for p in stem)
    for stage in model.cnn.stages[2:]:
        grads = [p.grad for p in stage.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    model.zero_grad(set_to_none=True)
    # With cnn_frozen_bn=false the CNN's BN trains, but the frozen stem's BN never does.
    other = CRT(tiny_config(cnn_frozen_bn=False, cnn_trainable_stages=4)).build_model().train()
    assert other.cnn.stages[0][0].bn1.training and not other.cnn.stem[1].training
    assert all(p.requires_grad for p in other.cnn.stages.parameters())


def _step(method, model, backend: str, epoch: int = 1):
    model.zero_grad(set_to_none=True)
    with wsss_fast.use_backend(backend):
        terms = method.training_step(model, make_batch(), {"epoch": epoch})
        terms["loss"].backward()
    named = dict(model.named_parameters())
    keys = [
        "vit.blocks.0.attn.qkv.weight",
        "vit.blocks.1.mlp.fc1.weight",
        "vit.head.weight",
        "vit.pos_embed",
        "cnn.stages.3.0.downsample.0.weight",  # (timm zero-inits the last BN of a block)
        "cnn.classifier.weight",
    ]
    grads = {k: named[k].grad.clone() for k in keys}
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in terms.items()}, grads


def test_training_step_same_on_torch_and_triton(method_and_model):
    method, model = method_and_model
    model.train()
    terms, grads = _step(method, model, "torch")
    assert set(terms) == {"loss", "cnn_loss", "vit_loss", "l1_loss"}
    expected_loss = terms["cnn_loss"] + terms["vit_loss"] + 0.1 * terms["l1_loss"]
    assert_close(terms["loss"], expected_loss, name="loss")
    other_terms, other_grads = _step(method, model, "triton")
    for key in terms:
        assert_close(other_terms[key], terms[key], name=f"triton {key}", rtol=1e-4, atol=1e-5)
    for key in grads:
        assert grads[key].abs().sum() > 0, key
        assert_close(other_grads[key], grads[key], name=f"triton d loss / d {key}", rtol=1e-3)


def test_l1_term_from_l1_start_and_reaches_both_branches(method_and_model):
    method, model = method_and_model
    model.train()
    batch = make_batch(seed=5)
    assert set(method.training_step(model, batch, SimpleNamespace(epoch=0))) == {
        "loss",
        "cnn_loss",
        "vit_loss",
    }
    terms = method.training_step(model, batch, SimpleNamespace(epoch=1))
    with torch.no_grad():
        out = model(batch["image"])
        # align_corners=True from 3 x 3 to 48 x 48: output pixel 47 sits on input pixel 2.
        cnn_up = F.interpolate(out["cnn_maps"], size=(48, 48), mode="bilinear", align_corners=True)
        assert_close(cnn_up[..., -1, -1], out["cnn_maps"][..., -1, -1], name="corner")
        vit_up = F.interpolate(out["vit_maps"], size=(48, 48), mode="bilinear", align_corners=True)
        assert_close(terms["l1_loss"].detach(), (cnn_up - vit_up).abs().mean(), name="l1")
    params = [model.cnn.classifier.weight, model.cnn.stages[3][0].downsample[0].weight]
    params += [model.vit.head.weight, model.vit.blocks[0].attn.qkv.weight]
    grads = torch.autograd.grad(terms["l1_loss"], params)
    assert all(g.abs().sum() > 0 for g in grads), "the L1 term misses a branch"


def test_param_groups_heads_at_ten_times_lr(method_and_model):
    method, model = method_and_model
    cfg = SimpleNamespace(optim=SimpleNamespace(lr=0.1, weight_decay=1e-4))
    backbone, head = method.param_groups(model, cfg)
    assert backbone["lr"] == pytest.approx(0.1) and head["lr"] == pytest.approx(1.0)
    assert backbone["weight_decay"] == head["weight_decay"] == pytest.approx(1e-4)
    head_ids = {id(p) for p in head["params"]}
    assert head_ids == {id(model.cnn.classifier.weight), id(model.vit.head.weight),
                        id(model.vit.head.bias)}  # fmt: skip
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in backbone["params"]} | head_ids == trainable
    assert id(model.cnn.stem[0].weight) not in trainable
    with pytest.raises(TypeError, match="optim.lr"):
        method.param_groups(model, None)


def test_tied_query_key_init_reaches_the_vit():
    model = CRT(tiny_config(vit_qk_init="tied")).build_model()
    qkv = model.vit.blocks[1].attn.qkv.weight
    assert torch.equal(qkv[:32], qkv[32:64]) and not torch.equal(qkv[:32], qkv[64:])


def test_bad_input_errors(method_and_model):
    method, model = method_and_model
    with pytest.raises(ValueError, match="padded_size"):
        method.training_step(model, make_batch(size=40), {"epoch": 0})
    bad = make_batch()
    bad["label"] = torch.ones(2, 5)
    with pytest.raises(ValueError, match="num_classes"):
        method.training_step(model, bad, {"epoch": 0})
    with pytest.raises(ValueError, match="cnn_trainable_stages"):
        CRT(tiny_config(cnn_trainable_stages=0)).build_model()
    with pytest.raises(ValueError, match="multiples of the patch"):
        CRT(tiny_config(tile_size=36, tile_stride=18)).build_model()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CRT(tiny_config(cnn_pretrained="/nonexistent/resnet.pth")).build_model()
    with pytest.raises(TypeError, match="crt"):
        CRT().build_model(SimpleNamespace(sections={}))


# ---------------------------------------------------------------------------- CAMs


def published_cam(model, image: torch.Tensor, attention: bool = True) -> torch.Tensor:
    """One scale with flip, written out with the reference backend's materialised attention,
    before normalisation: each of image and flip zero-padded on its own bottom/right, tiled,
    ``R * maps``, merged, upsampled, cropped, ReLU; the flip's CAM un-flipped and added."""
    vit = model.vit
    H, W = image.shape[-2:]
    Hp, Wp = padded_size(H, TILE, STRIDE), padded_size(W, TILE, STRIDE)
    out = []
    for x in (image, image.flip(-1)):
        tiles, grid = tile(F.pad(x, (0, Wp - W, 0, Hp - H)), TILE, STRIDE)
        with wsss_fast.use_backend("reference"), wsss_fast.capture(vit, export="mean") as cap:
            maps = vit.tile_maps(tiles)
        R = torch.stack([A[:, 0, 1:] for A in cap.exports]).sum(0).reshape(-1, 1, 4, 4)
        cam = merge(R * maps if attention else maps, grid, STRIDE // PATCH)
        cam = F.interpolate(cam, size=(Hp, Wp), mode="bilinear", align_corners=False)
        out.append(F.relu(cam[..., :H, :W]))
    return out[0] + out[1].flip(-1)


def test_cams_match_the_formula_and_are_normalised(method_and_model):
    method, model = method_and_model
    model.eval()
    try:
        image = torch.randn(2, 3, 21, 37)  # smaller than a tile in height, odd sizes
        label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        eval_cfg = SimpleNamespace(scales=(1.0,), flip=True, bg_threshold=0.15)
        with torch.no_grad():
            expected = published_cam(model, image)
            expected = expected / (expected.amax((2, 3), keepdim=True) + 1e-5)
            plain = published_cam(model, image, attention=False)
            plain = plain / (plain.amax((2, 3), keepdim=True) + 1e-5)
            with wsss_fast.use_backend("torch"):
                got = method.cams(model, image, label, eval_cfg)
                ablation = cams(model, image, label, attention=False)
                two = method.cams(
                    model, image, label, SimpleNamespace(scales=(1.0, 0.5), flip=True)
                )
    finally:
        model.train()
    assert got.shape == (2, C, 21, 37) and not got.requires_grad
    present = label[:, :, None, None]
    assert_close(got, expected * present, name="cams", atol=1e-5)
    assert_close(ablation, plain * present, name="cams without attention", atol=1e-5)
    assert (got[0, 1] == 0).all() and (got[1, 0] == 0).all() and (got[1, 2] == 0).all()
    assert got[0, 0].max() > 0.99 and got.min() >= 0 and got.max() < 1
    assert two.shape == got.shape and not torch.equal(two, got)


def test_pseudo_masks_by_hand():
    # Five pixels; classes 1 and 3 present, class 2 absent; background 0.15.
    cam = torch.tensor(
        [
            [0.90, 0.00, 0.10],
            [0.10, 0.00, 0.12],
            [0.30, 0.99, 0.60],
            [0.00, 0.99, 0.00],
            [0.15, 0.00, 0.15],
        ]  # fmt: skip
    ).T.reshape(1, C, 1, 5)
    label = torch.tensor([[1.0, 0.0, 1.0]])
    masks = CRT().pseudo_masks(
        cam, torch.rand(1, 3, 1, 5), label, SimpleNamespace(bg_threshold=0.15)
    )
    assert masks.dtype == torch.long and masks.tolist() == [[[1, 0, 3, 0, 0]]]


def test_registered_and_config_section_loads():
    from wsss_fast.engine import load_config

    assert METHODS["crt"] == ("wsss_fast.methods.crt", "CRT") and method_class("crt") is CRT
    for name in ("crt_synthetic", "crt_voc"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.method == "crt" and isinstance(cfg.crt, CRTConfig)
        crop, t, s = cfg.data.crop_size, cfg.crt.tile_size, cfg.crt.tile_stride
        assert crop >= t and (crop - t) % s == 0, f"{name}: crop {crop} does not tile"
