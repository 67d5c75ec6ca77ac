"""AReAM (He et al. 2023), the MCTformer-V2 variant of the published code (``Jessie459/AReAM``).

Deep-layer attention is supervised by token labels that shallow-layer affinities produce:

* :class:`ClassTokenViT`: a timm ViT with one class token per class; class logits from the class
  tokens, patch logits and CAMs from a 3x3 conv on the patch tokens.
* :meth:`AReAM.training_step`: multilabel soft-margin on class and patch logits; after
  ``cls_epochs`` epochs, plus ``aff_weight`` times the mean over deep layers ``l >= L0`` of
  :func:`wsss_fast.affinity_loss` against online pseudo labels (:meth:`AReAM.pseudo_labels`).
* :func:`cams`: the evaluation CAMs (scale 1 with flip, refined with all layers).

Every attention-sized quantity goes through :mod:`wsss_fast.ops` (``attention`` through
:func:`wsss_fast.patch_timm`, ``affinity_loss``, ``propagate``, ``par``), so the same code runs
on every backend; ``backend=reference`` materialises what the published code does.

Example::

    method = AReAM(AReAMConfig(num_classes=20, pretrained="deit_small_patch16_224-cd65a155.pth"))
    model = method.build_model()
    terms = method.training_step(model, batch, {"epoch": 12, "step": 0})
    terms["loss"].backward()
    maps = cams(model, images, labels)  # [B, 20, H, W] in [0, 1]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops
from wsss_fast.data.io import IGNORE_INDEX
from wsss_fast.data.transforms import denormalize
from wsss_fast.engine.config import register_section
from wsss_fast.eval.cams import minmax_normalize
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

__all__ = [
    "AReAM",
    "AReAMConfig",
    "ClassTokenViT",
    "IGNORE_INDEX",
    "cams",
    "combine_labels",
    "token_labels",
]


@dataclass
class AReAMConfig:
    """AReAM settings (MCTformer-V2 variant; defaults from ``main_voc_mctformer.py`` and ``.sh``).

    ``layer_index`` is L0, the first deep layer: an integer ``>= 1`` is the layer itself (7 of
    DeiT-S's 12); a value in ``(0, 1)`` is a fraction of the depth, rounded (for shallow test
    models). Layers ``< L0`` refine the pseudo labels, layers ``>= L0`` get the affinity loss.
    """

    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (e.g. ``embed_dim``, ``depth`` for a tiny ViT)."""
    img_size: int = 224
    """The size the position embedding is built for; other sizes resample it (bicubic)."""
    num_classes: int = 20
    """Foreground classes C (20 for VOC, 80 for COCO); class ids in labels are 1..C, 0 is bg."""
    pretrained: str | None = None
    """Local timm checkpoint (``.pth`` / ``.safetensors``) of the plain ViT; nothing is fetched."""
    stem: str = "patch"
    """``"patch"`` (timm's patchify stem) or ``"conv"`` (:class:`wsss_fast.nn.ConvStemEmbed`,
    for training from scratch; no pretrained weights)."""
    qk_init: str = "timm"
    """``"timm"`` or ``"tied"`` (:func:`wsss_fast.nn.backbones.tie_query_key`: attention starts
    as a similarity kernel; from scratch only)."""
    drop_path_rate: float = 0.1
    layer_index: float = 7
    cls_epochs: int = 10
    aff_weight: float = 0.1
    bg_scores: tuple[float, float] = (0.35, 0.55)
    """(low, high) constant background scores of the pseudo labels."""
    par_iters: int = 10
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_w_pos: float = 0.01
    par_down_scale: int = 2


register_section("aream", AReAMConfig)  # the engine config's ``aream:`` section


def _config(cfg: Any, fallback: AReAMConfig | None = None) -> AReAMConfig:
    """The :class:`AReAMConfig` in ``cfg``: itself, or an engine config's ``aream`` section."""
    return section_config(cfg, AReAMConfig, "aream", "AReAM", fallback)


# ---------------------------------------------------------------------------- the model


