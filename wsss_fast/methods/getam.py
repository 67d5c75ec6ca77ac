"""GETAM (Sun et al., "Gradient-weighted Element-wise Transformer Attention Map for WSSS"),
end to end, after the published code (``weixuansun/GETAM``), without N x N gradients.

* :class:`GETAMNet`: a timm ViT (patched with :func:`wsss_fast.patch_timm`), a classifier on the
  global average of its final patch tokens (optionally plus its class token), and a light
  segmentation decoder over four blocks.
* :func:`class_slot_maps`: the GETAM map of every present class. The published code keeps each
  layer's ``[B, H, N, N]`` attention and its hooked gradient and runs one retained backward per
  (image, class). Here the gradient is taken with respect to each layer's attention *output*
  (``[B, H, N, D]``), and one :func:`torch.autograd.grad` pass serves the whole batch: pass ``j``
  differentiates the sum over images of each image's ``j``-th present class score.
  :func:`wsss_fast.getam_map` forms row 0 of the attention and of its gradient from q, k, v and
  that output gradient.
* :func:`refine_cams` (PAMR, per-class max normalisation) and :func:`complete_labels`
  (activation-aware label completion with a morphological opening) make the pseudo labels.
* :meth:`GETAM.training_step`: classification only for the first ``phase2_start`` of the steps,
  then the segmentation loss on the online pseudo labels at ``phase2_lr`` times the learning rate
  (:meth:`GETAM.lr_factor`).

Why one pass per class slot is exact: a ViT has no batch statistics after its stem (LayerNorm
and attention act within one image), so image ``b``'s class score depends on the attention
outputs of image ``b`` alone from the first captured layer on. The gradient of
``sum_b y[b, c_b]`` with respect to those outputs therefore splits into the per-image gradients
``d y[b, c_b] / d out_b``, which is what one backward per (image, class) gives. A batch norm in
the stem (:class:`wsss_fast.nn.ConvStemEmbed`) sits before every captured layer and does not
change this. Images with fewer than ``j + 1`` present classes leave their score out of pass ``j``.

Not implemented: the DenseEnergy (rloss) term of the published loss (weight 1e-7, a CPU
bilateral filter) and the CRF of the published inference.

Example::

    method = GETAM(GETAMConfig(num_classes=20, pretrained="vit_base_patch16_384.pth"))
    model = method.build_model()
    terms = method.training_step(model, batch, StepInfo(step=30000, total_steps=52900, ...))
    terms["loss"].backward()
    cam = method.cams(model.eval(), image, label)  # [1, 20, H, W], max-normalised
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops
from wsss_fast.data.io import IGNORE_INDEX
from wsss_fast.data.transforms import denormalize
from wsss_fast.engine.config import register_section
from wsss_fast.methods._common import (
    decay_groups,
    layer_from_config,
    mask_outside_box,
    or_auto,
    section_config,
)
from wsss_fast.methods._common import step_value as _info
from wsss_fast.methods._common import unwrap as _unwrap
from wsss_fast.nn import capture, create_vit, patch_timm
from wsss_fast.ops._checks import values_readable

__all__ = [
    "GETAM",
    "GETAMConfig",
    "GETAMNet",
    "IGNORE_INDEX",
    "class_slot_maps",
    "complete_labels",
    "getam_cams",
    "morphological_opening",
    "refine_cams",
    "segment",
    "split_ce_loss",
]

CLASSIFIERS = ("patches", "patches+token")


@dataclass
class GETAMConfig:
    """GETAM settings; defaults are the published ones (``train_from_init.py``, ``myTool.py``).

    ``start_layer``: the first layer whose attention enters the map. An integer ``>= 0`` is the
    layer itself (6 of ViT-B's 12); a value in ``(0, 1)`` is a fraction of the depth, rounded
    (for shallow test and demo models).

    Optimiser (the engine's ``optim`` section, not this one): the published ``PolyOptimizer``
    passes its weight decay into SGD's momentum slot (momentum 5e-4, no weight decay); that is
    ``optim.poly_quirk: true``. The default everywhere is the conventional SGD
    (``poly_quirk: false``, momentum 0.9 and a real weight decay): the quirk is an accident of a
    positional argument, and without momentum a model trained from scratch learns far slower.
    ``configs/getam_voc.yaml`` says how to switch to the published behaviour.
    """

    backbone: str = "vit_base_patch16_384"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``patch_size``, ...)."""
    stem: str = "patch"
    """``"patch"`` (timm's stem, for pretrained weights) or ``"conv"`` (from scratch)."""
    qk_init: str = "timm"
    """``"timm"`` or ``"tied"`` (:func:`wsss_fast.nn.backbones.tie_query_key`; from scratch)."""
    img_size: int = 256
    """The size the position embedding is built for; other sizes resample it."""
    num_classes: int = 20
    """Foreground classes C; the segmentation head predicts C + 1 (0 = background)."""
    pretrained: str | None = None
    """Local timm checkpoint of the plain ViT; nothing is downloaded."""
    drop_path_rate: float = 0.0
    start_layer: float = 6
    readout: str = "project"
    """How the class token reaches the patch features (DPT's readout): ``"project"`` (each patch
    token concatenated with the class token, ``Linear(2D, D)`` and GELU) or ``"ignore"``."""
    classifier: str = "patches"
    """``"patches"``: ``Linear`` of the global average of the final patch tokens (after the
    readout), as the published classifier pools them. ``"patches+token"``: that plus
    ``Linear`` of the final class token, the two logits summed. For a ViT trained from scratch:
    GETAM reads the class token's attention row, and with the patch classifier alone nothing
    makes that row look at the objects (see :class:`GETAMNet`)."""
    decoder_blocks: tuple[int, ...] = (2, 5, 8, 11)
    """The four blocks whose outputs feed the decoder (DPT's hooks for ViT-B)."""
    decoder_width: int = 256
    pamr_iters: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    norm_eps: float = 1e-5
    """``M / (max M + norm_eps)`` per class. The published 1e-5 is small next to a ViT-B's maps;
    a tiny model's raw maps can be of that order (lower it then, e.g. 1e-12), or the normalised
    maxima fall well below 1."""
    bg_power: float = 32.0
    """Background score ``(1 - max_c M_c) ** bg_power``."""
    percentile: float = 0.9
    """Completion threshold: this quantile of each present class's positive CAM values."""
    opening: int = 10
    """Side of the square of the foreground opening (0 or 1: no opening)."""
    phase2_start: float = 0.5
    """Fraction of the optimizer steps trained with the classification loss alone."""
    phase2_lr: float = 0.1
    """Learning-rate factor from ``phase2_start`` on (the published ``seg_lr_scale``)."""
    sal_weight: float = 1.0
    """Weight of the saliency BCE (only when the batch has ``saliency``)."""
    seg_scales: tuple[int, ...] = (256, 320, 480)
    """:func:`segment`'s square input sizes (the published test scales)."""

    def __post_init__(self):
        if self.readout not in ("project", "ignore"):
            raise ValueError(f"getam.readout={self.readout!r}; expected 'project' or 'ignore'")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(
                f"getam.classifier={self.classifier!r}; expected one of {', '.join(CLASSIFIERS)}"
            )
        if len(self.decoder_blocks) != 4:
            raise ValueError(
                f"getam.decoder_blocks={list(self.decoder_blocks)}; expected four block indices"
            )
        if not 0.0 <= self.phase2_start <= 1.0:
            raise ValueError(f"getam.phase2_start={self.phase2_start}; expected a value in [0, 1]")
        if not 0.0 < self.percentile < 1.0:
            raise ValueError(f"getam.percentile={self.percentile}; expected a value in (0, 1)")
        if self.opening < 0:
            raise ValueError(f"getam.opening={self.opening}; expected >= 0")


register_section("getam", GETAMConfig)  # the engine config's ``getam:`` section


def _config(cfg: Any, fallback: GETAMConfig | None = None) -> GETAMConfig:
    """The :class:`GETAMConfig` in ``cfg``: itself, or an engine config's ``getam`` section."""
    return section_config(cfg, GETAMConfig, "getam", "GETAM", fallback)


# ---------------------------------------------------------------------------- the model


class _Readout(nn.Module):
    """DPT's readout: patch tokens with the class token folded in, ``[B, P, D]``."""

    def __init__(self, dim: int, num_prefix: int, mode: str):
        super().__init__()
        self.num_prefix, self.mode = num_prefix, mode
        if mode == "project":
            self.proj = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.num_prefix :]
        if self.mode == "ignore":
            return patches
        cls = tokens[:, :1].expand_as(patches)
        return self.proj(torch.cat([patches, cls], dim=-1))


class GETAMNet(nn.Module):
    """A timm ViT with GETAM's classifier and a light segmentation decoder.

    Classifier: the final tokens (after the ViT's last norm) through a DPT-style readout
    (``"project"``: each patch token concatenated with the class token, ``Linear(2D, D)``, GELU),
    global-average-pooled over the patches, then ``Linear(D, C)``. The published classifier
    (``forward_cls``) pools DPT's ``layer_4`` instead: block-11 tokens after the same readout and
    DPT's reassemble convolutions (1x1 conv 768->768, 3x3 stride-2 conv). Here there are no
    reassemble convolutions, so the classifier is a linear function of the pooled readout. The
    readout keeps what GETAM reads: the class token's attention output reaches the class scores,
    so row 0 of every layer's attention gradient is informative (with ``readout="ignore"`` the
    last layer's class token would not reach the scores at all).

    ``classifier="patches+token"`` adds ``Linear(D, C)`` of the final (normed) class token to
    those logits. A pretrained ViT's class token was trained to classify, so its attention row,
    the row GETAM reads, already looks at objects; a ViT trained from scratch with the patch
    classifier alone has no such pull, and on the synthetic demo its class token came to attend
    to the background: after 8 classification-only epochs the GETAM CAM mIoU was 0.19 with
    ``"patches"`` against 0.45 with ``"patches+token"`` (train split; README "Demos").

    Decoder (in place of the DPT decoder and its SE ``cam_module``): for each of the four
    ``decoder_blocks``, the readout of that block's tokens, a 1x1 conv to ``width`` channels on
    the patch grid; the four maps summed, then 3x3 conv, batch norm, ReLU, dropout 0.1 and a 1x1
    conv to C + 1 classes, upsampled bilinearly to the input size.

    ``forward(image, with_seg=True)`` with ``image`` ``[B, 3, H, W]`` normalised, H and W
    multiples of the patch size, returns ``{"logits": [B, C], "seg": [B, C + 1, H, W]}``
    (``seg`` only with ``with_seg``).
    """

    def __init__(
        self,
        vit: nn.Module,
        num_classes: int,
        *,
        decoder_blocks: Sequence[int] = (2, 5, 8, 11),
        width: int = 256,
        readout: str = "project",
        classifier: str = "patches",
    ):
        super().__init__()
        if getattr(vit, "cls_token", None) is None:
            raise ValueError(
                "GETAMNet needs a timm ViT with a class token (class_token=True): GETAM reads "
                "the class token's attention row"
            )
        depth = len(vit.blocks)
        blocks = [int(b) for b in decoder_blocks]
        if len(blocks) != 4 or any(not 0 <= b < depth for b in blocks):
            raise ValueError(
                f"GETAMNet: decoder_blocks={blocks}; expected four block indices in "
                f"[0, {depth - 1}] for this {depth}-block ViT"
            )
        self.vit = patch_timm(vit)
        self.num_classes = int(num_classes)
        self.num_prefix = int(vit.num_prefix_tokens)
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.decoder_blocks = tuple(blocks)
        dim = vit.embed_dim
        self.cls_readout = _Readout(dim, self.num_prefix, readout)
        if classifier not in CLASSIFIERS:
            raise ValueError(
                f"GETAMNet: classifier={classifier!r}; expected one of {', '.join(CLASSIFIERS)}"
            )
        self.classifier = nn.Linear(dim, self.num_classes)
        self.token_classifier = (
            nn.Linear(dim, self.num_classes) if classifier == "patches+token" else None
        )
        self.readouts = nn.ModuleList(_Readout(dim, self.num_prefix, readout) for _ in blocks)
        self.reassemble = nn.ModuleList(nn.Conv2d(dim, width, 1) for _ in blocks)
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(width, self.num_classes + 1, 1),
        )

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def attn_scale(self) -> float:
        """The attention scale of the blocks (timm's ``head_dim ** -0.5``)."""
        return float(self.vit.blocks[0].attn.scale)

    def no_weight_decay(self) -> set[str]:
        return {"vit." + n for n in getattr(self.vit, "no_weight_decay", lambda: set())()}

    def forward(self, image: torch.Tensor, with_seg: bool = True) -> dict[str, torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"GETAMNet: image must be [B, 3, H, W], got {tuple(image.shape)}")
        B, _, H, W = image.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"GETAMNet: image {H}x{W} is not a multiple of the patch size {ph}x{pw}; pad or "
                "resize it first (GETAM.cams and segment pad)"
            )
        h, w = H // ph, W // pw
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))
        feats = []
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if with_seg and i in self.decoder_blocks:
                feats.append((i, x))
        x = vit.norm(x)
        logits = self.classifier(self.cls_readout(x).mean(1))
        if self.token_classifier is not None:
            logits = logits + self.token_classifier(x[:, 0])
        out = {"logits": logits}
        if with_seg:
            fused = 0
            for j, b in enumerate(self.decoder_blocks):
                tokens = next(t for i, t in feats if i == b)
                grid = self.readouts[j](tokens).transpose(1, 2).reshape(B, -1, h, w)
                fused = fused + self.reassemble[j](grid)
            seg = self.head(fused)
            out["seg"] = F.interpolate(seg, size=(H, W), mode="bilinear", align_corners=False)
        return out


