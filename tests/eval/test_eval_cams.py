"""CAM normalisation, CAM -> label, CAM and mask files, fixed-threshold evaluation and the
report-only threshold sweep, against values worked out by hand."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_fast.eval import (
    cam_to_label,
    evaluate_cams,
    load_cam,
    load_mask_png,
    max_normalize,
    minmax_normalize,
    save_cam,
    save_mask_png,
    threshold_sweep_report,
)

# ---------------------------------------------------------------------- normalisation


def test_max_normalize_known_values():
    cam = np.array(
        [
            [[0.0, 1.0], [2.0, 4.0]],  # max 4 -> x / (4 + 1e-5)
            [[0.0, 0.0], [0.0, 0.0]],  # all zero stays zero (eps keeps it finite)
        ],
        dtype=np.float32,
    )
    d = 4 + 1e-5
    expected = np.array([[[0, 1 / d], [2 / d, 4 / d]], [[0, 0], [0, 0]]])
    np.testing.assert_allclose(max_normalize(cam), expected, rtol=1e-6)
    out_t = max_normalize(torch.from_numpy(cam)[None])  # [B, K, H, W] is per map too
    assert out_t.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(out_t[0].numpy(), expected, rtol=1e-6)


def test_minmax_normalize_known_values():
    cam = np.array(
        [
            [[-1.0, 1.0], [3.0, 5.0]],  # relu -> [0, 1, 3, 5]; min 0, max 5
            [[2.0, 2.0], [3.0, 4.0]],  # min 2, max 4 -> (x - 2) / (2 + 1e-6)
            [[3.0, 3.0], [3.0, 3.0]],  # constant -> 0
            [[-2.0, -1.0], [0.0, 2.0]],  # relu first: min is 0, not -2 -> [0, 0, 0, 1]
        ],
        dtype=np.float32,
    )
    d5, d2 = 5 + 1e-6, 2 + 1e-6
    expected = np.array(
        [
            [[0, 1 / d5], [3 / d5, 5 / d5]],
            [[0, 0], [1 / d2, 2 / d2]],
            [[0, 0], [0, 0]],
            [[0, 0], [0, 2 / d2]],
        ]
    )
    np.testing.assert_allclose(minmax_normalize(cam), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        minmax_normalize(torch.from_numpy(cam)).numpy(), expected, rtol=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------------- cam_to_label

# Two present classes given in descending id order on purpose (15 = person, 8 = cat), threshold
# 0.4. Per pixel: the best class score vs the background 0.4.
#   (0,0) 0.9 vs 0.1  -> 15          (1,0) 0.3 vs 0.35 -> best 0.35 < 0.4 -> background
#   (0,1) 0.2 vs 0.3  -> 0.3 < 0.4   (1,1) 0.5 vs 0.7  -> 8
#         -> background              (1,2) 0.4 vs 0.1  -> 0.4 == threshold: background wins the tie
#   (0,2) 0.6 vs 0.6  -> a tie between classes: the smaller class id, 8
CAM_15 = [[0.9, 0.2, 0.6], [0.3, 0.5, 0.4]]
CAM_8 = [[0.1, 0.3, 0.6], [0.35, 0.7, 0.1]]
EXPECTED_LABEL = [[15, 0, 8], [0, 8, 0]]


def test_cam_to_label_hand_made():
    cam = np.array([CAM_15, CAM_8], dtype=np.float32)
    np.testing.assert_array_equal(cam_to_label(cam, [15, 8], 0.4), EXPECTED_LABEL)
    # the same maps in the other key order give the same labels (the tie rule is by class id)
    np.testing.assert_array_equal(cam_to_label(cam[::-1], [8, 15], 0.4), EXPECTED_LABEL)
    out = cam_to_label(torch.from_numpy(cam), torch.tensor([15, 8]), 0.4)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), EXPECTED_LABEL)


def test_cam_to_label_no_present_class_and_bad_keys():
    np.testing.assert_array_equal(cam_to_label(np.zeros((0, 2, 3)), [], 0.5), np.zeros((2, 3)))
    assert cam_to_label(torch.zeros(0, 2, 3), [], 0.5).shape == (2, 3)
    cam = np.ones((2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="add 1"):
        cam_to_label(cam, [0, 1], 0.5)
    with pytest.raises(ValueError, match="2 CAM channels"):
        cam_to_label(cam, [1], 0.5)
    with pytest.raises(ValueError, match="unique"):
        cam_to_label(cam, [3, 3], 0.5)


# ---------------------------------------------------------------------- files


def test_cam_npy_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cam = rng.random((2, 5, 7)).astype(np.float32)
    path = save_cam(tmp_path / "cams" / "2007_000032.npy", cam, [1, 15])
    record = load_cam(path)
    assert set(record) == {"keys", "cam"}
    assert record["keys"].dtype == np.int64
    np.testing.assert_array_equal(record["keys"], [1, 15])
    np.testing.assert_array_equal(record["cam"], cam)
    # the on-disk layout is the plain dict the published tools read
    raw = np.load(path, allow_pickle=True).item()
    assert set(raw) == {"keys", "cam"}
    # tensors and float16 storage
    save_cam(tmp_path / "half.npy", torch.from_numpy(cam), torch.tensor([1, 15]), dtype=np.float16)
    half = load_cam(tmp_path / "half.npy")
    assert half["cam"].dtype == np.float16
    np.testing.assert_allclose(half["cam"], cam, atol=1e-3)
    assert not list(tmp_path.glob("**/.*tmp*"))  # no temporary left behind
    np.save(tmp_path / "other.npy", np.zeros(3))
    with pytest.raises(ValueError, match="keys"):
        load_cam(tmp_path / "other.npy")


def test_palette_png_round_trip_keeps_255(tmp_path):
    mask = np.array([[0, 1, 15], [255, 20, 0]], dtype=np.int64)
    path = save_mask_png(tmp_path / "masks" / "a.png", mask)
    np.testing.assert_array_equal(load_mask_png(path), mask)
    with Image.open(path) as image:
        assert image.mode == "P"
        rgb = np.array(image.convert("RGB"))
    # VOC devkit colours: 1 aeroplane (128,0,0), 15 person (192,128,128), 255 (224,224,192)
    assert tuple(rgb[0, 1]) == (128, 0, 0)
    assert tuple(rgb[0, 2]) == (192, 128, 128)
    assert tuple(rgb[1, 0]) == (224, 224, 192)
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    with pytest.raises(ValueError, match="0..255"):
        save_mask_png(tmp_path / "bad.png", np.array([[300]]))
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="index PNG"):
        load_mask_png(tmp_path / "colour.png")


# ---------------------------------------------------------------------- evaluation


def test_evaluation_takes_a_fixed_threshold():
    # no default: the threshold must come from the config, never from the evaluated split
    param = inspect.signature(evaluate_cams).parameters["bg_threshold"]
    assert param.default is inspect.Parameter.empty
    assert "must not be used" in threshold_sweep_report.__doc__
    cam = np.array([CAM_15, CAM_8], dtype=np.float32)
    gt = np.array([[15, 0, 8], [0, 8, 255]])
    cm = evaluate_cams([(cam, [15, 8], gt)], num_classes=21, bg_threshold=0.4)
    # labels [[15,0,8],[0,8,0]] against gt with (1,2) ignored: every counted pixel right
    assert cm.pixel_accuracy() == 1.0
    assert cm.miou() == 1.0  # only classes 0, 8, 15 occur; the other 18 are out of the mean


# One image 1 x 4, class 1 present, cam [0.1, 0.3, 0.5, 0.7], gt [0, 0, 1, 1].
#   t = 0.2: pred [0,1,1,1]: IoU0 = 1/(2+1-1) = 1/2, IoU1 = 2/(2+3-2) = 2/3 -> mIoU 7/12
#   t = 0.4: pred [0,0,1,1]: perfect -> 1
#   t = 0.5: cam 0.5 == t is background: pred [0,0,0,1]: IoU0 = 2/3, IoU1 = 1/2 -> 7/12
#   t = 0.6: pred [0,0,0,1] -> 7/12
SWEEP_ITEM = (np.array([[[0.1, 0.3, 0.5, 0.7]]], np.float32), [1], np.array([[0, 0, 1, 1]]))


def test_sweep_report_finds_the_best_threshold():
    report = threshold_sweep_report([SWEEP_ITEM], num_classes=2, thresholds=[0.6, 0.2, 0.5, 0.4])
    assert report["thresholds"] == [0.2, 0.4, 0.5, 0.6]
    np.testing.assert_allclose(report["miou"], [7 / 12, 1, 7 / 12, 7 / 12])
    assert report["best_threshold"] == 0.4
    assert report["best_miou"] == pytest.approx(1.0)
    assert "oracle" in report["warning"]
    # equal mIoU: the smallest threshold is reported
    tie = threshold_sweep_report([SWEEP_ITEM], num_classes=2, thresholds=[0.45, 0.35])
    assert tie["best_threshold"] == 0.35


def test_sweep_matrices_equal_fixed_threshold_evaluation():
    # the sweep's one-pass histogram must give, at every threshold, the matrix of evaluate_cams
    rng = np.random.default_rng(1)
    items = []
    for i in range(5):
        k = i % 3  # includes images with no present class
        keys = rng.choice(np.arange(1, 6), size=k, replace=False)
        cam = np.round(rng.random((k, 6, 7)), 1).astype(np.float32)  # many exact ties
        gt = rng.integers(0, 6, (6, 7))
        gt[0, :3] = 255
        items.append((cam, keys, gt))
    thresholds = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    report = threshold_sweep_report(items, num_classes=6, thresholds=thresholds)
    for t, cm in zip(report["thresholds"], report["confusion_matrices"]):
        fixed = evaluate_cams(items, num_classes=6, bg_threshold=t)
        np.testing.assert_array_equal(cm.matrix, fixed.matrix, err_msg=f"threshold {t}")


@pytest.mark.gpu
def test_cam_to_label_on_cuda():
    cam = torch.tensor([CAM_15, CAM_8], device="cuda")
    out = cam_to_label(cam, [15, 8], 0.4)
    assert out.device.type == "cuda"
    np.testing.assert_array_equal(out.cpu().numpy(), EXPECTED_LABEL)
