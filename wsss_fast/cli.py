"""The ``wsss-fast`` command.

``wsss-fast info`` prints versions, the GPU, the backends and how the extension was built.
``wsss-fast train --config configs/aream_synthetic.yaml key=value ...`` trains a method with the
engine into a run folder (``config.yaml``, ``log.txt``, ``ckpt_<step>.pt``).
``wsss-fast cam | pseudo | eval RUN_DIR`` make CAMs (``.npy``), pseudo masks (palette PNGs) and
``metrics.json`` (``cam_miou``, ``pseudo_miou``) with overlays for a split of the run's data.
``wsss-fast segment RUN_DIR`` writes the masks of a method's segmentation head (GETAM) and their
mIoU (``seg_metrics.json``).
``wsss-fast make-synthetic ROOT`` writes the built-in synthetic data set.
``wsss-fast demo`` (``--method random-walk``, the default) refines a seed map on a synthetic image
with ``random_walk`` on every available backend and checks them against the reference;
``wsss-fast demo --method aream|getam|crt --out DIR`` trains the method on the synthetic set,
makes CAMs and pseudo masks of its train split, evaluates them and writes ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import wsss_fast
from wsss_fast import _backend, _ext


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    device_type = "cuda" if gpu else "cpu"
    return {
        "wsss_fast": wsss_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "gpu": gpu,
        "backend_in_force": wsss_fast.get_backend(),
        "backends": {
            name: _backend.unavailable_reason(name, device_type) or "available"
            for name in wsss_fast.BACKENDS
        },
        "extension": {
            "loaded": _ext.loaded(),
            "load_error": _ext.load_error(),
            "cpu_kernels": _ext.has_kernel("random_walk_forward", "CPU"),
            "cuda_kernels": _ext.has_kernel("random_walk_forward", "CUDA"),
            **{f"build_{k}": v for k, v in _ext.build_info().items()},
        },
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    gpu = info["gpu"]
    print(f"wsss_fast {info['wsss_fast']}  (python {info['python']})")
    print(f"torch     {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})")
    print(f"triton    {info['triton'] or 'not installed'}")
    print(f"timm      {info['timm'] or 'not installed'}")
    if gpu:
        print(
            f"GPU       {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB) x {gpu['count']}"
        )
    else:
        print("GPU       none visible")
    print(
        f"backend   {info['backend_in_force']} (set with WSSS_FAST_BACKEND or wsss_fast.use_backend)"
    )
    for name, state in info["backends"].items():
        mark = "yes" if state == "available" else "no "
        print(f"  {mark} {name:<9} {'' if state == 'available' else state}")
    ext = info["extension"]
    if ext["loaded"]:
        built = "CPU + CUDA" if ext.get("build_cuda_built") else "CPU only"
        print(f"_C        {built} kernels; {ext.get('build_cuda_reason', '')}")
        if ext.get("build_arch_list"):
            print(
                f"          TORCH_CUDA_ARCH_LIST={ext['build_arch_list']}, nvcc {ext.get('build_nvcc')}"
            )
    else:
        print(f"_C        not loaded: {ext['load_error']}")
    return 0


def _demo_scene(side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A noisy two-region image, its colour affinity on the pixel grid, and a one-pixel seed map."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = ((yy - side * 0.4) ** 2 + (xx - side * 0.55) ** 2) < (side * 0.28) ** 2
    image = torch.where(disc, 0.8, 0.25) + 0.05 * torch.randn(side, side, generator=g)
    colour = image.flatten()
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
    near = torch.cdist(pos, pos) <= 2.5  # an IRN-like radius
    aff = torch.exp(-((colour[:, None] - colour[None, :]) ** 2) / 0.02) * near
    seeds = torch.zeros(2, side * side)
    seeds[0, int(side * 0.4) * side + int(side * 0.55)] = 1.0  # inside the disc
    seeds[1, 2 * side + 2] = 1.0  # background corner
    return image, aff[None], seeds[None]


def cmd_demo(args: argparse.Namespace) -> int:
    if args.method != "random-walk":
        return _demo_method(args)
    if args.overrides:
        raise CLIError(
            f"key=value overrides are for a method demo (--method aream ...), got {args.overrides}"
        )
    return _demo_random_walk(args)


def _demo_random_walk(args: argparse.Namespace) -> int:
    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    side = args.side
    image, aff, seeds = _demo_scene(side, args.seed)
    steps, beta = args.steps, 8.0
    expected = wsss_fast.ops.reference.random_walk(
        aff.double(), seeds.double(), beta=beta, steps=steps
    )
    print(f"random walk on a {side}x{side} image: M = {side * side}, beta = {beta}, {steps} steps")
    results = {}
    for name in wsss_fast.available_backends():
        if name == "triton" and not torch.cuda.is_available():
            continue  # interpreted Triton is for tests only
        device = "cuda" if torch.cuda.is_available() and name != "reference" else "cpu"
        a, s = aff.to(device), seeds.to(device)
        with wsss_fast.use_backend(name):
            t0 = time.perf_counter()
            out = wsss_fast.random_walk(a, s, beta=beta, steps=steps)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        err = float((out.double().cpu() - expected).abs().max())
        results[name] = {"device": device, "ms": round(ms, 2), "max_abs_error": err}
        print(f"  {name:<9} on {device}: {ms:8.2f} ms, max |error| vs float64 reference {err:.2e}")
    refined = expected[0].float()
    fg = refined[0] > refined[1]
    truth = (image > 0.5).flatten()
    agreement = float((fg == truth).float().mean())
    print(f"  foreground from two seed pixels matches the disc on {agreement:.1%} of pixels")

    def to_img(x: torch.Tensor) -> Image.Image:
        x = x.reshape(side, side)
        x = (x - x.min()) / (x.max() - x.min() + 1e-12)
        return Image.fromarray((x * 255).byte().numpy()).resize((side * 4, side * 4), Image.NEAREST)

    panels = [
        to_img(image.flatten()),
        to_img(seeds[0, 0] - seeds[0, 1]),
        to_img(refined[0] / (refined.sum(0) + 1e-12)),
    ]
    sheet = Image.new("L", (side * 4 * 3 + 8, side * 4), 255)
    for i, p in enumerate(panels):
        sheet.paste(p, (i * (side * 4 + 4), 0))
    path = os.path.join(args.out, "random_walk_demo.png")
    sheet.save(path)
    with open(os.path.join(args.out, "random_walk_demo.json"), "w") as f:
        json.dump(
            {
                "side": side,
                "steps": steps,
                "beta": beta,
                "agreement": agreement,
                "backends": results,
            },
            f,
            indent=2,
        )
    print(f"  wrote {path} (image | seeds | foreground probability)")
    return 0


# --------------------------------------------------------------------------- engine commands

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The ``configs/`` folder of a source checkout (editable installs)."""


