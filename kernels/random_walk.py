"""Random-walk refinement ``cam @ T^steps`` without forming any ``[M, M]`` matrix (DESIGN.md §3.4).

With ``r_ij = aff_ij / max_i aff_ij``, ``P = r ** beta`` and column sums ``s_j = sum_i P_ij``,
the transition matrix is ``T_ij = P_ij / s_j`` (every column sums to 1); it equals
``aff_ij^beta / sum_i aff_ij^beta``, but ``r`` lies in [0, 1] with a 1 in every column, so neither
the power nor ``s`` over- or underflows (``aff ** 8`` is inf in float32 near ``aff = 1e5`` and 0
below ``1e-6``). The forward applies ``x <- x @ T`` ``steps`` times to ``x = cam`` ``[B, C, M]``;
the gradient with respect to cam applies ``g <- g @ T^T`` ``steps`` times.

Each application streams ``aff`` once, dividing it by its column maximum and raising it to
``beta`` as the tile is loaded (a division and a log2/exp2 pair per element and step, recomputed
rather than keeping a ``[B, M, M]`` T) and folding ``1 / s`` into the epilogue (forward) or into
the load of ``x`` (transposed), so the only buffers are two float32 ``[B, C, M]`` ping-pong
buffers and the column maxima and ``1 / s`` as float32 ``[B, M]``. Both are computed once per call
by ``_random_walk_colstats_kernel``. A column of ``aff`` that is all zero gives 0 / 0 and NaN, as
the formula does.
"""

import torch
import triton
import triton.language as tl

# Rows of C one program holds; a larger C is done in chunks of this many, one launch per chunk.
_MAX_BLOCK_C = 128
# Tile of the column-sum kernel: rows reduced per iteration x columns per program.
_COLSUM_BLOCK_I = 64
_COLSUM_BLOCK_J = 64


@triton.jit
def _pow_beta(a, beta):
    # a ** beta for a >= 0 and beta > 0. exp2(beta * log2(0)) would be 0 too; taking log2 of 1
    # instead keeps -inf (and the interpreter's divide-by-zero warning) out of the arithmetic.
    pos = a > 0
    return tl.where(pos, tl.exp2(beta * tl.log2(tl.where(pos, a, 1.0))), 0.0)


@triton.jit
def _random_walk_colstats_kernel(
    aff_ptr,
    max_ptr,
    inv_s_ptr,
    beta,
    M,
    stride_ab,
    stride_ai,
    stride_aj,
    stride_sb,
    stride_sm,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """max[b, j] = max_i aff[b, i, j] and inv_s[b, j] = 1 / sum_i (aff[b, i, j] / max[b, j]) ** beta.

    The column scale and normaliser of T_ij = (aff_ij / max_j)^beta * inv_s_j, shared by the
    forward (x @ T) and the gradient with respect to cam (g @ T^T); nothing is differentiated
    through them. Two passes over the columns: the maximum, then the sum.
    """
    pid_j = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)

    offs_i = tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < M
    base = aff_ptr + pid_b * stride_ab + offs_i[:, None] * stride_ai + offs_j[None, :] * stride_aj

    # Reducing elementwise and once at the end keeps cross-thread reductions out of the loops.
    mx = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    a_ptrs = base
    for i0 in range(0, M, BLOCK_I):
        mask = ((i0 + offs_i)[:, None] < M) & mask_j[None, :]
        mx = tl.maximum(mx, tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32))
        a_ptrs += BLOCK_I * stride_ai
    # Padding columns (j >= M) are masked out of the stores; 1 there avoids 0 / 0.
    col_max = tl.where(mask_j, tl.max(mx, axis=0), 1.0)

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    a_ptrs = base
    for i0 in range(0, M, BLOCK_I):
        mask = ((i0 + offs_i)[:, None] < M) & mask_j[None, :]
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += _pow_beta(a / col_max[None, :], beta)
        a_ptrs += BLOCK_I * stride_ai
    s = tl.sum(acc, axis=0)

    inv_s = 1.0 / tl.where(mask_j, s, 1.0)
    tl.store(max_ptr + pid_b * stride_sb + offs_j * stride_sm, col_max, mask=mask_j)
    tl.store(inv_s_ptr + pid_b * stride_sb + offs_j * stride_sm, inv_s, mask=mask_j)


