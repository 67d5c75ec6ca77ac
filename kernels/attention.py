"""Fused softmax attention with affinity export (DESIGN.md §3.1), FlashAttention-2 style.

Per head, ``P = softmax(q k^T s)`` over keys and ``out = P v``; q, k, v are ``[B, H, N, D]`` with
any strides (e.g. permuted views of a fused ``[B, N, 3, H, D]`` projection).

- ``attention_fwd``: online softmax over key blocks; the division by the row sum is deferred to
  the end and ``log2(e)`` is folded into the scale so every exponential is an ``exp2``. Returns
  ``out`` and ``lse``, the *natural-log* log-sum-exp of the scaled logits, float32 ``[B, H, N]``
  (kernels that recompute ``P = exp(s q k^T - lse)`` convert it to base 2 themselves).
- ``attention_export_mean`` / ``attention_export_rows``: recompute tiles of ``P`` from q, k and
  ``lse``; the head mean is accumulated in registers over an inner head loop, so neither a per-head
  ``N x N`` buffer nor atomics exist.
- ``attention_bwd``: ``delta = rowsum(dO * O)`` (plus ``rowsum(P * dA)`` when a gradient ``dA``
  arrives on an export), then one kernel for dK, dV per key block and one for dQ per query block,
  both recomputing ``P`` from ``lse``. No atomics, nothing ``N x N`` stored.

Masking: keys past N get ``-inf`` logits in the forward. Kernels that recompute ``P`` load the
``lse`` of query rows past N as ``+inf`` so those rows are exactly 0, and zero ``P`` on keys past
N wherever a row sum or a product with K could mix them into a stored value. Floats are
accumulated in float32; float32 inputs use exact fp32 ``tl.dot`` (``input_precision="ieee"``, not
TF32), float16/bfloat16 inputs the native tensor-core dot with float32 accumulation.
"""

import math

import torch
import triton
import triton.language as tl

# log2(e) and ln(2); constexpr so that the kernels can read them.
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _attention_fwd_step(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    offs_n,
    N,
    qk_scale,
    MASK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One key block of the online softmax. m_i is the running row max of the base-2 logits,
    # l_i the running row sum of exp2(logit - m_i), acc the unnormalised P v.
    if MASK_N:
        mask_n = offs_n < N
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK_N:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    # Every block holds at least one real key, so m_new is finite and no row becomes NaN
    # (query rows past N see logits 0 from their zero-filled q).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    qk_scale,
    N,
    H,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ln,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out = softmax(s q k^T) v and lse = log(sum_j exp(s q_i . k_j)) for BLOCK_M query rows.

    Gradients (see the backward kernels): dv = P^T dout, dP = dout v^T,
    dS = P * (dP - rowsum(dout * out)), dq = s dS k, dk = s dS^T q.
    qk_scale is s * log2(e): the loop works in base 2; lse is stored in natural log.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N

    q_base = Q + b * stride_qb + h * stride_qh
    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)

    # Full key blocks without masks, then at most one masked tail block.
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attention_fwd_step(
            acc,
            l_i,
            m_i,
            q,
            k_ptrs,
            v_ptrs,
            start_n + offs_n,
            N,
            qk_scale,
            MASK_N=False,
            DOT_PRECISION=DOT_PRECISION,
        )
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if n_full < N:
        acc, l_i, m_i = _attention_fwd_step(
            acc,
            l_i,
            m_i,
            q,
            k_ptrs,
            v_ptrs,
            n_full + offs_n,
            N,
            qk_scale,
            MASK_N=True,
            DOT_PRECISION=DOT_PRECISION,
        )

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * _LN2  # base 2 -> natural log
    o_base = Out + b * stride_ob + h * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, lse, mask=mask_m)


