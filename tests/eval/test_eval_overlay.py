"""Overlays: the colour map's known values, sizes, and the colours of known mask values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsss_fast.eval import (
    VOC_CLASSES,
    cam_heatmap,
    colorize_mask,
    jet,
    make_panel,
    mask_overlay,
    preview_grid,
    save_panel,
    voc_palette,
)

# VOC devkit colours, by class id
BLACK, AEROPLANE, PERSON, IGNORE = (0, 0, 0), (128, 0, 0), (192, 128, 128), (224, 224, 192)


def _image(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_voc_palette_known_entries():
    p = voc_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    assert tuple(p[0]) == BLACK and tuple(p[1]) == AEROPLANE
    assert tuple(p[2]) == (0, 128, 0) and tuple(p[15]) == PERSON
    assert tuple(p[255]) == IGNORE
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"


def test_jet_known_values():
    # channel = clip(1.5 - |4x - c|, 0, 1) for c = 3, 2, 1, times 255:
    #   x = 0    -> (0, 0, 0.5)      x = 0.25 -> (0, 0.5, 1)
    #   x = 0.5  -> (0.5, 1, 0.5)    x = 1    -> (0.5, 0, 0); outside [0, 1] is clipped
    out = jet(np.array([0.0, 0.25, 0.5, 1.0, -3.0, 7.0]))
    assert out.shape == (6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out,
        [[0, 0, 128], [0, 128, 255], [128, 255, 128], [128, 0, 0], [0, 0, 128], [128, 0, 0]],
    )


def test_cam_heatmap_blends_and_resizes():
    image = _image()
    cam = np.zeros((2, 3, 4), np.float32)  # [K, h, w] at a smaller size, shown as max over K
    cam[1] = 1.0
    out = cam_heatmap(image, cam, alpha=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out == np.array([128, 0, 0], np.uint8)).all()  # jet(1) everywhere
    np.testing.assert_array_equal(cam_heatmap(image, cam, alpha=0.0), image)
    half = cam_heatmap(np.zeros_like(image), np.zeros(image.shape[:2]), alpha=0.5)
    assert (half == np.array([0, 0, 64], np.uint8)).all()  # 0.5 * (0, 0, 128)
    with pytest.raises(ValueError, match="uint8"):
        cam_heatmap(image.astype(np.float32), cam)


def test_colorize_and_overlay_masks():
    mask = np.array([[0, 1], [15, 255]])
    rgb = colorize_mask(mask)
    assert rgb.shape == (2, 2, 3)
    assert [tuple(rgb[i, j]) for i in range(2) for j in range(2)] == [
        BLACK,
        AEROPLANE,
        PERSON,
        IGNORE,
    ]
    white = np.full((2, 2, 3), 255, np.uint8)
    blended = mask_overlay(white, mask, alpha=0.5)
    assert tuple(blended[0, 1]) == (192, 128, 128)  # round(0.5 * 255 + 0.5 * (128, 0, 0))


def test_panel_layout_and_colours(tmp_path):
    H, W, gap = 12, 16, 4
    image = _image(H, W)
    pseudo = np.zeros((H, W), np.int64)
    pseudo[2:6, 3:9] = 15
    pseudo[0, 0] = 255
    gt = np.zeros((H, W), np.int64)
    gt[2:7, 3:10] = 1
    cam = np.random.default_rng(1).random((1, 6, 8)).astype(np.float32)
    sheet, boxes = make_panel(
        image, cam, pseudo, gt, class_names=VOC_CLASSES, gap=gap, return_boxes=True
    )
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 4 * W + 5 * gap
    assert list(boxes) == ["image", "CAM", "pseudo", "ground truth"]

    def crop(name):
        x0, y0, x1, y1 = boxes[name]
        assert (x1 - x0, y1 - y0) == (W, H)
        return sheet[y0:y1, x0:x1]

    np.testing.assert_array_equal(crop("image"), image)
    np.testing.assert_array_equal(crop("CAM"), cam_heatmap(image, cam))
    assert tuple(crop("pseudo")[3, 4]) == PERSON
    assert tuple(crop("pseudo")[0, 0]) == IGNORE
    assert tuple(crop("pseudo")[11, 15]) == BLACK
    assert tuple(crop("ground truth")[3, 4]) == AEROPLANE
    # the legend below the panels carries a swatch for each class in pseudo or gt
    legend = sheet[boxes["image"][3] :]
    for colour in (PERSON, AEROPLANE, IGNORE):
        assert (legend == np.array(colour, np.uint8)).all(axis=-1).any(), colour

    path = save_panel(
        tmp_path / "overlays" / "x.png", image, cam, pseudo, gt, class_names=VOC_CLASSES, gap=gap
    )
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (sheet.shape[1], sheet.shape[0])

    only_image = make_panel(image, titles=False, gap=0)
    np.testing.assert_array_equal(only_image, image)  # no panels, no legend, no titles


def test_preview_grid_rows_and_panels():
    image = np.zeros((2, 3, 4, 5), np.float32)
    image[1] = 1.0
    cam = np.zeros((2, 4, 5), np.float32)
    pseudo = np.zeros((2, 4, 5), np.int64)
    pseudo[0, :, 3:] = 1
    grid = preview_grid(image, cam, pseudo)
    assert grid.shape == (8, 15, 3) and grid.dtype == np.uint8
    assert (grid[4:, :5] == 255).all()  # row 2's image is white
    # pseudo panel of row 1: background black, class 1 in VOC's dark red (128, 0, 0)
    assert (grid[0, 10] == 0).all() and tuple(grid[0, 13]) == (128, 0, 0)
    # CAM 0 blended half-and-half with a black image: jet(0) = (0, 0, 128) -> (0, 0, 64)
    assert tuple(grid[0, 5]) == (0, 0, 64)
    assert preview_grid(image).shape == (8, 5, 3)  # the image column alone
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        preview_grid(image[0])
