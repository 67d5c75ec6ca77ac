"""The ``wsss-fast`` command: info, train -> cam -> pseudo -> eval on a tiny synthetic set with a
tiny ViT, the AReAM demo, and clear config errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wsss_fast
from wsss_fast.cli import build_parser, main
from wsss_fast.data import make_synthetic
from wsss_fast.eval import load_cam

pytest.importorskip("timm")

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "aream_synthetic.yaml")


def tiny_overrides(root: Path) -> list[str]:
    """A 3-class, 48 px synthetic set and a ViT with embed 32, depth 4, 2 heads: seconds on CPU."""
    return [
        f"data.root={root}",
        "data.crop_size=48",
        "data.batch_size=4",
        "model.num_classes=3",
        "aream.num_classes=3",
        "aream.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
        "aream.img_size=48",
        "aream.cls_epochs=1",  # the second epoch runs the affinity loss and the online labels
        "train.epochs=2",
        "train.progress=false",
        "train.device=cpu",
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "synthetic"
    make_synthetic(root, num_train=8, num_val=4, size=48, num_classes=3, progress=False)
    return root


@pytest.fixture(scope="module")
def run_dir(data_root) -> Path:
    run = data_root.parent / "run"
    assert main(["train", "--config", CONFIG, "--out", str(run), *tiny_overrides(data_root)]) == 0
    return run


def test_info_prints_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out
    for name in wsss_fast.BACKENDS:
        assert name in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == set(wsss_fast.BACKENDS)


def test_demo_default_is_random_walk(capsys):
    assert build_parser().parse_args(["demo"]).method == "random-walk"
    assert main(["demo", "optim.lr=1"]) == 2  # overrides belong to --method aream
    assert "--method aream" in capsys.readouterr().err


def test_train_writes_run_folder(run_dir):
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "log.txt").is_file()
    assert len(list(run_dir.glob("ckpt_*.pt"))) >= 1
    saved = (run_dir / "config.yaml").read_text()
    assert "method: aream" in saved and "embed_dim: 32" in saved
    assert "aff_loss" in (run_dir / "log.txt").read_text()  # epoch 1 >= cls_epochs


def test_cam_pseudo_eval(run_dir, capsys):
    out = run_dir / "infer_val"
    assert main(["cam", str(run_dir)]) == 0
    cams = sorted((out / "cams").glob("*.npy"))
    assert len(cams) == 4
    rec = load_cam(cams[0])
    assert rec["cam"].ndim == 3 and rec["cam"].shape[0] == len(rec["keys"]) >= 1
    assert rec["cam"].shape[1:] == (48, 48)
    assert np.all((rec["keys"] >= 1) & (rec["keys"] <= 3))

    # CAMs alone: metrics.json has cam_miou only.
    assert main(["eval", str(run_dir), "--overlays", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["cam_miou"] <= 1.0
    assert "pseudo_miou" not in metrics
    assert metrics["bg_threshold"] == 0.45 and metrics["images"] == 4
    assert len(list((out / "overlays").glob("*.png"))) == 2

    assert main(["pseudo", str(run_dir)]) == 0
    masks = sorted((out / "pseudo").glob("*.png"))
    assert len(masks) == 4
    with Image.open(masks[0]) as im:
        assert im.mode == "P" and im.size == (48, 48)
        assert set(np.unique(np.array(im)).tolist()) <= {0, 1, 2, 3}
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["cam_miou"] <= 1.0
    assert 0.0 <= metrics["pseudo_miou"] <= 1.0
    assert "cam_miou" in capsys.readouterr().out


def test_segment_getam_head(data_root, run_dir, tmp_path, capsys):
    """`segment` writes the GETAM head's masks of a split and scores them; a method without a
    segmentation head (AReAM) is refused with the commands to use instead."""
    from wsss_fast.eval import ConfusionMatrix, load_mask_png

    run = tmp_path / "getam"
    overrides = [
        f"data.root={data_root}",
        "data.crop_size=48",
        "data.batch_size=4",
        "model.num_classes=3",
        "getam.num_classes=3",
        "getam.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
        "getam.img_size=48",
        "getam.decoder_blocks=[0, 1, 2, 3]",
        "getam.decoder_width=16",
        "getam.pamr_dilations=[1, 2]",
        "getam.opening=3",
        "getam.seg_scales=[48, 64]",
        "getam.phase2_start=0.5",  # the second step trains the head
        "train.epochs=1",
        "train.progress=false",
        "train.device=cpu",
    ]
    config = str(Path(CONFIG).parent / "getam_synthetic.yaml")
    assert main(["train", "--config", config, "--out", str(run), *overrides]) == 0
    out = tmp_path / "seg_val"
    assert main(["segment", str(run), "--out", str(out)]) == 0
    masks = sorted((out / "seg").glob("*.png"))
    assert len(masks) == 4
    metrics = json.loads((out / "seg_metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["images"] == 4
    # The score is the mIoU of the written masks against the ground truth.
    gt_dir = data_root / "SegmentationClass"
    cm = ConfusionMatrix(4, 255)
    for m in masks:
        pred = load_mask_png(m)
        assert pred.shape == (48, 48) and set(np.unique(pred).tolist()) <= {0, 1, 2, 3}
        cm.update(pred, load_mask_png(gt_dir / m.name))
    assert metrics["seg_miou"] == pytest.approx(cm.summary()["miou"])
    assert "seg_miou" in capsys.readouterr().out

    assert main(["segment", str(run_dir), "--out", str(tmp_path / "nope")]) == 2
    assert "no segmentation head" in capsys.readouterr().err


def _sharded_worker(rank: int, world: int, port: int, run: str, out: str) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    assert main(["cam", run, "--out", out]) == 0
    assert main(["pseudo", run, "--out", out]) == 0


def test_cam_and_pseudo_sharded_over_two_processes(run_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two, one = tmp_path / "two", tmp_path / "one"
    mp.spawn(_sharded_worker, args=(2, port, str(run_dir), str(two)), nprocs=2, join=True)
    assert main(["cam", str(run_dir), "--out", str(one)]) == 0
    assert main(["pseudo", str(run_dir), "--out", str(one)]) == 0
    names = sorted(p.name for p in (one / "cams").glob("*.npy"))
    assert len(names) == 4 and sorted(p.name for p in (two / "cams").glob("*.npy")) == names
    for name in names:  # every image once, the same CAM as one process makes
        a, b = load_cam(one / "cams" / name), load_cam(two / "cams" / name)
        assert np.array_equal(a["keys"], b["keys"])
        np.testing.assert_allclose(a["cam"], b["cam"], rtol=0, atol=1e-6)
        png = name.replace(".npy", ".png")
        with Image.open(one / "pseudo" / png) as x, Image.open(two / "pseudo" / png) as y:
            assert np.array_equal(np.array(x), np.array(y))


def test_eval_threshold_from_overrides(run_dir, tmp_path):
    out = tmp_path / "t"
    assert main(["cam", str(run_dir), "--out", str(out)]) == 0
    assert main(["eval", str(run_dir), "--out", str(out), "eval.bg_threshold=1.0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # CAMs are in [0, 1): at threshold 1 every pixel is background, no foreground class scores.
    assert metrics["bg_threshold"] == 1.0
    iou = metrics["cam"]["iou"]
    assert iou["background"] > 0
    assert all(v in (0.0, None) for k, v in iou.items() if k != "background")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'lrr'"),
        ("data.batch_size=abc", "expected an integer"),
        ("nosuchsection.x=1", "unknown section 'nosuchsection'"),
        ("aream.num_classes", "not of the form section.key=value"),
        ("train.precision=fp8", "expected one of"),
    ],
)
def test_config_override_errors(override, message, capsys, tmp_path):
    rc = main(["train", "--config", CONFIG, "--out", str(tmp_path / "r"), override])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config error" in err and message in err
    assert not (tmp_path / "r").exists()


def test_class_count_mismatch_and_missing_files(data_root, tmp_path, capsys):
    args = [*tiny_overrides(data_root), "aream.num_classes=4"]
    assert main(["train", "--config", CONFIG, "--out", str(tmp_path / "r"), *args]) == 2
    assert "has 3 classes" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["cam", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_demo_aream(data_root, tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [*tiny_overrides(data_root), "train.epochs=1", "aream.cls_epochs=0"]
    assert main(["demo", "--method", "aream", "--out", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "train" and metrics["images"] == 8
    assert 0.0 <= metrics["cam_miou"] <= 1.0 and 0.0 <= metrics["pseudo_miou"] <= 1.0
    assert metrics["steps"] == 2
    assert len(list((out / "overlays").glob("*.png"))) == 4
    assert (out / "run" / "config.yaml").is_file()
    assert "pseudo_miou" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["aream", "getam", "crt"])
@pytest.mark.parametrize("kind", ["synthetic", "voc"])
def test_shipped_configs_load(method, kind):
    from wsss_fast.engine import load_config
    from wsss_fast.methods import register_all

    register_all()
    cfg = load_config(Path(CONFIG).parent / f"{method}_{kind}.yaml")
    assert cfg.method == method
    assert cfg.sections[method].num_classes == cfg.model.num_classes
