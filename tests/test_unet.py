"""The SD 1.5 UNet: parity with diffusers' UNet2DConditionModel, full-size key coverage on `meta`,
the LDM single-file key rules checked against diffusers' own converter, and clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from minipa import keymap
from minipa.train import export
from minipa.attention import Attention, attention_backend
from minipa.config import ConfigError, read_config
from minipa.embeddings import timestep_embedding
from minipa.loading import load_unet
from minipa.resnet import ResnetBlock2D
from minipa.transformer import Transformer2DModel
from minipa.unet import UNet2DConditionModel, UNetConfig
from minipa.weights import WeightsError

TOL = 1e-4  # fp32 CPU; measured differences are ~0 (same operations in the same order)
SD15_TENSORS = 686
SD15_PARAMETERS = 859_520_964
SD15_SETTINGS = dict(  # diffusers' SD 1.5 unet/config.json, where it differs from UNet2DConditionModel's defaults
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, sample_size=64
)


def diffusers_unet(**changes):
    """A random tiny diffusers UNet with SD 1.5's block layout; every parameter perturbed so that no
    weight keeps a trivial init (ones, zeros) that a wrong mapping could get away with."""
    from diffusers import UNet2DConditionModel as Reference

    tiny = UNetConfig.tiny()
    settings = dict(
        sample_size=tiny.sample_size,
        block_out_channels=tiny.block_out_channels,
        down_block_types=tiny.down_block_types,
        up_block_types=tiny.up_block_types,
        layers_per_block=tiny.layers_per_block,
        cross_attention_dim=tiny.cross_attention_dim,
        attention_head_dim=tiny.attention_head_dim,
        norm_num_groups=tiny.norm_num_groups,
    )
    settings.update(changes)
    torch.manual_seed(0)
    model = Reference(**settings).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def reference():
    return diffusers_unet()


@pytest.fixture(scope="module")
def unet_folder(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    reference.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return folder


@pytest.fixture(scope="module")
def unet(unet_folder):
    return load_unet(unet_folder)


def inputs(height, width, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, height, width, generator=g), torch.randn(batch, 77, 32, generator=g)


def max_diff(ours, reference, sample, timestep, context):
    with torch.no_grad():
        return (ours(sample, timestep, context) - reference(sample, timestep, context).sample).abs().max().item()


# ─── Layer by layer: each piece equals its diffusers counterpart ────────────────────────────────


def perturbed(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (33, False, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.shape == (5, dim) and (ours - theirs).abs().max().item() < 1e-6


@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (16, 32)], ids=["same-width", "with-1x1-shortcut"])
def test_resnet_block_matches_diffusers(in_ch, out_ch):
    from diffusers.models.resnet import ResnetBlock2D as Reference

    ref = perturbed(Reference(in_channels=in_ch, out_channels=out_ch, temb_channels=24, groups=8, eps=1e-5))
    ours = ResnetBlock2D(in_ch, out_ch, temb_channels=24, groups=8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, temb = torch.randn(2, in_ch, 6, 5), torch.randn(2, 24)
    with torch.no_grad():
        assert (ours(x, temb) - ref(x, temb)).abs().max().item() < 1e-5


def test_transformer_2d_matches_diffusers():
    from diffusers import Transformer2DModel as Reference

    ref = perturbed(Reference(num_attention_heads=4, attention_head_dim=8, in_channels=32, norm_num_groups=8, cross_attention_dim=24))
    ours = Transformer2DModel(32, heads=4, context_dim=24, groups=8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, context = torch.randn(2, 32, 5, 7), torch.randn(2, 77, 24)
    with torch.no_grad():
        assert (ours(x, context) - ref(x, context).sample).abs().max().item() < 1e-5
        block = ref.transformer_blocks[0]  # and the BasicTransformerBlock (pre-LayerNorm, GEGLU) on its own
        tokens = torch.randn(2, 35, 32)
        assert (ours.transformer_blocks[0](tokens, context) - block(tokens, encoder_hidden_states=context)).abs().max() < 1e-5


# ─── Parity with diffusers ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24), (13, 9)], ids=["square", "non-square", "odd"])
def test_noise_prediction_matches_diffusers(unet, reference, height, width):
    sample, context = inputs(height, width)
    for t in (1, 250, 999):
        assert max_diff(unet, reference, sample, t, context) < TOL


def test_timestep_as_int_0d_tensor_or_batch_tensor(unet, reference):
    sample, context = inputs(16, 16)
    for t in (500, torch.tensor(500), torch.tensor([10, 900]), torch.tensor([321.5, 321.5], dtype=torch.float64)):
        assert max_diff(unet, reference, sample, t, context) < TOL
    with torch.no_grad():
        per_sample = unet(sample, torch.tensor([10, 900]), context)
        assert torch.allclose(per_sample[1:], unet(sample[1:], 900, context[1:]), atol=1e-5)
        with pytest.raises(ValueError, match="timestep"):
            unet(sample, torch.tensor([1, 2, 3]), context)


@pytest.mark.usefixtures("lend_timestep_embedding")  # the embedding is another assignment (conftest.py)
def test_explicit_attention_agrees_with_sdpa_in_the_whole_unet(unet):
    sample, context = inputs(16, 16)
    with torch.no_grad():
        fast = unet(sample, 500, context)
        with attention_backend("explicit"):
            slow = unet(sample, 500, context)
    assert (fast - slow).abs().max().item() < 1e-5


@pytest.mark.usefixtures("lend_timestep_embedding")  # the embedding is another assignment (conftest.py)
def test_bin_folder_and_dtype_conversion(reference, unet, tmp_path):
    reference.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin
    from_bin = load_unet(tmp_path)
    sample, context = inputs(16, 16)
    assert max_diff(from_bin, reference, sample, 3, context) < TOL
    half = load_unet(tmp_path, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert torch.equal(half.conv_in.weight, unet.conv_in.weight.half())


class RecordingCrossAttention(Attention):
    """Stands in for the IP-Adapter's attention: records the image tokens it is handed."""

    seen = []

    def forward(self, x, context=None, image_tokens=None):
        RecordingCrossAttention.seen.append(image_tokens)
        return super().forward(x, context)