@triton.jit
def _attention_export_mean_kernel(
    Q,
    K,
    Lse,
    A,
    qk_scale,
    inv_heads,
    N,
    H,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_ab,
    stride_ai,
    stride_aj,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """A[b, i, j] = (1/H) sum_h exp(s q_hi . k_hj - lse_hi) for one [BLOCK_M, BLOCK_N] tile.

    Gradient (folded into attention_bwd): dP_h += dA / H for every head.
    The head loop is inside the program, so each tile of A is written once.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    mask_n = offs_n < N

    q_ptrs = Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    l_ptrs = Lse + b * stride_lb + offs_m * stride_ln

    # Keys past N (zero-filled k) give garbage, inf at worst, only in columns never stored.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(H):
        q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        lse2 = tl.load(l_ptrs, mask=mask_m, other=float("inf")) * _LOG2E
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc += tl.math.exp2(qk * qk_scale - lse2[:, None])
        q_ptrs += stride_qh
        k_ptrs += stride_kh
        l_ptrs += stride_lh

    a_ptrs = A + b * stride_ab + offs_m[:, None] * stride_ai + offs_n[None, :] * stride_aj
    tl.store(
        a_ptrs, (acc * inv_heads).to(A.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :]
    )


@triton.jit
def _attention_export_rows_kernel(
    Q,
    K,
    Lse,
    R,
    qk_scale,
    N,
    H,
    num_rows,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_rb,
    stride_rh,
    stride_ri,
    stride_rj,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """R[b, h, i, j] = exp(s q_hi . k_hj - lse_hi) for i < num_rows, one block of keys j.

    Gradient (folded into attention_bwd): dP_h[i, :] += dR[b, h, i, :] for i < num_rows.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_r = offs_r < num_rows
    mask_n = offs_n < N

    q_base = Q + b * stride_qb + h * stride_qh
    q_ptrs = q_base + offs_r[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_base = K + b * stride_kb + h * stride_kh
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    q = tl.load(q_ptrs, mask=mask_r[:, None], other=0.0)
    k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
    lse = tl.load(
        Lse + b * stride_lb + h * stride_lh + offs_r * stride_ln, mask=mask_r, other=float("inf")
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse[:, None] * _LOG2E)

    r_base = R + b * stride_rb + h * stride_rh
    r_ptrs = r_base + offs_r[:, None] * stride_ri + offs_n[None, :] * stride_rj
    tl.store(r_ptrs, p.to(R.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out,
    DO,
    Delta,
    N,
    H,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_deb,
    stride_deh,
    stride_den,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] in float32.

    This is rowsum(P * dP) for dP = dout v^T, the softmax term of dS = P * (dP - delta).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    o_base = Out + b * stride_ob + h * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    do_base = DO + b * stride_dob + h * stride_doh
    do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    o = tl.load(o_ptrs, mask=mask_m[:, None], other=0.0)
    do = tl.load(do_ptrs, mask=mask_m[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * stride_deb + h * stride_deh + offs_m * stride_den, delta, mask=mask_m)


@triton.jit
def _export_grad_tile(
    DMean,
    DRows,
    b,
    h,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    inv_heads,
    num_rows,
    stride_dmb,
    stride_dmi,
    stride_dmj,
    stride_drb,
    stride_drh,
    stride_dri,
    stride_drj,
    HAS_MEAN: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    # dA_h[offs_m, offs_n] in float32 with the shape of offs_m + offs_n (either orientation):
    # d_mean / H, plus d_rows on rows < num_rows; 0 outside [N, N].
    mask = mask_m & mask_n
    g = tl.zeros(mask.shape, dtype=tl.float32)
    if HAS_MEAN:
        dm_ptrs = DMean + b * stride_dmb + offs_m * stride_dmi + offs_n * stride_dmj
        g += tl.load(dm_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_heads
    if HAS_ROWS:
        dr_ptrs = (
            DRows + b * stride_drb + h * stride_drh + offs_m * stride_dri + offs_n * stride_drj
        )
        g += tl.load(dr_ptrs, mask=mask & (offs_m < num_rows), other=0.0).to(tl.float32)
    return g


@triton.jit
def _attention_bwd_export_delta_kernel(
    Q,
    K,
    Lse,
    Delta,
    DMean,
    DRows,
    qk_scale,
    inv_heads,
    N,
    H,
    num_rows,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_deb,
    stride_deh,
    stride_den,
    stride_dmb,
    stride_dmi,
    stride_dmj,
    stride_drb,
    stride_drh,
    stride_dri,
    stride_drj,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """delta[b, h, i] += sum_j P_h[i, j] * dA_h[i, j], one block of query rows over all keys.

    dA_h = d_mean / H (+ d_rows on rows < num_rows) is the gradient arriving on the export; with
    dP = dout v^T + dA_h the softmax backward dS = P * (dP - rowsum(P * dP)) needs this extra sum.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N

    q_base = Q + b * stride_qb + h * stride_qh
    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
    lse2 = tl.load(
        Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=mask_m, other=float("inf")
    )
    lse2 = lse2 * _LOG2E
    k_base = K + b * stride_kb + h * stride_kh
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd

    corr = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # Zero P on keys past N: exp(-lse) there could overflow, and inf * 0 would be NaN.
        p = tl.where(mask_n[None, :], tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        g = _export_grad_tile(
            DMean,
            DRows,
            b,
            h,
            offs_m[:, None],
            cols[None, :],
            mask_m[:, None],
            mask_n[None, :],
            inv_heads,
            num_rows,
            stride_dmb,
            stride_dmi,
            stride_dmj,
            stride_drb,
            stride_drh,
            stride_dri,
            stride_drj,
            HAS_MEAN=HAS_MEAN,
            HAS_ROWS=HAS_ROWS,
        )
        corr += tl.sum(p * g, 1)
        k_ptrs += BLOCK_N * stride_kn

    de_ptrs = Delta + b * stride_deb + h * stride_deh + offs_m * stride_den
    delta = tl.load(de_ptrs, mask=mask_m, other=0.0)
    tl.store(de_ptrs, delta + corr, mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DMean,
    DRows,
    DK,
    DV,
    scale,
    qk_scale,
    inv_heads,
    N,
    H,
    num_rows,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_deb,
    stride_deh,
    stride_den,
    stride_dmb,
    stride_dmi,
    stride_dmj,
    stride_drb,
    stride_drh,
    stride_dri,
    stride_drj,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk, dv for one block of BLOCK_N keys, looping over all query blocks (tiles transposed).

    P = exp(s q k^T - lse), dv = P^T dout, dP = dout v^T + dA (export gradient),
    dS = P * (dP - delta), dk = s dS^T q.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < N

    k_base = K + b * stride_kb + h * stride_kh
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)

    q_base = Q + b * stride_qb + h * stride_qh
    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_base = DO + b * stride_dob + h * stride_doh
    do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    l_ptrs = Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln
    de_ptrs = Delta + b * stride_deb + h * stride_deh + offs_m * stride_den

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=mask_m[:, None], other=0.0)
        # lse = +inf past N makes those columns of pT exactly 0.
        lse2 = tl.load(l_ptrs, mask=mask_m, other=float("inf")) * _LOG2E
        delta = tl.load(de_ptrs, mask=mask_m, other=0.0)

        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        # Rows of keys past N only reach rows of dk / dv that are never stored, but exp(-lse)
        # there can overflow, and inf * 0 = NaN is better kept out of the dots.
        pT = tl.where(mask_n[:, None], tl.math.exp2(qkT * qk_scale - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_MEAN or HAS_ROWS:
            dpT += _export_grad_tile(
                DMean,
                DRows,
                b,
                h,
                rows[None, :],
                offs_n[:, None],
                mask_m[None, :],
                mask_n[:, None],
                inv_heads,
                num_rows,
                stride_dmb,
                stride_dmi,
                stride_dmj,
                stride_drb,
                stride_drh,
                stride_dri,
                stride_drj,
                HAS_MEAN=HAS_MEAN,
                HAS_ROWS=HAS_ROWS,
            )
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
        l_ptrs += BLOCK_M * stride_ln
        de_ptrs += BLOCK_M * stride_den

    dk *= scale
    dk_base = DK + b * stride_dkb + h * stride_dkh
    dk_ptrs = dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_base = DV + b * stride_dvb + h * stride_dvh
    dv_ptrs = dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DMean,
    DRows,
    DQ,
    scale,
    qk_scale,
    inv_heads,
    N,
    H,
    num_rows,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_deb,
    stride_deh,
    stride_den,
    stride_dmb,
    stride_dmi,
    stride_dmj,
    stride_drb,
    stride_drh,
    stride_dri,
    stride_drj,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq for one block of BLOCK_M query rows, looping over all key blocks.

    P = exp(s q k^T - lse), dP = dout v^T + dA (export gradient), dS = P * (dP - delta),
    dq = s dS k.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N

    q_base = Q + b * stride_qb + h * stride_qh
    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_base = DO + b * stride_dob + h * stride_doh
    do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
    do = tl.load(do_ptrs, mask=mask_m[:, None], other=0.0)
    lse2 = tl.load(
        Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=mask_m, other=float("inf")
    )
    lse2 = lse2 * _LOG2E
    delta = tl.load(
        Delta + b * stride_deb + h * stride_deh + offs_m * stride_den, mask=mask_m, other=0.0
    )

    k_base = K + b * stride_kb + h * stride_kh
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # Zero P on keys past N: exp(-lse) there could overflow, and inf * 0 in dS k is NaN.
        p = tl.where(mask_n[None, :], tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_MEAN or HAS_ROWS:
            dp += _export_grad_tile(
                DMean,
                DRows,
                b,
                h,
                offs_m[:, None],
                cols[None, :],
                mask_m[:, None],
                mask_n[None, :],
                inv_heads,
                num_rows,
                stride_dmb,
                stride_dmi,
                stride_dmj,
                stride_drb,
                stride_drh,
                stride_dri,
                stride_drj,
                HAS_MEAN=HAS_MEAN,
                HAS_ROWS=HAS_ROWS,
            )
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    dq *= scale
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    dq_ptrs = dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


def _fwd_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward and the export kernels on an H100.

    float16/bfloat16: 128 x 64 tiles, the FA2 / Triton-tutorial shape (4 warps at D <= 64, where
    Hopper keeps 8 warps for tiles of 128 x 128 and up; 8 at D = 128 for the larger accumulator).
    BLOCK_N = 64 also keeps N = 1025 = 16 * 64 + 1 cheap. float32 dots are exact ("ieee"), which
    runs on the FMA units with both operands in registers, so its tiles shrink with D. Every
    choice compiles for sm_90 without register spills; none is tuned on hardware yet.
    """
    if dtype == torch.float32:
        return {16: (64, 32, 4, 2), 32: (64, 32, 8, 2), 64: (32, 16, 8, 2)}.get(
            head_dim, (16, 16, 8, 2)
        )
    return (128, 64, 4, 3) if head_dim <= 64 else (128, 64, 8, 3)


def _bwd_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages) of the backward on an H100.

    *1: the dK/dV kernel (BLOCK_N1 keys held, BLOCK_M1 queries streamed); *2: the dQ kernel
    (BLOCK_M2 queries held, BLOCK_N2 keys streamed) and the export-delta kernel. The held side is
    the wide one, as in the Triton tutorial's 32 x 128 / 128 x 32 split; 8 warps keep the dK/dV
    accumulators (and an export gradient tile) out of local memory: no spills on sm_90.
    """
    if dtype == torch.float32:
        return (32, 32, 64, 32, 8, 2) if head_dim <= 64 else (32, 32, 32, 32, 8, 2)
    return (32, 128, 128, 32, 8, 3) if head_dim <= 64 else (32, 64, 128, 32, 8, 3)


def _rows_config(num_rows: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the first-rows export: at least 16 rows (tl.dot's minimum; padded
    rows cost registers only), at most 64 (16 for float32, whose FMA dot spills beyond), more
    rows go to a third grid axis."""
    max_r, block_n = (16, 32) if dtype == torch.float32 else (64, 64)
    return max(16, min(max_r, triton.next_power_of_2(num_rows))), block_n


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee" keeps float32 exact (no TF32); the setting is ignored for 16-bit operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``[B, H, N, D]`` (contiguous, q's dtype) and ``lse`` ``[B, H, N]`` (float32, natural
    log of ``sum_j exp(s q_i . k_j)``) for q, k, v ``[B, H, N, D]`` with any strides."""
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    block_m, block_n, num_warps, num_stages = _fwd_config(D, q.dtype)
    grid = (triton.cdiv(N, block_m), B * H)
    _attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        float(scale) * _LOG2E.value,
        N,
        H,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *lse.stride(),
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse


def attention_export_mean(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, export_dtype: torch.dtype
) -> torch.Tensor:
    """``A = mean_h P_h``, ``[B, N, N]`` in ``export_dtype``, recomputed from q, k and ``lse``."""
    B, H, N, D = q.shape
    a = torch.empty((B, N, N), device=q.device, dtype=export_dtype)
    if a.numel() == 0:
        return a
    block_m, block_n, num_warps, num_stages = _fwd_config(D, q.dtype)
    grid = (triton.cdiv(N, block_m), triton.cdiv(N, block_n), B)
    _attention_export_mean_kernel[grid](
        q,
        k,
        lse,
        a,
        float(scale) * _LOG2E.value,
        1.0 / H,
        N,
        H,
        *q.stride(),
        *k.stride(),
        *lse.stride(),
        *a.stride(),
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return a


def attention_export_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_rows: int,
    export_dtype: torch.dtype,
) -> torch.Tensor:
    """``R = P[:, :, :num_rows, :]``, ``[B, H, num_rows, N]`` in ``export_dtype``."""
    B, H, N, D = q.shape
    r = torch.empty((B, H, num_rows, N), device=q.device, dtype=export_dtype)
    if r.numel() == 0:
        return r
    block_r, block_n = _rows_config(num_rows, q.dtype)
    grid = (triton.cdiv(N, block_n), B * H, triton.cdiv(num_rows, block_r))
    _attention_export_rows_kernel[grid](
        q,
        k,
        lse,
        r,
        float(scale) * _LOG2E.value,
        N,
        H,
        num_rows,
        *q.stride(),
        *k.stride(),
        *lse.stride(),
        *r.stride(),
        HEAD_DIM=D,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    return r


def attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    scale: float,
    d_mean: torch.Tensor | None = None,
    d_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each ``[B, H, N, D]`` contiguous in q's dtype.

    ``dout`` is the gradient on ``out``; ``d_mean`` ``[B, N, N]`` the gradient on the head-mean
    export and ``d_rows`` ``[B, H, R, N]`` the gradient on the first-rows export, either or both
    ``None``. Any strides and float dtype for all of them.
    """
    B, H, N, D = q.shape
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    has_mean = d_mean is not None
    has_rows = d_rows is not None and d_rows.shape[2] > 0
    # Unused export gradients get a dummy pointer and zero strides; their loads are compiled out.
    dm, dm_strides = (d_mean, d_mean.stride()) if has_mean else (lse, (0, 0, 0))
    dr, dr_strides = (d_rows, d_rows.stride()) if has_rows else (lse, (0, 0, 0, 0))
    num_rows = d_rows.shape[2] if has_rows else 0

    scale = float(scale)
    qk_scale = scale * _LOG2E.value
    inv_heads = 1.0 / H
    prec = _dot_precision(q.dtype)
    block_m1, block_n1, block_m2, block_n2, num_warps, num_stages = _bwd_config(D, q.dtype)

    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    block_pre = 64
    _attention_bwd_preprocess_kernel[(triton.cdiv(N, block_pre), B * H)](
        out,
        dout,
        delta,
        N,
        H,
        *out.stride(),
        *dout.stride(),
        *delta.stride(),
        HEAD_DIM=D,
        BLOCK_M=block_pre,
    )
    if has_mean or has_rows:
        # Only query rows that carry an export gradient need the correction.
        rows_needed = N if has_mean else num_rows
        _attention_bwd_export_delta_kernel[(triton.cdiv(rows_needed, block_m2), B * H)](
            q,
            k,
            lse,
            delta,
            dm,
            dr,
            qk_scale,
            inv_heads,
            N,
            H,
            num_rows,
            *q.stride(),
            *k.stride(),
            *lse.stride(),
            *delta.stride(),
            *dm_strides,
            *dr_strides,
            HEAD_DIM=D,
            BLOCK_M=block_m2,
            BLOCK_N=block_n2,
            HAS_MEAN=has_mean,
            HAS_ROWS=has_rows,
            DOT_PRECISION=prec,
            num_warps=num_warps,
            num_stages=num_stages,
        )

    _attention_bwd_dkdv_kernel[(triton.cdiv(N, block_n1), B * H)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dm,
        dr,
        dk,
        dv,
        scale,
        qk_scale,
        inv_heads,
        N,
        H,
        num_rows,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *lse.stride(),
        *delta.stride(),
        *dm_strides,
        *dr_strides,
        *dk.stride(),
        *dv.stride(),
        HEAD_DIM=D,
        BLOCK_M=block_m1,
        BLOCK_N=block_n1,
        HAS_MEAN=has_mean,
        HAS_ROWS=has_rows,
        DOT_PRECISION=prec,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _attention_bwd_dq_kernel[(triton.cdiv(N, block_m2), B * H)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dm,
        dr,
        dq,
        scale,
        qk_scale,
        inv_heads,
        N,
        H,
        num_rows,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *lse.stride(),
        *delta.stride(),
        *dm_strides,
        *dr_strides,
        *dq.stride(),
        HEAD_DIM=D,
        BLOCK_M=block_m2,
        BLOCK_N=block_n2,
        HAS_MEAN=has_mean,
        HAS_ROWS=has_rows,
        DOT_PRECISION=prec,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return dq, dk, dv
