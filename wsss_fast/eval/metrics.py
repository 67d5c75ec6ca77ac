"""Segmentation metrics from one confusion matrix accumulated over a whole split.

Rows of the matrix are ground-truth classes, columns are predicted classes, and one extra column
counts pixels whose *prediction* is the ignore index (a pseudo mask's "don't know" pixels). Every
metric is computed from the summed matrix, never averaged over images, as VOC's and COCO's
official evaluations do.

Absent-class rule (applies to every per-class metric and every mean):

* a class that occurs neither in the ground truth nor in the predictions anywhere in the split has
  an undefined IoU: NaN per class, and it is left out of mIoU;
* a class that occurs only in the predictions has IoU 0 (all its pixels are false positives) and
  counts in mIoU with 0;
* a class's accuracy (recall) is NaN when it does not occur in the ground truth, and such classes
  are left out of the mean class accuracy, whether or not they were predicted.

Ground-truth pixels equal to ``ignore_index`` are skipped. Predicted pixels equal to
``ignore_index`` (on non-ignored ground truth) are counted as wrong: a false negative of the true
class and a false positive of none. To score them as background instead, as IRN's
``eval_sem_seg`` does, map them before calling :meth:`ConfusionMatrix.update`
(``np.where(pred == 255, 0, pred)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def all_reduce_sum(array: np.ndarray, reduce_fn: Callable | None = None) -> np.ndarray:
    """Sum an int64 numpy array over processes and return the sum (a new array).

    Args:
        array: any shape, int64.
        reduce_fn: ``f(array) -> summed array``, for any launcher (e.g. a gather over an RPC).
            When ``None`` and ``torch.distributed`` is initialised, an ``all_reduce(SUM)`` runs on
            the default group (on the current CUDA device for NCCL, on CPU otherwise); when
            ``None`` and no process group exists there is nothing to reduce and ``array`` comes
            back unchanged.
    """
    if reduce_fn is not None:
        out = np.asarray(reduce_fn(array.copy()))
        if out.shape != array.shape:
            raise ValueError(
                f"all_reduce_sum: reduce_fn returned shape {out.shape}, expected {array.shape}; "
                "it must return the element-wise sum over processes"
            )
        return out.astype(np.int64, copy=False)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return array.copy()
    # NCCL only reduces CUDA tensors; gloo and mpi reduce CPU tensors.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def _as_int_array(name: str, x: ArrayLike) -> ArrayLike:
    """Check that ``x`` is an integer array or tensor; bool is refused (no class ids)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(
                f"ConfusionMatrix.update: {name} must hold integer class ids, got a {x.dtype} "
                "tensor; take the argmax over classes (or .long()) first"
            )
        return x
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(
            f"ConfusionMatrix.update: {name} must hold integer class ids, got dtype {x.dtype}; "
            "take the argmax over classes (or .astype(np.int64)) first"
        )
    return x