def build_model(cfg: GETAMConfig) -> GETAMNet:
    """The :class:`GETAMNet` of ``cfg`` (weights from ``cfg.pretrained`` when set)."""
    vit = create_vit(
        cfg.backbone,
        stem=cfg.stem,
        qk_init=cfg.qk_init,
        pretrained=cfg.pretrained,
        **{
            **cfg.backbone_kwargs,
            "img_size": cfg.img_size,
            "drop_path_rate": cfg.drop_path_rate,
            "dynamic_img_size": True,
        },
    )
    return GETAMNet(
        vit,
        cfg.num_classes,
        decoder_blocks=cfg.decoder_blocks,
        width=cfg.decoder_width,
        readout=cfg.readout,
        classifier=cfg.classifier,
    )


def first_layer(start_layer: float, depth: int) -> int:
    """The first layer of the map from ``start_layer`` (see :class:`GETAMConfig`)."""
    return layer_from_config(start_layer, depth, 0, "GETAM: start_layer")


# ---------------------------------------------------------------------------- GETAM maps


def _check_label(label: torch.Tensor, B: int, C: int) -> torch.Tensor:
    if label.dim() != 2 or label.shape[0] != B or label.shape[1] != C:
        raise ValueError(
            f"GETAM: label must be a [B, C] = [{B}, {C}] multi-hot, got {tuple(label.shape)}"
        )
    return label > 0


