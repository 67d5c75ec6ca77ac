"""Image-level labels: name -> multi-hot vector, loaded from a label file or built and cached.

The published WSSS repositories ship ``cls_labels.npy``: a pickled ``dict`` from image name to a
float 0/1 vector over the foreground classes (20 for VOC, 80 for COCO; COCO's is keyed by
``name + ".jpg"``). When a data set root has none, labels are built from the index masks or, for
VOC, the XML annotations, and cached next to the data (or in a cache folder when the root is
read-only) so the scan over ten thousand masks happens once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss_fast.data.io import IGNORE_INDEX, DataError, SampleError, atomic_write_bytes

__all__ = [
    "LABEL_CACHE_NAME",
    "LABEL_FILE_NAME",
    "default_cache_dir",
    "labels_from_mask",
    "labels_from_xml",
    "load_label_file",
    "resolve_labels",
    "save_label_file",
]

log = logging.getLogger(__name__)

LABEL_FILE_NAME = "cls_labels.npy"
"""The published label file, looked for at the data set root."""
LABEL_CACHE_NAME = "cls_labels_cache.npy"
"""Where labels built here are cached (same format); a separate name so a shipped file is never
overwritten. Delete it to rebuild."""


def labels_from_mask(mask: np.ndarray, num_classes: int, *, name: str = "?", path=None):
    """Multi-hot vector of the classes present in an index mask.

    Args:
        mask: integer ``[H, W]``; 0 = background, 1..num_classes = classes, 255 = ignore.
        num_classes: C, the number of foreground classes.

    Returns:
        float32 ``[C]``; entry ``c - 1`` is 1 when class ``c`` occurs.

    Raises:
        SampleError: a value outside ``{0..C, 255}`` (a mask from another data set or a colour
        mask read as indices).
    """
    values = np.unique(mask)
    bad = values[(values > num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise SampleError(
            name,
            path or "<mask>",
            f"mask values {bad.tolist()} are outside 0..{num_classes} and {IGNORE_INDEX}",
        )
    out = np.zeros(num_classes, dtype=np.float32)
    present = values[(values > 0) & (values <= num_classes)].astype(np.int64)
    out[present - 1] = 1.0
    return out


def labels_from_xml(path: str | os.PathLike, class_names: Sequence[str], *, name: str = "?"):
    """Multi-hot vector from a VOC XML annotation's ``<object><name>`` entries.

    All objects count, ``difficult`` ones included, as PSA/IRN's ``make_cls_labels.py`` do.

    Args:
        class_names: the foreground class names, in label order (no background).

    Returns:
        float32 ``[len(class_names)]``.
    """
    path = Path(path)
    index = {n: i for i, n in enumerate(class_names)}
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise SampleError(name, path, "annotation file not found") from None
    except ET.ParseError as e:
        raise SampleError(name, path, f"malformed XML ({e})") from None
    out = np.zeros(len(class_names), dtype=np.float32)
    for obj in root.iter("object"):
        cls = (obj.findtext("name") or "").strip()
        if cls not in index:
            raise SampleError(name, path, f"unknown object class {cls!r}")
        out[index[cls]] = 1.0
    return out


def load_label_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``cls_labels.npy``: a pickled dict ``name -> [C]`` 0/1 vector (as published)."""
    try:
        obj = np.load(path, allow_pickle=True)
        labels = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else obj
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"label file {path} cannot be read ({e}); delete it to rebuild") from None
    if not isinstance(labels, dict):
        raise DataError(
            f"label file {path} holds a {type(labels).__name__}, expected a pickled dict "
            "name -> multi-hot vector (the cls_labels.npy format)"
        )
    return {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in labels.items()}


def save_label_file(path: str | os.PathLike, labels: dict[str, np.ndarray]) -> None:
    """Write ``labels`` in the ``cls_labels.npy`` format (pickled dict), atomically."""
    buf = io.BytesIO()
    np.save(buf, np.array(dict(labels), dtype=object), allow_pickle=True)
    atomic_write_bytes(path, buf.getvalue())


