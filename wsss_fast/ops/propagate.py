"""``propagate``: multi-layer head-mean affinity propagation of CAMs (DESIGN.md §3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, reference

OP = "propagate"


def _stack(name: str, x) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"wsss_fast.propagate: {name} is an empty sequence of layers")
        for i, t in enumerate(x):
            _checks.tensor(OP, f"{name}[{i}]", t, ndim=4, layout="[B, H, N, D]")
        return torch.stack(list(x))
    return _checks.tensor(OP, name, x, ndim=5, layout="[L, B, H, N, D]")


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
        q, k: ``[L, B, H, N, D]`` or sequences of L tensors ``[B, H, N, D]``.
        cam: ``[B, C, Np]`` with ``Np = N - num_prefix``.
        weights: ``[L]``; defaults to ``1 / L`` each.
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, C, Np]`` in ``cam.dtype``, differentiable with respect to cam, q and k.

    Only the ``reference`` backend exists so far; the fused backends arrive with their issue.
    """
    q = _stack("q", q)
    k = _stack("k", k)
    _checks.same_shape_and_dtype(OP, q=q, k=k)
    cam = _checks.tensor(OP, "cam", cam, ndim=3, layout="[B, C, Np]")
    device = _checks.same_device(OP, q=q, k=k, cam=cam)
    L, B, _, N, _ = q.shape
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
        _checks.same_device(OP, q=q, weights=weights)
    scale = _checks.optional_scale(OP, scale)
    _, impl = _backend.select(OP, _IMPLS, device)
    return impl(q, k, cam, num_prefix=num_prefix, weights=weights, scale=scale)


_IMPLS = {"reference": reference.propagate}
