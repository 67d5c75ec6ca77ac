"""The readable PyTorch reference of every op of DESIGN.md §3: the test oracle.

Each function writes its formula out in eager PyTorch and materialises whatever the formula says,
as the published code does (full ``[B, H, N, N]`` attention, the int64 label matrix of AReAM, the
``[B, C, K, H, W]`` neighbour tensor of PAR and PAMR). It computes in float32, or in float64
when any floating input is float64, and does not validate its arguments: the public ops in
``wsss_fast.ops`` check shapes, dtypes and devices before they call it.

Notation: ``q``, ``k``, ``v`` are ``[B, H, N, D]``; ``s = scale``, default ``D ** -0.5``;
``P_h = softmax(q_h k_h^T s)`` over the last axis; the first ``num_prefix`` tokens are
class/distillation/register tokens and the other ``Np = N - num_prefix`` are patch tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
"""Token label that ``affinity_loss`` leaves out of every pair."""


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any floating tensor among ``tensors`` is float64, else float32."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``softmax(q k^T s)`` over the last axis, ``[..., N, N]``, for q, k ``[..., N, D]``."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * s, dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    export: str | None = None,
    num_rows: int = 1,
    export_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that can also hand back the attention probabilities.

    Args:
        q, k, v: ``[B, H, N, D]``, any floating dtype.
        scale: ``s``; ``None`` means ``D ** -0.5``.
        export: ``None``, ``"mean"`` or ``"rows"``.
        num_rows: how many leading query rows ``export="rows"`` returns.
        export_dtype: dtype of the export.

    Returns:
        ``out = P v``, ``[B, H, N, D]`` in ``q.dtype``, where ``P = softmax(q k^T s)``
        (``[B, H, N, N]``, materialised). With ``export="mean"`` also ``P.mean(1)``, ``[B, N, N]``;
        with ``export="rows"`` also ``P[:, :, :num_rows, :]``, ``[B, H, num_rows, N]``; the export
        comes back in ``export_dtype``.

    ``out`` and the export are both differentiable with respect to q, k and v.
    """
    dtype = _compute_dtype(q, k, v)
    p = _softmax_attention(q.to(dtype), k.to(dtype), scale)
    out = (p @ v.to(dtype)).to(q.dtype)
    if export is None:
        return out
    exported = p.mean(dim=1) if export == "mean" else p[:, :, :num_rows, :]
    return out, exported.to(export_dtype)


def affinity_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_prefix: int,
    scale: float | None = None,
) -> torch.Tensor:
    """AReAM's deep-layer affinity loss (AFA's ``get_aff_loss`` on AReAM's ``seg_to_aff`` labels).

    Args:
        q, k: ``[B, H, N, D]``, any floating dtype.
        labels: ``[B, Np]`` int64 patch-token labels; ``255`` means ignore.
        num_prefix: ``p``, the number of leading non-patch tokens (``Np = N - p``).
        scale: ``s``; ``None`` means ``D ** -0.5``.

    With ``Z = sigmoid(mean_h(q_h k_h^T) s)[:, p:, p:]`` (``[B, Np, Np]``) and the int64 label
    matrix ``G_ij = [y_i == y_j]``, set to 255 where ``y_i`` or ``y_j`` is 255 (the diagonal is an
    ordinary positive pair, as in AReAM's ``seg_to_aff``), ``n_pos`` and ``n_neg`` the number of
    entries with ``G == 1`` and ``G == 0`` over the whole batch::

        loss = 0.5 * sum_{G=1} (1 - Z) / (n_pos + 1) + 0.5 * sum_{G=0} Z / (n_neg + 1)

    Returns:
        The loss, a 0-dim tensor in float32 (float64 if q or k is), differentiable with respect
        to q and k. All-ignored labels give 0 with zero gradients.
    """
    dtype = _compute_dtype(q, k)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)).mean(dim=1) * s
    z = torch.sigmoid(logits[:, num_prefix:, num_prefix:])

    num_patches = labels.shape[1]
    label_rows = labels.unsqueeze(1).expand(-1, num_patches, -1)  # [b, i, j] = y_j
    target = (label_rows == label_rows.transpose(1, 2)).to(torch.int64)
    ignored = labels == IGNORE_INDEX
    target[ignored.unsqueeze(1) | ignored.unsqueeze(2)] = IGNORE_INDEX

    pos = (target == 1).to(dtype)
    neg = (target == 0).to(dtype)
    pos_loss = (pos * (1 - z)).sum() / (pos.sum() + 1)
    neg_loss = (neg * z).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss


