"""Shared test fixtures: a tiny, random, SD-1.5-shaped model world saved in the real file formats.

The reference libraries (diffusers, transformers) create and save every model here; minipa only
ever sees the files, through its own loaders. Sizes are tiny so a whole pipeline runs in seconds,
but the block layout is SD 1.5's (4 levels, 2 layers per block), so the IP-Adapter numbering
1, 3, …, 31 is the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))  # mutmut: 1

# Hypothesis draws the same examples on every run (CI included), so a failure can be replayed;
# `HYPOTHESIS_PROFILE=explore pytest tests/test_reliability.py` draws new ones, to look for more.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

ROOT = Path(__file__).resolve().parent.parent
BPE_GZ = ROOT / "weights" / "bpe_simple_vocab_16e6.txt.gz"

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    projection_dim=48,
    hidden_act="gelu",
)
# SD 1.5's tokenizer/tokenizer_config.json and special_tokens_map.json (as shipped on the Hub).
_SPECIAL = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
SD15_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **_SPECIAL},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **_SPECIAL},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **_SPECIAL},
}
SD15_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<|startoftext|>", **_SPECIAL},
    "eos_token": {"content": "<|endoftext|>", **_SPECIAL},
    "pad_token": "<|endoftext|>",
    "unk_token": {"content": "<|endoftext|>", **_SPECIAL},
}




def write_sd15_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt converted from CLIP's .gz by minipa, plus SD 1.5's two config files."""
    from minipa.loading import load_tokenizer
    from minipa.train.export import save_tokenizer

    save_tokenizer(load_tokenizer(BPE_GZ), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(SD15_TOKENIZER_CONFIG))
    (folder / "special_tokens_map.json").write_text(json.dumps(SD15_SPECIAL_TOKENS_MAP))
    return folder


SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, clip_sample=False, set_alpha_to_one=False,
)


def random_ip_adapter_state(unet_config: dict, image_embed_dim: int, num_tokens: int = 4, seed: int = 0) -> dict:
    """An IP-Adapter state dict in the official flat naming, with random weights, for a diffusers UNet config.

    The layer widths come from the diffusers UNet's own attention processors (the oracle for the numbering).
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    g = torch.Generator().manual_seed(seed)
    D = unet_config["cross_attention_dim"]
    state = {
        "image_proj.proj.weight": torch.randn(num_tokens * D, image_embed_dim, generator=g) * 0.2,
        "image_proj.proj.bias": torch.randn(num_tokens * D, generator=g) * 0.2,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "image_proj.norm.bias": 0.1 * torch.randn(D, generator=g),
    }
    modules = dict(unet.named_modules())
    for i, name in enumerate(unet.attn_processors):  # every attention layer, in the official order
        if name.endswith("attn2.processor"):
            width = modules[name.removesuffix(".processor")].to_k.out_features
            for kv in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{i}.{kv}.weight"] = torch.randn(width, D, generator=g) * 0.2
    return state


def random_ip_adapter_mlp_state(unet_config: dict, image_embed_dim: int, mult: int = 2, num_tokens: int = 4) -> dict:
    """`random_ip_adapter_state` with IP-Adapter FaceID's image_proj layout: proj.0 (Linear) → GELU → proj.2 (Linear) → norm."""
    state = random_ip_adapter_state(unet_config, image_embed_dim, num_tokens)
    g = torch.Generator().manual_seed(2)
    hidden, out = mult * image_embed_dim, num_tokens * unet_config["cross_attention_dim"]
    del state["image_proj.proj.weight"], state["image_proj.proj.bias"]
    state.update({"image_proj.proj.0.weight": torch.randn(hidden, image_embed_dim, generator=g) * 0.3,
                  "image_proj.proj.0.bias": torch.randn(hidden, generator=g) * 0.3,
                  "image_proj.proj.2.weight": torch.randn(out, hidden, generator=g) * 0.3,
                  "image_proj.proj.2.bias": torch.randn(out, generator=g) * 0.3})
    return state


