"""The one training loop every method runs through.

A method supplies the model and the losses (:class:`Method`); :func:`train` does the rest:
data loading with a (distributed) sampler reseeded per epoch, AdamW/SGD with a per-iteration
warm-up + cosine/poly schedule, bf16 autocast on CUDA, gradient accumulation and clipping,
DistributedDataParallel under ``torchrun``, a tqdm bar and a log line on rank 0, checkpoints
every N steps and at the end, and exact resume (also from the middle of an epoch).

Determinism: the sample order of epoch ``e`` is a function of ``(data.seed, e)`` alone, and
augmentation of ``(data.seed, e, index)`` (``set_epoch`` on sampler and data set); the DataLoader
draws its worker seed from its own generator, never from the global RNG; the global RNG states
(Python, numpy, torch, CUDA) of every rank go into the checkpoint. So a resumed run skips the
micro-batches its epoch already consumed and continues bit-for-bit, given deterministic kernels.

Logging: every ``train.log_every`` steps a line with the loss terms (averaged over the steps
since the last line and over ranks), lr, it/s and peak memory (CUDA ``max_memory_allocated``,
or the process's peak RSS on CPU) goes to stdout and ``<out_dir>/log.txt``. TensorBoard scalars
are written too when ``train.tensorboard`` and ``torch.utils.tensorboard`` imports (it needs the
``tensorboard`` package, ``pip install wsss_fast[tb]``; without it they are skipped silently), and
every ``train.image_every`` steps an ``image | CAM | pseudo mask`` grid of the batch when the method
has ``preview(model, batch) -> {"image": [N,3,H,W] in [0,1], "cam": [N,H,W], "pseudo": [N,H,W]}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import wsss_fast
from wsss_fast.data import build_dataset, collate
from wsss_fast.data.transforms import timm_train_transform, train_transform
from wsss_fast.engine import checkpoint as ckpt
from wsss_fast.engine import distributed
from wsss_fast.engine.config import Config, config_to_dict, config_to_yaml, save_config
from wsss_fast.engine.schedule import build_optimizer, build_scheduler

__all__ = [
    "Method",
    "StepInfo",
    "TrainResult",
    "build_train_dataset",
    "optimizer_step",
    "train",
]


@dataclass
class StepInfo:
    """Where the loop stands, handed to ``training_step`` and to callbacks."""

    step: int
    """Optimizer steps completed before this one (after it, in callbacks)."""
    epoch: int
    micro_step: int
    """Index of the micro-batch inside gradient accumulation (0 .. accum_steps - 1)."""
    total_steps: int
    steps_per_epoch: int
    cfg: Config
    dist: distributed.DistInfo

    @property
    def device(self) -> torch.device:
        return self.dist.device


@runtime_checkable
class Method(Protocol):
    """What a method gives the loop. ``param_groups(model, cfg)`` is optional: without it every
    parameter that requires grad is optimised with the config's lr and weight decay (a group may
    set its own ``lr``, e.g. 10x for new heads). ``lr_factor(step, total_steps) -> float`` is
    optional too: it multiplies the schedule's lr at every step (e.g. GETAM's one tenth in its
    second phase); it must be a pure function of its arguments, so resume stays exact.

    ``training_step(model, batch, info)`` returns a dict of scalar tensors that includes
    ``"loss"`` (what is backpropagated); the other entries are logged. ``model`` may be wrapped in
    DistributedDataParallel: call it (``model(x)``) rather than reaching into its submodules for
    the forward, so gradients are synchronised; ``batch`` is already on the device.
    """

    def build_model(self, cfg: Config) -> nn.Module: ...

    def training_step(self, model: nn.Module, batch: dict, info: StepInfo) -> dict: ...


@dataclass
class TrainResult:
    model: nn.Module
    """The trained model (not the DDP wrapper)."""
    step: int
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per log line: ``step``, the loss terms, ``lr``."""


