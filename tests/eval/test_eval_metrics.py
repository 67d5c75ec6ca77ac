"""ConfusionMatrix and its metrics against small examples worked out by hand."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from wsss_fast.eval import ConfusionMatrix, threshold_sweep_report

# Example A (3 classes). Ground truth and prediction, 2 x 3; gt 255 at (1, 2) is skipped.
#   gt   = [[0, 0, 1],      pred = [[0, 1, 1],
#           [1, 2, 255]]            [2, 2, 0]]
# Counted pixels: (g0,p0) (g0,p1) (g1,p1) (g1,p2) (g2,p2), so rows = gt, cols = pred:
#   g0: [1, 1, 0]    TP = [1, 1, 1], gt totals = [2, 2, 1], pred totals = [1, 2, 2]
#   g1: [0, 1, 1]    IoU = TP / (gt + pred - TP) = [1/2, 1/3, 1/2]  -> mIoU = 4/9
#   g2: [0, 0, 1]    pixel acc = 3/5; recall = [1/2, 1/2, 1] -> mean acc = 2/3
#                    precision = [1, 1/2, 1/2]
#                    fwIoU = 2/5 * 1/2 + 2/5 * 1/3 + 1/5 * 1/2 = 13/30
GT_A = np.array([[0, 0, 1], [1, 2, 255]])
PRED_A = np.array([[0, 1, 1], [2, 2, 0]])
MATRIX_A = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])

# Example B (4 classes): class 2 is only predicted, class 3 appears nowhere.
#   gt   = [[0, 0, 1],      pred = [[0, 2, 1],
#           [1, 1, 0]]              [1, 0, 0]]
# Pixels: (g0,p0) (g0,p2) (g1,p1) (g1,p1) (g1,p0) (g0,p0)
#   g0: [2, 0, 1, 0]   TP = [2, 2, 0, 0], gt = [3, 3, 0, 0], pred = [3, 2, 1, 0]
#   g1: [1, 2, 0, 0]   IoU = [2/4, 2/3, 0/1, 0/0 -> NaN]: class 2 counts with 0, class 3 is out
#   g2, g3: zeros      mIoU = (1/2 + 2/3 + 0) / 3 = 7/18; recall = [2/3, 2/3, NaN, NaN]
#                      pixel acc = 4/6; fwIoU = 3/6 * 1/2 + 3/6 * 2/3 = 7/12
GT_B = np.array([[0, 0, 1], [1, 1, 0]])
PRED_B = np.array([[0, 2, 1], [1, 0, 0]])


def test_hand_computed_3x3():
    cm = ConfusionMatrix(3).update(PRED_A, GT_A)
    np.testing.assert_array_equal(cm.matrix, MATRIX_A)
    np.testing.assert_allclose(cm.iou(), [1 / 2, 1 / 3, 1 / 2])
    assert cm.miou() == pytest.approx(4 / 9)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    np.testing.assert_allclose(cm.class_accuracy(), [1 / 2, 1 / 2, 1])
    assert cm.mean_class_accuracy() == pytest.approx(2 / 3)
    np.testing.assert_allclose(cm.precision(), [1, 1 / 2, 1 / 2])
    assert cm.fw_iou() == pytest.approx(13 / 30)


def test_from_matrix_gives_the_same_metrics():
    cm = ConfusionMatrix.from_matrix(MATRIX_A)
    assert cm.miou() == pytest.approx(4 / 9)
    assert cm.fw_iou() == pytest.approx(13 / 30)


def test_absent_class_rule():
    cm = ConfusionMatrix(4, class_names=["bg", "a", "b", "c"]).update(PRED_B, GT_B)
    np.testing.assert_array_equal(
        cm.matrix, [[2, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [1 / 2, 2 / 3, 0])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx(7 / 18)
    acc = cm.class_accuracy()
    np.testing.assert_allclose(acc[:2], [2 / 3, 2 / 3])
    assert math.isnan(acc[2]) and math.isnan(acc[3])
    assert cm.mean_class_accuracy() == pytest.approx(2 / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    assert cm.fw_iou() == pytest.approx(7 / 12)
    s = cm.summary()
    assert s["absent_classes"] == ["c"]
    assert s["iou"]["c"] is None and s["iou"]["b"] == 0.0
    assert s["miou"] == pytest.approx(7 / 18)
    assert "c" in s["table"] and "mIoU" in s["table"]


def test_ignore_index_in_ground_truth_is_skipped_whatever_is_predicted():
    # pred 7 is not a class, but the gt pixel is ignored so it must not raise or count
    cm = ConfusionMatrix(3).update(np.array([[7, 1]]), np.array([[255, 1]]))
    np.testing.assert_array_equal(cm.matrix, [[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    empty = ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[255, 255]]))
    assert math.isnan(empty.miou()) and empty.summary()["miou"] is None
    # a different ignore value
    cm = ConfusionMatrix(2, ignore_index=-1).update(np.array([1, 1]), np.array([-1, 1]))
    np.testing.assert_array_equal(cm.matrix, [[0, 0], [0, 1]])


def test_predicted_ignore_counts_as_wrong():
    # gt [0, 1], pred [255, 1], C = 2: the class-0 pixel is a false negative of class 0 and a
    # false positive of nothing -> IoU0 = 0 / (1 + 0 - 0) = 0, IoU1 = 1 / (1 + 1 - 1) = 1.
    cm = ConfusionMatrix(2).update(np.array([255, 1], np.uint8), np.array([0, 1]))
    np.testing.assert_array_equal(cm.matrix, [[0, 0], [0, 1]])
    np.testing.assert_array_equal(cm.pred_ignored, [1, 0])
    np.testing.assert_allclose(cm.iou(), [0, 1])
    assert cm.pixel_accuracy() == pytest.approx(1 / 2)
    assert cm.pred_ignored_fraction() == pytest.approx(1 / 2)


def test_bad_inputs_say_what_is_wrong():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="ground truth holds 5"):
        cm.update(np.array([0]), np.array([5]))
    with pytest.raises(ValueError, match="prediction holds -1"):
        cm.update(np.array([-1]), np.array([0]))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(np.array([0.5]), np.array([0]))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)
    assert cm.matrix.sum() == 0  # failed updates added nothing


def test_tensor_inputs_match_numpy():
    cm = ConfusionMatrix(3).update(torch.from_numpy(PRED_A), torch.from_numpy(GT_A))
    np.testing.assert_array_equal(cm.matrix, MATRIX_A)
    mixed = ConfusionMatrix(3).update(PRED_A.astype(np.uint8), torch.from_numpy(GT_A))
    np.testing.assert_array_equal(mixed.matrix, MATRIX_A)
    # a batch [B, H, W] is one update
    batch = ConfusionMatrix(3).update(np.stack([PRED_A, PRED_A]), np.stack([GT_A, GT_A]))
    np.testing.assert_array_equal(batch.matrix, 2 * MATRIX_A)


def _random_pairs(seed: int, n: int, C: int = 5):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        gt = rng.integers(0, C, (7, 9))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, C, gt.shape))
        pred[rng.random(gt.shape) < 0.05] = 255
        pairs.append((pred, gt))
    return pairs


def test_merge_equals_one_matrix_over_the_union():
    pairs = _random_pairs(0, 6)
    union, a, b = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    for i, (pred, gt) in enumerate(pairs):
        union.update(pred, gt)
        (a if i % 2 else b).update(pred, gt)
    total = a + b
    np.testing.assert_array_equal(total.matrix, union.matrix)
    np.testing.assert_array_equal(total.pred_ignored, union.pred_ignored)
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, union.matrix)
    assert a.miou() == union.miou()
    with pytest.raises(ValueError, match="num_classes"):
        a.merge(ConfusionMatrix(4))


def test_all_reduce_with_a_reduce_function():
    pairs = _random_pairs(1, 4)
    union = ConfusionMatrix(5)
    for pred, gt in pairs:
        union.update(pred, gt)
    rank0, rank1 = ConfusionMatrix(5), ConfusionMatrix(5)
    for pred, gt in pairs[:2]:
        rank0.update(pred, gt)
    for pred, gt in pairs[2:]:
        rank1.update(pred, gt)
    # a fake two-rank world: the reduce function sees each rank's counts and returns their sum
    seen = {}
    rank1.all_reduce(lambda counts: seen.setdefault("rank1", counts.copy()))
    rank0.all_reduce(lambda counts: counts + seen["rank1"])
    np.testing.assert_array_equal(rank0.matrix, union.matrix)
    np.testing.assert_array_equal(rank0.pred_ignored, union.pred_ignored)
    # no process group and no function: nothing to reduce
    before = union.matrix
    union.all_reduce()
    np.testing.assert_array_equal(union.matrix, before)


def _gloo_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        pairs = _random_pairs(2, 4)[rank::world]
        cm = ConfusionMatrix(5)
        for pred, gt in pairs:
            cm.update(pred, gt)
        cm.all_reduce()
        items = _random_cam_items(3, 4)[rank::world]
        report = threshold_sweep_report(
            items, num_classes=5, thresholds=[0.3, 0.6], all_reduce=True
        )
        np.save(os.path.join(out_dir, f"cm{rank}.npy"), cm.matrix)
        np.save(os.path.join(out_dir, f"sweep{rank}.npy"), np.array(report["miou"]))
    finally:
        dist.destroy_process_group()


def _random_cam_items(seed: int, n: int, C: int = 5):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        keys = np.sort(rng.choice(np.arange(1, C), size=2, replace=False))
        gt = rng.choice(np.concatenate([[0], keys]), size=(6, 8))
        cam = rng.random((2, 6, 8)).astype(np.float32)
        items.append((cam, keys, gt))
    return items


def test_all_reduce_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    # fork, as DataLoader workers do: spawn would re-import torch in each child (~10 s on 2 cores)
    context = mp.start_processes(
        _gloo_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    # a hung collective must fail the test, not the whole suite
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process gloo all_reduce did not finish in 120 s")
    union = ConfusionMatrix(5)
    for pred, gt in _random_pairs(2, 4):
        union.update(pred, gt)
    sweep = threshold_sweep_report(_random_cam_items(3, 4), num_classes=5, thresholds=[0.3, 0.6])
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"cm{rank}.npy"), union.matrix)
        np.testing.assert_allclose(np.load(tmp_path / f"sweep{rank}.npy"), sweep["miou"])


@pytest.mark.gpu
def test_cuda_tensors_are_counted_on_the_device():
    device = torch.device("cuda")
    cm = ConfusionMatrix(3).update(torch.from_numpy(PRED_A).to(device), GT_A)
    np.testing.assert_array_equal(cm.matrix, MATRIX_A)
    pairs = _random_pairs(4, 3)
    on_cpu, on_gpu = ConfusionMatrix(5), ConfusionMatrix(5)
    for pred, gt in pairs:
        on_cpu.update(pred, gt)
        on_gpu.update(torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device))
    np.testing.assert_array_equal(on_gpu.matrix, on_cpu.matrix)
    np.testing.assert_array_equal(on_gpu.pred_ignored, on_cpu.pred_ignored)
    with pytest.raises(ValueError, match="ground truth holds 5"):
        on_gpu.update(torch.zeros(2, device=device, dtype=torch.long), torch.tensor([0, 5]))
