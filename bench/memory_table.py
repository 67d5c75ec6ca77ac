"""The README's memory table: one training step per row, counted on the meta device.

    .venv/bin/python bench/memory_table.py            # prints markdown, writes the JSON below
    -> bench/results/memory_meta.json

Rows: AReAM (phase 2) at crops 448/672/896/1024, batch 8, and at the published crop 224, batch 64;
GETAM (phase 2) at crops 256/512/768, batch 4; CRT at crops 336/672, batch 16: ``reference``
(the published behaviour) against the fused ops ``auto`` takes on a GPU. Then the largest AReAM
crop at batch 8 within 24, 40 and 80 GB (GiB, as GPU makers' "GB" cards hold).
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from wsss_fast import memory
from wsss_fast.cli import _load_config

ROOT = Path(__file__).resolve().parents[1]
ROWS = (
    [
        ("aream", "configs/aream_voc.yaml", crop, batch)
        for crop, batch in ((224, 64), (448, 8), (672, 8), (896, 8), (1024, 8))
    ]
    + [("getam", "configs/getam_voc.yaml", crop, 4) for crop in (256, 512, 768)]
    + [("crt", "configs/crt_voc.yaml", crop, 16) for crop in (336, 672)]
)
BUDGETS = ("24GiB", "40GiB", "80GiB")


def main() -> int:
    rows = []
    for method, config, crop, batch in ROWS:
        cfg = _load_config(str(ROOT / config), [])
        row = {"method": method, "config": config, "crop": crop, "batch": batch}
        for be in ("reference", "auto"):
            r = memory.count_step(cfg, crop=crop, batch=batch, backend=be)
            row["phase"], row[be] = r.phase, r.peak_bytes
        row["ratio"] = row["auto"] / row["reference"]
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    cfg = _load_config(str(ROOT / "configs/aream_voc.yaml"), [])
    fits = {}
    for budget in BUDGETS:
        n = memory.parse_size(budget)
        fits[budget] = {
            be: memory.largest_crop(cfg, n, batch=8, backend=be) for be in ("reference", "auto")
        }
        print(budget, fits[budget], file=sys.stderr, flush=True)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    out = {"revision": rev, "torch": torch.__version__, "rows": rows, "largest_crop_batch8": fits}
    (ROOT / "bench/results/memory_meta.json").write_text(json.dumps(out, indent=2) + "\n")

    gib = 2**30
    print("| method (phase) | crop | batch | reference | fused | fused / reference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} ({r['phase']}) | {r['crop']} | {r['batch']} | "
            f"{r['reference'] / gib:.2f} GiB | {r['auto'] / gib:.2f} GiB | {r['ratio']:.2f} |"
        )
    print()
    print("| budget | largest AReAM crop at batch 8, reference | fused |")
    print("|---|---|---|")
    for budget, f in fits.items():
        print(f"| {budget} | {f['reference']} | {f['auto']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
