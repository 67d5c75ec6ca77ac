"""AReAM's two affinity ops, fused (DESIGN.md §3.2 and §3.3): no ``N x N`` tensor is stored.

``affinity_loss`` (q, k ``[B, H, N, D]``, labels ``[B, Np]``, the first ``p`` tokens are prefix):
- ``affinity_loss_fwd``: one program per ``(i-block, j-block, b)`` tile of the patch-patch block
  makes the head-mean logits ``x = (s / H) sum_h q_h k_h^T`` with the head loop inside the program
  (any strides), compares labels on the fly and writes its sums of ``1 - sigmoid(x)`` over positive
  pairs and ``sigmoid(x)`` over negative pairs to a ``[B, tiles, 2]`` buffer that the launcher
  reduces (deterministic, no atomics).
- ``affinity_loss_bwd``: ``dx = c * sigmoid'(x)`` with ``c`` per pair kind; dq per query block and
  dk per key block, each recomputing the logits. The per-head gradient tiles ``dx k_h`` /
  ``dx^T q_h`` are added into float32 buffer rows that only the owning program touches, with a CTA
  barrier between streamed blocks (no atomics). Rows are addressed by loop-invariant int32
  offsets from a scalar per-head base: 64-bit pointer tiles carried through the head loops made
  ptxas spill.

``propagate`` (L layers of q, k ``[B, H, N, D]``, read through a table of per-layer pointers, so a
sequence of layers is never stacked; cam ``[B, C, Np]``):
- ``propagate_fwd``: one program per block of patch query rows and ``b`` runs, for every layer
  ``l`` and head ``h``, an online softmax over all N keys with values ``V = cam^T`` (0 on prefix
  keys, ``C`` padded to a block of >= 16) and accumulates ``(w_l / H) * P V`` -- all layers and
  heads in one launch. On a GPU with few row blocks the ``(l, h)`` pairs are split over a second
  grid axis into float32 partial outputs that the launcher sums.
- ``propagate_bwd``: a recompute pass stores the base-2 log-sum-exp and ``rowsum(dout * P V)``
  per ``(l, b, h, row)`` (no per-(l, h) output exists to take it from), then one kernel for dq per
  query block and one for dk per key block that also accumulates ``dV = sum_h P^T dout`` of its
  layer (summed over layers by the launcher; ``dcam`` is its patch rows).

Floats are accumulated in float32. float32 inputs use exact fp32 ``tl.dot`` (``"ieee"``);
float16/bfloat16 inputs the native dot, with probabilities, CAM values and gradient tiles cast to
q's dtype for it. Head dims and channel counts that are not powers of two are zero-padded in the
loads (``BLOCK_D``, ``BLOCK_C`` >= 16, tl.dot's minimum).
"""

import math

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(math.log2(math.e))
_IGNORE = tl.constexpr(255)


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee" keeps float32 exact (no TF32); the setting is ignored for 16-bit operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block(n: int) -> int:
    """The padded block for a head dim or a channel count: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def _int32_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, H, N, D]``, copied contiguous in the rare case that an offset inside one head,
    ``n * stride_n + d * stride_d``, would not fit the kernels' int32 row offsets."""
    _, _, N, D = t.shape
    if (N - 1) * abs(t.stride(2)) + (D - 1) * abs(t.stride(3)) < 2**31:
        return t
    t = t.contiguous()
    if N * D >= 2**31:
        raise ValueError(f"wsss_fast: N * D = {N * D} is too large for the Triton kernels")
    return t


# ---------------------------------------------------------------------------------------------
# affinity_loss


