"""COCO 2014 with VOC-style index masks, as the WSSS community converts it.

Expected layout::

    root/
      JPEGImages/train2014/COCO_train2014_<12 digits>.jpg     82,783 images
      JPEGImages/val2014/COCO_val2014_<12 digits>.jpg         40,504 images
      SegmentationClass/train2014/<name>.png                  index masks (0 bg, 1..80, 255)
      SegmentationClass/val2014/<name>.png
      ImageSets/Segmentation/{train,val}.txt                  one name per line
      cls_labels.npy                                          optional: name -> 80-dim multi-hot

The sub-folder of a sample comes from its name (``COCO_train2014_...`` / ``COCO_val2014_...``), or
from the split for other names (``val*`` -> ``val2014``, anything else -> ``train2014``). Class
indices follow the pinned table in :mod:`wsss_fast.data.coco_categories`. Masks that hold raw
category ids (1..90) instead of indices are read with ``mask_values="category"``. Image labels come
from ``cls_labels.npy`` (keyed by name or ``name + ".jpg"``, as AReAM's is), else from the masks,
cached in ``cls_labels_cache.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsss_fast.data.coco_categories import COCO_CLASSES, category_mask_to_index
from wsss_fast.data.dataset import SegmentationDataset
from wsss_fast.data.io import SampleError, read_mask
from wsss_fast.data.labels import LABEL_CACHE_NAME, LABEL_FILE_NAME

__all__ = ["COCODataset"]

_SUBSETS = ("train2014", "val2014")


class COCODataset(SegmentationDataset):
    """COCO 2014, 80 classes, VOC-style masks.

    Args:
        root: the converted COCO root (layout above).
        split: a list in ``ImageSets/Segmentation`` (``train``, ``val``, ...).
        mask_values: ``"index"`` (masks hold 0..80, the common conversion) or ``"category"``
            (masks hold raw category ids, mapped through the pinned table on reading).
        **kwargs: see :class:`~wsss_fast.data.dataset.SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        mask_values: str = "index",
        **kwargs,
    ):
        if mask_values not in ("index", "category"):
            raise ValueError(
                f"COCODataset: mask_values must be 'index' or 'category', got {mask_values!r}"
            )
        self.mask_values = mask_values
        super().__init__(root, split, class_names=COCO_CLASSES, **kwargs)

    def subset(self, name: str) -> str:
        """``train2014`` or ``val2014``: the sub-folder holding ``name``."""
        for s in _SUBSETS:
            if name.startswith(f"COCO_{s}_"):
                return s
        return "val2014" if self.split.startswith("val") else "train2014"

    def layout_help(self) -> str:
        r = self.root
        return (
            f"  {r}/\n"
            "    JPEGImages/{train2014,val2014}/<name>.jpg\n"
            "    SegmentationClass/{train2014,val2014}/<name>.png   index masks 0..80, 255 ignore\n"
            "    ImageSets/Segmentation/{train,val}.txt\n"
            f"    {LABEL_FILE_NAME}                                  optional (name -> 80-dim label)\n"
            "Images: cocodataset.org (train2014.zip, val2014.zip). Masks: the VOC-style conversion "
            "the WSSS repositories link, or render them from instances_*2014.json. Pass "
            "list_file=... and label_file=... for lists and labels kept elsewhere."
        )

    def check_layout(self, *, need_masks: bool, need_labels: bool, label_file) -> None:
        r = self.root
        sub = "val2014" if self.split.startswith("val") else "train2014"
        self._require(r, "the data set root", folder=True)
        self._require(r / "JPEGImages", "the images", folder=True)
        self._require(r / "JPEGImages" / sub, f"the images of split {self.split!r}", folder=True)
        self._require(self.list_file, f"the list of split {self.split!r}", folder=False)
        mask_dir = r / "SegmentationClass" / sub
        if need_masks:
            self._require(mask_dir, f"the masks of split {self.split!r}", folder=True)
        if need_labels and label_file is None:
            sources = [r / LABEL_FILE_NAME, r / LABEL_CACHE_NAME, mask_dir]
            if not any(p.exists() for p in sources):
                self._require(
                    r / LABEL_FILE_NAME,
                    f"the image labels; or provide {mask_dir} to build them from, or load with "
                    "with_label=False",
                    folder=False,
                )

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / self.subset(name) / f"{name}.jpg"

    def mask_candidates(self, name: str) -> list[Path]:
        return [self.root / "SegmentationClass" / self.subset(name) / f"{name}.png"]

    def read_mask(self, path: Path, name: str) -> np.ndarray:
        mask = read_mask(path, name)
        if self.mask_values == "category":
            try:
                mask = category_mask_to_index(mask)
            except ValueError as e:
                raise SampleError(name, path, str(e)) from None
        return mask
