"""`minipa train-adapter`: the paper's recipe (§3.2) for a real SD 1.x model, on your own images and captions.

    image ──SD preprocessing───▶ VAE (frozen) ──▶ posterior μ, σ ──▶ z = s·(μ + σ·ε_z)
    caption ──tokenizer────────▶ text encoder (frozen) ──▶ c_t                   ("" when the text is dropped)
    image ──CLIP preprocessing─▶ image encoder (frozen) ──▶ embedding, or Plus's patch features
                                                               (a zero embedding / a zero image when dropped)
    L = ‖ε − ε_θ(√ᾱ_t·z + √(1−ᾱ_t)·ε, c_t, image_proj(embedding), t)‖²          (paper eq. 1)

ε_θ is the frozen UNet with Wk′/Wv′ beside every cross-attention; only image_proj and Wk′/Wv′ train, through
`IPAdapterTraining`, the tiny world's stage 4 unchanged. The defaults are the paper's and the official
`tutorial_train.py`'s: AdamW, constant lr 1e-4, weight decay 0.01, the image, the text or both dropped 5% of
the time each, Wk′/Wv′ initialised from Wk/Wv. The frozen models run in the compute dtype under no_grad, either
a batch at a time as it is drawn (`LiveEncoders`), or once for every image, kept in memory and on disk
(`--cache`, for small datasets: `encode_dataset`). `fit` does the rest: the device, autocast, torchrun,
atomic checkpoints and a bit-for-bit `--resume`.

The output folder:
    ip-adapter.safetensors (+ .bin)          the adapter, in the official layouts: minipa and diffusers load it
    adapters/ip-adapter-<step>.safetensors   one at every checkpoint
    checkpoint.pt  losses.jsonl  settings.json  samples/step-<step>.png  cache.pt
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint

from minipa.ip_adapter import IPAdapter, image_features
from minipa.loading import load_ip_adapter
from minipa.pipeline import Pipeline, _check_encoder_fits_adapter, load_pipeline
from minipa.preprocess import load_image, to_rgb
from minipa.projections import image_projection
from minipa.resnet import ResnetBlock2D
from minipa.train import export
from minipa.train.images import ImageCaptions, read_dataset, sd_pixels
from minipa.train.ip_adapter import IPAdapterTraining
from minipa.train.trainer import Compute, Schedule, default_device, distributed, fit, process_device, save_atomically, split_rows
from minipa.train.unet import DiffusionData
from minipa.transformer import Transformer2DModel

ADAPTER_FILE = "ip-adapter.safetensors"
RECIPE = ("model", "data", "image_encoder", "image_root", "allow_empty_captions", "plus", "tokens", "init_adapter",
          "resolution", "image_drop", "text_drop", "both_drop", "cache")  # what `--resume` must find unchanged


@dataclass
class AdapterSettings:
    """Everything `minipa train-adapter` takes (its flags, one for one); the defaults are the paper's."""

    model: str  # a diffusers SD 1.x folder or a single file
    data: str  # a folder of images + .txt captions, or a .json/.jsonl list of {"image_file", "text"}
    out: str  # the output folder
    image_encoder: str | None = None  # default: image_encoder/ beside --init-adapter, then in the model folder
    image_root: str | None = None  # for a .json/.jsonl list; default: the list's folder
    allow_empty_captions: bool = False
    plus: bool = False  # IP-Adapter Plus: a Resampler over the image encoder's patch features
    tokens: int | None = None  # image tokens; default 4 (16 for Plus)
    init_adapter: str | None = None  # start from this adapter file instead of Wk′ ← Wk, Wv′ ← Wv
    resolution: int = 512
    steps: int = 10_000
    batch_size: int = 8  # the global batch: all processes and micro-batches together
    accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    image_drop: float = 0.05
    text_drop: float = 0.05
    both_drop: float = 0.05
    checkpoint_every: int = 1000
    seed: int = 0
    cache: bool = False
    gradient_checkpointing: bool = False
    device: str | None = None  # default: CUDA if available
    precision: str = "fp32"
    sample_every: int | None = None
    sample_images: tuple[str, ...] = ()  # default: the first 4 training images
    sample_prompts: tuple[str, ...] = ("",)
    sample_steps: int = 30
    save_bin: bool = False
    resume: bool = False
    progress: bool = True

    def check(self) -> None:
        """Refuse impossible settings before anything is read."""
        if type(self.resolution) is not int or self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 (the VAE halves it three times), got {self.resolution!r}")
        for flag in ("steps", "batch_size", "checkpoint_every", "sample_steps", "tokens", "sample_every"):
            value = getattr(self, flag)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"--{flag.replace('_', '-')} must be a whole number ≥ 1, got {value!r}")


