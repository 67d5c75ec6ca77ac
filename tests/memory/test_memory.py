"""``wsss_fast.memory``: the live-storage counter, by hand-derived byte counts; the counted step
on meta tensors against the same step on CPU tensors; the ``wsss-fast memory`` command."""

import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from wsss_fast import memory
from wsss_fast.cli import _load_config, main

KIB16 = 64 * 64 * 4  # one [64, 64] float32 tensor: 16384 bytes, a whole number of 512-byte blocks


def _counter(device="meta"):
    return memory.StorageCounter(device)


def test_counter_matmul_chain():
    c = _counter()
    x = torch.empty(64, 64, device="meta")
    with c:
        c.track(x)
        y = x @ x
        z = y @ y
        assert c.current == 3 * KIB16
        del y  # nothing else holds y's storage
        assert c.current == 2 * KIB16
        w = z @ z
        del w
    assert c.peak == 3 * KIB16
    assert c.current == 2 * KIB16


def test_counter_in_place_ops_and_views_add_nothing():
    c = _counter()
    x = torch.empty(64, 64, device="meta")
    with c:
        c.track(x)
        x.add_(1).relu_()
        v = x.t()[:10]
        v.mul_(2)
        assert c.current == KIB16
    assert c.peak == KIB16


def test_counter_rounds_to_blocks_and_counts_resize():
    c = _counter()
    with c:
        a = torch.empty(3, device="meta")  # 12 bytes -> one 512-byte block
        assert c.current == 512
        a.resize_(1000)  # 4000 bytes -> 8 blocks
        assert c.current == 4096
    assert c.peak == 4096


def test_counter_view_kept_alive_by_autograd():
    c = _counter()
    a = torch.empty(64, 64, device="meta", requires_grad=True)
    with c:
        c.track(a)
        b = a * 2  # 16 KiB
        v = b[:, :32]  # a view: no new storage
        d = v.sin()  # sin saves its input, the view, so b's whole storage stays alive
        assert c.current == 2 * KIB16 + KIB16 // 2
        del b, v
        assert c.current == 2 * KIB16 + KIB16 // 2
        del d  # the graph goes with d, and with it the saved view and b's storage
        assert c.current == KIB16
    assert c.peak == 2 * KIB16 + KIB16 // 2


def _block(x, w):
    return (x @ w).relu() @ w


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpoint"])
def test_counter_checkpointed_block(checkpointed):
    # Plain: mm saves x and w, relu saves its output r, the second mm saves r and w; the
    # pre-activation h dies after relu. Live after the forward: x, w, r, out (4 x 16 KiB).
    # Checkpointed: only the inputs are saved, so r is gone too (3 x 16 KiB). Both peak at 4:
    # h and r briefly coexist with x and w, and r with out.
    c = _counter()
    x = torch.empty(64, 64, device="meta", requires_grad=True)
    w = torch.empty(64, 64, device="meta", requires_grad=True)
    with c:
        c.track([x, w])
        if checkpointed:
            out = checkpoint(_block, x, w, use_reentrant=False)
        else:
            out = _block(x, w)
        assert c.current == (3 if checkpointed else 4) * KIB16
        assert c.peak == 4 * KIB16
        out.sum().backward()
        del out
        # x.grad and w.grad remain, beside x and w.
        assert c.current == 4 * KIB16


def test_counter_ignores_other_devices():
    c = _counter("meta")
    with c:
        torch.ones(1000)  # a CPU tensor: not device memory
        torch.empty(10, device="meta")
    assert c.peak == 512


