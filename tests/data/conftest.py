"""Fixtures: small VOC- and COCO-layout roots in tmp_path (helpers in fake_data.py)."""

import pytest
from fake_data import blocks_mask, multi_hot, save_gray_png, save_jpeg, save_palette_png, write_xml


@pytest.fixture
def voc_root(tmp_path):
    """A VOC 2012 + SBD root with five images.

    - 2007_000032: train; aeroplane (1) + person (15); mask in SegmentationClass and Aug.
    - 2007_000039: val; tvmonitor (20); masks in both.
    - 2008_000002: train_aug only; bicycle (2); SegmentationClassAug only, and its
      SegmentationClass copy says cat (8) — Aug must win.
    - 2008_000003: train_aug; no mask; XML: dog, person, dog -> dog (12) + person (15).
    - 2009_000001: test; image only.
    """
    root = tmp_path / "VOC2012"
    specs = {
        "2007_000032": (40, 50, [1, 15]),
        "2007_000039": (37, 45, [20]),
        "2008_000002": (33, 41, [2]),
    }
    images = {}
    for i, (name, (h, w, classes)) in enumerate(specs.items()):
        images[name] = save_jpeg(root / "JPEGImages" / f"{name}.jpg", h, w, seed=i)
        save_gray_png(root / "SegmentationClassAug" / f"{name}.png", blocks_mask(h, w, classes))
        if name != "2008_000002":
            save_palette_png(root / "SegmentationClass" / f"{name}.png", blocks_mask(h, w, classes))
    save_palette_png(root / "SegmentationClass" / "2008_000002.png", blocks_mask(33, 41, [8]))
    images["2008_000003"] = save_jpeg(root / "JPEGImages" / "2008_000003.jpg", 30, 36, seed=7)
    write_xml(
        root / "Annotations" / "2008_000003.xml", "2008_000003", 30, 36, ["dog", "person", "dog"]
    )
    images["2009_000001"] = save_jpeg(root / "JPEGImages" / "2009_000001.jpg", 28, 28, seed=8)

    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n")
    (lists / "val.txt").write_text("2007_000039\n")
    (lists / "train_aug.txt").write_text("2007_000032\n2008_000002\n2008_000003\n")
    (lists / "test.txt").write_text("2009_000001\n")
    expected = {
        "2007_000032": multi_hot([1, 15], 20),
        "2007_000039": multi_hot([20], 20),
        "2008_000002": multi_hot([2], 20),
        "2008_000003": multi_hot([12, 15], 20),
    }
    return root, images, expected


@pytest.fixture
def coco_root(tmp_path):
    """A VOC-style COCO 2014 root: two train images, one val image, index masks 0..80."""
    root = tmp_path / "COCO"
    specs = {
        "COCO_train2014_000000000009": ("train2014", 36, 48, [1, 80]),
        "COCO_train2014_000000000025": ("train2014", 30, 30, [12]),
        "COCO_val2014_000000000042": ("val2014", 32, 40, [44]),
    }
    for i, (name, (sub, h, w, classes)) in enumerate(specs.items()):
        save_jpeg(root / "JPEGImages" / sub / f"{name}.jpg", h, w, seed=10 + i)
        save_gray_png(root / "SegmentationClass" / sub / f"{name}.png", blocks_mask(h, w, classes))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("COCO_train2014_000000000009\nCOCO_train2014_000000000025\n")
    (lists / "val.txt").write_text("COCO_val2014_000000000042\n")
    expected = {name: multi_hot(classes, 80) for name, (_, _, _, classes) in specs.items()}
    return root, expected
