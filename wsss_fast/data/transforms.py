"""Training transforms as the methods use them, deterministic for a seed.

A transform is a callable ``t(sample, rng) -> sample``. ``sample`` is a dict:

- ``image``: float32 ``[3, H, W]`` RGB in [0, 1] (not yet normalised; the data set normalises
  after the transforms, see :func:`normalize`);
- ``mask`` (optional): int64 ``[H, W]``, 0..C and 255 = ignore;
- ``saliency`` (optional): int64 ``[H, W]``, 1 salient, 0 not, 255 unknown (padding);
- ``crop_box``: int64 ``[4]`` = ``[y0, y1, x0, x1]``, the region of the current image that holds
  real pixels (AFA's ``img_box``; the padding a crop adds lies outside it).

``rng`` is a ``torch.Generator`` or ``numpy.random.Generator``; every random draw comes from it, so
a sample's augmentation depends only on the generator's seed (the data set seeds one per sample
from ``(seed, epoch, index)``, independent of worker count and order). Geometric transforms move
the dense maps (``DENSE_KEYS``: mask, saliency) with nearest-neighbour interpolation and pad them
with 255, and keep ``crop_box`` right.

Example (AReAM's Conformer / AFA recipe)::

    t = Compose([RandomRescale((0.5, 2.0)), RandomHorizontalFlip(), ColorJitter(p=0.8),
                 RandomCrop(384)])
    sample = t({"image": img, "crop_box": torch.tensor([0, h, 0, w])}, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss_fast.data.io import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColorJitter",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRescale",
    "RandomResizeLong",
    "RandomResizedCrop",
    "Rng",
    "denormalize",
    "normalize",
    "resize_sample",
    "timm_train_transform",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Rng = torch.Generator | np.random.Generator


DENSE_KEYS = ("mask", "saliency")
"""Per-pixel maps that geometric transforms move with the image (nearest, padded with 255)."""


def _dense(sample: dict) -> list[str]:
    return [k for k in DENSE_KEYS if sample.get(k) is not None]


def _uniform(rng: Rng, lo: float, hi: float) -> float:
    if isinstance(rng, np.random.Generator):
        return float(rng.uniform(lo, hi))
    return lo + (hi - lo) * float(torch.rand((), generator=rng, dtype=torch.float64))


def _randint(rng: Rng, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi)``."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(lo, hi))
    return int(torch.randint(lo, hi, (), generator=rng))


def _permutation(rng: Rng, n: int) -> list[int]:
    if isinstance(rng, np.random.Generator):
        return [int(i) for i in rng.permutation(n)]
    return torch.randperm(n, generator=rng).tolist()


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------- normalisation


def _stats(image: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(
            f"expected an image [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}"
        )
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return m, s


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(image - mean) / std`` per channel.

    Args:
        image: float ``[3, H, W]`` or ``[B, 3, H, W]`` RGB in [0, 1].

    Returns:
        same shape, normalised (ImageNet statistics by default).
    """
    m, s = _stats(image, mean, std)
    return (image - m) / s


def denormalize(
    image: torch.Tensor,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    *,
    max_value: float = 1.0,
    clamp: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`normalize`, scaled to ``[0, max_value]``.

    PAR (AReAM/AFA) wants images in [0, 1] (``max_value=1``); PAMR (GETAM) the raw 0-255 range
    (``max_value=255``).

    Args:
        image: float ``[3, H, W]`` or ``[B, 3, H, W]``, normalised.
        clamp: clip to ``[0, max_value]`` (colour jitter and bicubic overshoot can leave values
            slightly outside after a round trip through other code).

    Returns:
        same shape and dtype.
    """
    m, s = _stats(image, mean, std)
    out = (image * s + m) * max_value
    return out.clamp(0, max_value) if clamp else out


# --------------------------------------------------------------------------- geometry


def _box(sample: dict) -> torch.Tensor:
    box = sample.get("crop_box")
    if box is None:
        _, h, w = sample["image"].shape
        return torch.tensor([0, h, 0, w], dtype=torch.int64)
    return torch.as_tensor(box, dtype=torch.int64)


def resize_sample(sample: dict, height: int, width: int) -> dict:
    """Resize image (bicubic, antialiased when shrinking), mask (nearest) and crop box to H x W."""
    img = sample["image"]
    _, h, w = img.shape
    out = dict(sample)
    if (h, w) == (height, width):
        out["crop_box"] = _box(sample)
        return out
    out["image"] = F.interpolate(
        img[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )[0].clamp_(0.0, 1.0)
    for key in _dense(sample):
        # nearest-exact samples pixel centres, so a flip commutes with the resize.
        m = F.interpolate(
            sample[key][None, None].float(), size=(height, width), mode="nearest-exact"
        )
        out[key] = m[0, 0].to(torch.int64)
    box = _box(sample).double()
    box[:2] *= height / h
    box[2:] *= width / w
    out["crop_box"] = box.round().to(torch.int64)
    return out


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample: dict, rng: Rng) -> dict:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomRescale:
    """Rescale both sides by one factor drawn uniformly from ``scale_range``.

    AReAM/AFA use (0.5, 2.0); GETAM-style segmentation training (0.7, 1.3). Sizes are
    ``max(1, round(scale * side))``.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)):
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"RandomRescale: need 0 < low <= high, got {scale_range}")
        self.scale_range = (float(lo), float(hi))

    def __call__(self, sample: dict, rng: Rng) -> dict:
        s = _uniform(rng, *self.scale_range)
        _, h, w = sample["image"].shape
        return resize_sample(sample, max(1, round(h * s)), max(1, round(w * s)))

    def __repr__(self) -> str:
        return f"RandomRescale(scale_range={self.scale_range})"


