"""CAM normalisation, CAM-to-label conversion, CAM/pseudo-mask files, and CAM evaluation.

Conventions used throughout:

* a CAM of one image is ``[K, H, W]`` float over the K classes present in that image, with
  ``keys`` ``[K]`` their class ids in the segmentation label space (1..C-1; background is 0 and
  never a key), so ``keys`` index straight into the ground-truth masks;
* the background threshold of an evaluation is an argument fixed in the config. The only function
  that searches for a threshold is :func:`threshold_sweep_report`, a named report whose result must
  not be used on the split it was computed on (it is an oracle number there, as the sweeps in the
  published AReAM ``evaluate.py`` are).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsss_fast.data.io import atomic_write, voc_palette
from wsss_fast.eval.metrics import ConfusionMatrix, all_reduce_sum

ArrayLike = np.ndarray | torch.Tensor

#: AReAM's sweep grid (``evaluate.py``: 0.01 .. 0.79 in steps of 0.01).
DEFAULT_SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(i / 100, 2) for i in range(1, 80))


def _check_spatial(fn: str, cam: ArrayLike) -> None:
    if cam.ndim < 2:
        raise ValueError(f"{fn}: cam must be [..., H, W], got shape {tuple(cam.shape)}")


# ---------------------------------------------------------------------- normalisation


def max_normalize(cam: ArrayLike, eps: float = 1e-5) -> ArrayLike:
    """Per-class max normalisation over space, ``M / (max_{h,w} M + eps)`` (CRT, GETAM, IRN).

    The methods apply it to non-negative maps (after a ReLU); negative values are not clipped
    here, so ReLU first if the maps can be negative.

    Args:
        cam: ``[..., H, W]`` (e.g. ``[K, H, W]`` or ``[B, K, H, W]``) numpy array or tensor;
            integer input becomes float32. Differentiable for tensors.
        eps: added to each map's maximum; 1e-5 as in IRN/CRT/GETAM, so an all-zero map stays 0.

    Returns:
        The same shape and type, each ``[H, W]`` map scaled so its maximum is just below 1.
    """
    _check_spatial("max_normalize", cam)
    if isinstance(cam, torch.Tensor):
        cam = cam if cam.is_floating_point() else cam.float()
        return cam / (cam.amax(dim=(-2, -1), keepdim=True) + eps)
    cam = np.asarray(cam)
    cam = cam if np.issubdtype(cam.dtype, np.floating) else cam.astype(np.float32)
    return cam / (cam.max(axis=(-2, -1), keepdims=True) + cam.dtype.type(eps))


def minmax_normalize(cam: ArrayLike, eps: float = 1e-6) -> ArrayLike:
    """ReLU, then per-class min-max normalisation over space (AReAM ``minmax_normalize4d``).

    ``M <- relu(M)``; ``M <- (M - min M) / (max M - min M + eps)``, min and max over ``H, W``.

    Args:
        cam: ``[..., H, W]`` numpy array or tensor; integer input becomes float32.
            Differentiable for tensors.
        eps: 1e-6 as in AReAM, so a constant map becomes 0.

    Returns:
        The same shape and type, each ``[H, W]`` map in ``[0, 1)``.
    """
    _check_spatial("minmax_normalize", cam)
    if isinstance(cam, torch.Tensor):
        cam = (cam if cam.is_floating_point() else cam.float()).clamp_min(0)
        lo = cam.amin(dim=(-2, -1), keepdim=True)
        hi = cam.amax(dim=(-2, -1), keepdim=True)
        return (cam - lo) / (hi - lo + eps)
    cam = np.asarray(cam)
    cam = cam if np.issubdtype(cam.dtype, np.floating) else cam.astype(np.float32)
    cam = np.maximum(cam, 0)
    lo = cam.min(axis=(-2, -1), keepdims=True)
    hi = cam.max(axis=(-2, -1), keepdims=True)
    return (cam - lo) / (hi - lo + cam.dtype.type(eps))


# ---------------------------------------------------------------------- CAM -> label


def _check_cam_keys(fn: str, cam: ArrayLike, keys: Any) -> np.ndarray:
    """Validate a ``[K, H, W]`` CAM against its keys; return the keys as int64 numpy."""
    if cam.ndim != 3:
        raise ValueError(
            f"{fn}: cam must be [K, H, W] (one map per present class), got {tuple(cam.shape)}; "
            "index the batch first"
        )
    if isinstance(keys, torch.Tensor):
        keys = keys.detach().cpu().numpy()
    keys = np.asarray(keys).reshape(-1)
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        raise TypeError(f"{fn}: keys must be integer class ids, got dtype {keys.dtype}")
    keys = keys.astype(np.int64)
    if keys.size != cam.shape[0]:
        raise ValueError(
            f"{fn}: {keys.size} keys for {cam.shape[0]} CAM channels; keys must list the class id "
            "of each channel of cam"
        )
    if (keys <= 0).any():
        raise ValueError(
            f"{fn}: keys must be foreground class ids >= 1 (0 is background and comes from the "
            f"threshold), got {keys.tolist()}; if they are 0-based foreground indices, add 1"
        )
    if np.unique(keys).size != keys.size:
        raise ValueError(f"{fn}: keys must be unique, got {keys.tolist()}")
    return keys


def _foreground_max(cam: ArrayLike, keys: np.ndarray) -> tuple[ArrayLike, ArrayLike]:
    """Per pixel: the largest foreground score ``[H, W]`` and its class id ``[H, W]`` int64.

    Channels are visited in ascending class id and argmax keeps the first maximum, so a tie
    between classes goes to the smaller class id whatever order ``keys`` came in.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if isinstance(cam, torch.Tensor):
        fg = cam[torch.as_tensor(order, device=cam.device)]
        best, idx = fg.max(dim=0)
        return best, torch.as_tensor(sorted_keys, device=cam.device)[idx]
    fg = cam[order]
    idx = fg.argmax(axis=0)
    return np.take_along_axis(fg, idx[None], axis=0)[0], sorted_keys[idx]


