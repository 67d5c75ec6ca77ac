"""Evaluation: mIoU from one confusion matrix per split, CAM utilities, and overlays.

* :mod:`~wsss_fast.eval.metrics` — :class:`ConfusionMatrix` (per-class IoU, mIoU, pixel
  accuracy, mean class accuracy, frequency-weighted IoU; the absent-class rule is stated there),
  mergeable and all-reducible across processes.
* :mod:`~wsss_fast.eval.cams` — CAM normalisations, :func:`cam_to_label`, CAM ``.npy`` and
  palette-PNG mask files, :func:`evaluate_cams` at the config's background threshold, and the
  report-only :func:`threshold_sweep_report`.
* :mod:`~wsss_fast.eval.overlay` — heat maps, VOC-palette masks and ``image | CAM | pseudo |
  ground truth`` panels.
"""

from wsss_fast.data.io import voc_palette
from wsss_fast.data.voc import VOC_CLASSES
from wsss_fast.eval.cams import (
    DEFAULT_SWEEP_THRESHOLDS,
    cam_to_label,
    evaluate_cams,
    load_cam,
    load_mask_png,
    max_normalize,
    minmax_normalize,
    save_cam,
    save_mask_png,
    threshold_sweep_report,
)
from wsss_fast.eval.metrics import ConfusionMatrix, all_reduce_sum
from wsss_fast.eval.overlay import (
    cam_heatmap,
    colorize_mask,
    jet,
    make_panel,
    mask_overlay,
    preview_grid,
    save_panel,
    save_rgb_png,
)

__all__ = [
    "DEFAULT_SWEEP_THRESHOLDS",
    "VOC_CLASSES",
    "ConfusionMatrix",
    "all_reduce_sum",
    "cam_heatmap",
    "cam_to_label",
    "colorize_mask",
    "evaluate_cams",
    "jet",
    "load_cam",
    "load_mask_png",
    "make_panel",
    "mask_overlay",
    "preview_grid",
    "max_normalize",
    "minmax_normalize",
    "save_cam",
    "save_mask_png",
    "save_panel",
    "save_rgb_png",
    "threshold_sweep_report",
    "voc_palette",
]