class RandomResizeLong:
    """Resize so the long side is an integer drawn uniformly from ``[low, high]`` (IRN/CRT)."""

    def __init__(self, long_range: tuple[int, int] = (320, 640)):
        lo, hi = long_range
        if not 0 < lo <= hi:
            raise ValueError(f"RandomResizeLong: need 0 < low <= high, got {long_range}")
        self.long_range = (int(lo), int(hi))

    def __call__(self, sample: dict, rng: Rng) -> dict:
        target = _randint(rng, self.long_range[0], self.long_range[1] + 1)
        _, h, w = sample["image"].shape
        s = target / max(h, w)
        return resize_sample(sample, max(1, round(h * s)), max(1, round(w * s)))

    def __repr__(self) -> str:
        return f"RandomResizeLong(long_range={self.long_range})"


class RandomCrop:
    """Random crop to ``size``, padding first where the image is smaller (AFA's ``random_crop``).

    The image is placed at a random offset on a canvas of ``max(size, image)`` per side, then a
    ``size`` window is drawn uniformly from the canvas. Padding is ``fill`` in the image (default
    the ImageNet mean, i.e. 0 after normalisation, as AFA pads; AReAM pads raw black: pass
    ``fill=(0, 0, 0)``) and ``ignore_index`` in the mask. ``crop_box`` becomes the real pixels'
    region inside the window. (AFA's retry loop that avoids crops dominated by one class reads the
    ground-truth mask, which weak supervision must not see, so it is not reproduced.)
    """

    def __init__(
        self,
        size: int | Sequence[int],
        fill: Sequence[float] = IMAGENET_MEAN,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.size = _pair(size)
        self.fill = tuple(float(f) for f in fill)
        self.ignore_index = int(ignore_index)

    def __call__(self, sample: dict, rng: Rng) -> dict:
        img = sample["image"]
        _, h, w = img.shape
        ch, cw = self.size
        canvas_h, canvas_w = max(ch, h), max(cw, w)
        pad_y = _randint(rng, 0, canvas_h - h + 1)
        pad_x = _randint(rng, 0, canvas_w - w + 1)
        top = _randint(rng, 0, canvas_h - ch + 1)
        left = _randint(rng, 0, canvas_w - cw + 1)
        # The image occupies canvas rows [pad_y, pad_y + h); the window rows [top, top + ch).
        y0, y1 = max(pad_y, top), min(pad_y + h, top + ch)
        x0, x1 = max(pad_x, left), min(pad_x + w, left + cw)

        out = dict(sample)
        fill = torch.tensor(self.fill, dtype=img.dtype).view(3, 1, 1)
        crop = fill.expand(3, ch, cw).clone()
        crop[:, y0 - top : y1 - top, x0 - left : x1 - left] = img[
            :, y0 - pad_y : y1 - pad_y, x0 - pad_x : x1 - pad_x
        ]
        out["image"] = crop
        for key in _dense(sample):
            m = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
            m[y0 - top : y1 - top, x0 - left : x1 - left] = sample[key][
                y0 - pad_y : y1 - pad_y, x0 - pad_x : x1 - pad_x
            ]
            out[key] = m
        box = _box(sample).clone()
        box[:2] = (box[:2] + pad_y - top).clamp(0, ch)
        box[2:] = (box[2:] + pad_x - left).clamp(0, cw)
        out["crop_box"] = box
        return out

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, fill={self.fill}, ignore_index={self.ignore_index})"


