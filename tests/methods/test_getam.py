"""GETAM (wsss_fast.methods.getam) on a tiny ViT: the batched class-slot maps against the
published per-(image, class) recipe on materialised attention, label completion on hand-made
maps, the split cross-entropy, one phase-2 training step on every backend, and input checks."""

import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close

import wsss_fast
from wsss_fast.methods.getam import (
    GETAM,
    IGNORE_INDEX,
    GETAMConfig,
    class_slot_maps,
    complete_labels,
    first_layer,
    morphological_opening,
    split_ce_loss,
)
from wsss_fast.nn import capture

timm = pytest.importorskip("timm")

C = 3
TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)  # head dim 16


def tiny_config(**overrides) -> GETAMConfig:
    kwargs = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(TINY),
        img_size=32,
        num_classes=C,
        start_layer=0.5,  # layers 2, 3 of 4
        decoder_blocks=(0, 1, 2, 3),
        decoder_width=16,
        pamr_dilations=(1, 2, 4),
        opening=3,
    )
    kwargs.update(overrides)
    return GETAMConfig(**kwargs)


@pytest.fixture(scope="module")
def method_and_model():
    torch.manual_seed(0)
    method = GETAM(tiny_config())
    return method, method.build_model()


# ---------------------------------------------------------------------------- (1) the maps


def _materialising_attention(store: list):
    """A forward for an unpatched timm ``Attention`` that forms P and keeps its gradient."""

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        P = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        P.retain_grad()
        store.append(P)
        out = (P @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(self.norm(out))

    return forward


def _published_maps(model, image, label, start):
    """One backward per (image, class) on a plain timm copy, as ``generate_cam_2`` does:
    ``E_l = mean_h relu(G * A) * mean_h relu(G)``, summed over layers ``>= start``, class row,
    patch columns, relu."""
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True, **TINY
    ).double()
    vit.load_state_dict(model.vit.state_dict())
    store: list = []
    for blk in vit.blocks:
        blk.attn.forward = types.MethodType(_materialising_attention(store), blk.attn)
    x = vit.norm(vit.blocks(vit._pos_embed(vit.patch_embed(image))))
    # The GETAMNet classifier head, applied to the plain ViT's tokens.
    logits = model.classifier(model.cls_readout(x).mean(1))
    if model.token_classifier is not None:
        logits = logits + model.token_classifier(x[:, 0])
    B, Cn = label.shape
    expected = torch.zeros(B, Cn, x.shape[1] - 1, dtype=torch.float64)
    for b in range(B):
        for c in range(Cn):
            if label[b, c] <= 0:
                continue
            for P in store:
                P.grad = None
            logits[b, c].backward(retain_graph=True)
            e = 0
            for P in store[start:]:
                A, G = P[b], P.grad[b]  # [H, N, N]
                e = e + F.relu(G * A).mean(0) * F.relu(G).mean(0)
            expected[b, c] = F.relu(e[0, 1:])
    return expected


