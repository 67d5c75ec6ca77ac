"""timm ViTs for the methods: plain, or with a convolutional stem for training from scratch.

:func:`create_vit` is how every method builds its transformer: ``timm.create_model`` with the
weights of a local checkpoint (nothing is downloaded) and, with ``stem="conv"``,
:class:`ConvStemEmbed` in place of the patch embedding.

A ViT's patchify stem (one ``p x p`` stride-``p`` convolution) is what makes it slow to train
from scratch on little data; a stack of 3x3 stride-2 convolutions in its place (Xiao et al.,
*Early Convolutions Help Transformers See Better*, NeurIPS 2021) trains faster and more stably
at a small cost. The package uses it for the synthetic demos, which train from scratch on a CPU in
minutes; with pretrained weights, keep the timm stem (``stem="patch"``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

__all__ = ["QK_INITS", "STEMS", "ConvStemEmbed", "create_vit", "tie_query_key"]

STEMS = ("patch", "conv")
QK_INITS = ("timm", "tied")


def _patch_embed_base():
    from timm.layers import PatchEmbed

    return PatchEmbed


class ConvStemEmbed(_patch_embed_base()):
    """timm's ``PatchEmbed`` with a convolutional stem as its projection.

    ``log2(patch_size)`` blocks of 3x3 stride-2 convolution, batch norm and ReLU (widths doubling
    up to ``embed_dim``), then a 1x1 convolution to ``embed_dim``: the same ``[B, N, D]`` tokens
    on the same ``H/p x W/p`` grid as the patchify stem, so it drops into any timm
    ``VisionTransformer`` through its ``embed_layer`` argument. Needs a square power-of-two patch.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **kw):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=bias,
            **kw,
        )
        ph, pw = self.patch_size
        n = int(round(math.log2(ph))) if ph > 0 else -1
        if ph != pw or n < 1 or 2**n != ph:
            raise ValueError(
                f"ConvStemEmbed: patch size {self.patch_size} is not a square power of two "
                "(2, 4, 8, 16, ...); use stem='patch' for this model"
            )
        layers: list[nn.Module] = []
        c = in_chans
        for i in range(n):
            width = max(16, embed_dim // 2 ** (n - 1 - i))
            layers += [
                nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            c = width
        layers.append(nn.Conv2d(c, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)


@torch.no_grad()
def tie_query_key(vit: nn.Module, self_logit: float = 4.0, seed: int | None = None) -> int:
    """Initialise every timm ``Attention`` of ``vit`` with the key projection equal to the query
    projection, so its attention starts as a similarity kernel (``q_i . k_j = x_i W W^T x_j``, a
    positive semi-definite form): tokens attend to tokens like themselves, most of all to
    themselves. Returns the number of layers changed.

    This is the query-key half of Trockman & Kolter's *mimetic initialisation* (ICML 2023), which
    they show speeds up training ViTs from scratch on small data. The weights are drawn so that
    a layer-normalised token's logit with itself is about ``self_logit`` (timm's default init
    gives ~0.2, a near-uniform attention). Biases of q and k are zeroed.

    For training from scratch only: it overwrites pretrained q/k weights.
    """
    from timm.layers import Attention

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    n = 0
    for m in vit.modules():
        if type(m) is not Attention:
            continue
        dim = m.qkv.in_features
        hd = m.head_dim
        std = math.sqrt(self_logit / (dim * math.sqrt(hd)))
        w = torch.randn(dim, dim, generator=gen) * std
        m.qkv.weight[:dim].copy_(w)
        m.qkv.weight[dim : 2 * dim].copy_(w)
        if m.qkv.bias is not None:
            m.qkv.bias[: 2 * dim].zero_()
        n += 1
    return n


def create_vit(
    name: str,
    *,
    stem: str = "patch",
    qk_init: str = "timm",
    pretrained: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """A timm ViT ``name`` built with ``kwargs`` (``img_size``, ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads``, ``drop_path_rate``, ...); headless (``num_classes=0``) and with a
    class token unless ``kwargs`` say otherwise.

    Args:
        stem: ``"patch"`` (timm's own) or ``"conv"`` (:class:`ConvStemEmbed`).
        qk_init: ``"timm"`` (timm's init) or ``"tied"`` (:func:`tie_query_key`: attention starts
            as a similarity kernel; from scratch only).
        pretrained: a local timm checkpoint (``.pth`` / ``.safetensors``) loaded by timm's own
            loader, which resamples the position embedding to ``img_size`` and drops a head of
            another size. Only with ``stem="patch"``.
    """
    import timm

    kwargs.setdefault("num_classes", 0)  # headless: the methods add their own heads
    kwargs.setdefault("class_token", True)
    if stem not in STEMS:
        raise ValueError(f"create_vit: stem={stem!r}; expected one of {list(STEMS)}")
    if qk_init not in QK_INITS:
        raise ValueError(f"create_vit: qk_init={qk_init!r}; expected one of {list(QK_INITS)}")
    if qk_init == "tied" and pretrained:
        raise ValueError(
            "create_vit: qk_init='tied' re-initialises the attention, which would overwrite the "
            "pretrained weights; use it only for training from scratch"
        )
    if stem == "conv":
        if pretrained:
            raise ValueError(
                "create_vit: stem='conv' replaces the patch embedding, so a pretrained "
                "checkpoint does not fit it; use stem='patch' with pretrained weights"
            )
        kwargs["embed_layer"] = ConvStemEmbed
    if pretrained:
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained backbone weights {path} not found; nothing is downloaded, so put a "
                "timm checkpoint (.pth or .safetensors) there or leave `pretrained` unset"
            )
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs
        )
    vit = timm.create_model(name, pretrained=False, **kwargs)
    if qk_init == "tied":
        tie_query_key(vit)
    return vit
