"""PASCAL VOC 2012 with the SBD augmentation, in the standard devkit layout.

Expected layout (``root`` is ``VOCdevkit/VOC2012``)::

    root/
      JPEGImages/<name>.jpg                 17,125 images
      SegmentationClass/<name>.png          VOC 2012 index masks (train + val, 2,913)
      SegmentationClassAug/<name>.png       SBD-augmented index masks (train_aug + val, 12,031)
      ImageSets/Segmentation/<split>.txt    train_aug 10,582 · train 1,464 · val 1,449 · test 1,456
      Annotations/<name>.xml                optional: image labels are built from these when
                                            there are no masks for a name
      cls_labels.npy                        optional: name -> 20-dim multi-hot (as published)

Masks are read from ``SegmentationClassAug`` first, then ``SegmentationClass`` (the two agree on
VOC 2012's own images). Image labels come from ``cls_labels.npy`` if present, else from the mask,
else from the XML, and are cached in ``cls_labels_cache.npy``.

A VOC-layout root that holds a ``dataset.json`` with ``class_names`` (the synthetic set writes
one) uses those names instead of VOC's 21, and its ``image_ext``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from wsss_fast.data.dataset import SegmentationDataset
from wsss_fast.data.io import DataError
from wsss_fast.data.labels import LABEL_CACHE_NAME, LABEL_FILE_NAME

__all__ = ["METADATA_FILE", "VOC_CLASSES", "VOCDataset", "read_metadata"]

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""Mask index -> class name for VOC 2012 (index 0 background; labels use indices 1..20)."""

METADATA_FILE = "dataset.json"
"""Optional metadata at a VOC-layout root: ``{"class_names": [...], "image_ext": ".jpg", ...}``."""

_MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")


def read_metadata(root: str | os.PathLike) -> dict | None:
    """The root's ``dataset.json`` as a dict, or None when there is none."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object")
    return meta


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 (+ SBD) or any VOC-layout root (the synthetic set).

    Args:
        root: ``VOCdevkit/VOC2012`` (or a synthetic root).
        split: ``train_aug``, ``train``, ``val``, ``test`` (a file in ``ImageSets/Segmentation``).
        **kwargs: see :class:`~wsss_fast.data.dataset.SegmentationDataset` (``transform``,
            ``with_mask``, ``with_label``, ``skip_corrupt``, ``label_file``, ``list_file``,
            ``cache_dir``, ``seed``, ``normalize``).

    Example::

        ds = VOCDataset("VOCdevkit/VOC2012", "val", with_mask=True)
        s = ds[0]   # image [3, H, W], label [20], mask [H, W], name, crop_box [4], orig_size [2]
    """

    def __init__(self, root: str | os.PathLike, split: str = "train_aug", **kwargs):
        meta = read_metadata(root) or {}
        class_names = meta.get("class_names", VOC_CLASSES)
        if len(class_names) < 2 or class_names[0] != "background":
            raise DataError(
                f"{Path(root) / METADATA_FILE}: class_names must start with 'background' and name "
                f"at least one class, got {class_names}"
            )
        self.image_ext = meta.get("image_ext", ".jpg")
        super().__init__(root, split, class_names=class_names, **kwargs)

    def layout_help(self) -> str:
        r = self.root
        return (
            f"  {r}/\n"
            f"    JPEGImages/<name>{self.image_ext}\n"
            "    SegmentationClass/<name>.png       index masks (VOC 2012)\n"
            "    SegmentationClassAug/<name>.png    index masks (SBD augmentation; train_aug)\n"
            "    ImageSets/Segmentation/{train_aug,train,val,test}.txt\n"
            "    Annotations/<name>.xml             optional (image labels when a mask is absent)\n"
            f"    {LABEL_FILE_NAME}                     optional (name -> multi-hot image label)\n"
            "VOC 2012: host.robots.ox.ac.uk/pascal/VOC/voc2012 (VOCtrainval_11-May-2012.tar); "
            "SegmentationClassAug and train_aug.txt: the SBD conversion most WSSS repositories "
            "link (e.g. from DeepLab or PSA's README). Pass list_file=... for a list kept elsewhere."
        )

    def check_layout(self, *, need_masks: bool, need_labels: bool, label_file) -> None:
        r = self.root
        self._require(r, "the data set root", folder=True)
        self._require(r / "JPEGImages", "the images", folder=True)
        if not self.list_file.is_file():
            folder = self.list_file.parent
            have = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
            hint = f"; lists present: {', '.join(have)}" if have else ""
            self._require(self.list_file, f"the list of split {self.split!r}{hint}", folder=False)
        mask_dirs = [r / d for d in _MASK_DIRS if (r / d).is_dir()]
        if need_masks and not mask_dirs:
            self._require(
                r / _MASK_DIRS[1],
                "index masks, asked for by with_mask=True; SegmentationClassAug/ would also do",
                folder=True,
            )
        if need_labels and label_file is None:
            sources = [r / LABEL_FILE_NAME, r / LABEL_CACHE_NAME, *mask_dirs, r / "Annotations"]
            if not any(p.exists() for p in sources):
                self._require(
                    r / LABEL_FILE_NAME,
                    "the image labels; or provide SegmentationClassAug/, SegmentationClass/ or "
                    "Annotations/ to build them from, or load with with_label=False",
                    folder=False,
                )

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}{self.image_ext}"

    def mask_candidates(self, name: str) -> list[Path]:
        return [self.root / d / f"{name}.png" for d in _MASK_DIRS]

    def xml_path(self, name: str) -> Path | None:
        p = self.root / "Annotations" / f"{name}.xml"
        return p if p.is_file() else None
