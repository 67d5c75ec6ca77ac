"""The ops of DESIGN.md §3, one module each; ``reference`` holds the readable oracle of every op."""

from wsss_fast.ops import reference
from wsss_fast.ops._chunks import set_torch_chunk_elements
from wsss_fast.ops.affinity_loss import affinity_loss
from wsss_fast.ops.attention import attention
from wsss_fast.ops.getam_map import getam_map
from wsss_fast.ops.pamr import pamr
from wsss_fast.ops.par import par
from wsss_fast.ops.propagate import propagate
from wsss_fast.ops.random_walk import random_walk

__all__ = [
    "affinity_loss",
    "attention",
    "getam_map",
    "pamr",
    "par",
    "propagate",
    "random_walk",
    "reference",
    "set_torch_chunk_elements",
]
