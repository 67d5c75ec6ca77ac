"""Backbones, heads and the timm attention drop-in (:func:`patch_timm`, :func:`capture`)."""

from wsss_fast.nn.backbones import ConvStemEmbed, create_vit
from wsss_fast.nn.timm_attention import Capture, capture, patch_timm

__all__ = ["Capture", "ConvStemEmbed", "capture", "create_vit", "patch_timm"]
