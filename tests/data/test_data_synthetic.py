"""The built-in synthetic data set: determinism, object counts, balance, masks, idempotence."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from wsss_fast.data import (
    SYNTHETIC_CLASSES,
    DataError,
    SyntheticDataset,
    VOCDataset,
    load_label_file,
    make_synthetic,
)

SMALL = dict(num_train=40, num_val=10, size=64, num_classes=6, progress=False)


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A larger set for the statistics (about a second to generate)."""
    root = tmp_path_factory.mktemp("syn") / "big"
    return make_synthetic(
        root, num_train=200, num_val=40, size=64, num_classes=6, seed=5, progress=False
    )


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_synthetic(tmp_path / "a", seed=1, **SMALL)
    b = make_synthetic(tmp_path / "b", seed=1, **SMALL)
    c = make_synthetic(tmp_path / "c", seed=2, **SMALL)
    assert files(a) == files(b) == files(c)
    for f in files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    differ = [
        f
        for f in files(a)
        if f.startswith("JPEGImages") and (a / f).read_bytes() != (c / f).read_bytes()
    ]
    assert len(differ) == 50


def test_layout_and_lists(tmp_path):
    root = make_synthetic(tmp_path / "s", seed=0, **SMALL)
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 40 and len(val) == 10 and not set(train) & set(val)
    im = Image.open(root / "JPEGImages" / f"{train[0]}.jpg")
    assert im.size == (64, 64) and im.mode == "RGB"
    m = Image.open(root / "SegmentationClass" / f"{train[0]}.png")
    assert m.mode == "P" and m.size == (64, 64)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["class_names"] == ["background", *(s for s, _ in SYNTHETIC_CLASSES[:6])]


def test_objects_per_image_and_masks(big):
    labels = load_label_file(big / "cls_labels.npy")
    counts = []
    for name, label in labels.items():
        mask = np.asarray(Image.open(big / "SegmentationClass" / f"{name}.png"))
        values = set(np.unique(mask).tolist())
        assert values <= set(range(7)) | {255}, name
        assert 0 in values and 255 in values, name  # background and the outline band
        present = {v for v in values if 1 <= v <= 6}
        assert present == {int(i) + 1 for i in np.flatnonzero(label)}, name
        for c in present:  # every labelled object is clearly visible
            assert (mask == c).sum() >= 40, (name, c)
        assert 1 <= len(present) <= 3, name
        counts.append(len(present))
    # The object count is uniform over 1..3; repeats of a class merge, so 3 distinct is rarer.
    hist = np.bincount(counts, minlength=4)[1:]
    assert hist.min() > 0.1 * len(counts), hist


def test_class_balance(big):
    labels = np.stack(list(load_label_file(big / "cls_labels.npy").values()))
    per_class = labels.sum(0)
    assert per_class.min() / per_class.max() > 0.6, per_class


def test_colour_does_not_give_the_class_away(big):
    """A nearest-mean-colour classifier on object pixels must be near chance (1/6)."""
    feats, classes = [], []
    for name in (big / "ImageSets/Segmentation/train.txt").read_text().split():
        img = np.asarray(Image.open(big / "JPEGImages" / f"{name}.jpg"), dtype=np.float64)
        mask = np.asarray(Image.open(big / "SegmentationClass" / f"{name}.png"))
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            px = img[mask == c]
            feats.append(np.concatenate([px.mean(0), px.std(0)]))
            classes.append(c)
    feats, classes = np.array(feats), np.array(classes)
    half = len(feats) // 2
    centroids = np.stack([feats[:half][classes[:half] == c].mean(0) for c in range(1, 7)])
    pred = np.argmin(((feats[half:, None] - centroids[None]) ** 2).sum(-1), 1) + 1
    accuracy = (pred == classes[half:]).mean()
    assert accuracy < 0.4, accuracy


def test_idempotent_marker(tmp_path):
    root = make_synthetic(tmp_path / "s", seed=0, **SMALL)
    img = root / "JPEGImages" / "train_00000.jpg"
    stamp = img.stat().st_mtime_ns
    os.utime(img, ns=(1, 1))
    make_synthetic(root, seed=0, **SMALL)  # same parameters: untouched
    assert img.stat().st_mtime_ns == 1
    make_synthetic(root, seed=0, **{**SMALL, "num_train": 12})  # different: regenerated
    assert img.stat().st_mtime_ns != 1 and img.stat().st_mtime_ns >= stamp
    assert len((root / "ImageSets/Segmentation/train.txt").read_text().split()) == 12
    assert not (root / "JPEGImages" / "train_00020.jpg").exists()
    assert json.loads((root / "dataset.json").read_text())["generator"]["num_train"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left behind


def test_refuses_foreign_folders(tmp_path):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "JPEGImages").mkdir()
    with pytest.raises(DataError, match="refusing to overwrite"):
        make_synthetic(tmp_path / "voc", **SMALL)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(tmp_path / "x", **{**SMALL, "num_classes": 9})
    with pytest.raises(DataError, match="make_synthetic"):
        SyntheticDataset(tmp_path / "voc", "train")


def test_loads_through_the_voc_loader(tmp_path):
    root = make_synthetic(tmp_path / "s", seed=0, **{**SMALL, "num_classes": 5})
    ds = SyntheticDataset(root, "val", with_mask=True)
    assert ds.num_classes == 5 and ds.class_names[1] == "disc" and len(ds) == 10
    s = ds[3]
    assert (
        s["image"].shape == (3, 64, 64) and s["label"].shape == (5,) and s["mask"].shape == (64, 64)
    )
    present = {v for v in s["mask"].unique().tolist() if v not in (0, 255)}
    assert present == {int(i) + 1 for i in s["label"].nonzero().flatten()}
    assert (
        isinstance(VOCDataset(root, "train"), VOCDataset)
        and VOCDataset(root, "train").num_classes == 5
    )


def test_object_size_and_clutter_parameters(tmp_path):
    def mean_object_fraction(root):
        fg = [
            np.isin(np.array(Image.open(p)), np.arange(1, 7)).mean()
            for p in sorted((root / "SegmentationClass").glob("train_*.png"))
        ]
        return float(np.mean(fg))

    small = make_synthetic(tmp_path / "a", seed=3, object_size=(0.13, 0.24), **SMALL)
    large = make_synthetic(tmp_path / "b", seed=3, object_size=(0.3, 0.4), clutter=(0, 0), **SMALL)
    # Radius 0.3-0.4 against 0.13-0.24 of the side: objects cover clearly more of the image.
    assert mean_object_fraction(large) > 1.5 * mean_object_fraction(small)
    gen = json.loads((large / "dataset.json").read_text())["generator"]
    assert gen["object_size"] == [0.3, 0.4] and gen["clutter"] == [0, 0]
    with pytest.raises(ValueError, match="object_size"):
        make_synthetic(tmp_path / "c", object_size=(0.3, 0.2), **SMALL)
    with pytest.raises(ValueError, match="clutter"):
        make_synthetic(tmp_path / "c", clutter=(-1, 2), **SMALL)
