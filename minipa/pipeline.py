"""Text + image prompts → images: Stable Diffusion 1.5 with IP-Adapter, one readable loop.

    text ──tokenizer──▶ CLIP text ──▶ c_t (B, 77, 768) ──────────────┐
    image ─preprocess─▶ CLIP vision ─▶ image_proj ─▶ c_i (B, 4, 768) ─┤ decoupled cross-attention
    noise x_T ──▶ [UNet ε_θ(x_t, c_t, c_i, t) → CFG (paper eq. 2) → DDIM step] × steps ──▶ x_0
    x_0 / 0.18215 ──VAE decoder──▶ pixels

`load_pipeline` builds one from files users have; `Pipeline.__call__` generates, through `denoise`
(the one sampling loop, which the evaluation and the notebooks call too) and `decode_latents`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from minipa.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionModelWithProjection
from minipa.config import read_config, read_json
from minipa.ddim import DDIMScheduler
from minipa.ddpm import NoiseSchedule, ScheduleConfig
from minipa.guidance import check_guidance_scale, classifier_free_guidance
from minipa.image_prompt import (FEATURE_KINDS, ImagePrompt, as_list, check_combine, check_ip_steps, combine,
                                 encoder_fingerprint, image_prompt_active, load_masks)
from minipa.ip_adapter import IPAdapter, attach_ip_adapter, image_features, uncond_image_features
from minipa.ip_scale import set_ip_masks, set_ip_scale
from minipa.loading import (component_folder, load_image_encoder, load_ip_adapter, load_text_encoder, load_tokenizer,
                            load_unet, load_vae)
from minipa.precision import as_dtype, auto_dtype, channels_last_pays, compile_unet, to_channels_last
from minipa.preprocess import preprocess_image
from minipa.schedulers import make_scheduler
from minipa.tokenizer import CLIPTokenizer
from minipa.unet import UNet2DConditionModel, UNetConfig
from minipa.vae import AutoencoderKL, VAEConfig
from minipa.weights import TINY_RESTORE_HINT, verify_manifest

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
TINY_MODEL = WEIGHTS / "tiny"
OUTPUTS = ("pil", "np", "latent")
MAX_SIDE = 2048  # pixels: 4× SD 1.5's training size, and a guard against typos like 51200 running out of memory


@dataclass
class Pipeline:
    """SD 1.5 (+ optional IP-Adapter). Every component is a plain attribute and usable on its own."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: NoiseSchedule
    image_encoder: CLIPVisionModelWithProjection | None = None
    ip_adapter: IPAdapter | None = None

    @property
    def image_proj(self):
        return None if self.ip_adapter is None else self.ip_adapter.image_proj

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    # ── conditioning ────────────────────────────────────────────────────────────────────────────

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text tokens c_t: (B, 77, D), CLIP's last hidden state, as SD 1.5 uses it."""
        ids = self.tokenizer(list(prompts)).to(self.device)  # (B, 77), padded with <|endoftext|>
        return self.text_encoder(ids).to(self.dtype)

    @torch.inference_mode()
    def encode_image(self, images) -> torch.Tensor:
        """The image prompt(s) as the adapter reads them: CLIP image embeddings (n_images, E), or, for
        IP-Adapter Plus, the encoder's penultimate hidden states, every patch (n_images, L, E)."""
        if self.image_encoder is None:
            raise ValueError("an image prompt needs an image encoder; load_pipeline(image_encoder=…) or put one in the model folder")
        pixels = preprocess_image(images).to(self.device, self.dtype)  # (n, 3, 224, 224)
        return image_features(self.image_encoder, pixels, self._plus)

    @property
    def _plus(self) -> bool:
        return self.ip_adapter is not None and self.ip_adapter.plus

    @torch.inference_mode()
    def encode_image_prompt(self, ip_image, negative_ip_image=None) -> ImagePrompt:
        """Run the image encoder once, for the image prompt(s) and the unconditional branch (the negative image
        prompt(s), or "no image"): an `ImagePrompt` to pass as `ip_embeds=`, or to `.save()` and reuse."""
        self._check_adapter("ip_image")
        features = self.encode_image(as_list(ip_image))  # (n, E) or (n, L, E)
        if negative_ip_image is None:
            negative = uncond_image_features(self.image_encoder, features[:1], self._plus)
        elif len(negatives := as_list(negative_ip_image)) not in (1, len(features)):
            raise ValueError(f"negative_ip_image: expected 1 image or {len(features)} (one per image prompt), got {len(negatives)}")
        else:
            negative = self.encode_image(negatives)
        return ImagePrompt(features, negative, FEATURE_KINDS[self._plus], encoder_fingerprint(self.image_encoder))

    # ── generation ──────────────────────────────────────────────────────────────────────────────

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] = "",
        ip_image=None,
        ip_scale: float | Mapping = 0.6,
        num_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = 0,
        scheduler: str = "ddim",
        latents: torch.Tensor | None = None,
        output: str = "pil",
        eta: float = 0.0,
        progress: bool = True,
        *,  # the image-prompt controls (`image_prompt.py`)
        negative_ip_image=None, ip_embeds: ImagePrompt | str | Path | None = None, ip_combine: str = "concat",
        ip_weights: Sequence[float] | None = None, ip_steps: tuple[float, float] = (0.0, 1.0), ip_masks=None,
    ):
        """Generate one image per prompt. See the README for every argument; returns PIL images,
        a (B, H, W, 3) float array in [0, 1] ("np"), or the final latents ("latent")."""
        native = (self.unet.config.sample_size or 64) * 8  # the resolution the model was trained at: 512 for SD 1.5
        height, width = height or native, width or native
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        self._check_arguments(prompts, negatives, height, width, latents, output)
        w, ip_steps = check_guidance_scale(guidance_scale), check_ip_steps(ip_steps)
        image_prompt = self._image_prompt(ip_image, ip_embeds, negative_ip_image, ip_masks)
        if image_prompt is not None:
            set_ip_scale(self.unet, ip_scale)  # λ (paper §3.2.3) on every decoupled cross-attention layer
            set_ip_masks(self.unet, self._masks(ip_masks, image_prompt, ip_combine, height, width))  # and per query: regions
        scheduler = make_scheduler(scheduler, self.scheduler.config)  # the name → a fresh sampler on this model's schedule
        scheduler.set_timesteps(num_steps)
        generator = torch.Generator("cpu")  # on the CPU, so a seed gives the same noise on every device
        generator.manual_seed(seed) if seed is not None else generator.seed()

        # conditioning: c_t for [uncond, cond] (only cond at w = 1) and, with an image prompt, c_i likewise
        context = self.encode_prompt(negatives + prompts if w != 1 else prompts)  # ([2]B, 77, D)
        image_tokens = None if image_prompt is None else self._image_tokens(image_prompt, ip_combine, ip_weights, len(prompts), w != 1)

        # x_T ~ N(0, I), or the latents the caller gave (to compare runs or libraries)
        if latents is None:
            shape = (len(prompts), self.unet.config.in_channels, height // 8, width // 8)
            latents = torch.randn(shape, generator=generator)  # float32, then cast: one seed, one image, in every dtype
        x = denoise(self.unet, scheduler, latents.to(self.device, self.dtype), context, image_tokens, guidance_scale=w,
                    generator=generator, eta=eta, progress=progress, ip_steps=ip_steps)
        return x if output == "latent" else self.decode(x, output)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output: str = "pil"):
        """Latents → PIL images, or ("np") a (B, H, W, 3) float array in [0, 1]."""
        images = decode_latents(self.vae, latents)
        return images.cpu().numpy() if output == "np" else [Image.fromarray(a) for a in to_uint8(images).cpu().numpy()]

    def _check_adapter(self, argument: str) -> None:
        if self.ip_adapter is None:
            raise ValueError(f"{argument} was given but no IP-Adapter is loaded; load_pipeline(ip_adapter=PATH)")

    def _image_prompt(self, ip_image, ip_embeds, negative_ip_image, ip_masks) -> ImagePrompt | None:
        """The image prompt's features, encoded now or given (an ImagePrompt, or a file saved from one); None without one."""
        if ip_image is not None and ip_embeds is not None:
            raise ValueError("ip_image and ip_embeds: give one of them (ip_embeds are the image prompt already encoded)")
        if ip_embeds is None:
            extra = next((name for name, v in (("negative_ip_image", negative_ip_image), ("ip_masks", ip_masks)) if v is not None), None)
            if ip_image is None and extra:
                raise ValueError(f"{extra} was given without an image prompt (ip_image or ip_embeds)")
            return None if ip_image is None else self.encode_image_prompt(ip_image, negative_ip_image)
        self._check_adapter("ip_embeds")
        if negative_ip_image is not None:
            raise ValueError("negative_ip_image: ip_embeds already hold the unconditional branch; "
                             "give the negative image when encoding them (encode_image_prompt / minipa encode-image)")
        prompt = ip_embeds if isinstance(ip_embeds, ImagePrompt) else ImagePrompt.load(ip_embeds)
        prompt.check(self.ip_adapter, self.image_encoder)
        return prompt

    def _masks(self, ip_masks, prompt: ImagePrompt, mode: str, height: int, width: int) -> torch.Tensor | None:
        """One region mask per image prompt after combining (n for "concat", else 1): (n', height, width), or None."""
        regions = len(prompt.features) if mode == "concat" else 1
        return None if ip_masks is None else load_masks(ip_masks, regions, height, width).to(self.device)

    def _image_tokens(self, prompt: ImagePrompt, mode: str, weights, batch: int, use_cfg: bool) -> torch.Tensor:
        """c_i for each prompt, [unconditional; conditional] with guidance: ([2]B, n·N, D), n image prompts after combining.
        The base adapter's features are combined before image_proj, Plus's tokens after (see `image_prompt`)."""
        n = len(prompt.features)
        check_combine(mode, weights, n)

        def tokens(features):  # (n or 1, …) → (1, n'·N, D)
            features = features.to(self.device, self.dtype)
            if mode == "concat":
                return self.ip_adapter.image_tokens(features.expand(n, *features.shape[1:])[None])
            if len(features) == 1:  # one unconditional row: nothing to combine
                return self.ip_adapter.image_tokens(features)
            if self._plus:
                return combine(self.ip_adapter.image_proj(features), mode, weights)  # (1, N, D)
            return self.ip_adapter.image_tokens(combine(features, mode, weights))

        cond = tokens(prompt.features).expand(batch, -1, -1)
        return torch.cat([tokens(prompt.negative).expand(batch, -1, -1), cond]) if use_cfg else cond

    def _check_arguments(self, prompts, negatives, height, width, latents, output):
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: expected {len(prompts)} (one per prompt), got {len(negatives)}")
        if not prompts:
            raise ValueError("prompt: expected a string or a non-empty list of strings")
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < 8 or side % 8 or side > MAX_SIDE:
                raise ValueError(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE} (the VAE halves it three times), got {side!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
        if latents is not None:
            expected = (len(prompts), self.unet.config.in_channels, height // 8, width // 8)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents: expected shape {expected} = (batch, channels, height/8, width/8), got {tuple(latents.shape)}")


def denoise(unet, scheduler: NoiseSchedule, x: torch.Tensor, context: torch.Tensor, image_tokens: torch.Tensor | None = None,
            *, guidance_scale: float = 7.5, generator: torch.Generator | None = None, eta: float = 0.0,
            progress: bool = False, ip_steps: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The sampling loop: from x_T (B, C, h, w), for each t of `scheduler.timesteps` (set_timesteps first):
    ε from the UNet, guided by paper eq. 2, then one scheduler step. Returns x_0.

    With guidance (w ≠ 1) `context` and `image_tokens` hold 2B rows, [unconditional; conditional]; with w = 1, B rows
    (eq. 2 is then the conditional prediction alone, so the other pass is skipped). The image tokens are used at the
    steps i (from 0) of T with start ≤ i/T ≤ end, `ip_steps` = (start, end); at the others the UNet is plain SD."""
    use_cfg = guidance_scale != 1
    step_options = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}  # only DDIM has η
    steps = len(scheduler.timesteps)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="minipa", disable=not progress)):
        tokens = image_tokens if image_prompt_active(i, steps, ip_steps) else None
        # BEGIN ASSIGNMENT 9
        eps = unet(torch.cat([x, x]) if use_cfg else x, t, context, image_tokens=tokens)  # ε_θ(x_t, c, t): ([2]B, C, h, w)
        if use_cfg:
            eps_uncond, eps_cond = eps.chunk(2)  # the batch is [unconditional; conditional]
            eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)  # ε̂ = ε_u + w·(ε_c − ε_u)   (paper eq. 2)
        x = scheduler.step(eps, t, x, generator=generator, **step_options).prev_sample  # x_t → x_prev
        # END ASSIGNMENT 9
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"the latents became NaN/inf at step {i + 1} of {len(scheduler.timesteps)} (t={int(t)}); "
                                     f"with dtype={x.dtype} try torch.float32, or a lower guidance_scale")
    return x



def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images (B, H, W, 3), float32 in [0, 1]: undo SD's latent scaling, run the VAE decoder, map [-1, 1] to [0, 1]."""
    pixels = vae.decode(latents / vae.config.scaling_factor)  # (B, 3, H, W) in about [-1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] → uint8 in [0, 255], rounded to the nearest (as diffusers' `numpy_to_pil`)."""
    return (images * 255).round().to(torch.uint8)


# ── loading ─────────────────────────────────────────────────────────────────────────────────────


def load_pipeline(
    model: str | Path | None = None,
    ip_adapter: str | Path | None = None,
    image_encoder: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    configs: str | Path | None = None,
    compile: bool = False,
) -> Pipeline:
    """Build a Pipeline from a diffusers SD 1.x folder, an original single-file checkpoint, or
    (model=None) the tiny model shipped in weights/. `ip_adapter` is an official IP-Adapter file;
    its image encoder defaults to `image_encoder/` next to the adapter, then inside the model folder.
    A single file carries no config: its models are SD 1.5's, unless `configs` names a diffusers
    model folder whose `unet/`, `vae/` and `text_encoder/` config.json files describe them. `dtype="auto"` picks
    float16 on CUDA, bfloat16 on a CPU with bf16 matrix units (full-size models), else float32 (`precision.py`);
    `compile=True` runs the UNet through torch.compile."""
    if model is None:
        if not (TINY_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(f"no model given and the tiny model is not in {TINY_MODEL} yet; pass model=PATH "
                                    f"(a diffusers SD 1.5 folder or a single .safetensors/.ckpt file)")
        verify_manifest(TINY_MODEL, restore_hint=TINY_RESTORE_HINT)  # weights/tiny/SHA256SUMS: every file intact
        model = TINY_MODEL
        ip_adapter = ip_adapter or _first_existing(TINY_MODEL / "ip-adapter.safetensors")
    model, dtype = Path(model), as_dtype(dtype)
    load = dict(dtype=_auto_dtype(model, configs, device) if dtype == "auto" else dtype, device=device)
    pipe = _load_folder(model, load) if model.is_dir() else _load_single_file(model, configs, load)
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(f"{model}: the UNet takes {pipe.unet.config.in_channels} input channels but the VAE makes "
                         f"{pipe.vae.config.latent_channels}-channel latents; inpainting UNets (9 channels) are not supported")
    if channels_last_pays(device, load["dtype"]):  # a memory layout only: the math and the parameters are the same
        for convolutional in (pipe.unet, pipe.vae):
            to_channels_last(convolutional)
    if ip_adapter is not None:
        pipe.ip_adapter = load_ip_adapter(ip_adapter, pipe.unet, **load)
        attach_ip_adapter(pipe.unet, pipe.ip_adapter)
        image_encoder = image_encoder or _first_existing(Path(ip_adapter).parent / "image_encoder", model / "image_encoder")
        if image_encoder is None:
            raise FileNotFoundError(f"no image encoder for the IP-Adapter {ip_adapter}: pass image_encoder=FOLDER (a transformers "
                                    f"CLIPVisionModelWithProjection folder; OpenCLIP ViT-H/14 for ip-adapter_sd15)")
    if image_encoder is not None:
        pipe.image_encoder = load_image_encoder(image_encoder, **load)
    if pipe.ip_adapter is not None:
        _check_encoder_fits_adapter(pipe, image_encoder, ip_adapter)
    if compile:
        compile_unet(pipe.unet, device)
    return pipe


def _auto_dtype(model: Path, configs, device) -> torch.dtype:
    """`dtype="auto"` for this model: its UNet's size, read from the config and counted on `meta` (nothing loaded)."""
    folder = component_folder(model, "unet") if model.is_dir() else Path(configs) / "unet" if configs else None
    config = read_config(folder / "config.json", UNetConfig) if folder is not None else UNetConfig.sd15()
    with torch.device("meta"):
        parameters = sum(p.numel() for p in UNet2DConditionModel(config).parameters())
    return auto_dtype(device, parameters)


def _load_folder(model: Path, load: dict) -> Pipeline:
    """A diffusers model folder: model_index.json, and each component in its subfolder with its own config."""
    index = read_json(model / "model_index.json", f"{model} (an SD 1.x model folder in diffusers layout)")
    _check_pipeline_class(model, index.get("_class_name", "StableDiffusionPipeline"))
    schedule = model / "scheduler" / "scheduler_config.json"
    return Pipeline(unet=load_unet(model / "unet", **load), vae=load_vae(model / "vae", **load),
                    text_encoder=load_text_encoder(model / "text_encoder", **load), tokenizer=load_tokenizer(model / "tokenizer"),
                    scheduler=make_scheduler("ddim", read_config(schedule, ScheduleConfig) if schedule.is_file() else None))


def _load_single_file(model: Path, configs: str | Path | None, load: dict) -> Pipeline:
    """An original LDM checkpoint: every component in one file, SD 1.5's configs unless `configs` has others."""
    if not model.is_file():
        raise FileNotFoundError(f"model: {model} does not exist (expected a diffusers SD 1.x folder or a .safetensors/.ckpt file)")
    read = (lambda sub, cls: None) if configs is None else (lambda sub, cls: read_config(Path(configs) / sub / "config.json", cls))
    return Pipeline(unet=load_unet(model, config=read("unet", UNetConfig), **load), vae=load_vae(model, config=read("vae", VAEConfig), **load),
                    text_encoder=load_text_encoder(model, config=read("text_encoder", CLIPTextConfig), **load),
                    tokenizer=load_tokenizer(WEIGHTS / "bpe_simple_vocab_16e6.txt.gz"), scheduler=make_scheduler("ddim"))


def _check_pipeline_class(model: Path, name: str) -> None:
    """Refuse model folders of other families early, with their name, before loading gigabytes."""
    other = "an SDXL model" if "XL" in name else "an inpainting model" if "Inpaint" in name else None
    if other or not name.startswith("StableDiffusion"):
        raise ValueError(
            f"{model}: model_index.json describes {other or name} ({name}); minipa loads SD 1.x text-to-image "
            f"models (StableDiffusionPipeline)"
        )


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _check_encoder_fits_adapter(pipe: Pipeline, encoder_path, adapter_path) -> None:
    if pipe.ip_adapter.plus:  # the Resampler reads hidden states: the encoder's hidden width
        width, wanted, what = pipe.image_encoder.config.hidden_size, pipe.ip_adapter.image_embed_dim, "patch features"
        known = " (ip-adapter-plus_sd15 uses the OpenCLIP ViT-H/14 encoder, hidden width 1280)" if wanted == 1280 else ""
    else:
        width, wanted, what = pipe.image_encoder.config.projection_dim, pipe.ip_adapter.image_embed_dim, "image embeddings"
        known = " (ip-adapter_sd15 uses the OpenCLIP ViT-H/14 encoder, projection 1024)" if wanted == 1024 else ""
    if width != wanted:
        raise ValueError(
            f"the image encoder at {encoder_path} gives {width}-wide {what}, but the IP-Adapter "
            f"{adapter_path} expects {wanted}-wide ones" + known
        )