class CLIError(Exception):
    """A user error reported as one line on stderr (exit status 2)."""


def _load_config(path: str | None, overrides: list[str]):
    from wsss_fast.engine import load_config
    from wsss_fast.methods import register_all

    register_all()

    if path is not None and not os.path.isfile(path):
        raise CLIError(f"config file {path} not found")
    return load_config(path, overrides)


def _train(cfg) -> tuple[object, object, float]:
    from wsss_fast.engine import build_train_dataset, train
    from wsss_fast.engine.infer import build_method, check_classes, ensure_data

    method = build_method(cfg)
    ensure_data(cfg)
    dataset = build_train_dataset(cfg)
    check_classes(cfg, dataset)
    t0 = time.perf_counter()
    result = train(cfg, method, dataset)
    return method, result, time.perf_counter() - t0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    cfg = _load_config(args.config, overrides)
    if not cfg.method:
        raise CLIError("no method: set method: in the config or pass method=aream")
    _, result, seconds = _train(cfg)
    print(
        f"trained {cfg.method} for {result.step} steps in {seconds:.1f} s; run folder {result.run_dir}"
    )
    return 0


def _infer_setup(args: argparse.Namespace):
    from wsss_fast.engine.infer import default_infer_dir, load_run

    cfg, method, model, ckpt = load_run(args.run, args.overrides)
    split = args.split or cfg.eval.split
    out = Path(args.out) if args.out else default_infer_dir(args.run, split)
    return cfg, model, ckpt, split, out


class _Ranks:
    """Under torchrun, the process group for sharded inference (a no-op in one process)."""

    def __init__(self, cfg):
        from wsss_fast.engine import distributed

        self._d = distributed
        self.info = distributed.setup(cfg.train.device)

    def kwargs(self) -> dict:
        return {"rank": self.info.rank, "world_size": self.info.world_size}

    def done(self) -> None:
        import torch.distributed as dist

        if self.info.distributed:
            dist.barrier()
        self._d.teardown(self.info)


def cmd_cam(args: argparse.Namespace) -> int:
    from wsss_fast.engine.infer import eval_dataset, make_cams

    cfg, model, ckpt, split, out = _infer_setup(args)
    ranks = _Ranks(cfg)
    t0 = time.perf_counter()
    n = make_cams(cfg, model, eval_dataset(cfg, split, with_mask=False), out, **ranks.kwargs())
    ranks.done()
    who = f" (rank {ranks.info.rank} of {ranks.info.world_size})" if ranks.info.distributed else ""
    print(
        f"{n} CAMs of split {split!r}{who} from {ckpt} in {time.perf_counter() - t0:.1f} s -> "
        f"{out / 'cams'}"
    )
    return 0


