"""``attention``: attention with an optional affinity export (DESIGN.md §3.1).

Backends:
- ``reference``: materialises ``P`` ``[B, H, N, N]`` and keeps it for backward (eager timm).
- ``torch``: pure PyTorch, processed in chunks of query rows so that the transient ``N``-wide
  working set is bounded (``wsss_fast.ops.set_torch_chunk_elements``); saves q, k, v, out and the row
  log-sum-exp only, and recomputes ``P`` chunk by chunk in backward.
- ``triton``: the fused kernels of ``wsss_fast.kernels.attention``, registered as the custom ops
  ``wsss_fast::attention_triton`` and ``wsss_fast::attention_triton_backward`` (fake kernels
  included) so that ``torch.compile`` traces through them.

Second-order gradients: the ``torch`` and ``triton`` backward passes are plain first-order
kernels, but when a backward runs with ``create_graph=True`` both switch to a differentiable
chunked PyTorch backward that recomputes ``P`` from q and k, so double backward is exact on every
backend (at the speed of the ``torch`` path).
"""

from __future__ import annotations

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, _chunks, reference

OP = "attention"
EXPORTS = (None, "mean", "rows")
_EXPORT_CODE = {None: 0, "mean": 1, "rows": 2}
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    export: str | None = None,
    num_rows: int = 1,
    export_dtype: torch.dtype = torch.float32,
):
    """Attention ``out = softmax(q k^T * scale) v`` per head, optionally exporting affinities.

    Args:
        q, k, v: ``[B, H, N, D]``, one dtype (float32, float16, bfloat16; float64 on the
            ``reference`` and ``torch`` backends), any strides (e.g. permuted views of a fused qkv
            projection). The ``triton`` backend takes ``D`` in 16, 32, 64, 128.
        scale: defaults to ``D ** -0.5``.
        export: ``None``; ``"mean"`` for the head-averaged probabilities ``[B, N, N]``;
            ``"rows"`` for the per-head rows of the first ``num_rows`` queries
            ``[B, H, num_rows, N]`` (class-token attention).
        num_rows: rows exported by ``export="rows"``, 1 to N.
        export_dtype: dtype of the export (float32 by default).

    Returns:
        ``out`` ``[B, H, N, D]`` in q's dtype, or ``(out, export)``. Both are differentiable with
        respect to q, k and v; a gradient arriving on the export is folded into the same backward.
        The fused backends save only q, k, v, out and the float32 row log-sum-exp for backward.

    Host syncs: none; the op reads no tensor values on the host, so it runs on meta and fake
    tensors and under CUDA-graph capture.

    Example::

        out, affinity = wsss_fast.attention(q, k, v, export="mean")   # affinity: [B, N, N]
    """
    q = _checks.tensor(OP, "q", q, ndim=4, layout="[B, H, N, D]")
    k = _checks.tensor(OP, "k", k, ndim=4, layout="[B, H, N, D]")
    v = _checks.tensor(OP, "v", v, ndim=4, layout="[B, H, N, D]")
    _checks.same_shape_and_dtype(OP, q=q, k=k, v=v)
    device = _checks.same_device(OP, q=q, k=k, v=v)
    scale = _checks.optional_scale(OP, scale)
    if export not in EXPORTS:
        raise ValueError(f"wsss_fast.attention: export must be one of {EXPORTS}, got {export!r}")
    if export == "rows":
        _checks.index_in_range(OP, "num_rows", num_rows, 1, q.shape[2] + 1)
    if not (isinstance(export_dtype, torch.dtype) and export_dtype.is_floating_point):
        raise TypeError(
            f"wsss_fast.attention: export_dtype must be a float dtype, got {export_dtype}"
        )
    backend, impl = _backend.select(OP, _IMPLS, device)
    if backend == "reference":
        return impl(
            q, k, v, scale=scale, export=export, num_rows=num_rows, export_dtype=export_dtype
        )
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return impl(q, k, v, s, export, num_rows, export_dtype)


