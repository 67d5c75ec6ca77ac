"""The working-set budget of the ``torch`` backends, which process query rows in chunks.

Each chunk's widest transient (attention scores, affinity logits) holds about
``set_torch_chunk_elements`` elements; probabilities and gradients of the same size live beside it.
"""

from __future__ import annotations

from wsss_fast.ops import _checks

_budget = 1 << 25  # 128 MiB of float32 per transient


def set_torch_chunk_elements(n: int) -> None:
    """Bound every ``torch``-backend chunk to about ``n`` elements (default ``2**25``).

    Smaller values lower peak memory at some speed; a chunk always holds at least one row.
    """
    global _budget
    _budget = max(1, _checks.non_negative_int("set_torch_chunk_elements", "n", n))


def chunk_rows(elements_per_row: int) -> int:
    """Rows per chunk when one row of the widest transient has ``elements_per_row`` elements."""
    return max(1, _budget // max(1, elements_per_row))
