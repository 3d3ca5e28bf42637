"""Measure peak resident memory while `load_unet` loads a full-size SD 1.5 UNet from safetensors.

    .venv/bin/python tests/tools/measure_unet_load_memory.py [--dtype float16|float32] [--dir DIR]

1. writes random full-size weights (built on `meta`, filled tensor by tensor) as a diffusers `unet/` folder;
2. in a fresh process, records ru_maxrss before and after `load_unet` and prints the peak growth
   as a multiple of the weights' size (target: under 1.3×).
Not a test: it needs ~2–4 GB of RAM and disk and a minute or two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, time
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
import torch
from minipa.loading import load_unet
before = peak_mib()
start = time.perf_counter()
model = load_unet(sys.argv[1])
seconds = time.perf_counter() - start
after = peak_mib()
size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
checksum = sum(float(p.float().abs().sum()) for p in model.parameters())  # touch every byte of every weight
touched = peak_mib()
print(f"{before:.0f} {after:.0f} {touched:.0f} {size:.0f} {seconds:.1f}")
"""


def write_random_unet(folder: Path, dtype) -> None:
    import torch

    from minipa.unet import UNet2DConditionModel, UNetConfig
    from minipa.train.export import save_safetensors

    with torch.device("meta"):
        model = UNet2DConditionModel(UNetConfig.sd15())
    state = {name: (0.02 * torch.randn(p.shape)).to(dtype) for name, p in model.state_dict().items()}
    save_safetensors(state, folder / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in vars(UNetConfig.sd15()).items()}}
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the weights (default: a temporary folder)")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_only:
        import torch

        return write_random_unet(args.dir, getattr(torch, args.dtype))
    # Both steps run in child processes: a child inherits its parent's ru_maxrss, so this parent stays small.
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--write-only", "--dtype", args.dtype, "--dir", str(folder)], check=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], check=True, capture_output=True, text=True)
    before, after, touched, size, seconds = map(float, out.stdout.split())
    print(f"weights: {size:.0f} MiB ({args.dtype}); peak RSS: {before:.0f} MiB before loading, {after:.0f} MiB after "
          f"load_unet ({seconds:.1f} s), {touched:.0f} MiB after reading every weight")
    print(f"growth while loading: {(after - before) / size:.2f}× the weights; including the reads: "
          f"{(touched - before) / size:.2f}×; whole process: {touched / size:.2f}×")


if __name__ == "__main__":
    main()