def random_ip_adapter_plus_state(unet_config: dict, hidden_size: int, width: int = 128, num_tokens: int = 16, seed: int = 0) -> dict:
    """An IP-Adapter Plus state dict in the official flat naming (the Resampler of ip-adapter-plus_sd15:
    4 blocks, heads 64 wide, feed-forward ×4), random weights; `width` is the Resampler's own width
    (128 by default: two heads, so that a bug in splitting the heads shows)."""
    g = torch.Generator().manual_seed(seed)
    D = unet_config["cross_attention_dim"]
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state = {"image_proj.latents": rand(1, num_tokens, width) * 5, "image_proj.proj_in.weight": rand(width, hidden_size),
             "image_proj.proj_in.bias": rand(width), "image_proj.proj_out.weight": rand(D, width), "image_proj.proj_out.bias": rand(D),
             "image_proj.norm_out.weight": 1 + rand(D), "image_proj.norm_out.bias": rand(D)}
    for i in range(4):
        block = f"image_proj.layers.{i}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state.update({f"{block}.{norm}.weight": 1 + rand(width), f"{block}.{norm}.bias": rand(width)})
        state.update({f"{block}.0.to_q.weight": rand(width, width), f"{block}.0.to_kv.weight": rand(2 * width, width),
                      f"{block}.0.to_out.weight": rand(width, width), f"{block}.1.1.weight": rand(4 * width, width),
                      f"{block}.1.3.weight": rand(width, 4 * width)})
    base = random_ip_adapter_state(unet_config, 1, seed=seed)
    return state | {k: v for k, v in base.items() if k.startswith("ip_adapter.")}


def save_nested(state: dict, path: Path) -> None:
    """The official `.bin` layout: {"image_proj": {…}, "ip_adapter": {…}} with the prefixes taken off."""
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in state.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = tensor
    torch.save(nested, path)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Paths of a tiny SD model folder (diffusers layout), an image encoder and an IP-Adapter in both official formats."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("tiny_world")
    torch.manual_seed(0)
    vocab = write_sd15_tokenizer(root / "vocab")  # vocab.json + merges.txt and configs, as SD ships them
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(vocab),
        unet=UNet2DConditionModel(**TINY_UNET),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(),
        image_encoder=None,
        requires_safety_checker=False,
    )
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        randomize(part)
    model = root / "sd"
    pipe.save_pretrained(model)

    encoder = root / "ip" / "image_encoder"
    randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION))).save_pretrained(encoder)
    state = random_ip_adapter_state(TINY_UNET, TINY_VISION["projection_dim"])
    save_file(state, root / "ip" / "ip-adapter.safetensors")
    save_nested(state, root / "ip" / "ip-adapter.bin")
    save_file(random_ip_adapter_plus_state(TINY_UNET, TINY_VISION["hidden_size"]), root / "ip" / "ip-adapter-plus.safetensors")
    save_file(random_ip_adapter_mlp_state(TINY_UNET, TINY_VISION["projection_dim"]), root / "ip" / "ip-adapter-mlp.safetensors")
    return {
        "model": model,
        "image_encoder": encoder,
        "ip_safetensors": root / "ip" / "ip-adapter.safetensors",
        "ip_bin": root / "ip" / "ip-adapter.bin",
        "ip_plus": root / "ip" / "ip-adapter-plus.safetensors",
        "ip_mlp": root / "ip" / "ip-adapter-mlp.safetensors",
        "root": root,
    }


