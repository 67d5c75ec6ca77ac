"""The timm attention drop-in: ``patch_timm`` routes timm ViT attention through
``wsss_fast.attention``, and ``capture`` hands back per-layer affinities, outputs and q/k/v.

Supported: ``timm.layers.Attention`` (the exact class; it is what ``VisionTransformer``, DeiT
including the distilled variant, register-token, class-token-free and ``qk_norm`` /
``scale_attn_norm`` ViTs, ``ResPostBlock`` and ``ParallelThingsBlock`` use). Every other module
that computes attention (swin's ``WindowAttention``, eva's ``EvaAttention``, beit, cait, xcit,
``ParallelScalingBlock``, subclasses of ``Attention``, ...) is refused by name, so no layer silently
runs unpatched and goes missing from a capture.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Iterable

import torch
from torch import nn

from wsss_fast.ops import attention

__all__ = ["Capture", "capture", "patch_timm"]

_EXPORTS = (None, "mean", "rows")

# Class names that compute attention without "attention" or "attn" in their name.
_INLINE_ATTENTION = {
    "timm.models.vision_transformer.ParallelScalingBlock",
    "timm.models.vision_transformer.DiffParallelScalingBlock",
    "timm.models.xcit.XCA",
}
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)

# The captures entered in this context, innermost last. A ContextVar rather than a global so
# that threads and asyncio tasks each see only their own captures.
_ACTIVE: contextvars.ContextVar[tuple[Capture, ...]] = contextvars.ContextVar(
    "wsss_fast_capture", default=()
)


class _FusedAttentionForward:
    """The forward of a patched ``timm.layers.Attention``; mixed in ahead of timm's class."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        name = type(self).__name__
        if attn_mask is not None or is_causal:
            raise NotImplementedError(
                f"wsss_fast {name}: attn_mask and is_causal are not supported by the wsss_fast "
                "attention drop-in (wsss_fast.attention has no mask). Call the model without them, "
                "or build the model again without wsss_fast.patch_timm for masked attention."
            )
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"wsss_fast {name}: attention dropout (p={self.attn_drop.p}) in training mode is "
                "not supported by the wsss_fast attention drop-in. Build the model with "
                "attn_drop_rate=0 (or set module.attn_drop.p = 0 on every attention module); "
                "proj_drop and drop_path are fine."
            )
        B, N, _ = x.shape
        # getattr: the gate and attn_dim arrived in later timm 1.0.x releases.
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        captures = tuple(c for c in _ACTIVE.get() if id(self) in c._layers)
        export, num_rows, export_dtype = _export_request(captures, name)
        result = attention(
            q,
            k,
            v,
            scale=self.scale,
            export=export,
            num_rows=num_rows,
            export_dtype=export_dtype,
        )
        out, exported = result if export is not None else (result, None)
        for cap in captures:
            cap._record(self, q, k, v, out, exported)

        x = out.transpose(1, 2).reshape(B, N, attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


def _export_request(captures: tuple[Capture, ...], name: str):
    requests = {(c.export, c.num_rows, c.export_dtype) for c in captures if c.export is not None}
    if len(requests) > 1:
        raise ValueError(
            f"wsss_fast {name}: nested captures over the same layer ask for different exports "
            f"{sorted(str(r[:2]) for r in requests)}; one attention call gives one export. "
            "Ask for the same export in both, or capture the model twice in turn."
        )
    return requests.pop() if requests else (None, 1, torch.float32)


@functools.cache
def _patched_class() -> type:
    # Built on first use so that importing wsss_fast does not import timm (several seconds).
    from timm.layers import Attention

    cls = type(
        "PatchedAttention",
        (_FusedAttentionForward, Attention),
        {
            "__module__": __name__,
            "__doc__": "timm's ``Attention`` computing softmax attention with "
            "``wsss_fast.attention`` (set by ``wsss_fast.patch_timm``).",
        },
    )
    return cls


def __getattr__(attr: str):
    # Makes ``wsss_fast.nn.timm_attention.PatchedAttention`` importable, so pickled models load.
    if attr == "PatchedAttention":
        return _patched_class()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def patch_timm(model: nn.Module, *, skip: Iterable[type] = ()) -> nn.Module:
    """Route every timm ViT ``Attention`` in ``model`` through :func:`wsss_fast.attention`.

    In place and idempotent. Each ``timm.layers.Attention`` module gets a subclass of it as its
    ``__class__``; parameters, buffers, ``state_dict`` keys and the module tree are untouched, and
    the outputs equal timm's (up to floating-point rounding of the chosen backend). Inside the
    patched forward q, k, v are ``[B, H, N, D]`` exactly as timm makes them (qkv linear, split
    into heads, ``q_norm`` / ``k_norm``), the scale is the module's ``scale``, and the output path
    (merge heads, ``norm``, gate, ``proj``, ``proj_drop``) is timm's.

    The patched forward refuses what the drop-in cannot do: an ``attn_mask`` or ``is_causal``,
    and attention dropout (``attn_drop.p > 0``) in training mode.

    Args:
        model: any module containing ``timm.layers.Attention`` modules (or one itself).
        skip: module classes to leave unpatched on purpose, e.g.
            ``(timm.layers.AttentionPoolLatent,)`` for a ViT with ``global_pool="map"``. Their
            attention runs as timm wrote it and is absent from :func:`capture`.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` holds another attention module (swin, eva, beit, cait, a subclass of
            ``Attention``, ...), or no ``timm.layers.Attention`` at all. Nothing is patched then.

    Example::

        model = timm.create_model("deit_small_patch16_224", pretrained=False)
        wsss_fast.patch_timm(model)
        with wsss_fast.capture(model, export="mean") as cap:
            logits = model(images)
        affinity = torch.stack(cap.exports)  # [L, B, N, N]
    """
    from timm.layers import Attention

    patched = _patched_class()
    skip = tuple(skip)
    targets, refused = [], []
    for name, module in model.named_modules():
        cls = type(module)
        if cls is patched:
            continue
        if cls is Attention:
            targets.append(module)
        elif isinstance(module, skip):
            continue
        elif (
            isinstance(module, Attention)
            or _ATTENTION_NAME.search(cls.__name__)
            or _qualname(cls) in _INLINE_ATTENTION
        ):
            refused.append(f"{name or '<model>'} ({_qualname(cls)})")
    if refused:
        listing = "\n  ".join(refused)
        raise TypeError(
            "wsss_fast.patch_timm supports timm.layers.Attention (timm's VisionTransformer / DeiT "
            f"attention) only; {type(model).__name__} also holds attention modules it cannot "
            f"patch:\n  {listing}\nUse a ViT built on timm.layers.Attention, or pass their classes "
            "in skip=(...) to leave them unpatched (their attention then runs as timm wrote it and "
            "is not captured)."
        )
    if not targets and not any(type(m) is patched for m in model.modules()):
        raise TypeError(
            f"wsss_fast.patch_timm: {type(model).__name__} holds no timm.layers.Attention module; "
            "nothing to patch. The drop-in covers timm's VisionTransformer family (vit_*, deit_*)."
        )
    for module in targets:
        module.__class__ = patched
    return model


class Capture:
    """What :func:`capture` records, one entry per patched attention call, in call order.

    Attributes:
        exports: ``export="mean"``: ``[B, N, N]`` head-mean softmax probabilities;
            ``export="rows"``: ``[B, H, num_rows, N]`` per-head rows of the first ``num_rows``
            queries; in ``export_dtype``, differentiable with respect to the model's parameters.
        outputs: ``keep_outputs=True``: each layer's attention output ``[B, H, N, D]`` before the
            heads are merged; the very tensors the rest of the forward consumes, so
            ``torch.autograd.grad(score, cap.outputs)`` gives the gradient with respect to them.
        q, k, v: ``keep_qkv=True``: each layer's ``[B, H, N, D]`` inputs to the attention (q and k
            after ``q_norm`` / ``k_norm``, before the scale), in the autograd graph.
        names: the qualified module name of each recorded call (``"blocks.3.attn"``).

    Recording happens only between ``__enter__`` and ``__exit__``; what was recorded stays
    readable afterwards. A ``Capture`` is entered once.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        export: str | None = None,
        num_rows: int = 1,
        keep_outputs: bool = False,
        keep_qkv: bool = False,
        export_dtype: torch.dtype = torch.float32,
    ) -> None:
        if export not in _EXPORTS:
            raise ValueError(f"wsss_fast.capture: export must be one of {_EXPORTS}, got {export!r}")
        if export == "rows" and (not isinstance(num_rows, int) or num_rows < 1):
            raise ValueError(f"wsss_fast.capture: num_rows must be an int >= 1, got {num_rows!r}")
        # Keyed by id: the capture holds `model`, so these modules stay alive and ids stay unique.
        self._layers = {
            id(m): name
            for name, m in model.named_modules()
            if isinstance(m, _FusedAttentionForward)
        }
        if not self._layers:
            raise RuntimeError(
                f"wsss_fast.capture: {type(model).__name__} has no patched attention to capture. "
                "Call wsss_fast.patch_timm(model) first."
            )
        self.model = model
        self.export = export
        self.num_rows = num_rows
        self.keep_outputs = keep_outputs
        self.keep_qkv = keep_qkv
        self.export_dtype = export_dtype
        self.exports: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.names: list[str] = []
        self._token: contextvars.Token | None = None
        self._entered = False

    def __enter__(self) -> Capture:
        if self._entered:
            raise RuntimeError(
                "wsss_fast.capture: this Capture was already entered; call "
                "wsss_fast.capture(model, ...) again for a new one."
            )
        self._entered = True
        self._token = _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None

    def _record(self, module, q, k, v, out, exported) -> None:
        self.names.append(self._layers[id(module)])
        if exported is not None and self.export is not None:
            self.exports.append(exported)
        if self.keep_outputs:
            self.outputs.append(out)
        if self.keep_qkv:
            self.q.append(q)
            self.k.append(k)
            self.v.append(v)


def capture(
    model: nn.Module,
    export: str | None = None,
    num_rows: int = 1,
    keep_outputs: bool = False,
    keep_qkv: bool = False,
    *,
    export_dtype: torch.dtype = torch.float32,
) -> Capture:
    """Record per-layer attention quantities of a patched model during a ``with`` block.

    Args:
        model: a model passed through :func:`patch_timm`; only its own attention layers record.
        export: ``None``, ``"mean"`` (``[B, N, N]`` head-mean probabilities per layer) or
            ``"rows"`` (``[B, H, num_rows, N]`` probabilities of the first ``num_rows`` queries,
            the class-token attention for ``num_rows=1``).
        num_rows: rows kept by ``export="rows"``.
        keep_outputs: keep each layer's attention output ``[B, H, N, D]`` (GETAM's gradient target).
        keep_qkv: keep each layer's q, k, v ``[B, H, N, D]`` (AReAM's affinity loss, propagation).
        export_dtype: dtype of the exports (float32 by default).

    Returns:
        A :class:`Capture`; its lists fill as the model runs. Everything kept is in the autograd
        graph (a loss on ``cap.exports`` trains the model); nothing is kept outside a capture.
        Captures nest (each records the layers of its own model); nested captures of one layer
        must ask for the same export.

    Example::

        wsss_fast.patch_timm(model)
        with wsss_fast.capture(model, export="rows", keep_outputs=True) as cap:
            logits = model(images)
        cls_attn = torch.stack(cap.exports)                       # [L, B, H, 1, N]
        grads = torch.autograd.grad(logits[:, c].sum(), cap.outputs)  # L x [B, H, N, D]
    """
    return Capture(
        model,
        export=export,
        num_rows=num_rows,
        keep_outputs=keep_outputs,
        keep_qkv=keep_qkv,
        export_dtype=export_dtype,
    )