class LiveEncoders:
    """The frozen models' outputs for each batch, computed as it is read: `DiffusionData`'s interface (`rows`),
    for datasets too large to encode ahead. Image i has caption i; caption row N (`empty`) is ""."""

    phrasing_index = phrasing_probs = None  # its captions are the dataset's own, in one wording each

    def __init__(self, dataset: ImageCaptions, resolution: int, pipe: Pipeline, plus: bool):
        self.dataset, self.resolution, self.pipe, self.plus = dataset, resolution, pipe, plus
        vae = pipe.vae.config
        self.scaling_factor = vae.scaling_factor
        self.num_images = self.empty = len(dataset)
        self.caption_index = torch.arange(len(dataset))
        self.latent_shape = torch.Size((vae.latent_channels, *[resolution // 2 ** (len(vae.block_out_channels) - 1)] * 2))
        self.uncond_image_embeds = None  # a dropped image: the zero embedding (base), or the features of a zero image (Plus)
        if plus:
            size = pipe.image_encoder.config.image_size
            with torch.no_grad():
                zero_image = torch.zeros(1, 3, size, size, device=pipe.device, dtype=pipe.dtype)
                self.uncond_image_embeds = image_features(pipe.image_encoder, zero_image, plus=True)[0]  # (L, E)

    @torch.no_grad()
    def rows(self, index: torch.Tensor, caption: torch.Tensor):
        """(posterior mean, std, text tokens, image features) for images `index` and captions `caption`."""
        pipe = self.pipe
        sd, clip = self.dataset.load(index.tolist(), self.resolution)  # (B, 3, R, R) in [-1, 1]; (B, 3, 224, 224)
        posterior = pipe.vae.encode(sd.to(pipe.device, pipe.dtype))
        features = image_features(pipe.image_encoder, clip.to(pipe.device, pipe.dtype), self.plus)
        return posterior.mean, posterior.std, self.text_tokens(caption.tolist()), features

    @torch.no_grad()
    def text_tokens(self, caption_rows: list[int]) -> torch.Tensor:
        captions = [self.dataset.examples[i].caption if i < self.empty else "" for i in caption_rows]
        return self.pipe.text_encoder(self.pipe.tokenizer(captions).to(self.pipe.device))  # (B, 77, D)


def encode_dataset(live: LiveEncoders, rank: int = 0, world: int = 1, batch: int = 16) -> DiffusionData:
    """Every image's frozen outputs at once (each process encodes its share), for `--cache`: float32, in host memory."""
    n = live.num_images

    def encode(lo: int, hi: int) -> torch.Tensor:  # rows lo…hi−1, each (mean, std, text, features) flattened into one row
        parts = [live.rows(torch.arange(i, min(i + batch, hi)), torch.arange(i, min(i + batch, hi))) for i in range(lo, hi, batch)]
        return torch.cat([torch.cat([t.flatten(1).float() for t in part], dim=1) for part in parts])

    packed = split_rows(encode, n, rank, world).cpu()
    probe = [t[0] for t in live.rows(torch.arange(1), torch.arange(1))]  # one row's shapes
    mean, std, text, embeds = (t.reshape(n, *p.shape) for t, p in zip(packed.split([p.numel() for p in probe], dim=1), probe))
    uncond = live.uncond_image_embeds
    return DiffusionData(latent_mean=mean.contiguous(), latent_std=std.contiguous(), scaling_factor=live.scaling_factor,
                         text=torch.cat([text, live.text_tokens([n]).float().cpu()]), caption_index=torch.arange(n),
                         image_embeds=embeds.contiguous(), uncond_image_embeds=None if uncond is None else uncond.float().cpu())


def checkpoint_unet_blocks(unet: torch.nn.Module) -> None:
    """Gradient checkpointing: every ResNet and transformer block of the UNet keeps only its inputs in the
    forward pass and runs again in the backward pass: most of the activation memory, for one more forward."""
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, Transformer2DModel)):
            module.forward = _checkpointed(module.forward)


def _checkpointed(forward):
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False) if torch.is_grad_enabled() else forward(*args)
    return run


# ─── building a run ──────────────────────────────────────────────────────────────────────────────


