"""The one tolerance policy, the saved-for-backward byte counter, and backend/device parameters.

Tolerance policy (DESIGN.md §4):
- float32 / float64 results: ``max |actual - expected| <= atol + rtol * max |expected|`` (a
  norm-wise bound, so entries that cancel to ~0 are not held to a relative error they cannot
  have) with the tight constants in ``TIGHT``; ``expected`` comes from the reference in float32
  or float64.
- float16 / bfloat16 results: the error of ``actual`` against ``expected`` must be at most twice
  the error of the same computation done by PyTorch in that dtype (``lowp``) against ``expected``,
  plus a rounding floor: ``2 * |(expected + 0.3) - 0.3 - expected|`` evaluated in that dtype
  (FlashAttention 3's floor). Without ``lowp``, PyTorch's error is taken to be the rounding of
  ``expected`` to the dtype.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from wsss_fast import _backend

TIGHT = {
    torch.float64: (1e-9, 1e-9),  # (rtol, atol)
    torch.float32: (2e-5, 2e-6),
}


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple, float, float]:
    err = (actual.double() - expected.double()).abs()
    flat = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    return float(err.max()), idx, float(actual.double()[idx]), float(expected.double()[idx])


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str = "output",
    lowp: torch.Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert ``actual`` matches ``expected`` under the policy above; print the worst element."""
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), (
        f"{name}: non-finite values differ"
    )
    if actual.numel() == 0:
        return
    a, e = actual.detach().cpu(), expected.detach().cpu()
    dtype = actual.dtype
    if dtype in TIGHT:
        r, t = TIGHT[dtype]
        r, t = (rtol if rtol is not None else r), (atol if atol is not None else t)
        worst, idx, av, ev = _worst(a, e)
        if worst <= t + r * float(e.double().abs().max()):
            return
        raise AssertionError(
            f"{name} ({dtype}): max error {worst:.3e} at {idx}: got {av:.8g}, expected {ev:.8g} "
            f"(rtol {r:g}, atol {t:g})"
        )
    e_low = e.to(dtype).double()
    floor = 2 * float(((e.to(dtype) + 0.3) - 0.3 - e.to(dtype)).double().abs().max())
    pt_err = (
        (lowp.detach().cpu().double() - e.double()).abs().max()
        if lowp is not None
        else (e_low - e.double()).abs().max()
    )
    our_err, idx, av, ev = _worst(a, e)
    allowed = 2 * float(pt_err) + floor + (atol or 0.0)
    if our_err > allowed:
        raise AssertionError(
            f"{name} ({dtype}): max error {our_err:.3e} at {idx} (got {av:.6g}, expected {ev:.6g}) "
            f"exceeds 2 x PyTorch's {dtype} error {float(pt_err):.3e} + floor {floor:.3e}"
        )


@contextlib.contextmanager
def saved_tensors() -> Iterator[list[torch.Tensor]]:
    """Collect every tensor autograd saves for backward inside the block (DESIGN.md §4)."""
    log: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        log.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield log


def saved_bytes(log: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among the saved tensors."""
    seen: dict[int, int] = {}
    for t in log:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def square_saved(log: list[torch.Tensor], n: int) -> list[tuple[int, ...]]:
    """Shapes of saved tensors holding an ``n x n`` block (two trailing dims of size n)."""
    return [tuple(t.shape) for t in log if t.dim() >= 2 and t.shape[-1] == n and t.shape[-2] == n]


def backend_devices(*backends: str) -> list:
    """``pytest.param(backend, device)`` for each backend on each device where it can run here.

    On a machine without a GPU the Triton kernels run interpreted on the CPU (conftest sets
    TRITON_INTERPRET=1); with a GPU they run on it. The ``cuda`` backend (the compiled extension)
    runs its C++ kernels on CPU tensors and its CUDA kernels on GPU tensors.
    """
    params = []
    for b in backends:
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        if b == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            devices = [d for d in devices if d == "cuda"]
        for d in devices:
            marks = [pytest.mark.gpu] if d == "cuda" else []
            reason = _backend.unavailable_reason(b, d)
            if reason is not None:
                # Not a silent pass: the build test below fails if the extension should exist.
                marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param(b, d, id=f"{b}-{d}", marks=marks))
    return params