@pytest.mark.usefixtures("lend_timestep_embedding")  # the embedding is another assignment (conftest.py)
def test_image_tokens_reach_every_cross_attention(unet_folder):
    model = load_unet(unet_folder)
    blocks = [m for m in model.modules() if hasattr(m, "attn2")]
    assert len(blocks) == 16  # as in SD 1.5: 6 down, 1 mid, 9 up
    for block in blocks:
        block.attn2.__class__ = RecordingCrossAttention
    sample, context = inputs(8, 8)
    tokens = torch.randn(2, 4, 32)
    RecordingCrossAttention.seen.clear()
    with torch.no_grad():
        model(sample, 10, context, image_tokens=tokens)
    assert len(RecordingCrossAttention.seen) == 16 and all(t is tokens for t in RecordingCrossAttention.seen)


# ─── Config ─────────────────────────────────────────────────────────────────────────────────────


def test_config_from_diffusers_json(unet_folder, tmp_path):
    from diffusers import UNet2DConditionModel as Reference

    assert read_config(unet_folder / "config.json", UNetConfig) == UNetConfig.tiny()
    sd15 = Reference.load_config(unet_folder)
    sd15.update(SD15_SETTINGS, block_out_channels=[320, 640, 1280, 1280])
    (tmp_path / "config.json").write_text(json.dumps(sd15))
    assert read_config(tmp_path / "config.json", UNetConfig) == UNetConfig.sd15()