def cam_to_label(cam: ArrayLike, keys: Any, bg_threshold: float) -> ArrayLike:
    """Label map from a CAM: prepend a constant background channel and take the argmax.

    ``label[h, w] = argmax over [bg_threshold, cam[0, h, w], ..., cam[K-1, h, w]]``, with index 0
    mapped to background (class 0) and index ``i >= 1`` to the class id of channel ``i - 1``.

    Tie rule: the first maximum wins, with the background first and the classes in ascending class
    id. So a pixel whose best class score equals ``bg_threshold`` exactly is background, and two
    classes with equal top scores give the smaller class id (independent of the order of ``keys``).
    An image with no present class (K = 0) is all background.

    Args:
        cam: ``[K, H, W]`` float numpy array or tensor, normalised maps of the present classes.
        keys: ``[K]`` int class ids of the channels (>= 1, unique): list, array or tensor.
        bg_threshold: the background score, fixed in the config (e.g. AReAM/MCTformer ~0.4-0.5 for
            min-max CAMs, CRT 0.15 for max-normalised CAMs). Compared in ``cam``'s dtype.

    Returns:
        ``[H, W]`` int64 class ids, a tensor on ``cam``'s device for tensor input.

    Example::

        label = cam_to_label(minmax_normalize(cam), keys=[8, 15], bg_threshold=0.45)
    """
    keys = _check_cam_keys("cam_to_label", cam, keys)
    H, W = cam.shape[-2:]
    if isinstance(cam, torch.Tensor):
        if keys.size == 0:
            return torch.zeros((H, W), dtype=torch.int64, device=cam.device)
        best, label = _foreground_max(cam, keys)
        # `best > t` is argmax over [t, best] with the background first; the threshold is
        # cast to cam's dtype so the comparison is the one a prepended channel would make.
        t = torch.tensor(bg_threshold, dtype=cam.dtype, device=cam.device)
        return torch.where(best > t, label, torch.zeros_like(label))
    cam = np.asarray(cam)
    if keys.size == 0:
        return np.zeros((H, W), dtype=np.int64)
    best, label = _foreground_max(cam, keys)
    return np.where(best > cam.dtype.type(bg_threshold), label, 0)


# ---------------------------------------------------------------------- files


def save_cam(
    path: str | os.PathLike,
    cam: ArrayLike,
    keys: Any,
    *,
    dtype: np.dtype | type = np.float32,
) -> Path:
    """Save one image's CAM as ``.npy`` holding ``{"keys": [K] int64, "cam": [K, H, W]}``.

    The file is a pickled dict, the format the published AReAM/MCTformer writers use (with
    ``keys`` as class ids here rather than their 0-based foreground indices).

    Args:
        path: output file, conventionally ``<cam_dir>/<image name>.npy``; parents are created.
        cam: ``[K, H, W]`` numpy array or tensor (detached and moved to CPU).
        keys: ``[K]`` class ids (>= 1, unique) of the channels.
        dtype: stored float dtype; float16 halves the disk for COCO-sized splits.

    Returns:
        The path written.
    """
    if isinstance(cam, torch.Tensor):
        cam = cam.detach().cpu().numpy()
    cam = np.asarray(cam)
    keys = _check_cam_keys("save_cam", cam, keys)
    record = {"keys": keys, "cam": np.ascontiguousarray(cam, dtype=dtype)}
    return atomic_write(path, lambda f: np.save(f, record, allow_pickle=True))


