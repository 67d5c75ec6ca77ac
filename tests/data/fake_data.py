"""Helpers that write small VOC- and COCO-layout folders, with the labels they should give.

Everything here is written by hand from the layouts' definitions, not by the package under
test: masks are saved with PIL directly, XML as text, labels as literal vectors.
"""

from pathlib import Path

import numpy as np
from PIL import Image


def save_jpeg(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (smooth so JPEG keeps it close); returns what was written."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)
    return img


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    """An index mask as VOC ships it: mode 'P' with an arbitrary palette."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8))
    im.putpalette([i % 256 for i in range(768)])
    im.save(path)


def save_gray_png(path: Path, mask: np.ndarray) -> None:
    """An index mask as the SBD/COCO conversions ship it: mode 'L'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)


def blocks_mask(h: int, w: int, classes: list[int]) -> np.ndarray:
    """Background with one vertical band per class and a 255 border between bands."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for i, c in enumerate(classes):
        x0 = 2 + i * (w // (len(classes) + 1))
        mask[3 : h - 3, x0 : x0 + 6] = c
        mask[2, x0 : x0 + 6] = 255
    return mask


def multi_hot(classes, n) -> np.ndarray:
    v = np.zeros(n, dtype=np.float32)
    for c in classes:
        v[c - 1] = 1
    return v


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""


def write_xml(path: Path, name: str, h: int, w: int, objects: list[str]) -> None:
    objs = "".join(
        f"  <object><name>{o}</name><difficult>0</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>\n"
        for o in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(VOC_XML.format(name=name, h=h, w=w, objects=objs))