def propagate(
    q: torch.Tensor,
    k: torch.Tensor,
    cam: torch.Tensor,
    *,
    num_prefix: int,
    weights: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-layer affinity propagation of a CAM (AReAM's online CAM refinement).

    Args:
        q, k: stacked layers ``[L, B, H, N, D]``, any floating dtype.
        cam: ``[B, C, Np]`` with ``Np = N - num_prefix``.
        num_prefix: ``p``, the number of leading non-patch tokens.
        weights: ``[L]`` layer weights ``w_l``; ``None`` means ``1 / L`` each.
        scale: ``s``; ``None`` means ``D ** -0.5``.

    With ``P_{l,h} = softmax(q_{l,h} k_{l,h}^T s)`` over all N keys (``[L, B, H, N, N]``,
    materialised) and ``W = sum_l w_l * mean_h(P_{l,h})[:, p:, p:]`` (``[B, Np, Np]``)::

        out[b, c, m] = sum_n W[b, m, n] * cam[b, c, n]

    Returns:
        ``out``, ``[B, C, Np]`` in ``cam.dtype``, differentiable with respect to cam, q and k
        (and ``weights`` when it is a tensor that requires grad).
    """
    dtype = _compute_dtype(q, k, cam, weights)
    num_layers = q.shape[0]
    if weights is None:
        weights = torch.full((num_layers,), 1.0 / num_layers)
    weights = torch.as_tensor(weights).to(device=q.device, dtype=dtype)

    p = _softmax_attention(q.to(dtype), k.to(dtype), scale)
    w = torch.einsum("l,lbmn->bmn", weights, p.mean(dim=2))[:, num_prefix:, num_prefix:]
    out = torch.einsum("bmn,bcn->bcm", w, cam.to(dtype))
    return out.to(cam.dtype)


def random_walk(aff: torch.Tensor, cam: torch.Tensor, *, beta: float, steps: int) -> torch.Tensor:
    """Random-walk refinement of a CAM (PSA / IRN), ``steps`` steps of one transition matrix.

    Args:
        aff: ``[B, M, M]`` non-negative affinities; no column may be all zero.
        cam: ``[B, C, M]``.
        beta: the exponent applied to ``aff``.
        steps: the number of walk steps (PSA: ``2 ** logt``; IRN: ``2 ** exp_times``).

    With the column-stochastic ``T_ij = aff_ij^beta / sum_i aff_ij^beta`` (``[B, M, M]``), the
    result is ``cam @ T^steps``, computed as ``steps`` applications of ``x <- x @ T``; ``T^steps``
    is never formed. Each output entry is a convex combination of the entries of ``cam``.

    ``T`` is evaluated as ``r_ij^beta / sum_i r_ij^beta`` with ``r_ij = aff_ij / max_i aff_ij``,
    the same matrix: ``aff^beta`` itself overflows float32 for ``aff`` near 1e5 with ``beta = 8``
    and underflows to 0 (0 / 0 = NaN) for ``aff`` below 1e-6, while ``r`` lies in [0, 1] with a 1
    in every column, so every column sum lies in [1, M].

    Returns:
        ``[B, C, M]`` in ``cam.dtype``, differentiable with respect to aff and cam.
    """
    dtype = _compute_dtype(aff, cam)
    a = aff.to(dtype)
    # T does not depend on the column scale, so the maximum is a constant for autograd.
    t = (a / a.detach().amax(dim=1, keepdim=True)) ** beta
    t = t / t.sum(dim=1, keepdim=True)
    x = cam.to(dtype)
    for _ in range(steps):
        x = x @ t
    return x.to(cam.dtype)


def getam_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float | None = None,
    row: int = 0,
) -> torch.Tensor:
    """GETAM's gradient-weighted element-wise attention map of one query row.

    Args:
        q, k, v: ``[B, H, N, D]``, or stacked layers ``[L, B, H, N, D]``; any floating dtype.
        grad_out: same shape; the gradient of the class score with respect to each layer's
            attention output ``out = P v`` (per head, before the heads are merged).
        scale: ``s``; ``None`` means ``D ** -0.5``.
        row: the query row (0: the class token).

    With ``P_h = softmax(q_h k_h^T s)`` (``[..., H, N, N]``, materialised), ``a_h = P_h[row, :]``
    and ``g_h = grad_out_h[row, :] v_h^T`` (``[..., H, N]``; this is ``d score / d P_h[row, :]``
    because ``out_h[row] = P_h[row, :] v_h``)::

        map = mean_h relu(g_h * a_h) * mean_h relu(g_h)

    Returns:
        ``[B, N]`` in float32 (float64 if any input is), summed over L for stacked input.
        Differentiable with respect to q, k, v and grad_out, to any order.
    """
    dtype = _compute_dtype(q, k, v, grad_out)
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    a = _softmax_attention(q, k, scale)[..., row, :]
    g = torch.einsum("...hd,...hnd->...hn", grad_out[..., row, :], v)
    gmap = F.relu(g * a).mean(dim=-2) * F.relu(g).mean(dim=-2)
    return gmap.sum(dim=0) if q.dim() == 5 else gmap


def _window_offsets(d: int, *, with_centre: bool = False) -> list[tuple[int, int]]:
    """``(dy, dx)`` of a 3x3 window dilated by ``d``, row-major like the published shift kernels."""
    return [(dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d) if with_centre or (dy, dx) != (0, 0)]


def _dilated_neighbours(
    x: torch.Tensor, dilations: tuple[int, ...], *, with_centre: bool = False
) -> torch.Tensor:
    """The 3x3 windows of ``x`` at every dilation, borders replicated, stacked on a new axis 2.

    ``x`` is ``[B, C, H, W]``; the result is ``[B, C, K, H, W]`` with ``K = 8 * len(dilations)``
    (the ring of each window, row-major, as the published shift kernels order it) or
    ``9 * len(dilations)`` with ``with_centre``. Entry ``[b, c, k, y, x]`` is ``x`` at
    ``(clamp(y + dy_k), clamp(x + dx_k))``.
    """
    height, width = x.shape[-2:]
    taps = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        for dy, dx in _window_offsets(d, with_centre=with_centre):
            taps.append(padded[..., d + dy : d + dy + height, d + dx : d + dx + width])
    return torch.stack(taps, dim=2)


def _masks_at_image_size(
    masks: torch.Tensor, image: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``masks`` in ``dtype``, resized bilinearly (``align_corners=True``) to the image if needed."""
    masks = masks.to(dtype)
    if masks.shape[-2:] != image.shape[-2:]:
        masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    return masks


def par(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
    w_pos: float = 0.01,
) -> torch.Tensor:
    """AReAM/AFA pixel-adaptive refinement (``networks/PAR.py``).

    Args:
        image: ``[B, 3, H, W]``, any range (AReAM passes it de-normalised to [0, 1]).
        masks: ``[B, C, h, w]``; resized to ``(H, W)`` bilinearly with ``align_corners=True``
            when ``(h, w) != (H, W)``.
        dilations: the neighbours of pixel i are the 8 ring positions of a 3x3 window dilated by
            each ``d`` (``K = 8 * len(dilations)``), coordinates clamped to the image.
        iters: the number of refinement updates.
        w_pos: the weight of the position term.

    With ``sigma_i`` the unbiased standard deviation, per image channel, of the K neighbour
    values of pixel i, ``len_j`` the offset length of neighbour j (``d`` on the axes, ``sqrt(2) d``
    on the diagonals) and ``sigma_p`` the unbiased standard deviation of the K lengths::

        colour_ij = mean_channels -(|I_i - I_j| / (sigma_i + 1e-8) / 0.3) ** 2
        position_j = -(len_j / (sigma_p + 1e-8) / 0.3) ** 2
        aff_ij = softmax_j(colour_ij) + w_pos * softmax_j(position_j)
        m_i <- sum_j aff_ij m_j                      (``iters`` times, every channel)

    so the weights of a pixel sum to ``1 + w_pos``. The ``[B, C, K, H, W]`` neighbour tensor is
    built at every iteration, as in the published code.

    Returns:
        ``[B, C, H, W]`` in ``masks.dtype``. Not meant to be differentiated (the methods run it
        under ``no_grad``).
    """
    dtype = _compute_dtype(image, masks)
    image = image.to(dtype)
    refined = _masks_at_image_size(masks, image, dtype)

    neighbours = _dilated_neighbours(image, dilations)  # [B, 3, K, H, W]
    sigma = neighbours.std(dim=2, keepdim=True)
    colour = -(((neighbours - image.unsqueeze(2)).abs() / (sigma + 1e-8) / 0.3) ** 2)
    colour = colour.mean(dim=1, keepdim=True)  # [B, 1, K, H, W]

    offsets = [offset for d in dilations for offset in _window_offsets(d)]
    lengths = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=dtype)
    position = -((lengths / (lengths.std() + 1e-8) / 0.3) ** 2)
    position = position.to(image.device).view(1, 1, -1, 1, 1)

    aff = torch.softmax(colour, dim=2) + w_pos * torch.softmax(position, dim=2)
    for _ in range(iters):
        refined = (_dilated_neighbours(refined, dilations) * aff).sum(dim=2)
    return refined.to(masks.dtype)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
) -> torch.Tensor:
    """GETAM's pixel-adaptive mask refinement (``pamr.py``, from Araslanov and Roth's 1-stage-wseg).

    Args:
        image: ``[B, 3, H, W]``, any range (GETAM passes raw 0-255 RGB).
        masks: ``[B, C, h, w]``; resized to ``(H, W)`` bilinearly with ``align_corners=True``
            when ``(h, w) != (H, W)``.
        dilations: the neighbours of pixel i are the 8 ring positions of a 3x3 window dilated by
            each ``d`` (``K = 8 * len(dilations)``), coordinates clamped to the image.
        iters: the number of refinement updates.

    With ``sigma_i`` the unbiased standard deviation, per image channel, of the full 3x3 windows
    (centre included) of pixel i at every dilation, pooled (``9 * len(dilations)`` values, the
    centre counted once per dilation)::

        aff_ij = softmax_j(mean_channels -|I_i - I_j| / (1e-8 + 0.1 * sigma_i))
        m_i <- sum_j aff_ij m_j                      (``iters`` times, every channel)

    There is no position term; the weights of a pixel sum to 1. The ``[B, C, K, H, W]`` neighbour
    tensor is built at every iteration, as in the published code.

    Returns:
        ``[B, C, H, W]`` in ``masks.dtype``. Not meant to be differentiated (GETAM runs it under
        ``no_grad``).
    """
    dtype = _compute_dtype(image, masks)
    image = image.to(dtype)
    refined = _masks_at_image_size(masks, image, dtype)

    sigma = _dilated_neighbours(image, dilations, with_centre=True).std(dim=2, keepdim=True)
    distance = (_dilated_neighbours(image, dilations) - image.unsqueeze(2)).abs()
    aff = torch.softmax((-distance / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True), dim=2)
    for _ in range(iters):
        refined = (_dilated_neighbours(refined, dilations) * aff).sum(dim=2)
    return refined.to(masks.dtype)
