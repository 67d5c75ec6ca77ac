"""``affinity_loss``: AReAM's deep-layer affinity supervision (DESIGN.md §3.2).

The head-mean logit is one GEMM over concatenated heads, ``mean_h q_h k_h^T = Q_cat K_cat^T / H``
(``Q_cat`` ``[B, Np, H*D]``), so the loss needs no per-head or ``[B, Np, Np]`` tensor: logits are
made and consumed tile by tile, labels are compared on the fly (``G_ij = [y_i == y_j]``), and the
pair counts have closed forms from per-image label counts::

    n_pos = sum_b sum_c n_{b,c}^2,    n_neg = sum_b n_{b,valid}^2 - n_pos

The gradient of a logit ``x_ij`` is ``-sigma'(x)/(2(n_pos+1))`` on positive pairs,
``+sigma'(x)/(2(n_neg+1))`` on negative pairs and 0 on ignored ones.

Backends:
- ``reference``: materialises the head-mean logits and the int64 ``[B, Np, Np]`` label matrix.
- ``torch``: pure PyTorch over chunks of query rows (``wsss_fast.ops.set_torch_chunk_elements`` bounds the
  transient ``[B, rows, Np]`` working set); saves q, k and labels only and recomputes the logits
  chunk by chunk in backward. The backward is written with out-of-place ops, so a backward with
  ``create_graph=True`` is itself differentiable (double backward is exact).
- ``triton``: the kernels of ``wsss_fast.kernels.affinity`` (forward over ``(i, j, b)`` tiles into
  per-tile partial sums, backward dq per query block and dk per key block, no atomics),
  registered as the custom ops ``wsss_fast::affinity_loss_triton`` and
  ``wsss_fast::affinity_loss_triton_backward`` with fake kernels. A backward with
  ``create_graph=True`` runs the differentiable ``torch`` backward instead.
"""

from __future__ import annotations

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, _chunks, reference

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
    ``G_ij = [y_i == y_j]`` over pairs where neither label is 255 (the diagonal counts), ``n_pos``
    and ``n_neg`` the numbers of positive and negative pairs over the whole batch::

        loss = 0.5 * sum_{G=1} (1 - Z) / (n_pos + 1) + 0.5 * sum_{G=0} Z / (n_neg + 1)

    Args:
        q, k: ``[B, H, N, D]``, one dtype (float32, float16, bfloat16; float64 on the ``reference``
            and ``torch`` backends), any strides (e.g. permuted views of a fused qkv projection).
        labels: int64 ``[B, Np]`` token labels, ``Np = N - num_prefix``; 255 = ignore.
        num_prefix: number of class/register tokens before the patches (their rows and columns
            take no part).
        scale: defaults to ``D ** -0.5``.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs), differentiable with respect to q and
        k (the labels are constants). All-ignored labels give a loss of 0 and zero gradients.
        The ``torch`` and ``triton`` backends never form a ``[B, Np, Np]`` tensor and save only
        q, k and labels for backward.

    Host syncs: one per call on a GPU, for the check that no label is negative; it is skipped on
    meta and fake tensors, under ``torch.compile`` and during CUDA-graph capture.

    Example::

        with wsss_fast.capture(model, keep_qkv=True) as cap:
            logits = model(images)
        loss_aff = sum(wsss_fast.affinity_loss(q, k, labels, num_prefix=1)
                       for q, k in zip(cap.q[7:], cap.k[7:])) / 5
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
    if _checks.values_readable(labels) and bool((labels < 0).any()):
        raise ValueError("wsss_fast.affinity_loss: labels must be >= 0 (255 marks ignored tokens)")
    scale = _checks.optional_scale(OP, scale)
    backend, impl = _backend.select(OP, _IMPLS, device)
    if backend == "reference":
        return impl(q, k, labels, num_prefix=num_prefix, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return impl(q, k, labels, num_prefix, s)


# ---------------------------------------------------------------------------------------------
# Shared by the torch and triton backends: closed-form pair counts and gradient coefficients.


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pair_counts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_pos, n_neg)``, int64 0-dim tensors, from per-image label counts (no host sync).

    ``n_pos = sum_b sum_c n_{b,c}^2`` is the sum over valid tokens of the size of their class in
    their image, read off a sorted copy of each row; ``n_neg = sum_b n_{b,valid}^2 - n_pos``.
    """
    valid = labels != IGNORE
    ordered = labels.sort(dim=1).values
    same = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    n_pos = (same * valid).sum()
    n_valid = valid.sum(dim=1)
    return n_pos, (n_valid * n_valid).sum() - n_pos


def _pair_weights(labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(0.5 / (n_pos + 1), 0.5 / (n_neg + 1))`` as 0-dim tensors of ``dtype``."""
    n_pos, n_neg = pair_counts(labels)
    return 0.5 / (n_pos.to(dtype) + 1), 0.5 / (n_neg.to(dtype) + 1)


