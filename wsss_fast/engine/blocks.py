"""Activation checkpointing of a model's blocks (the memory lever beside the fused kernels)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_blocks"]


class _CheckpointedForward:
    """Instance-level ``forward`` that recomputes the block in backward.

    Set as an instance attribute instead of wrapping the block in another module, so parameter
    names (and therefore checkpoints and pretrained weights) do not change. ``copy.deepcopy`` of
    the model copies this object with the block, and the copy then points at the copied block.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        module = self.module
        forward = type(module).forward.__get__(module)
        if module.training and torch.is_grad_enabled():
            # Non-reentrant: works with DDP, with inputs that do not require grad, and with kwargs.
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def checkpoint_blocks(blocks, enabled: bool = True):
    """Make each module in ``blocks`` (an ``nn.ModuleList``/``nn.Sequential`` or any iterable of
    modules, e.g. a timm ViT's ``model.blocks``) recompute its activations in backward instead of
    storing them; ``enabled=False`` undoes it. Only in training mode with grad enabled; outputs
    and gradients are unchanged. Returns ``blocks``.

    Example::

        checkpoint_blocks(model.backbone.blocks, cfg.model.checkpoint_blocks)
    """
    for block in blocks:
        if enabled:
            block.forward = _CheckpointedForward(block)
        elif isinstance(block.__dict__.get("forward"), _CheckpointedForward):
            del block.forward
    return blocks
