"""COCO 2014: the pinned category table and the VOC-style COCO layout."""

import shutil

import numpy as np
import pytest
import torch
from fake_data import blocks_mask, save_gray_png

from wsss_fast.data import (
    COCO_CATEGORIES,
    COCO_CLASSES,
    COCO_ID_TO_INDEX,
    COCO_INDEX_TO_ID,
    COCODataset,
    DatasetLayoutError,
    SampleError,
    build_dataset,
    category_mask_to_index,
    save_label_file,
)

# The ten ids COCO 2014 never assigned (cocodataset.org, instances_*2014.json).
UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_category_table():
    ids = [cid for cid, _ in COCO_CATEGORIES]
    names = [n for _, n in COCO_CATEGORIES]
    assert len(ids) == 80 and len(set(names)) == 80
    assert set(ids) == set(range(1, 91)) - UNUSED_IDS
    assert ids == sorted(ids)
    indices = [COCO_ID_TO_INDEX[c] for c in ids]
    assert indices == list(range(1, 81))  # monotone, dense
    assert COCO_ID_TO_INDEX[1] == 1 and COCO_ID_TO_INDEX[90] == 80
    assert COCO_ID_TO_INDEX[13] == 12  # stop sign: first id after the gap at 12
    assert COCO_INDEX_TO_ID[80] == 90
    assert COCO_CLASSES[0] == "background" and len(COCO_CLASSES) == 81
    assert COCO_CLASSES.index("person") == 1 and COCO_CLASSES.index("toothbrush") == 80
    assert (
        COCO_CLASSES.index("stop sign") == 12
        and COCO_CLASSES[COCO_ID_TO_INDEX[67]] == "dining table"
    )


def test_category_mask_to_index():
    raw = np.array([[0, 1, 13], [90, 255, 67]], dtype=np.uint8)
    np.testing.assert_array_equal(category_mask_to_index(raw), [[0, 1, 12], [80, 255, 61]])
    with pytest.raises(ValueError, match=r"\[12, 91\].*mask_values='index'"):
        category_mask_to_index(np.array([[12, 91]], dtype=np.uint8))


def test_load_train_with_labels_from_masks(coco_root):
    root, expected = coco_root
    ds = COCODataset(root, "train", with_mask=True)
    assert ds.num_classes == 80 and len(ds) == 2
    for i, name in enumerate(ds.names):
        s = ds[i]
        assert s["label"].shape == (80,)
        torch.testing.assert_close(s["label"], torch.from_numpy(expected[name]))
        assert s["mask"].shape == tuple(s["orig_size"].tolist())
    assert (root / "cls_labels_cache.npy").is_file()
    s = ds[0]
    assert set(s["mask"].unique().tolist()) == {0, 1, 80, 255}


def test_val_subset_from_name(coco_root):
    root, expected = coco_root
    ds = build_dataset("coco", root, "val", with_mask=True)
    assert ds.image_path(ds.names[0]).parent.name == "val2014"
    torch.testing.assert_close(
        ds[0]["label"], torch.from_numpy(expected["COCO_val2014_000000000042"])
    )


def test_published_labels_keyed_by_file_name(coco_root):
    root, _ = coco_root
    # AReAM's COCO cls_labels.npy uses "<name>.jpg" keys.
    labels = {
        "COCO_train2014_000000000009.jpg": np.eye(80, dtype=np.float32)[5],
        "COCO_train2014_000000000025.jpg": np.eye(80, dtype=np.float32)[6],
    }
    save_label_file(root / "cls_labels.npy", labels)
    ds = COCODataset(root, "train")
    assert ds[0]["label"].nonzero().flatten().tolist() == [5]
    assert ds[1]["label"].nonzero().flatten().tolist() == [6]


def test_category_id_masks(coco_root):
    root, _ = coco_root
    name = "COCO_val2014_000000000042"
    save_gray_png(
        root / "SegmentationClass" / "val2014" / f"{name}.png", blocks_mask(32, 40, [90, 13])
    )
    ds = COCODataset(root, "val", with_mask=True, mask_values="category")
    assert set(ds[0]["mask"].unique().tolist()) == {0, 12, 80, 255}
    assert ds[0]["label"].nonzero().flatten().tolist() == [11, 79]
    save_gray_png(root / "SegmentationClass" / "val2014" / f"{name}.png", blocks_mask(32, 40, [26]))
    (root / "cls_labels_cache.npy").unlink()
    with pytest.raises(SampleError, match=f"{name}.*not COCO 2014 categories"):
        COCODataset(root, "val", mask_values="category")


def test_layout_check(coco_root):
    root, _ = coco_root
    shutil.rmtree(root / "JPEGImages" / "val2014")
    with pytest.raises(
        DatasetLayoutError,
        match=r"missing folder .*JPEGImages/val2014 \(the images of split 'val'\)",
    ):
        COCODataset(root, "val")
    (root / "ImageSets" / "Segmentation" / "train.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing file .*train.txt"):
        COCODataset(root, "train")
    with pytest.raises(ValueError, match="mask_values"):
        COCODataset(root, "train", mask_values="ids")
