"""CRT, the CNN-refined transformer (Huo, Su, Wu; ``huodongjian0603/crt``).

Two branches are trained together on image labels and tied by an L1 term on their CAMs:

* :class:`CNNBranch`: a timm ResNet at output stride 16, batch norm always in eval mode, the stem
  frozen and the output of stage ``4 - cnn_trainable_stages`` detached (published: stages 3-4 and
  the head train); a 1x1 convolution without bias to C maps; logits by global average pooling.
* :class:`TiledViT`: a timm ViT (patched with :func:`wsss_fast.patch_timm`) run on overlapping
  square tiles of the image (:func:`tile`), its block stack applied ``block_repeats`` times with
  shared weights (``x <- x + blocks(x)``) and then the final norm; the patch tokens of each tile
  through a 3x3 convolution to C maps, the tile maps merged by averaging overlaps
  (:func:`merge`); logits by global average pooling.
* :meth:`CRT.training_step`: multilabel soft margin on both branches' logits, plus from epoch
  ``l1_start`` on ``l1_weight * mean |up(cam_cnn) - up(cam_vit)|`` (bilinear to the crop,
  ``align_corners=True``, raw maps, all classes; gradients reach both branches).
* :func:`cams`: evaluation CAMs from the transformer branch only: per tile the head-mean
  class-token attention over the patches, summed over every block application (the ``rows``
  export of :func:`wsss_fast.capture`; no N x N map exists), times the tile's conv maps; merged,
  cropped, ReLU, flips added, summed over scales, per-class max normalisation.

Every attention call goes through :mod:`wsss_fast.ops` (via the patched timm attention), so the
same code runs on every backend; ``backend=reference`` materialises what the published code does.

Example::

    method = CRT(CRTConfig(num_classes=20))
    model = method.build_model()
    terms = method.training_step(model, batch, {"epoch": 1})
    terms["loss"].backward()
    maps = cams(model, image, label)  # [1, 20, H, W] in [0, 1)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.engine.config import register_section
from wsss_fast.eval.cams import max_normalize
from wsss_fast.methods._common import section_config
from wsss_fast.methods._common import step_value as _info
from wsss_fast.methods._common import unwrap as _unwrap
from wsss_fast.nn import capture, create_vit, patch_timm

__all__ = [
    "CNNBranch",
    "CRT",
    "CRTConfig",
    "CRTModel",
    "TiledViT",
    "cams",
    "class_token_attention",
    "merge",
    "padded_size",
    "tile",
]


@dataclass
class CRTConfig:
    """CRT settings; defaults are the published ones (``run_sample.py``, ``net/*.py``).

    Published: ResNet-152 CNN branch (``cnn_backbone``; ``resnet50`` / ``resnet18`` by config),
    DeiT-S/16 at 224 transformer branch, tiles 224 with stride 112, three passes of the block
    stack, L1 weight 0.1 from the second epoch (``l1_start=1``, 0-based), heads at 10x the lr.
    """

    cnn_backbone: str = "resnet152"
    """A timm ResNet (``resnet152`` published; any ``timm`` ResNet with ``output_stride``)."""
    cnn_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments of the CNN."""
    cnn_pretrained: str | None = None
    """Local checkpoint of the CNN (timm / torchvision ResNet state dict); nothing is fetched."""
    cnn_trainable_stages: int = 2
    """How many of the four ResNet stages train (published: 2, stages 3-4); the output of the
    stage before them is detached and everything before it is frozen. The stem never trains."""
    cnn_frozen_bn: bool = True
    """Batch norm always in eval mode (published ``FixedBatchNorm``). ``false`` lets the CNN's
    batch norm update in training mode (for a CNN trained from scratch)."""
    vit_backbone: str = "deit_small_patch16_224"
    vit_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments of the ViT (``embed_dim``, ``depth``, ...)."""
    vit_pretrained: str | None = None
    """Local timm checkpoint of the ViT (``.pth`` / ``.safetensors``); nothing is fetched."""
    vit_stem: str = "patch"
    """``"patch"`` (timm's) or ``"conv"`` (:class:`wsss_fast.nn.ConvStemEmbed`, from scratch)."""
    vit_qk_init: str = "timm"
    """``"timm"`` or ``"tied"`` (:func:`wsss_fast.nn.backbones.tie_query_key`; from scratch
    only)."""
    num_classes: int = 20
    tile_size: int = 224
    """Tile side in pixels; also the ViT's ``img_size`` (no position-embedding resampling)."""
    tile_stride: int = 112
    """Tile stride in pixels; a multiple of the patch size that divides ``tile_size``."""
    block_repeats: int = 3
    """Applications of the weight-shared block stack per forward (``x <- x + blocks(x)``)."""
    l1_weight: float = 0.1
    l1_start: int = 1
    """First (0-based) epoch with the L1 term."""
    head_lr_mult: float = 10.0
    """lr multiplier of the new heads (the 1x1 and 3x3 convolutions)."""
    drop_path_rate: float = 0.0
    cam_attention: bool = True
    """Weight the evaluation CAMs by the summed class-token attention (published). ``false``
    uses the conv maps alone: an ablation, not CRT."""


register_section("crt", CRTConfig)  # the engine config's ``crt:`` section


def _config(cfg: Any, fallback: CRTConfig | None = None) -> CRTConfig:
    """The :class:`CRTConfig` in ``cfg``: itself, or an engine config's ``crt`` section."""
    return section_config(cfg, CRTConfig, "crt", "CRT", fallback)


# ---------------------------------------------------------------------------- tiling


def _check_tiling(tile_size: int, stride: int) -> None:
    if not (isinstance(tile_size, int) and isinstance(stride, int)) or tile_size < 1 or stride < 1:
        raise ValueError(f"tile size {tile_size!r} and stride {stride!r} must be integers >= 1")
    if tile_size % stride:
        raise ValueError(
            f"tile stride {stride} does not divide the tile size {tile_size}; CRT uses stride = "
            "tile / 2 (224 / 112)"
        )


def padded_size(side: int, tile_size: int, stride: int) -> int:
    """The published inference padding of one image side: ``max((side // stride + 1) * stride,
    tile_size)``. Always a size :func:`tile` takes (a multiple of ``stride``, ``>= tile_size``)."""
    _check_tiling(tile_size, stride)
    if side < 1:
        raise ValueError(f"padded_size: image side {side}; expected >= 1")
    return max((side // stride + 1) * stride, tile_size)


def tile(image: torch.Tensor, tile_size: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Overlapping square tiles of ``image``.

    Args:
        image: ``[B, K, H, W]`` with ``H, W >= tile_size`` and ``H - tile_size``,
            ``W - tile_size`` multiples of ``stride`` (pad first: :func:`padded_size`).
        tile_size, stride: in pixels; ``stride`` divides ``tile_size``.

    Returns:
        ``(tiles, (nh, nw))``: ``tiles`` ``[B * nh * nw, K, tile_size, tile_size]``, image-major
        then row-major (tile ``b * nh * nw + i * nw + j`` starts at pixel
        ``(i * stride, j * stride)`` of image ``b``), and the tile grid.
    """
    _check_tiling(tile_size, stride)
    if image.ndim != 4:
        raise ValueError(f"tile: image must be [B, K, H, W], got shape {tuple(image.shape)}")
    B, K, H, W = image.shape
    for name, side in (("height", H), ("width", W)):
        if side < tile_size or (side - tile_size) % stride:
            raise ValueError(
                f"tile: image {name} {side} cannot be cut into {tile_size}-px tiles with stride "
                f"{stride}: it must be tile_size + k * stride; pad it to padded_size(side, "
                f"{tile_size}, {stride}) = {padded_size(side, tile_size, stride)} first, or crop "
                "the training images to such a size"
            )
    nh, nw = (H - tile_size) // stride + 1, (W - tile_size) // stride + 1
    # [B, K, nh, nw, t, t] by two unfolds (views), then tiles first.
    tiles = image.unfold(2, tile_size, stride).unfold(3, tile_size, stride)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(B * nh * nw, K, tile_size, tile_size)
    return tiles, (nh, nw)


def merge(tile_maps: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Inverse of :func:`tile`: tile maps placed back on their grid, overlaps averaged.

    Args:
        tile_maps: ``[B * nh * nw, K, t, t]`` in the order :func:`tile` gives (at any resolution:
            for patch-token maps ``t`` and ``stride`` are in tokens, i.e. pixels / patch size).
        grid: ``(nh, nw)``.
        stride: tile stride in the units of ``tile_maps``.

    Returns:
        ``[B, K, (nh - 1) * stride + t, (nw - 1) * stride + t]``; differentiable.
    """
    if tile_maps.ndim != 4:
        raise ValueError(
            f"merge: tile_maps must be [tiles, K, t, t], got shape {tuple(tile_maps.shape)}"
        )
    nh, nw = (int(g) for g in grid)
    n, K, th, tw = tile_maps.shape
    if nh < 1 or nw < 1 or n % (nh * nw):
        raise ValueError(f"merge: {n} tile maps do not fill whole {nh} x {nw} grids")
    if stride < 1 or stride > min(th, tw):
        raise ValueError(f"merge: stride {stride} must be in [1, tile side {min(th, tw)}]")
    B = n // (nh * nw)
    H, W = (nh - 1) * stride + th, (nw - 1) * stride + tw
    maps = tile_maps.reshape(B, nh, nw, K, th, tw)
    total = tile_maps.new_zeros(B, K, H, W)
    count = tile_maps.new_zeros(1, 1, H, W)
    for i in range(nh):
        for j in range(nw):
            y, x = i * stride, j * stride
            total[:, :, y : y + th, x : x + tw] += maps[:, i, j]
            count[:, :, y : y + th, x : x + tw] += 1
    return total / count


# ---------------------------------------------------------------------------- the branches


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class CNNBranch(nn.Module):
    """The CNN branch: a timm ResNet at output stride 16 and a 1x1 conv (no bias) to C maps.

    Stem (``conv1``, ``bn1``) frozen; stages before the last ``trainable_stages`` frozen and their
    output detached; with ``frozen_bn`` every batch norm stays in eval mode whatever
    :meth:`train` is asked (the published ``FixedBatchNorm``).

    ``forward(image)`` -> ``(maps [B, C, H/16, W/16], logits [B, C])`` (logits: GAP of maps).

    Output stride 16 comes from timm's ``output_stride=16``, which keeps the last stage at
    stride 1 and dilates its 3x3 convolutions by 2 (the published torchvision/IRN ResNet sets
    the last stride to 1 without dilation; the maps have the same size, the receptive field of
    the last stage is wider here).
    """

    def __init__(
        self, resnet: nn.Module, num_classes: int, *, trainable_stages: int, frozen_bn: bool
    ):
        super().__init__()
        stages = ("layer1", "layer2", "layer3", "layer4")
        if not all(hasattr(resnet, s) for s in ("conv1", "bn1", "act1", "maxpool", *stages)):
            raise TypeError(
                f"CRT's CNN branch needs a timm ResNet (conv1, bn1, act1, maxpool, layer1-4); "
                f"got {type(resnet).__name__}"
            )
        if not 1 <= trainable_stages <= 4:
            raise ValueError(
                f"CRT: cnn_trainable_stages={trainable_stages}; expected 1..4 (published: 2)"
            )
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool)
        self.stages = nn.ModuleList(getattr(resnet, s) for s in stages)
        self.first_trained = 4 - trainable_stages
        self.frozen_bn = frozen_bn
        self.classifier = nn.Conv2d(resnet.num_features, num_classes, 1, bias=False)
        for p in self.stem.parameters():
            p.requires_grad_(False)
        for stage in self.stages[: self.first_trained]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> CNNBranch:
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if _is_bn(m):
                    m.eval()
        # The frozen stem never updates its statistics either.
        for m in self.stem.modules():
            if _is_bn(m):
                m.eval()
        return self

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(image)
        for i, stage in enumerate(self.stages):
            if i == self.first_trained:
                x = x.detach()
            x = stage(x)
        maps = self.classifier(x)
        return maps, maps.mean((2, 3))


class TiledViT(nn.Module):
    """The transformer branch: a timm ViT on overlapping tiles, blocks applied ``repeats`` times.

    Keeps the ViT's ``patch_embed``, class token, position embedding (built for
    ``tile_size``), ``norm_pre``, ``blocks`` and ``norm``; adds a 3x3 conv head on the patch
    tokens. :meth:`tile_maps` runs tiles; ``forward(image)`` tiles, runs and merges.

    ``forward(image)`` with ``image`` ``[B, 3, H, W]``, ``H, W = tile_size + k * stride``, returns
    ``(maps [B, C, H/p, W/p], logits [B, C])``.
    """

    def __init__(self, vit: nn.Module, num_classes: int, *, tile_size: int, stride: int, repeats):
        super().__init__()
        if getattr(vit, "cls_token", None) is None or getattr(vit, "num_prefix_tokens", 1) != 1:
            raise ValueError(
                "CRT's transformer branch needs a timm ViT with exactly one class token and no "
                "register or distillation tokens (class_token=True, reg_tokens=0)"
            )
        if getattr(vit, "pos_embed", None) is None or getattr(vit, "no_embed_class", False):
            raise ValueError(
                "CRT's transformer branch needs a learned position embedding that covers the "
                "class token (pos_embed set, no_embed_class=False), as DeiT/ViT have"
            )
        ph, pw = tuple(vit.patch_embed.patch_size)
        if ph != pw:
            raise ValueError(f"CRT: the ViT's patch {ph}x{pw} must be square")
        _check_tiling(tile_size, stride)
        if tuple(vit.patch_embed.img_size) != (tile_size, tile_size):
            raise ValueError(
                f"CRT: the ViT is built for {tuple(vit.patch_embed.img_size)} but the tiles are "
                f"{tile_size}; build it with img_size=tile_size"
            )
        if tile_size % ph or stride % ph:
            raise ValueError(
                f"CRT: tile size {tile_size} and stride {stride} must be multiples of the patch "
                f"size {ph}, so tile maps line up on the token grid when merged"
            )
        if repeats < 1:
            raise ValueError(f"CRT: block_repeats={repeats}; expected >= 1 (published: 3)")
        self.num_classes = int(num_classes)
        self.patch = ph
        self.tile_size, self.stride, self.repeats = tile_size, stride, int(repeats)
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.head = nn.Conv2d(vit.embed_dim, num_classes, kernel_size=3, padding=1)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        patch_timm(self)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def tile_maps(self, tiles: torch.Tensor) -> torch.Tensor:
        """Conv-head maps ``[T, C, t/p, t/p]`` of tiles ``[T, 3, t, t]`` (``t = tile_size``)."""
        T = tiles.shape[0]
        g = self.tile_size // self.patch
        x = self.patch_embed(tiles)
        x = torch.cat([self.cls_token.expand(T, -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(self.pos_drop(x))
        for _ in range(self.repeats):
            x = x + self.blocks(x)
        x = self.norm(x)
        patches = x[:, 1:].transpose(1, 2).reshape(T, -1, g, g)
        return self.head(patches)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiles, grid = tile(image, self.tile_size, self.stride)
        # Merged in float32 (the tile maps are bfloat16 under autocast).
        maps = merge(self.tile_maps(tiles).float(), grid, self.stride // self.patch)
        return maps, maps.mean((2, 3))


class CRTModel(nn.Module):
    """Both branches; ``forward(image)`` returns ``cnn_maps``, ``cnn_logits``, ``vit_maps``,
    ``vit_logits`` (maps raw, before any ReLU)."""

    def __init__(self, cnn: CNNBranch, vit: TiledViT):
        super().__init__()
        self.cnn, self.vit = cnn, vit

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        cnn_maps, cnn_logits = self.cnn(image)
        vit_maps, vit_logits = self.vit(image)
        return {
            "cnn_maps": cnn_maps,
            "cnn_logits": cnn_logits,
            "vit_maps": vit_maps,
            "vit_logits": vit_logits,
        }

    def head_parameters(self) -> list[nn.Parameter]:
        """The newly added heads (10x lr): the CNN's 1x1 and the ViT's 3x3 convolution."""
        return [*self.cnn.classifier.parameters(), *self.vit.head.parameters()]


def _load_cnn_weights(resnet: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CNN weights {path} not found; nothing is downloaded, so put a ResNet state dict "
            "there or leave crt.cnn_pretrained unset"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"CNN weights {path} do not fit {type(resnet).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; give a state dict of the same ResNet"
        )


def build_model(cfg: CRTConfig) -> CRTModel:
    """Both branches of ``cfg`` (weights from the local ``*_pretrained`` files when set)."""
    import timm

    resnet = timm.create_model(
        cfg.cnn_backbone,
        pretrained=False,
        **{**cfg.cnn_kwargs, "num_classes": 0, "global_pool": "", "output_stride": 16},
    )
    if cfg.cnn_pretrained:
        _load_cnn_weights(resnet, cfg.cnn_pretrained)
    cnn = CNNBranch(
        resnet,
        cfg.num_classes,
        trainable_stages=cfg.cnn_trainable_stages,
        frozen_bn=cfg.cnn_frozen_bn,
    )
    vit = create_vit(
        cfg.vit_backbone,
        stem=cfg.vit_stem,
        qk_init=cfg.vit_qk_init,
        pretrained=cfg.vit_pretrained,
        **{
            **cfg.vit_kwargs,
            "img_size": cfg.tile_size,
            "drop_path_rate": cfg.drop_path_rate,
        },
    )
    tiled = TiledViT(
        vit,
        cfg.num_classes,
        tile_size=cfg.tile_size,
        stride=cfg.tile_stride,
        repeats=cfg.block_repeats,
    )
    return CRTModel(cnn, tiled)


# ---------------------------------------------------------------------------- CAMs


def class_token_attention(vit: TiledViT, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv maps and summed class-token attention of tiles ``[T, 3, t, t]``.

    Returns ``(maps [T, C, g, g], R [T, 1, g, g])`` with ``g = t / patch`` and
    ``R = sum over the repeats * depth block applications of mean_h P_h[cls, patches]``, taken
    from the ``rows`` export (``[T, H, 1, N]`` per application), never from an N x N map.
    """
    T = tiles.shape[0]
    g = vit.tile_size // vit.patch
    with capture(vit, export="rows", num_rows=1) as cap:
        maps = vit.tile_maps(tiles)
    expected = vit.repeats * vit.depth
    if len(cap.exports) != expected:
        raise RuntimeError(
            f"CRT: captured {len(cap.exports)} attention calls, expected {expected} "
            f"({vit.repeats} repeats x {vit.depth} blocks); is every block patched?"
        )
    R = torch.stack([e[:, :, 0, 1:].float().mean(1) for e in cap.exports]).sum(0)
    return maps, R.reshape(T, 1, g, g)


def _scaled_cam(vit: TiledViT, image: torch.Tensor, attention: bool = True) -> torch.Tensor:
    """ReLU'd CAMs of ``image`` ``[B, 3, h, w]`` at its own size: ``[B, C, h, w]``.

    Zero padding (bottom/right) to :func:`padded_size`, tiles, ``R * maps`` per tile, merged on
    the token grid, upsampled by the patch size (bilinear), cropped to ``h x w``, ReLU.
    ``attention=False`` leaves out ``R`` (the conv maps alone).
    """
    h, w = image.shape[-2:]
    t, s = vit.tile_size, vit.stride
    Hp, Wp = padded_size(h, t, s), padded_size(w, t, s)
    tiles, grid = tile(F.pad(image, (0, Wp - w, 0, Hp - h)), t, s)
    if attention:
        maps, R = class_token_attention(vit, tiles)
        maps = R * maps.float()
    else:
        maps = vit.tile_maps(tiles).float()
    cam = merge(maps, grid, s // vit.patch)
    cam = F.interpolate(cam, size=(Hp, Wp), mode="bilinear", align_corners=False)
    return F.relu(cam[..., :h, :w])


@torch.no_grad()
def cams(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    attention: bool = True,
) -> torch.Tensor:
    """Evaluation CAMs from the transformer branch (``step/make_cam.py`` of the published code).

    For each scale: the image resized (bilinear), its CAM from :func:`_scaled_cam` plus the
    un-flipped CAM of its horizontal flip (each padded on its own right, as published), resized
    to ``H x W`` (bilinear); summed over scales; per-class max normalisation
    (:func:`wsss_fast.eval.max_normalize`, eps 1e-5); absent classes zero. Runs in the model's
    current mode (call ``model.eval()`` first).

    Args:
        model: a :class:`CRTModel` or :class:`TiledViT` (or a DDP wrapper).
        image: ``[B, 3, H, W]`` normalised images, any ``H, W``.
        label: optional ``[B, C]`` multi-hot; absent classes are zeroed when given.
        scales: image scales (published: 1.0, 0.5, 1.5, 2.0, 0.75, 1.25, 1.75).
        flip: add the CAM of the flipped image.
        attention: weight by the summed class-token attention (published); ``False`` is the
            conv-maps-only ablation.

    Returns:
        ``[B, C, H, W]`` float32 in ``[0, 1)``.
    """
    model = _unwrap(model)
    vit = model.vit if isinstance(model, CRTModel) else model
    if not isinstance(vit, TiledViT):
        raise TypeError(f"CRT cams: expected a CRTModel or TiledViT, got {type(model).__name__}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"CRT cams: image must be [B, 3, H, W], got {tuple(image.shape)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"CRT cams: scales={list(scales)}; expected positive numbers")
    B, _, H, W = image.shape
    total = None
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        x = image
        if size != (H, W):
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        if flip:
            both = _scaled_cam(vit, torch.cat([x, x.flip(-1)]), attention)
            cam = both[:B] + both[B:].flip(-1)
        else:
            cam = _scaled_cam(vit, x, attention)
        if size != (H, W):
            cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
        total = cam if total is None else total + cam
    cam = max_normalize(total)
    if label is not None:
        cam = cam * (label > 0).to(cam.dtype)[:, :, None, None]
    return cam


def pseudo_masks_from_cams(cam: torch.Tensor, label: torch.Tensor, bg: float) -> torch.Tensor:
    """Class ids ``[B, H, W]`` (0 background, ``c + 1`` class ``c``): the argmax of a constant
    background score ``bg`` and the CAMs of the present classes (ties go to background)."""
    B, C, H, W = cam.shape
    present = (label > 0).to(cam.dtype)[:, :, None, None]
    scores = torch.cat([cam.new_full((B, 1, H, W), float(bg)), cam * present], 1)
    return scores.argmax(1)


# ---------------------------------------------------------------------------- the method


class CRT:
    """The CRT method for the engine: ``build_model``, ``training_step``, ``param_groups``,
    ``cams``, ``pseudo_masks``.

    ``training_step``: ``loss = MLSM(cnn_logits) + MLSM(vit_logits)`` and, from epoch
    ``l1_start`` on, ``+ l1_weight * mean |up(cnn_maps) - up(vit_maps)|``.
    """

    def __init__(self, config: CRTConfig | None = None):
        self.config = config if config is not None else CRTConfig()

    def build_model(self, cfg: Any = None) -> CRTModel:
        """The :class:`CRTModel` of ``cfg`` (a CRTConfig, an engine Config with a ``crt``
        section, or None for the method's own config)."""
        self.config = _config(cfg, self.config)
        return build_model(self.config)

    def crop_grid(self) -> tuple[int, int]:
        """``(smallest, step)``: the training crops this method takes are ``smallest + k * step``
        (whole tiles; ``wsss-fast memory`` searches crops on this grid)."""
        return self.config.tile_size, self.config.tile_stride

    def param_groups(self, model: nn.Module, cfg: Any = None) -> list[dict]:
        """Backbones at the base lr, the new heads at ``head_lr_mult`` times it (the per-group
        ``lr``; the engine's schedule scales every group). Frozen parameters are left out. Each
        group carries ``optim.weight_decay`` itself, as the published ``PolyOptimizer`` groups do
        (so ``optim.poly_quirk`` keeps the weight decay); norms and biases are decayed too."""
        model = _unwrap(model)
        heads = {id(p) for p in model.head_parameters()}
        backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in heads]
        head = [p for p in model.head_parameters() if p.requires_grad]
        optim = getattr(cfg, "optim", None)
        if optim is None:
            raise TypeError(
                "CRT.param_groups needs the engine config (its optim.lr and optim.weight_decay "
                f"set the groups); got {type(cfg).__name__}"
            )
        base_lr, wd = float(optim.lr), float(optim.weight_decay)
        return [
            {"params": backbone, "lr": base_lr, "weight_decay": wd},
            {"params": head, "lr": base_lr * self.config.head_lr_mult, "weight_decay": wd},
        ]

    def cams(
        self, model: nn.Module, image: torch.Tensor, label: torch.Tensor, eval_cfg: Any = None
    ) -> torch.Tensor:
        """Evaluation CAMs (:func:`cams`) at ``eval_cfg.scales`` with ``eval_cfg.flip``."""
        scales = tuple(eval_cfg.scales) if eval_cfg is not None else (1.0,)
        flip = bool(getattr(eval_cfg, "flip", True)) if eval_cfg is not None else True
        attention = self.config.cam_attention
        return cams(model, image, label, scales=scales, flip=flip, attention=attention)

    def pseudo_masks(
        self, cam: torch.Tensor, image01: torch.Tensor, label: torch.Tensor, eval_cfg: Any
    ) -> torch.Tensor:
        """Seed masks ``[B, H, W]``: argmax against the constant background
        ``eval_cfg.bg_threshold`` (0.15 published for seeds; no CRF, no ignore label). The
        published pipeline refines the seeds with IRN, which is not part of this method."""
        return pseudo_masks_from_cams(cam, label, eval_cfg.bg_threshold)

    def training_step(
        self, model: nn.Module, batch: Mapping[str, Any], step_info: Any
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``loss``, ``cnn_loss``, ``vit_loss`` and, from epoch
        ``l1_start`` on, ``l1_loss`` (before its weight).

        Args:
            model: the :class:`CRTModel` of :meth:`build_model`, possibly DDP-wrapped.
            batch: ``image`` ``[B, 3, S, S]`` normalised, ``S = tile_size + k * tile_stride``
                (the published 336 = 224 + 112), ``label`` ``[B, C]`` multi-hot.
            step_info: has ``epoch`` (an attribute or a mapping key).
        """
        cfg = self.config
        image, label = batch["image"], batch["label"].float()
        if image.ndim != 4 or label.ndim != 2 or label.shape[0] != image.shape[0]:
            raise ValueError(
                f"CRT: batch image {tuple(image.shape)} / label {tuple(label.shape)}; expected "
                "[B, 3, H, W] and [B, C]"
            )
        if label.shape[1] != cfg.num_classes:
            raise ValueError(
                f"CRT: labels have {label.shape[1]} classes, crt.num_classes={cfg.num_classes}"
            )
        out = model(image)
        cnn_loss = F.multilabel_soft_margin_loss(out["cnn_logits"].float(), label)
        vit_loss = F.multilabel_soft_margin_loss(out["vit_logits"].float(), label)
        terms = {"cnn_loss": cnn_loss, "vit_loss": vit_loss}
        loss = cnn_loss + vit_loss
        if _info(step_info, "epoch") >= cfg.l1_start and cfg.l1_weight > 0:
            size = tuple(image.shape[-2:])
            up = [
                F.interpolate(out[k].float(), size=size, mode="bilinear", align_corners=True)
                for k in ("cnn_maps", "vit_maps")
            ]
            l1_loss = (up[0] - up[1]).abs().mean()
            terms["l1_loss"] = l1_loss
            loss = loss + cfg.l1_weight * l1_loss
        terms["loss"] = loss
        return terms