@triton.jit
def _affinity_logits_tile(
    A,
    Bm,
    a_offs,
    b_offs,
    a_mask,
    b_mask,
    H,
    stride_ah,
    stride_bh,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # sum_h a_h . b_h over one [BLOCK_A, BLOCK_B] tile in float32. A and Bm are scalar pointers at
    # head 0 of one image, advanced by a head stride per step; the int32 offset tiles of the rows
    # inside a head are loop-invariant (64-bit pointer tiles carried through the head loop cost
    # more registers than the tiles themselves).
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for _ in range(H):
        a = tl.load(A + a_offs, mask=a_mask, other=0.0)
        b = tl.load(Bm + b_offs, mask=b_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        A += stride_ah
        Bm += stride_bh
    return acc


@triton.jit
def _row_tile(tok, mask_tok, offs_d, D, stride_n, stride_d, MASK_D: tl.constexpr):
    # (int32 offsets, mask) of the [len(tok), BLOCK_D] rows tok of one head; the launcher checks
    # that every offset inside a head fits in int32.
    offs = tok[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASK_D:
        mask = mask_tok[:, None] & (offs_d < D)[None, :]
    else:
        mask = mask_tok[:, None] & (offs_d >= 0)[None, :]
    return offs, mask


@triton.jit
def _affinity_loss_fwd_kernel(
    Q,
    K,
    Labels,
    Partial,
    logit_scale,
    H,
    D,
    num_prefix,
    Np,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_yb,
    stride_yn,
    stride_pb,
    stride_pt,
    stride_pk,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    MASK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial[b, t] = (sum_{G=1} (1 - z), sum_{G=0} z) over one [BLOCK_I, BLOCK_J] tile t.

    x_ij = logit_scale * sum_h q_h[p + i] . k_h[p + j] (logit_scale = s / H), z = sigmoid(x);
    G_ij = [y_i == y_j] where neither label is 255. Gradient: see _affinity_loss_bwd_kernel.
    """
    # Token indices stay int32 (offsets inside one head); the batch offset is int64.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    mask_i = offs_i < Np
    mask_j = offs_j < Np

    q_offs, q_mask = _row_tile(
        num_prefix + offs_i, mask_i, offs_d, D, stride_qn, stride_qd, MASK_D=MASK_D
    )
    k_offs, k_mask = _row_tile(
        num_prefix + offs_j, mask_j, offs_d, D, stride_kn, stride_kd, MASK_D=MASK_D
    )
    x = _affinity_logits_tile(
        Q + b * stride_qb,
        K + b * stride_kb,
        q_offs,
        k_offs,
        q_mask,
        k_mask,
        H,
        stride_qh,
        stride_kh,
        BLOCK_A=BLOCK_I,
        BLOCK_B=BLOCK_J,
        DOT_PRECISION=DOT_PRECISION,
    )
    z = tl.sigmoid(x * logit_scale)
    # Tokens past Np read as ignored, so padded rows and columns drop out of both sums.
    y_i = tl.load(Labels + b * stride_yb + offs_i * stride_yn, mask=mask_i, other=_IGNORE)
    y_j = tl.load(Labels + b * stride_yb + offs_j * stride_yn, mask=mask_j, other=_IGNORE)
    valid = (y_i != _IGNORE)[:, None] & (y_j != _IGNORE)[None, :]
    same = y_i[:, None] == y_j[None, :]
    pos = tl.sum(tl.sum(tl.where(valid & same, 1.0 - z, 0.0), 1), 0)
    neg = tl.sum(tl.sum(tl.where(valid & (y_i[:, None] != y_j[None, :]), z, 0.0), 1), 0)

    tile = pid_i.to(tl.int64) * tl.num_programs(1) + pid_j
    p_ptr = Partial + b * stride_pb + tile * stride_pt
    tl.store(p_ptr, pos)
    tl.store(p_ptr + stride_pk, neg)


@triton.jit
def _affinity_loss_grad_tile(x, y_a, y_b, coef_pos, coef_neg):
    # d loss / d x up to a common factor: coef * sigmoid'(x) by pair kind, 0 on ignored pairs
    # (tokens past Np carry the ignore label).
    z = tl.sigmoid(x)
    valid = (y_a != _IGNORE)[:, None] & (y_b != _IGNORE)[None, :]
    coef = tl.where(y_a[:, None] == y_b[None, :], coef_pos, coef_neg)
    return tl.where(valid, coef * z * (1.0 - z), 0.0)


@triton.jit
def _affinity_loss_bwd_kernel(
    A,
    Bm,
    Labels,
    Coef,
    DA,
    logit_scale,
    H,
    D,
    num_prefix,
    Np,
    stride_ab,
    stride_ah,
    stride_an,
    stride_ad,
    stride_bb,
    stride_bh,
    stride_bn,
    stride_bd,
    stride_yb,
    stride_yn,
    stride_dab,
    stride_dah,
    stride_dan,
    stride_dad,
    BLOCK_D: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MASK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dA for one block of BLOCK_A tokens of A, looping over all blocks of B: dq (A = q, B = k)
    or dk (A = k, B = q; the logits and labels are then read transposed).

    dx_ab = Coef[2] * (Coef[0] if G = 1, Coef[1] if G = 0, 0 if ignored) * z (1 - z), with
    Coef = (-w_pos / c, w_neg / c, grad * c * s / H), c = max(w_pos, w_neg): the per-pair factor
    is at most 0.25 in size, so 16-bit dots of dx do not underflow.
    dA_h[a] += Coef[2] * sum_b dx_ab B_h[b] for every head h, into float32 rows of DA that only
    this program touches (read back after a barrier, so no atomics and no race).
    """
    pid_a = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a = offs_a < Np
    coef_pos = tl.load(Coef)
    coef_neg = tl.load(Coef + 1)
    coef_out = tl.load(Coef + 2)
    y_a = tl.load(Labels + b * stride_yb + offs_a * stride_yn, mask=mask_a, other=_IGNORE)

    a_base = A + b * stride_ab
    b_base = Bm + b * stride_bb
    da_base = DA + b * stride_dab
    a_offs, a_mask = _row_tile(
        num_prefix + offs_a, mask_a, offs_d, D, stride_an, stride_ad, MASK_D=MASK_D
    )
    # DA is contiguous: the rows of one head are the same tokens, so a_mask serves for them too.
    da_offs = (num_prefix + offs_a)[:, None] * stride_dan + offs_d[None, :] * stride_dad
    for start in range(0, Np, BLOCK_B):
        cols = start + offs_b
        mask_b = cols < Np
        b_offs, b_mask = _row_tile(
            num_prefix + cols, mask_b, offs_d, D, stride_bn, stride_bd, MASK_D=MASK_D
        )
        x = _affinity_logits_tile(
            a_base,
            b_base,
            a_offs,
            b_offs,
            a_mask,
            b_mask,
            H,
            stride_ah,
            stride_bh,
            BLOCK_A=BLOCK_A,
            BLOCK_B=BLOCK_B,
            DOT_PRECISION=DOT_PRECISION,
        )
        y_b = tl.load(Labels + b * stride_yb + cols * stride_yn, mask=mask_b, other=_IGNORE)
        dx = _affinity_loss_grad_tile(x * logit_scale, y_a, y_b, coef_pos, coef_neg)
        dx = dx.to(A.dtype.element_ty)
        b_head = b_base
        da_head = da_base
        for _ in range(H):
            bt = tl.load(b_head + b_offs, mask=b_mask, other=0.0)
            part = tl.dot(dx, bt, input_precision=DOT_PRECISION)
            da = tl.load(da_head + da_offs, mask=a_mask, other=0.0)
            tl.store(da_head + da_offs, da + part * coef_out, mask=a_mask)
            b_head += stride_bh
            da_head += stride_dah
        # The next block reads these rows back; the compiler may give the load and the store
        # different thread layouts, and a CTA barrier makes the stores visible to every thread.
        tl.debug_barrier()


def _loss_fwd_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps, num_stages) of the affinity-loss forward.

    64 x 64 logit tiles with 8 warps; float32 at D = 128 (exact FMA dots, both operands in
    registers) 32 x 32 with 4. Each choice compiles for sm_90 without register spills (ptxas -v);
    none is timed on hardware yet.
    """
    if dtype == torch.float32 and block_d > 64:
        return 32, 32, 4, 2
    return 64, 64, 8, 2


def _loss_bwd_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_A, BLOCK_B, num_warps, num_stages) of the affinity-loss backward.

    BLOCK_A rows are held, BLOCK_B streamed; a wide BLOCK_B halves the read-modify-writes of the
    float32 gradient rows (one per head per streamed block). Each choice compiles for sm_90
    without register spills (float32 at D = 128: 16 bytes); none is timed on hardware yet.
    """
    if dtype == torch.float32:
        return (32, 32, 4, 2) if block_d <= 64 else (32, 64, 8, 2)
    return (64, 128, 8, 2) if block_d <= 64 else (64, 64, 8, 2)


def affinity_loss_fwd(
    q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, num_prefix: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos_sum, neg_sum)``, 0-dim float32: ``sum_{G=1} (1 - Z)`` and ``sum_{G=0} Z`` over the
    batch, for q, k ``[B, H, N, D]`` with any strides and int64 labels ``[B, Np]``."""
    B, H, N, D = q.shape
    Np = N - num_prefix
    q, k = _int32_rows(q), _int32_rows(k)
    block_d = _block(D)
    block_i, block_j, num_warps, num_stages = _loss_fwd_config(block_d, q.dtype)
    grid = (triton.cdiv(Np, block_i), triton.cdiv(Np, block_j), B)
    partial = torch.empty((B, grid[0] * grid[1], 2), device=q.device, dtype=torch.float32)
    _affinity_loss_fwd_kernel[grid](
        q,
        k,
        labels,
        partial,
        float(scale) / H,
        H,
        D,
        num_prefix,
        Np,
        *q.stride(),
        *k.stride(),
        *labels.stride(),
        *partial.stride(),
        BLOCK_D=block_d,
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        MASK_D=block_d != D,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    sums = partial.sum(dim=(0, 1))
    return sums[0], sums[1]


def affinity_loss_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    labels: torch.Tensor,
    grad: torch.Tensor,
    w_pos: torch.Tensor,
    w_neg: torch.Tensor,
    num_prefix: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dq, dk)``, ``[B, H, N, D]`` in q's dtype (zero on prefix tokens), for the gradient
    ``grad`` (0-dim) on ``loss = w_pos * pos_sum + w_neg * neg_sum`` (``w = 0.5 / (n + 1)``,
    0-dim tensors). No host synchronisation: the coefficients stay on the device."""
    B, H, N, D = q.shape
    Np = N - num_prefix
    q, k = _int32_rows(q), _int32_rows(k)
    block_d = _block(D)
    block_a, block_b, num_warps, num_stages = _loss_bwd_config(block_d, q.dtype)
    c = torch.maximum(w_pos, w_neg).float()
    coef = torch.stack(
        [-w_pos.float() / c, w_neg.float() / c, grad.float() * c * (float(scale) / H)]
    ).contiguous()
    prec = _dot_precision(q.dtype)
    grads = []
    for a, other in ((q, k), (k, q)):
        da = torch.zeros((B, H, N, D), device=q.device, dtype=torch.float32)
        _affinity_loss_bwd_kernel[(triton.cdiv(Np, block_a), B)](
            a,
            other,
            labels,
            coef,
            da,
            float(scale) / H,
            H,
            D,
            num_prefix,
            Np,
            *a.stride(),
            *other.stride(),
            *labels.stride(),
            *da.stride(),
            BLOCK_D=block_d,
            BLOCK_A=block_a,
            BLOCK_B=block_b,
            MASK_D=block_d != D,
            DOT_PRECISION=prec,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        grads.append(da.to(q.dtype))
    return grads[0], grads[1]


# ---------------------------------------------------------------------------------------------
# propagate


@triton.jit
def _cam_values(
    cam_base, cols, num_prefix, N, offs_c, mask_c, stride_cc, stride_cn, dtype: tl.constexpr
):
    # V[cols, c] = cam[b, c, cols - p] on patch keys, 0 on prefix keys, past N and past C.
    is_patch = (cols >= num_prefix) & (cols < N)
    ptrs = (
        cam_base
        + offs_c[None, :] * stride_cc
        + tl.maximum(cols - num_prefix, 0)[:, None] * stride_cn
    )
    return tl.load(ptrs, mask=is_patch[:, None] & mask_c[None, :], other=0.0).to(dtype)


@triton.jit
def _dout_tile(dout_base, offs_m, mask_m, offs_c, mask_c, stride_dc, stride_dn):
    # dout[b, c, m] as a float32 [BLOCK_M, BLOCK_C] tile (rows = patch queries).
    ptrs = dout_base + offs_c[None, :] * stride_dc + offs_m[:, None] * stride_dn
    return tl.load(ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _propagate_softmax_pass(
    q,
    k_base,
    cam_base,
    N,
    num_prefix,
    qk_scale,
    offs_d,
    mask_d,
    offs_c,
    mask_c,
    stride_kn,
    stride_kd,
    stride_cc,
    stride_cn,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Online softmax of one (l, h) over all N keys with V = cam^T: returns (acc, l_i, m_i), the
    # unnormalised P V, the row sum of exp2(logit - m_i) and the running max of the base-2 logits.
    m_i = tl.full((q.shape[0],), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((q.shape[0],), dtype=tl.float32)
    acc = tl.zeros((q.shape[0], offs_c.shape[0]), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(
            k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        v = _cam_values(
            cam_base, cols, num_prefix, N, offs_c, mask_c, stride_cc, stride_cn, q.dtype
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Every block holds at least one real key, so m_new is finite and no row becomes NaN.
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(q.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _propagate_fwd_kernel(
    QPtrs,
    KPtrs,
    QRef,
    Cam,
    W,
    Part,
    qk_scale,
    inv_heads,
    N,
    H,
    LH,
    D,
    C,
    num_prefix,
    Np,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_cb,
    stride_cc,
    stride_cn,
    stride_ps,
    stride_pb,
    stride_pc,
    stride_pn,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Part[s, b, c, m] = sum over this split's (l, h) of (w_l / H) (P_lh V)[p + m, c].

    P_lh = softmax(s q_lh k_lh^T) over all N keys, V[n] = cam[b, :, n - p] (0 for n < p); the
    (l, h) pairs lh = s, s + S, ... of split s of S (grid axis 1). Gradients: see the backward
    kernels (dV = sum w' P^T dout, dP = w' dout V^T, dS = P * (dP - rowsum(P * dP))).
    qk_scale is s * log2(e): the softmax works in base 2.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(1)
    dtype = QRef.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = offs_m < Np
    mask_d = offs_d < D
    mask_c = offs_c < C
    q_offs = (
        b * stride_qb + (num_prefix + offs_m)[:, None] * stride_qn + offs_d[None, :] * stride_qd
    )
    cam_base = Cam + b * stride_cb

    out = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for lh in range(split, LH, num_splits):
        layer = lh // H
        h = lh % H
        q_base = tl.load(QPtrs + layer).to(tl.pointer_type(dtype))
        k_base = tl.load(KPtrs + layer).to(tl.pointer_type(dtype))
        q = tl.load(
            q_base + h * stride_qh + q_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0
        )
        acc, l_i, _ = _propagate_softmax_pass(
            q,
            k_base + b * stride_kb + h * stride_kh,
            cam_base,
            N,
            num_prefix,
            qk_scale,
            offs_d,
            mask_d,
            offs_c,
            mask_c,
            stride_kn,
            stride_kd,
            stride_cc,
            stride_cn,
            BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION,
        )
        w = tl.load(W + layer) * inv_heads
        out += acc * (w / l_i)[:, None]

    p_ptrs = (
        Part
        + split * stride_ps
        + b * stride_pb
        + offs_c[None, :] * stride_pc
        + offs_m[:, None] * stride_pn
    )
    tl.store(p_ptrs, out, mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _propagate_bwd_rowstats_kernel(
    QPtrs,
    KPtrs,
    QRef,
    Cam,
    DOut,
    Lse2,
    RowDot,
    qk_scale,
    N,
    H,
    D,
    C,
    num_prefix,
    Np,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_cb,
    stride_cc,
    stride_cn,
    stride_db,
    stride_dc,
    stride_dn,
    stride_sl,
    stride_sb,
    stride_sh,
    stride_sn,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Lse2[l, b, h, m] = log2 sum_n exp2(s log2(e) q.k_n) and RowDot[l, b, h, m] =
    sum_c dout[b, c, m] (P_lh V)[p + m, c] for one block of patch query rows of one (l, h).

    rowsum(P * dP) = (w_l / H) RowDot is the softmax term of dS = P * (dP - rowsum(P * dP)), and
    dw_l = (1 / H) sum RowDot; no per-(l, h) output is stored by the forward to take it from.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    lh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    layer = lh // H
    h = lh % H
    dtype = QRef.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = offs_m < Np
    mask_d = offs_d < D
    mask_c = offs_c < C

    q_base = tl.load(QPtrs + layer).to(tl.pointer_type(dtype))
    k_base = tl.load(KPtrs + layer).to(tl.pointer_type(dtype))
    q_ptrs = (
        q_base
        + b * stride_qb
        + h * stride_qh
        + (num_prefix + offs_m)[:, None] * stride_qn
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    acc, l_i, m_i = _propagate_softmax_pass(
        q,
        k_base + b * stride_kb + h * stride_kh,
        Cam + b * stride_cb,
        N,
        num_prefix,
        qk_scale,
        offs_d,
        mask_d,
        offs_c,
        mask_c,
        stride_kn,
        stride_kd,
        stride_cc,
        stride_cn,
        BLOCK_N=BLOCK_N,
        DOT_PRECISION=DOT_PRECISION,
    )
    do = _dout_tile(DOut + b * stride_db, offs_m, mask_m, offs_c, mask_c, stride_dc, stride_dn)
    rowdot = tl.sum(do * acc, 1) / l_i
    s_offs = layer * stride_sl + b * stride_sb + h * stride_sh + offs_m * stride_sn
    tl.store(Lse2 + s_offs, m_i + tl.math.log2(l_i), mask=mask_m)
    tl.store(RowDot + s_offs, rowdot, mask=mask_m)


@triton.jit
def _propagate_bwd_dq_kernel(
    QPtrs,
    KPtrs,
    QRef,
    Cam,
    W,
    DOut,
    Lse2,
    RowDot,
    DQ,
    scale,
    qk_scale,
    inv_heads,
    N,
    H,
    D,
    C,
    num_prefix,
    Np,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_cb,
    stride_cc,
    stride_cn,
    stride_db,
    stride_dc,
    stride_dn,
    stride_sl,
    stride_sb,
    stride_sh,
    stride_sn,
    stride_dql,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of one (l, h) for one block of patch query rows, looping over all N keys.

    P = exp2(s log2(e) q k^T - Lse2), dP = w' dout^T V^T (w' = w_l / H),
    dS = P * (dP - w' RowDot), dq = s dS k. Prefix query rows have no gradient (left 0).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    lh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    layer = lh // H
    h = lh % H
    dtype = QRef.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = offs_m < Np
    mask_d = offs_d < D
    mask_c = offs_c < C
    rows = num_prefix + offs_m

    q_base = tl.load(QPtrs + layer).to(tl.pointer_type(dtype))
    k_base = tl.load(KPtrs + layer).to(tl.pointer_type(dtype)) + b * stride_kb + h * stride_kh
    q_ptrs = (
        q_base
        + b * stride_qb
        + h * stride_qh
        + rows[:, None] * stride_qn
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    w = tl.load(W + layer) * inv_heads
    s_offs = layer * stride_sl + b * stride_sb + h * stride_sh + offs_m * stride_sn
    lse2 = tl.load(Lse2 + s_offs, mask=mask_m, other=float("inf"))
    delta = tl.load(RowDot + s_offs, mask=mask_m, other=0.0) * w
    do = _dout_tile(DOut + b * stride_db, offs_m, mask_m, offs_c, mask_c, stride_dc, stride_dn)
    do = (do * w).to(dtype)
    cam_base = Cam + b * stride_cb

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(
            k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        v = _cam_values(cam_base, cols, num_prefix, N, offs_c, mask_c, stride_cc, stride_cn, dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # Zero P on keys past N: exp2(-lse2) there could overflow, and inf * 0 in dS k is NaN.
        p = tl.where(mask_n[None, :], tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(dtype), k, dq, input_precision=DOT_PRECISION)

    dq *= scale
    dq_ptrs = (
        DQ
        + layer * stride_dql
        + b * stride_dqb
        + h * stride_dqh
        + rows[:, None] * stride_dqn
        + offs_d[None, :] * stride_dqd
    )
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _propagate_bwd_dkdv_kernel(
    QPtrs,
    KPtrs,
    QRef,
    Cam,
    W,
    DOut,
    Lse2,
    RowDot,
    DK,
    DVPart,
    scale,
    qk_scale,
    inv_heads,
    N,
    H,
    D,
    C,
    num_prefix,
    Np,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_cb,
    stride_cc,
    stride_cn,
    stride_db,
    stride_dc,
    stride_dn,
    stride_sl,
    stride_sb,
    stride_sh,
    stride_sn,
    stride_dkl,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_vl,
    stride_vb,
    stride_vc,
    stride_vn,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk of every head of layer l and dV_l = sum_h w' P_lh^T dout^T for one block of BLOCK_N keys
    (all N keys, prefix included), looping over all patch query rows (tiles transposed).

    dS^T = P^T * (w' V dout - w' RowDot), dk = s dS^T q; DVPart[l, b, c, n - p] holds the patch
    keys' dV_l (the launcher sums layers: dcam = sum_l DVPart[l]).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    dtype = QRef.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_c = offs_c < C

    q_base = tl.load(QPtrs + layer).to(tl.pointer_type(dtype)) + b * stride_qb
    k_base = tl.load(KPtrs + layer).to(tl.pointer_type(dtype)) + b * stride_kb
    w = tl.load(W + layer) * inv_heads
    v = _cam_values(
        Cam + b * stride_cb, offs_n, num_prefix, N, offs_c, mask_c, stride_cc, stride_cn, dtype
    )
    dout_base = DOut + b * stride_db
    s_base = layer * stride_sl + b * stride_sb
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    dk_offs = (
        layer * stride_dkl
        + b * stride_dkb
        + offs_n[:, None] * stride_dkn
        + offs_d[None, :] * stride_dkd
    )

    dv = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for h in range(H):
        k = tl.load(
            k_base + h * stride_kh + k_offs, mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start_m in range(0, Np, BLOCK_M):
            offs_i = start_m + offs_m
            mask_i = offs_i < Np
            q_ptrs = (
                q_base
                + h * stride_qh
                + (num_prefix + offs_i)[:, None] * stride_qn
                + offs_d[None, :] * stride_qd
            )
            q = tl.load(q_ptrs, mask=mask_i[:, None] & mask_d[None, :], other=0.0)
            s_offs = s_base + h * stride_sh + offs_i * stride_sn
            # Lse2 = +inf past Np makes those columns of pT exactly 0.
            lse2 = tl.load(Lse2 + s_offs, mask=mask_i, other=float("inf"))
            delta = tl.load(RowDot + s_offs, mask=mask_i, other=0.0) * w
            do = _dout_tile(dout_base, offs_i, mask_i, offs_c, mask_c, stride_dc, stride_dn)
            do = (do * w).to(dtype)

            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            # Keys past N only reach rows never stored, but exp2(-lse2) there could overflow.
            pT = tl.where(mask_n[:, None], tl.math.exp2(qkT * qk_scale - lse2[None, :]), 0.0)
            dv = tl.dot(pT.to(dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(dtype), q, dk, input_precision=DOT_PRECISION)
        dk *= scale
        tl.store(
            DK + h * stride_dkh + dk_offs,
            dk.to(DK.dtype.element_ty),
            mask=mask_n[:, None] & mask_d[None, :],
        )

    is_patch = mask_n & (offs_n >= num_prefix)
    dv_ptrs = (
        DVPart
        + layer * stride_vl
        + b * stride_vb
        + offs_c[None, :] * stride_vc
        + tl.maximum(offs_n - num_prefix, 0)[:, None] * stride_vn
    )
    tl.store(dv_ptrs, dv, mask=is_patch[:, None] & mask_c[None, :])


def _propagate_config(
    block_d: int, block_c: int, dtype: torch.dtype
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """``(rows, keys)``: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the kernels that hold query
    rows (forward, row statistics, dq) and of the one that holds keys (dk and dV).

    16-bit: 64 x 64 tiles as in the attention kernels; when the head dim or the padded class
    count exceeds 64 (the [BLOCK_M, BLOCK_C] output and dV accumulators grow with C) 32-row
    tiles with 8 warps. float32 (exact FMA dots): 32 x 32, 16-row tiles beyond 64. The
    key-holding kernel keeps dk, dV, k and V tiles live, so it gets 8 warps. By ptxas -v for
    sm_90: no register spills at D <= 64 with C <= 64 in any dtype (AReAM: D = 64, C = 21), and
    spills of 8 to 130 bytes in some kernels at D = 128, at C > 64 or with a padded head dim.
    None is timed on hardware yet.
    """
    wide = block_d > 64 or block_c > 64
    if dtype == torch.float32:
        return ((16, 32, 8, 2), (16, 16, 8, 2)) if wide else ((32, 32, 4, 2), (32, 32, 8, 2))
    return ((32, 64, 8, 2), (32, 32, 8, 1)) if wide else ((64, 64, 4, 2), (64, 64, 8, 2))


def _layer_table(layers: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...], list]:
    """``(pointers, strides, keep)``: an int64 device tensor of the layers' data pointers, their
    common strides, and the tensors it points into (to keep alive until the kernels are queued).
    Layers whose strides differ from the first layer's are copied contiguous (all of them then)."""
    if any(t.stride() != layers[0].stride() for t in layers):
        layers = [t.contiguous() for t in layers]
    device = layers[0].device
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
    if device.type == "cuda":
        # From pinned memory the copy is asynchronous: no stream synchronisation per call (the
        # caching host allocator keeps the pinned block until the copy has run).
        ptrs = ptrs.pin_memory().to(device, non_blocking=True)
    return ptrs, layers[0].stride(), layers


def _num_splits(programs: int, pairs: int, device: torch.device) -> int:
    """How many ways to split the (l, h) pairs of the forward: enough programs for two waves on
    the GPU's multiprocessors; 1 on the CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pairs, triton.cdiv(2 * sms, programs)))


def propagate_fwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    cam: torch.Tensor,
    weights: torch.Tensor,
    num_prefix: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``out`` ``[B, C, Np]`` in cam's dtype for L layers of q, k ``[B, H, N, D]`` (a list, any
    strides), cam ``[B, C, Np]`` and weights ``[L]``. ``num_splits`` overrides how many float32
    partial outputs the ``(l, h)`` pairs are split into (``None``: by the GPU's size)."""
    L = len(q)
    B, H, N, D = q[0].shape
    C = cam.shape[1]
    Np = N - num_prefix
    block_d, block_c = _block(D), _block(C)
    (block_m, block_n, num_warps, num_stages), _ = _propagate_config(block_d, block_c, q[0].dtype)
    q_ptrs, q_strides, q_keep = _layer_table(q)
    k_ptrs, k_strides, _k_alive = _layer_table(k)
    w = weights.to(device=cam.device, dtype=torch.float32).contiguous()
    row_blocks = triton.cdiv(Np, block_m)
    splits = num_splits or _num_splits(row_blocks * B, L * H, cam.device)
    part = torch.empty((splits, B, C, Np), device=cam.device, dtype=torch.float32)
    _propagate_fwd_kernel[(row_blocks, splits, B)](
        q_ptrs,
        k_ptrs,
        q_keep[0],
        cam,
        w,
        part,
        float(scale) * _LOG2E.value,
        1.0 / H,
        N,
        H,
        L * H,
        D,
        C,
        num_prefix,
        Np,
        *q_strides,
        *k_strides,
        *cam.stride(),
        *part.stride(),
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        DOT_PRECISION=_dot_precision(q[0].dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return part.sum(dim=0).to(cam.dtype)


def propagate_bwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    cam: torch.Tensor,
    weights: torch.Tensor,
    dout: torch.Tensor,
    num_prefix: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dcam, dweights)``: dq, dk stacked ``[L, B, H, N, D]`` in q's dtype (dq is 0 on
    prefix query rows), dcam ``[B, C, Np]`` in cam's dtype, dweights ``[L]`` in the weights' dtype,
    for the gradient ``dout`` ``[B, C, Np]`` (any strides and float dtype) on ``out``."""
    L = len(q)
    B, H, N, D = q[0].shape
    C = cam.shape[1]
    Np = N - num_prefix
    dtype = q[0].dtype
    block_d, block_c = _block(D), _block(C)
    rows_cfg, keys_cfg = _propagate_config(block_d, block_c, dtype)
    q_ptrs, q_strides, q_keep = _layer_table(q)
    k_ptrs, k_strides, _k_alive = _layer_table(k)
    w = weights.to(device=cam.device, dtype=torch.float32).contiguous()
    prec = _dot_precision(dtype)
    scale = float(scale)
    qk_scale = scale * _LOG2E.value

    def config(cfg):
        block_m, block_n, num_warps, num_stages = cfg
        return dict(
            BLOCK_D=block_d,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            DOT_PRECISION=prec,
            num_warps=num_warps,
            num_stages=num_stages,
        )

    lse2 = torch.empty((L, B, H, Np), device=cam.device, dtype=torch.float32)
    rowdot = torch.empty_like(lse2)
    row_grid = (triton.cdiv(Np, rows_cfg[0]), L * H, B)
    _propagate_bwd_rowstats_kernel[row_grid](
        q_ptrs,
        k_ptrs,
        q_keep[0],
        cam,
        dout,
        lse2,
        rowdot,
        qk_scale,
        N,
        H,
        D,
        C,
        num_prefix,
        Np,
        *q_strides,
        *k_strides,
        *cam.stride(),
        *dout.stride(),
        *lse2.stride(),
        **config(rows_cfg),
    )

    dq = torch.zeros((L, B, H, N, D), device=cam.device, dtype=dtype)
    _propagate_bwd_dq_kernel[row_grid](
        q_ptrs,
        k_ptrs,
        q_keep[0],
        cam,
        w,
        dout,
        lse2,
        rowdot,
        dq,
        scale,
        qk_scale,
        1.0 / H,
        N,
        H,
        D,
        C,
        num_prefix,
        Np,
        *q_strides,
        *k_strides,
        *cam.stride(),
        *dout.stride(),
        *lse2.stride(),
        *dq.stride(),
        **config(rows_cfg),
    )

    dk = torch.empty((L, B, H, N, D), device=cam.device, dtype=dtype)
    dv = torch.empty((L, B, C, Np), device=cam.device, dtype=torch.float32)
    _propagate_bwd_dkdv_kernel[(triton.cdiv(N, keys_cfg[1]), L, B)](
        q_ptrs,
        k_ptrs,
        q_keep[0],
        cam,
        w,
        dout,
        lse2,
        rowdot,
        dk,
        dv,
        scale,
        qk_scale,
        1.0 / H,
        N,
        H,
        D,
        C,
        num_prefix,
        Np,
        *q_strides,
        *k_strides,
        *cam.stride(),
        *dout.stride(),
        *lse2.stride(),
        *dk.stride(),
        *dv.stride(),
        **config(keys_cfg),
    )
    dweights = rowdot.sum(dim=(1, 2, 3)) / H
    return dq, dk, dv.sum(dim=0).to(cam.dtype), dweights.to(weights.dtype)
