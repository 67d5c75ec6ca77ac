"""One training step of each method, published memory behaviour (``reference``) against fused.

Cases (the issues' targets): AReAM at crop 448, batch 8 (and the largest crop at batch 8);
GETAM's phase-2 step at crops 256 and 512, batch 4 (ViT-B/16, start layer 6, 20 classes);
CRT at crops 336 and 672, batch 16 (ResNet-152 at stride 16 and DeiT-S/16 on 224 tiles).

AReAM (the issue's case): DeiT-S/16 with 20 class tokens, crop 448, batch 8, a step of the
affinity phase (online pseudo labels: the batch and its flip through the model, ``propagate``
over the shallow layers, ``par`` twice; then the forward with q/k kept, the classification
losses and ``affinity_loss`` over the deep layers; backward; AdamW step) under bf16 autocast as
the engine runs it. ``reference`` materialises every ``[B, H, N, N]`` attention as the
published code does; ``fused`` is ``auto`` (Triton attention / affinity ops on a GPU).

Recorded per case: median step time (pytest-benchmark) and the peak memory of the step above the
model and optimizer state. ``test_aream_largest_crop`` records, per provider, the largest crop
(multiples of 64 from 448) whose step fits in GPU memory at batch 8.

Weights are random (no checkpoint is downloaded): time and memory do not depend on them.
"""

import pytest
import torch
from harness import HAS_GPU, SMOKE, record_result_only, run_and_measure

import wsss_fast
from wsss_fast.methods.aream import AReAM, AReAMConfig
from wsss_fast.methods.crt import CRT, CRTConfig
from wsss_fast.methods.getam import GETAM, GETAMConfig

PROVIDERS = {"reference": "reference", "fused": "auto"}
if SMOKE:
    AREAM = dict(backbone_kwargs=dict(embed_dim=32, depth=4, num_heads=2), num_classes=3)
    AREAM_CASES = [(32, 1)]
    CROP_LADDER = [32, 48]
    GETAM_CFG = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(embed_dim=32, depth=4, num_heads=2),
        img_size=32,
        num_classes=3,
        start_layer=2,
        decoder_blocks=(0, 1, 2, 3),
        decoder_width=16,
    )
    GETAM_CASES = [(32, 2)]
    CRT_CFG = dict(
        cnn_backbone="resnet18",
        vit_backbone="vit_tiny_patch16_224",
        vit_kwargs=dict(embed_dim=32, depth=2, num_heads=2, patch_size=8),
        num_classes=3,
        tile_size=32,
        tile_stride=16,
    )
    CRT_CASES = [(48, 2)]
else:
    AREAM = dict(backbone="deit_small_patch16_224", num_classes=20)
    AREAM_CASES = [(448, 8)]
    CROP_LADDER = list(range(448, 1601, 64))
    GETAM_CFG = dict(backbone="vit_base_patch16_224", img_size=256, num_classes=20)
    GETAM_CASES = [(256, 4), (512, 4)]
    CRT_CFG = dict(num_classes=20)  # ResNet-152 + DeiT-S/16, tiles 224 / 112
    CRT_CASES = [(336, 16), (672, 16)]


def _device():
    return torch.device("cuda" if HAS_GPU else "cpu")


def _batch(crop: int, batch: int, num_classes: int) -> dict:
    g = torch.Generator().manual_seed(1)
    label = (torch.rand(batch, num_classes, generator=g) < 0.15).float()
    label[:, 0] = 1.0  # at least one class per image
    device = _device()
    return {
        "image": torch.randn(batch, 3, crop, crop, generator=g).to(device),
        "label": label.to(device),
        "crop_box": torch.tensor([[0, crop, 0, crop]] * batch).to(device),
    }


