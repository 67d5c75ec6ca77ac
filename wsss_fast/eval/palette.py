"""The PASCAL VOC colour palette and class names shared by pseudo-mask PNGs and overlays."""

from __future__ import annotations

import numpy as np

#: The 21 VOC 2012 classes in the standard order; index = class id, 0 is background.
VOC_CLASSES: tuple[str, ...] = (
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


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The VOC devkit colour map (``VOClabelcolormap.m``) as ``[num_colors, 3]`` uint8 RGB.

    Colour ``i`` spreads the bits of ``i`` over the high bits of R, G and B, so class 1 is
    (128, 0, 0), class 15 (person) is (192, 128, 128) and the ignore index 255 is (224, 224, 192),
    exactly the colours of ``SegmentationClass`` PNGs. 256 colours cover COCO's 81 classes too.

    Example::

        Image.fromarray(mask, mode="P").putpalette(voc_palette().ravel())
    """
    if not 1 <= num_colors <= 256:
        raise ValueError(f"voc_palette: num_colors must be in 1..256, got {num_colors}")
    idx = np.arange(num_colors)
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            # bit `bit` of each 3-bit group goes to bit (7 - group) of its channel
            palette[:, channel] |= (((idx >> (3 * bit + channel)) & 1) << (7 - bit)).astype(
                np.uint8
            )
    return palette