class ClassTokenViT(nn.Module):
    """A timm ``VisionTransformer`` run with C class tokens (MCTformer-V2), patched for wsss_fast.

    Takes the ViT's ``patch_embed``, ``pos_drop``, ``norm_pre`` and ``blocks`` (patched with
    :func:`wsss_fast.patch_timm`); its class token and the class token's position embedding are
    repeated C times, so a pretrained ViT's class token initialises every class token.

    The final ``norm`` of the ViT is not applied, as in the published ``forward_features``
    override, and is not kept (so no parameter goes unused under DistributedDataParallel).

    Tokens: C class tokens followed by the ``h * w`` patch tokens, ``num_prefix = C``.

    ``forward(image)`` with ``image`` ``[B, 3, H, W]``, H and W multiples of the patch size,
    returns a dict:

    * ``class_logits`` ``[B, C]``: mean over channels of the class tokens;
    * ``patch_logits`` ``[B, C]``: global average pool of ``maps``;
    * ``maps`` ``[B, C, h, w]``: 3x3 conv of the patch tokens (the CAM is ``relu(maps)``).
    """

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        if getattr(vit, "cls_token", None) is None or getattr(vit, "num_prefix_tokens", 1) != 1:
            raise ValueError(
                "ClassTokenViT needs a timm ViT with exactly one class token and no register or "
                "distillation tokens (class_token=True, reg_tokens=0, a non-distilled model)"
            )
        if getattr(vit, "pos_embed", None) is None or getattr(vit, "no_embed_class", False):
            raise ValueError(
                "ClassTokenViT needs a learned position embedding that covers the class token "
                "(pos_embed set, no_embed_class=False), as DeiT/ViT have"
            )
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError(
                "ClassTokenViT resamples the position embedding itself; build the "
                "timm model with dynamic_img_size=False"
            )
        C = int(num_classes)
        dim = vit.embed_dim
        self.num_classes = C
        self.patch_embed = vit.patch_embed
        # Image sizes other than the built one resample the position embedding, as MCTformer does.
        self.patch_embed.strict_img_size = False
        self.patch_size = tuple(self.patch_embed.patch_size)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.pos_drop = vit.pos_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        pos = vit.pos_embed.detach()
        self.cls_token = nn.Parameter(vit.cls_token.detach().repeat(1, C, 1).clone())
        self.cls_pos_embed = nn.Parameter(pos[:, :1].repeat(1, C, 1).clone())
        self.pos_embed = nn.Parameter(pos[:, 1:].clone())
        self.head = nn.Conv2d(dim, C, kernel_size=3, stride=1, padding=1)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        patch_timm(self)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "cls_pos_embed", "pos_embed"}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        B, _, H, W = image.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"ClassTokenViT: image {H}x{W} is not a multiple of the patch size {ph}x{pw}; "
                "crop or pad it first (wsss_fast.methods.aream.cams pads)"
            )
        h, w = H // ph, W // pw
        x = self.patch_embed(image)  # [B, h*w, dim]
        pos = self.pos_embed
        if (h, w) != self.grid_size:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, (h, w), self.grid_size, num_prefix_tokens=0)
        x = torch.cat([self.cls_token.expand(B, -1, -1) + self.cls_pos_embed, x + pos], dim=1)
        x = self.norm_pre(self.pos_drop(x))
        x = self.blocks(x)
        C = self.num_classes
        class_logits = x[:, :C].mean(-1)
        patches = x[:, C:].transpose(1, 2).reshape(B, -1, h, w)
        maps = self.head(patches)
        return {
            "class_logits": class_logits,
            "patch_logits": maps.mean((2, 3)),
            "maps": maps,
        }


def build_backbone(cfg: AReAMConfig) -> ClassTokenViT:
    """The timm ViT of ``cfg`` (weights from ``cfg.pretrained`` when set) as a ClassTokenViT."""
    vit = create_vit(
        cfg.backbone,
        stem=cfg.stem,
        qk_init=cfg.qk_init,
        pretrained=cfg.pretrained,
        **{
            **cfg.backbone_kwargs,
            "img_size": cfg.img_size,
            "drop_path_rate": cfg.drop_path_rate,
        },
    )
    return ClassTokenViT(vit, cfg.num_classes)


def first_deep_layer(layer_index: float, depth: int) -> int:
    """L0 from ``layer_index`` (see :class:`AReAMConfig`); ``1 <= L0 <= depth - 1``: at least
    one shallow and one deep layer."""
    return layer_from_config(layer_index, depth, 1, "AReAM: layer_index")


# ---------------------------------------------------------------------------- CAMs


