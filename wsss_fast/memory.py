"""Device memory of one training step, counted exactly without a device (``wsss-fast memory``).

The step of a config runs on ``meta`` tensors (shapes and dtypes, no data, no GPU) through the
code a GPU would run: the engine's :func:`~wsss_fast.engine.loop.optimizer_step`, the method's own
``training_step``, backward, clipping and the optimizer update with its state. Ops take the
backend ``auto`` would take on a CUDA device (the fused Triton / CUDA ops run as their fake
kernels, which allocate exactly the outputs of the real ones), and bf16 / fp16 autocast follows
the CUDA autocast op lists (:class:`EmulatedAutocast`).

:class:`StorageCounter` sees every allocation and every free: each storage is counted once, when
it is created, at its size rounded up to the CUDA caching allocator's 512-byte blocks, and
uncounted when the storage itself dies, so views and in-place ops add nothing and a storage kept
alive by a view or by autograd stays counted. The peak is comparable to
``torch.cuda.max_memory_allocated`` of the same step (what is not counted: cuBLAS / cuDNN
workspaces, scratch that a fused kernel's launcher frees before returning, the CUDA context).

At the peak the live bytes are split into ``parameters`` (and buffers), ``gradients``,
``optimizer`` (state), ``saved`` (tensors autograd holds for backward), ``batch`` and ``other``
(every other transient), first match in that order.

Example::

    report = count_step(load_config("configs/aream_voc.yaml"), crop=448, batch=8)
    print(report.peak_bytes / 2**30, report.breakdown)
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wsss_fast import _backend

__all__ = [
    "CATEGORIES",
    "EmulatedAutocast",
    "MemoryCountError",
    "MemoryReport",
    "StorageCounter",
    "count_step",
    "cuda_peak",
    "fit",
    "format_bytes",
    "format_fit",
    "format_report",
    "largest_crop",
    "largest_fit",
    "parse_size",
]

BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of 512 bytes."""

CATEGORIES = ("parameters", "gradients", "optimizer", "saved", "batch", "other")


class MemoryCountError(ValueError):
    """A step that cannot be counted as asked; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# The counter


class StorageCounter(TorchDispatchMode):
    """Counts the live storages of ``device`` (``"meta"`` by default) while it is active.

    Tensors that exist before (parameters, the batch) are added with :meth:`track`. Every op's
    outputs are inspected; a storage not seen before is an allocation, and a ``weakref`` finalizer
    on the storage records its release. The event log keeps the order of allocations and
    releases, so the live set at the peak is rebuilt afterwards (:meth:`live_at_peak`) instead of
    being copied at every new maximum.
    """

    def __init__(self, device: str | torch.device = "meta", *, block: int = BLOCK):
        super().__init__()
        self.device = torch.device(device)
        self.block = block
        self.live: dict[int, int] = {}  # allocation id -> bytes
        self.ids: dict[int, int] = {}  # address of a live StorageImpl -> its allocation id
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes / -bytes)
        self.current = 0
        self.peak = 0
        self.peak_event = 0
        self.tags: dict[int, str] = {}
        self.op = "before the step"
        self.origin: dict[int, str] = {}  # allocation id -> the op that allocated it
        self.peak_op = self.op

    def _size(self, storage) -> int:
        n = storage.nbytes()
        return -(-n // self.block) * self.block

    def _release(self, address: int, key: int) -> None:
        # A later storage may reuse the address: it gets a new allocation id.
        if self.ids.get(address) == key:
            del self.ids[address]
        size = self.live.pop(key, None)
        if size is not None:
            self.current -= size
            self.events.append((key, -size))

    def _see(self, t: torch.Tensor) -> None:
        if t.device.type != self.device.type:
            return
        storage = t.untyped_storage()
        address = storage._cdata
        size = self._size(storage)
        key = self.ids.get(address)
        old = None if key is None else self.live.get(key)
        if old == size:
            return
        if old is None:
            key = self.ids[address] = len(self.events)
            self.origin[key] = self.op
            weakref.finalize(storage, self._release, address, key)
            self.live[key] = size
            delta = size
        else:  # resized in place (resize_, out= arguments)
            self.live[key] = size
            delta = size - old
        self.current += delta
        self.events.append((key, delta))
        if self.current > self.peak:
            self.peak, self.peak_event, self.peak_op = self.current, len(self.events), self.op

    def track(self, tensors, tag: str | None = None) -> None:
        """Count tensors that already exist (and tag their storages, e.g. ``"parameters"``)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._see(t)
                if tag is not None:
                    self.tag(t, tag)

    def tag(self, t: torch.Tensor, tag: str) -> None:
        """Attribute ``t``'s storage to ``tag`` (the first tag of a storage wins)."""
        if t.device.type == self.device.type:
            key = self.ids.get(t.untyped_storage()._cdata)
            if key is not None:
                self.tags.setdefault(key, tag)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak, self.peak_event, self.peak_op = self.current, len(self.events), "before the step"

    def live_at_peak(self) -> dict[int, int]:
        """Allocation id -> bytes of everything live at the peak."""
        live: dict[int, int] = {}
        for key, delta in self.events[: self.peak_event]:
            size = live.get(key, 0) + delta
            if size > 0:
                live[key] = size
            else:
                live.pop(key, None)
        return live

    def by_op_at_peak(self, live: dict[int, int] | None = None) -> dict[str, int]:
        """Bytes live at the peak (``live``: :meth:`live_at_peak`, if already at hand), by the op
        that allocated them, largest first."""
        out: dict[str, int] = {}
        for key, size in (self.live_at_peak() if live is None else live).items():
            op = self.origin.get(key, "?")
            out[op] = out.get(op, 0) + size
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.op = str(func)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out


