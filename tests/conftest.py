"""Test set-up: the Triton interpreter on machines without a GPU, and the ``gpu`` marker.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the first module pytest imports, when no GPU is visible.
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts from the default backend choice, whatever the previous one set."""
    import wsss_fast

    wsss_fast.set_backend(None)
    yield
    wsss_fast.set_backend(None)
