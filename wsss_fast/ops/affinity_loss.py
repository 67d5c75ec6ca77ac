"""``affinity_loss``: AReAM's deep-layer affinity supervision (DESIGN.md §3.2)."""

from __future__ import annotations

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, reference

OP = "affinity_loss"
IGNORE = 255


def affinity_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_prefix: int,
    scale: float | None = None,
) -> torch.Tensor:
    """AReAM's affinity loss on the head-mean pre-softmax logits of one layer.

    With ``Z = sigmoid(mean_h(q_h k_h^T) * scale)`` on the patch-patch block ``[B, Np, Np]`` and
    ``G_ij = [y_i == y_j]`` over pairs where neither label is 255::

        loss = 0.5 * sum_{G=1} (1 - Z) / (n_pos + 1) + 0.5 * sum_{G=0} Z / (n_neg + 1)

    Args:
        q, k: ``[B, H, N, D]``, one dtype.
        labels: int64 ``[B, Np]`` token labels, ``Np = N - num_prefix``; 255 = ignore.
        num_prefix: number of class/register tokens before the patches.
        scale: defaults to ``D ** -0.5``.

    Returns:
        A 0-dim float32 tensor, differentiable with respect to q and k.

    Only the ``reference`` backend exists so far; the fused backends arrive with their issue.
    """
    q = _checks.tensor(OP, "q", q, ndim=4, layout="[B, H, N, D]")
    k = _checks.tensor(OP, "k", k, ndim=4, layout="[B, H, N, D]")
    _checks.same_shape_and_dtype(OP, q=q, k=k)
    labels = _checks.tensor(OP, "labels", labels, ndim=2, dtypes=(torch.int64,), layout="[B, Np]")
    device = _checks.same_device(OP, q=q, k=k, labels=labels)
    B, _, N, _ = q.shape
    num_prefix = _checks.index_in_range(OP, "num_prefix", num_prefix, 0, N)
    if tuple(labels.shape) != (B, N - num_prefix):
        raise ValueError(
            f"wsss_fast.affinity_loss: labels must be [B, N - num_prefix] = [{B}, {N - num_prefix}], "
            f"got {tuple(labels.shape)}"
        )
    if bool((labels < 0).any()):
        raise ValueError("wsss_fast.affinity_loss: labels must be >= 0 (255 marks ignored tokens)")
    scale = _checks.optional_scale(OP, scale)
    _, impl = _backend.select(OP, _IMPLS, device)
    return impl(q, k, labels, num_prefix=num_prefix, scale=scale)


_IMPLS = {"reference": reference.affinity_loss}