def default_cache_dir() -> Path:
    """``$WSSS_FAST_CACHE``, else ``$XDG_CACHE_HOME/wsss_fast``, else ``~/.cache/wsss_fast``."""
    if os.environ.get("WSSS_FAST_CACHE"):
        return Path(os.environ["WSSS_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsss_fast"


def _cache_paths(root: Path, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Cache locations in order of preference: the root, then the cache folder (keyed by root)."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [root / LABEL_CACHE_NAME, folder / f"{root.name}-{key}-{LABEL_CACHE_NAME}"]


def _lookup(labels: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    # COCO's published labels are keyed by file name, VOC's by stem.
    hit = labels.get(name)
    return hit if hit is not None else labels.get(name + ".jpg")


def resolve_labels(
    names: Iterable[str],
    *,
    root: str | os.PathLike,
    num_classes: int,
    label_file: str | os.PathLike | None = None,
    mask_path: Callable[[str], Path | None] | None = None,
    read_mask: Callable[[Path, str], np.ndarray] | None = None,
    xml_path: Callable[[str], Path | None] | None = None,
    class_names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    errors: dict[str, SampleError] | None = None,
) -> dict[str, np.ndarray]:
    """Image labels for ``names``, from the first source that has them.

    Order: ``label_file`` if given (else ``root/cls_labels.npy`` if present), then the cache
    (``root/cls_labels_cache.npy``, or ``cache_dir`` when the root is read-only), then the
    sample's mask (``mask_path(name)``, read with ``read_mask``) or XML annotation
    (``xml_path(name)``, with ``class_names`` the foreground names). Labels built in the last step
    are merged into the cache.

    Returns:
        ``{name: float32 [num_classes]}`` for every requested name, except those whose mask or
        XML failed to read when ``errors`` is given: they are recorded there instead of raised.

    Raises:
        DataError: a label vector of the wrong length, or names no source covers (listed).
    """
    root = Path(root)
    names = list(dict.fromkeys(names))
    sources: list[tuple[Path, dict[str, np.ndarray]]] = []
    published = Path(label_file) if label_file is not None else root / LABEL_FILE_NAME
    if label_file is not None and not published.is_file():
        raise DataError(f"label file {published} (given as label_file) does not exist")
    if published.is_file():
        sources.append((published, load_label_file(published)))
    cache_paths = _cache_paths(root, cache_dir)
    cache: dict[str, np.ndarray] = {}
    for p in cache_paths:
        if p.is_file():
            loaded = load_label_file(p)
            sources.append((p, loaded))
            cache.update(loaded)

    out: dict[str, np.ndarray] = {}
    todo = []
    for name in names:
        for path, labels in sources:
            hit = _lookup(labels, name)
            if hit is not None:
                if hit.shape != (num_classes,):
                    raise DataError(
                        f"label file {path}: the label of {name!r} has {hit.size} entries, but the "
                        f"data set has {num_classes} foreground classes (a label file of another "
                        "data set?)"
                    )
                out[name] = hit
                break
        else:
            todo.append(name)
    if not todo:
        return out

    built: dict[str, np.ndarray] = {}
    missing = []
    bar = tqdm(todo, desc="image labels from annotations", disable=len(todo) < 200, leave=False)
    for name in bar:
        mp = mask_path(name) if mask_path is not None else None
        xp = xml_path(name) if xml_path is not None else None
        try:
            if mp is not None:
                built[name] = labels_from_mask(read_mask(mp, name), num_classes, name=name, path=mp)
            elif xp is not None:
                built[name] = labels_from_xml(xp, class_names, name=name)
            else:
                missing.append(name)
        except SampleError as e:
            if errors is None:
                raise
            errors[name] = e
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"no image label for {len(missing)} sample(s) under {root} ({shown}): they are not in "
            f"{published.name} or the label cache, and have no mask or XML annotation to build "
            "one from. Add a cls_labels.npy, the masks or Annotations/, or load this split with "
            "with_label=False (e.g. the VOC test split)."
        )
    out.update(built)
    if built:
        _write_cache(cache_paths, {**cache, **built})
    return out


def _write_cache(paths: list[Path], labels: dict[str, np.ndarray]) -> None:
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            save_label_file(p, labels)
        except OSError as e:  # a read-only data root: fall back to the cache folder
            log.info("cannot write the label cache %s (%s); trying the next location", p, e)
            continue
        log.info("cached %d image labels in %s", len(labels), p)
        return
    log.warning("could not cache image labels in any of %s; they are rebuilt next time", paths)