# ---------------------------------------------------------------------------------------------
# torch backend: chunks of query rows over the concatenated-heads GEMM.


def _heads_cat(t: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, N, D]`` -> the patch tokens with heads concatenated, ``[B, Np, H*D]``."""
    B, H, N, D = t.shape
    return t[:, :, num_prefix:].transpose(1, 2).reshape(B, N - num_prefix, H * D).to(dtype)


def _chunk_rows(B: int, Np: int) -> int:
    return _chunks.chunk_rows(B * Np)


def _pair_masks(labels: torch.Tensor, i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(positive, negative)`` masks ``[B, i1 - i0, Np]`` of the label pairs of rows
    ``i0:i1`` against every column, compared on the fly."""
    valid = labels != IGNORE
    both = valid[:, i0:i1, None] & valid[:, None, :]
    same = labels[:, i0:i1, None] == labels[:, None, :]
    return both & same, both & ~same


def _torch_forward(q, k, labels, num_prefix, scale):
    """(loss, pos_sum, neg_sum) in float32 (float64 for float64 inputs)."""
    B, H, N, _ = q.shape
    Np = N - num_prefix
    acc = _acc_dtype(q)
    qc, kc = _heads_cat(q, num_prefix, acc), _heads_cat(k, num_prefix, acc)
    kt = kc.transpose(1, 2)
    pos_sum = torch.zeros((), device=q.device, dtype=acc)
    neg_sum = torch.zeros((), device=q.device, dtype=acc)
    rows = _chunk_rows(B, Np)
    for i0 in range(0, Np, rows):
        i1 = min(Np, i0 + rows)
        z = torch.sigmoid((qc[:, i0:i1] @ kt).mul_(scale / H))
        pos, neg = _pair_masks(labels, i0, i1)
        pos_sum += torch.where(pos, 1 - z, 0).sum()
        neg_sum += torch.where(neg, z, 0).sum()
    w_pos, w_neg = _pair_weights(labels, acc)
    return pos_sum * w_pos + neg_sum * w_neg