# ---------------------------------------------------------------------------------------------
# CUDA autocast, for meta tensors

# CUDA autocast's lists (AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, ..._SET_OPT_DTYPE and
# AT_FORALL_PROMOTE in ATen/autocast_mode.h), at the level of the torch functions the methods call.
# Ops that are not listed run in their inputs' dtype, as under autocast.
_LOWER = (
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.prelu,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.mm,
    torch.mv,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    torch.addmv,
    torch.addr,
    torch.addbmm,
    torch.einsum,
    torch.chain_matmul,
    torch.linalg.multi_dot,
    torch.linalg.vecdot,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.Tensor.mm,
    torch.Tensor.mv,
    torch.Tensor.bmm,
    torch.Tensor.baddbmm,
    torch.Tensor.addmm,
    torch.Tensor.addmv,
    torch.Tensor.addbmm,
)
_FP32 = (
    F.softmax,
    F.log_softmax,
    F.softmin,
    F.layer_norm,
    F.group_norm,
    F.rms_norm,
    F.upsample,
    F.upsample_nearest,
    F.upsample_bilinear,
    F.normalize,
    F.softplus,
    F.cross_entropy,
    F.nll_loss,
    F.binary_cross_entropy_with_logits,
    F.kl_div,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.mse_loss,
    F.margin_ranking_loss,
    F.multilabel_margin_loss,
    F.soft_margin_loss,
    F.multi_margin_loss,
    F.triplet_margin_loss,
    F.hinge_embedding_loss,
    F.poisson_nll_loss,
    F.cosine_embedding_loss,
    F.cosine_similarity,
    F.pdist,
    torch.cdist,
    torch.dist,
    torch.renorm,
    torch.softmax,
    torch.log_softmax,
    torch.logsumexp,
    torch.sum,
    torch.prod,
    torch.cumsum,
    torch.cumprod,
    torch.norm,
    torch.linalg.vector_norm,
    torch.linalg.matrix_norm,
    torch.exp,
    torch.expm1,
    torch.log,
    torch.log10,
    torch.log2,
    torch.log1p,
    torch.reciprocal,
    torch.rsqrt,
    torch.pow,
    torch.acos,
    torch.asin,
    torch.cosh,
    torch.sinh,
    torch.tan,
    torch.erfinv,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    torch.Tensor.logsumexp,
    torch.Tensor.sum,
    torch.Tensor.prod,
    torch.Tensor.cumsum,
    torch.Tensor.cumprod,
    torch.Tensor.norm,
    torch.Tensor.exp,
    torch.Tensor.expm1,
    torch.Tensor.log,
    torch.Tensor.log10,
    torch.Tensor.log2,
    torch.Tensor.log1p,
    torch.Tensor.reciprocal,
    torch.Tensor.rsqrt,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    torch.Tensor.__rpow__,
    torch.Tensor.acos,
    torch.Tensor.asin,
    torch.Tensor.cosh,
    torch.Tensor.sinh,
    torch.Tensor.tan,
    torch.Tensor.erfinv,
    torch.Tensor.renorm,
)
_PROMOTE = (
    torch.cat,
    torch.stack,
    torch.addcdiv,
    torch.addcmul,
    torch.atan2,
    torch.dot,
    torch.vdot,
    torch.cross,
    torch.tensordot,
    torch.scatter_add,
    torch.Tensor.scatter_add,
    F.bilinear,
    F.grid_sample,
)


