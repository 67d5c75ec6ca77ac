"""Transforms: crop box, flip consistency, mask values, determinism, colour maths, normalisation."""

import colorsys
import math

import numpy as np
import pytest
import torch

from wsss_fast.data import (
    ColorJitter,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRescale,
    RandomResizedCrop,
    RandomResizeLong,
    denormalize,
    normalize,
    timm_train_transform,
    train_transform,
)

SENTINEL = (7.0, 7.0, 7.0)  # a fill no real [0, 1] pixel has, to see where padding went


def make_sample(h, w, seed=0, classes=(0, 3, 5)):
    """An image whose red channel encodes the mask, so geometry can be checked pixel by pixel."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(classes)[
        torch.randint(0, len(classes), (h // 4 + 1, w // 4 + 1), generator=g)
    ]
    mask = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w].contiguous()
    image = torch.rand(3, h, w, generator=g)
    image[0] = mask.float() / 10.0
    return {"image": image, "mask": mask, "crop_box": torch.tensor([0, h, 0, w])}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "hw", [(20, 30), (64, 80), (20, 80), (70, 25)], ids=["smaller", "larger", "short", "narrow"]
)
def test_random_crop_box_marks_real_pixels(hw):
    h, w = hw
    crop = RandomCrop((48, 40), fill=SENTINEL)
    for seed in range(8):
        out = crop(make_sample(h, w, seed), gen(seed))
        img, mask = out["image"], out["mask"]
        assert img.shape == (3, 48, 40) and mask.shape == (48, 40)
        y0, y1, x0, x1 = out["crop_box"].tolist()
        assert (y1 - y0, x1 - x0) == (min(h, 48), min(w, 40))
        inside = torch.zeros(48, 40, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert (img[:, inside] != 7.0).all() and (img[:, ~inside] == 7.0).all()
        assert (mask[~inside] == 255).all() and (mask[inside] != 255).all()
        # The mask still matches the image it came with.
        assert torch.equal(mask[inside], (img[0][inside] * 10).round().long())


def test_random_crop_finds_the_source_window():
    s = make_sample(30, 30)
    out = RandomCrop(16, fill=SENTINEL)(s, gen(5))
    y0, y1, x0, x1 = out["crop_box"].tolist()
    assert [y0, y1, x0, x1] == [0, 16, 0, 16]
    window = out["image"][1]
    # The green channel is unique noise: the crop must be a contiguous window of the source.
    src = s["image"][1]
    hits = [
        (i, j)
        for i in range(15)
        for j in range(15)
        if torch.equal(src[i : i + 16, j : j + 16], window)
    ]
    assert len(hits) == 1


def test_flip_flips_image_mask_and_box_together():
    s = RandomCrop(40, fill=SENTINEL)(make_sample(30, 24), gen(1))
    out = RandomHorizontalFlip(p=1.0)(s, gen(0))
    assert torch.equal(out["image"], s["image"].flip(-1)) and torch.equal(
        out["mask"], s["mask"].flip(-1)
    )
    y0, y1, x0, x1 = s["crop_box"].tolist()
    assert out["crop_box"].tolist() == [y0, y1, 40 - x1, 40 - x0]
    y0, y1, x0, x1 = out["crop_box"].tolist()
    assert (out["image"][:, y0:y1, x0:x1] != 7.0).all() and (out["mask"][y0:y1, x0:x1] != 255).all()
    assert RandomHorizontalFlip(p=0.0)(s, gen(0)) is s


def test_rescale_keeps_mask_values_and_box():
    s = make_sample(33, 47)
    for seed in range(6):
        out = RandomRescale((0.4, 2.2))(s, gen(seed))
        _, h, w = out["image"].shape
        assert 0.4 * 33 - 1 <= h <= 2.2 * 33 + 1 and abs(w / h - 47 / 33) < 0.1
        assert out["crop_box"].tolist() == [0, h, 0, w]
        assert set(out["mask"].unique().tolist()) <= {0, 3, 5}
        assert out["image"].min() >= 0 and out["image"].max() <= 1
        # Nearest interpolation: every mask pixel comes from the source pixel at the same place.
        yy = ((torch.arange(h) + 0.5) * 33 / h).long().clamp(max=32)
        xx = ((torch.arange(w) + 0.5) * 47 / w).long().clamp(max=46)
        assert torch.equal(out["mask"], s["mask"][yy][:, xx])


def test_full_recipe_masks_hold_only_valid_values():
    t = train_transform(32, scale_range=(0.3, 2.5))
    for seed in range(10):
        out = t(make_sample(25 + seed, 40 - seed, seed), gen(seed))
        assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)
        assert set(out["mask"].unique().tolist()) <= {0, 3, 5, 255}
        y0, y1, x0, x1 = out["crop_box"].tolist()
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert (out["mask"][outside] == 255).all()


def test_rescale_then_flip_commutes_with_flip_then_rescale():
    s = make_sample(21, 35)
    a = Compose([RandomRescale((1.37, 1.37)), RandomHorizontalFlip(1.0)])(s, gen())
    b = Compose([RandomHorizontalFlip(1.0), RandomRescale((1.37, 1.37))])(s, gen())
    assert torch.equal(a["mask"], b["mask"])
    torch.testing.assert_close(a["image"], b["image"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rng_kind", ["torch", "numpy"])
def test_deterministic_for_a_seed(rng_kind):
    make = (
        (lambda s: torch.Generator().manual_seed(s))
        if rng_kind == "torch"
        else np.random.default_rng
    )
    t = train_transform(24)
    s = make_sample(30, 41)
    a, b, c = t(s, make(11)), t(s, make(11)), t(s, make(12))
    for key in ("image", "mask", "crop_box"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], c["image"])


def test_resize_long_and_resized_crop():
    s = make_sample(30, 60)
    for seed in range(5):
        out = RandomResizeLong((50, 70))(s, gen(seed))
        _, h, w = out["image"].shape
        assert 50 <= w <= 70 and h == round(30 * w / 60)
        out = RandomResizedCrop(24, scale=(0.2, 1.0))(s, gen(seed))
        assert out["image"].shape == (3, 24, 24) and out["crop_box"].tolist() == [0, 24, 0, 24]
        assert set(out["mask"].unique().tolist()) <= {0, 3, 5}
    out = timm_train_transform(16)(s, gen(0))
    assert out["image"].shape == (3, 16, 16)


def test_recipe_resize_long_replaces_the_rescale():
    """With ``resize_long`` the image's long side (the crop box, inside a larger padded crop)
    lands in that range whatever ``scale_range`` says; without it, the relative rescale."""
    s = make_sample(30, 60)
    longs = set()
    for seed in range(8):
        t = train_transform(200, scale_range=(3.0, 3.0), resize_long=(50, 70), jitter=None)
        y0, y1, x0, x1 = t(s, gen(seed))["crop_box"].tolist()
        assert 50 <= x1 - x0 <= 70 and y1 - y0 == round(30 * (x1 - x0) / 60)
        longs.add(x1 - x0)
    assert len(longs) > 1  # a random length, not one fixed size
    y0, y1, x0, x1 = train_transform(200, scale_range=(3.0, 3.0), jitter=None)(s, gen(0))[
        "crop_box"
    ].tolist()
    assert (y1 - y0, x1 - x0) == (90, 180)


def test_color_jitter_brightness_only():
    s = make_sample(10, 12)
    s["image"] = s["image"] * 0.5  # room to brighten without clipping
    out = ColorJitter(brightness=0.5, contrast=0, saturation=0, hue=0, p=1.0)(s, gen(3))
    ratio = out["image"] / s["image"].clamp_min(1e-6)
    f = ratio[s["image"] > 0.05]
    assert 0.5 <= f.min() and f.max() <= 1.5 and (f.max() - f.min()) < 1e-4
    assert torch.equal(out["mask"], s["mask"])
    assert ColorJitter(p=0.0)(s, gen(0)) is s


def test_color_jitter_hue_shifts_every_pixel_by_one_angle():
    g = gen(0)
    image = torch.rand(3, 4, 5, generator=g)
    image[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    image[:, 0, 1] = torch.tensor([0.2, 0.9, 0.4])
    t = ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.4, p=1.0)
    shifts = set()
    for seed in range(5):
        out = t({"image": image, "crop_box": torch.tensor([0, 4, 0, 5])}, gen(seed))["image"]
        # colorsys is the oracle: hue moves by one amount everywhere, saturation and value stay.
        before = [colorsys.rgb_to_hsv(*image[:, i, j].tolist()) for i in range(4) for j in range(5)]
        after = [colorsys.rgb_to_hsv(*out[:, i, j].tolist()) for i in range(4) for j in range(5)]
        d = [(a[0] - b[0]) % 1.0 for a, b in zip(after, before)]
        assert max(min(abs(x - d[0]), 1 - abs(x - d[0])) for x in d) < 1e-4
        assert min(d[0], 1 - d[0]) <= 0.4 + 1e-6
        np.testing.assert_allclose([a[1:] for a in after], [b[1:] for b in before], atol=1e-5)
        shifts.add(round(d[0], 4))
    assert len(shifts) == 5


def test_color_jitter_saturation_blends_towards_grey():
    s = make_sample(8, 8)
    img = 0.4 + 0.2 * s["image"]  # factors up to 2 cannot clip
    grey = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    t = ColorJitter(brightness=0, contrast=0, saturation=1.0, hue=0, p=1.0)
    for seed in range(5):
        out = t({"image": img, "crop_box": torch.tensor([0, 8, 0, 8])}, gen(seed))["image"]
        keep = (img - grey).abs() > 0.02
        f = ((out - grey) / (img - grey))[keep]
        assert f.max() - f.min() < 1e-3 and 0.0 <= f.mean() <= 2.0


def test_normalize_round_trip():
    x = torch.rand(2, 3, 5, 7)
    n = normalize(x)
    want = (x[0, 1] - 0.456) / 0.224
    torch.testing.assert_close(n[0, 1], want)
    torch.testing.assert_close(denormalize(n), x)
    torch.testing.assert_close(denormalize(n[1], max_value=255.0), x[1] * 255)
    assert denormalize(n * 10, clamp=True).max() <= 1.0
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        normalize(torch.rand(4, 5, 5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < low <= high"):
        RandomRescale((2.0, 1.0))
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.7)
    assert math.isclose(RandomCrop(8).fill[0], 0.485)
