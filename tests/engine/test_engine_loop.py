"""The training loop on a toy method: learning, exact resume, accumulation, atomic checkpoints."""

import pytest
import torch
from engine_toy import Killed, ToyDataset, ToyMethod, kill_at, toy_config
from torch import nn

from wsss_fast.engine import (
    checkpoint_blocks,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    train,
)


def test_loss_decreases_and_logs(tmp_path):
    cfg = toy_config(
        tmp_path,
        "train.epochs=6",
        "optim.lr=1e-2",
        "schedule.warmup_steps=2",
        "train.progress=true",  # the tqdm bar and the log lines together
        "train.tensorboard=true",  # skipped silently when tensorboard is not installed
    )
    data = ToyDataset(16)
    result = train(cfg, ToyMethod(), data)
    losses = [h["loss"] for h in result.history]
    assert result.step == len(losses) == 24  # 16 samples / batch 4 = 4 steps x 6 epochs
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert data.epochs == list(range(6))  # set_epoch once per epoch, in order
    log = (tmp_path / "log.txt").read_text()
    for word in ("loss", "acc", "lr", "it/s", "peak mem", "step 24/24"):
        assert word in log
    assert (tmp_path / "config.yaml").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000024.pt"]


class _PreviewToy(ToyMethod):
    """The toy method with a ``preview``: a fixed image, a ramp CAM and a two-class mask."""

    def preview(self, model, batch):
        n = 2
        cam = torch.linspace(0, 1, 8)[None, None, :].expand(n, 6, 8)
        pseudo = torch.zeros(n, 6, 8, dtype=torch.long)
        pseudo[:, :, 4:] = 1
        return {"image": torch.full((n, 3, 6, 8), 0.5), "cam": cam, "pseudo": pseudo.numpy()}


def test_tensorboard_scalars_and_preview_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy_config(tmp_path, "train.epochs=2", "train.tensorboard=true", "train.image_every=4")
    train(cfg, _PreviewToy(), ToyDataset(16))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    images = events.Images("preview")
    assert [e.step for e in images] == [4, 8]  # 8 steps, one grid every 4
    # 2 rows (images) of 3 panels (image | CAM | pseudo), each 6 x 8.
    assert (images[0].height, images[0].width) == (12, 24)


RESUME_CASES = {
    # kill after step 5; newest checkpoint at 3: 3 of 4 steps into epoch 0 (mid-epoch)
    "mid-epoch": (["train.ckpt_every=3"], 5, 3),
    # newest checkpoint at 4: exactly at the end of epoch 0
    "epoch-boundary": (["train.ckpt_every=4"], 6, 4),
    # 4 steps per epoch of 2 micro-batches each; the checkpoint at 3 skips 6 micro-batches
    "mid-epoch-accum": (["train.ckpt_every=3", "optim.accum_steps=2", "data.batch_size=2"], 5, 3),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, case):
    extra, kill_step, resume_step = RESUME_CASES[case]
    common = [
        "train.epochs=3",
        "optim.lr=5e-3",
        "optim.grad_clip=1.0",
        "schedule.warmup_steps=2",
        "toy.dropout=0.3",  # draws from the global torch RNG: the checkpoint must restore it
        *extra,
    ]
    full = train(toy_config(tmp_path / "full", *common), ToyMethod(), ToyDataset(16))

    cfg = toy_config(tmp_path / "killed", *common)
    with pytest.raises(Killed):
        train(cfg, ToyMethod(), ToyDataset(16), callbacks=[kill_at(kill_step)])
    assert latest_checkpoint(tmp_path / "killed").name == f"ckpt_{resume_step:08d}.pt"
    state = load_checkpoint(latest_checkpoint(tmp_path / "killed"))
    assert state["step"] == resume_step and state["config"]["toy"]["dropout"] == 0.3

    steps_seen = []
    resumed = train(
        cfg, ToyMethod(), ToyDataset(16), callbacks=[lambda i, m: steps_seen.append(i.step)]
    )
    assert steps_seen[0] == resume_step + 1 and resumed.step == full.step
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The logged losses of the replayed steps are the same numbers too.
    tail = {h["step"]: h["loss"] for h in full.history if h["step"] > resume_step}
    assert {h["step"]: h["loss"] for h in resumed.history} == tail


def test_keep_last_and_resume_off(tmp_path):
    cfg = toy_config(tmp_path, "train.max_steps=5", "train.ckpt_every=1", "train.keep_last=2")
    train(cfg, ToyMethod(), ToyDataset(16))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
    seen = []
    train(cfg, ToyMethod(), ToyDataset(16), callbacks=[lambda i, m: seen.append(i.step)])
    assert seen == []  # auto-resumed at the final step: nothing left to do
    again = toy_config(tmp_path, "train.max_steps=5", "train.resume=false")
    with pytest.raises(FileExistsError, match="choose another train.out_dir"):
        train(again, ToyMethod(), ToyDataset(16))