@pytest.mark.parametrize(
    "backend, classifier",
    [("torch", "patches"), ("reference", "patches"), ("torch", "patches+token")],
)
def test_class_slot_passes_match_published_per_image_class_backward(backend, classifier):
    torch.manual_seed(3)
    method = GETAM(tiny_config(classifier=classifier))
    model = method.build_model().double().eval()
    start = first_layer(method.config.start_layer, model.depth)
    g = torch.Generator().manual_seed(4)
    image = torch.randn(4, 3, 32, 40, generator=g, dtype=torch.float64)
    # 3, 1, 0 and 2 classes: passes of different sizes, an image with no class.
    label = torch.tensor([[1.0, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.float64)
    with wsss_fast.use_backend(backend):
        with capture(model, keep_outputs=True, keep_qkv=True) as cap:
            logits = model(image, with_seg=False)["logits"]
        got = class_slot_maps(
            logits,
            label,
            cap.q[start:],
            cap.k[start:],
            cap.v[start:],
            cap.outputs[start:],
        )
    expected = _published_maps(model, image, label, start)
    assert got.shape == (4, C, 4 * 5)
    assert expected.abs().max() > 0
    assert (got[2] == 0).all() and (got[1, [0, 2]] == 0).all()
    assert_close(got.double(), expected, name=f"{backend} class-slot maps", rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("classifier", ["patches", "patches+token"])
def test_token_classifier_puts_the_last_class_token_in_the_scores(classifier):
    """With the readout off, the last layer's class-token output reaches the class scores only
    through the token classifier: its GETAM map is zero with "patches" and not with
    "patches+token"."""
    torch.manual_seed(5)
    model = GETAM(tiny_config(readout="ignore", classifier=classifier)).build_model().eval()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with capture(model, keep_outputs=True, keep_qkv=True) as cap:
        logits = model(image, with_seg=False)["logits"]
    last = model.depth - 1
    maps = class_slot_maps(
        logits, label, cap.q[last:], cap.k[last:], cap.v[last:], cap.outputs[last:]
    )
    if classifier == "patches":
        assert (maps == 0).all()
    else:
        assert (maps[label > 0].amax(-1) > 0).all()


def test_slot_pass_masks_images_without_that_slot():
    """An image with fewer classes adds nothing to a later pass: its maps equal those of the
    same image run alone."""
    torch.manual_seed(5)
    method = GETAM(tiny_config())
    model = method.build_model().double().eval()
    start = first_layer(method.config.start_layer, model.depth)
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    label = torch.tensor([[1.0, 1, 1], [0, 1, 0]], dtype=torch.float64)

    def maps(x, y):
        with capture(model, keep_outputs=True, keep_qkv=True) as cap:
            logits = model(x, with_seg=False)["logits"]
        return class_slot_maps(
            logits, y, cap.q[start:], cap.k[start:], cap.v[start:], cap.outputs[start:]
        )

    both = maps(image, label)
    for b in range(2):
        assert_close(both[b], maps(image[b : b + 1], label[b : b + 1])[0], name=f"image {b}")


# ---------------------------------------------------------------------------- (2) labels


def test_label_completion_percentile_and_conflicts():
    H = W = 10
    cam = torch.zeros(1, 3, H, W)
    # Thresholds: the value at rank int(0.9 * n) of the n sorted positive values; class 0:
    # rank 90 of 100 -> 0.01, class 1: rank 19 of 22 -> 0.02.
    cam[0, 0] = 0.01
    a = [(2, 2), (2, 3), (2, 4), (2, 5)]  # class 0 at 0.05: above its threshold
    for y, x in a:
        cam[0, 0, y, x] = 0.05
    cam[0, 0, 7, 7] = 1.0  # a clear class-0 pixel
    cam[0, 1, 5:7, 0:10] = 0.02  # class 1's bulk: 20 of its 22 positive values
    cam[0, 1, 2, 5] = 0.05  # class 1 also above its percentile at one of class 0's pixels
    cam[0, 0, 8, 1], cam[0, 1, 8, 1] = 0.3, 0.8  # class 1 wins the argmax
    cam[0, 2] = 0.9  # absent class: ignored
    label = torch.tensor([[1.0, 1.0, 0.0]])
    got = complete_labels(cam, label, opening=0)

    want = torch.zeros(1, H, W, dtype=torch.int64)
    want[0, 7, 7] = 1
    want[0, 8, 1] = 2
    for y, x in a[:3]:
        want[0, y, x] = 1  # background at step 1 ((1 - 0.05) ** 32 = 0.19), completed
    want[0, 2, 5] = IGNORE_INDEX  # claimed by both classes
    assert torch.equal(got, want)


def test_label_completion_saliency_rule():
    cam = torch.zeros(1, 1, 1, 21)
    cam[0, 0, 0, :10] = 0.5
    cam[0, 0, 0, 18] = 1.0
    cam[0, 0, 0, 19] = 0.2
    cam[0, 0, 0, 20] = 0.5
    saliency = torch.zeros(1, 1, 21, dtype=torch.int64)
    saliency[0, 0, :14] = 1
    saliency[0, 0, 20] = 255  # padding
    got = complete_labels(cam, torch.ones(1, 1), saliency, opening=0)
    # 0-9: salient class; 10-13: salient, CAM 0 -> ignored; 14-17, 19: not salient -> 0;
    # 18: not salient but above the threshold (rank int(0.9 * 13) = 11 of the 13 sorted
    # positive values: 0.5) -> completed; 20: padding -> ignored.
    want = torch.tensor([[[1] * 10 + [255] * 4 + [0] * 4 + [1, 0, 255]]])
    assert torch.equal(got, want)


def test_opening_removes_small_blob_and_keeps_big_one():
    H = W = 40
    cam = torch.zeros(1, 1, H, W)
    cam[0, 0, 5:17, 5:17] = 1.0  # 12 x 12: survives a 10 x 10 opening
    cam[0, 0, 10:13, 17:25] = 1.0  # a 3-wide spur on it: removed
    cam[0, 0, 25:30, 25:30] = 1.0  # 5 x 5: removed
    got = complete_labels(cam, torch.ones(1, 1), opening=10)
    want = torch.zeros(1, H, W, dtype=torch.int64)
    want[0, 5:17, 5:17] = 1
    assert torch.equal(got, want)

    # Ignored pixels count as foreground for the opening, as published: a small ignored blob
    # becomes background, a big one stays ignored.
    cam = torch.zeros(1, 1, H, W)
    cam[0, 0, 5:17, 5:17] = 1.0
    saliency = torch.zeros(1, H, W)
    saliency[0, 5:17, 5:17] = 1
    saliency[0, 25:37, 2:14] = 1  # salient, CAM 0: ignored, 12 x 12
    saliency[0, 30:34, 30:34] = 1  # salient, CAM 0: ignored, 4 x 4
    got = complete_labels(cam, torch.ones(1, 1), saliency, opening=10)
    want[0, 25:37, 2:14] = IGNORE_INDEX
    assert torch.equal(got, want)


@pytest.mark.parametrize("size", [3, 4, 10])
def test_opening_keeps_exact_squares(size):
    mask = torch.zeros(2, 30, 31, dtype=torch.bool)
    mask[0, 6 : 6 + size, 9 : 9 + size] = True
    mask[1, 6 : 6 + size - 1, 9 : 9 + size] = True  # one row short: nothing fits
    got = morphological_opening(mask, size)
    assert got.shape == mask.shape
    assert torch.equal(got[0], mask[0])
    assert not got[1].any()


# ---------------------------------------------------------------------------- (4) the CE


def test_split_ce_averages_bg_and_fg_separately():
    g = torch.Generator().manual_seed(0)
    seg = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, 0] = IGNORE_INDEX
    bg, fg = split_ce_loss(seg, target)
    logp = seg.detach().log_softmax(1).permute(0, 2, 3, 1)[target != IGNORE_INDEX]
    t = target[target != IGNORE_INDEX]
    nll = -logp[torch.arange(len(t)), t]
    assert_close(bg.detach(), nll[t == 0].mean(), name="bg")
    assert_close(fg.detach(), nll[t > 0].mean(), name="fg")


def test_split_ce_finite_without_valid_pixels():
    seg = torch.randn(1, 3, 4, 4, requires_grad=True)
    for fill in (IGNORE_INDEX, 0):
        target = torch.full((1, 4, 4), fill, dtype=torch.int64)
        bg, fg = split_ce_loss(seg, target)
        assert torch.isfinite(bg) and torch.isfinite(fg)
        assert float(fg.detach()) == 0.0
        (bg + fg).backward()
        assert torch.isfinite(seg.grad).all()
        seg.grad = None


# ---------------------------------------------------------------------------- (3) training


def _batch():
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(2, 3, 32, 32, generator=g),
        "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "crop_box": torch.tensor([[0, 32, 0, 32], [0, 24, 8, 32]]),
        "saliency": (torch.rand(2, 32, 32, generator=g) > 0.3).long(),
    }


def _step(method, model, backend, batch):
    model.zero_grad(set_to_none=True)
    with wsss_fast.use_backend(backend):
        torch.manual_seed(0)  # the decoder's dropout
        terms = method.training_step(model, batch, {"step": 5, "total_steps": 10})
        terms["loss"].backward()
    grads = {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if n in ("classifier.weight", "vit.blocks.1.attn.qkv.weight", "head.4.weight")
    }
    return {k: v.detach() for k, v in terms.items()}, grads


def test_phase2_training_step_same_on_every_backend(method_and_model):
    method, model = method_and_model
    model.train()
    batch = _batch()
    terms, grads = _step(method, model, "torch", batch)
    assert set(terms) == {"loss", "cls_loss", "bg_loss", "fg_loss", "sal_loss"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert grads["head.4.weight"].abs().sum() > 0
    for backend in ("triton", "reference"):
        other, other_grads = _step(method, model, backend, batch)
        for key in terms:
            assert_close(other[key], terms[key], name=f"{backend} {key}", rtol=1e-4, atol=1e-6)
        for n, e in grads.items():
            assert_close(other_grads[n], e, name=f"{backend} d loss / d {n}", rtol=1e-4, atol=1e-6)


def test_phase1_is_classification_only_and_lr_factor(method_and_model):
    method, model = method_and_model
    terms = method.training_step(model, _batch(), {"step": 4, "total_steps": 10})
    assert set(terms) == {"loss", "cls_loss"}
    assert [method.lr_factor(s, 10) for s in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]


def test_cams_and_segment(method_and_model):
    method, model = method_and_model
    model.eval()
    image = torch.randn(1, 3, 30, 37)  # padded to the patch grid inside
    label = torch.tensor([[0.0, 1.0, 1.0]])
    with torch.no_grad():  # as an inference loop may call it
        cam = method.cams(model, image, label, SimpleNamespace(scales=(1.0,), flip=False))
    assert cam.shape == (1, C, 30, 37)
    assert (cam[0, 0] == 0).all() and (cam >= 0).all() and (cam < 1).all()
    masks = method.pseudo_masks(cam, None, label)
    assert masks.shape == (1, 30, 37)
    assert set(masks.unique().tolist()) <= {0, 2, 3, IGNORE_INDEX}
    probs = method.segment(model, image)
    assert probs.shape == (1, C + 1, 30, 37)
    assert_close(probs.sum(1), torch.ones(1, 30, 37), name="probabilities sum", rtol=1e-5)


# ---------------------------------------------------------------------------- (5) bad input


def test_bad_inputs_raise_clear_errors(method_and_model):
    method, model = method_and_model
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"label must be a \[B, C\]"):
        method.training_step(
            model,
            {"image": torch.randn(2, 3, 32, 32), "label": torch.ones(2, 5)},
            {"step": 0, "total_steps": 10},
        )
    batch = _batch()
    batch["saliency"] = torch.ones(2, 16, 16)
    with pytest.raises(ValueError, match="saliency"):
        method.training_step(model, batch, {"step": 9, "total_steps": 10})
    with pytest.raises(ValueError, match="start_layer"):
        first_layer(7, 4)
    with pytest.raises(ValueError, match="start_layer"):
        first_layer(1.5, 4)
    with pytest.raises(ValueError, match="decoder_blocks"):
        GETAM(tiny_config(decoder_blocks=(0, 1, 2, 9))).build_model()
    with pytest.raises(ValueError, match="decoder_blocks"):
        tiny_config(decoder_blocks=(1, 2))
    with pytest.raises(ValueError, match="readout"):
        tiny_config(readout="mean")
    with pytest.raises(ValueError, match="classifier"):
        tiny_config(classifier="token")
    with pytest.raises(TypeError, match="GETAMConfig"):
        GETAM().build_model(SimpleNamespace(sections={}))
    with pytest.raises(ValueError, match="eval.scales"):
        method.cams(
            model,
            torch.randn(1, 3, 32, 32),
            torch.ones(1, C),
            SimpleNamespace(scales=(1.0, 0.5), flip=False),
        )
    with pytest.raises(ValueError, match="ids outside"):
        split_ce_loss(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))
