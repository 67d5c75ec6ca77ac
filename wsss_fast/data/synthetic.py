"""The built-in synthetic data set: textured shapes on cluttered backgrounds, in the VOC layout.

Each class is a shape family filled with its own texture (``SYNTHETIC_CLASSES``: disc + horizontal
stripes, square + checker, triangle + dots, ...). Every object and every piece of background
clutter takes its colours from the same distribution, so colour says nothing about the class or
about object versus background: a model has to find shapes and textures. Images hold one to
``max_objects`` objects (uniform count, uniform classes, repeats allowed), each at least 60 %
visible; clutter (line segments, blobs, small patches of stripes at random angles) is smaller
than any object.

Generated files, under ``root``::

    JPEGImages/<split>_<i>.jpg              RGB, size x size (JPEG q95, no chroma subsampling)
    SegmentationClass/<split>_<i>.png       palette PNG: 0 background, 1..K, 255 on a band
                                            ``boundary`` px wide each side of every outline,
                                            as VOC marks object boundaries
    ImageSets/Segmentation/{train,val}.txt
    cls_labels.npy                          name -> K-dim multi-hot (the published format)
    dataset.json                            class names, image extension, generator parameters

The masks exist for evaluation only. Generation is deterministic for the parameters (each image
has its own generator seeded by ``(seed, split, index)``) and idempotent: ``dataset.json`` records
the parameters and a root that matches is left as it is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsss_fast.data.io import IGNORE_INDEX, DataError, atomic_write_bytes, write_index_png
from wsss_fast.data.labels import LABEL_FILE_NAME, save_label_file
from wsss_fast.data.voc import METADATA_FILE, VOCDataset, read_metadata

__all__ = [
    "GENERATOR_VERSION",
    "SYNTHETIC_CLASSES",
    "SyntheticDataset",
    "make_synthetic",
    "render_image",
]

GENERATOR_VERSION = 1
"""Bumped whenever the generator's output changes, so old roots are regenerated."""

SYNTHETIC_CLASSES: tuple[tuple[str, str], ...] = (
    ("disc", "horizontal stripes"),
    ("square", "checkerboard"),
    ("triangle", "dots"),
    ("star", "speckle"),
    ("ring", "diagonal stripes"),
    ("cross", "concentric rings"),
    ("crescent", "grid"),
    ("bowtie", "waves"),
)
"""(shape, texture) of each class, in label order; a data set with K classes uses the first K."""

_SPLITS = {"train": 0, "val": 1}
_MIN_VISIBLE = 0.6  # fraction of an object that later objects may not cover
_SUPERSAMPLE = ((-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25))


# --------------------------------------------------------------------------- shapes


