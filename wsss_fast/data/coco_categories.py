"""The pinned COCO 2014 category table: the 80 official category ids (1..90 with gaps) -> 1..80.

The mapping is the rank of the id among the 80 in increasing order, so class index ``k`` is the
k-th category of ``instances_train2014.json``'s ``categories`` list: id 1 (person) -> 1, id 13
(stop sign) -> 12, id 90 (toothbrush) -> 80. Index 0 is background and 255 ignore, as in VOC. The
ten ids COCO never used (12, 26, 29, 30, 45, 66, 68, 69, 71, 83) have no index. This is the order
the WSSS community's VOC-style COCO masks and 80-dim ``cls_labels.npy`` files use.

Names are COCO's official ``name`` strings (``"motorcycle"``, ``"couch"``, ``"tv"``, ...), not the
VOC spellings.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "COCO_CATEGORIES",
    "COCO_CLASSES",
    "COCO_ID_TO_INDEX",
    "COCO_INDEX_TO_ID",
    "category_mask_to_index",
]

COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)
"""``(category id, official name)`` for the 80 COCO 2014 categories, in id order."""

COCO_CLASSES: tuple[str, ...] = ("background", *(name for _, name in COCO_CATEGORIES))
"""Mask index -> name (index 0 background, 1..80 the categories)."""

COCO_ID_TO_INDEX: dict[int, int] = {cid: i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES)}
COCO_INDEX_TO_ID: dict[int, int] = {i: cid for cid, i in COCO_ID_TO_INDEX.items()}

# Lookup table for masks that store raw category ids: 0 stays background, 255 stays ignore.
_ID_LUT = np.arange(256, dtype=np.uint8)
_VALID_ID = np.zeros(256, dtype=bool)
_VALID_ID[[0, 255, *COCO_ID_TO_INDEX]] = True
for _cid, _idx in COCO_ID_TO_INDEX.items():
    _ID_LUT[_cid] = _idx


def category_mask_to_index(mask: np.ndarray) -> np.ndarray:
    """Map a mask of raw COCO category ids (0, 1..90, 255) to class indices (0, 1..80, 255).

    Args:
        mask: uint8 ``[H, W]``.

    Returns:
        uint8 ``[H, W]``.

    Raises:
        ValueError: the mask holds ids that are no COCO category (e.g. 12 or 91); such a mask was
        probably converted with another scheme, and guessing would shift classes silently.
    """
    mask = np.asarray(mask, dtype=np.uint8)
    bad = ~_VALID_ID[mask]
    if bad.any():
        raise ValueError(
            f"category ids {np.unique(mask[bad]).tolist()} are not COCO 2014 categories; is this "
            "mask already in class indices 0..80 (then read it with mask_values='index')?"
        )
    return _ID_LUT[mask]