def build_training(s: AdapterSettings, dataset: ImageCaptions, compute: Compute, rank: int = 0, world: int = 1):
    """The frozen pipeline in the compute dtype on this process's device, a float32 adapter attached to its UNet,
    and the training module: → (module, pipe)."""
    pipe = load_pipeline(s.model, image_encoder=_image_encoder_path(s), device=process_device(compute.device), dtype=compute.dtype)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        part.requires_grad_(False)
    pipe.ip_adapter = _adapter(s, pipe).to(pipe.device)  # float32 (trainable; AdamW's state follows it)
    live = LiveEncoders(dataset, s.resolution, pipe, pipe.ip_adapter.plus)
    data = _cached(s, live, rank, world) if s.cache else live
    module = IPAdapterTraining(pipe.unet, pipe.ip_adapter, data, image_drop=s.image_drop, text_drop=s.text_drop,
                               both_drop=s.both_drop)
    module.alphas_cumprod = pipe.scheduler.alphas_cumprod  # the model's own noise schedule (ᾱ_t of paper eq. 1)
    if s.gradient_checkpointing:
        checkpoint_unet_blocks(pipe.unet)
    return module, pipe


def _image_encoder_path(s: AdapterSettings) -> Path:
    candidates = [Path(s.image_encoder)] if s.image_encoder else [
        *([Path(s.init_adapter).parent / "image_encoder"] if s.init_adapter else []), Path(s.model) / "image_encoder"]
    found = next((p for p in candidates if p.is_dir()), None)
    if found is None:
        raise FileNotFoundError(f"no image encoder: {candidates[0]} is not a folder; pass --image-encoder DIR (a transformers "
                                f"CLIPVisionModelWithProjection folder; OpenCLIP ViT-H/14 for SD 1.5's adapters)")
    return found


def _adapter(s: AdapterSettings, pipe: Pipeline) -> IPAdapter:
    """A new adapter (Wk′ ← Wk, Wv′ ← Wv, image_proj initialised as PyTorch does) or the `--init-adapter` file's, in float32."""
    encoder = pipe.image_encoder.config
    if s.init_adapter:
        pipe.ip_adapter = load_ip_adapter(s.init_adapter, pipe.unet, dtype=torch.float32)
        _check_encoder_fits_adapter(pipe, _image_encoder_path(s), s.init_adapter)
        if pipe.ip_adapter.plus != s.plus:
            kinds = ("a base IP-Adapter", "an IP-Adapter Plus")
            raise ValueError(f"{s.init_adapter}: {kinds[pipe.ip_adapter.plus]}, but {kinds[s.plus]} was asked for "
                             f"({'drop' if s.plus else 'add'} --plus)")
        return pipe.ip_adapter
    torch.manual_seed(s.seed)  # the same initialisation in every process
    width = encoder.hidden_size if s.plus else encoder.projection_dim  # what image_proj reads
    tokens = s.tokens or (16 if s.plus else 4)
    D = pipe.unet.config.cross_attention_dim
    adapter = IPAdapter.for_unet(pipe.unet, width, tokens, image_projection(width, D, tokens, resampler={} if s.plus else None))
    adapter.init_from_text_attention(pipe.unet)  # Wk′ ← Wk, Wv′ ← Wv   (paper §3.2.2)
    return adapter


def _cached(s: AdapterSettings, live: LiveEncoders, rank: int, world: int) -> DiffusionData:
    """`encode_dataset`, read back from <out>/cache.pt when the images, captions, models and settings are the same."""
    path = Path(s.out) / "cache.pt"
    files = [e.image for e in live.dataset.examples] + _files(Path(s.model)) + _files(_image_encoder_path(s))
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([stats, live.dataset.captions, s.resolution, live.plus, str(live.pipe.dtype)]).encode()).hexdigest()
    if path.is_file() and (state := torch.load(path, weights_only=True))["key"] == key:
        return DiffusionData(**state["data"])
    data = encode_dataset(live, rank, world)
    if rank == 0:
        save_atomically({"key": key, "data": {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}}, path)
    return data


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


# ─── the run ─────────────────────────────────────────────────────────────────────────────────────


