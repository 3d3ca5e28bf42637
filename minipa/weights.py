"""Strict, safe loading of checkpoint files into minipa modules.

The recipe, for every model:
1. build the module on the `meta` device (no memory, no random init);
2. open the checkpoint lazily (`safetensors.safe_open`; pickles only with `weights_only=True`);
3. let a rule from `keymap.py` say which file key feeds which parameter;
4. compare names and shapes *before* reading any tensor, and report every missing, unexpected
   and mis-shaped key in one `WeightsError` that names the file and the expected model family;
5. read each tensor once, cast it on the fly and hand it to the module with `assign=True`,
   so the file's tensor becomes the parameter (no second copy in memory).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, unsafe, or not the model family expected."""


class Checkpoint:
    """Read-only, lazy view of one weights file: key names and shapes first, tensors on demand.

    `.safetensors` files are memory-mapped by `safe_open`; `.bin`/`.ckpt` pickles are loaded with
    `torch.load(weights_only=True, mmap=True)`, which refuses any pickle that would run code.
    A nested pickle (`{"state_dict": …}` as LDM writes it, or `{"image_proj": …, "ip_adapter": …}`
    as IP-Adapter does) is flattened with dots, so both formats present the same flat keys.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such weights file")
        if self.path.stat().st_size == 0:
            raise WeightsError(f"{self.path}: the file is empty (0 bytes); the download or copy was probably interrupted")
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        elif self.path.suffix in PICKLE_SUFFIXES:
            self._open_pickle()
        else:
            raise WeightsError(
                f"{self.path}: unknown weights format {self.path.suffix!r}; expected .safetensors "
                f"(preferred) or a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})"
            )

    def _open_safetensors(self):
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            self._shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{self.path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
        self._tensors = None

    def _open_pickle(self):
        try:
            # mmap keeps tensors on disk until used; only the zip format (torch.save since 1.6) allows it
            mmap = zipfile.is_zipfile(self.path)
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            culprit = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
            raise WeightsError(
                f"{self.path}: refused to unpickle this file: it contains objects other than tensors, and "
                f"loading them could run code. minipa only loads pickles with torch.load(weights_only=True); "
                f"prefer a .safetensors file." + (f" ({culprit[0]})" if culprit else "")
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise WeightsError(f"{self.path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # LDM / Lightning checkpoints nest the weights here
        if not isinstance(loaded, dict):
            raise WeightsError(f"{self.path}: expected a dict of tensors, found {type(loaded).__name__}")
        self._tensors = dict(_flatten(loaded))
        self._shapes = {k: tuple(t.shape) for k, t in self._tensors.items()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return self._file.get_tensor(key)


def _flatten(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        elif isinstance(value, torch.Tensor):
            yield name, value
        # non-tensor entries (step counters, version strings in LDM checkpoints) carry no weights


def _fits(file_shape: tuple, shape: tuple) -> bool:
    """Same shape, or a 1×1 convolution standing for a linear layer (LDM's VAE attention)."""
    return file_shape == shape or (file_shape[2:] == (1, 1) and file_shape[:2] == shape) or (
        shape[2:] == (1, 1) and shape[:2] == file_shape
    )


def load_weights(
    module: nn.Module,
    checkpoint: Checkpoint,
    names: Mapping[str, str],
    *,
    family: str,
    unmatched: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    describe: Callable[[dict], str] | None = None,
    file_key: Callable[[str], str] = lambda name: name,
) -> nn.Module:
    """Fill `module` (built on `meta`) from `checkpoint`, strictly.

    `names` maps each parameter name of `module` to the file key that holds it (from `keymap.py`);
    `unmatched` lists file keys the key rule could not place. `family` ("SD 1.5 UNet", …) and the
    optional `describe(shapes) -> str` (a guess at what the file really is) go into the error; missing parameters
    are reported under the key the file should have had, `file_key(name)`.
    """
    expected = {name: tuple(p.shape) for name, p in module.state_dict(keep_vars=True).items()}
    missing = sorted(file_key(name) for name in set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected)) + sorted(unmatched)
    mismatched = [
        f"{name}: file has {tuple(checkpoint.shape(names[name]))} (key {names[name]!r}), {family} needs {expected[name]}"
        for name in sorted(set(names) & set(expected))
        if not _fits(checkpoint.shape(names[name]), expected[name])
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(_mismatch_report(checkpoint, family, missing, unexpected, mismatched, describe))

    state = {}
    for name, shape in expected.items():
        tensor = checkpoint.tensor(names[name]).reshape(shape)
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def build_and_load(build: Callable[[], nn.Module], checkpoint: Checkpoint, names: Mapping[str, str], **options) -> nn.Module:
    """`build()` run on `meta` (no memory), filled from `checkpoint` by `load_weights(…, **options)`, in eval mode."""
    with torch.device("meta"):
        model = build()
    load_weights(model, checkpoint, names, **options)
    return model.eval()


def _mismatch_report(checkpoint, family, missing, unexpected, mismatched, describe, shown=8) -> str:
    lines = [f"{checkpoint.path}: does not match {family}."]
    if describe is not None:
        lines.append(f"This file looks like: {describe(checkpoint.shapes)}.")
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            lines.append(f"{len(keys)} {title} key(s):")
            lines += [f"  - {k}" for k in keys[:shown]]
            if len(keys) > shown:
                lines.append(f"  … and {len(keys) - shown} more")
    return "\n".join(lines)


# ─── Integrity of shipped weights ────────────────────────────────────────────────────────────────

MANIFEST = "SHA256SUMS"


def sha256_of(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(folder: str | Path, restore_hint: str = "") -> None:
    """Check every file listed in `folder/SHA256SUMS` (sha256sum's format) exists with that hash.

    Raises WeightsError naming each missing or changed file, plus `restore_hint` (how to get them back).
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    hint = f"\n{restore_hint}" if restore_hint else ""
    if not manifest.is_file():
        raise WeightsError(f"{folder}: no {MANIFEST} manifest, so the weights cannot be checked{hint}")
    problems = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise WeightsError(f"{manifest}: line {number} is not '<sha256>  <path>': {line!r}{hint}")
        path = folder / name
        if not path.is_file():
            problems.append(f"  - {name}: missing")
        elif sha256_of(path) != digest:
            problems.append(f"  - {name}: sha256 mismatch (corrupted or changed; expected {digest[:12]}…)")
    if problems:
        raise WeightsError(f"{folder}: {len(problems)} file(s) do not match {MANIFEST}:\n" + "\n".join(problems) + hint)


TINY_RESTORE_HINT = (
    "To restore the shipped tiny model: `git checkout -- weights/tiny` (or clone minipa again). "
    "To retrain it from nothing (75-125 minutes on 2 CPU cores; weights/README.md): "
    "`OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m minipa.train --out weights/tiny --work runs/tiny`."
)
