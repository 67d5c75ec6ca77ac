"""Reading and writing the files of a segmentation data set, with errors that name the sample.

Images are read as uint8 ``[H, W, 3]`` RGB arrays, masks as uint8 ``[H, W]`` index arrays (0 =
background, 1..C = classes, 255 = ignore). Every failure raises :class:`SampleError`, which
carries the sample's name and path, so one bad file among ten thousand is found at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

__all__ = [
    "DataError",
    "DatasetLayoutError",
    "IGNORE_INDEX",
    "SampleError",
    "atomic_write",
    "atomic_write_bytes",
    "read_image",
    "read_list",
    "read_mask",
    "voc_palette",
    "write_index_png",
]

IGNORE_INDEX = 255
"""Mask value of pixels that are not evaluated (VOC's object boundary band, crop padding)."""

# What PIL raises for a file it cannot decode: UnidentifiedImageError and "image file is
# truncated" are OSErrors; broken headers raise SyntaxError/ValueError/EOFError; a huge
# declared size raises DecompressionBombError, which is not an OSError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(RuntimeError):
    """Something about a data set (its files, lists or labels) is wrong; the message says what."""


class DatasetLayoutError(DataError, FileNotFoundError):
    """A folder or file the data set layout requires is missing (the message names it)."""


class SampleError(DataError):
    """One sample's image, mask or annotation is missing, empty or cannot be decoded.

    Attributes:
        name: the sample's name as in the split list (e.g. ``2007_000032``).
        path: the offending file.
        reason: what is wrong with it.
    """

    def __init__(self, name: str, path: str | os.PathLike, reason: str):
        self.name, self.path, self.reason = name, Path(path), reason
        super().__init__(f"sample {name!r}: {path}: {reason}")


def _check_file(path: Path, name: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SampleError(name, path, "file not found") from None
    except OSError as e:
        raise SampleError(name, path, f"cannot be read ({e})") from None
    if size == 0:
        raise SampleError(name, path, "file is empty (0 bytes)")


def read_image(path: str | os.PathLike, name: str) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: JPEG or PNG (anything PIL reads); grey, palette, CMYK and RGBA are converted.
        name: the sample name, for the error message.

    Returns:
        uint8 array ``[H, W, 3]``.

    Raises:
        SampleError: missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    _check_file(path, name)
    try:
        with Image.open(path) as im:
            # load() decodes every byte now, so a truncated JPEG fails here and not later as a
            # half-grey image. EXIF orientation is deliberately ignored: VOC and COCO masks are
            # aligned with the stored pixel array, not with the rotated view.
            im.load()
            rgb = im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise SampleError(name, path, f"corrupt or unreadable image ({e})") from None
    return np.asarray(rgb)


def read_saliency(path: str | os.PathLike, name: str) -> np.ndarray:
    """Read a saliency map (grey PNG/JPEG, any bit depth, colour converted to grey) and binarise
    it as GETAM does: ``1`` where the value is above 0, else ``0``.

    Returns:
        uint8 array ``[H, W]`` of 0/1.

    Raises:
        SampleError: missing, empty or undecodable file.
    """
    path = Path(path)
    _check_file(path, name)
    try:
        with Image.open(path) as im:
            im.load()
            grey = im if im.mode in ("L", "I", "I;16", "F") else im.convert("L")
            arr = np.asarray(grey)
    except _DECODE_ERRORS as e:
        raise SampleError(name, path, f"corrupt or unreadable saliency map ({e})") from None
    return (arr > 0).astype(np.uint8)


def read_mask(path: str | os.PathLike, name: str) -> np.ndarray:
    """Read an index mask (palette PNG as VOC ships, or 8-bit grey as SBD/COCO conversions do).

    Returns:
        uint8 array ``[H, W]`` of class indices; 255 = ignore.

    Raises:
        SampleError: missing, empty, undecodable, or not a single-channel index image (a
        colour-coded RGB mask would be silently misread as indices, so it is refused).
    """
    path = Path(path)
    _check_file(path, name)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except _DECODE_ERRORS as e:
        raise SampleError(name, path, f"corrupt or unreadable mask ({e})") from None
    if mode in ("P", "L"):
        return arr.astype(np.uint8, copy=False)
    if mode in ("I", "I;16", "I;16B", "I;16L") and arr.size and 0 <= arr.min() and arr.max() <= 255:
        return arr.astype(np.uint8)
    raise SampleError(
        name,
        path,
        f"mask has PIL mode {mode!r} and shape {arr.shape}: expected a single-channel index PNG "
        "(mode 'P' or 'L') whose pixel values are class indices (255 = ignore); convert "
        "colour-coded masks to indices first",
    )


def read_list(path: str | os.PathLike) -> list[str]:
    """Read a split list: one sample per line, the first token's file stem.

    Accepts plain names (``2007_000032``) and the pair format some SBD lists use
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``). Blank lines are
    skipped.
    """
    names = []
    with open(path) as f:
        for line in f:
            tokens = line.split()
            if tokens:
                stem = os.path.basename(tokens[0])
                names.append(os.path.splitext(stem)[0] if "." in stem else stem)
    return names


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


def write_index_png(
    path: str | os.PathLike, mask: np.ndarray, palette: Sequence[int] | None = None
):
    """Write a uint8 ``[H, W]`` index mask as a palette PNG (VOC palette unless given)."""
    if mask.ndim != 2:
        raise ValueError(f"write_index_png: mask must be [H, W], got shape {mask.shape}")
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode "L"
    im.putpalette(list(palette) if palette is not None else voc_palette().ravel().tolist())
    im.save(path, optimize=False)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through a temporary file and a rename; returns ``path``.

    ``write(f)`` fills the binary file ``f``. A reader (another rank, a killed run being resumed)
    never sees a half-written file. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))
