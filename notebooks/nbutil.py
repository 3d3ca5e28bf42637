"""Small helpers the notebooks share: image grids, the shapes world, and the closing test cell.

Kept here so that each notebook spends its lines on the idea it teaches, not on plotting.
Run as a script it re-executes the notebooks and stores their outputs (see `store`):

    .venv/bin/python notebooks/nbutil.py --store [notebooks/03_sampling_ddpm_ddim.ipynb …]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))  # `import minipa` works even without `pip install -e .`
from minipa.course import notebook_code_hash  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"
plt.rcParams.update({"figure.dpi": 72})  # stored figures stay small; the images are 64×64 pixels anyway
# One thread: the tiny models gain little from a second one, and beside other jobs on a 2-core machine two
# threads each fight for the cores (a 25-step image then took 10-40 s instead of under one).
torch.set_num_threads(1)


def as_array(image) -> np.ndarray:
    """PIL image, uint8 (H, W, 3), float (H, W, 3) in [0, 1], or a tensor (3, H, W) in [-1, 1] → float (H, W, 3) in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.dtype == torch.uint8 or image.shape[-1] == 3:
            return as_array(image.numpy())
        return ((image.movedim(0, -1) + 1) / 2).clamp(0, 1).numpy()  # (3, H, W) in [-1, 1]
    image = np.asarray(image)
    return image.astype(np.float32) / 255 if image.dtype == np.uint8 else np.clip(image, 0, 1)


def _grid(n: int, cols: int | None, size: float, title: str | None):
    """A figure with n empty, axis-free panels in rows of `cols`; returns (figure, the n axes)."""
    cols = cols or min(n, 8)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig, list(axes.flat)[:n]


def show(images, titles=None, cols: int | None = None, size: float = 1.7, title: str | None = None):
    """Draw images in a grid; `titles` (one per image) go above each."""
    images = list(images)
    fig, axes = _grid(len(images), cols, size, title)
    for i, (ax, image) in enumerate(zip(axes, images)):
        ax.imshow(as_array(image), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    plt.show()


def heatmaps(maps, titles=None, cols: int | None = None, size: float = 1.7, title: str | None = None, cmap: str = "magma"):
    """Draw 2-D arrays (attention maps, latent channels) in a grid, each with its own colour range."""
    maps = [np.asarray(m.detach().float().cpu() if isinstance(m, torch.Tensor) else m) for m in maps]
    fig, axes = _grid(len(maps), cols, size, title)
    for i, (ax, m) in enumerate(zip(axes, maps)):
        ax.imshow(m, cmap=cmap, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    plt.show()


def run_tests(*files: str, k: str | None = None) -> None:
    """Run tests/<file> with pytest in a fresh process (the notebook's state cannot leak in); fail loudly."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--color=no", "-p", "no:cacheprovider", *(str(ROOT / "tests" / f) for f in files)]
    if k:
        cmd += ["-k", k]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(result.stdout[-4000:], result.stderr[-2000:], sep="")
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(files)}: tests failed (exit code {result.returncode}); the output is above")


# ─── Stored outputs ──────────────────────────────────────────────────────────────────────────────


def store(paths=NOTEBOOKS, timeout: int = 600) -> None:
    """Execute each notebook top to bottom in a fresh kernel and save it with its outputs, and with the hash
    of its code cells in its metadata (`minipa.code_sha256`), which tests/test_notebooks.py checks. Cell
    timings are printed, not stored, and so are progress bars (widgets); figures are stored as 256-colour PNGs.
    Nothing is written for a notebook that fails."""
    import nbclient
    import nbformat

    for path in map(Path, paths):
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=True,
                                         store_widget_state=False, resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        seconds = []
        for i, cell in enumerate(notebook.cells):
            if "outputs" in cell:  # progress bars are widgets, whose state is not stored: they would show as nothing
                cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    output.data["image/png"] = _small_png(output.data["image/png"])
            timing = cell.metadata.pop("execution", None)
            if timing and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
                took = _stamp(timing["shell.execute_reply"]) - _stamp(timing["iopub.execute_input"])
                seconds.append((took, i))
        notebook.metadata.pop("widgets", None)
        notebook.metadata["minipa"] = {"code_sha256": notebook_code_hash(notebook)}
        nbformat.write(notebook, path)
        slowest = ", ".join(f"cell {i} {s:.0f} s" for s, i in sorted(seconds, reverse=True)[:3])
        print(f"{path.name}: {time.perf_counter() - start:.0f} s in all; slowest {slowest}; {path.stat().st_size / 1024:.0f} KiB")


def _small_png(encoded: str) -> str:
    """A stored figure as a 256-colour PNG on white (about 40% of matplotlib's RGBA PNG, and it looks the same)."""
    import base64
    import io

    image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGBA")
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    buffer = io.BytesIO()
    flat.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buffer, "PNG", optimize=True)
    smaller = base64.b64encode(buffer.getvalue()).decode()
    return smaller if len(smaller) < len(encoded) else encoded


def _stamp(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-execute the notebooks and store their outputs and code hash.")
    parser.add_argument("--store", action="store_true", required=True, help="execute and save (the only action)")
    parser.add_argument("notebooks", nargs="*", type=Path, default=NOTEBOOKS, help="default: every numbered notebook")
    store(parser.parse_args().notebooks)