def _run_config(args: argparse.Namespace):
    """The saved config of run folder ``args.run`` (with overrides), the split and output."""
    from wsss_fast.engine.infer import default_infer_dir

    cfg_path = Path(args.run) / "config.yaml"
    if not cfg_path.is_file():
        raise CLIError(f"{args.run} is not a run folder: no config.yaml in it")
    cfg = _load_config(str(cfg_path), args.overrides)
    split = args.split or cfg.eval.split
    out = Path(args.out) if args.out else default_infer_dir(args.run, split)
    return cfg, split, out


def cmd_pseudo(args: argparse.Namespace) -> int:
    from wsss_fast.engine.infer import eval_dataset, make_pseudo

    cfg, split, out = _run_config(args)
    ranks = _Ranks(cfg)
    t0 = time.perf_counter()
    dataset = eval_dataset(cfg, split, with_mask=False, normalize=False)
    n = make_pseudo(cfg, dataset, out, **ranks.kwargs())
    ranks.done()
    who = f" (rank {ranks.info.rank} of {ranks.info.world_size})" if ranks.info.distributed else ""
    print(
        f"{n} pseudo masks of split {split!r}{who} (bg score {cfg.eval.bg_threshold}) in "
        f"{time.perf_counter() - t0:.1f} s -> {out / 'pseudo'}"
    )
    return 0