def train_adapter(s: AdapterSettings) -> dict:
    """Check everything, then train; returns a summary (in the first process; {} in the others)."""
    s.check()
    compute = Compute(s.device or default_device(), s.precision, s.accumulation)
    dataset = read_dataset(s.data, s.image_root, s.allow_empty_captions)  # bad data stops here, before a model is read
    rank, world = distributed(compute.device)
    out = _output_folder(s, rank)
    module, pipe = build_training(s, dataset, compute, rank, world)
    schedule = Schedule(steps=s.steps, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay, warmup=0,
                        final_lr_fraction=1.0, checkpoint_every=s.checkpoint_every, seed=s.seed)  # a constant lr
    outputs = Outputs(s, out, pipe, dataset, compute, schedule)
    result = fit(module, schedule, out / "checkpoint.pt", name="ip-adapter", resume=s.resume, progress=s.progress,
                 compute=compute, on_step=outputs.after_step)
    if rank != 0:
        return {}
    outputs.save_adapter(out / ADAPTER_FILE)
    return {"adapter": str(out / ADAPTER_FILE), "images": len(dataset), "steps": len(result["losses"]),
            "final_loss": sum(result["losses"][-50:]) / len(result["losses"][-50:]), "seconds": round(result["seconds"], 1),
            "device": compute.device, "precision": s.precision, "processes": world}


def _output_folder(s: AdapterSettings, rank: int) -> Path:
    """The output folder, with settings.json; a finished or interrupted run there is continued only with --resume,
    and only with the same recipe."""
    out = Path(s.out)
    recipe = {k: getattr(s, k) for k in RECIPE}
    if (out / "checkpoint.pt").exists():
        if not s.resume:
            raise FileExistsError(f"{out / 'checkpoint.pt'} exists: pass --resume to continue that run, or choose another --out")
        saved = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}
        changed = [k for k in RECIPE if k in saved and saved[k] != recipe[k]]
        if changed:
            raise ValueError(f"{out}: --resume with other settings than the run there ({', '.join(changed)}); "
                             f"choose another --out to start a new run")
    if rank == 0:
        export.write_json(out / "settings.json", {**recipe, **{k: v for k, v in dataclasses.asdict(s).items() if k not in recipe}})
    return out


class Outputs:
    """What the run writes on the way, in the first process: the loss log, an adapter per checkpoint, sample grids."""

    def __init__(self, s: AdapterSettings, out: Path, pipe: Pipeline, dataset: ImageCaptions, compute: Compute, schedule: Schedule):
        self.s, self.out, self.pipe, self.compute, self.schedule = s, out, pipe, compute, schedule
        self.log = LossLog(out / "losses.jsonl")
        self.began = time.perf_counter()
        # the grid's image prompts, read now: a wrong path stops the run before it trains
        paths = s.sample_images or [e.image for e in dataset.examples[:4]]
        self.sample_images = [to_rgb(load_image(p)) for p in paths] if s.sample_every else []

    def after_step(self, step: int, loss: float) -> None:
        s = self.s
        self.log.write({"step": step, "loss": loss, "lr": self.schedule.lr_at(step - 1),
                        "elapsed_s": round(time.perf_counter() - self.began, 3)})
        if step % s.checkpoint_every == 0 or step == s.steps:
            self.save_adapter(self.out / "adapters" / f"ip-adapter-{step:06d}.safetensors")
        if s.sample_every and (step % s.sample_every == 0 or step == s.steps):
            self.save_samples(self.out / "samples" / f"step-{step:06d}.png")

    def save_adapter(self, path: Path) -> None:
        export.save_ip_adapter(self.pipe.ip_adapter, path)
        if self.s.save_bin:
            export.save_ip_adapter(self.pipe.ip_adapter, path.with_suffix(".bin"))

    def save_samples(self, path: Path) -> None:
        """A grid: one row per sample image (the image itself, then one generation per sample prompt, λ = 1, seed 0)."""
        s, R = self.s, self.s.resolution
        rows = []
        with self.compute.autocast():  # the float32 adapter beside the frozen models in the compute dtype
            for image in self.sample_images:
                made = [self.pipe(prompt, ip_image=image, ip_scale=1.0, num_steps=s.sample_steps, height=R, width=R,
                                  seed=0, output="np", progress=False)[0] for prompt in s.sample_prompts]
                rows.append(np.concatenate([(sd_pixels(image, R).permute(1, 2, 0).numpy() + 1) / 2, *made], axis=1))
        grid = (np.concatenate(rows, axis=0).clip(0, 1) * 255).round().astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(grid).save(tmp, format="PNG")
        tmp.replace(path)


class LossLog:
    """losses.jsonl: one line per step. A resumed run first drops the lines of the steps it will train again."""

    def __init__(self, path: Path):
        self.path, self.started = path, False

    def write(self, record: dict) -> None:
        if not self.started:
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < record["step"]] \
                if self.path.is_file() else []
            self.path.write_text("".join(line + "\n" for line in kept))
            self.started = True
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
