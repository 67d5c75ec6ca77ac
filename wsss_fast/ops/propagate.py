"""``propagate``: multi-layer head-mean affinity propagation of CAMs (DESIGN.md §3.3).

``sum_n W[m, n] cam[c, n]`` with ``W = sum_l w_l mean_h P_{l,h}[p:, p:]`` is attention whose
values are the CAM (``V[n] = cam[:, n - p]`` on patch keys, 0 on the ``p`` prefix keys, softmax
over all N keys), averaged over heads and summed over layers with weights ``w_l``. Only the
patch query rows are computed.

Backends:
- ``reference``: materialises ``P`` ``[L, B, H, N, N]`` (AReAM's stacked softmax).
- ``torch``: pure PyTorch over chunks of query rows (``wsss_fast.ops.set_torch_chunk_elements`` bounds the
  transient ``[B, H, rows, N]`` working set); saves q, k, cam and the weights only and recomputes
  ``P`` in backward. Differentiable with respect to q, k, cam and the weights; the backward uses
  out-of-place ops, so double backward is exact.
- ``triton``: the kernels of ``wsss_fast.kernels.affinity`` (all layers and heads in one forward
  launch; backward: a recompute pass for the log-sum-exp and ``rowsum(P * dP)``, then dq per query
  block and dk plus dcam per key block, no atomics), registered as the custom ops
  ``wsss_fast::propagate_triton`` and ``wsss_fast::propagate_triton_backward`` with fake kernels.
  Differentiable with respect to q, k, cam and the weights; a backward with ``create_graph=True``
  runs the differentiable ``torch`` backward instead.

Layers given as a sequence are never stacked by the fused backends: the ``torch`` backend takes
them as separate autograd inputs and the Triton kernels read them through a table of pointers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, _chunks, reference

OP = "propagate"
TRITON_MAX_CLASSES = 128


def _layers(name: str, x) -> list[torch.Tensor]:
    """The layers of ``x`` (a ``[L, B, H, N, D]`` tensor or a sequence of ``[B, H, N, D]``) as a
    list of ``[B, H, N, D]`` tensors (views, no copy)."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"wsss_fast.propagate: {name} is an empty sequence of layers")
        layers = [
            _checks.tensor(OP, f"{name}[{i}]", t, ndim=4, layout="[B, H, N, D]")
            for i, t in enumerate(x)
        ]
        _checks.same_shape_and_dtype(OP, **{f"{name}[{i}]": t for i, t in enumerate(layers)})
        _checks.same_device(OP, **{f"{name}[{i}]": t for i, t in enumerate(layers)})
        return layers
    return list(_checks.tensor(OP, name, x, ndim=5, layout="[L, B, H, N, D]").unbind(0))