class RandomResizedCrop:
    """timm/torchvision's RandomResizedCrop: a random area fraction and aspect ratio, resized.

    Used by AReAM's MCTformer variant (timm's ``create_transform``). The window always lies inside
    the image, so no padding is added; ``crop_box`` follows the previous box through the window.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def _window(self, h: int, w: int, rng: Rng) -> tuple[int, int, int, int]:
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(rng, *self.scale)
            aspect = math.exp(_uniform(rng, log_lo, log_hi))
            cw = round(math.sqrt(target * aspect))
            ch = round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return _randint(rng, 0, h - ch + 1), _randint(rng, 0, w - cw + 1), ch, cw
        # Fallback as torchvision: a centre crop at the nearest allowed aspect ratio.
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            ch, cw = h, w
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, sample: dict, rng: Rng) -> dict:
        _, h, w = sample["image"].shape
        top, left, ch, cw = self._window(h, w, rng)
        out = dict(sample)
        out["image"] = sample["image"][:, top : top + ch, left : left + cw]
        for key in _dense(sample):
            out[key] = sample[key][top : top + ch, left : left + cw]
        box = _box(sample).clone()
        box[:2] = (box[:2] - top).clamp(0, ch)
        box[2:] = (box[2:] - left).clamp(0, cw)
        out["crop_box"] = box
        return resize_sample(out, *self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror image, mask and crop box left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, sample: dict, rng: Rng) -> dict:
        if _uniform(rng, 0.0, 1.0) >= self.p:
            return sample
        out = dict(sample)
        out["image"] = sample["image"].flip(-1)
        for key in _dense(sample):
            out[key] = sample[key].flip(-1)
        w = sample["image"].shape[-1]
        y0, y1, x0, x1 = _box(sample).tolist()
        out["crop_box"] = torch.tensor([y0, y1, w - x1, w - x0], dtype=torch.int64)
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# --------------------------------------------------------------------------- colour


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Sector k of the hue circle takes (r, g, b) from these rows.
    r = torch.stack([v, q, p, p, t, v]).gather(0, i[None])[0]
    g = torch.stack([t, v, v, q, p, p]).gather(0, i[None])[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, i[None])[0]
    return torch.stack([r, g, b])


class ColorJitter:
    """torchvision-style colour jitter, applied with probability ``p`` (AReAM: 0.4, 0.4, 0.2, 0.1, p=0.8).

    Factors are drawn uniformly: brightness/contrast/saturation from ``[max(0, 1 - x), 1 + x]``,
    hue shift from ``[-hue, hue]`` (fraction of a turn, at most 0.5); the four adjustments run in a
    random order. Only the image changes. Apply it before :class:`RandomCrop` so the padding keeps
    its fill value.
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        p: float = 1.0,
    ):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter: hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = (
            float(brightness),
            float(contrast),
            float(saturation),
            float(hue),
        )
        self.p = float(p)

    def __call__(self, sample: dict, rng: Rng) -> dict:
        if _uniform(rng, 0.0, 1.0) >= self.p:
            return sample
        img = sample["image"]
        for k in _permutation(rng, 4):
            if k == 0 and self.brightness > 0:
                f = _uniform(rng, max(0.0, 1 - self.brightness), 1 + self.brightness)
                img = (img * f).clamp(0, 1)
            elif k == 1 and self.contrast > 0:
                f = _uniform(rng, max(0.0, 1 - self.contrast), 1 + self.contrast)
                img = (f * img + (1 - f) * _gray(img).mean()).clamp(0, 1)
            elif k == 2 and self.saturation > 0:
                f = _uniform(rng, max(0.0, 1 - self.saturation), 1 + self.saturation)
                img = (f * img + (1 - f) * _gray(img)).clamp(0, 1)
            elif k == 3 and self.hue > 0:
                shift = _uniform(rng, -self.hue, self.hue)
                hsv = _rgb_to_hsv(img)
                hsv[0] = (hsv[0] + shift) % 1.0
                img = _hsv_to_rgb(hsv).clamp(0, 1)
        out = dict(sample)
        out["image"] = img
        return out

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}, p={self.p})"
        )


# --------------------------------------------------------------------------- recipes


def train_transform(
    crop_size: int | Sequence[int],
    *,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: float = 0.5,
    jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    fill: Sequence[float] = IMAGENET_MEAN,
    resize_long: tuple[int, int] | None = None,
) -> Compose:
    """AReAM (Conformer) / AFA training augmentation: rescale, flip, colour jitter, crop.

    ``resize_long`` (GETAM: (230, 292); CRT/IRN: (210, 420)) resizes the long side to a random
    length in that range (:class:`RandomResizeLong`) in place of the relative rescale, whatever
    ``scale_range`` says. ``None`` turns a step off. Returns a :class:`Compose`.
    """
    steps: list = []
    if resize_long is not None:
        steps.append(RandomResizeLong(resize_long))
    elif scale_range is not None:
        steps.append(RandomRescale(scale_range))
    if flip > 0:
        steps.append(RandomHorizontalFlip(flip))
    if jitter is not None:
        steps.append(ColorJitter(*jitter, p=jitter_p))
    steps.append(RandomCrop(crop_size, fill=fill))
    return Compose(steps)


def timm_train_transform(
    crop_size: int | Sequence[int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: float = 0.5,
    color_jitter: float = 0.4,
) -> Compose:
    """timm ``create_transform(is_training=True)``'s geometric and colour part (AReAM/MCTformer).

    RandomResizedCrop (bicubic), horizontal flip, ColorJitter(brightness=contrast=saturation=
    ``color_jitter``, no hue), always applied; no RandAugment or random erasing.
    """
    return Compose(
        [
            RandomResizedCrop(crop_size, scale=scale),
            RandomHorizontalFlip(flip),
            ColorJitter(color_jitter, color_jitter, color_jitter, 0.0, p=1.0),
        ]
    )
