"""``getam_map``: GETAM's gradient-weighted element-wise map reduction (DESIGN.md §3.5)."""

from __future__ import annotations

import torch

from wsss_fast import _backend
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
        q, k, v, grad_out: ``[B, H, N, D]``, or ``[L, B, H, N, D]`` to sum over L layers.
        scale: defaults to ``D ** -0.5``.
        row: the query row, 0 for the class token.

    Returns:
        ``[B, N]`` float32, differentiable with respect to all four inputs (second order too).

    Only the ``reference`` backend exists so far; the fused backends arrive with their issue.
    """
    q = _checks.tensor(OP, "q", q, ndim=(4, 5), layout="[B, H, N, D] or [L, B, H, N, D]")
    for name, t in (("k", k), ("v", v), ("grad_out", grad_out)):
        _checks.tensor(OP, name, t, ndim=(4, 5), layout="[B, H, N, D] or [L, B, H, N, D]")
    _checks.same_shape_and_dtype(OP, q=q, k=k, v=v, grad_out=grad_out)
    device = _checks.same_device(OP, q=q, k=k, v=v, grad_out=grad_out)
    row = _checks.index_in_range(OP, "row", row, 0, q.shape[-2])
    scale = _checks.optional_scale(OP, scale)
    _, impl = _backend.select(OP, _IMPLS, device)
    return impl(q, k, v, grad_out, scale=scale, row=row)


_IMPLS = {"reference": reference.getam_map}