def _torch_backward(q, k, labels, grad, num_prefix, scale):
    """(dq, dk) by recomputing the logits per chunk of query rows, with out-of-place ops only
    (autograd can differentiate this function: double backward).

    ``dx = grad * (-w_pos on G=1, +w_neg on G=0, 0 if ignored) * z (1 - z)``,
    ``dQ_cat = (s / H) dx K_cat``, ``dK_cat = (s / H) dx^T Q_cat``.
    """
    B, H, N, D = q.shape
    Np = N - num_prefix
    acc = _acc_dtype(q)
    qc, kc = _heads_cat(q, num_prefix, acc), _heads_cat(k, num_prefix, acc)
    w_pos, w_neg = _pair_weights(labels, acc)
    f = scale / H
    coef_pos, coef_neg = -w_pos * grad.to(acc) * f, w_neg * grad.to(acc) * f
    dq_chunks = []
    dkc = torch.zeros_like(kc)
    rows = _chunk_rows(B, Np)
    for i0 in range(0, Np, rows):
        i1 = min(Np, i0 + rows)
        q_c = qc[:, i0:i1]
        z = torch.sigmoid(q_c @ kc.transpose(1, 2) * f)
        pos, neg = _pair_masks(labels, i0, i1)
        dz = z * (1 - z)
        dx = torch.where(pos, dz * coef_pos, torch.where(neg, dz * coef_neg, 0))
        dq_chunks.append(dx @ kc)
        dkc = dkc + dx.transpose(1, 2) @ q_c

    def heads(t_cat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        patches = t_cat.reshape(B, Np, H, D).transpose(1, 2).to(like.dtype)
        prefix = patches.new_zeros((B, H, num_prefix, D))
        return torch.cat([prefix, patches], dim=2)

    return heads(torch.cat(dq_chunks, dim=1), q), heads(dkc, k)


class AffinityLossTorchFunction(torch.autograd.Function):
    """Autograd of the ``torch`` backend: saves q, k and labels, nothing ``Np x Np``."""

    @staticmethod
    def forward(ctx, q, k, labels, num_prefix, scale):
        loss = _torch_forward(q, k, labels, num_prefix, scale)
        ctx.save_for_backward(q, k, labels)
        ctx.num_prefix, ctx.scale = num_prefix, scale
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, k, labels = ctx.saved_tensors
        dq, dk = _torch_backward(q, k, labels, grad, ctx.num_prefix, ctx.scale)
        return dq, dk, None, None, None


def _affinity_loss_torch(q, k, labels, num_prefix, scale):
    return AffinityLossTorchFunction.apply(q, k, labels, num_prefix, scale)


# ---------------------------------------------------------------------------------------------
# triton backend, as custom ops (torch.compile traces them through their fake kernels).


@torch.library.custom_op("wsss_fast::affinity_loss_triton", mutates_args=())
def _affinity_loss_triton_op(
    q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, num_prefix: int, scale: float
) -> torch.Tensor:
    """The loss, a 0-dim float32 tensor: kernel partial sums combined with the closed-form counts."""
    from wsss_fast.kernels import affinity as kernels

    pos_sum, neg_sum = kernels.affinity_loss_fwd(q, k, labels, num_prefix, scale)
    w_pos, w_neg = _pair_weights(labels, torch.float64)
    return (pos_sum.double() * w_pos + neg_sum.double() * w_neg).float()


@_affinity_loss_triton_op.register_fake
def _affinity_loss_triton_fake(q, k, labels, num_prefix, scale):
    return q.new_empty((), dtype=torch.float32)


@torch.library.custom_op("wsss_fast::affinity_loss_triton_backward", mutates_args=())
def _affinity_loss_triton_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    labels: torch.Tensor,
    grad: torch.Tensor,
    num_prefix: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) ``[B, H, N, D]`` in q's dtype for the gradient ``grad`` (0-dim) on the loss."""
    from wsss_fast.kernels import affinity as kernels

    w_pos, w_neg = _pair_weights(labels, torch.float32)
    return kernels.affinity_loss_bwd(q, k, labels, grad, w_pos, w_neg, num_prefix, scale)


@_affinity_loss_triton_backward_op.register_fake
def _affinity_loss_triton_backward_fake(q, k, labels, grad, num_prefix, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _affinity_loss_triton_setup_context(ctx, inputs, output):
    q, k, labels, num_prefix, scale = inputs
    ctx.save_for_backward(q, k, labels)
    ctx.num_prefix, ctx.scale = num_prefix, scale


def _affinity_loss_triton_backward(ctx, grad):
    q, k, labels = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, from torch ops
        dq, dk = _torch_backward(q, k, labels, grad, ctx.num_prefix, ctx.scale)
    else:
        dq, dk = _affinity_loss_triton_backward_op(q, k, labels, grad, ctx.num_prefix, ctx.scale)
    return dq, dk, None, None, None


_affinity_loss_triton_op.register_autograd(
    _affinity_loss_triton_backward, setup_context=_affinity_loss_triton_setup_context
)


def _affinity_loss_triton(q, k, labels, num_prefix, scale):
    _checks.dtype_for_backend(OP, "triton", q)
    return _affinity_loss_triton_op(q, k, labels, num_prefix, float(scale))


_IMPLS = {
    "reference": reference.affinity_loss,
    "torch": _affinity_loss_torch,
    "triton": _affinity_loss_triton,
}
