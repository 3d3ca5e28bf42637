"""Fast paths around the readable float32 one: which dtype to run in, and a compiled UNet.

The math is the same in every dtype; only the kernels change. On a CPU with native bfloat16 matrix
instructions (Intel AMX or AVX512-BF16), oneDNN runs bfloat16 convolutions and matmuls about 3.5× faster
than float32 for a full-size SD 1.5 UNet, but not for a toy one, whose matrices are too small to pay
for the conversions (benchmarks/README.md has the numbers). On CUDA, float16 is the usual choice.
"""

from __future__ import annotations

import os
import shutil

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FULL_SIZE_UNET = 100_000_000  # parameters: SD 1.5's UNet has 860M, the tiny model's a few million


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 matrices in hardware (AMX tiles or AVX512-BF16)? Asked of torch, not guessed."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check() for check in checks if check is not None)


def auto_dtype(device: str | torch.device, unet_parameters: int) -> torch.dtype:
    """float16 on CUDA; bfloat16 on a CPU with native bf16 matrix support running a full-size UNet; float32 otherwise."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and unet_parameters >= FULL_SIZE_UNET and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A torch dtype, or its name ("bfloat16"), or "auto" (returned as it is, for the caller to resolve)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected \"auto\", {', '.join(map(repr, DTYPES))} or a torch dtype, got {dtype!r}")
    return DTYPES[dtype]


def channels_last_pays(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Store the UNet's and VAE's convolutions channels-last? Only where it was measured to pay: bfloat16 on the
    CPU, where oneDNN's convolutions run a UNet step ~1.15× and a VAE decode ~2× faster so; float32 gains nothing."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def to_channels_last(model: torch.nn.Module) -> None:
    """Store the model's convolution weights channels-last, in place, and every other tensor as a copy of its own.
    Only moving the 4-d weights would leave the rest in the memory-mapped weights file, which then stays mapped with
    the pages read for the conversion: measured on SD 1.5 in bf16, 1.1 GiB more peak memory than with full copies."""
    def layout(t: torch.Tensor) -> torch.memory_format:
        return torch.channels_last if t.ndim == 4 else torch.contiguous_format

    model.load_state_dict({k: v.clone(memory_format=layout(v)) for k, v in model.state_dict().items()}, assign=True)


def compile_unet(unet: torch.nn.Module, device: str | torch.device) -> None:
    """Run the UNet through `torch.compile`, in place (it stays the same module, with the same attributes).
    CPU: inductor's C++ kernels; CUDA: also CUDA graphs (mode="reduce-overhead"), which replay a whole step
    without launching each kernel from Python. Shapes are static: a new size or batch compiles once more."""
    cuda = torch.device(device).type == "cuda"
    if not cuda and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        raise RuntimeError("compile=True on the CPU needs a C++ compiler (torch.compile's inductor builds its kernels "
                           "with one): install g++ (e.g. `apt install g++`), or run without compile")
    unet.compile(mode="reduce-overhead" if cuda else None, dynamic=False)