def test_meta_autocast_follows_cuda_lists():
    lin = torch.nn.Linear(8, 8, device="meta")
    x = torch.empty(4, 8, device="meta")
    with memory.EmulatedAutocast(torch.bfloat16):
        y = lin(x)
        p = (y @ y.t()).softmax(-1)
        n = torch.nn.functional.layer_norm(y, (8,))
        g = torch.nn.functional.gelu(y)
        s = torch.cat([y, x])
        up = torch.nn.functional.interpolate(
            g.reshape(1, 1, 4, 8), scale_factor=2.0, mode="bilinear"
        )
        pooled = torch.nn.functional.interpolate(g.reshape(1, 1, 4, 8), size=(2, 4), mode="area")
    assert y.dtype == torch.bfloat16  # linear: lower precision
    assert p.dtype == torch.float32  # softmax: float32
    assert n.dtype == torch.float32  # layer_norm: float32
    assert g.dtype == torch.bfloat16  # not listed: the input's dtype
    assert s.dtype == torch.float32  # cat: the widest input
    assert up.dtype == torch.float32  # upsample_bilinear2d: float32
    assert pooled.dtype == torch.bfloat16  # "area" is adaptive_avg_pool2d: not listed


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GiB", 24 * 2**30),
        ("24G", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1000", 1000),
        ("1.5GiB", 3 * 2**29),
    ],
)
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["24XB", "GiB", "", "-1GB", "24 gigs", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(memory.MemoryCountError, match="size|positive"):
        memory.parse_size(text)


def test_largest_fit_bisects():
    calls = []

    def measure(x):
        calls.append(x)
        return x * x

    assert memory.largest_fit(measure, 10_000, start=16, step=16, limit=4096) == 96
    assert memory.largest_fit(measure, 100, start=16, step=16, limit=4096) is None
    assert memory.largest_fit(measure, 10**12, start=16, step=16, limit=4096) == 4096
    # CRT's grid: whole tiles, 224 + k * 112; 672^2 <= 500000 < 784^2
    assert memory.largest_fit(measure, 500_000, start=224, step=112, limit=4096) == 672
    assert len(calls) < 40


# ------------------------------------------------------------------ a method's step, meta vs CPU

SMALL = {"aream": 64, "getam": 64, "crt": 96}


@pytest.mark.parametrize("method", ["aream", "getam", "crt"])
def test_meta_count_matches_cpu_count(method):
    """The step counted on meta tensors is the step run on CPU tensors, counted the same way
    (fused ops excepted: the CPU runs the torch backend on both)."""
    cfg = _load_config(f"configs/{method}_synthetic.yaml", ["train.precision=fp32"])
    kw = dict(crop=SMALL[method], batch=2, backend="torch")
    cpu = memory.count_step(cfg, device="cpu", **kw)
    meta = memory.count_step(cfg, device="meta", **kw)
    assert cpu.phase == meta.phase
    assert abs(cpu.peak_bytes - meta.peak_bytes) <= 0.01 * cpu.peak_bytes, (cpu, meta)
    assert sum(meta.breakdown.values()) == meta.peak_bytes
    assert meta.breakdown["parameters"] > 0 and meta.breakdown["optimizer"] > 0


def test_meta_count_every_phase_and_bf16():
    cfg = _load_config("configs/aream_synthetic.yaml", [])
    one = memory.count_step(cfg, crop=64, batch=2, phase="1")
    two = memory.count_step(cfg, crop=64, batch=2, phase="2")
    assert one.precision == "bf16" and two.phase == "2"
    assert two.peak_bytes > one.peak_bytes  # phase 2 adds the pseudo-label pass and the loss
    assert "affinity_loss" in two.backends and "affinity_loss" not in one.backends
    with pytest.raises(memory.MemoryCountError, match="no phase '3'"):
        memory.count_step(cfg, crop=64, batch=2, phase="3")


def test_meta_count_takes_the_fused_backends_a_gpu_would():
    cfg = _load_config("configs/aream_synthetic.yaml", [])
    fused = memory.count_step(cfg, crop=64, batch=2, backend="auto")
    ref = memory.count_step(cfg, crop=64, batch=2, backend="reference")
    assert fused.backends["attention"] == "triton"
    assert set(ref.backends.values()) == {"reference"}


# -------------------------------------------------------------------------------- the command


def test_cli_memory_json(capsys):
    rc = main(
        [
            "memory",
            "--config",
            "configs/aream_synthetic.yaml",
            "--crop",
            "64",
            "--batch",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "auto" and out["crop"] == 64 and out["batch"] == 2
    assert isinstance(out["peak_bytes"], int) and out["peak_bytes"] > 0


def test_cli_memory_fit(capsys):
    rc = main(
        [
            "memory",
            "--config",
            "configs/aream_synthetic.yaml",
            "--crop",
            "64",
            "--batch",
            "2",
            "--fit",
            "64MiB",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "largest crop" in text and "reference" in text and "fused" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--crop", "65"], "not a multiple of the patch size"),
        (["--fit", "24XB"], "is not a size"),
        (["aream.no_such_key=1"], "config error"),
        (["--phase", "7"], "no phase"),
        # CRT's crops are whole tiles (a later --config wins)
        (
            ["--config", "configs/crt_voc.yaml", "--crop", "240"],
            "not 224 + a multiple of 112; use 224 or 336",
        ),
    ],
    ids=["crop", "budget", "config", "phase", "crt-tiles"],
)
def test_cli_memory_bad_input(capsys, args, message):
    rc = main(["memory", "--config", "configs/aream_synthetic.yaml", "--batch", "2", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err


# -------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "method,crop,batch", [("aream", 448, 8), ("getam", 512, 4), ("crt", 672, 4)]
)
def test_meta_count_matches_cuda(method, crop, batch):
    """The meta count against torch.cuda.max_memory_allocated of the real step (within 5 %)."""
    cfg = _load_config(f"configs/{method}_voc.yaml", [])
    counted = memory.count_step(cfg, crop=crop, batch=batch).peak_bytes
    measured = memory.cuda_peak(cfg, crop=crop, batch=batch)
    assert abs(counted - measured) <= 0.05 * measured, (counted, measured)


def test_meta_autocast_keeps_weights_in_the_graph_after_a_no_grad_pass():
    # A method's no-grad pass (AReAM's pseudo labels) before the training forward, in one
    # autocast region: the weights must still get gradients, as under torch.autocast.
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with memory.EmulatedAutocast(torch.bfloat16, "cpu"):
        with torch.no_grad():
            lin(x)
        y = lin(x)
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