def class_slot_maps(
    logits: torch.Tensor,
    label: torch.Tensor,
    q: Sequence[torch.Tensor],
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    *,
    num_prefix: int = 1,
    scale: float | None = None,
    retain_graph: bool = False,
) -> torch.Tensor:
    """GETAM maps of every present class, one gradient pass per class slot.

    Pass ``j`` differentiates ``sum_b logits[b, c_b(j)]`` over the images with at least ``j + 1``
    present classes (``c_b(j)``: image ``b``'s ``j``-th present class in ascending order) with
    respect to the attention outputs of the given layers, and reduces every layer with
    :func:`wsss_fast.getam_map` at row 0 (the layers stacked, so one call sums them). The map of
    image ``b`` and class ``c_b(j)`` is ``relu`` of that sum, patch columns only.

    Args:
        logits: ``[B, C]`` class scores in the graph of ``outputs``.
        label: ``[B, C]`` multi-hot.
        q, k, v, outputs: per layer ``[B, H, N, D]`` (a :func:`wsss_fast.capture` with
            ``keep_qkv`` and ``keep_outputs``), the layers that enter the map.
        num_prefix: prefix tokens before the patches (1: the class token).
        scale: the attention scale (``D ** -0.5`` by default, timm's).
        retain_graph: keep the graph after the last pass (for a loss on the same forward).

    Returns:
        ``[B, C, N - num_prefix]`` float32, no gradient; absent classes zero.
    """
    B, C = logits.shape
    present = _check_label(label, B, C)
    if not (len(q) == len(k) == len(v) == len(outputs)) or not outputs:
        raise ValueError(
            "GETAM: q, k, v and outputs must list the same (non-zero) number of layers, got "
            f"{len(q)}, {len(k)}, {len(v)}, {len(outputs)}"
        )
    N = outputs[0].shape[-2]
    maps = torch.zeros(B, C, N - num_prefix, dtype=torch.float32, device=logits.device)
    counts = present.sum(1)
    if values_readable(counts):
        passes = int(counts.max()) if B else 0
    else:
        # Shape-only run (meta tensors, `wsss-fast memory`): no labels to read, so the most
        # passes any batch can need, one per class.
        passes = C
    if passes == 0:
        return maps
    # Present classes first, in ascending order (a stable sort of "absent" flags).
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
    qs, ks, vs = (torch.stack([t.detach() for t in ts]) for ts in (q, k, v))
    images = torch.arange(B, device=logits.device)
    for j in range(passes):
        # Images with fewer than j + 1 classes take no part in pass j; masks, not boolean
        # indexing, so that no pass waits on the device for the number of such images.
        valid = counts > j
        cls = order[:, j]
        picked = logits.gather(1, cls[:, None])[:, 0]
        score = torch.where(valid, picked, torch.zeros_like(picked)).sum()
        grads = torch.autograd.grad(
            score,
            list(outputs),
            retain_graph=retain_graph or j < passes - 1,
            allow_unused=True,
        )
        g = torch.stack([torch.zeros_like(o) if d is None else d for d, o in zip(grads, outputs)])
        with torch.no_grad():
            qj, kj, vj = qs, ks, vs
            if len({qs.dtype, g.dtype}) > 1:
                qj, kj, vj, g = qs.float(), ks.float(), vs.float(), g.float()
            m = or_auto(ops.getam_map, qj, kj, vj, g, scale=scale, row=0)
            m = F.relu(m[:, num_prefix:].float())
            maps[images, cls] = torch.where(valid[:, None], m, maps[images, cls])
    return maps


