"""VOC-layout loading: samples, labels from masks / XML / label files, the cache, layout errors,
corrupt files, and determinism of augmented samples."""

import logging
import shutil

import numpy as np
import pytest
import torch
from fake_data import save_palette_png

from wsss_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    DataError,
    DatasetLayoutError,
    SampleError,
    VOCDataset,
    build_dataset,
    collate,
    save_label_file,
    train_transform,
)
from wsss_fast.data import labels as labels_mod


def test_voc_class_order():
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[20] == "tvmonitor"


def test_val_sample_fields(voc_root):
    root, images, expected = voc_root
    ds = VOCDataset(root, "val", with_mask=True)
    assert len(ds) == 1 and ds.num_classes == 20
    s = ds[0]
    h, w = images["2007_000039"].shape[:2]
    assert s["name"] == "2007_000039"
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (h, w) and s["mask"].dtype == torch.int64
    assert s["label"].dtype == torch.float32
    torch.testing.assert_close(s["label"], torch.from_numpy(expected["2007_000039"]))
    assert s["crop_box"].tolist() == [0, h, 0, w]
    assert s["orig_size"].tolist() == [h, w]
    assert set(s["mask"].unique().tolist()) == {0, 20, 255}
    # ImageNet normalisation, checked against the JPEG decoded by PIL here and the stats by hand.
    from PIL import Image

    raw = np.array(Image.open(root / "JPEGImages" / "2007_000039.jpg").convert("RGB"))
    want = (
        torch.from_numpy(raw).permute(2, 0, 1).float() / 255
        - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(s["image"], want)


def test_with_mask_auto(voc_root):
    root, _, _ = voc_root
    assert VOCDataset(root, "train").with_mask  # every name has a mask
    ds = VOCDataset(root, "train_aug")  # 2008_000003 has none
    assert not ds.with_mask and "mask" not in ds[0]


def test_labels_from_masks_and_xml_are_cached(voc_root):
    root, _, expected = voc_root
    ds = VOCDataset(root, "train_aug")
    for name in ds.names:
        np.testing.assert_array_equal(ds.labels[name], expected[name], err_msg=name)
    cache = root / "cls_labels_cache.npy"
    assert cache.is_file()
    # The cache alone must be enough: remove every annotation source and load again.
    shutil.rmtree(root / "SegmentationClassAug")
    shutil.rmtree(root / "SegmentationClass")
    shutil.rmtree(root / "Annotations")
    again = VOCDataset(root, "train_aug", with_mask=False)
    for name in again.names:
        np.testing.assert_array_equal(again.labels[name], expected[name], err_msg=name)


def test_aug_masks_preferred(voc_root):
    root, _, expected = voc_root
    ds = VOCDataset(root, "train_aug", with_mask=False)
    # SegmentationClass/2008_000002.png says cat; SegmentationClassAug says bicycle.
    np.testing.assert_array_equal(ds.labels["2008_000002"], expected["2008_000002"])


def test_published_label_file_wins(voc_root):
    root, _, _ = voc_root
    published = {"2007_000032": np.eye(20, dtype=np.float32)[4]}  # says bottle
    save_label_file(root / "cls_labels.npy", published)
    ds = VOCDataset(root, "train")
    assert ds[0]["label"].nonzero().flatten().tolist() == [4]
    assert not (root / "cls_labels_cache.npy").exists()  # nothing had to be built


def test_explicit_label_file_and_wrong_length(voc_root, tmp_path):
    root, _, _ = voc_root
    f = tmp_path / "labels.npy"
    save_label_file(f, {"2007_000032": np.ones(80, dtype=np.float32)})
    with pytest.raises(DataError, match="80 entries.*20 foreground classes"):
        VOCDataset(root, "train", label_file=f)
    with pytest.raises(DataError, match="does not exist"):
        VOCDataset(root, "train", label_file=tmp_path / "nope.npy")


def test_read_only_root_caches_elsewhere(voc_root, tmp_path, monkeypatch):
    root, _, expected = voc_root
    real_save = labels_mod.save_label_file

    def refuse_root(path, labels):  # stands in for a read-only data root (tests may run as root)
        if path.parent == root:
            raise PermissionError(13, "Read-only file system", str(path))
        real_save(path, labels)

    monkeypatch.setattr(labels_mod, "save_label_file", refuse_root)
    cache_dir = tmp_path / "cache"
    VOCDataset(root, "train_aug", cache_dir=cache_dir)
    assert not (root / "cls_labels_cache.npy").exists()
    (cached,) = cache_dir.glob("*cls_labels_cache.npy")
    loaded = labels_mod.load_label_file(cached)
    assert sorted(loaded) == sorted(["2007_000032", "2008_000002", "2008_000003"])
    np.testing.assert_array_equal(loaded["2008_000003"], expected["2008_000003"])


def test_test_split_without_labels(voc_root):
    root, _, _ = voc_root
    with pytest.raises(DataError, match="2009_000001.*with_label=False"):
        VOCDataset(root, "test")
    s = VOCDataset(root, "test", with_label=False)[0]
    assert "label" not in s and "mask" not in s and s["name"] == "2009_000001"


@pytest.mark.parametrize(
    "remove, kwargs, missing",
    [
        ("JPEGImages", {}, "JPEGImages"),
        ("ImageSets/Segmentation/val.txt", {}, "val.txt"),
        (
            "SegmentationClass+SegmentationClassAug",
            {"with_mask": True, "with_label": False},
            "SegmentationClass",
        ),
        ("SegmentationClass+SegmentationClassAug+Annotations", {}, "cls_labels.npy"),
    ],
    ids=["images", "list", "masks", "labels"],
)
def test_layout_check_names_the_missing_path(voc_root, remove, kwargs, missing):
    root, _, _ = voc_root
    for part in remove.split("+"):
        p = root / part
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(DatasetLayoutError) as info:
        VOCDataset(root, "val", **kwargs)
    msg = str(info.value)
    assert f"missing {'file' if '.' in missing else 'folder'} {root}" in msg
    assert missing in msg.split("Expected layout")[0]
    assert "Expected layout" in msg and "ImageSets/Segmentation" in msg


def test_layout_check_lists_available_splits(voc_root):
    root, _, _ = voc_root
    with pytest.raises(
        DatasetLayoutError, match="trainaug.txt.*lists present: test, train, train_aug, val"
    ):
        VOCDataset(root, "trainaug")


def test_missing_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="nowhere"):
        VOCDataset(tmp_path / "nowhere", "val")