def _step(method, model, opt, batch, info) -> torch.Tensor:
    """One training step (bf16 autocast on a GPU), backward and optimizer step; the loss."""
    with torch.autocast(batch["image"].device.type, torch.bfloat16, enabled=HAS_GPU):
        terms = method.training_step(model, batch, info)
    terms["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return terms["loss"].detach()


def _measure_step(benchmark, provider, method, model, opt, batch, info):
    def step():
        return _step(method, model, opt, batch, info)

    with wsss_fast.use_backend(PROVIDERS[provider]):
        step()  # optimizer state exists before measuring
        try:
            loss = run_and_measure(benchmark, step, rounds=3)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            pytest.skip("out of memory")
    assert torch.isfinite(loss)


def aream_setup(crop: int, batch: int):
    torch.manual_seed(0)
    cfg = AReAMConfig(
        backbone=AREAM.get("backbone", "vit_tiny_patch16_224"),
        backbone_kwargs=AREAM.get("backbone_kwargs", {}),
        img_size=224 if not SMOKE else 32,
        num_classes=AREAM["num_classes"],
        drop_path_rate=0.1,
        layer_index=7 if not SMOKE else 0.5,
        cls_epochs=0,
    )
    method = AReAM(cfg)
    device = _device()
    model = method.build_model().to(device).train()
    opt = torch.optim.AdamW(method.param_groups(model), lr=1e-5)
    return method, model, opt, _batch(crop, batch, cfg.num_classes)


AREAM_INFO = {"epoch": 1, "step": 0}  # the affinity phase (cls_epochs=0)


@pytest.mark.parametrize("crop,batch", AREAM_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_aream_step(benchmark, provider, crop, batch):
    method, model, opt, b = aream_setup(crop, batch)
    benchmark.extra_info.update(method="aream", provider=provider, crop=crop, batch=batch)
    _measure_step(benchmark, provider, method, model, opt, b, AREAM_INFO)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_aream_largest_crop(benchmark, provider):
    """The largest crop of ``CROP_LADDER`` whose batch-8 step runs (one step each, ascending)."""
    batch = 8 if not SMOKE else 1
    largest = None
    for crop in CROP_LADDER:
        try:
            method, model, opt, b = aream_setup(crop, batch)
            with wsss_fast.use_backend(PROVIDERS[provider]):
                _step(method, model, opt, b, AREAM_INFO)
            largest = crop
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            method = model = opt = b = None
            if HAS_GPU:
                torch.cuda.empty_cache()
    benchmark.extra_info.update(
        method="aream", provider=provider, batch=batch, largest_crop=largest, ladder=CROP_LADDER
    )
    record_result_only(benchmark)
    assert largest is not None, f"not even crop {CROP_LADDER[0]} fits"


@pytest.mark.parametrize("crop,batch", GETAM_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_getam_phase2_step(benchmark, provider, crop, batch):
    """Phase 2: classification forward, one gradient pass per class slot, getam_map, PAMR,
    label completion, segmentation loss; backward; SGD step."""
    torch.manual_seed(0)
    method = GETAM(GETAMConfig(**GETAM_CFG))
    model = method.build_model().to(_device()).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    benchmark.extra_info.update(method="getam", provider=provider, crop=crop, batch=batch)
    info = {"step": 1, "total_steps": 2, "epoch": 1}  # phase 2 from step 1 of 2
    b = _batch(crop, batch, GETAM_CFG["num_classes"])
    _measure_step(benchmark, provider, method, model, opt, b, info)


@pytest.mark.parametrize("crop,batch", CRT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_crt_step(benchmark, provider, crop, batch):
    """Both branches, the tiled thrice-applied ViT, the L1 consistency term; SGD step."""
    torch.manual_seed(0)
    method = CRT(CRTConfig(**CRT_CFG))
    model = method.build_model().to(_device()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    benchmark.extra_info.update(method="crt", provider=provider, crop=crop, batch=batch)
    b = _batch(crop, batch, CRT_CFG["num_classes"])
    _measure_step(benchmark, provider, method, model, opt, b, {"epoch": 1, "step": 0})