def propagate(
    q: torch.Tensor | Sequence[torch.Tensor],
    k: torch.Tensor | Sequence[torch.Tensor],
    cam: torch.Tensor,
    *,
    num_prefix: int,
    weights: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Refine ``cam`` with the weighted sum over layers of head-mean attention (patch block).

    ``W = sum_l w_l * mean_h softmax(q_lh k_lh^T * scale)[:, num_prefix:, num_prefix:]`` (softmax
    over all N keys, then the patch block); returns ``out[b, c, m] = sum_n W[b, m, n] cam[b, c, n]``.

    Args:
        q, k: ``[L, B, H, N, D]`` or sequences of L tensors ``[B, H, N, D]`` (e.g. ``cap.q`` of
            :func:`wsss_fast.capture`), one dtype (float32, float16, bfloat16; float64 on the
            ``reference`` and ``torch`` backends), any strides.
        cam: ``[B, C, Np]`` with ``Np = N - num_prefix``, any float dtype. The ``triton`` backend
            takes ``C <= 128`` and computes the products with the CAM in q's precision (the CAM
            is rounded to q's dtype when q is 16-bit).
        num_prefix: number of class/register tokens before the patches.
        weights: ``[L]`` layer weights ``w_l``; defaults to ``1 / L`` each. AReAM's entropy
            weighting divides by L0 as well: pass ``w_l = (1 - e_l) / L0``.
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, C, Np]`` in ``cam.dtype``, differentiable with respect to cam, q, k and weights (on
        every backend). The ``torch`` and ``triton`` backends never form an ``N x N`` tensor and
        save only q, k, cam and the weights for backward.

    Host syncs: none; the op reads no tensor values on the host, so it runs on meta and fake
    tensors and under CUDA-graph capture.

    Example::

        with torch.no_grad(), wsss_fast.capture(model, keep_qkv=True) as cap:
            logits = model(images)
        refined = wsss_fast.propagate(cap.q[:7], cap.k[:7], cam, num_prefix=20)
    """
    qs = _layers("q", q)
    ks = _layers("k", k)
    if len(qs) != len(ks):
        raise ValueError(f"wsss_fast.propagate: q has {len(qs)} layers but k has {len(ks)}")
    _checks.same_shape_and_dtype(OP, q=qs[0], k=ks[0])
    cam = _checks.tensor(OP, "cam", cam, ndim=3, layout="[B, C, Np]")
    device = _checks.same_device(OP, q=qs[0], k=ks[0], cam=cam)
    L = len(qs)
    B, _, N, _ = qs[0].shape
    num_prefix = _checks.index_in_range(OP, "num_prefix", num_prefix, 0, N)
    if cam.shape[0] != B or cam.shape[2] != N - num_prefix:
        raise ValueError(
            f"wsss_fast.propagate: cam must be [B, C, N - num_prefix] = [{B}, C, {N - num_prefix}], "
            f"got {tuple(cam.shape)}"
        )
    if weights is not None:
        weights = _checks.tensor(OP, "weights", weights, ndim=1, layout="[L]")
        if weights.shape[0] != L:
            raise ValueError(
                f"wsss_fast.propagate: weights must have L = {L} entries, got {weights.shape[0]}"
            )
        _checks.same_device(OP, q=qs[0], weights=weights)
    scale = _checks.optional_scale(OP, scale)
    backend, impl = _backend.select(OP, _IMPLS, device)
    if backend == "reference":
        q5 = q if isinstance(q, torch.Tensor) else torch.stack(qs)
        k5 = k if isinstance(k, torch.Tensor) else torch.stack(ks)
        return impl(q5, k5, cam, num_prefix=num_prefix, weights=weights, scale=scale)
    if weights is None:
        dtype = torch.float64 if cam.dtype == torch.float64 else torch.float32
        weights = torch.full((L,), 1.0 / L, device=device, dtype=dtype)
    s = qs[0].shape[-1] ** -0.5 if scale is None else scale
    return impl(qs, ks, cam, weights, num_prefix, s)


# ---------------------------------------------------------------------------------------------
# torch backend: chunks of patch query rows, layer by layer; P recomputed in backward.


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunk_rows(B: int, H: int, N: int) -> int:
    return _chunks.chunk_rows(B * H * N)


def _values(cam: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """``V`` ``[B, N, C]``: the CAM of each patch key, 0 on the prefix keys."""
    v = cam.to(dtype).transpose(1, 2)
    return torch.cat([v.new_zeros((v.shape[0], num_prefix, v.shape[2])), v], dim=1)


def _torch_forward(qs, ks, cam, weights, num_prefix, scale):
    """``out`` ``[B, C, Np]`` in cam's dtype, ``sum_l (w_l / H) sum_h P_lh[p:, :] V``."""
    B, H, N, _ = qs[0].shape
    Np = N - num_prefix
    acc = _acc_dtype(qs[0], cam, weights)
    v = _values(cam, num_prefix, acc)
    w = weights.to(acc) / H
    out = torch.zeros((B, Np, cam.shape[1]), device=cam.device, dtype=acc)
    rows = _chunk_rows(B, H, N)
    for layer, (q, k) in enumerate(zip(qs, ks)):
        kt = k.to(acc).transpose(-2, -1)
        for i0 in range(0, Np, rows):
            i1 = min(Np, i0 + rows)
            scores = q[:, :, num_prefix + i0 : num_prefix + i1].to(acc) @ kt
            p_sum = torch.softmax(scores.mul_(scale), dim=-1).sum(dim=1)  # [B, rows, N]
            out[:, i0:i1] += w[layer] * (p_sum @ v)
    return out.transpose(1, 2).to(cam.dtype)