def refine_cams(
    maps: torch.Tensor,
    image: torch.Tensor,
    label: torch.Tensor,
    *,
    grid: tuple[int, int],
    out_size: tuple[int, int] | None = None,
    pamr_iters: int = 10,
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """Patch maps to normalised CAMs: grid, bilinear upsampling (``align_corners=True``) to the
    image, PAMR on the de-normalised 0-255 image, ``M / (max M + norm_eps)`` per class, absent
    classes zero.

    Args:
        maps: ``[B, C, h * w]`` non-negative (:func:`class_slot_maps`).
        image: ``[B, 3, H, W]`` normalised (padded) input.
        label: ``[B, C]`` multi-hot.
        grid: ``(h, w)``.
        out_size: crop the upsampled maps and the image to this top-left region first (the
            un-padded size); default the whole image.

    Returns:
        ``[B, C, H', W']`` float32 in ``[0, 1)``, no gradient.
    """
    B, C = maps.shape[:2]
    with torch.no_grad():
        cam = maps.reshape(B, C, *grid).float()
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=True)
        img = denormalize(image.float(), max_value=255.0, clamp=True)
        if out_size is not None:
            cam = cam[..., : out_size[0], : out_size[1]]
            img = img[..., : out_size[0], : out_size[1]]
        if pamr_iters > 0:
            cam = or_auto(
                ops.pamr, img, cam.contiguous(), dilations=tuple(pamr_dilations), iters=pamr_iters
            )
        cam = cam / (cam.amax(dim=(2, 3), keepdim=True) + norm_eps)
        return cam * (label > 0).to(cam.dtype)[:, :, None, None]