@torch.no_grad()
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 1, spread: float = 0.2) -> torch.nn.Module:
    """Give every parameter of a reference model a random, non-trivial value, so that a parity test compares them all.

    Library initialisations leave LayerNorm/GroupNorm weights at 1 and biases at 0 (transformers zeroes every
    Linear bias too; diffusers zero-initialises some output layers): a bug that swaps, drops or misplaces such a
    tensor is then invisible. Norm weights become 1 + N(0, spread²), norm biases and all other biases N(0, spread²),
    and a weight that is constant (zero-initialised) is drawn N(0, 1/fan_in), the scale that keeps activations sane.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm))
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if is_norm and name == "weight":
                p.copy_(1 + spread * noise)
            elif name == "bias" or is_norm:
                p.copy_(spread * noise)
            elif p.numel() > 1 and p.float().std() == 0:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
    return model


def assert_every_weight_random(model: torch.nn.Module) -> None:
    """No parameter of an oracle is left constant (all 0, all 1), the blind spot `randomize` removes."""
    constant = [name for name, p in model.named_parameters() if p.numel() > 1 and p.float().std() == 0]
    assert not constant, f"oracle parameters left constant: {constant[:5]}"


def diffusers_pipeline(world, adapter: str | None = None):
    """The reference: diffusers' StableDiffusionPipeline on the same files (+ load_ip_adapter)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(world["model"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        path = Path(world[adapter])
        pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
        pipe.register_modules(
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(world["image_encoder"]),
            feature_extractor=CLIPImageProcessor(),
        )
    return pipe


def x0_and_eps_of_the_tests(model_output, x_t, alpha, sigma, prediction_type):
    """(x̂0, ε̂) as minipa.ddpm.x0_and_eps computes them (a course assignment), written here once more."""
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t


@pytest.fixture
def lend_x0_and_eps(monkeypatch):
    """The samplers' tests lend them the tests' own x̂0/ε reading, so that they grade the sampler's step alone: reading
    the model output is an assignment of its own (tests/test_x0_and_eps.py), and a test runs one assignment's code."""
    import minipa.ddpm
    import minipa.dpm_solver

    monkeypatch.setattr(minipa.ddpm, "x0_and_eps", x0_and_eps_of_the_tests)
    monkeypatch.setattr(minipa.dpm_solver, "x0_and_eps", x0_and_eps_of_the_tests)


def timestep_embedding_of_the_tests(timesteps, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
    """minipa.embeddings.timestep_embedding (a course assignment), as diffusers computes it."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=max_period)


@pytest.fixture
def lend_timestep_embedding(monkeypatch):
    """Tests of something else that runs a whole UNet (loading, attention paths, the adapter) lend it diffusers' timestep
    embedding: the embedding is an assignment of its own (tests/test_timestep_embedding.py), and a test runs one
    assignment's code."""
    import minipa.unet

    monkeypatch.setattr(minipa.unet, "timestep_embedding", timestep_embedding_of_the_tests)


def add_noise_of_the_tests(x0, noise, t, alphas_cumprod):
    """minipa.ddpm.add_noise (a course assignment), paper eq. 1 written here once more."""
    abar = alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device)].to(x0.dtype)
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def diffusion_loss_of_the_tests(prediction, target):
    """minipa.ddpm.diffusion_loss (a course assignment), as F.mse_loss in float32."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


@pytest.fixture
def lend_add_noise_and_loss(monkeypatch):
    """The training step's tests lend it the tests' own forward process and loss, so that they grade the step alone
    (add_noise and diffusion_loss are assignments of their own), and see what the step called them with: the returned
    dict's "add_noise" and "loss" lists get one dict of arguments (and the result) per call."""
    import minipa.train.unet

    calls = {"add_noise": [], "loss": []}

    def add_noise(x0, noise, t, alphas_cumprod):
        x_t = add_noise_of_the_tests(x0, noise, t, alphas_cumprod)
        calls["add_noise"].append({"x0": x0, "noise": noise, "t": t, "alphas_cumprod": alphas_cumprod, "x_t": x_t})
        return x_t

    def diffusion_loss(prediction, target):
        calls["loss"].append({"prediction": prediction, "target": target})
        return diffusion_loss_of_the_tests(prediction, target)

    monkeypatch.setattr(minipa.train.unet, "add_noise", add_noise)
    monkeypatch.setattr(minipa.train.unet, "diffusion_loss", diffusion_loss)
    return calls