@pytest.mark.parametrize(
    "change, words",
    [
        ("data.batch_size=2", ["data.batch_size 4 -> 2", "steps_per_epoch 4 -> 8"]),
        ("optim.accum_steps=2", ["optim.accum_steps 1 -> 2", "steps_per_epoch 4 -> 2"]),
    ],
)
def test_resume_under_another_step_layout_is_refused(tmp_path, change, words):
    train(toy_config(tmp_path, "train.max_steps=3"), ToyMethod(), ToyDataset(16))
    with pytest.raises(ValueError, match="another step layout") as e:
        train(toy_config(tmp_path, "train.max_steps=6", change), ToyMethod(), ToyDataset(16))
    for w in words:
        assert w in str(e.value)
    # A longer run with the same layout resumes.
    seen = []
    cfg = toy_config(tmp_path, "train.max_steps=6")
    train(cfg, ToyMethod(), ToyDataset(16), callbacks=[lambda i, m: seen.append(i.step)])
    assert seen == [4, 5, 6]


def test_accumulation_equals_one_big_batch(tmp_path):
    common = ["toy.linear=true", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0"]
    common += ["optim.lr=0.1", "schedule.name=constant", "train.max_steps=3"]
    acc = train(
        toy_config(tmp_path / "a", *common, "data.batch_size=2", "optim.accum_steps=2"),
        ToyMethod(),
        ToyDataset(16),
    )
    big = train(
        toy_config(tmp_path / "b", *common, "data.batch_size=4"), ToyMethod(), ToyDataset(16)
    )
    for k, v in big.model.state_dict().items():
        torch.testing.assert_close(acc.model.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    # and the step moved the weights, so the comparison is not trivially true
    init = ToyMethod().build_model(toy_config(tmp_path / "c", *common))
    assert not torch.allclose(init.weight, big.model.weight)


def test_missing_loss_key_is_reported(tmp_path):
    class NoLoss(ToyMethod):
        def training_step(self, model, batch, info):
            return {"ce": model(batch["image"]).sum()}

    with pytest.raises(KeyError, match="must include 'loss'"):
        train(toy_config(tmp_path), NoLoss(), ToyDataset(16))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_00000001.pt"
    save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt_00000002.pt", {"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"]  # no temp left
    assert load_checkpoint(path) == {"step": 1}  # the old file is intact


def test_checkpoint_blocks_same_gradients_fewer_saved_tensors():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3))
    x = torch.randn(4, 6)

    def run():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            h = x
            for b in blocks:
                h = b(h)
            h.square().sum().backward()
        grads = [p.grad.clone() for p in blocks.parameters()]
        blocks.zero_grad()
        return grads, len(saved)

    keys = list(blocks.state_dict())
    plain, n_plain = run()
    checkpoint_blocks(blocks, True)
    recomputed, n_ckpt = run()
    assert list(blocks.state_dict()) == keys  # parameter names unchanged
    assert n_ckpt < n_plain
    for g1, g2 in zip(plain, recomputed):
        torch.testing.assert_close(g1, g2)
    checkpoint_blocks(blocks, False)
    assert run()[1] == n_plain


def test_param_groups_are_used(tmp_path):
    class Frozen(ToyMethod):
        def param_groups(self, model, cfg):
            return [{"params": list(model.parameters()), "lr": 0.0}]

    cfg = toy_config(tmp_path, "train.max_steps=2", "optim.weight_decay=0")
    result = train(cfg, Frozen(), ToyDataset(16))
    torch.manual_seed(cfg.train.seed)  # the loop seeds the same way before build_model
    init = ToyMethod().build_model(cfg)
    for k, v in init.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v)


def test_config_built_synthetic_dataset_trains(tmp_path):
    """The default path: ``cfg.data`` names a data set; the loop builds it with augmentation."""
    from wsss_fast.data import make_synthetic

    root = make_synthetic(
        tmp_path / "syn", num_train=8, num_val=2, size=32, num_classes=4, progress=False
    )

    class Pixels(ToyMethod):
        def build_model(self, cfg):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def training_step(self, model, batch, info):
            assert batch["image"].shape == (4, 3, 24, 24) and batch["label"].shape == (4, 4)
            logits = model(batch["image"])
            return {"loss": nn.functional.multilabel_soft_margin_loss(logits, batch["label"])}

    cfg = toy_config(
        tmp_path / "run",
        f"data.root={root}",
        "data.crop_size=24",
        "data.augment=train",
        "train.max_steps=2",
    )
    assert train(cfg, Pixels()).step == 2