def _refined_cams(
    model: ClassTokenViT, image: torch.Tensor, layers: slice, out_size: tuple[int, int]
) -> torch.Tensor:
    """Un-normalised CAMs of ``image`` and its flip, summed: ``[B, C, *out_size]``.

    ``relu(maps) * mean_l mean_h P_l[class c -> patches]`` (all layers), then
    ``propagate`` over ``layers`` with weights ``1 / len(layers)``, bilinear upsampling to the
    (possibly padded) input size, un-flip and sum, crop to ``out_size``.
    """
    B = image.shape[0]
    C = model.num_classes
    x = torch.cat([image, image.flip(-1)])
    with capture(model, export="rows", num_rows=C, keep_qkv=True) as cap:
        out = model(x)
    maps = out["maps"].float()
    h, w = maps.shape[-2:]
    class_to_patch = torch.stack([r.mean(1) for r in cap.exports]).mean(0)[:, :, C:]
    cam = F.relu(maps).flatten(2) * class_to_patch  # [2B, C, h*w]
    q, k = cap.q[layers], cap.k[layers]
    weights = torch.full((len(q),), 1.0 / len(q), device=cam.device)
    cam = ops.propagate(q, k, cam, num_prefix=C, weights=weights).reshape(2 * B, C, h, w)
    cam = F.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    # Un-flip before cropping: the flipped half was padded on its left.
    cam = cam[:B] + cam[B:].flip(-1)
    return cam[..., : out_size[0], : out_size[1]]


