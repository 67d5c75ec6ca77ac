"""CAMs, pseudo masks and their evaluation over a split, for a trained run folder.

A run folder (``train.out_dir``) holds ``config.yaml`` and ``ckpt_<step>.pt``; these functions
load the newest checkpoint and work on one split of ``cfg.data`` (``cfg.eval.split`` unless told
otherwise). Outputs go under ``<run>/infer_<split>/`` by default:

* ``cams/<name>.npy`` — ``{"keys": present class ids, "cam": [K, H, W] float32}`` per image
  (:func:`wsss_fast.eval.save_cam`), the method's evaluation CAMs;
* ``pseudo/<name>.png`` — palette PNG pseudo masks, by the method's rule
  (``method.pseudo_masks``; AReAM: the CAMs against a constant background score
  ``cfg.eval.bg_threshold``, refined with ``par``, argmax);
* ``metrics.json`` — ``cam_miou`` (CAM labels at ``cfg.eval.bg_threshold``, one confusion
  matrix over the split, no threshold sweep), ``pseudo_miou`` when pseudo masks exist, and the
  full :meth:`ConfusionMatrix.summary` of each;
* ``overlays/<name>.png`` — ``image | CAM | pseudo | ground truth`` panels for a few images.
* ``seg/<name>.png``, ``seg_metrics.json`` — masks from a method's segmentation head
  (``method.segment``; GETAM) and their mIoU (:func:`segment_split`).

Under ``torchrun`` the ``cam`` and ``pseudo`` commands split the images over the ranks
(:func:`shard`, each rank writing its own files); ``eval`` reads them all on rank 0.

The CAMs and pseudo masks come from the method object (``method.cams``, ``method.pseudo_masks``;
see :mod:`wsss_fast.methods`), so every registered method runs through the same functions.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

import wsss_fast
from wsss_fast.data import build_dataset, make_synthetic
from wsss_fast.data.io import atomic_write_bytes
from wsss_fast.data.voc import read_metadata
from wsss_fast.engine.checkpoint import latest_checkpoint, load_checkpoint
from wsss_fast.engine.config import Config, ConfigError, load_config
from wsss_fast.eval import (
    ConfusionMatrix,
    cam_to_label,
    load_cam,
    load_mask_png,
    save_cam,
    save_mask_png,
    save_panel,
)

__all__ = [
    "build_method",
    "default_infer_dir",
    "ensure_data",
    "eval_dataset",
    "evaluate",
    "infer_split",
    "load_run",
    "make_cams",
    "make_pseudo",
    "resolve_device",
    "shard",
]


def build_method(cfg: Config):
    """The method object ``cfg.method`` names, built with its config section."""
    from wsss_fast.methods import METHODS, method_class

    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r}; expected one of {sorted(METHODS)}")
    return method_class(cfg.method)(cfg.sections[cfg.method])


def _num_classes(cfg: Config) -> int:
    section = cfg.sections.get(cfg.method)
    return int(getattr(section, "num_classes", cfg.model.num_classes))


def ensure_data(cfg: Config, *, progress: bool = True) -> Path:
    """For ``data.kind: synthetic``, generate the set under ``data.root`` when the root holds no
    data set yet (with the method's number of classes and ``data.synthetic``); other kinds are
    left as they are.

    An existing synthetic root is used as it is (never regenerated, so nothing is deleted); when
    it was made with other generator arguments than the config asks for, a warning says so.
    """
    import warnings

    from wsss_fast.data.synthetic import synthetic_params

    root = Path(cfg.data.root)
    if cfg.data.kind != "synthetic":
        return root
    kwargs = {"num_classes": _num_classes(cfg), "seed": cfg.data.seed, **cfg.data.synthetic}
    meta = read_metadata(root) or {}
    if meta.get("name") != "synthetic":
        make_synthetic(root, **kwargs, progress=progress)
    elif meta.get("generator") != (wanted := synthetic_params(**kwargs)):
        warnings.warn(
            f"the synthetic data set under {root} was generated with {meta.get('generator')}, "
            f"not with what the config asks for ({wanted}); it is used as it "
            "is. Delete the folder (or set data.root to a new one) to generate the config's set.",
            stacklevel=2,
        )
    return root


def check_classes(cfg: Config, dataset) -> None:
    """Raise ConfigError when the data set's class count differs from the method's."""
    want = _num_classes(cfg)
    if dataset.num_classes != want:
        raise ConfigError(
            f"{cfg.method}.num_classes={want} but the data set under {cfg.data.root} has "
            f"{dataset.num_classes} classes; set {cfg.method}.num_classes={dataset.num_classes}"
        )


def resolve_device(cfg: Config) -> torch.device:
    d = cfg.train.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(d)


def _backend(cfg: Config):
    return (
        wsss_fast.use_backend(cfg.model.backend) if cfg.model.backend else contextlib.nullcontext()
    )


def load_run(run_dir: str | Path, overrides=()) -> tuple[Config, object, nn.Module, Path]:
    """``(cfg, method, model, checkpoint)`` of a run folder: its saved config (with
    ``overrides`` applied) and the model of its newest checkpoint, in eval mode on the CPU."""
    from wsss_fast.methods import register_all

    register_all()
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no config.yaml in it")
    cfg = load_config(cfg_path, overrides)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (ckpt_<step>.pt); train first")
    method = build_method(cfg)
    model = method.build_model(cfg)
    model.load_state_dict(load_checkpoint(ckpt, map_location="cpu")["model"])
    model.eval()
    return cfg, method, model, ckpt


def default_infer_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"infer_{split}"


def eval_dataset(cfg: Config, split: str, *, with_mask: bool | None = None, normalize=True):
    """Split ``split`` of ``cfg.data`` as stored (no augmentation), with masks when present."""
    ds = build_dataset(
        cfg.data.kind,
        cfg.data.root,
        split,
        transform=None,
        with_mask=with_mask,
        normalize=normalize,
    )
    check_classes(cfg, ds)
    return ds


def _present(label: torch.Tensor) -> torch.Tensor:
    """0-based indices of the present classes of a ``[C]`` multi-hot."""
    return torch.nonzero(label > 0).flatten()


def shard(n: int, rank: int = 0, world_size: int = 1) -> range:
    """The sample indices rank ``rank`` of ``world_size`` handles: ``rank, rank + world, ...``
    (every index exactly once over the ranks; each rank writes its own files)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return range(rank, n, world_size)


def make_cams(
    cfg: Config,
    model: nn.Module,
    dataset,
    out_dir: str | Path,
    *,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Write ``out_dir/cams/<name>.npy`` (the present classes' CAMs from ``method.cams``) for
    the images of ``dataset`` (normalised, no augmentation) in this rank's :func:`shard`;
    returns how many it wrote."""
    from tqdm.auto import tqdm

    method = build_method(cfg)
    device = resolve_device(cfg)
    model = model.to(device).eval()
    cam_dir = Path(out_dir) / "cams"
    todo = shard(len(dataset), rank, world_size)
    with _backend(cfg):
        for i in tqdm(todo, desc="CAMs", disable=not progress or rank != 0):
            s = dataset[i]
            label = s["label"].float()
            image = s["image"][None].to(device)
            cam = method.cams(model, image, label[None].to(device), cfg.eval)[0].float().cpu()
            idx = _present(label)
            save_cam(cam_dir / f"{s['name']}.npy", cam[idx], (idx + 1).numpy())
    return len(todo)


def _full_cam(record: dict, num_classes: int, shape) -> torch.Tensor:
    full = torch.zeros((num_classes, *shape), dtype=torch.float32)
    keys = torch.as_tensor(record["keys"]).long()
    if keys.numel():
        full[keys - 1] = torch.as_tensor(np.asarray(record["cam"], np.float32))
    return full


def make_pseudo(
    cfg: Config,
    dataset,
    out_dir: str | Path,
    *,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Write ``out_dir/pseudo/<name>.png`` from the CAMs in ``out_dir/cams`` (run
    :func:`make_cams` first) by the method's rule (``method.pseudo_masks``), for this rank's
    :func:`shard`. ``dataset`` must give un-normalised images
    (``eval_dataset(..., normalize=False)``). Returns how many it wrote."""
    from tqdm.auto import tqdm

    method = build_method(cfg)
    out_dir = Path(out_dir)
    C = _num_classes(cfg)
    device = resolve_device(cfg)
    todo = shard(len(dataset), rank, world_size)
    with _backend(cfg):
        for i in tqdm(todo, desc="pseudo masks", disable=not progress or rank != 0):
            s = dataset[i]
            path = out_dir / "cams" / f"{s['name']}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: make the CAMs first (wsss-fast cam)")
            image01 = s["image"].float()
            cam = _full_cam(load_cam(path), C, image01.shape[-2:])
            label = s["label"].float()
            mask = method.pseudo_masks(
                cam[None].to(device), image01[None].to(device), label[None].to(device), cfg.eval
            )[0]
            save_mask_png(out_dir / "pseudo" / f"{s['name']}.png", mask.cpu().numpy())
    return len(todo)


def evaluate(
    cfg: Config,
    dataset,
    out_dir: str | Path,
    *,
    num_overlays: int = 4,
    extra: dict | None = None,
) -> dict:
    """mIoU of the CAMs (and pseudo masks, when ``out_dir/pseudo`` exists) against the ground
    truth of ``dataset`` (un-normalised, with masks); writes ``out_dir/metrics.json`` and
    ``num_overlays`` panels in ``out_dir/overlays``. Returns the metrics dict."""
    out_dir = Path(out_dir)
    if not dataset.with_mask:
        raise FileNotFoundError(
            f"split {dataset.split!r} under {dataset.root} has no ground-truth masks to evaluate"
        )
    names = dataset.class_names
    K = len(names)
    cam_cm = ConfusionMatrix(K, 255, names)
    has_pseudo = (out_dir / "pseudo").is_dir()
    pseudo_cm = ConfusionMatrix(K, 255, names) if has_pseudo else None
    t = cfg.eval.bg_threshold
    for i in range(len(dataset)):
        s = dataset[i]
        name = s["name"]
        cam_path = out_dir / "cams" / f"{name}.npy"
        if not cam_path.is_file():
            raise FileNotFoundError(f"{cam_path} is missing: make the CAMs first (wsss-fast cam)")
        rec = load_cam(cam_path)
        gt = s["mask"].numpy()
        cam_cm.update(cam_to_label(rec["cam"].astype(np.float32), rec["keys"], t), gt)
        pseudo = None
        if has_pseudo:
            p_path = out_dir / "pseudo" / f"{name}.png"
            if not p_path.is_file():
                raise FileNotFoundError(f"{p_path} is missing: run wsss-fast pseudo again")
            pseudo = load_mask_png(p_path)
            pseudo_cm.update(pseudo, gt)
        if i < num_overlays:
            image = (s["image"].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            cam = rec["cam"].max(0) if rec["cam"].shape[0] else np.zeros(gt.shape, np.float32)
            save_panel(
                out_dir / "overlays" / f"{name}.png",
                image,
                cam.astype(np.float32),
                pseudo,
                gt,
                class_names=names,
            )
    cam_sum = cam_cm.summary()
    metrics = {
        "method": cfg.method,
        "split": dataset.split,
        "images": len(dataset),
        "bg_threshold": t,
        "cam_miou": cam_sum["miou"],
    }
    if pseudo_cm is not None:
        metrics["pseudo_miou"] = pseudo_cm.summary()["miou"]
    metrics.update(extra or {})
    metrics["cam"] = {k: v for k, v in cam_sum.items() if k != "table"}
    if pseudo_cm is not None:
        metrics["pseudo"] = {k: v for k, v in pseudo_cm.summary().items() if k != "table"}
    atomic_write_bytes(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    metrics["_tables"] = {"cam": cam_sum["table"]}
    if pseudo_cm is not None:
        metrics["_tables"]["pseudo"] = pseudo_cm.summary()["table"]
    return metrics


class NoSegmentationHeadError(ValueError):
    """The run's method has no segmentation head (``method.segment``)."""


def segment_split(
    cfg: Config, model: nn.Module, dataset, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Masks from the method's segmentation head (``method.segment``, GETAM's decoder) for the
    images of ``dataset`` (normalised; with ground truth when it has masks): writes
    ``out_dir/seg/<name>.png`` and ``out_dir/seg_metrics.json``. Returns the metrics dict
    (``seg_miou`` None without ground truth; ``_table`` the per-class table)."""
    from tqdm.auto import tqdm

    method = build_method(cfg)
    if not callable(getattr(method, "segment", None)):
        raise NoSegmentationHeadError(
            f"method {cfg.method!r} has no segmentation head: its masks come from its CAMs "
            "(wsss-fast cam, then pseudo)"
        )
    out_dir = Path(out_dir)
    device = resolve_device(cfg)
    model = model.to(device).eval()
    names = dataset.class_names
    cm = ConfusionMatrix(len(names), 255, names) if dataset.with_mask else None
    with _backend(cfg):
        for i in tqdm(range(len(dataset)), desc="segmentation", disable=not progress):
            s = dataset[i]
            probs = method.segment(model, s["image"][None].to(device))[0]
            mask = probs.argmax(0).cpu().numpy()
            save_mask_png(out_dir / "seg" / f"{s['name']}.png", mask)
            if cm is not None:
                cm.update(mask, s["mask"].numpy())
    summary = cm.summary() if cm is not None else None
    metrics = {
        "method": cfg.method,
        "split": dataset.split,
        "images": len(dataset),
        "seg_miou": summary["miou"] if summary else None,
    }
    if summary:
        metrics["seg"] = {k: v for k, v in summary.items() if k != "table"}
    atomic_write_bytes(out_dir / "seg_metrics.json", json.dumps(metrics, indent=2).encode())
    metrics["_table"] = summary["table"] if summary else None
    return metrics


def infer_split(
    cfg: Config,
    model: nn.Module,
    split: str,
    out_dir: str | Path,
    *,
    pseudo: bool = True,
    num_overlays: int = 4,
    progress: bool = True,
) -> dict:
    """CAMs, pseudo masks (optional) and evaluation of one split: the ``demo`` pipeline."""
    make_cams(cfg, model, eval_dataset(cfg, split, with_mask=False), out_dir, progress=progress)
    if pseudo:
        make_pseudo(
            cfg,
            eval_dataset(cfg, split, with_mask=False, normalize=False),
            out_dir,
            progress=progress,
        )
    return evaluate(
        cfg,
        eval_dataset(cfg, split, with_mask=True, normalize=False),
        out_dir,
        num_overlays=num_overlays,
    )