def test_corrupt_jpeg_reported_by_name_and_skipped(voc_root, caplog):
    root, _, expected = voc_root
    path = root / "JPEGImages" / "2008_000002.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    ds = VOCDataset(root, "train_aug", with_mask=False)
    with pytest.raises(SampleError, match="2008_000002") as info:
        ds[1]
    assert info.value.name == "2008_000002" and info.value.path == path

    ds = VOCDataset(root, "train_aug", with_mask=False, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="wsss_fast.data"):
        s = ds[1]
    assert s["name"] == "2008_000003"  # the next sample stands in
    torch.testing.assert_close(s["label"], torch.from_numpy(expected["2008_000003"]))
    assert "2008_000002" in ds.skipped and "2008_000002" in caplog.text


def test_garbage_bytes_reported(voc_root):
    root, _, _ = voc_root
    (root / "JPEGImages" / "2007_000039.jpg").write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(SampleError, match="2007_000039.*corrupt or unreadable image"):
        VOCDataset(root, "val")[0]


def test_empty_and_missing_files(voc_root, caplog):
    root, _, _ = voc_root
    (root / "JPEGImages" / "2008_000002.jpg").write_bytes(b"")
    (root / "JPEGImages" / "2008_000003.jpg").unlink()
    with pytest.raises(DataError) as info:
        VOCDataset(root, "train_aug")
    msg = str(info.value)
    assert "2008_000002" in msg and "empty" in msg and "2008_000003" in msg and "not found" in msg
    with caplog.at_level(logging.WARNING, logger="wsss_fast.data"):
        ds = VOCDataset(root, "train_aug", skip_corrupt=True)
    assert ds.names == ["2007_000032"]
    assert set(ds.skipped) == {"2008_000002", "2008_000003"} and "2008_000003" in caplog.text