@torch.no_grad()
def cams(model: nn.Module, image: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluation CAMs (``generate_attention_maps`` of the published code): scale 1 with flip.

    The image is zero-padded (bottom/right) to a multiple of the patch size and then flipped
    (the published code pads the flipped image on its own right instead); the CAM is
    ``relu(maps)`` times the head-mean class-to-patch attention averaged over all layers, refined
    with the head-mean patch attention of all layers (``propagate``, weights ``1 / L``),
    upsampled, cropped, un-flipped and summed, then ReLU and per-class min-max normalised.
    Runs in the model's current mode (call ``model.eval()`` first for inference).

    Args:
        model: a :class:`ClassTokenViT` (or a DDP wrapper of one).
        image: ``[B, 3, H, W]`` normalised images, any H, W.
        label: optional ``[B, C]`` multi-hot; absent classes are zeroed when given.

    Returns:
        ``[B, C, H, W]`` float32 in ``[0, 1)``, no gradient.
    """
    model = _unwrap(model)
    H, W = image.shape[-2:]
    ph, pw = model.patch_size
    padded = F.pad(image, (0, -W % pw, 0, -H % ph))
    cam = minmax_normalize(_refined_cams(model, padded, slice(None), (H, W)))
    if label is not None:
        cam = cam * (label > 0).to(cam.dtype)[:, :, None, None]
    return cam


# ---------------------------------------------------------------------------- pseudo labels


def combine_labels(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AFA/AReAM's two-threshold rule: ``Y = high``; ``Y[high == 0] = 255``;
    ``Y[high == 0 & low == 0] = 0``.

    ``low`` / ``high`` are ``[B, H, W]`` class-id maps (0 = background) made with the low and the
    high background score: confident foreground comes from ``high``, confident background needs
    both, every other background pixel is ignored.
    """
    y = high.clone()
    bg_high = high == 0
    y[bg_high] = IGNORE_INDEX
    y[bg_high & (low == 0)] = 0
    return y


def token_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest downsampling of ``[B, H, W]`` pixel labels to the ``[B, h*w]`` token grid
    (``F.interpolate(mode="nearest")``: the top-left pixel of each patch; 255 stays 255)."""
    small = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")
    return small[:, 0].long().flatten(1)


def cam_to_labels(
    cam: torch.Tensor,
    image01: torch.Tensor,
    label: torch.Tensor,
    bg_score: float,
    *,
    down_scale: int = 2,
    par_iters: int = 10,
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    par_w_pos: float = 0.01,
) -> torch.Tensor:
    """Class ids ``[B, H, W]`` (0 = background, c + 1 = class c) from normalised CAMs.

    Prepends a constant background channel ``bg_score``, resizes image and maps by
    ``1 / down_scale`` (bilinear), softmaxes over background and the present classes (absent
    classes get probability 0, as the published per-image channel selection does), refines with
    :func:`wsss_fast.par`, upsamples to ``H x W`` and takes the argmax.

    Args:
        cam: ``[B, C, H, W]`` CAMs in ``[0, 1]``.
        image01: ``[B, 3, H, W]`` images in ``[0, 1]``.
        label: ``[B, C]`` multi-hot.
    """
    B, C, H, W = cam.shape
    small = (H // down_scale, W // down_scale)
    bg = cam.new_full((B, 1, H, W), float(bg_score))
    scores = F.interpolate(
        torch.cat([bg, cam], 1), size=small, mode="bilinear", align_corners=False
    )
    valid = torch.cat([label.new_ones(B, 1), label], 1) > 0
    probs = scores.masked_fill(~valid[:, :, None, None], float("-inf")).softmax(1)
    img = F.interpolate(image01.float(), size=small, mode="bilinear", align_corners=False)
    probs = or_auto(ops.par, img, probs, dilations=par_dilations, iters=par_iters, w_pos=par_w_pos)
    probs = F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)
    return probs.argmax(1)


# ---------------------------------------------------------------------------- the method


class AReAM:
    """The AReAM method for the engine: ``build_model``, ``training_step``, ``param_groups``.

    ``training_step`` before epoch ``cls_epochs``: ``loss = MLSM(class_logits) +
    MLSM(patch_logits)``. From then on, with pseudo labels from :meth:`pseudo_labels`:
    ``loss += aff_weight * mean_{l >= L0} affinity_loss(q_l, k_l, token_labels)``.
    """

    def __init__(self, config: AReAMConfig | None = None):
        self.config = config if config is not None else AReAMConfig()

    def build_model(self, cfg: Any = None) -> ClassTokenViT:
        """The :class:`ClassTokenViT` of ``cfg`` (an AReAMConfig, an engine Config with an
        ``aream`` section, or None for the method's own config)."""
        self.config = _config(cfg, self.config)
        model = build_backbone(self.config)
        first_deep_layer(self.config.layer_index, model.depth)  # fail early on a bad L0
        return model

    def phases(self, total_steps: int, steps_per_epoch: int) -> dict[str, tuple[int, int]]:
        """Training phases as ``name -> (step, epoch)`` of a step in each (``wsss-fast memory``):
        ``"1"`` classification only, ``"2"`` from epoch ``cls_epochs`` on, with the online pseudo
        labels and the affinity loss (absent when ``aff_weight`` is 0)."""
        out = {"1": (0, 0)}
        if self.config.aff_weight > 0:
            e = self.config.cls_epochs
            out["2"] = (e * steps_per_epoch, e)
        return out

    def param_groups(self, model: nn.Module, cfg: Any = None) -> list[dict]:
        """timm's ``create_optimizer`` grouping: no weight decay on 1-d parameters (norms,
        biases) and on the class tokens and position embeddings."""
        model = _unwrap(model)
        return decay_groups(model)

    def cams(
        self, model: nn.Module, image: torch.Tensor, label: torch.Tensor, eval_cfg: Any = None
    ) -> torch.Tensor:
        """Evaluation CAMs (:func:`cams`): scale 1 with flip, the published rule; ``eval_cfg``
        (the engine's ``eval`` section) must ask for exactly that."""
        if eval_cfg is not None and (
            tuple(eval_cfg.scales) != (1.0,) or not getattr(eval_cfg, "flip", True)
        ):
            raise ValueError(
                "AReAM CAM inference is scale 1 with flip (the published rule); got "
                f"eval.scales={list(eval_cfg.scales)}, eval.flip={eval_cfg.flip}"
            )
        return cams(model, image, label)

    def pseudo_masks(
        self, cam: torch.Tensor, image01: torch.Tensor, label: torch.Tensor, eval_cfg: Any
    ) -> torch.Tensor:
        """Pseudo masks ``[B, H, W]`` from evaluation CAMs: :func:`cam_to_labels` at the
        background score ``eval_cfg.bg_threshold`` with this config's PAR settings."""
        cfg = self.config
        return cam_to_labels(
            cam,
            image01,
            label,
            eval_cfg.bg_threshold,
            down_scale=cfg.par_down_scale,
            par_iters=cfg.par_iters,
            par_dilations=tuple(cfg.par_dilations),
            par_w_pos=cfg.par_w_pos,
        )

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: Mapping[str, Any], n: int = 4) -> dict:
        """What the engine shows in TensorBoard for the first ``n`` images of ``batch``: the
        images in ``[0, 1]``, their evaluation CAMs (max over present classes) and their online
        pseudo labels."""
        core = _unwrap(model)
        image, label = batch["image"][:n], batch["label"][:n].float()
        box = batch.get("crop_box")
        was_training = core.training
        core.eval()
        try:
            cam = cams(core, image, label).amax(1)
        finally:
            core.train(was_training)
        pseudo = self.pseudo_labels(core, image, label, None if box is None else box[:n])
        return {
            "image": denormalize(image.float()).clamp(0, 1),
            "cam": cam,
            "pseudo": pseudo.cpu().numpy(),
        }

    @torch.no_grad()
    def pseudo_labels(
        self,
        model: nn.Module,
        image: torch.Tensor,
        label: torch.Tensor,
        crop_box: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Online pseudo labels ``[B, H, W]`` int64 (0 = bg, c + 1 = class c, 255 = ignore).

        The batch and its flip through the model; ``relu(maps)`` times the class-to-patch
        head-mean attention averaged over all layers; ``propagate`` over the shallow layers
        ``l < L0`` with weights ``1 / L0``; upsample, un-flip and sum, ReLU, per-class min-max,
        absent classes zeroed; :func:`cam_to_labels` at the low and high background score;
        :func:`combine_labels`; 255 outside ``crop_box``.

        The pass runs in eval mode (drop-path off), so the labels do not depend on the random
        state; the published code draws them from the stochastic training-mode network.
        """
        cfg = self.config
        core = _unwrap(model)
        L0 = first_deep_layer(cfg.layer_index, core.depth)
        was_training = core.training
        core.eval()
        try:
            cam = _refined_cams(core, image, slice(0, L0), tuple(image.shape[-2:]))
        finally:
            core.train(was_training)
        cam = minmax_normalize(cam) * (label > 0).to(cam.dtype)[:, :, None, None]
        image01 = denormalize(image.float())
        low, high = (
            cam_to_labels(
                cam,
                image01,
                label,
                score,
                down_scale=cfg.par_down_scale,
                par_iters=cfg.par_iters,
                par_dilations=tuple(cfg.par_dilations),
                par_w_pos=cfg.par_w_pos,
            )
            for score in sorted(cfg.bg_scores)
        )
        return mask_outside_box(combine_labels(low, high), crop_box)

    def training_step(
        self, model: nn.Module, batch: Mapping[str, Any], step_info: Any
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``loss``, ``cls_loss``, ``patch_loss`` and, from epoch
        ``cls_epochs`` on, ``aff_loss`` (before its weight).

        Args:
            model: the :class:`ClassTokenViT` of :meth:`build_model`, possibly DDP-wrapped.
            batch: ``image`` ``[B, 3, H, W]`` normalised (H, W multiples of the patch size),
                ``label`` ``[B, C]`` multi-hot float, optional ``crop_box`` ``[B, 4]``
                ``[y0, y1, x0, x1]`` (pixels outside become ignored in the pseudo labels).
            step_info: has ``epoch`` (an attribute or a mapping key).
        """
        cfg = self.config
        image, label = batch["image"], batch["label"].float()
        core = _unwrap(model)
        use_aff = _info(step_info, "epoch") >= cfg.cls_epochs and cfg.aff_weight > 0
        if not use_aff:
            out = model(image)
        else:
            seg = self.pseudo_labels(model, image, label, batch.get("crop_box"))
            grid = (image.shape[-2] // core.patch_size[0], image.shape[-1] // core.patch_size[1])
            tokens = token_labels(seg, grid)
            with capture(core, keep_qkv=True) as cap:
                out = model(image)
        cls_loss = F.multilabel_soft_margin_loss(out["class_logits"].float(), label)
        patch_loss = F.multilabel_soft_margin_loss(out["patch_logits"].float(), label)
        terms = {"cls_loss": cls_loss, "patch_loss": patch_loss}
        loss = cls_loss + patch_loss
        if use_aff:
            L0 = first_deep_layer(cfg.layer_index, core.depth)
            C = core.num_classes
            deep = [
                ops.affinity_loss(q, k, tokens, num_prefix=C)
                for q, k in zip(cap.q[L0:], cap.k[L0:])
            ]
            aff_loss = torch.stack(deep).mean()
            terms["aff_loss"] = aff_loss
            loss = loss + cfg.aff_weight * aff_loss
        terms["loss"] = loss
        return terms