def load_cam(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a CAM written by :func:`save_cam`: ``{"keys": [K] int64, "cam": [K, H, W]}``.

    The file is unpickled, so load only files this package (or you) wrote.
    """
    obj = np.load(path, allow_pickle=True)
    record = obj.item() if obj.dtype == object and obj.shape == () else None
    if not isinstance(record, dict) or not {"keys", "cam"} <= set(record):
        raise ValueError(
            f"load_cam: {path} is not a CAM file with 'keys' and 'cam' (found "
            f"{sorted(record) if isinstance(record, dict) else type(obj).__name__}); write CAMs "
            "with wsss_fast.eval.save_cam"
        )
    keys = _check_cam_keys(f"load_cam({path})", record["cam"], record["keys"])
    return {"keys": keys, "cam": record["cam"]}


def save_mask_png(
    path: str | os.PathLike, mask: ArrayLike, palette: np.ndarray | None = None
) -> Path:
    """Write an index mask as a palette PNG (VOC palette by default), 255 kept as 255.

    Args:
        path: output ``.png``; parents are created.
        mask: ``[H, W]`` integer class ids in ``0..255`` (255 = ignored / unlabelled).
        palette: ``[N, 3]`` uint8 colours for indices ``0..N-1``; default :func:`voc_palette`.

    Returns:
        The path written. Read it back with :func:`load_mask_png` (the indices, not colours).
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_mask_png: mask must be [H, W], got {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"save_mask_png: mask must hold integer class ids, got {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(
            f"save_mask_png: values must lie in 0..255 for an 8-bit palette PNG, got "
            f"{mask.min()}..{mask.max()}"
        )
    H, W = mask.shape
    image = Image.frombytes("P", (W, H), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    image.putpalette((voc_palette() if palette is None else np.asarray(palette, np.uint8)).ravel())
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def load_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read an index mask PNG (palette or grayscale) as ``[H, W]`` uint8 class ids."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"load_mask_png: {path} has mode {image.mode!r}; expected an index PNG (mode 'P' "
                "or 'L') such as VOC SegmentationClass or save_mask_png output, not a colour "
                "rendering"
            )
        return np.array(image, dtype=np.uint8)


# ---------------------------------------------------------------------- evaluation

CamItem = tuple[ArrayLike, Any, ArrayLike]


def evaluate_cams(
    items: Iterable[CamItem],
    *,
    num_classes: int,
    bg_threshold: float,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of CAM labels at a fixed background threshold over a split.

    Args:
        items: ``(cam [K, H, W], keys [K], gt [H, W])`` per image, e.g. from :func:`load_cam`
            and :func:`load_mask_png`.
        num_classes: C, background included.
        bg_threshold: the background score from the config; never chosen on this split.
        ignore_index, class_names: as in :class:`ConfusionMatrix`.

    Returns:
        The split's :class:`ConfusionMatrix` for this process's images; call ``.all_reduce()`` on
        it when the split is sharded over processes.
    """
    cm = ConfusionMatrix(num_classes, ignore_index, class_names)
    for cam, keys, gt in items:
        cm.update(cam_to_label(cam, keys, bg_threshold), gt)
    return cm


def threshold_sweep_report(
    items: Iterable[CamItem],
    *,
    num_classes: int,
    thresholds: Sequence[float] = DEFAULT_SWEEP_THRESHOLDS,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
    all_reduce: bool = False,
    reduce_fn: Callable | None = None,
) -> dict[str, Any]:
    """REPORT ONLY: mIoU of CAM labels for every background threshold, and the best one.

    The best threshold is chosen by looking at the ground truth of the very split evaluated, so
    its mIoU is an oracle number for that split. It must not be used as the threshold for results
    reported on the split it was chosen on: fix the config's threshold on a different split (or
    take the method's published value) and report :func:`evaluate_cams` at that threshold. This
    function exists to compare with published numbers that were obtained by such a sweep (AReAM's
    ``evaluate.py`` sweeps 0.01-0.79 on VOC ``train``).

    Each threshold is scored exactly as :func:`cam_to_label` would label it (same tie rule, same
    dtype comparison), in one pass over the data: a pixel with top class score ``m`` is foreground
    for every threshold below ``m``, so per-image histograms of (number of thresholds below ``m``,
    ground truth, top class) summed and prefix-summed give every threshold's matrix.

    Args:
        items: ``(cam [K, H, W], keys [K], gt [H, W])`` per image; tensors are moved to the CPU.
        num_classes: C, background included.
        thresholds: background scores to try; default 0.01, 0.02, ..., 0.79.
        ignore_index, class_names: as in :class:`ConfusionMatrix`.
        all_reduce: sum the counts over processes (every rank must call) before choosing, with
            ``reduce_fn`` or ``torch.distributed``; see :meth:`ConfusionMatrix.all_reduce`.

    Returns:
        ``{"thresholds": [T] ascending, "miou": [T], "best_threshold", "best_miou",
        "confusion_matrices": [T] ConfusionMatrix, "warning": str}``. Ties in mIoU go to the
        smallest threshold.
    """
    ts = np.asarray(sorted(set(float(t) for t in thresholds)), dtype=np.float64)
    if ts.size == 0 or not np.isfinite(ts).all():
        raise ValueError("threshold_sweep_report: thresholds must be a non-empty list of numbers")
    C, T = int(num_classes), ts.size
    probe = ConfusionMatrix(C, ignore_index, class_names)  # validates arguments up front
    # hist[n, g, l]: pixels of true class g whose top class is l and that are foreground for
    # exactly the n smallest thresholds (n = number of thresholds below the top score).
    hist = np.zeros((T + 1) * C * C, dtype=np.int64)
    for cam, keys, gt in items:
        if isinstance(cam, torch.Tensor):
            cam = cam.detach().cpu().numpy()
        if isinstance(gt, torch.Tensor):
            gt = gt.detach().cpu().numpy()
        cam, gt = np.asarray(cam), np.asarray(gt)
        keys = _check_cam_keys("threshold_sweep_report", cam, keys)
        if gt.shape != cam.shape[-2:]:
            raise ValueError(
                f"threshold_sweep_report: gt {gt.shape} and cam {cam.shape} differ in size; "
                "resize the CAM to the ground truth first"
            )
        keep = gt != ignore_index
        g = gt[keep].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= C):
            raise ValueError(
                f"threshold_sweep_report: ground truth values outside 0..{C - 1} and "
                f"ignore_index {ignore_index}"
            )
        if keys.size == 0:
            n = np.zeros_like(g)
            label = np.zeros_like(g)
        else:
            best, label = _foreground_max(cam, keys)
            if label.max() >= C:
                raise ValueError(f"threshold_sweep_report: keys {keys.tolist()} exceed C - 1")
            best, label = best[keep], label[keep]
            # thresholds in cam's dtype, as cam_to_label compares them
            n = np.searchsorted(ts.astype(best.dtype), best, side="left")
        hist += np.bincount((n * C + g) * C + label, minlength=hist.size)
    hist = hist.reshape(T + 1, C, C)
    if all_reduce:
        hist = all_reduce_sum(hist, reduce_fn)
    # threshold j: foreground where n > j, background where n <= j
    fg = np.cumsum(hist[::-1], axis=0)[::-1][1:]  # fg[j] = sum_{n > j} hist[n]
    bg = np.cumsum(hist.sum(axis=2), axis=0)[:T]  # bg[j][g] = sum_{n <= j} sum_l hist[n, g, l]
    matrices, mious = [], []
    for j in range(T):
        m = fg[j].copy()
        m[:, 0] += bg[j]
        cm = ConfusionMatrix.from_matrix(m, probe.ignore_index, class_names)
        matrices.append(cm)
        mious.append(cm.miou())
    if np.isnan(mious).all():
        raise ValueError("threshold_sweep_report: no labelled pixels were seen")
    best = int(np.nanargmax(mious))  # first maximum: the smallest threshold on ties
    return {
        "thresholds": ts.tolist(),
        "miou": mious,
        "best_threshold": float(ts[best]),
        "best_miou": mious[best],
        "confusion_matrices": matrices,
        "warning": (
            "best_threshold was chosen on the evaluated split; best_miou is an oracle number for "
            "it. Do not use this threshold for results reported on this split."
        ),
    }