class ConfusionMatrix:
    """A ``[num_classes, num_classes]`` confusion matrix (rows: ground truth, columns: prediction).

    Accumulate with :meth:`update` over every image of a split, sum across processes with
    :meth:`all_reduce` or :meth:`merge`, then read :meth:`iou`, :meth:`miou`,
    :meth:`pixel_accuracy`, :meth:`mean_class_accuracy`, :meth:`fw_iou` or :meth:`summary`.
    The absent-class rule and the handling of ``ignore_index`` are stated in the module
    docstring (:mod:`wsss_fast.eval.metrics`).

    Args:
        num_classes: number of classes C, background included (21 for VOC, 81 for COCO).
        ignore_index: ground-truth value that is skipped; predictions with this value count as
            wrong (see the module docstring). Must lie outside ``0..C-1``.
        class_names: C names for :meth:`summary`; default ``"class_0"``, ``"class_1"``, ...

    Example::

        cm = ConfusionMatrix(21, class_names=VOC_CLASSES)
        for pred, gt in pairs:          # [H, W] int arrays or tensors
            cm.update(pred, gt)
        cm.all_reduce()                 # no-op without torch.distributed
        print(cm.summary()["table"])
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ConfusionMatrix: ignore_index {ignore_index} is a class id (0..{num_classes - 1});"
                " pick a value outside the classes, such as 255"
            )
        if class_names is None:
            class_names = [f"class_{i}" for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"ConfusionMatrix: {len(class_names)} class_names for {num_classes} classes"
            )
        self.class_names = list(class_names)
        # column C counts predictions equal to ignore_index
        self._counts = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    # ------------------------------------------------------------------ accumulation

    @classmethod
    def from_matrix(
        cls,
        matrix: ArrayLike,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        pred_ignored: ArrayLike | None = None,
    ) -> ConfusionMatrix:
        """Build from a ``[C, C]`` count matrix (rows ground truth) and optional ``[C]`` counts of
        pixels of each ground-truth class predicted as ``ignore_index``."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"ConfusionMatrix.from_matrix: expected [C, C], got {matrix.shape}")
        if (matrix < 0).any():
            raise ValueError("ConfusionMatrix.from_matrix: counts must be non-negative")
        cm = cls(matrix.shape[0], ignore_index, class_names)
        cm._counts[:, :-1] = matrix
        if pred_ignored is not None:
            cm._counts[:, -1] = np.asarray(pred_ignored).reshape(cm.num_classes)
        return cm

    @property
    def matrix(self) -> np.ndarray:
        """``[C, C]`` int64 counts: ``matrix[g, p]`` pixels of true class g predicted as p."""
        return self._counts[:, :-1].copy()

    @property
    def pred_ignored(self) -> np.ndarray:
        """``[C]`` int64: pixels of each true class whose prediction was ``ignore_index``."""
        return self._counts[:, -1].copy()

    def reset(self) -> None:
        self._counts[:] = 0

    def update(self, pred: ArrayLike, gt: ArrayLike) -> ConfusionMatrix:
        """Add one prediction / ground-truth pair (or a batch) to the matrix.

        Args:
            pred: predicted class ids, any shape, integer numpy array or tensor, values in
                ``0..C-1`` or ``ignore_index``.
            gt: ground-truth class ids, the same shape, values in ``0..C-1`` or ``ignore_index``.
                Tensors are counted on their own device (only the ``[C, C+1]`` counts are copied
                to the CPU), so a CUDA batch is not moved pixel by pixel.

        Returns:
            ``self``, so that updates can be chained.
        """
        pred = _as_int_array("pred", pred)
        gt = _as_int_array("gt", gt)
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(
                f"ConfusionMatrix.update: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must "
                "have the same shape; resize the prediction to the ground truth (nearest) first"
            )
        C = self.num_classes
        device = next(
            (
                x.device
                for x in (pred, gt)
                if isinstance(x, torch.Tensor) and x.device.type != "cpu"
            ),
            None,
        )
        # Counting runs in torch only for accelerator tensors (to avoid copying masks to the
        # host); CPU tensors are viewed as numpy, whose masking and bincount are several times
        # faster than torch's on CPU.
        torch_in = device is not None
        if torch_in:
            pred = torch.as_tensor(pred, device=device).reshape(-1).long()
            gt = torch.as_tensor(gt, device=device).reshape(-1).long()
            xp_where, xp_bincount = torch.where, torch.bincount
        else:
            pred, gt = (
                x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in (pred, gt)
            )
            pred = pred.reshape(-1).astype(np.int64, copy=False)
            gt = gt.reshape(-1).astype(np.int64, copy=False)
            xp_where, xp_bincount = np.where, np.bincount

        keep = gt != self.ignore_index
        gt, pred = gt[keep], pred[keep]
        bad_gt = (gt < 0) | (gt >= C)
        if bad_gt.any():
            raise ValueError(
                f"ConfusionMatrix.update: ground truth holds {int(gt[bad_gt][0])}, outside "
                f"0..{C - 1} and not ignore_index {self.ignore_index}; check num_classes and the "
                "label encoding (a colour PNG read as RGB gives such values)"
            )
        pred_ign = pred == self.ignore_index
        bad_pred = ((pred < 0) | (pred >= C)) & ~pred_ign
        if bad_pred.any():
            raise ValueError(
                f"ConfusionMatrix.update: prediction holds {int(pred[bad_pred][0])}, outside "
                f"0..{C - 1} and not ignore_index {self.ignore_index}; check num_classes"
            )
        pred = xp_where(pred_ign, C, pred)
        flat = xp_bincount(gt * (C + 1) + pred, minlength=C * (C + 1))
        if torch_in:
            flat = flat.cpu().numpy()
        self._counts += flat.reshape(C, C + 1)
        return self

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "ConfusionMatrix.merge: matrices differ in num_classes or ignore_index "
                f"({self.num_classes}, {self.ignore_index}) vs "
                f"({other.num_classes}, {other.ignore_index})"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix in place (e.g. per-worker matrices); returns
        ``self``. Merging is exactly accumulation over the union of both sets of images."""
        self._check_compatible(other)
        self._counts += other._counts
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names)
        out._counts = self._counts + other._counts
        return out

    def all_reduce(self, reduce_fn: Callable | None = None) -> ConfusionMatrix:
        """Sum the counts over all processes, in place; every rank ends with the full matrix.

        Args:
            reduce_fn: ``f(counts) -> summed counts`` for a custom launcher; by default
                ``torch.distributed.all_reduce`` when a process group is initialised, and nothing
                at all in a single process. Every rank must call this (it is a collective).

        Returns:
            ``self``.
        """
        self._counts = all_reduce_sum(self._counts, reduce_fn)
        return self

    # ------------------------------------------------------------------ metrics

    def _stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per class: true positives, ground-truth pixels (row sums, including pixels predicted
        as ignore), predicted pixels (column sums)."""
        tp = np.diag(self._counts[:, :-1]).astype(np.float64)
        gt_total = self._counts.sum(axis=1).astype(np.float64)
        pred_total = self._counts[:, :-1].sum(axis=0).astype(np.float64)
        return tp, gt_total, pred_total

    def iou(self) -> np.ndarray:
        """``[C]`` float64 per-class IoU ``TP / (TP + FP + FN)``; NaN for a class absent from both
        ground truth and predictions, 0 for a class that is only predicted."""
        tp, gt_total, pred_total = self._stats()
        union = gt_total + pred_total - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def class_accuracy(self) -> np.ndarray:
        """``[C]`` float64 per-class accuracy (recall) ``TP / ground-truth pixels``; NaN for a
        class absent from the ground truth."""
        tp, gt_total, _ = self._stats()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gt_total > 0, tp / gt_total, np.nan)

    def precision(self) -> np.ndarray:
        """``[C]`` float64 ``TP / predicted pixels``; NaN for a class never predicted."""
        tp, _, pred_total = self._stats()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pred_total > 0, tp / pred_total, np.nan)

    def miou(self) -> float:
        """Mean of :meth:`iou` over the classes that are not NaN; NaN when the matrix is empty."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted (non-ignored ground-truth) pixels; NaN when empty."""
        tp, gt_total, _ = self._stats()
        total = gt_total.sum()
        return float(tp.sum() / total) if total > 0 else float("nan")

    def mean_class_accuracy(self) -> float:
        """Mean of :meth:`class_accuracy` over classes present in the ground truth."""
        return _nanmean(self.class_accuracy())

    def fw_iou(self) -> float:
        """Frequency-weighted IoU ``sum_c (gt pixels of c / all gt pixels) * IoU_c``; classes
        absent from the ground truth have weight 0. NaN when empty."""
        _, gt_total, _ = self._stats()
        total = gt_total.sum()
        if total == 0:
            return float("nan")
        present = gt_total > 0
        return float((gt_total[present] / total * self.iou()[present]).sum())

    def pred_ignored_fraction(self) -> float:
        """Fraction of counted pixels predicted as ``ignore_index`` (a pseudo mask's unlabelled
        share); NaN when empty."""
        total = self._counts.sum()
        return float(self._counts[:, -1].sum() / total) if total > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        """All metrics as a JSON-ready dict; undefined values (NaN) become ``None``.

        Keys: ``miou``, ``pixel_accuracy``, ``mean_class_accuracy``, ``fw_iou``,
        ``pred_ignored_fraction``, ``num_pixels`` (counted pixels), ``iou`` and
        ``class_accuracy`` (``{class name: value}``), ``absent_classes`` (names excluded from
        mIoU), ``table`` (a fixed-width text table for logs).
        """
        iou, acc, prec = self.iou(), self.class_accuracy(), self.precision()
        names = self.class_names
        return {
            "miou": _none_if_nan(self.miou()),
            "pixel_accuracy": _none_if_nan(self.pixel_accuracy()),
            "mean_class_accuracy": _none_if_nan(self.mean_class_accuracy()),
            "fw_iou": _none_if_nan(self.fw_iou()),
            "pred_ignored_fraction": _none_if_nan(self.pred_ignored_fraction()),
            "num_pixels": int(self._counts.sum()),
            "iou": {n: _none_if_nan(v) for n, v in zip(names, iou)},
            "class_accuracy": {n: _none_if_nan(v) for n, v in zip(names, acc)},
            "absent_classes": [n for n, v in zip(names, iou) if np.isnan(v)],
            "table": self._table(iou, acc, prec),
        }

    def _table(self, iou: np.ndarray, acc: np.ndarray, prec: np.ndarray) -> str:
        width = max(12, *(len(n) for n in self.class_names))

        def pct(v: float) -> str:
            return "     -" if np.isnan(v) else f"{100 * v:6.2f}"

        lines = [f"{'class':<{width}}  {'IoU':>6}  {'recall':>6}  {'prec.':>6}"]
        lines.append("-" * len(lines[0]))
        for n, i, a, p in zip(self.class_names, iou, acc, prec):
            lines.append(f"{n:<{width}}  {pct(i)}  {pct(a)}  {pct(p)}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'mIoU':<{width}}  {pct(self.miou())}")
        lines.append(f"{'pixel acc.':<{width}}  {pct(self.pixel_accuracy())}")
        lines.append(f"{'mean acc.':<{width}}  {pct(self.mean_class_accuracy())}")
        lines.append(f"{'fw IoU':<{width}}  {pct(self.fw_iou())}")
        if self._counts[:, -1].any():
            lines.append(f"{'unlabelled':<{width}}  {pct(self.pred_ignored_fraction())}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self._counts.sum())}, miou={self.miou():.4f})"
        )


def _nanmean(x: np.ndarray) -> float:
    valid = ~np.isnan(x)
    return float(x[valid].mean()) if valid.any() else float("nan")


def _none_if_nan(v: float) -> float | None:
    return None if np.isnan(v) else float(v)
