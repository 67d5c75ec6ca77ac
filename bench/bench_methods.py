"""One training step of each method, published memory behaviour (``reference``) against fused.

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
from harness import HAS_GPU, SMOKE, run_and_measure

import wsss_fast
from wsss_fast.methods.aream import AReAM, AReAMConfig

PROVIDERS = {"reference": "reference", "fused": "auto"}
if SMOKE:
    AREAM = dict(backbone_kwargs=dict(embed_dim=32, depth=4, num_heads=2), num_classes=3)
    AREAM_CASES = [(32, 1)]
    CROP_LADDER = [32, 48]
else:
    AREAM = dict(backbone="deit_small_patch16_224", num_classes=20)
    AREAM_CASES = [(448, 8)]
    CROP_LADDER = list(range(448, 1601, 64))


def _device():
    return torch.device("cuda" if HAS_GPU else "cpu")


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
    g = torch.Generator().manual_seed(1)
    label = (torch.rand(batch, cfg.num_classes, generator=g) < 0.15).float()
    label[:, 0] = 1.0  # at least one class per image
    batch_ = {
        "image": torch.randn(batch, 3, crop, crop, generator=g).to(device),
        "label": label.to(device),
        "crop_box": torch.tensor([[0, crop, 0, crop]] * batch).to(device),
    }
    return method, model, opt, batch_


def aream_step(method, model, opt, batch):
    with torch.autocast(batch["image"].device.type, torch.bfloat16, enabled=HAS_GPU):
        terms = method.training_step(model, batch, {"epoch": 1, "step": 0})
    terms["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return terms["loss"].detach()


@pytest.mark.parametrize("crop,batch", AREAM_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_aream_step(benchmark, provider, crop, batch):
    method, model, opt, b = aream_setup(crop, batch)
    benchmark.extra_info.update(method="aream", provider=provider, crop=crop, batch=batch)
    with wsss_fast.use_backend(PROVIDERS[provider]):
        aream_step(method, model, opt, b)  # optimizer state exists before measuring
        try:
            loss = run_and_measure(benchmark, lambda: aream_step(method, model, opt, b), rounds=3)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            pytest.skip("out of memory")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_aream_largest_crop(benchmark, provider):
    """The largest crop of ``CROP_LADDER`` whose batch-8 step runs (one step each, ascending)."""
    batch = 8 if not SMOKE else 1
    largest = None
    for crop in CROP_LADDER:
        try:
            method, model, opt, b = aream_setup(crop, batch)
            with wsss_fast.use_backend(PROVIDERS[provider]):
                aream_step(method, model, opt, b)
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
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert largest is not None, f"not even crop {CROP_LADDER[0]} fits"