def _pad_to_patch(image: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    H, W = image.shape[-2:]
    return F.pad(image, (0, -W % patch[1], 0, -H % patch[0]))


def getam_cams(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    cfg: GETAMConfig,
    *,
    flip: bool = False,
) -> torch.Tensor:
    """Evaluation GETAM CAMs of ``image`` at its own size: ``[B, C, H, W]`` in ``[0, 1)``.

    The image is zero-padded (bottom/right) to a multiple of the patch size; the maps of the
    layers ``start_layer..L-1`` come from :func:`class_slot_maps`; with ``flip`` the map of the
    flipped image is un-flipped and added before PAMR. Runs in the model's current mode (call
    ``model.eval()`` first) and with gradients on, whatever the caller's grad mode.
    """
    core = _unwrap(model)
    H, W = image.shape[-2:]
    if flip and W % core.patch_size[1]:
        # The flipped padded image would not line up with the padded image on the patch grid.
        raise ValueError(
            f"GETAM CAMs with flip need the image width to be a multiple of the patch size "
            f"{core.patch_size[1]}, got {W}; set eval.flip=false or resize the images"
        )
    x = _pad_to_patch(image, core.patch_size)
    grid = (x.shape[-2] // core.patch_size[0], x.shape[-1] // core.patch_size[1])
    start = first_layer(cfg.start_layer, core.depth)
    B = x.shape[0]
    label = label.to(x.device)
    _check_label(label, B, core.num_classes)
    total = None
    for flipped in (False, True) if flip else (False,):
        xi = x.flip(-1) if flipped else x
        with torch.enable_grad():
            with capture(core, keep_outputs=True, keep_qkv=True) as cap:
                out = core(xi, with_seg=False)
            m = class_slot_maps(
                out["logits"],
                label,
                cap.q[start:],
                cap.k[start:],
                cap.v[start:],
                cap.outputs[start:],
                num_prefix=core.num_prefix,
                scale=core.attn_scale,
            )
        if flipped:
            m = m.reshape(B, -1, *grid).flip(-1).flatten(2)
        total = m if total is None else total + m
    return refine_cams(
        total,
        x,
        label,
        grid=grid,
        out_size=(H, W),
        pamr_iters=cfg.pamr_iters,
        pamr_dilations=tuple(cfg.pamr_dilations),
        norm_eps=cfg.norm_eps,
    )


# ---------------------------------------------------------------------------- label completion


def morphological_opening(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Opening of a binary ``[B, H, W]`` mask with a ``size x size`` square.

    Erosion over the window ``[-size//2, size - 1 - size//2]`` (OpenCV's anchor for an even
    size; outside the image counts as foreground, OpenCV's default border), then dilation over
    the reflected window, so a square of side ``>= size`` survives exactly and the result is a
    subset of ``mask``. Written with ``max_pool2d`` (erosion is ``-maxpool(-x)``) and
    asymmetric padding, so the output has the input's size for even ``size`` too.
    """
    if mask.dim() != 3:
        raise ValueError(f"morphological_opening: mask must be [B, H, W], got {tuple(mask.shape)}")
    if size <= 1:
        return mask.bool()
    x = mask.float()[:, None]
    lo, hi = size // 2, size - 1 - size // 2
    eroded = -F.max_pool2d(F.pad(-x, (lo, hi, lo, hi), value=-1.0), size, stride=1)
    dilated = F.max_pool2d(F.pad(eroded, (hi, lo, hi, lo), value=0.0), size, stride=1)
    return (dilated[:, 0] > 0.5) & mask.bool()


def complete_labels(
    cam: torch.Tensor,
    label: torch.Tensor,
    saliency: torch.Tensor | None = None,
    *,
    bg_power: float = 32.0,
    percentile: float = 0.9,
    opening: int = 10,
) -> torch.Tensor:
    """Activation-aware label completion (``compute_seg_label_3`` of the published code).

    1. ``bg = (1 - max_c M_c) ** bg_power``; ``Y = argmax([bg, M])`` over the background and the
       present classes (class ``c`` is id ``c + 1``). With ``saliency``: ``Y = 0`` becomes 255
       and non-salient pixels become 0, as published; without it ``Y = 0`` stays background.
    2. For each present class ``c``, ``tau_c`` is the value at rank ``int(n * percentile)`` of
       the ``n`` positive values of ``M_c`` sorted ascending (no class with ``int(n * percentile)
       == 0``), as published; pixels with ``M_c > tau_c`` that step 1 labelled 0 are claimed by
       ``c``. A pixel claimed by one class becomes that class, by two or more 255. (The
       published loop relabels class by class and only claims pixels still at 0, so there the
       lowest class id wins a conflict; the 255 is what its conflict mask intends.)
    3. Everything that is not background (class ids and 255, as published) is opened with an
       ``opening x opening`` square (:func:`morphological_opening`); what does not survive
       becomes 0. (OpenCV's ``MORPH_OPEN`` with an even kernel uses the same anchor for the
       erosion and the dilation, which moves the result by one pixel; this is the exact opening.)

    Args:
        cam: ``[B, C, H, W]`` normalised CAMs (absent classes are ignored whatever they hold).
        label: ``[B, C]`` multi-hot.
        saliency: optional ``[B, H, W]`` in ``{0, 1}``, 1 = salient; 255 (padding, as the
            data layer marks it) gives 255.

    Returns:
        ``[B, H, W]`` int64: 0 background, ``c + 1`` class ``c``, 255 ignored.
    """
    if cam.dim() != 4:
        raise ValueError(f"complete_labels: cam must be [B, C, H, W], got {tuple(cam.shape)}")
    B, C, H, W = cam.shape
    present = _check_label(label.to(cam.device), B, C)
    if saliency is not None and tuple(saliency.shape) != (B, H, W):
        raise ValueError(
            f"complete_labels: saliency must be [B, H, W] = [{B}, {H}, {W}], got "
            f"{tuple(saliency.shape)}"
        )
    cam = cam.float().masked_fill(~present[:, :, None, None], 0.0)
    bg = (1.0 - cam.amax(1, keepdim=True)).clamp(min=0.0) ** bg_power
    scores = torch.cat([bg, cam.masked_fill(~present[:, :, None, None], float("-inf"))], 1)
    y = scores.argmax(1)
    if saliency is not None:
        saliency = saliency.to(cam.device)
        y = y.masked_fill(y == 0, IGNORE_INDEX).masked_fill(saliency == 0, 0)
        unknown = saliency == IGNORE_INDEX  # padding, as the data layer marks it
    claims = torch.zeros(B, H, W, dtype=torch.int64, device=cam.device)
    claimer = torch.zeros_like(claims)
    readable = values_readable(present, cam)
    if readable:
        pairs = present.nonzero().tolist()
    else:
        # Shape-only run (`wsss-fast memory`): every class of every image, every pixel
        # positive: the most work and memory the loop can take.
        pairs = [(b, c) for b in range(B) for c in range(C)]
    for b, c in pairs:
        m = cam[b, c]
        positive = torch.sort(m[m > 0] if readable else m.flatten()).values
        rank = int(positive.numel() * percentile)
        if rank == 0:
            continue
        tau = positive[rank]
        claim = (m > tau) & (y[b] == 0)
        claims[b] += claim
        claimer[b] = torch.where(claim, c + 1, claimer[b])
    y = torch.where(claims == 1, claimer, y)
    y = y.masked_fill(claims >= 2, IGNORE_INDEX)
    if saliency is not None:
        y = y.masked_fill(unknown, IGNORE_INDEX)
    if opening > 1:
        fg = y != 0
        kept = morphological_opening(fg, opening)
        y = y.masked_fill(fg & ~kept, 0)
    return y


# ---------------------------------------------------------------------------- losses, inference


def split_ce_loss(seg: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GETAM's segmentation loss terms: cross-entropy averaged over the background pixels and,
    separately, over the foreground pixels (255 ignored). A term with no pixel is 0 (finite, and
    its gradient is 0).

    Args:
        seg: ``[B, C + 1, H, W]`` logits.
        target: ``[B, H, W]`` int64 in ``{0..C, 255}``.

    Returns:
        ``(bg_loss, fg_loss)`` scalars.
    """
    if seg.dim() != 4 or target.shape != (seg.shape[0], *seg.shape[2:]):
        raise ValueError(
            f"split_ce_loss: seg [B, C + 1, H, W] and target [B, H, W] must match, got "
            f"{tuple(seg.shape)} and {tuple(target.shape)}"
        )
    target = target.long()
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= seg.shape[1]))
    if values_readable(bad) and bad.any():
        raise ValueError(
            f"split_ce_loss: target holds ids outside 0..{seg.shape[1] - 1} and 255: "
            f"{sorted(set(target[bad].unique().tolist()))[:5]}"
        )
    pixel = F.cross_entropy(seg.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    bg = target == 0
    fg = (target > 0) & (target != IGNORE_INDEX)
    bg_loss = (pixel * bg).sum() / bg.sum().clamp(min=1)
    fg_loss = (pixel * fg).sum() / fg.sum().clamp(min=1)
    return bg_loss, fg_loss


@torch.no_grad()
def segment(
    model: nn.Module, image: torch.Tensor, sizes: Sequence[int] = (256, 320, 480)
) -> torch.Tensor:
    """Segmentation-head inference, as published: the image square-resized to each of ``sizes``
    (aspect ratio not kept; each rounded up to a multiple of the patch size), the logits
    upsampled back to the image size and averaged, then softmax. No flip, no CRF.

    Returns:
        ``[B, C + 1, H, W]`` float32 class probabilities (index 0: background).
    """
    core = _unwrap(model)
    if not sizes:
        raise ValueError("segment: sizes is empty; give at least one input size")
    H, W = image.shape[-2:]
    ph, pw = core.patch_size
    total = None
    for s in sizes:
        size = (-(-int(s) // ph) * ph, -(-int(s) // pw) * pw)
        x = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
        seg = core(x)["seg"].float()
        seg = F.interpolate(seg, size=(H, W), mode="bilinear", align_corners=False)
        total = seg if total is None else total + seg
    return (total / len(sizes)).softmax(1)


# ---------------------------------------------------------------------------- the method


class GETAM:
    """The GETAM method for the engine: ``build_model``, ``training_step``, ``param_groups``,
    ``lr_factor``, ``cams``, ``pseudo_masks``.

    Phase 1 (steps before ``phase2_start * total_steps``): ``loss = MLSM(logits)``. Phase 2, at
    ``phase2_lr`` times the learning rate: one forward with the attention captured; the online
    GETAM CAMs of that forward (gradient passes on a retained graph, no gradient into the labels)
    and :func:`complete_labels` give the pseudo labels (255 outside ``crop_box``);
    ``loss = MLSM(logits) + CE_bg + CE_fg`` (:func:`split_ce_loss`) plus, when the batch has
    ``saliency``, ``sal_weight * BCE(softmax(seg)[:, 0], 1 - saliency)``.

    Saliency BCE target: the published code's target is 1 everywhere except at completed pixels
    (it reuses the saliency tensor after writing 255 into it), which looks unintended; here it is
    the non-salient mask, the evident intent.
    """

    def __init__(self, config: GETAMConfig | None = None):
        self.config = config if config is not None else GETAMConfig()

    def build_model(self, cfg: Any = None) -> GETAMNet:
        """The :class:`GETAMNet` of ``cfg`` (a GETAMConfig, an engine Config with a ``getam``
        section, or None for the method's own config)."""
        self.config = _config(cfg, self.config)
        model = build_model(self.config)
        first_layer(self.config.start_layer, model.depth)  # fail early on a bad start layer
        return model

    def param_groups(self, model: nn.Module, cfg: Any = None) -> list[dict]:
        """No weight decay on 1-d parameters (norms, biases), the class token and the position
        embedding; everything else decays. (The published code has one group; with
        ``optim.poly_quirk`` neither group decays.)"""
        model = _unwrap(model)
        return decay_groups(model)

    def phases(self, total_steps: int, steps_per_epoch: int) -> dict[str, tuple[int, int]]:
        """Training phases as ``name -> (step, epoch)`` of a step in each (``wsss-fast memory``):
        ``"1"`` classification only, ``"2"`` with the GETAM maps, pseudo labels and the
        segmentation loss."""
        s2 = self.phase2_step(total_steps)
        return {"1": (0, 0), "2": (s2, s2 // max(1, steps_per_epoch))}

    def phase2_step(self, total_steps: int) -> int:
        """The first optimizer step of phase 2."""
        return int(round(self.config.phase2_start * total_steps))

    def lr_factor(self, step: int, total_steps: int) -> float:
        """1 in phase 1, ``phase2_lr`` in phase 2 (multiplies the engine's schedule)."""
        return 1.0 if step < self.phase2_step(total_steps) else float(self.config.phase2_lr)

    def pseudo_labels(
        self,
        maps: torch.Tensor,
        image: torch.Tensor,
        label: torch.Tensor,
        grid: tuple[int, int],
        saliency: torch.Tensor | None = None,
        crop_box: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels [B, H, W], cams [B, C, H, W])`` from :func:`class_slot_maps` output."""
        cfg = self.config
        cam = refine_cams(
            maps,
            image,
            label,
            grid=grid,
            pamr_iters=cfg.pamr_iters,
            pamr_dilations=tuple(cfg.pamr_dilations),
            norm_eps=cfg.norm_eps,
        )
        y = complete_labels(
            cam,
            label,
            saliency,
            bg_power=cfg.bg_power,
            percentile=cfg.percentile,
            opening=cfg.opening,
        )
        return mask_outside_box(y, crop_box), cam

    def training_step(
        self, model: nn.Module, batch: Mapping[str, Any], step_info: Any
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``loss``, ``cls_loss`` and in phase 2 ``bg_loss``,
        ``fg_loss`` (and ``sal_loss`` with saliency).

        Args:
            model: the :class:`GETAMNet` of :meth:`build_model`, possibly DDP-wrapped.
            batch: ``image`` ``[B, 3, H, W]`` normalised (H, W multiples of the patch size),
                ``label`` ``[B, C]`` multi-hot, optional ``crop_box`` ``[B, 4]``, optional
                ``saliency`` ``[B, H, W]`` in ``{0, 1}`` (1 = salient, 255 = padding; the data
                layer's ``data.saliency_dir``).
            step_info: has ``step`` and ``total_steps`` (attributes or mapping keys).
        """
        cfg = self.config
        core = _unwrap(model)
        image, label = batch["image"], batch["label"].float()
        B = image.shape[0]
        _check_label(label, B, core.num_classes)
        phase2 = _info(step_info, "step") >= self.phase2_step(_info(step_info, "total_steps"))
        if not phase2:
            # Under DistributedDataParallel every parameter must take part in the loss.
            ddp = model is not core
            out = model(image, with_seg=ddp)
            cls_loss = F.multilabel_soft_margin_loss(out["logits"].float(), label)
            loss = cls_loss + (0.0 * out["seg"].sum() if ddp else 0.0)
            return {"loss": loss, "cls_loss": cls_loss}

        saliency = batch.get("saliency")
        if saliency is not None:
            saliency = saliency.to(image.device)
            if tuple(saliency.shape) != (B, *image.shape[-2:]):
                raise ValueError(
                    f"GETAM: batch['saliency'] must be [B, H, W] = [{B}, "
                    f"{image.shape[-2]}, {image.shape[-1]}], got {tuple(saliency.shape)}"
                )
        start = first_layer(cfg.start_layer, core.depth)
        with capture(core, keep_outputs=True, keep_qkv=True) as cap:
            out = model(image)
        logits = out["logits"]
        maps = class_slot_maps(
            logits,
            label,
            cap.q[start:],
            cap.k[start:],
            cap.v[start:],
            cap.outputs[start:],
            num_prefix=core.num_prefix,
            scale=core.attn_scale,
            retain_graph=True,
        )
        grid = (image.shape[-2] // core.patch_size[0], image.shape[-1] // core.patch_size[1])
        target, _ = self.pseudo_labels(
            maps, image, label, grid, saliency=saliency, crop_box=batch.get("crop_box")
        )
        cls_loss = F.multilabel_soft_margin_loss(logits.float(), label)
        seg = out["seg"].float()
        bg_loss, fg_loss = split_ce_loss(seg, target)
        terms = {"cls_loss": cls_loss, "bg_loss": bg_loss, "fg_loss": fg_loss}
        loss = cls_loss + bg_loss + fg_loss
        if saliency is not None:
            inside = mask_outside_box(torch.zeros_like(target), batch.get("crop_box")) == 0
            inside = inside & (saliency != IGNORE_INDEX)
            p_bg = seg.softmax(1)[:, 0].clamp(1e-6, 1 - 1e-6)
            sal_target = (saliency == 0).float()
            bce = F.binary_cross_entropy(p_bg, sal_target, reduction="none")
            sal_loss = (bce * inside).sum() / inside.sum().clamp(min=1)
            terms["sal_loss"] = sal_loss
            loss = loss + cfg.sal_weight * sal_loss
        terms["loss"] = loss
        return terms

    def cams(
        self, model: nn.Module, image: torch.Tensor, label: torch.Tensor, eval_cfg: Any = None
    ) -> torch.Tensor:
        """Evaluation CAMs (:func:`getam_cams`) of ``image`` ``[B, 3, H, W]`` at its own size.

        The published CAM is one scale without flip; ``eval_cfg.flip`` adds the flipped image's
        map before PAMR. ``eval_cfg.scales`` must be ``[1.0]``."""
        flip = False
        if eval_cfg is not None:
            if tuple(eval_cfg.scales) != (1.0,):
                raise ValueError(
                    "GETAM CAMs are computed at the image's own size; set eval.scales=[1.0] "
                    f"(got {list(eval_cfg.scales)})"
                )
            flip = bool(getattr(eval_cfg, "flip", False))
        return getam_cams(model, image, label, self.config, flip=flip)

    def pseudo_masks(
        self, cam: torch.Tensor, image01: torch.Tensor, label: torch.Tensor, eval_cfg: Any = None
    ) -> torch.Tensor:
        """Pseudo masks ``[B, H, W]`` from evaluation CAMs by :func:`complete_labels` (no
        saliency: the pure image-label setting); ``image01`` is not used (PAMR already ran)."""
        cfg = self.config
        return complete_labels(
            cam,
            label,
            None,
            bg_power=cfg.bg_power,
            percentile=cfg.percentile,
            opening=cfg.opening,
        )

    def segment(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """:func:`segment` at this config's ``seg_scales``."""
        return segment(model, image, self.config.seg_scales)