def _polygon(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    x1, y1 = verts[-1]
    for x2, y2 in verts:
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / ((y2 - y1) or 1e-12) + x1
        inside ^= crosses & (u < x_at)
        x1, y1 = x2, y2
    return inside


def _vertices(radii: list[float]) -> list[tuple[float, float]]:
    """Polygon vertices at equal angles from the top, at the given distances from the centre."""
    n = len(radii)
    angles = [math.pi / 2 + 2 * math.pi * k / n for k in range(n)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


_TRIANGLE = _vertices([1.2] * 3)
_STAR = _vertices([1.15, 0.48] * 5)
_SQUARE = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]


def _shape(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates (unit = the object's radius) in a shape family."""
    rr = u * u + v * v
    if kind == "disc":
        return rr <= 1.0
    if kind == "square":
        return _polygon(u, v, _SQUARE)
    if kind == "triangle":
        return _polygon(u, v, _TRIANGLE)
    if kind == "star":
        return _polygon(u, v, _STAR)
    if kind == "ring":
        return (rr <= 1.0) & (rr >= 0.5**2)
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if kind == "crescent":
        return (rr <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.78**2)
    if kind == "bowtie":
        au = np.abs(u)
        return (au <= 1.0) & (np.abs(v) <= 0.12 + 0.85 * au)
    raise ValueError(f"unknown shape {kind!r}")


# --------------------------------------------------------------------------- textures


def _texture(
    kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, centre
) -> np.ndarray:
    """A 0/1 pattern over pixel-centre coordinates; a random phase per instance."""
    ph = rng.uniform(0, 64, size=2)
    xs, ys = x + ph[0], y + ph[1]
    if kind == "horizontal stripes":
        return (ys % 6.0) < 3.0
    if kind == "checkerboard":
        return (np.floor(xs / 5.0) + np.floor(ys / 5.0)) % 2 == 1
    if kind == "dots":
        dx = (xs % 7.0) - 3.5
        dy = (ys % 7.0) - 3.5
        return dx * dx + dy * dy <= 2.3**2
    if kind == "speckle":
        cells = rng.random((int(y.max() // 2) + 2, int(x.max() // 2) + 2)) < 0.5
        return cells[(y // 2).astype(np.int64), (x // 2).astype(np.int64)]
    if kind == "diagonal stripes":
        return ((xs + ys) / math.sqrt(2.0) % 8.0) < 4.0
    if kind == "concentric rings":
        d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
        return (d // 3.5) % 2 == 0
    if kind == "grid":
        return ((xs % 7.0) < 2.0) | ((ys % 7.0) < 2.0)
    if kind == "waves":
        return ((ys + 2.5 * np.sin(2 * math.pi * xs / 14.0)) % 7.0) < 3.5
    raise ValueError(f"unknown texture {kind!r}")


# --------------------------------------------------------------------------- colours


def _colour(rng: np.random.Generator) -> np.ndarray:
    """One RGB colour in [0, 1] from the distribution shared by objects and clutter."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95)
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart in brightness that the texture between them is visible."""
    a = _colour(rng)
    for _ in range(100):
        b = _colour(rng)
        if abs(_luma(a) - _luma(b)) >= 0.25:
            break
    return a, b


# --------------------------------------------------------------------------- rendering


def _local(x, y, cx, cy, radius, angle, aspect):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return (dx * c + dy * s) / (radius * aspect), (-dx * s + dy * c) / (radius / aspect)


def _coverage(kind, size, cx, cy, radius, angle, aspect):
    """Anti-aliased coverage in [0, 1] of a shape, ``[size, size]`` float32, and its bbox."""
    ext = radius * 1.25 * max(aspect, 1 / aspect)
    y0, y1 = max(0, int(cy - ext)), min(size, int(math.ceil(cy + ext)) + 1)
    x0, x1 = max(0, int(cx - ext)), min(size, int(math.ceil(cx + ext)) + 1)
    alpha = np.zeros((size, size), dtype=np.float32)
    if y0 >= y1 or x0 >= x1:
        return alpha, (0, 0, 0, 0)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    acc = np.zeros(yy.shape, dtype=np.float32)
    for oy, ox in _SUPERSAMPLE:
        u, v = _local(xx + ox, yy + oy, cx, cy, radius, angle, aspect)
        acc += _shape(kind, u, v)
    alpha[y0:y1, x0:x1] = acc / len(_SUPERSAMPLE)
    return alpha, (y0, y1, x0, x1)


def _background(
    size: int, rng: np.random.Generator, clutter: tuple[int, int] = (3, 6)
) -> np.ndarray:
    """Smooth two-colour noise, faint ripples and ``clutter[0]..clutter[1]`` clutter items;
    float ``[size, size, 3]`` in [0, 1]."""
    c1, c2 = _colour(rng), _colour(rng)
    coarse = rng.random((5, 5)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    img = c1 * (1 - field[..., None]) + c2 * field[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    for _ in range(2):
        a, period = rng.uniform(0, math.pi), rng.uniform(9, 30)
        ripple = np.sin(
            2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform(0, 6.3)
        )
        img = img + 0.04 * ripple[..., None]
    for _ in range(int(rng.integers(clutter[0], clutter[1] + 1))):
        kind = rng.integers(0, 3)
        col = _colour(rng)
        if kind == 0:  # a line segment
            p = rng.uniform(0, size, 2)
            heading = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.1, 0.4) * size * np.array([math.cos(heading), math.sin(heading)])
            width = rng.uniform(0.8, 2.2)
            tt = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
            dist = np.hypot(xx - p[0] - tt * d[0], yy - p[1] - tt * d[1])
            alpha = np.clip(width / 2 + 0.5 - dist, 0, 1)
        else:  # a blob, solid or with stripes at a random angle and period
            r = rng.uniform(0.03, 0.075) * size
            cx, cy = rng.uniform(0, size, 2)
            alpha, _ = _coverage(
                "disc", size, cx, cy, r, rng.uniform(0, math.pi), rng.uniform(0.6, 1.6)
            )
            alpha = alpha.astype(np.float64)
            if kind == 2:
                a, period = rng.uniform(0, math.pi), rng.uniform(4, 9)
                stripes = ((xx * math.cos(a) + yy * math.sin(a)) % period) < period / 2
                other = _colour(rng)
                col = np.where(stripes[..., None], col, other)
        img = img * (1 - alpha[..., None]) + col * alpha[..., None]
    return img


def render_image(
    size: int,
    num_classes: int,
    max_objects: int,
    rng: np.random.Generator,
    boundary: int = 1,
    object_size: tuple[float, float] = (0.2, 0.32),
    clutter: tuple[int, int] = (3, 6),
):
    """One synthetic image and its mask.

    Args:
        size: side in pixels.
        num_classes: K; classes are the first K of ``SYNTHETIC_CLASSES``.
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        rng: the image's generator.
        boundary: half-width in pixels of the ignore band along every object outline (0: none).
        object_size: range of an object's radius as a fraction of ``size``.
        clutter: range (inclusive) of the number of clutter items.

    Returns:
        ``(image, mask)``: uint8 ``[size, size, 3]`` and uint8 ``[size, size]`` (0, 1..K, 255).
    """
    img = _background(size, rng, clutter)
    instance = np.zeros((size, size), dtype=np.int32)  # 0 background, j + 1 object j
    classes: list[int] = []
    areas: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, num_classes))
        shape, texture = SYNTHETIC_CLASSES[cls]
        for _attempt in range(30):
            radius = rng.uniform(*object_size) * size
            cx, cy = rng.uniform(0.7 * radius, size - 0.7 * radius, 2)
            alpha, (y0, y1, x0, x1) = _coverage(
                shape, size, cx, cy, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25)
            )
            covered = alpha >= 0.5
            # Every earlier object must stay mostly visible, or its label would be a lie.
            if all(
                (instance == j + 1).sum() - ((instance == j + 1) & covered).sum()
                >= _MIN_VISIBLE * areas[j]
                for j in range(len(areas))
            ):
                break
        else:
            continue  # no room for another object; the image keeps the ones it has
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        pattern = _texture(texture, xx, yy, rng, (cx, cy))
        a_col, b_col = _colour_pair(rng)
        fill = np.where(pattern[..., None], a_col, b_col)
        al = alpha[y0:y1, x0:x1, None].astype(np.float64)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - al) + fill * al
        instance[covered] = len(classes) + 1
        classes.append(cls)
        areas.append(int(covered.sum()))
    img = img + rng.normal(0.0, 0.02, img.shape)  # sensor grain over everything
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

    lut = np.array([0, *(c + 1 for c in classes)], dtype=np.uint8)
    mask = lut[instance]
    if boundary > 0:
        # Pixels whose neighbourhood holds another instance (or background) form the band.
        pad = np.pad(instance, boundary, mode="edge")
        edge = np.zeros_like(instance, dtype=bool)
        for dy in range(-boundary, boundary + 1):
            for dx in range(-boundary, boundary + 1):
                edge |= (
                    pad[boundary + dy : boundary + dy + size, boundary + dx : boundary + dx + size]
                    != instance
                )
        mask[edge] = IGNORE_INDEX
    return image, mask


# --------------------------------------------------------------------------- the data set


def synthetic_params(
    *,
    num_train: int = 480,
    num_val: int = 120,
    size: int = 128,
    seed: int = 0,
    num_classes: int = 6,
    max_objects: int = 3,
    boundary: int = 1,
    object_size: tuple[float, float] = (0.2, 0.32),
    clutter: tuple[int, int] = (3, 6),
) -> dict:
    """The generator parameters :func:`make_synthetic` records in ``dataset.json`` for these
    arguments, checked (the arguments and their defaults are :func:`make_synthetic`'s)."""
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(
            f"make_synthetic: num_classes must be 2..{len(SYNTHETIC_CLASSES)}, got {num_classes}"
        )
    if size < 32 or max_objects < 1 or num_train < 1 or num_val < 0 or boundary < 0:
        raise ValueError(
            "make_synthetic: need size >= 32, max_objects >= 1, num_train >= 1, num_val >= 0, "
            f"boundary >= 0; got size={size}, max_objects={max_objects}, num_train={num_train}, "
            f"num_val={num_val}, boundary={boundary}"
        )
    lo, hi = (float(v) for v in object_size)
    c_lo, c_hi = (int(v) for v in clutter)
    if not 0.08 <= lo <= hi <= 0.45 or not 0 <= c_lo <= c_hi:
        raise ValueError(
            "make_synthetic: need 0.08 <= object_size[0] <= object_size[1] <= 0.45 and "
            f"0 <= clutter[0] <= clutter[1]; got object_size={object_size}, clutter={clutter}"
        )
    return {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
        "num_classes": num_classes,
        "max_objects": max_objects,
        "boundary": boundary,
        "object_size": [lo, hi],
        "clutter": [c_lo, c_hi],
    }


def make_synthetic(root: str | os.PathLike, *, progress: bool = True, **generator_args) -> Path:
    """Generate the synthetic data set under ``root`` unless it is already there.

    The defaults (600 images of 128 x 128, 6 classes) take a few seconds to generate and train
    in minutes on a laptop CPU.

    Args:
        root: the folder to write; it must be absent, empty, or an earlier synthetic root.
        progress: show a tqdm bar.
        generator_args: :func:`synthetic_params`'s keywords (defaults in brackets):

            * ``num_train``, ``num_val``: images per split (480, 120; names ``train_00000``...,
              ``val_00000``...);
            * ``size``: image side in pixels (128);
            * ``seed``: the data set's seed (0); the same parameters always give the same bytes;
            * ``num_classes``: K, 2..8 (6); class k is ``SYNTHETIC_CLASSES[k - 1]``;
            * ``max_objects``: objects per image are drawn from 1..max_objects (3);
            * ``boundary``: half-width of the 255 band on object outlines (1);
            * ``object_size``: range of an object's radius as a fraction of ``size``
              ((0.2, 0.32); clutter stays smaller than the smallest object: its blobs are
              0.03-0.075 of ``size``);
            * ``clutter``: range (inclusive) of clutter items per image ((3, 6)).

    Returns:
        ``root`` as a Path. Load it with :class:`SyntheticDataset` (or :class:`VOCDataset`).

    Raises:
        DataError: ``root`` holds something that is not a synthetic data set (it is never
        overwritten).
    """
    root = Path(root)
    params = synthetic_params(**generator_args)
    if _matches(root, params):
        return root
    if (
        root.exists()
        and any(root.iterdir())
        and (read_metadata(root) or {}).get("name") != "synthetic"
    ):
        raise DataError(
            f"make_synthetic: {root} is not empty and holds no synthetic data set; refusing to "
            "overwrite it. Choose an empty or new folder."
        )

    # Build beside the root and swap it in, so a killed run or a concurrent rank never leaves a
    # half-written root that looks complete.
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _generate(tmp, params, progress=progress, desc=f"synthetic data set {root}")
        if _matches(root, params):  # another process finished first
            return root
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            root.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, root)
            except OSError:
                if not _matches(root, params):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _matches(root: Path, params: dict) -> bool:
    if not (root / METADATA_FILE).is_file():
        return False
    try:
        meta = read_metadata(root) or {}
    except DataError:
        return False
    return meta.get("name") == "synthetic" and meta.get("generator") == params


def _generate(out: Path, params: dict, *, progress: bool, desc: str) -> None:
    k = params["num_classes"]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    counts = {"train": params["num_train"], "val": params["num_val"]}
    with tqdm(total=sum(counts.values()), desc=desc, disable=not progress, unit="img") as bar:
        for split, n in counts.items():
            names = [f"{split}_{i:05d}" for i in range(n)]
            for i, name in enumerate(names):
                rng = np.random.default_rng([params["seed"], _SPLITS[split], i])
                image, mask = render_image(
                    params["size"],
                    k,
                    params["max_objects"],
                    rng,
                    params["boundary"],
                    tuple(params["object_size"]),
                    tuple(params["clutter"]),
                )
                Image.fromarray(image).save(
                    out / "JPEGImages" / f"{name}.jpg", quality=95, subsampling=0
                )
                write_index_png(out / "SegmentationClass" / f"{name}.png", mask)
                label = np.zeros(k, dtype=np.float32)
                present = np.unique(mask)
                label[present[(present > 0) & (present <= k)].astype(np.int64) - 1] = 1.0
                labels[name] = label
                bar.update()
            (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
                "".join(f"{n}\n" for n in names)
            )
    save_label_file(out / LABEL_FILE_NAME, labels)
    meta = {
        "name": "synthetic",
        "class_names": ["background", *(s for s, _ in SYNTHETIC_CLASSES[:k])],
        "textures": {s: t for s, t in SYNTHETIC_CLASSES[:k]},
        "image_ext": ".jpg",
        "ignore_index": IGNORE_INDEX,
        "splits": counts,
        "generator": params,
    }
    # Written last: its presence means the rest is complete.
    atomic_write_bytes(out / METADATA_FILE, json.dumps(meta, indent=2).encode())


class SyntheticDataset(VOCDataset):
    """A root made by :func:`make_synthetic`, loaded like VOC with its own class names.

    Splits are ``train`` and ``val``; labels are ``[K]``, masks 0..K and 255. See
    :class:`~wsss_fast.data.dataset.SegmentationDataset` for the keyword arguments.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", **kwargs):
        meta = read_metadata(root)
        if not meta or meta.get("name") != "synthetic":
            raise DataError(
                f"{root} is not a synthetic data set root (no {METADATA_FILE} naming it): create "
                "it with wsss_fast.data.make_synthetic(root)"
            )
        super().__init__(root, split, **kwargs)
