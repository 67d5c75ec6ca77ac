"""Two processes on CPU with gloo, through the torchrun environment variables.

Proves: both ranks end with bit-identical weights, and these equal (to float tolerance) a
single-process run on the same global batch — with gradient accumulation under ``no_sync`` —
and the logged (all-reduced) losses equal the single-process losses; and a 2-process run with
dropout killed mid-epoch and resumed ends bit-identical to an uninterrupted 2-process run.
"""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from engine_toy import ToyDataset, ToyMethod, ddp_worker, toy_config

from wsss_fast.engine import list_checkpoints, train

COMMON = [
    "toy.linear=true",
    "optim.name=sgd",
    "optim.momentum=0",
    "optim.weight_decay=0",
    "optim.lr=0.1",
    "schedule.name=cosine",
    "train.max_steps=4",  # two epochs of two steps: the sampler is reseeded in between
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_matches_single_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    # Per rank: 2 micro-batches of 2 samples -> a global batch of 8 per step.
    overrides = [*COMMON, "data.batch_size=2", "optim.accum_steps=2"]
    mp.spawn(ddp_worker, args=(2, _free_port(), str(ddp_dir), overrides), nprocs=2, join=True)
    r0 = torch.load(ddp_dir / "rank0.pt", weights_only=False)
    r1 = torch.load(ddp_dir / "rank1.pt", weights_only=False)

    single = train(
        toy_config(tmp_path / "single", *COMMON, "data.batch_size=8"), ToyMethod(), ToyDataset(16)
    )
    for k, v in single.model.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k])
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-6, atol=1e-6)

    losses = [h["loss"] for h in single.history]
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in r0["history"]]), torch.tensor(losses)
    )
    assert losses[-1] < losses[0]
    # Only rank 0 wrote: one final checkpoint, one log file.
    assert [p.name for p in list_checkpoints(ddp_dir)] == ["ckpt_00000004.pt"]
    log = (ddp_dir / "log.txt").read_text()
    assert log.count("step 4/4") == 1 and "2 process(es)" in log


def test_two_process_run_killed_and_resumed_matches_uninterrupted(tmp_path):
    # Per rank: 8 samples, 4 steps per epoch; checkpoint at step 3 (mid-epoch), killed after 5.
    overrides = ["toy.dropout=0.3", "optim.lr=5e-3", "train.max_steps=6", "train.ckpt_every=3"]

    def spawn(out_dir, kill_step=0):
        out_dir.mkdir(exist_ok=True)
        args = (2, _free_port(), str(out_dir), overrides, kill_step)
        mp.spawn(ddp_worker, args=args, nprocs=2, join=True)
        return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    full = spawn(tmp_path / "full")
    with pytest.raises(mp.ProcessRaisedException, match="Killed"):
        spawn(tmp_path / "killed", kill_step=5)
    assert list_checkpoints(tmp_path / "killed")[-1].name == "ckpt_00000003.pt"
    resumed = spawn(tmp_path / "killed")
    for k, v in full[0]["state"].items():
        assert torch.equal(resumed[0]["state"][k], v)
        assert torch.equal(resumed[1]["state"][k], v)
    # Per-rank dropout streams were restored: the replayed steps log the same losses.
    tail = [h["loss"] for h in full[0]["history"] if h["step"] > 3]
    assert [h["loss"] for h in resumed[0]["history"]] == tail