def _interp_mode(args, kwargs) -> str:
    return kwargs.get("mode", args[3] if len(args) > 3 else "nearest")


class EmulatedAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` for tensors of ``device`` (meta), where autocast itself
    does nothing: matmul-like ops cast their floating inputs to ``dtype``, the ops CUDA autocast
    runs in float32 cast them to float32, ``cat`` / ``stack`` take the widest input dtype.
    Casts of leaf tensors that require grad (the weights) made with grad enabled are cached for
    the region, as autocast's ``cache_enabled`` does (a cast made under ``no_grad`` is not kept:
    reused later it would cut the weights out of the graph). Calls nested inside a Python-level
    function (a loss written in Python) run uncast; the methods call the listed functions
    directly.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, device: str = "meta"):
        super().__init__()
        self.dtype, self.device_type = dtype, device
        self._lower = frozenset(_LOWER)
        self._fp32 = frozenset(_FP32)
        self._promote = frozenset(_PROMOTE)
        self._cache: dict[int, torch.Tensor] = {}

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)

    def _eligible(self, t: object) -> bool:
        return (
            isinstance(t, torch.Tensor)
            and t.device.type == self.device_type
            and t.is_floating_point()
            and t.dtype != torch.float64
        )

    def _cast(self, value, dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not self._eligible(value) or value.dtype == dtype:
            return value
        if value.is_leaf and value.requires_grad and torch.is_grad_enabled():
            cached = self._cache.get(id(value))
            if cached is None or cached.dtype != dtype:
                cached = self._cache[id(value)] = value.to(dtype)
            return cached
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._lower:
            args, kwargs = (
                self._cast(args, self.dtype),
                {k: self._cast(v, self.dtype) for k, v in kwargs.items()},
            )
        elif func is F.interpolate and _interp_mode(args, kwargs) != "area":
            # upsample_* are float32 ops; mode "area" is adaptive_avg_pool2d, which is not.
            args = self._cast(args, torch.float32)
        elif func in self._fp32:
            args = self._cast(args, torch.float32)
            kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        elif func in self._promote:
            floats = [t for t in tree_leaves((args, kwargs)) if self._eligible(t)]
            if floats:
                widest = torch.float32 if any(t.dtype == torch.float32 for t in floats) else None
                if widest is not None:
                    args = self._cast(args, widest)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# One step of a config


@dataclasses.dataclass
class MemoryReport:
    """What :func:`count_step` measured."""

    method: str
    backend: str
    """``reference`` or ``auto`` (the fused ops a GPU would take)."""
    crop: int
    batch: int
    phase: str
    precision: str
    peak_bytes: int
    """The largest number of bytes live at once (512-byte blocks)."""
    start_bytes: int
    """What was live when the step began: parameters, optimizer state, the batch."""
    breakdown: dict[str, int]
    """Bytes live at the peak by :data:`CATEGORIES`; they sum to ``peak_bytes``."""
    backends: dict[str, str]
    """Op -> backend each op of the step ran on."""
    peak_op: str = ""
    """The aten op whose output reached the peak."""
    top_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    """The ops whose outputs hold the most bytes at the peak (at most 8)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_bytes(n: float) -> str:
    """``7.05 GiB``, ``512.0 MiB``, ``3.0 KiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"24G"``, ``"80GB"`` (decimal), ``"512MiB"``, ``"1000000"`` -> bytes."""
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise MemoryCountError(
            f"{text!r} is not a size; write e.g. 24GiB, 40GB (10^9 bytes), 512MiB or a byte count"
        )
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1024 if (binary or (unit and not text.strip().upper().endswith("B"))) else 1000
    n = int(value * base**power)
    if n <= 0:
        raise MemoryCountError(f"the budget {text!r} must be positive")
    return n


def _step_batch(cfg, batch: int, crop: int, device: str) -> dict[str, torch.Tensor]:
    """What the data layer's ``collate`` hands a training step: meta tensors, or on a real
    device random images whose labels hold every class (the most work a step can do)."""
    from wsss_fast.engine.infer import _num_classes

    C = _num_classes(cfg)
    out = {
        "image": torch.empty(batch, 3, crop, crop, device=device),
        "label": torch.empty(batch, C, device=device),
        "crop_box": torch.empty(batch, 4, dtype=torch.int64, device=device),
    }
    if cfg.data.saliency_dir is not None:
        out["saliency"] = torch.empty(batch, crop, crop, dtype=torch.int64, device=device)
    if device != "meta":
        gen = torch.Generator().manual_seed(0)
        out["image"].copy_(torch.randn(out["image"].shape, generator=gen))
        out["label"].fill_(1.0)
        out["crop_box"].copy_(torch.tensor([0, crop, 0, crop]).expand(batch, 4))
        if "saliency" in out:
            out["saliency"].copy_(torch.randint(0, 2, out["saliency"].shape, generator=gen))
    return out


class _RecordBackends:
    """Which backend each op call took (wraps ``_backend.select``)."""

    def __init__(self):
        self.seen: dict[str, str] = {}

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        select = _backend.select

        def recording(op, *args, **kwargs):
            name, impl = select(op, *args, **kwargs)
            self.seen.setdefault(op, name)
            return name, impl

        _backend.select = recording
        try:
            yield
        finally:
            _backend.select = select


@dataclasses.dataclass
class _Step:
    method: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    info: Any
    batch: dict[str, torch.Tensor]
    phase: str
    autocast: Callable[[], contextlib.AbstractContextManager]

    def run(self) -> None:
        """The engine's optimizer step, every micro-batch the same batch."""
        from wsss_fast.engine.loop import optimizer_step

        micro = self.info.cfg.optim.accum_steps
        optimizer_step(
            self.method,
            self.model,
            self.model,
            iter([self.batch] * micro),
            self.optimizer,
            self.info,
            autocast=self.autocast,
        )


def _build_step(cfg, method, crop, batch, phase, device: str) -> _Step:
    """The model, optimizer (with its state, as after any earlier step), step info and batch of
    one step of ``cfg`` on ``device``; on meta the model is built without initialising data."""
    from wsss_fast.engine import distributed
    from wsss_fast.engine.infer import build_method
    from wsss_fast.engine.loop import StepInfo
    from wsss_fast.engine.schedule import build_optimizer

    if method is None:
        method = build_method(cfg)
    if device == "meta":
        with torch.device("meta"):
            model = method.build_model(cfg)
    else:
        model = method.build_model(cfg).to(device)
    _check_crop(method, model, crop)
    model.train()
    params = (
        method.param_groups(model, cfg)
        if hasattr(method, "param_groups")
        else [p for p in model.parameters() if p.requires_grad]
    )
    optimizer = build_optimizer(cfg.optim, params)
    for group in optimizer.param_groups:
        # On a CUDA device torch picks the foreach implementation (its temporaries count); the
        # CPU count (for the tests) runs it too, so that it is the same step.
        if group.get("foreach", False) is None:
            group["foreach"] = True

    steps_per_epoch = 100
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    phases = dict(method.phases(total, steps_per_epoch)) if hasattr(method, "phases") else {}
    phases = phases or {"train": (0, 0)}
    if phase is None:
        phase = list(phases)[-1]
    if phase not in phases:
        raise MemoryCountError(
            f"{cfg.method} has no phase {phase!r}; choose one of {', '.join(phases)}"
        )
    step, epoch = phases[phase]
    dist_info = distributed.DistInfo(device=torch.device(device))
    info = StepInfo(step, epoch, 0, total, steps_per_epoch, cfg, dist_info)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    if amp_dtype is None:
        autocast = contextlib.nullcontext
    elif device == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=amp_dtype)  # noqa: E731
    else:
        autocast = lambda: EmulatedAutocast(amp_dtype, device)  # noqa: E731

    # The optimizer's state as after any earlier step (zero gradients, no forward).
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _Step(
        method, model, optimizer, info, _step_batch(cfg, batch, crop, device), phase, autocast
    )


def _with_crop_and_batch(cfg, crop, batch):
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data))
    if crop is not None:
        cfg.data.crop_size = int(crop)
    if batch is not None:
        cfg.data.batch_size = int(batch)
    if cfg.data.batch_size < 1 or cfg.data.crop_size < 1:
        raise MemoryCountError(
            f"crop and batch must be >= 1, got crop {cfg.data.crop_size}, batch "
            f"{cfg.data.batch_size}"
        )
    return cfg


def count_step(
    cfg,
    *,
    crop: int | None = None,
    batch: int | None = None,
    backend: str = "auto",
    phase: str | None = None,
    method: Any = None,
    device: str = "meta",
) -> MemoryReport:
    """Count the device memory of one optimizer step of ``cfg`` in its steady state (the
    optimizer's state already allocated).

    Args:
        cfg: an engine :class:`~wsss_fast.engine.config.Config` (its method section included).
        crop: the square training crop (``data.crop_size`` by default); a multiple of the
            backbone's patch size.
        batch: images per micro-batch (``data.batch_size`` by default).
        backend: ``"auto"`` (on meta: what a CUDA device takes, the fused ops) or a backend name.
        phase: the method's training phase (its ``phases``; default the last one, where the
            method does the most).
        method: a method object (default built from ``cfg.method``).
        device: ``"meta"`` (no data, no GPU), or ``"cpu"`` to run the same step on real tensors
            and count them the same way (how the tests check the meta count).

    Returns:
        A :class:`MemoryReport`.
    """
    _backend._check_name(backend)
    if device not in ("meta", "cpu"):
        raise MemoryCountError(f"count_step counts on 'meta' or 'cpu', not {device!r}")
    cfg = _with_crop_and_batch(cfg, crop, batch)

    counter = StorageCounter(device)
    record = _RecordBackends()
    with _backend.use_backend(backend):
        st = _build_step(cfg, method, cfg.data.crop_size, cfg.data.batch_size, phase, device)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: counter.tag(p.grad, "gradients"))
        for p in st.model.parameters()
        if p.requires_grad
    ]

    def pack(t):
        counter.tag(t, "saved")
        return t

    try:
        with (
            _backend.use_backend(backend),
            record(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            counter,
        ):
            counter.track(list(st.model.parameters()) + list(st.model.buffers()), "parameters")
            counter.track(list(st.optimizer.state.values()), "optimizer")
            counter.track(st.batch, "batch")
            counter.reset_peak()
            start = counter.current
            try:
                st.run()
            except ValueError as e:
                raise MemoryCountError(
                    f"the {cfg.method} step rejects this configuration: {e}"
                ) from e
            except (NotImplementedError, RuntimeError) as e:
                if device == "meta" and "meta" in str(e).lower():
                    raise MemoryCountError(
                        f"the {cfg.method} step cannot run on meta tensors ({e}); report it: a "
                        "method's step must not read tensor values"
                    ) from e
                raise
    finally:
        for h in hooks:
            h.remove()

    live = counter.live_at_peak()
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for key, size in live.items():
        breakdown[counter.tags.get(key, "other")] += size
    return MemoryReport(
        method=cfg.method,
        backend=backend,
        crop=cfg.data.crop_size,
        batch=cfg.data.batch_size,
        phase=st.phase,
        precision=cfg.train.precision,
        peak_bytes=counter.peak,
        start_bytes=start,
        breakdown=breakdown,
        backends=dict(sorted(record.seen.items())),
        peak_op=counter.peak_op,
        top_ops=dict(list(counter.by_op_at_peak(live).items())[:8]),
    )


def cuda_peak(
    cfg,
    *,
    crop: int | None = None,
    batch: int | None = None,
    backend: str = "auto",
    phase: str | None = None,
) -> int:
    """``torch.cuda.max_memory_allocated`` of the step :func:`count_step` counts, run for real
    on the current CUDA device (for the GPU check of the count)."""

    cfg = _with_crop_and_batch(cfg, crop, batch)
    with _backend.use_backend(backend):
        st = _build_step(cfg, None, cfg.data.crop_size, cfg.data.batch_size, phase, "cuda")
        for _ in range(2):  # the second step is the steady state (kernels compiled, caches warm)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            st.run()
            torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _crop_grid(method, model) -> tuple[int, int]:
    """``(smallest, step)`` of the crops a method's step takes: its ``crop_grid`` if it has
    one (CRT: whole tiles), else the multiples of the backbone's patch size."""
    if hasattr(method, "crop_grid"):
        return tuple(method.crop_grid())
    patch = _patch_size(model) or 1
    return patch, patch


def _check_crop(method, model, crop: int) -> None:
    start, step = _crop_grid(method, model)
    if crop < start or (crop - start) % step:
        lo = start + max(0, (crop - start) // step) * step
        hi = lo + step if crop > lo else lo
        what = (
            f"a multiple of the patch size {step}"
            if start == step
            else f"{start} + a multiple of {step}"
        )
        near = f"{lo} or {hi}" if lo != hi else str(lo)
        raise MemoryCountError(f"crop {crop} is not {what}; use {near}")


def _patch_size(model) -> int | None:
    for m in model.modules():
        ps = getattr(m, "patch_size", None)
        if isinstance(ps, int):
            return ps
        if isinstance(ps, Sequence) and len(ps) == 2 and all(isinstance(x, int) for x in ps):
            return int(ps[0])
    return None


def largest_fit(
    measure: Callable[[int], int], budget: int, *, start: int, step: int, limit: int
) -> int | None:
    """The largest ``x`` in ``start, start + step, ...`` (at most ``limit``) with
    ``measure(x) <= budget``, assuming ``measure`` grows with ``x``; None if ``start`` does not
    fit. Doubling, then bisection over the grid: about ``2 log2(limit / step)`` measurements."""

    def fits(k: int) -> bool:
        return measure(start + k * step) <= budget

    kmax = (limit - start) // step
    if kmax < 0 or not fits(0):
        return None
    lo, hi = 0, None  # lo fits; hi (when known) does not
    while hi is None:
        k = min(kmax, max(lo + 1, 2 * lo + 1))
        if k == lo:
            return start + lo * step
        if fits(k):
            lo = k
        else:
            hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return start + lo * step


CROP_LIMIT = 4096
BATCH_LIMIT = 1024


def _searcher(cfg, backend, phase, progress):
    """``(peak(crop, batch), (start, step) of the crop grid, bar)`` for one config and backend."""
    from tqdm.auto import tqdm

    from wsss_fast.engine.infer import build_method

    method = build_method(cfg)
    with torch.device("meta"):
        grid = _crop_grid(method, method.build_model(cfg))
    name = "fused" if backend == "auto" else backend
    bar = tqdm(desc=f"fit {name}", unit=" steps counted", disable=not progress, leave=False)

    def peak(crop: int, batch: int) -> int:
        bar.set_postfix(crop=crop, batch=batch)
        bar.update(1)
        return count_step(
            cfg, crop=crop, batch=batch, backend=backend, phase=phase, method=method
        ).peak_bytes

    return peak, grid, bar


def largest_crop(
    cfg, budget: int, *, batch: int, backend: str = "auto", phase: str | None = None
) -> int | None:
    """The largest crop on the method's crop grid whose step at ``batch`` peaks within
    ``budget`` bytes (None if even the smallest does not)."""
    peak, (start, step), bar = _searcher(cfg, backend, phase, False)
    with bar:
        return largest_fit(
            lambda c: peak(c, batch), budget, start=start, step=step, limit=CROP_LIMIT
        )


def fit(
    cfg,
    budget: int,
    *,
    backend: str = "auto",
    crop: int | None = None,
    batch: int | None = None,
    phase: str | None = None,
    progress: bool = False,
) -> dict[str, int | None]:
    """The largest crop (on the method's crop grid, at ``batch``) and the largest batch (at
    ``crop``) whose step peaks within ``budget`` bytes; None where even the smallest does not.

    Returns ``{"crop": ..., "batch": ..., "at_batch": batch, "at_crop": crop}``. ``progress``
    shows a bar of the steps counted (on stderr).
    """
    cfg = _with_crop_and_batch(cfg, crop, batch)
    crop, batch = cfg.data.crop_size, cfg.data.batch_size
    peak, (start, step), bar = _searcher(cfg, backend, phase, progress)
    with bar:
        best_crop = largest_fit(
            lambda c: peak(c, batch), budget, start=start, step=step, limit=CROP_LIMIT
        )
        best_batch = largest_fit(
            lambda b: peak(crop, b), budget, start=1, step=1, limit=BATCH_LIMIT
        )
    return {"crop": best_crop, "batch": best_batch, "at_batch": batch, "at_crop": crop}


def format_report(r: MemoryReport) -> str:
    """The report as a few lines of text."""
    lines = [
        f"{r.method} training step, phase {r.phase}: crop {r.crop}, batch {r.batch}, "
        f"{r.precision}, backend {r.backend}",
        f"  peak            {format_bytes(r.peak_bytes):>12}   (reached at {r.peak_op})",
        f"  at step start   {format_bytes(r.start_bytes):>12}",
        "  at the peak:",
    ]
    for k in CATEGORIES:
        lines.append(f"    {k:<13} {format_bytes(r.breakdown[k]):>12}")
    lines.append("  largest at the peak, by the op that allocated them:")
    for op, n in list(r.top_ops.items())[:5]:
        lines.append(f"    {format_bytes(n):>12}  {op}")
    ops = ", ".join(f"{op} {be}" for op, be in r.backends.items()) or "none"
    lines.append(f"  ops: {ops}")
    lines.append(
        "  counted on the meta device: storages in 512-byte blocks, as "
        "torch.cuda.max_memory_allocated counts them (no CUDA context, no cuBLAS/cuDNN workspace)"
    )
    return "\n".join(lines)


def format_fit(fits: dict[str, dict], budget: int, r: MemoryReport) -> str:
    """``--fit``: the largest crop and batch per backend, side by side."""

    def show(v, limit):
        if v is None:
            return "none fits"
        return f">= {v} (search limit)" if v >= limit else str(v)

    lines = [f"within {format_bytes(budget)} ({budget} bytes), phase {r.phase}, {r.precision}:"]
    lines.append(f"  {'backend':<10} {'largest crop':>22} {'largest batch':>22}")
    for be, f in fits.items():
        crop_txt = f"{show(f['crop'], CROP_LIMIT)} @ batch {f['at_batch']}"
        batch_txt = f"{show(f['batch'], BATCH_LIMIT)} @ crop {f['at_crop']}"
        name = "fused" if be == "auto" else be
        lines.append(f"  {name:<10} {crop_txt:>22} {batch_txt:>22}")
    return "\n".join(lines)