def _torch_backward(qs, ks, cam, weights, dout, num_prefix, scale):
    """(dqs, dks, dcam, dweights) by recomputing ``P`` per layer and chunk of patch query rows,
    with out-of-place ops only (autograd can differentiate this function).

    With ``g = dout^T`` (``[B, Np, C]``) and ``w' = w_l / H``: ``dV = sum_{l,h} w' P^T g``
    (``dcam`` is its patch rows), ``dP = w' g V^T`` (the same for every head),
    ``dS = P * (dP - rowsum(P * dP))``, ``dq = s dS k``, ``dk = s dS^T q``, and
    ``dw_l = (1 / H) sum rowsum(P * g V^T)`` (``g . (P V)`` summed over b, h and rows).
    """
    B, H, N, D = qs[0].shape
    Np = N - num_prefix
    acc = _acc_dtype(qs[0], cam, weights)
    v = _values(cam, num_prefix, acc)  # [B, N, C]
    w = weights.to(acc) / H
    g_all = dout.to(acc).transpose(1, 2)  # [B, Np, C]
    dv = torch.zeros_like(v)
    dqs, dks, dws = [], [], []
    rows = _chunk_rows(B, H, N)
    for layer, (q, k) in enumerate(zip(qs, ks)):
        kf = k.to(acc)
        dq_chunks = [kf.new_zeros((B, H, num_prefix, D))]
        dk = torch.zeros_like(kf)
        dw = torch.zeros((), device=kf.device, dtype=acc)
        for i0 in range(0, Np, rows):
            i1 = min(Np, i0 + rows)
            q_c = q[:, :, num_prefix + i0 : num_prefix + i1].to(acc)
            p = torch.softmax(q_c @ kf.transpose(-2, -1) * scale, dim=-1)  # [B, H, r, N]
            g = g_all[:, i0:i1]  # [B, r, C]
            dp = (g @ v.transpose(1, 2))[:, None]  # [B, 1, r, N]: g V^T, for every head
            rowdot = (p * dp).sum(dim=-1, keepdim=True)  # [B, H, r, 1]: g . (P V)
            dw = dw + rowdot.sum() / H
            ds = p * (dp - rowdot) * (w[layer] * scale)
            dq_chunks.append(ds @ kf)
            dk = dk + ds.transpose(-2, -1) @ q_c
            dv = dv + p.sum(dim=1).transpose(1, 2) @ g * w[layer]
        dqs.append(torch.cat(dq_chunks, dim=2).to(q.dtype))
        dks.append(dk.to(k.dtype))
        dws.append(dw)
    dcam = dv[:, num_prefix:].transpose(1, 2).to(cam.dtype)
    return dqs, dks, dcam, torch.stack(dws).to(weights.dtype)


class PropagateTorchFunction(torch.autograd.Function):
    """Autograd of the ``torch`` backend; the layers are separate inputs (never stacked).

    Inputs: ``cam, weights, num_prefix, scale, num_layers, *qs, *ks``. Saves q, k, cam and the
    weights only.
    """

    @staticmethod
    def forward(ctx, cam, weights, num_prefix, scale, num_layers, *qk):
        qs, ks = qk[:num_layers], qk[num_layers:]
        out = _torch_forward(qs, ks, cam, weights, num_prefix, scale)
        ctx.save_for_backward(cam, weights, *qk)
        ctx.num_prefix, ctx.scale, ctx.num_layers = num_prefix, scale, num_layers
        return out

    @staticmethod
    def backward(ctx, dout):
        cam, weights, *qk = ctx.saved_tensors
        L = ctx.num_layers
        dqs, dks, dcam, dw = _torch_backward(
            qk[:L], qk[L:], cam, weights, dout, ctx.num_prefix, ctx.scale
        )
        return dcam, dw, None, None, None, *dqs, *dks