@pytest.mark.parametrize(
    "key,value",
    [
        ("addition_embed_type", "text_time"),  # SDXL
        ("use_linear_projection", True),  # SD 2.x
        ("class_embed_type", "timestep"),
        ("upcast_attention", True),
        ("transformer_layers_per_block", 2),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4),
        ("made_up_setting", 3),
    ],
)
def test_config_rejects_what_sd1_does_not_use(unet_folder, tmp_path, key, value):
    data = json.loads((unet_folder / "config.json").read_text())
    data[key] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=key) as err:
        read_config(tmp_path / "config.json", UNetConfig)
    assert "config.json" in str(err.value)


def test_config_of_another_model_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        read_config(tmp_path / "config.json", UNetConfig)


# ─── Full-size coverage on meta ─────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def full_size():
    """SD 1.5's UNet in both libraries, on `meta` (shapes only, no memory)."""
    from diffusers import UNet2DConditionModel as Reference

    with torch.device("meta"):
        reference = Reference(**SD15_SETTINGS)
        ours = UNet2DConditionModel(UNetConfig.sd15())
    return reference.state_dict(), ours.state_dict()


def test_full_size_sd15_keys_and_shapes_match_diffusers(full_size):
    reference, ours = full_size
    assert len(reference) == len(ours) == SD15_TENSORS
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert sum(v.numel() for v in ours.values()) == SD15_PARAMETERS


def test_full_size_ldm_keys_round_trip_through_diffusers_converter(full_size):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, ours = full_size
    to_ldm = export.ldm_unet_keys(ours)
    assert len(set(to_ldm.values())) == SD15_TENSORS
    ldm_state = {to_ldm[name]: tensor for name, tensor in ours.items()}
    converted = convert_ldm_unet_checkpoint(ldm_state, {"layers_per_block": 2})
    assert converted.keys() == ours.keys() and all(converted[k] is ours[k] for k in ours)
    names, unmatched = keymap.ldm_unet_names(ldm_state)
    assert unmatched == [] and names == to_ldm


# Keys and shapes of the original v1-5-pruned checkpoint (a fact independent of both converters,
# which accept an upsampler in either output slot): pins where the rules put each kind of layer.
SD15_LDM_FACTS = {
    "time_embed.0.weight": (1280, 320),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "out.2.weight": (4, 320, 3, 3),
}


def test_full_size_ldm_keys_include_known_sd15_keys(full_size):
    _, ours = full_size
    ldm_shapes = {key: tuple(ours[name].shape) for name, key in export.ldm_unet_keys(ours).items()}
    for key, shape in SD15_LDM_FACTS.items():
        assert ldm_shapes[keymap.LDM_UNET_PREFIX + key] == shape, key


# ─── LDM single files ───────────────────────────────────────────────────────────────────────────


def ldm_state_of(reference):
    state = reference.state_dict()
    to_ldm = export.ldm_unet_keys(state)
    return {to_ldm[name]: tensor for name, tensor in state.items()}


def test_tiny_ldm_mapping_is_inverted_exactly_by_diffusers_converter(reference):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(ldm_state_of(reference), {"layers_per_block": 2})
    state = reference.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.usefixtures("lend_timestep_embedding")  # the embedding is another assignment (conftest.py)