def _print_metrics(metrics: dict, out: Path) -> None:
    for name, table in metrics.get("_tables", {}).items():
        print(f"{name}:\n{table}")
    line = (
        f"cam_miou {metrics['cam_miou']:.4f}" if metrics["cam_miou"] is not None else "cam_miou n/a"
    )
    if metrics.get("pseudo_miou") is not None:
        line += f", pseudo_miou {metrics['pseudo_miou']:.4f}"
    print(
        f"{metrics['split']} split, {metrics['images']} images, bg threshold "
        f"{metrics['bg_threshold']}: {line} -> {out / 'metrics.json'}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from wsss_fast.engine.infer import eval_dataset, evaluate

    cfg, split, out = _run_config(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reads every rank's files
    metrics = evaluate(
        cfg,
        eval_dataset(cfg, split, with_mask=True, normalize=False),
        out,
        num_overlays=args.overlays,
    )
    _print_metrics(metrics, out)
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from wsss_fast.engine.infer import NoSegmentationHeadError, eval_dataset, segment_split

    cfg, model, ckpt, split, out = _infer_setup(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one process writes every mask
    t0 = time.perf_counter()
    try:
        metrics = segment_split(cfg, model, eval_dataset(cfg, split), out)
    except NoSegmentationHeadError as e:
        raise CLIError(str(e)) from None
    if metrics["_table"] is not None:
        print(metrics["_table"])
    miou = metrics["seg_miou"]
    score = f"seg_miou {miou:.4f}" if miou is not None else "no ground truth to score"
    print(
        f"{metrics['images']} segmentation masks of split {split!r} from {ckpt} in "
        f"{time.perf_counter() - t0:.1f} s: {score} -> {out / 'seg'}, {out / 'seg_metrics.json'}"
    )
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from wsss_fast.data import make_synthetic

    root = make_synthetic(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        seed=args.seed,
        num_classes=args.num_classes,
    )
    print(f"synthetic data set at {root}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from wsss_fast import memory

    cfg = _load_config(args.config, list(args.overrides))
    if not cfg.method:
        raise CLIError("no method: set method: in the config or pass method=aream")
    try:
        budget = memory.parse_size(args.fit) if args.fit is not None else None
        report = memory.count_step(
            cfg, crop=args.crop, batch=args.batch, backend=args.backend, phase=args.phase
        )
        fits = None
        if budget is not None:
            fits = {
                be: memory.fit(
                    cfg,
                    budget,
                    backend=be,
                    crop=report.crop,
                    batch=report.batch,
                    phase=report.phase,
                    progress=True,
                )
                for be in ("reference", "auto")
            }
    except memory.MemoryCountError as e:
        raise CLIError(str(e)) from e
    if args.json:
        out = report.to_json()
        if fits is not None:
            out["fit"] = {"budget_bytes": budget, **fits}
        print(json.dumps(out, indent=2))
        return 0
    print(memory.format_report(report))
    if fits is not None:
        print()
        print(memory.format_fit(fits, budget, report))
    return 0


def _demo_method(args: argparse.Namespace) -> int:
    from wsss_fast.engine.infer import infer_split

    name = args.method
    config = args.config or str(REPO_CONFIGS / f"{name}_synthetic.yaml")
    out = Path(args.out)
    cfg = _load_config(config, [*args.overrides, f"train.out_dir={out / 'run'}"])
    if cfg.method != name:
        raise CLIError(f"{config}: method is {cfg.method!r}, the demo needs {name}")
    print(f"{name} demo: config {config}, data {cfg.data.root}, output {out}")
    _, result, train_s = _train(cfg)
    t0 = time.perf_counter()
    split = cfg.data.train_split
    metrics = infer_split(cfg, result.model, split, out)
    infer_s = time.perf_counter() - t0
    # Record the timings in metrics.json too.
    saved = json.loads((out / "metrics.json").read_text())
    saved.update(
        train_seconds=round(train_s, 1), infer_seconds=round(infer_s, 1), steps=result.step
    )
    (out / "metrics.json").write_text(json.dumps(saved, indent=2))
    _print_metrics(metrics, out)
    print(
        f"trained {result.step} steps in {train_s:.0f} s; CAMs, pseudo masks and evaluation in {infer_s:.0f} s"
    )
    print(f"overlays in {out / 'overlays'}")
    return 0


def _add_infer(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("run", help="run folder written by `wsss-fast train` (config.yaml, ckpt_*.pt)")
    p.add_argument("--split", default=None, help="data split (default: the config's eval.split)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/infer_<split>)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from wsss_fast.methods import METHODS

    parser = argparse.ArgumentParser(prog="wsss-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU, backends and how the extension was built")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a method with the engine into a run folder")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/aream_synthetic.yaml)")
    p.add_argument("--out", default=None, help="run folder (same as train.out_dir=...)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.set_defaults(func=cmd_train)
    _add_infer(sub, "cam", "CAMs (.npy per image) of a split with a trained run", cmd_cam)
    _add_infer(sub, "pseudo", "pseudo masks (palette PNGs) from the CAMs of `cam`", cmd_pseudo)
    p = _add_infer(sub, "eval", "mIoU of the CAMs (and pseudo masks) -> metrics.json", cmd_eval)
    p.add_argument("--overlays", type=int, default=4, help="overlay panels to write")
    _add_infer(
        sub,
        "segment",
        "masks from the segmentation head (GETAM) and their mIoU -> seg/, seg_metrics.json",
        cmd_segment,
    )

    p = sub.add_parser(
        "memory",
        help="device memory of one training step of a config, counted on the meta device "
        "(no GPU, no data); --fit: the largest crop and batch within a budget",
    )
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/aream_voc.yaml)")
    p.add_argument("--crop", type=int, default=None, help="square crop (default data.crop_size)")
    p.add_argument("--batch", type=int, default=None, help="batch (default data.batch_size)")
    p.add_argument(
        "--backend",
        choices=["reference", "auto", "torch", "triton", "cuda"],
        default="auto",
        help="auto: the fused ops a CUDA GPU takes (default); reference: the published behaviour",
    )
    p.add_argument(
        "--phase", default=None, help="the method's training phase (default: its last one)"
    )
    p.add_argument("--fit", default=None, help="a budget such as 24GiB or 80GB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("make-synthetic", help="write the built-in synthetic data set")
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=480)
    p.add_argument("--num-val", type=int, default=120)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser(
        "demo",
        help="random-walk refinement on every backend (default), or --method aream|getam|crt: "
        "train the method on the synthetic set and evaluate its CAMs and pseudo masks",
    )
    p.add_argument("--method", choices=["random-walk", *METHODS], default="random-walk")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument(
        "--config",
        default=None,
        help="a method's config (default configs/<method>_synthetic.yaml)",
    )
    p.add_argument(
        "--side", type=int, default=48, help="random-walk: image side in pixels (M = side^2)"
    )
    p.add_argument("--steps", type=int, default=64, help="random-walk: steps")
    p.add_argument("--seed", type=int, default=0, help="random-walk: seed")
    p.add_argument("overrides", nargs="*", help="method: config overrides section.key=value")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from wsss_fast.data import DataError
    from wsss_fast.engine import ConfigError

    parser = build_parser()
    # key=value overrides may follow options (`cam RUN --out X k=v`): argparse leaves those
    # out of the positional list, so they are collected here; anything else is an error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"wsss-fast {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (CLIError, FileNotFoundError, DataError) as e:
        print(f"wsss-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