def _propagate_torch(qs, ks, cam, weights, num_prefix, scale):
    return PropagateTorchFunction.apply(cam, weights, num_prefix, scale, len(qs), *qs, *ks)


# ---------------------------------------------------------------------------------------------
# triton backend, as custom ops (torch.compile traces them through their fake kernels).


@torch.library.custom_op("wsss_fast::propagate_triton", mutates_args=())
def _propagate_triton_op(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    cam: torch.Tensor,
    weights: torch.Tensor,
    num_prefix: int,
    scale: float,
) -> torch.Tensor:
    """``out`` ``[B, C, Np]`` in cam's dtype."""
    from wsss_fast.kernels import affinity as kernels

    return kernels.propagate_fwd(q, k, cam, weights, num_prefix, scale)


@_propagate_triton_op.register_fake
def _propagate_triton_fake(q, k, cam, weights, num_prefix, scale):
    return cam.new_empty(cam.shape)


@torch.library.custom_op("wsss_fast::propagate_triton_backward", mutates_args=())
def _propagate_triton_backward_op(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    cam: torch.Tensor,
    weights: torch.Tensor,
    dout: torch.Tensor,
    num_prefix: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk) stacked ``[L, B, H, N, D]`` in q's dtype, dcam ``[B, C, Np]`` in cam's dtype and
    dweights ``[L]`` in the weights' dtype."""
    from wsss_fast.kernels import affinity as kernels

    return kernels.propagate_bwd(q, k, cam, weights, dout, num_prefix, scale)


@_propagate_triton_backward_op.register_fake
def _propagate_triton_backward_fake(q, k, cam, weights, dout, num_prefix, scale):
    stacked = (len(q), *q[0].shape)
    return (
        q[0].new_empty(stacked),
        k[0].new_empty(stacked),
        cam.new_empty(cam.shape),
        weights.new_empty(weights.shape),
    )


def _propagate_triton_setup_context(ctx, inputs, output):
    q, k, cam, weights, num_prefix, scale = inputs
    ctx.save_for_backward(cam, weights, *q, *k)
    ctx.num_prefix, ctx.scale, ctx.num_layers = num_prefix, scale, len(q)


def _propagate_triton_backward(ctx, dout):
    cam, weights, *qk = ctx.saved_tensors
    L = ctx.num_layers
    qs, ks = qk[:L], qk[L:]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, from torch ops
        dqs, dks, dcam, dw = _torch_backward(qs, ks, cam, weights, dout, ctx.num_prefix, ctx.scale)
    else:
        dq, dk, dcam, dw = _propagate_triton_backward_op(
            qs, ks, cam, weights, dout, ctx.num_prefix, ctx.scale
        )
        dqs, dks = list(dq.unbind(0)), list(dk.unbind(0))
    return dqs, dks, dcam, dw, None, None


_propagate_triton_op.register_autograd(
    _propagate_triton_backward, setup_context=_propagate_triton_setup_context
)


def _propagate_triton(qs, ks, cam, weights, num_prefix, scale):
    _checks.dtype_for_backend(OP, "triton", qs[0], cam, weights)
    if cam.shape[1] > TRITON_MAX_CLASSES:
        raise ValueError(
            f"wsss_fast.propagate: the 'triton' backend takes at most {TRITON_MAX_CLASSES} CAM "
            f"channels, got C = {cam.shape[1]}; use the 'torch' backend for more"
        )
    return _propagate_triton_op(qs, ks, cam, weights, num_prefix, float(scale))


_IMPLS = {
    "reference": reference.propagate,
    "torch": _propagate_torch,
    "triton": _propagate_triton,
}
