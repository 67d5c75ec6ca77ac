"""The data set class shared by VOC, COCO and the synthetic set, and a collate function.

Each sample is a dict:

==============  ===========================  ===============================================
key             type / shape                 meaning
==============  ===========================  ===============================================
``image``       float32 ``[3, H, W]``        RGB after the transforms, ImageNet-normalised
``label``       float32 ``[C]``              multi-hot image label over the C foreground
                                             classes (``label[c - 1]`` is mask class ``c``);
                                             absent when ``with_label=False``
``mask``        int64 ``[H, W]``             0 = background, 1..C, 255 = ignore; only when
                                             the data set was built ``with_mask``
``saliency``    int64 ``[H, W]``             1 salient, 0 not (255 in padding); only with a
                                             ``saliency_dir`` (GETAM's optional saliency maps)
``name``        str                          the sample's name in the split list
``crop_box``    int64 ``[4]``                ``[y0, y1, x0, x1]``: the real pixels inside the
                                             output (AFA's ``img_box``); padding lies outside
``orig_size``   int64 ``[2]``                ``[H, W]`` of the image as stored on disk
==============  ===========================  ===============================================

Weak supervision never trains on ``mask``: build training sets with ``with_mask=False`` and keep
masks for evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wsss_fast.data.io import (
    IGNORE_INDEX,
    DataError,
    DatasetLayoutError,
    SampleError,
    read_image,
    read_list,
    read_mask,
    read_saliency,
)
from wsss_fast.data.labels import resolve_labels
from wsss_fast.data.transforms import normalize

__all__ = ["SegmentationDataset", "collate"]

log = logging.getLogger(__name__)

# With skip_corrupt, a failed sample is replaced by the next one; this many failures in a row
# means the data set itself is broken, not one file.
_MAX_CONSECUTIVE_FAILURES = 64


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # SeedSequence mixes the three so nearby (epoch, index) pairs give unrelated streams.
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def _shown(items: Sequence[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" ... ({len(items)} in all)" if len(items) > k else "")


class SegmentationDataset(Dataset):
    """Images listed in a split file, their image labels and optionally their index masks.

    Subclasses say where files live (:meth:`image_path`, :meth:`mask_candidates`,
    :meth:`xml_path`) and check their layout (:meth:`check_layout`); everything else — file
    checks, labels, transforms, seeding, skipping corrupt files — is here.

    Args:
        root: the data set root.
        split: the split list's name (``train_aug``, ``train``, ``val``, ``test``, ...).
        class_names: mask index -> name, background first (length C + 1).
        transform: ``t(sample, rng) -> sample`` (see :mod:`wsss_fast.data.transforms`), or None.
        with_mask: return ``mask``. None: when every listed sample has a mask.
        with_label: return ``label`` (built from masks/XML and cached when no label file).
        skip_corrupt: log and skip samples whose files are missing, empty or undecodable
            (replaced by the next sample) instead of raising :class:`SampleError`.
        label_file: a ``cls_labels.npy`` to use instead of ``root/cls_labels.npy``.
        list_file: the split list to use instead of the layout's.
        cache_dir: where to cache built labels when the root is read-only.
        seed: base seed of the per-sample generators (see :meth:`set_epoch`).
        normalize: ImageNet-normalise ``image`` (False: leave it in [0, 1]).

    Load through DataLoader workers where you can: samples are small, and in the main process
    torch's intra-op threads cost more than they save on them (workers run one thread each).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        class_names: Sequence[str],
        transform=None,
        with_mask: bool | None = None,
        with_label: bool = True,
        skip_corrupt: bool = False,
        label_file: str | os.PathLike | None = None,
        list_file: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        normalize: bool = True,
        saliency_dir: str | os.PathLike | None = None,
    ):
        self.root = Path(root)
        self.saliency_dir = None
        if saliency_dir is not None:
            sal = Path(saliency_dir)
            self.saliency_dir = sal if sal.is_absolute() else self.root / sal
            if not self.saliency_dir.is_dir():
                raise DatasetLayoutError(
                    f"saliency folder {self.saliency_dir} not found; put one <name>.png per image "
                    "there or leave saliency_dir unset"
                )
        self.split = split
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names) - 1
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.seed = int(seed)
        self.epoch = 0
        self.normalize = normalize
        self.with_label = with_label
        self.list_file = Path(list_file) if list_file is not None else self.default_list_file()
        self.check_layout(need_masks=bool(with_mask), need_labels=with_label, label_file=label_file)
        names = read_list(self.list_file)
        if not names:
            raise DataError(f"split list {self.list_file} is empty")
        self.skipped: dict[str, str] = {}  # name -> reason, for samples left out or skipped

        names = self._drop_bad(names, self.image_path, "image")
        self._mask_paths = {n: self._first_existing(self.mask_candidates(n)) for n in names}
        if with_mask is None:
            with_mask = all(p is not None for p in self._mask_paths.values())
        if with_mask:
            names = self._drop_bad(
                names, lambda n: self._mask_paths[n] or self.mask_candidates(n)[0], "mask"
            )
        self.with_mask = bool(with_mask)
        self.names = names

        self.labels: dict[str, np.ndarray] = {}
        if with_label:
            errors: dict[str, SampleError] = {}
            self.labels = resolve_labels(
                names,
                root=self.root,
                num_classes=self.num_classes,
                label_file=label_file,
                mask_path=self._mask_paths.get,
                read_mask=self.read_mask,
                xml_path=self.xml_path,
                class_names=self.class_names[1:],
                cache_dir=cache_dir,
                errors=errors if skip_corrupt else None,
            )
            for name, e in errors.items():
                self.skipped[name] = f"{e.path}: {e.reason}"
                log.warning("leaving out sample %r: no label (%s: %s)", name, e.path, e.reason)
            if errors:
                self.names = [n for n in self.names if n not in errors]
                if not self.names:
                    raise DataError(f"split {split!r} under {root}: no sample has a readable label")

    # ------------------------------------------------------------------ layout hooks

    def default_list_file(self) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"

    def check_layout(self, *, need_masks: bool, need_labels: bool, label_file) -> None:
        """Raise :class:`DatasetLayoutError` naming the first missing folder or file."""
        raise NotImplementedError

    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def mask_candidates(self, name: str) -> list[Path]:
        """Where this sample's mask may be, in order of preference (non-empty list)."""
        raise NotImplementedError

    def xml_path(self, name: str) -> Path | None:
        """This sample's XML annotation if the layout has one and it exists."""
        return None

    def read_mask(self, path: Path, name: str) -> np.ndarray:
        """uint8 ``[H, W]`` class indices of the mask at ``path`` (subclasses may remap ids)."""
        return read_mask(path, name)

    # ------------------------------------------------------------------ file checks

    @staticmethod
    def _first_existing(paths: list[Path]) -> Path | None:
        return next((p for p in paths if p.is_file()), None)

    def _drop_bad(self, names: list[str], path_of, what: str) -> list[str]:
        """Names whose file exists and is non-empty; the rest raise or, with skip_corrupt, warn."""
        good, bad = [], []
        for n in names:
            p = Path(path_of(n))
            try:
                ok = p.stat().st_size > 0
                reason = "file is empty (0 bytes)"
            except OSError:
                ok, reason = False, "file not found"
            if ok:
                good.append(n)
            else:
                bad.append((n, p, reason))
        if not bad:
            return good
        if not self.skip_corrupt:
            if len(bad) == 1:
                raise SampleError(*bad[0])
            listing = "\n".join(f"  {n}: {p}: {r}" for n, p, r in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(
                f"{len(bad)} {what} file(s) of split {self.split!r} under {self.root} are missing or "
                f"empty:\n{listing}{more}\nRestore them, remove them from {self.list_file}, or pass "
                "skip_corrupt=True to leave them out."
            )
        for n, p, r in bad:
            self.skipped[n] = f"{p}: {r}"
        log.warning(
            "split %r: leaving out %d sample(s) whose %s is missing or empty: %s",
            self.split,
            len(bad),
            what,
            _shown([f"{n} ({p})" for n, p, _ in bad]),
        )
        if not good:
            raise DataError(
                f"split {self.split!r} under {self.root}: no sample has a readable {what}"
            )
        return good

    def _require(self, path: Path, what: str, *, folder: bool) -> None:
        ok = path.is_dir() if folder else path.is_file()
        if not ok:
            kind = "folder" if folder else "file"
            raise DatasetLayoutError(
                f"{type(self).__name__} root {self.root}: missing {kind} {path} ({what}).\n"
                f"Expected layout:\n{self.layout_help()}"
            )

    def layout_help(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ samples

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation for this epoch (call before iterating; not with persistent workers,
        whose copies of the data set do not see the change)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        """The generator the transforms of sample ``index`` draw from this epoch."""
        return torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        n = len(self.names)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for attempt in range(min(n, _MAX_CONSECUTIVE_FAILURES)):
            i = (index + attempt) % n
            try:
                # The generator follows the requested index, so a skipped neighbour does not shift
                # the augmentation of every later sample.
                return self.load(i, self.generator(index))
            except SampleError as e:
                if not self.skip_corrupt:
                    raise
                if e.name not in self.skipped:
                    self.skipped[e.name] = f"{e.path}: {e.reason}"
                    log.warning("skipping sample %r: %s: %s", e.name, e.path, e.reason)
        raise DataError(
            f"{min(n, _MAX_CONSECUTIVE_FAILURES)} samples in a row from index {index} of split "
            f"{self.split!r} under {self.root} failed to load; see the warnings above"
        )

    def load(self, index: int, rng: torch.Generator | None = None) -> dict:
        """Load and transform sample ``index`` with ``rng`` (no skipping; raises SampleError)."""
        name = self.names[index]
        path = self.image_path(name)
        pixels = read_image(path, name)
        h, w = pixels.shape[:2]
        sample = {
            "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0),
            "crop_box": torch.tensor([0, h, 0, w], dtype=torch.int64),
        }
        if self.with_mask:
            mpath = self._mask_paths[name]
            mask = self.read_mask(mpath, name)
            if mask.shape != (h, w):
                raise SampleError(
                    name,
                    mpath,
                    f"mask is {mask.shape[0]}x{mask.shape[1]} but image {path.name} is {h}x{w}",
                )
            bad = (mask > self.num_classes) & (mask != IGNORE_INDEX)
            if bad.any():
                raise SampleError(
                    name,
                    mpath,
                    f"mask values {np.unique(mask[bad]).tolist()} are outside 0..{self.num_classes} and {IGNORE_INDEX}",
                )
            sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        if self.saliency_dir is not None:
            spath = self.saliency_dir / f"{name}.png"
            sal = read_saliency(spath, name)
            if sal.shape != (h, w):
                raise SampleError(
                    name,
                    spath,
                    f"saliency map is {sal.shape[0]}x{sal.shape[1]} but image {path.name} is {h}x{w}",
                )
            sample["saliency"] = torch.from_numpy(sal.astype(np.int64))
        if self.transform is not None:
            sample = self.transform(sample, rng if rng is not None else self.generator(index))
        out = {
            "image": normalize(sample["image"]) if self.normalize else sample["image"],
            "name": name,
            "crop_box": sample["crop_box"],
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.with_label:
            out["label"] = torch.from_numpy(self.labels[name].copy())
        if self.with_mask:
            out["mask"] = sample["mask"]
        if self.saliency_dir is not None:
            out["saliency"] = sample["saliency"]
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, classes={self.num_classes}, with_mask={self.with_mask}, "
            f"with_label={self.with_label}, transform={self.transform!r})"
        )


def collate(samples: Sequence[dict]) -> dict:
    """Batch samples: tensors of equal shape are stacked, anything else becomes a list.

    Training crops stack to ``image [B, 3, H, W]``, ``label [B, C]``, ``crop_box [B, 4]``;
    evaluation images of different sizes come back as lists of ``[3, H_i, W_i]``.
    """
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
