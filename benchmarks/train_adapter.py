"""What `minipa train-adapter` costs at SD 1.5 size: peak memory and seconds per step.

    .venv/bin/python benchmarks/train_adapter.py --device cpu --precision bf16 --steps 2              # a CPU step
    python benchmarks/train_adapter.py --device cuda --precision fp16 --batch-size 8 --steps 200      # a GPU run
    torchrun --nproc_per_node 1 benchmarks/train_adapter.py --device cuda --precision bf16 --steps 200   # NCCL, one process
    .venv/bin/python benchmarks/train_adapter.py --tiny --steps 3                                     # seconds: the script itself

1. Random weights of SD 1.5's shapes (UNet, VAE, CLIP ViT-L/14 text encoder) and OpenCLIP ViT-H/14's (image
   encoder), built with minipa's own classes on `meta`, filled tensor by tensor (weights ~ N(0, 1/fan_in), norms 1,
   biases 0, so activations keep their scale) and written once, in fp16, in the diffusers/transformers layouts
   (~3.4 GB) to --cache, by a child process, so that its memory is not counted.
2. 16 generated images with captions.
3. `train_adapter` on them; prints and (--json) writes one JSON record: seconds per step (the median after the
   first step), images/s, memory (CPU: the resident set with the models loaded, and the peak of the training steps
   and of loading; CUDA: torch's peak allocated and reserved), the first and last loss.
No diffusers needed: a GPU machine with a CUDA build of torch runs it as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def make_weights(folder: Path, tiny: bool) -> None:
    """A diffusers SD folder (+ image_encoder/) of random weights, fp16, with minipa's exporters."""
    from minipa.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    from minipa.ddpm import ScheduleConfig
    from minipa.loading import load_tokenizer
    from minipa.train import export
    from minipa.unet import UNet2DConditionModel, UNetConfig
    from minipa.vae import AutoencoderKL, VAEConfig

    configs = {"unet": (UNet2DConditionModel, UNetConfig()), "vae": (AutoencoderKL, VAEConfig()),
               "text_encoder": (CLIPTextModel, CLIPTextConfig()), "image_encoder": (CLIPVisionModelWithProjection, CLIPVisionConfig())}
    if tiny:  # a few MB, the same code paths
        configs = {"unet": (UNet2DConditionModel, UNetConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                                                              attention_head_dim=8, sample_size=8)),
                   "vae": (AutoencoderKL, VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)),
                   "text_encoder": (CLIPTextModel, CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
                   "image_encoder": (CLIPVisionModelWithProjection, CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                                                     num_attention_heads=4, patch_size=32, projection_dim=48))}
    g = torch.Generator().manual_seed(0)
    for name, (cls, config) in configs.items():
        with torch.device("meta"):
            model = cls(config)
        state = {k: _random(k, p.shape, g) for k, p in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        export.save_component(model, folder / name)
        print(f"  {name}: {sum(p.numel() for p in state.values()) / 1e6:.0f}M parameters", flush=True)
    export.save_tokenizer(load_tokenizer(ROOT / "weights" / "bpe_simple_vocab_16e6.txt.gz"), folder / "tokenizer")
    export.save_scheduler(ScheduleConfig.sd15(), folder / "scheduler")
    export.save_model_index(folder)
    (folder / "done").write_text("ok")


def _random(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    if len(shape) >= 2:
        fan_in = shape[1:].numel()
        return (torch.randn(shape, generator=g) * (0.02 if "embedding" in name else fan_in**-0.5)).half()
    is_norm_weight = name.endswith("weight") and "norm" in name.split(".")[-2]  # GroupNorm, LayerNorm (pre_layrnorm too)
    return (torch.ones(shape) if is_norm_weight else torch.zeros(shape)).half()


def make_images(folder: Path, n: int = 16) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (640, 480) if i % 2 else (512, 768)
        image = Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, 160))
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(230, (53 * i) % 256, 40))
        image.save(folder / f"image{i:02d}.jpg")
        (folder / f"image{i:02d}.txt").write_text(f"a yellow disc on a coloured background, number {i}")


def resident_mib(field: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS), or its peak (VmHWM), MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_training_memory(marks: dict) -> None:
    """Wrap train_adapter's `fit`: the resident set when training starts (the models, loaded), then the peak of the
    training steps alone (Linux: writing 5 to /proc/self/clear_refs restarts the peak count) and of the whole run."""
    import minipa.train.adapter as adapter

    fit = adapter.fit

    def measured(*args, **kwargs):
        marks.update(loaded_mib=resident_mib(), peak_loading_mib=resident_mib("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")
        try:
            return fit(*args, **kwargs)
        finally:
            marks["peak_training_mib"] = resident_mib("VmHWM")

    adapter.fit = measured


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--plus", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny random weights, 64² images: checks the script in seconds")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/minipa-train-bench"))
    parser.add_argument("--json", help="append the record to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.cache = 64, args.cache + "-tiny"
    root = Path(args.cache)
    weights, images = root / "sd", root / "images"
    if not (weights / "done").exists() and int(os.environ.get("RANK", "0")) == 0:
        print(f"writing random weights to {weights} (once)…", flush=True)
        subprocess.run([sys.executable, __file__, "--make-weights", str(weights), *(["--tiny"] if args.tiny else [])], check=True)
        make_images(images)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        while not (weights / "done").exists():  # the other processes wait for the first one's files
            time.sleep(1)
    return run(args, weights, images)


def run(args, weights: Path, images: Path) -> dict:
    from minipa.train.adapter import AdapterSettings, train_adapter

    out = Path(args.cache) / f"run-{os.getpid()}"
    settings = AdapterSettings(model=str(weights), data=str(images), out=str(out), image_encoder=str(weights / "image_encoder"),
                               resolution=args.resolution, batch_size=args.batch_size, steps=args.steps, checkpoint_every=args.steps,
                               device=args.device, precision=args.precision, plus=args.plus,
                               gradient_checkpointing=args.gradient_checkpointing, progress=False)
    marks = {}
    if not args.device.startswith("cuda"):
        measure_training_memory(marks)
    summary = train_adapter(settings)
    if not summary:
        return {}  # not the first process
    log = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:])] or [log[0]["elapsed_s"]]
    record = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
              "precision": args.precision, "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
              "plus": args.plus, "gradient_checkpointing": args.gradient_checkpointing, "processes": summary["processes"],
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
              "threads": torch.get_num_threads(), "seconds_per_step": round(statistics.median(step_s), 3),
              "images_per_second": round(args.batch_size / statistics.median(step_s), 2), "first_loss": log[0]["loss"],
              "last_loss": log[-1]["loss"], "torch": torch.__version__}
    if args.device.startswith("cuda"):
        record.update(peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                      peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20))
    else:
        record.update({k: round(v) for k, v in marks.items()})
    print(json.dumps(record), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-weights"]:
        make_weights(Path(sys.argv[2]), tiny="--tiny" in sys.argv)
    else:
        main()
