"""Overlays for looking at CAMs and masks: heat maps on the image, masks in the VOC palette, and
``image | CAM | pseudo mask | ground truth`` panels with a class legend, written as PNGs.

Images are numpy uint8 ``[H, W, 3]`` RGB; masks are integer ``[H, W]`` class ids (255 ignored);
CAMs are float ``[H, W]`` or ``[K, H, W]`` in ``[0, 1]``. No matplotlib: the colour map is below.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss_fast.data.io import atomic_write, voc_palette

#: Background of the panel sheet and gaps between panels.
SHEET_COLOR = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def _check_image(fn: str, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"{fn}: image must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}; "
            "undo the normalisation and convert with (x * 255).round().astype(np.uint8)"
        )
    return image


def _check_mask(fn: str, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{fn}: mask must be integer [H, W], got {mask.dtype} {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{fn}: mask values must lie in 0..255, got {mask.min()}..{mask.max()}")
    return mask


def jet(x: np.ndarray) -> np.ndarray:
    """A jet-like colour map: ``[...]`` floats in ``[0, 1]`` (clipped) -> ``[..., 3]`` uint8.

    Piecewise linear: 0 is dark blue (0, 0, 128), 0.5 is (128, 255, 128), 1 is dark red
    (128, 0, 0) — each channel is ``clip(1.5 - |4x - c|, 0, 1)`` with c = 3, 2, 1 for R, G, B.
    """
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float32)), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def _resize_map(cam: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float ``[h, w]`` map to ``size_hw``; CAMs often come at stride 4/16."""
    if cam.shape == size_hw:
        return cam
    H, W = size_hw
    return np.asarray(
        Image.fromarray(cam.astype(np.float32)).resize((W, H), Image.Resampling.BILINEAR)
    )


