"""Loading the files users have into minipa's models: one function per component, strict about every key.

Each loader does the same four things: find the folder and the weights file (`component_folder`,
`weights_file`), read the config (`config.read_config`, or SD 1.5's for a single file, which has none),
place every file key with a rule from `keymap.py`, and hand both to `weights.build_and_load`, which
builds the model on `meta` and fills it, reporting every missing, unexpected or mis-shaped key at once.
"""

from __future__ import annotations

from pathlib import Path

from minipa import keymap
from minipa.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from minipa.config import read_config
from minipa.ip_adapter import IPAdapter
from minipa.projections import image_projection
from minipa.unet import UNet2DConditionModel, UNetConfig
from minipa.vae import AutoencoderKL, VAEConfig
from minipa.weights import Checkpoint, WeightsError, build_and_load

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")


def component_folder(path: str | Path, subfolder: str) -> Path:
    """`path`, or `path/subfolder` when `path` is the model folder above the component (it has no config.json)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / subfolder).is_dir():
        return path / subfolder
    return path


def weights_file(folder: Path, names: tuple[str, ...], what: str) -> Checkpoint:
    """The first of `names` that `folder` holds, opened; or a WeightsError that lists them."""
    found = next((folder / name for name in names if (folder / name).is_file()), None)
    if found is None:
        sharded = " (sharded checkpoints are not supported)" if list(folder.glob("*.index.json")) else ""
        raise WeightsError(f"{folder}: no weights file found ({what}){sharded}; expected one of {', '.join(names)}")
    return Checkpoint(found)


def _load(build, checkpoint: Checkpoint, rule, family: str, dtype, device):
    names, unmatched = rule(checkpoint.keys())
    return build_and_load(build, checkpoint, names, family=family, unmatched=unmatched, dtype=dtype, device=device,
                          describe=keymap.describe_checkpoint)


def load_unet(path, *, config: UNetConfig | None = None, dtype=None, device="cpu") -> UNet2DConditionModel:
    """A UNet from a diffusers `unet/` folder (or the model folder above it) or an original LDM single file
    (.safetensors / .ckpt; a lone diffusers-named file works too). A single file carries no config: SD 1.5's."""
    path = component_folder(path, "unet")
    if path.is_dir():
        config = config or read_config(path / "config.json", UNetConfig)
        checkpoint, rule = weights_file(path, DIFFUSERS_WEIGHTS, "UNet"), keymap.identity
    else:
        config, checkpoint = config or UNetConfig.sd15(), Checkpoint(path)
        rule = lambda keys: keymap.unet_names(keys, config.layers_per_block)  # noqa: E731  (LDM or diffusers names)
    family = f"an SD 1.x UNet ({config.in_channels} in, {config.block_out_channels[0]} wide, text {config.cross_attention_dim})"
    return _load(lambda: UNet2DConditionModel(config), checkpoint, rule, family, dtype, device)


def load_vae(path, *, config: VAEConfig | None = None, dtype=None, device="cpu") -> AutoencoderKL:
    """The VAE from a diffusers `vae/` folder (or the model folder above it), or from an LDM single
    file (`first_stage_model.*`, or a standalone LDM VAE file); LDM files default to SD 1.5's config."""
    path = component_folder(path, "vae")
    if path.is_dir():
        config = config or read_config(path / "config.json", VAEConfig)
        checkpoint, rule = weights_file(path, DIFFUSERS_WEIGHTS, "VAE"), keymap.identity
    elif path.is_file():
        config, checkpoint = config or VAEConfig.sd15(), Checkpoint(path)
        rule = lambda keys: keymap.ldm_vae_names(keys, len(config.block_out_channels))  # noqa: E731
    else:
        raise WeightsError(f"{path}: no such VAE folder or checkpoint file")
    family = f"SD VAE (AutoencoderKL, channels {config.block_out_channels}, {config.latent_channels} latent channels)"
    return _load(lambda: AutoencoderKL(config), checkpoint, rule, family, dtype, device)


