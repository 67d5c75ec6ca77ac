"""The ``wsss-fast`` command.

``wsss-fast info`` prints versions, the GPU, the backends and how the extension was built.
``wsss-fast demo`` refines a seed map on a synthetic image with ``random_walk`` on every available
backend, checks them against the reference and writes a picture; the engine issue replaces it
with the synthetic training demo.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU, backends and how the extension was built")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="random-walk refinement on a synthetic image, on every backend")
    p.add_argument("--out", default="runs/demo", help="folder for the picture and the JSON summary")
    p.add_argument("--side", type=int, default=48, help="image side in pixels (M = side^2)")
    p.add_argument("--steps", type=int, default=64, help="random-walk steps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
