"""Schedules against hand-computed values, their resumability, and the PolyOptimizer quirk."""

import math

import pytest
import torch

from wsss_fast.engine import OptimConfig, WarmupCosineLR, WarmupPolyLR, build_optimizer


def _lrs(scheduler, n):
    out = []
    for _ in range(n):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _sgd(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_then_cosine():
    # base lr 2; 2 warm-up steps from 0, then cosine over the remaining 8 steps:
    # lr(s) = 2 * (1 + cos(pi * (s - 2) / 8)) / 2
    s = WarmupCosineLR(_sgd(2.0), total_steps=10, warmup_steps=2)
    expected = [0.0, 1.0, 2.0, 1.9238795, 1.7071068, 1.3826834, 1.0, 0.6173166, 0.2928932]
    expected += [0.0761205, 0.0, 0.0]  # reaches 0 at step 10 and stays there
    assert _lrs(s, 12) == pytest.approx(expected, abs=1e-6)


def test_warmup_start_and_min_lr():
    s = WarmupCosineLR(_sgd(1.0), total_steps=6, warmup_steps=2, warmup_start=0.5, min_lr_ratio=0.1)
    # warm-up 0.5, 0.75; then 0.1 + 0.9 (1 + cos(pi p)) / 2 with p = 0, 1/4, 2/4, 3/4, 1
    expected = [0.5, 0.75, 1.0, 0.1 + 0.9 * 0.8535534, 0.55, 0.1 + 0.9 * 0.1464466, 0.1]
    assert _lrs(s, 7) == pytest.approx(expected, abs=1e-6)


def test_poly_power_09():
    s = WarmupPolyLR(_sgd(0.1), total_steps=10, power=0.9)
    # 0.1 * (1 - s/10) ** 0.9 for s = 0, 2, 5, 9:
    # 0.8**0.9 = 0.818052, 0.5**0.9 = 0.535887, 0.1**0.9 = 0.125893
    lrs = _lrs(s, 11)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.0818052, abs=1e-7)
    assert lrs[5] == pytest.approx(0.0535887, abs=1e-7)
    assert lrs[9] == pytest.approx(0.0125893, abs=1e-7)
    assert lrs[10] == 0.0


def test_poly_with_warmup():
    s = WarmupPolyLR(_sgd(1.0), total_steps=12, warmup_steps=2, power=0.9)
    lrs = _lrs(s, 8)
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[7] == pytest.approx(0.5**0.9)  # p = (7 - 2) / 10


@pytest.mark.parametrize("cls", [WarmupCosineLR, WarmupPolyLR])
def test_resume_continues_the_schedule(cls):
    a = cls(_sgd(), total_steps=20, warmup_steps=3)
    _lrs(a, 7)
    state = a.state_dict()
    b = cls(_sgd(), total_steps=20, warmup_steps=3)
    b.load_state_dict(state)
    b.optimizer.param_groups[0]["lr"] = b.get_last_lr()[0]  # the optimizer's state comes along
    assert _lrs(b, 13) == _lrs(a, 13)


def test_poly_quirk_sets_momentum_to_weight_decay():
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(name="sgd", lr=0.01, weight_decay=5e-4, poly_quirk=True)
    opt = build_optimizer(cfg, [{"params": [w1]}, {"params": [w2], "weight_decay": 1e-4}])
    g0, g1 = opt.param_groups
    assert isinstance(opt, torch.optim.SGD)
    assert g0["momentum"] == g1["momentum"] == 5e-4
    assert g0["weight_decay"] == 0.0  # GETAM: no groups, so no weight decay at all
    assert g1["weight_decay"] == 1e-4  # CRT: groups set it explicitly
    plain = build_optimizer(OptimConfig(name="sgd", lr=0.01, weight_decay=5e-4), [w1])
    assert plain.param_groups[0]["momentum"] == 0.9
    assert plain.param_groups[0]["weight_decay"] == 5e-4
    assert math.isclose(build_optimizer(OptimConfig(), [w1]).param_groups[0]["lr"], 6.25e-5)


def test_lr_factor_multiplies_the_schedule_and_survives_resume():
    # A phase rule: full lr for the first half, a tenth afterwards, on top of poly decay
    # 0.1 * (1 - s/10) ** 0.9: at s = 2 (0.8**0.9 = 0.818052) and s = 5 (0.5**0.9 = 0.535887).
    def tenth_after_half(step, total):
        return 1.0 if step < total // 2 else 0.1

    s = WarmupPolyLR(_sgd(0.1), total_steps=10, power=0.9, lr_factor=tenth_after_half)
    lrs = _lrs(s, 6)
    assert lrs[2] == pytest.approx(0.0818052, abs=1e-7)
    assert lrs[5] == pytest.approx(0.00535887, abs=1e-8)
    # A scheduler rebuilt from the state dict continues with the factor applied.
    t = WarmupPolyLR(_sgd(0.1), total_steps=10, power=0.9, lr_factor=tenth_after_half)
    assert "lr_factor" not in s.state_dict()  # code is not state (checkpoints load weights_only)
    t.load_state_dict(s.state_dict())
    t.optimizer.param_groups[0]["lr"] = s.optimizer.param_groups[0]["lr"]
    assert _lrs(t, 1)[0] == pytest.approx(_lrs(s, 1)[0])