def _transformers_folder(path, subfolder: str, what: str) -> tuple[Path, Checkpoint]:
    path = component_folder(path, subfolder)
    if not path.is_dir():
        raise WeightsError(f"{path}: expected a {what} folder (config.json + model.safetensors)")
    return path / "config.json", weights_file(path, TRANSFORMERS_WEIGHTS, what)


def load_text_encoder(path, *, config: CLIPTextConfig | None = None, dtype=None, device="cpu") -> CLIPTextModel:
    """SD's text encoder from a transformers `text_encoder/` folder or an LDM single-file checkpoint
    (`cond_stage_model.transformer.*`; its config is SD 1.5's unless `config=` is given)."""
    if Path(path).is_file():
        config, checkpoint = config or CLIPTextConfig.sd15(), Checkpoint(path)
    else:
        config_file, checkpoint = _transformers_folder(path, "text_encoder", "text encoder")
        config = config or read_config(config_file, CLIPTextConfig)
    family = f"CLIP text encoder (hidden {config.hidden_size}, {config.num_hidden_layers} layers)"
    return _load(lambda: CLIPTextModel(config), checkpoint, keymap.clip_text_names, family, dtype, device)


def load_image_encoder(path, *, config: CLIPVisionConfig | None = None, dtype=None, device="cpu") -> CLIPVisionModelWithProjection:
    """IP-Adapter's image encoder from a transformers `CLIPVisionModelWithProjection` folder."""
    config_file, checkpoint = _transformers_folder(path, "image_encoder", "CLIP image encoder")
    config = config or read_config(config_file, CLIPVisionConfig)
    family = f"CLIP vision encoder (hidden {config.hidden_size}, {config.num_hidden_layers} layers, projection {config.projection_dim})"
    return _load(lambda: CLIPVisionModelWithProjection(config), checkpoint, keymap.clip_vision_names, family, dtype, device)


def load_ip_adapter(path, unet: UNet2DConditionModel, *, dtype=None, device="cpu") -> IPAdapter:
    """Load an official IP-Adapter for `unet`, `.bin` (nested) or `.safetensors` (flat); strict about every key.

    Base (`ip-adapter_sd15`): E and N are read from `image_proj.proj.weight` ((N·D, E)).
    MLP image projection (FaceID's layout): E and m from `proj.0.weight` ((m·E, E)), N from `proj.2.weight` ((N·D, m·E)).
    Plus (`ip-adapter-plus_sd15`): the Resampler's sizes from its `latents` ((1, N, hidden)), `proj_in`
    ((hidden, E)) and layers. D must be the UNet's text-token width.
    """
    checkpoint = Checkpoint(path)
    shapes, D = checkpoint.shapes, unet.config.cross_attention_dim
    resampler = mlp = None
    if "image_proj.latents" in shapes and (plus := keymap.resampler_options(shapes, D)) is not None:
        image_embed_dim, num_tokens, resampler = plus
    elif (sizes := keymap.projection_sizes(shapes, D)) is not None:
        image_embed_dim, num_tokens, mlp = sizes
    else:
        raise WeightsError(f"{checkpoint.path}: does not match {keymap.IP_ADAPTER_FAMILY} with {D}-wide tokens.\n"
                           f"This file looks like: {keymap.describe_ip_adapter(shapes)}.")

    def build():
        image_proj = image_projection(image_embed_dim, D, num_tokens, mlp=mlp, resampler=resampler)
        return IPAdapter.for_unet(unet, image_embed_dim, num_tokens, image_proj)

    names, unmatched = keymap.ip_adapter_names(checkpoint.keys())
    return build_and_load(build, checkpoint, names, family=f"{keymap.IP_ADAPTER_FAMILY}, for this UNet", unmatched=unmatched,
                          dtype=dtype, device=device, describe=keymap.describe_ip_adapter,
                          file_key=lambda name: keymap.ip_adapter_file_keys([name])[name])
