"""Loading the files users have into minipa's models: one function per component, strict about every key.
(The tokenizer, which has no weights, comes last: its vocabulary and merge files.)

Each loader does the same four things: find the folder and the weights file (`component_folder`,
`weights_file`), read the config (`config.read_config`, or SD 1.5's for a single file, which has none),
place every file key with a rule from `keymap.py`, and hand both to `weights.build_and_load`, which
builds the model on `meta` and fills it, reporting every missing, unexpected or mis-shaped key at once.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from minipa import keymap
from minipa.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from minipa.config import read_config, read_json
from minipa.ip_adapter import IPAdapter
from minipa.projections import image_projection
from minipa.tokenizer import CONTEXT_LENGTH, END, START, CLIPTokenizer, TokenizerError, bytes_to_unicode
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


# ─── The tokenizer ───────────────────────────────────────────────────────────────────────────────
# CLIP's merge list is cut so that the vocabulary has 49408 entries:
# 256 bytes + 256 bytes with "</w>" + 48894 merges + 2 special tokens.
NUM_MERGES = 49408 - 2 * 256 - 2


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """A tokenizer from a `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json), a model folder holding one,
    or CLIP's original `bpe_simple_vocab_16e6.txt.gz`."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return CLIPTokenizer(*vocab_from_bpe_gz(path))
    if path.is_dir() and not (path / "vocab.json").exists() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer folder or file")
    if not path.is_dir():
        raise TokenizerError(f"{path}: expected a folder with vocab.json + merges.txt, or a bpe_simple_vocab_*.txt.gz")
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    if not vocab_file.exists() and (path / "tokenizer.json").is_file():  # transformers 5 writes one tokenizer.json
        vocab, merges = _read_tokenizer_json(path / "tokenizer.json")
    else:  # SD 1.5's layout
        vocab, merges = _read_vocab_and_merges(path, vocab_file, merges_file)
    return CLIPTokenizer(vocab, merges, read_context_length(path / "tokenizer_config.json"))


def vocab_from_bpe_gz(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read CLIP's `bpe_simple_vocab_16e6.txt.gz` and derive (vocab, merges) as SD ships them."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file (expected CLIP's bpe_simple_vocab_16e6.txt.gz)")
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not a gzip-compressed UTF-8 BPE merge list ({err})") from None
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{path}: expected {NUM_MERGES} merges of two symbols after the header line")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    return {token: i for i, token in enumerate(tokens)}, merges


def read_context_length(settings_file: Path) -> int:
    """How many ids a prompt becomes: `model_max_length` in tokenizer_config.json (77 for SD 1.5).

    No file, no such setting, or transformers' "no limit" value (1e30): CLIP's 77."""
    if not settings_file.is_file():
        return CONTEXT_LENGTH
    length = read_json(settings_file, "tokenizer settings").get("model_max_length", CONTEXT_LENGTH)
    if type(length) in (int, float) and length >= 1e6:
        return CONTEXT_LENGTH
    if type(length) is not int or length < 2:  # `type`, not isinstance: true/false are not lengths
        raise TokenizerError(f"{settings_file}: model_max_length should be a whole number ≥ 2 (room for the start and "
                             f"end tokens), found {length!r}")
    return length


def _read_vocab_and_merges(folder: Path, vocab_file: Path, merges_file: Path) -> tuple[dict, list[tuple]]:
    """SD 1.5's layout: vocab.json (token → id) and merges.txt (one symbol pair per line, by rank)."""
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise TokenizerError(f"{folder}: missing {f.name} (a CLIP tokenizer folder holds vocab.json and merges.txt)")
    vocab = read_json(vocab_file, "CLIP tokenizer vocabulary (token → id)", error=TokenizerError)
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    bad = [" ".join(m) for m in merges if len(m) != 2]
    if bad:
        raise TokenizerError(f"{merges_file}: each line should hold two symbols, found {bad[0]!r}")
    return vocab, merges


def _read_tokenizer_json(path: Path) -> tuple[dict, list[tuple]]:
    """transformers 5's layout: one tokenizer.json whose `model` holds the vocab and the merges."""
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab, merges = model["vocab"], [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise TokenizerError(f"{path}: not a BPE tokenizer.json with model.vocab and model.merges ({err!r})") from None
    bad = [m for m in merges if len(m) != 2]
    if not isinstance(vocab, dict) or bad:
        raise TokenizerError(f"{path}: expected model.vocab as a mapping and model.merges as symbol pairs")
    return vocab, merges
