"""``getam_map``: GETAM's gradient-weighted element-wise map reduction (DESIGN.md §3.5).

The published code keeps every layer's ``[B, H, N, N]`` attention and its gradient to read one
row of each. Only row ``row`` of ``P_h`` and of its gradient enter the map, so every backend here
forms just those rows: ``a_h = softmax(q_h[row] k_h^T s)`` and ``g_h = grad_out_h[row] v_h^T``,
``[..., H, N]`` numbers per layer, from one pass over k and v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_fast import _backend, _ext
from wsss_fast.ops import _checks, reference

OP = "getam_map"


def getam_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float | None = None,
    row: int = 0,
) -> torch.Tensor:
    """GETAM's map for one layer (or the sum over stacked layers).

    With ``a_h = softmax(q_h[row] k_h^T * scale)`` and ``g_h = grad_out_h[row] v_h^T`` (the gradient
    with respect to ``P_h[row, :]`` when ``grad_out`` is the gradient with respect to the attention
    output), returns ``mean_h relu(g_h * a_h) * mean_h relu(g_h)``.

    Args:
        q, k, v, grad_out: ``[B, H, N, D]``, or ``[L, B, H, N, D]`` to sum over L layers (in one
            call); one dtype for all four: float32, float16, bfloat16 or float64. The ``cuda``
            backend's GPU kernels take ``D <= 256``.
        scale: defaults to ``D ** -0.5``.
        row: the query row, 0 for the class token.

    Returns:
        ``[B, N]`` float32 (float64 for float64 inputs); arithmetic is carried out in that dtype.
        Differentiable with respect to all four inputs: to any order on the ``reference`` and
        ``torch`` backends, to first order on ``cuda`` (its backward raises under
        ``create_graph=True``). ``relu``'s derivative at 0 is taken to be 0, as in PyTorch.

    Host syncs: none; the op reads no tensor values on the host, so it runs on meta and fake
    tensors and under CUDA-graph capture.

    Example::

        grads = torch.autograd.grad(score, outs)  # outs[l]: [B, H, N, D] per-head outputs
        cam = sum(wsss_fast.getam_map(q[l], k[l], v[l], grads[l]) for l in layers)
        # or, stacked: wsss_fast.getam_map(torch.stack(q), ..., torch.stack(grads))
    """
    q = _checks.tensor(OP, "q", q, ndim=(4, 5), layout="[B, H, N, D] or [L, B, H, N, D]")
    for name, t in (("k", k), ("v", v), ("grad_out", grad_out)):
        _checks.tensor(OP, name, t, ndim=(4, 5), layout="[B, H, N, D] or [L, B, H, N, D]")
    _checks.same_shape_and_dtype(OP, q=q, k=k, v=v, grad_out=grad_out)
    device = _checks.same_device(OP, q=q, k=k, v=v, grad_out=grad_out)
    row = _checks.index_in_range(OP, "row", row, 0, q.shape[-2])
    scale = _checks.optional_scale(OP, scale)
    _, impl = _backend.select(OP, _IMPLS, device, kernel="getam_map_forward")
    return impl(q, k, v, grad_out, scale=scale, row=row)


def _resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


# ---------------------------------------------------------------------------------------------
# torch backend: the row only, in differentiable torch ops, so autograd gives every order.


def _getam_map_torch(q, k, v, grad_out, *, scale, row):
    """Saves k and v (upcast to float32 when they are float16/bfloat16) and ``[..., H, N]``
    tensors for backward; nothing N x N."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = _resolve_scale(q, scale)
    q_row = q[..., row : row + 1, :].to(acc)  # [..., H, 1, D]
    go_row = grad_out[..., row : row + 1, :].to(acc)
    a = torch.softmax((q_row @ k.to(acc).transpose(-2, -1)).squeeze(-2) * s, dim=-1)  # [..., H, N]
    g = (go_row @ v.to(acc).transpose(-2, -1)).squeeze(-2)
    gmap = F.relu(g * a).mean(dim=-2) * F.relu(g).mean(dim=-2)  # [..., N]
    return gmap.sum(dim=0) if q.dim() == 5 else gmap


# ---------------------------------------------------------------------------------------------
# cuda backend: the registered ops wsss_fast::getam_map_forward / getam_map_backward.


def _getam_map_cuda(q, k, v, grad_out, *, scale, row):
    s = _resolve_scale(q, scale)
    if q.dim() == 4:
        q, k, v, grad_out = (t.unsqueeze(0) for t in (q, k, v, grad_out))
    return torch.ops.wsss_fast.getam_map_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous(), s, row
    )


def _getam_map_reference(q, k, v, grad_out, *, scale, row):
    return reference.getam_map(q, k, v, grad_out, scale=scale, row=row)


_IMPLS = {
    "reference": _getam_map_reference,
    "torch": _getam_map_torch,
    "cuda": _getam_map_cuda,
}


# An extension built before this op existed lacks the schemas; importing must still work.
if _ext.has_op("getam_map_forward"):

    @torch.library.register_fake("wsss_fast::getam_map_forward")
    def _getam_map_forward_fake(q, k, v, grad_out, scale, row):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty((q.shape[1], q.shape[3]), dtype=acc)

    @torch.library.register_fake("wsss_fast::getam_map_backward")
    def _getam_map_backward_fake(grad, q, k, v, grad_out, scale, row):
        return (
            torch.empty_like(q),
            torch.empty_like(k),
            torch.empty_like(v),
            torch.empty_like(grad_out),
        )

    def _getam_map_setup_context(ctx, inputs, output):
        q, k, v, grad_out, scale, row = inputs
        ctx.save_for_backward(q, k, v, grad_out)
        ctx.scale, ctx.row = scale, row

    def _getam_map_backward(ctx, grad):
        if torch.is_grad_enabled():
            raise _backend.BackendNotImplementedError(
                "wsss_fast.getam_map: the 'cuda' backend's backward is first order only, and it "
                "was called with create_graph=True; for second-order gradients use "
                "wsss_fast.use_backend('torch')"
            )
        q, k, v, grad_out = ctx.saved_tensors
        dq, dk, dv, dgo = torch.ops.wsss_fast.getam_map_backward(
            grad.contiguous(), q, k, v, grad_out, ctx.scale, ctx.row
        )
        needs = ctx.needs_input_grad
        return (
            dq if needs[0] else None,
            dk if needs[1] else None,
            dv if needs[2] else None,
            dgo if needs[3] else None,
            None,
            None,
        )

    torch.library.register_autograd(
        "wsss_fast::getam_map_forward",
        _getam_map_backward,
        setup_context=_getam_map_setup_context,
    )
