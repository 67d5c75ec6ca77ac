"""Triton kernels and their launchers, one file per op; installed as ``wsss_fast.kernels``.

Importing this package imports triton. ``wsss_fast`` imports it lazily, only when the ``triton``
backend is used, so a machine without triton can still use every other backend.
"""