class _SkipSampler(Sampler):
    """The first ``skip`` indices of ``sampler`` left out: the part of an epoch a resumed run has
    already trained on."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def build_train_dataset(cfg: Config) -> Dataset:
    """The training split of ``cfg.data`` with its augmentation."""
    d = cfg.data
    transform = {
        "train": lambda: train_transform(
            d.crop_size,
            scale_range=tuple(d.scale_range),
            resize_long=None if d.resize_long is None else tuple(d.resize_long),
            jitter=(0.4, 0.4, 0.2, 0.1) if d.color_jitter else None,
        ),
        "timm": lambda: timm_train_transform(d.crop_size),
        "none": lambda: None,
    }[d.augment]()
    return build_dataset(
        d.kind,
        d.root,
        d.train_split,
        transform=transform,
        with_mask=False,
        seed=d.seed,
        saliency_dir=d.saliency_dir,
    )


def _peak_memory(device: torch.device) -> float:
    """Peak bytes: CUDA allocations on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:
        return float("nan")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global state third-party code uses)
    torch.manual_seed(seed)


class _Logger:
    """Rank 0's log line, log file and optional TensorBoard writer; silent on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.path, self.writer = enabled, run_dir / "log.txt", None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.writer = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        tqdm.write(text)
        with open(self.path, "a") as f:
            f.write(text + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def preview(self, method, model: nn.Module, batch: dict, step: int) -> None:
        """The method's ``preview`` of ``batch`` as an image grid (TensorBoard ``preview``)."""
        if self.writer is None or not hasattr(method, "preview"):
            return
        from wsss_fast.eval.overlay import preview_grid

        with torch.no_grad():
            shown = method.preview(model, batch)

        def numpy(key):
            v = shown.get(key)
            return None if v is None else v.detach().float().cpu().numpy()

        grid = preview_grid(numpy("image"), numpy("cam"), shown.get("pseudo"))
        self.writer.add_image("preview", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def optimizer_step(
    method: Method,
    model: nn.Module,
    raw_model: nn.Module,
    batches: Iterator[dict],
    optimizer: torch.optim.Optimizer,
    info: StepInfo,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One optimizer step: ``optim.accum_steps`` micro-batches (drawn from ``batches``, already on
    the device) through the method's ``training_step`` under ``autocast()``, backward, clipping,
    the optimizer update and ``zero_grad``.

    The loop calls it for every step and ``wsss_fast.memory`` for the one step it counts, so the
    counted step is the trained one. ``model`` may be the DDP wrapper of ``raw_model``; gradients
    are all-reduced on the last micro-batch only. Returns this rank's loss terms of the step
    (detached, averaged over the micro-batches, plus ``grad_norm`` when clipping) and the last
    micro-batch. Nothing here reads a tensor's value on the host, except the fp16 loss scaler's
    check for infinite gradients.
    """
    o = info.cfg.optim
    step_terms: dict[str, torch.Tensor] = {}
    batch: dict = {}
    for micro in range(o.accum_steps):
        batch = next(batches)
        micro_info = dataclasses.replace(info, micro_step=micro)
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = not info.dist.distributed or micro == o.accum_steps - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast():
                terms = method.training_step(model, batch, micro_info)
            if "loss" not in terms:
                raise KeyError(f"training_step returned {sorted(terms)}; it must include 'loss'")
            # Mean over the accumulated micro-batches, as one batch of their union.
            loss = terms["loss"] / o.accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in terms.items():
            v = v.detach().float() / o.accum_steps
            step_terms[k] = step_terms[k] + v if k in step_terms else v
    if scaler is not None:
        scaler.unscale_(optimizer)
    if o.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), o.grad_clip)
        step_terms["grad_norm"] = gnorm.detach().float()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_terms, batch


def train(
    cfg: Config,
    method: Method,
    dataset: Dataset | None = None,
    *,
    callbacks: Sequence[Callable[[StepInfo, dict[str, float]], Any]] = (),
) -> TrainResult:
    """Train ``method`` as ``cfg`` says; returns the model, the step reached and the log history.

    Args:
        cfg: the run config (:func:`~wsss_fast.engine.config.load_config`).
        method: a :class:`Method`.
        dataset: the training data set (samples are dicts batched by
            :func:`wsss_fast.data.collate`); None builds it from ``cfg.data``. A ``set_epoch``
            method, when present, is called at the start of every epoch.
        callbacks: ``cb(info, metrics)`` after every optimizer step (and after that step's
            checkpoint); ``metrics`` holds this rank's loss terms of the step as floats. An
            exception raised by a callback ends the run as a crash would (tests use this to
            "kill" a run).

    The run folder ``train.out_dir`` receives ``config.yaml``, ``log.txt`` and
    ``ckpt_<step>.pt`` (the newest ``train.keep_last``). With ``train.resume`` and a checkpoint
    there, training continues from it. Under ``torchrun`` every rank calls ``train``.
    """
    info = distributed.setup(cfg.train.device)
    try:
        backend = wsss_fast.use_backend(cfg.model.backend) if cfg.model.backend else None
        with backend or contextlib.nullcontext():
            return _train(cfg, method, dataset, callbacks, info)
    finally:
        distributed.teardown(info)


def _train(cfg, method, dataset, callbacks, info: distributed.DistInfo) -> TrainResult:
    t, d, o = cfg.train, cfg.data, cfg.optim
    device = info.device
    run_dir = Path(t.out_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = _Logger(run_dir, info.is_main, t.tensorboard)

    # Same seed on every rank for the model's initial weights; then a per-rank seed so dropout
    # and other random ops differ between ranks.
    _seed_all(t.seed)
    if dataset is None:
        dataset = build_train_dataset(cfg)
    raw_model = method.build_model(cfg).to(device)
    _seed_all(t.seed + info.rank)

    # drop_last everywhere: every epoch has the same number of full batches on every rank, so
    # "step" alone says where in the data a run is.
    sampler = DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=d.seed,
        drop_last=True,
    )
    steps_per_epoch = len(sampler) // d.batch_size // o.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} samples give no full optimizer step per epoch with batch_size="
            f"{d.batch_size}, accum_steps={o.accum_steps} and {info.world_size} process(es); "
            "lower data.batch_size or optim.accum_steps"
        )
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch

    model = raw_model
    if info.distributed:
        model = DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if hasattr(method, "param_groups"):
        params = method.param_groups(raw_model, cfg)
    else:
        params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(o, params)
    scheduler = build_scheduler(
        cfg.schedule,
        optimizer,
        total_steps,
        steps_per_epoch,
        lr_factor=getattr(method, "lr_factor", None),
    )
    on_cuda = device.type == "cuda"
    use_amp = on_cuda and t.precision != "fp32"
    amp_dtype = torch.float16 if t.precision == "fp16" else torch.bfloat16
    # bf16 keeps fp32's exponent range and needs no loss scaling; fp16 does.
    scaler = torch.amp.GradScaler("cuda") if use_amp and t.precision == "fp16" else None

    step = 0
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not t.resume:
        # Starting over beside old checkpoints would mix two runs' files, and the old ones (with
        # larger step numbers) would win the keep-last rotation and a later auto-resume.
        raise FileExistsError(
            f"{run_dir} holds checkpoints of an earlier run (newest {latest.name}) and "
            "train.resume=false: choose another train.out_dir or remove them"
        )
    # Where a step is in the data: resuming under another layout would skip the wrong samples.
    # (A new length, train.epochs or train.max_steps, is allowed: the schedule follows it.)
    layout = {
        "world_size": info.world_size,
        "data.batch_size": d.batch_size,
        "optim.accum_steps": o.accum_steps,
        "steps_per_epoch": steps_per_epoch,
    }
    if latest is not None:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = ckpt.load_checkpoint(latest, map_location="cpu")
        saved = state.get("layout")  # absent in checkpoints written before it was recorded
        if saved is not None and saved != layout:
            diff = ", ".join(
                f"{k} {saved.get(k)} -> {v}" for k, v in layout.items() if saved.get(k) != v
            )
            raise ValueError(
                f"cannot resume {latest}: it was written with another step layout ({diff}). "
                "Resume with the same number of processes, data.batch_size, optim.accum_steps "
                "and data set, or start a new train.out_dir"
            )
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        step = state["step"]
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
        log.line(f"resumed from {latest} at step {step}")
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.line(f"config:\n{config_to_yaml(cfg)}")
        log.line(
            f"{len(dataset)} samples, {steps_per_epoch} steps per epoch, {total_steps} steps, "
            f"device {device}, {info.world_size} process(es)"
        )

    def save(step: int) -> None:
        rng = ckpt.rng_state()
        rngs = [rng]
        if info.distributed:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)
        if not info.is_main:
            return
        state = {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "epoch": step // steps_per_epoch,
            "batch_in_epoch": (step % steps_per_epoch) * o.accum_steps,
            "rng": rngs,
            "layout": layout,
            "config": config_to_dict(cfg),
        }
        ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, step), state)
        ckpt.prune_checkpoints(run_dir, t.keep_last)

    history: list[dict[str, float]] = []
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (info.is_main and t.progress),
        dynamic_ncols=True,
    )
    sums: dict[str, torch.Tensor] = {}
    logged_steps, last_time = 0, time.perf_counter()
    model.train()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            done_in_epoch = step - epoch * steps_per_epoch
            loader = DataLoader(
                dataset,
                batch_size=d.batch_size,
                sampler=_SkipSampler(sampler, done_in_epoch * o.accum_steps * d.batch_size),
                num_workers=d.num_workers,
                collate_fn=collate,
                drop_last=True,
                pin_memory=on_cuda,
                # Its own generator: creating the iterator must not advance the global RNG,
                # or a run resumed mid-epoch would draw different dropout masks.
                generator=torch.Generator().manual_seed(d.seed + epoch),
            )
            batches = (_to_device(b, device) for b in loader)
            for _ in range(min(steps_per_epoch - done_in_epoch, total_steps - step)):
                lr = optimizer.param_groups[0]["lr"]
                step_info = StepInfo(step, epoch, 0, total_steps, steps_per_epoch, cfg, info)
                step_terms, batch = optimizer_step(
                    method,
                    model,
                    raw_model,
                    batches,
                    optimizer,
                    step_info,
                    autocast=lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp),
                    scaler=scaler,
                )
                scheduler.step()
                step += 1
                bar.update(1)
                for k, v in step_terms.items():
                    sums[k] = sums[k] + v if k in sums else v
                logged_steps += 1

                if step % t.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    means = {k: float(v) / logged_steps for k, v in sums.items()}
                    means = distributed.all_reduce_mean(means, info)
                    rate = logged_steps / max(now - last_time, 1e-9)
                    mem = _peak_memory(device)
                    terms_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    log.line(
                        f"step {step}/{total_steps} epoch {epoch} | {terms_text} | lr {lr:.3e}"
                        f" | {rate:.2f} it/s | peak mem {mem / 2**30:.2f} GiB"
                    )
                    history.append({"step": step, **means, "lr": lr})
                    log.scalars({**{f"train/{k}": v for k, v in means.items()}, "lr": lr}, step)
                    sums, logged_steps, last_time = {}, 0, now
                if t.image_every > 0 and step % t.image_every == 0:
                    log.preview(method, raw_model, batch, step)

                if (t.ckpt_every > 0 and step % t.ckpt_every == 0) or step == total_steps:
                    save(step)
                if callbacks:
                    done = StepInfo(
                        step, epoch, o.accum_steps - 1, total_steps, steps_per_epoch, cfg, info
                    )
                    metrics = {k: float(v) for k, v in step_terms.items()}
                    for cb in callbacks:
                        cb(done, metrics)
    finally:
        bar.close()
        log.close()
    if info.distributed:
        dist.barrier()
    return TrainResult(raw_model, step, run_dir, history)