def test_ldm_single_file_loads_and_matches_diffusers(reference, tmp_path, suffix):
    state = ldm_state_of(reference)
    state["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)  # other models in the same file
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(32)
    path = tmp_path / f"sd15-tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    model = load_unet(path, config=UNetConfig.tiny())
    sample, context = inputs(16, 24)
    assert max_diff(model, reference, sample, 123, context) < TOL


# ─── Bad input: clear errors naming the file, the family expected and what was found ─────────────


def save_state(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_sdxl_like_keys_are_reported(reference, tmp_path, unet_folder):
    state = dict(reference.state_dict())
    state["add_embedding.linear_1.weight"] = torch.zeros(128, 16)
    path = save_state(state, tmp_path / "unet.safetensors")
    with pytest.raises(WeightsError) as err:
        load_unet(path, config=UNetConfig.tiny())
    message = str(err.value)
    assert str(path) in message and "SD 1.x UNet" in message
    assert "SDXL" in message and "unexpected" in message and "add_embedding.linear_1.weight" in message


def test_sd2_cross_attention_width_is_reported(tmp_path):
    path = save_state(ldm_state_of(diffusers_unet(cross_attention_dim=1024)), tmp_path / "sd2.safetensors")
    with pytest.raises(WeightsError) as err:
        load_unet(path, config=UNetConfig.tiny())
    message = str(err.value)
    assert str(path) in message and "SD 1.x UNet" in message
    assert "SD 2.x UNet (cross-attention width 1024)" in message and "LDM single-file" in message
    assert "wrong shape" in message and "attn2.to_k.weight" in message and "1024" in message


def test_inpainting_unet_is_reported(tmp_path):
    diffusers_unet(in_channels=9).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    with pytest.raises(WeightsError) as err:
        load_unet(path, config=UNetConfig.tiny())
    message = str(err.value)
    assert str(path) in message and "inpainting UNet (9 input channels)" in message and "conv_in.weight" in message


def test_vae_passed_as_unet_is_reported(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        load_unet(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    with pytest.raises(WeightsError) as err:
        load_unet(path, config=UNetConfig.tiny())
    message = str(err.value)
    assert str(path) in message and "an SD VAE" in message and "missing" in message and "conv_in.weight" in message


def test_ldm_file_with_missing_and_extra_unet_keys_lists_both(reference, tmp_path):
    state = ldm_state_of(reference)
    del state["model.diffusion_model.out.2.weight"]
    state["model.diffusion_model.input_blocks.1.7.weight"] = torch.zeros(1)
    path = save_state(state, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError) as err:
        load_unet(path, config=UNetConfig.tiny())
    message = str(err.value)
    assert "1 missing" in message and "conv_out.weight" in message
    assert "1 unexpected" in message and "model.diffusion_model.input_blocks.1.7.weight" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_safetensors(unet_folder, tmp_path, damage):
    data = (unet_folder / "diffusion_pytorch_model.safetensors").read_bytes()
    path = tmp_path / "unet.safetensors"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x37" * 1000)
    with pytest.raises(WeightsError, match="truncated or corrupt") as err:
        load_unet(path, config=UNetConfig.tiny())
    assert str(path) in str(err.value)


def test_missing_files_in_the_folder(unet_folder, tmp_path):
    (tmp_path / "config.json").write_text((unet_folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors") as err:
        load_unet(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_unet(tmp_path)


SD_UNET = {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}
TEXT_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
LDM_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize(
    "shapes,expected",
    [
        ({**SD_UNET, "add_embedding.linear_1.weight": (1280, 2816)}, "an SDXL UNet (has add_embedding)"),
        ({LDM_IN: (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}, "SDXL UNet"),
        ({**SD_UNET, TEXT_K: (320, 1024)}, "an SD 2.x UNet (cross-attention width 1024)"),
        ({**SD_UNET, "conv_in.weight": (320, 9, 3, 3), TEXT_K: (320, 768)}, "an inpainting UNet (9 input channels)"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "an SD VAE"),
        ({"text_model.embeddings.token_embedding.weight": (49408, 768)}, "a CLIP text encoder"),
        ({"image_proj.proj.weight": (3072, 1024), "ip_adapter.1.to_k_ip.weight": (320, 768)}, "an IP-Adapter"),
        ({LDM_IN: (320, 4, 3, 3)}, "an LDM single-file checkpoint"),
        ({"foo.bar": (1,)}, "not a model minipa recognises"),
    ],
    ids=["sdxl", "sdxl-ldm", "sd2", "inpainting", "vae", "clip-text", "ip-adapter", "ldm", "unknown"],
)
def test_describe_checkpoint_names_the_family(shapes, expected):
    assert expected in keymap.describe_checkpoint(shapes)