# ---------------------------------------------------------------------------------------------
# torch backend: chunks of query rows; P recomputed in backward from q, k and the log-sum-exp.


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(q: torch.Tensor) -> int:
    B, H, N, _ = q.shape
    return _chunks.chunk_rows(B * H * N)


def _torch_forward(q, k, v, scale, export, num_rows, export_dtype):
    """(out, lse, export) chunk by chunk; export is an empty tensor when none is asked for."""
    B, H, N, D = q.shape
    acc = _acc_dtype(q)
    kt, vf = k.to(acc).transpose(-2, -1), v.to(acc)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=acc)
    if export == "mean":
        exported = torch.empty((B, N, N), device=q.device, dtype=export_dtype)
    elif export == "rows":
        exported = torch.empty((B, H, num_rows, N), device=q.device, dtype=export_dtype)
    else:
        exported = torch.empty((0,), device=q.device, dtype=export_dtype)
    rows = _chunk_rows(q)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        scores = (q[:, :, i0:i1].to(acc) @ kt).mul_(scale)
        lse_c = torch.logsumexp(scores, dim=-1)
        p = scores.sub_(lse_c.unsqueeze(-1)).exp_()
        out[:, :, i0:i1] = p @ vf
        lse[:, :, i0:i1] = lse_c
        if export == "mean":
            exported[:, i0:i1] = p.mean(dim=1)
        elif export == "rows" and i0 < num_rows:
            r1 = min(i1, num_rows)
            exported[:, :, i0:r1] = p[:, :, : r1 - i0]
    return out, lse, exported


