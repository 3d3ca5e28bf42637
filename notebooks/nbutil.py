"""Small helpers the notebooks share: image grids, the shapes world, and the closing test cell.

Kept here so that each notebook spends its lines on the idea it teaches, not on plotting.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))  # `import minipa` works even without `pip install -e .`


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
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(ROOT / "tests" / f) for f in files)]
    if k:
        cmd += ["-k", k]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(result.stdout[-4000:], result.stderr[-2000:], sep="")
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(files)}: tests failed (exit code {result.returncode}); the output is above")