@triton.jit
def _random_walk_step_kernel(
    aff_ptr,
    max_ptr,
    inv_s_ptr,
    x_ptr,
    out_ptr,
    beta,
    M,
    C,
    stride_ab,
    stride_ai,
    stride_aj,
    stride_sb,
    stride_sm,
    stride_xb,
    stride_xc,
    stride_xm,
    stride_ob,
    stride_oc,
    stride_om,
    TRANSPOSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One step of the walk for a [BLOCK_C, BLOCK_N] block of out, reducing over all M.

    With r[i, j] = aff[i, j] / max[j] (<= 1, so the sums stay below M max|x|):
    Forward (TRANSPOSE=False): out[c, j] = inv_s[j] * sum_i x[c, i] * r[i, j]^beta   (x @ T).
    Gradient wrt cam (TRANSPOSE=True): out[c, i] = sum_j r[i, j]^beta * x[c, j] * inv_s[j]
    (g @ T^T). Either way aff tiles are read along their contiguous rows; the dot is fp32 (not TF32).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < C
    mask_n = offs_n < M

    aff_base = aff_ptr + pid_b * stride_ab
    max_base = max_ptr + pid_b * stride_sb
    inv_s_base = inv_s_ptr + pid_b * stride_sb
    # offs_n is int64 (from the program id), so row offsets of a 11750^2 batch do not overflow;
    # the pointers then advance by BLOCK_K rows or columns per iteration.
    if TRANSPOSE:
        # aff[i, j] with i = out column (offs_n), j = reduction (offs_k): tile [BLOCK_N, BLOCK_K].
        a_ptrs = aff_base + offs_n[:, None] * stride_ai + offs_k[None, :] * stride_aj
        a_step = BLOCK_K * stride_aj
        s_ptrs = inv_s_base + offs_k * stride_sm
        m_ptrs = max_base + offs_k * stride_sm
    else:
        # aff[i, j] with i = reduction (offs_k), j = out column (offs_n): tile [BLOCK_K, BLOCK_N].
        a_ptrs = aff_base + offs_k[:, None] * stride_ai + offs_n[None, :] * stride_aj
        a_step = BLOCK_K * stride_ai
        # Padding columns read 1, so their 0 / max stays 0.
        col_max = tl.load(max_base + offs_n * stride_sm, mask=mask_n, other=1.0)
    x_ptrs = x_ptr + pid_b * stride_xb + offs_c[:, None] * stride_xc + offs_k[None, :] * stride_xm

    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        mask_k = (k0 + offs_k) < M
        x = tl.load(x_ptrs, mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        if TRANSPOSE:
            a = tl.load(a_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            col_max = tl.load(m_ptrs, mask=mask_k, other=1.0)
            p = _pow_beta(a.to(tl.float32) / col_max[None, :], beta)
            x *= tl.load(s_ptrs, mask=mask_k, other=0.0)[None, :]
            acc = tl.dot(x, tl.trans(p), acc, input_precision="ieee")
            s_ptrs += BLOCK_K * stride_sm
            m_ptrs += BLOCK_K * stride_sm
        else:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            p = _pow_beta(a.to(tl.float32) / col_max[None, :], beta)
            acc = tl.dot(x, p, acc, input_precision="ieee")
        a_ptrs += a_step
        x_ptrs += BLOCK_K * stride_xm

    if not TRANSPOSE:
        acc *= tl.load(inv_s_base + offs_n * stride_sm, mask=mask_n, other=0.0)[None, :]
    out_ptrs = (
        out_ptr + pid_b * stride_ob + offs_c[:, None] * stride_oc + offs_n[None, :] * stride_om
    )
    tl.store(out_ptrs, acc, mask=mask_c[:, None] & mask_n[None, :])


def _step_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_N, BLOCK_K) for C rows: the more rows, the narrower the aff tile."""
    block_c = max(16, triton.next_power_of_2(min(C, _MAX_BLOCK_C)))
    # BLOCK_N = 64 gives 184 programs at M = 11750, B = 1: enough for 132 SMs. tl.dot needs >= 16.
    block_n = 64 if block_c <= 64 else 32
    block_k = 32 if block_c <= 32 else 16
    return block_c, block_n, block_k


def _random_walk(aff: torch.Tensor, x0: torch.Tensor, beta: float, steps: int, transpose: bool):
    assert aff.dim() == 3 and x0.dim() == 3, "aff must be [B, M, M] and cam [B, C, M]"
    B, M, M2 = aff.shape
    assert M == M2 and x0.shape[0] == B and x0.shape[2] == M, (aff.shape, x0.shape)
    assert beta > 0 and steps >= 0, (beta, steps)
    if steps == 0:
        return x0.clone()
    C = x0.shape[1]
    beta = float(beta)

    col_max = torch.empty((B, M), device=aff.device, dtype=torch.float32)
    inv_s = torch.empty_like(col_max)
    _random_walk_colstats_kernel[(triton.cdiv(M, _COLSUM_BLOCK_J), B)](
        aff,
        col_max,
        inv_s,
        beta,
        M,
        *aff.stride(),
        *inv_s.stride(),
        BLOCK_I=_COLSUM_BLOCK_I,
        BLOCK_J=_COLSUM_BLOCK_J,
    )

    src = x0.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    dst = torch.empty_like(src)
    block_c, block_n, block_k = _step_config(C)
    grid = (triton.cdiv(M, block_n), B)
    for _ in range(steps):
        for c0 in range(0, C, block_c):
            x, out = src[:, c0 : c0 + block_c], dst[:, c0 : c0 + block_c]
            _random_walk_step_kernel[grid](
                aff,
                col_max,
                inv_s,
                x,
                out,
                beta,
                M,
                x.shape[1],
                *aff.stride(),
                *inv_s.stride(),
                *x.stride(),
                *out.stride(),
                TRANSPOSE=transpose,
                BLOCK_C=block_c,
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                num_warps=4,
                num_stages=3,
            )
        src, dst = dst, src
    return src.to(x0.dtype)


def random_walk_fwd(aff: torch.Tensor, cam: torch.Tensor, beta: float, steps: int) -> torch.Tensor:
    """``cam @ T^steps`` for aff ``[B, M, M]`` (>= 0) and cam ``[B, C, M]``; cam's dtype."""
    return _random_walk(aff, cam, beta, steps, transpose=False)


def random_walk_bwd(
    aff: torch.Tensor, grad_out: torch.Tensor, beta: float, steps: int
) -> torch.Tensor:
    """Gradient with respect to cam, ``grad_out @ (T^T)^steps``, ``[B, C, M]``; grad_out's dtype."""
    return _random_walk(aff, grad_out, beta, steps, transpose=True)
