"""``random_walk``: random-walk refinement of CAMs by a column-stochastic power of an affinity.

PSA and IRN (AReAM's and CRT's post-processing) square a dense ``T`` ``logt`` times; here ``T`` is
applied ``steps`` times to the C-channel CAM instead, with the power and the column normalisation
fused into the kernels' loads, so no ``M x M`` buffer beyond the input exists on the GPU.

Every backend evaluates ``T`` in one overflow- and underflow-safe form: with the column maxima
``m_j = max_i aff_ij`` and ``r_ij = aff_ij / m_j``, ``T_ij = r_ij^beta / sum_i r_ij^beta``. That is
the same matrix as ``aff_ij^beta / sum_i aff_ij^beta``, but ``r`` lies in [0, 1] with a 1 in every
column, so each column sum lies in [1, M]: ``aff ** 8`` alone is inf in float32 for ``aff`` near
1e5 and 0 (then 0 / 0 = NaN) for ``aff`` below 1e-6, both of which the checks accept. Entries
whose ``r_ij^beta`` underflows weigh less than ``1e-38`` of their column's largest, so dropping
them changes no float32 result. The fused kernels recompute ``r^beta`` from
``aff`` at every step (a division and a log2/exp2 pair per element, no extra bytes read) rather
than keeping a ``[B, M, M]`` T.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from wsss_fast import _backend, _ext
from wsss_fast.ops import _checks, reference

OP = "random_walk"


def random_walk(aff: torch.Tensor, cam: torch.Tensor, *, beta: float, steps: int) -> torch.Tensor:
    """Propagate ``cam`` along ``steps`` steps of a random walk on the affinity ``aff``.

    With ``T[b, i, j] = aff[b, i, j] ** beta / sum_i aff[b, i, j] ** beta`` (each column of ``T``
    sums to 1), returns ``cam @ T ** steps`` computed as ``steps`` applications of ``x <- x @ T``
    (never by forming or squaring ``T``). PSA's ``logt = 6`` squarings are ``steps = 64``; IRN's
    ``exp_times = 8`` are ``steps = 256``. ``T`` is computed from ``aff`` divided by its column
    maxima (the same matrix), so any finite scale of ``aff`` works: ``1e-7`` or ``1e5`` with
    ``beta = 8`` give finite results where ``aff ** 8`` would under- or overflow.

    Args:
        aff: ``[B, M, M]`` non-negative, finite affinities; float32, float16 or bfloat16 (float64
            on the ``reference``, ``torch`` and ``cuda`` backends). No column may be all zero.
        cam: ``[B, C, M]`` maps to propagate, any float dtype.
        beta: the power applied to ``aff``, a finite number > 0 (PSA 8, IRN 10).
        steps: number of applications of ``T``, >= 0.

    Returns:
        ``[B, C, M]`` in ``cam.dtype``; arithmetic is carried out in float32 (float64 for float64
        inputs). Differentiable with respect to ``cam`` on every backend and with respect to
        ``aff`` on the ``reference`` and ``torch`` backends (the fused backends raise if ``aff``
        requires a gradient).

    Host syncs: three per call on a GPU, for the checks that aff is non-negative and finite, that no
    column of aff is all zero and that cam is finite; they are skipped on meta and fake tensors,
    under ``torch.compile`` and during CUDA-graph capture.

    Example::

        refined = wsss_fast.random_walk(aff, cam, beta=8, steps=64)
    """
    aff = _checks.tensor(OP, "aff", aff, ndim=3, layout="[B, M, M]")
    cam = _checks.tensor(OP, "cam", cam, ndim=3, layout="[B, C, M]")
    beta = _checks.positive_number(OP, "beta", beta)
    steps = _checks.non_negative_int(OP, "steps", steps)
    device = _checks.same_device(OP, aff=aff, cam=cam)
    B, M, M2 = aff.shape
    if M != M2:
        raise ValueError(f"wsss_fast.random_walk: aff must be [B, M, M], got {tuple(aff.shape)}")
    if cam.shape[0] != B or cam.shape[2] != M:
        raise ValueError(
            f"wsss_fast.random_walk: cam must be [B, C, M] = [{B}, C, {M}] to match aff "
            f"{tuple(aff.shape)}, got {tuple(cam.shape)}"
        )
    if _checks.values_readable(aff):
        # One pass over aff with no M x M temporary: NaN fails `lo >= 0`, +inf fails `hi < inf`.
        lo, hi = torch.aminmax(aff.detach())
        if not (bool(lo >= 0) and bool(hi < float("inf"))):
            raise ValueError(
                "wsss_fast.random_walk: aff must be non-negative and finite "
                f"(min {lo.item():.4g}, max {hi.item():.4g}); clamp it with aff.clamp_min(0)"
            )
        if not bool((aff.detach().amax(dim=1) > 0).all()):
            raise ValueError(
                "wsss_fast.random_walk: a column of aff is all zero, so T = aff**beta / column "
                "sum is undefined there; give every token a positive affinity to itself (e.g. "
                "add the identity)"
            )
    _checks.all_finite(OP, "cam", cam)
    backend, impl = _backend.select(OP, _IMPLS, device, kernel="random_walk_forward")
    if backend in ("triton", "cuda") and aff.requires_grad and torch.is_grad_enabled():
        raise _backend.BackendNotImplementedError(
            f"wsss_fast.random_walk: the gradient with respect to aff is implemented on the "
            f"'reference' and 'torch' backends only, not on {backend!r}; detach aff or use "
            "wsss_fast.use_backend('torch')"
        )
    return impl(aff.contiguous(), cam.contiguous(), beta, steps)


# ---------------------------------------------------------------------------------------------
# torch backend: T materialised once per call (one M x M buffer), nothing M x M saved for backward.


def _scaled_power(aff: torch.Tensor, beta: float, dtype: torch.dtype):
    """``(a, m, u)``: ``a = aff`` in ``dtype``, its column maxima ``m`` ``[B, 1, M]`` and
    ``u = (a / m) ** beta``, whose columns each hold a 1, so their sums neither over- nor underflow.
    """
    a = aff.to(dtype)
    m = a.amax(dim=1, keepdim=True)
    return a, m, (a / m).pow_(beta)


def _transition(aff: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
    _, _, t = _scaled_power(aff, beta, dtype)
    return t.div_(t.sum(dim=1, keepdim=True))


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _torch_walk(aff, x, beta, steps, transpose: bool) -> torch.Tensor:
    """``x @ T**steps`` (or ``x @ (T^T)**steps``) by ``steps`` batched matrix products."""
    acc = _acc_dtype(aff, x)
    if steps == 0:
        return x.clone()
    t = _transition(aff, beta, acc)
    if transpose:
        t = t.transpose(1, 2)
    y = x.to(acc)
    for _ in range(steps):
        y = torch.bmm(y, t)
    return y.to(x.dtype)


def _torch_forward(aff, cam, beta, steps):
    return _torch_walk(aff, cam, beta, steps, transpose=False)


def _torch_backward(aff, grad_out, beta, steps):
    return _torch_walk(aff, grad_out, beta, steps, transpose=True)


def _torch_grad_aff(aff, cam, grad_out, beta, steps) -> torch.Tensor:
    """dL/daff from dL/dT = sum_t X_t^T G_{t+1}, X_t = cam T^t, G_t = grad_out (T^T)^(steps-t).

    Through ``T = u / colsum(u)`` with ``u = (aff / m)**beta`` and the column maxima ``m`` held
    constant (T does not depend on them): ``dL/du_ij = (dT_ij - sum_k dT_kj T_kj) / colsum_j`` and
    ``du_ij/daff_ij = beta * (aff_ij / m_j)**(beta-1) / m_j``.
    """
    acc = _acc_dtype(aff, cam, grad_out)
    a, m, u = _scaled_power(aff, beta, acc)
    colsum = u.sum(dim=1, keepdim=True)
    t = u / colsum
    xs = [cam.to(acc)]
    for _ in range(steps - 1):
        xs.append(torch.bmm(xs[-1], t))
    g = grad_out.to(acc)
    d_t = torch.zeros_like(t)
    for x in reversed(xs):  # x = X_{k}, g = G_{k+1}
        d_t.baddbmm_(x.transpose(1, 2), g)
        g = torch.bmm(g, t.transpose(1, 2))
    d_u = (d_t - (d_t * t).sum(dim=1, keepdim=True)) / colsum
    return (d_u * beta * (a / m).pow(beta - 1) / m).to(aff.dtype)


class RandomWalkFunction(torch.autograd.Function):
    """Autograd for the ``torch`` and ``triton`` backends; saves only ``aff`` and ``cam``.

    ``fwd(aff, cam, beta, steps)`` and ``bwd(aff, grad_out, beta, steps)`` are the backend's
    launchers; ``grad_aff`` is the backend's gradient with respect to ``aff`` or None.
    """

    @staticmethod
    def forward(ctx, aff, cam, beta, steps, fwd, bwd, grad_aff):
        ctx.save_for_backward(aff, cam)
        ctx.beta, ctx.steps, ctx.bwd, ctx.grad_aff = beta, steps, bwd, grad_aff
        return fwd(aff, cam, beta, steps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        aff, cam = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_aff = grad_cam = None
        if ctx.needs_input_grad[0]:
            if ctx.grad_aff is None:
                raise _backend.BackendNotImplementedError(
                    "wsss_fast.random_walk: this backend has no gradient with respect to aff"
                )
            grad_aff = ctx.grad_aff(aff, cam, grad_out, ctx.beta, ctx.steps)
        if ctx.needs_input_grad[1]:
            grad_cam = ctx.bwd(aff, grad_out, ctx.beta, ctx.steps)
        return grad_aff, grad_cam, None, None, None, None, None


def _random_walk_torch(aff, cam, beta, steps):
    return RandomWalkFunction.apply(
        aff, cam, beta, steps, _torch_forward, _torch_backward, _torch_grad_aff
    )


def _random_walk_triton(aff, cam, beta, steps):
    _checks.dtype_for_backend(OP, "triton", aff, cam)
    if aff.is_meta or cam.is_meta:
        # Shape-only run: the launchers' outputs (one tensor like cam, or like grad_out), no launch.
        return RandomWalkFunction.apply(aff, cam, beta, steps, _fake_walk, _fake_walk, None)
    from wsss_fast.kernels import random_walk as kernels

    return RandomWalkFunction.apply(
        aff, cam, beta, steps, kernels.random_walk_fwd, kernels.random_walk_bwd, None
    )


def _fake_walk(aff, x, beta, steps):
    return torch.empty_like(x)


def _random_walk_cuda(aff, cam, beta, steps):
    return torch.ops.wsss_fast.random_walk_forward(aff, cam, beta, steps)


def _random_walk_reference(aff, cam, beta, steps):
    return reference.random_walk(aff, cam, beta=beta, steps=steps)


_IMPLS = {
    "reference": _random_walk_reference,
    "torch": _random_walk_torch,
    "triton": _random_walk_triton,
    "cuda": _random_walk_cuda,
}


# ---------------------------------------------------------------------------------------------
# The compiled op wsss_fast::random_walk_forward: fake kernels for torch.compile, autograd.

if _ext.has_op("random_walk_forward"):

    @torch.library.register_fake("wsss_fast::random_walk_forward")
    def _random_walk_forward_fake(aff, cam, beta, steps):
        return torch.empty_like(cam)

    @torch.library.register_fake("wsss_fast::random_walk_backward")
    def _random_walk_backward_fake(aff, grad_out, beta, steps):
        return torch.empty_like(grad_out)

    def _random_walk_setup_context(ctx, inputs, output):
        aff, _cam, beta, steps = inputs
        ctx.save_for_backward(aff)
        ctx.beta, ctx.steps = beta, steps

    def _random_walk_backward(ctx, grad_out):
        if ctx.needs_input_grad[0]:
            raise _backend.BackendNotImplementedError(
                "wsss_fast::random_walk_forward has no gradient with respect to aff; use the "
                "'torch' backend for that"
            )
        (aff,) = ctx.saved_tensors
        grad_cam = torch.ops.wsss_fast.random_walk_backward(
            aff, grad_out.contiguous(), ctx.beta, ctx.steps
        )
        return None, grad_cam, None, None

    torch.library.register_autograd(
        "wsss_fast::random_walk_forward",
        _random_walk_backward,
        setup_context=_random_walk_setup_context,
    )