def test_one_missing_file_is_a_sample_error(voc_root):
    root, _, _ = voc_root
    (root / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(SampleError, match="2007_000039.*file not found"):
        VOCDataset(root, "val")


def test_bad_masks_reported(voc_root):
    root, _, _ = voc_root
    from PIL import Image

    Image.new("RGB", (45, 37), (128, 0, 0)).save(root / "SegmentationClassAug" / "2007_000039.png")
    with pytest.raises(SampleError, match="2007_000039.*mode 'RGB'"):
        VOCDataset(root, "val")
    save_palette_png(
        root / "SegmentationClassAug" / "2007_000039.png", np.full((37, 45), 21, np.uint8)
    )
    with pytest.raises(SampleError, match=r"2007_000039.*\[21\] are outside 0..20"):
        VOCDataset(root, "val")
    save_palette_png(
        root / "SegmentationClassAug" / "2007_000039.png", np.zeros((36, 45), np.uint8)
    )
    (root / "cls_labels_cache.npy").unlink(missing_ok=True)
    with pytest.raises(SampleError, match="2007_000039.*36x45 but image"):
        VOCDataset(root, "val", with_mask=True)[0]


def test_pair_format_list(voc_root):
    root, _, _ = voc_root
    lst = root / "pairs.txt"
    lst.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n\n")
    ds = VOCDataset(root, "train", list_file=lst)
    assert ds.names == ["2007_000032"]


def test_augmented_samples_are_deterministic(voc_root):
    root, _, _ = voc_root

    def make(seed):
        return VOCDataset(root, "train", with_mask=True, transform=train_transform(24), seed=seed)

    a, b, c = make(0), make(0), make(1)
    s0, s1, s2 = a[0], b[0], c[0]
    assert s0["image"].shape == (3, 24, 24) and s0["mask"].shape == (24, 24)
    torch.testing.assert_close(s0["image"], s1["image"], rtol=0, atol=0)
    assert torch.equal(s0["mask"], s1["mask"]) and torch.equal(s0["crop_box"], s1["crop_box"])
    assert not torch.equal(s0["image"], s2["image"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], s0["image"])
    a.set_epoch(0)
    assert torch.equal(a[0]["image"], s0["image"])


def test_dataloader_workers_match_main_process(voc_root):
    root, _, _ = voc_root
    ds = VOCDataset(root, "train_aug", with_mask=False, transform=train_transform(20), seed=3)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=3, num_workers=workers, collate_fn=collate
        )
        batches.append(next(iter(loader)))
    a, b = batches
    assert (
        a["image"].shape == (3, 3, 20, 20)
        and a["label"].shape == (3, 20)
        and a["crop_box"].shape == (3, 4)
    )
    assert torch.equal(a["image"], b["image"]) and a["name"] == b["name"]


def test_collate_keeps_sizes_apart(voc_root):
    root, _, _ = voc_root
    ds = VOCDataset(root, "train_aug", with_mask=False)
    batch = collate([ds[0], ds[1]])
    assert isinstance(batch["image"], list) and batch["image"][0].shape != batch["image"][1].shape
    assert batch["label"].shape == (2, 20) and batch["orig_size"].shape == (2, 2)
    assert batch["name"] == ["2007_000032", "2008_000002"]


def test_build_dataset(voc_root):
    root, _, _ = voc_root
    assert isinstance(build_dataset("voc", root, "val"), VOCDataset)
    with pytest.raises(ValueError, match="unknown data set kind 'pascal'.*'coco'"):
        build_dataset("pascal", root, "val")


def test_saliency_maps_are_binarised_and_move_with_the_crop(voc_root):
    from PIL import Image

    root, images, _ = voc_root
    name = "2007_000039"
    h, w = images[name].shape[:2]
    sal = np.zeros((h, w), np.uint8)
    sal[:, : w // 2] = 200  # salient left half
    sal[0, -1] = 1  # any value above 0 counts as salient
    (root / "sal").mkdir()
    Image.fromarray(sal).save(root / "sal" / f"{name}.png")
    ds = VOCDataset(root, "val", with_mask=True, saliency_dir="sal")
    s = ds[0]
    assert s["saliency"].dtype == torch.int64 and s["saliency"].shape == (h, w)
    want = torch.from_numpy((sal > 0).astype(np.int64))
    assert torch.equal(s["saliency"], want)
    # Crop larger than the image: the saliency map is padded with 255 like the mask, and it
    # stays aligned with the mask through rescale, flip and crop.
    t = train_transform(max(h, w) + 16, scale_range=(0.7, 1.3), jitter=None)
    aug = VOCDataset(root, "val", with_mask=True, saliency_dir="sal", transform=t)[0]
    pad = aug["mask"] == 255
    assert ((aug["saliency"] == 255) <= pad).all()
    assert (aug["saliency"][aug["mask"] != 255] != 255).all()
    # Missing folder and missing file name the fix / the file.
    with pytest.raises(DatasetLayoutError, match="saliency folder"):
        VOCDataset(root, "val", saliency_dir="nowhere")
    (root / "sal" / f"{name}.png").unlink()
    with pytest.raises(SampleError, match=f"{name}.png"):
        VOCDataset(root, "val", saliency_dir="sal")[0]
