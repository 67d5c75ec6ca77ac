"""Data: PASCAL VOC 2012 (+ SBD), COCO 2014 and the built-in synthetic data set.

All three share one data set class (:class:`SegmentationDataset`) and return the same sample
dict: ``image`` ``[3, H, W]`` normalised, ``label`` ``[C]`` multi-hot, ``mask`` ``[H, W]`` (when
asked for), ``name``, ``crop_box`` ``[4]`` and ``orig_size`` ``[2]``. Transforms
(:mod:`wsss_fast.data.transforms`) draw from a per-sample generator seeded by
``(seed, epoch, index)``, so augmentation is reproducible whatever the worker count.

Example::

    from wsss_fast.data import SyntheticDataset, make_synthetic, train_transform
    root = make_synthetic("data/synthetic")            # no-op when already generated
    train = SyntheticDataset(root, "train", with_mask=False, transform=train_transform(96))
    val = SyntheticDataset(root, "val", with_mask=True)
"""

from wsss_fast.data.coco import COCODataset
from wsss_fast.data.coco_categories import (
    COCO_CATEGORIES,
    COCO_CLASSES,
    COCO_ID_TO_INDEX,
    COCO_INDEX_TO_ID,
    category_mask_to_index,
)
from wsss_fast.data.dataset import SegmentationDataset, collate
from wsss_fast.data.io import (
    IGNORE_INDEX,
    DataError,
    DatasetLayoutError,
    SampleError,
    read_image,
    read_list,
    read_mask,
    voc_palette,
    write_index_png,
)
from wsss_fast.data.labels import load_label_file, save_label_file
from wsss_fast.data.synthetic import SYNTHETIC_CLASSES, SyntheticDataset, make_synthetic
from wsss_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRescale,
    RandomResizedCrop,
    RandomResizeLong,
    denormalize,
    normalize,
    timm_train_transform,
    train_transform,
)
from wsss_fast.data.voc import VOC_CLASSES, VOCDataset

DATASETS = {"voc": VOCDataset, "coco": COCODataset, "synthetic": SyntheticDataset}
"""Data set kind (as named in configs) -> class."""


def build_dataset(kind: str, root, split: str, **kwargs) -> SegmentationDataset:
    """``DATASETS[kind](root, split, **kwargs)``, with an error that lists the kinds."""
    if kind not in DATASETS:
        raise ValueError(f"unknown data set kind {kind!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[kind](root, split, **kwargs)


__all__ = [
    "COCO_CATEGORIES",
    "COCO_CLASSES",
    "COCO_ID_TO_INDEX",
    "COCO_INDEX_TO_ID",
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "COCODataset",
    "ColorJitter",
    "Compose",
    "DataError",
    "DatasetLayoutError",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRescale",
    "RandomResizeLong",
    "RandomResizedCrop",
    "SampleError",
    "SegmentationDataset",
    "SyntheticDataset",
    "VOCDataset",
    "build_dataset",
    "category_mask_to_index",
    "collate",
    "denormalize",
    "load_label_file",
    "make_synthetic",
    "normalize",
    "read_image",
    "read_list",
    "read_mask",
    "save_label_file",
    "timm_train_transform",
    "train_transform",
    "voc_palette",
    "write_index_png",
]