def cam_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a CAM's :func:`jet` heat map onto the image.

    Args:
        image: uint8 ``[H, W, 3]``.
        cam: float ``[h, w]`` in ``[0, 1]``, or ``[K, h, w]`` (shown as the max over classes);
            resized bilinearly to ``H, W`` when smaller. Values outside ``[0, 1]`` are clipped,
            so normalise first (:func:`~wsss_fast.eval.minmax_normalize`).
        alpha: weight of the heat map, in ``[0, 1]``.

    Returns:
        uint8 ``[H, W, 3]``: ``(1 - alpha) * image + alpha * jet(cam)``.
    """
    image = _check_image("cam_heatmap", image)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 3:
        # an image with no present class has no heat: an all-zero map
        cam = cam.max(axis=0) if cam.shape[0] else np.zeros(cam.shape[1:], np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam_heatmap: cam must be [h, w] or [K, h, w], got {cam.shape}")
    heat = jet(_resize_map(cam, image.shape[:2]))
    return _blend(image, heat, alpha)


def _blend(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = (1.0 - alpha) * a.astype(np.float32) + alpha * b.astype(np.float32)
    return np.round(out).astype(np.uint8)


def colorize_mask(mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Index mask ``[H, W]`` (0..255) -> uint8 ``[H, W, 3]`` in the VOC palette (255 is
    (224, 224, 192), the VOC boundary colour)."""
    mask = _check_mask("colorize_mask", mask)
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    return palette[mask.astype(np.int64)]


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, palette: np.ndarray | None = None
) -> np.ndarray:
    """Blend :func:`colorize_mask` of ``mask`` onto ``image`` (same ``H, W``)."""
    image = _check_image("mask_overlay", image)
    mask = _check_mask("mask_overlay", mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask_overlay: mask {mask.shape} and image {image.shape[:2]} differ")
    return _blend(image, colorize_mask(mask, palette), alpha)


def make_panel(
    image: np.ndarray,
    cam: np.ndarray | None = None,
    pseudo: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    *,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    gap: int = 4,
    titles: bool = True,
    return_boxes: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """Side-by-side panel ``image | CAM | pseudo mask | ground truth`` with a class legend below.

    The CAM panel is :func:`cam_heatmap` on the image; masks are drawn in the VOC palette (not
    blended, so their colours read exactly against the legend). Panels left as ``None`` are
    omitted. The legend lists every class id found in ``pseudo`` or ``gt`` (and "ignore" for 255)
    with its colour swatch, wrapped to the sheet's width.

    Args:
        image: uint8 ``[H, W, 3]``.
        cam: float ``[h, w]`` or ``[K, h, w]`` in ``[0, 1]`` (see :func:`cam_heatmap`).
        pseudo, gt: integer ``[H, W]`` masks, 255 ignored.
        class_names: names by class id for the legend (e.g. ``VOC_CLASSES``); ids beyond it, or
            all ids when ``None``, are shown as numbers.
        alpha: heat-map weight.
        gap: white pixels between and around panels.
        titles: write "image", "CAM", "pseudo", "ground truth" above the panels.
        return_boxes: also return ``{panel name: (x0, y0, x1, y1)}`` pixel boxes in the sheet.

    Returns:
        uint8 ``[H_sheet, W_sheet, 3]`` with ``W_sheet = n * W + (n + 1) * gap`` for n panels,
        and the boxes when ``return_boxes``.
    """
    image = _check_image("make_panel", image)
    H, W = image.shape[:2]
    panels: list[tuple[str, np.ndarray]] = [("image", image)]
    if cam is not None:
        panels.append(("CAM", cam_heatmap(image, cam, alpha)))
    present: set[int] = set()
    for name, mask in (("pseudo", pseudo), ("ground truth", gt)):
        if mask is None:
            continue
        mask = _check_mask("make_panel", mask)
        if mask.shape != (H, W):
            raise ValueError(f"make_panel: {name} mask {mask.shape} and image {(H, W)} differ")
        panels.append((name, colorize_mask(mask)))
        present.update(int(v) for v in np.unique(mask))

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    title_h = line_h if titles else 0
    sheet_w = len(panels) * W + (len(panels) + 1) * gap

    # legend entries laid out left to right, wrapping at the sheet width
    palette = voc_palette()
    swatch = max(line_h - 4, 6)
    entries, x, y = [], gap, 0
    for cls in sorted(present):
        if cls == 255:
            label = "ignore"
        elif class_names is not None and cls < len(class_names):
            label = class_names[cls]
        else:
            label = str(cls)
        width = swatch + 3 + int(probe.textlength(label, font=font)) + 8
        if x + width > sheet_w - gap and x > gap:
            x, y = gap, y + line_h
        entries.append((x, y, cls, label))
        x += width
    legend_h = (y + line_h + gap) if entries else 0

    top = gap + title_h
    sheet_h = top + H + gap + legend_h
    sheet = Image.new("RGB", (sheet_w, sheet_h), SHEET_COLOR)
    draw = ImageDraw.Draw(sheet)
    boxes = {}
    for i, (name, pixels) in enumerate(panels):
        x0 = gap + i * (W + gap)
        sheet.paste(Image.fromarray(pixels), (x0, top))
        boxes[name] = (x0, top, x0 + W, top + H)
        if titles:
            draw.text((x0, gap), _fit(draw, name, W, font), fill=TEXT_COLOR, font=font)
    legend_top = top + H + gap
    for ex, ey, cls, label in entries:
        y0 = legend_top + ey + (line_h - swatch) // 2
        draw.rectangle(
            (ex, y0, ex + swatch - 1, y0 + swatch - 1),
            fill=tuple(int(c) for c in palette[cls]),
            outline=TEXT_COLOR,
        )
        draw.text((ex + swatch + 3, legend_top + ey), label, fill=TEXT_COLOR, font=font)
    out = np.asarray(sheet).copy()
    return (out, boxes) if return_boxes else out


def _fit(draw: ImageDraw.ImageDraw, title: str, width: int, font) -> str:
    """A title that fits in ``width`` pixels: the short form for narrow panels, then truncated."""
    if draw.textlength(title, font=font) > width:
        title = _SHORT_TITLES.get(title, title)
    while len(title) > 1 and draw.textlength(title, font=font) > width:
        title = title[:-1]
    return title


_SHORT_TITLES = {"image": "img", "pseudo": "ps.", "ground truth": "GT"}


def save_panel(path: str | os.PathLike, *args, **kwargs) -> Path:
    """:func:`make_panel` written as an RGB PNG at ``path`` (parents created); returns the path."""
    kwargs.pop("return_boxes", None)
    sheet = make_panel(*args, **kwargs)
    return atomic_write(path, lambda f: Image.fromarray(sheet).save(f, format="PNG"))


def save_rgb_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 ``[H, W, 3]`` array (a heat map, an overlay) as an RGB PNG."""
    image = _check_image("save_rgb_png", image)
    return atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def preview_grid(
    image01: np.ndarray, cam: np.ndarray | None = None, pseudo: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``image | CAM heat map | pseudo mask`` for a few training images, one row each:
    uint8 ``[N * H, k * W, 3]`` (k = the panels given). What the engine writes to TensorBoard.

    Args:
        image01: float ``[N, 3, H, W]`` images in ``[0, 1]``.
        cam: float ``[N, H, W]`` (or ``[N, K, H, W]``, shown as the max over classes) in ``[0, 1]``.
        pseudo: integer ``[N, H, W]`` masks (0..C, 255 ignored), drawn in the VOC palette.
    """
    image01 = np.asarray(image01, dtype=np.float32)
    if image01.ndim != 4 or image01.shape[1] != 3:
        raise ValueError(f"preview_grid: image01 must be [N, 3, H, W], got {image01.shape}")
    rows = []
    for i in range(image01.shape[0]):
        img = np.round(np.clip(image01[i].transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
        row = [img]
        if cam is not None:
            row.append(cam_heatmap(img, np.asarray(cam[i], dtype=np.float32)))
        if pseudo is not None:
            row.append(colorize_mask(np.asarray(pseudo[i]).astype(np.int64)))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)