def _torch_backward(q, k, v, lse, dout, scale, d_mean, d_rows, differentiable: bool):
    """(dq, dk, dv) by recomputing P per chunk of query rows.

    ``dP = dO V^T (+ dA / H for the mean export, + dR on the exported rows)``,
    ``dS = P * (dP - rowsum(P * dP))``, ``dQ = s dS K``, ``dK = s dS^T Q``, ``dV = P^T dO``.
    With ``differentiable`` the log-sum-exp is recomputed from q and k and no op is in place,
    so autograd can differentiate this function (double backward).
    """
    B, H, N, D = q.shape
    acc = _acc_dtype(q)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    dq_chunks = []
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    rows = _chunk_rows(q)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        q_c = qf[:, :, i0:i1]
        do_c = dout[:, :, i0:i1].to(acc)
        scores = q_c @ kf.transpose(-2, -1) * scale
        lse_c = torch.logsumexp(scores, dim=-1) if differentiable else lse[:, :, i0:i1].to(acc)
        p = torch.exp(scores - lse_c.unsqueeze(-1))
        dp = do_c @ vf.transpose(-2, -1)
        if d_mean is not None:
            dp = dp + d_mean[:, None, i0:i1].to(acc) / H
        if d_rows is not None and i0 < d_rows.shape[2]:
            r1 = min(i1, d_rows.shape[2])
            pad = torch.zeros_like(dp[:, :, r1 - i0 :])
            dp = dp + torch.cat([d_rows[:, :, i0:r1].to(acc), pad], dim=2)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dq_chunks.append(ds @ kf * scale)
        dk = dk + ds.transpose(-2, -1) @ q_c * scale
        dv = dv + p.transpose(-2, -1) @ do_c
    dq = torch.cat(dq_chunks, dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _export_grads(export, d_export):
    """(d_mean, d_rows) from the gradient arriving on the export (None where there is none)."""
    if export is None or d_export is None or d_export.numel() == 0:
        return None, None
    return (d_export, None) if export == "mean" else (None, d_export)


class AttentionTorchFunction(torch.autograd.Function):
    """Autograd of the ``torch`` backend: saves q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, scale, export, num_rows, export_dtype):
        out, lse, exported = _torch_forward(q, k, v, scale, export, num_rows, export_dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.export = scale, export
        ctx.mark_non_differentiable(lse)
        return out, lse, exported

    @staticmethod
    def backward(ctx, dout, _dlse, d_export):
        q, k, v, _out, lse = ctx.saved_tensors
        d_mean, d_rows = _export_grads(ctx.export, d_export)
        grads = _torch_backward(
            q, k, v, lse, dout, ctx.scale, d_mean, d_rows, differentiable=torch.is_grad_enabled()
        )
        return (*grads, None, None, None, None)


def _attention_torch(q, k, v, scale, export, num_rows, export_dtype):
    out, _lse, exported = AttentionTorchFunction.apply(
        q, k, v, scale, export, num_rows, export_dtype
    )
    return out if export is None else (out, exported)


# ---------------------------------------------------------------------------------------------
# triton backend, as custom ops (torch.compile traces them through their fake kernels).


@torch.library.custom_op("wsss_fast::attention_triton", mutates_args=())
def _attention_triton_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    export: int,
    num_rows: int,
    export_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, export); export is code 0 (none, an empty tensor), 1 (mean) or 2 (rows)."""
    from wsss_fast.kernels import attention as kernels

    out, lse = kernels.attention_fwd(q, k, v, scale)
    if export == 1:
        exported = kernels.attention_export_mean(q, k, lse, scale, export_dtype)
    elif export == 2:
        exported = kernels.attention_export_rows(q, k, lse, scale, num_rows, export_dtype)
    else:
        exported = torch.empty((0,), device=q.device, dtype=export_dtype)
    return out, lse, exported


@_attention_triton_op.register_fake
def _attention_triton_fake(q, k, v, scale, export, num_rows, export_dtype):
    B, H, N, D = q.shape
    out = q.new_empty((B, H, N, D))
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    shape = {0: (0,), 1: (B, N, N), 2: (B, H, num_rows, N)}[export]
    return out, lse, q.new_empty(shape, dtype=export_dtype)


@torch.library.custom_op("wsss_fast::attention_triton_backward", mutates_args=())
def _attention_triton_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    scale: float,
    d_mean: torch.Tensor | None,
    d_rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from wsss_fast.kernels import attention as kernels

    return kernels.attention_bwd(q, k, v, out, lse, dout, scale, d_mean=d_mean, d_rows=d_rows)


@_attention_triton_backward_op.register_fake
def _attention_triton_backward_fake(q, k, v, out, lse, dout, scale, d_mean, d_rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_triton_setup_context(ctx, inputs, output):
    q, k, v, scale, export, _num_rows, _export_dtype = inputs
    out, lse, _exported = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.export = scale, (None, "mean", "rows")[export]
    ctx.mark_non_differentiable(lse)


def _attention_triton_backward(ctx, dout, _dlse, d_export):
    q, k, v, out, lse = ctx.saved_tensors
    d_mean, d_rows = _export_grads(ctx.export, d_export)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, from torch ops
        grads = _torch_backward(q, k, v, lse, dout, ctx.scale, d_mean, d_rows, differentiable=True)
    else:
        grads = _attention_triton_backward_op(q, k, v, out, lse, dout, ctx.scale, d_mean, d_rows)
    return (*grads, None, None, None, None)


_attention_triton_op.register_autograd(
    _attention_triton_backward, setup_context=_attention_triton_setup_context
)


def _attention_triton(q, k, v, scale, export, num_rows, export_dtype):
    _checks.dtype_for_backend(OP, "triton", q)
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"wsss_fast.attention: the 'triton' backend takes head dim D in {TRITON_HEAD_DIMS}, "
            f"got {q.shape[-1]}; use the 'torch' backend for other sizes"
        )
    out, _lse, exported = _attention_triton_op(
        q, k, v, scale, _EXPORT_CODE[export], num_rows, export_dtype
    )
    return out if export is None else (out, exported)


_IMPLS = {
    "reference": reference.attention,
    "torch": _attention_torch,
    "triton": _attention_triton,
}
