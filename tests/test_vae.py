"""The VAE equals diffusers' AutoencoderKL (tiny random models in diffusers' and LDM's formats), and its
LDM key rules agree with diffusers' own converter, on a tiny model and on every full-size key (meta)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_every_weight_random, randomize

from minipa import keymap
from minipa.train import export
from minipa.attention import attention_backend
from minipa.config import ConfigError, read_config
from minipa.loading import load_vae
from minipa.vae import AutoencoderKL, VAEConfig
from minipa.weights import WeightsError

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TINY = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
SD15 = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def tiny_config():
    return VAEConfig(**TINY)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    reference = randomize(diffusers.AutoencoderKL(**TINY)).eval()
    assert_every_weight_random(reference)
    return reference


@pytest.fixture(scope="module")
def diffusers_folder(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(folder)
    return folder


def pixels(seed=0, shape=(2, 3, 32, 48)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ldm_state(reference) -> dict:
    """The reference's weights under LDM names, attention projections as 1×1 convs like real LDM files."""
    state = reference.state_dict()
    to_ldm = export.ldm_vae_keys(state, levels=3)
    return {to_ldm[k]: (v[:, :, None, None] if ".attentions." in k and v.ndim == 2 else v).contiguous() for k, v in state.items()}


def assert_matches_reference(ours, reference):
    x = pixels()
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        assert posterior.mean.shape == (2, 4, 8, 12)
        assert (posterior.mean - expected.mean).abs().max() < 1e-4
        assert (posterior.logvar - expected.logvar).abs().max() < 1e-4
        assert (posterior.std - expected.std).abs().max() < 1e-4
        assert torch.equal(posterior.mode(), posterior.mean)
        z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
        decoded = ours.decode(z)
        assert decoded.shape == (2, 3, 32, 48)
        assert (decoded - reference.decode(z).sample).abs().max() < 1e-4


def test_diffusers_folder_equals_diffusers(diffusers_folder, reference):
    ours = load_vae(diffusers_folder)
    assert ours.scaling_factor == 0.18215 and ours.config.block_out_channels == (32, 64, 64)
    assert_matches_reference(ours, reference)


def test_explicit_and_sdpa_attention_agree(diffusers_folder):
    ours = load_vae(diffusers_folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = ours.decode(z)
        with attention_backend("explicit"):
            explicit = ours.decode(z)
    assert (fast - explicit).abs().max() < 1e-5


# ─── The reparameterised sample z = μ + σ·ε (a course assignment): one test per property, then diffusers ─────


def posterior_of(mean: float, logvar: float, shape=(2, 4, 16, 16), requires_grad=False):
    from minipa.vae import DiagonalGaussian

    moments = torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1).requires_grad_(requires_grad)
    return moments, DiagonalGaussian(moments)


def test_sample_draws_its_noise_from_the_generator():
    _, posterior = posterior_of(0.0, 0.0)
    first, again = (posterior.sample(torch.Generator().manual_seed(7)) for _ in range(2))
    other = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other), \
        "draw ε from the generator you are given (torch.randn(shape, generator=generator, …)): the same seed must give the same z"


def test_sample_scales_the_noise_by_the_standard_deviation():
    _, posterior = posterior_of(3.0, 2 * torch.log(torch.tensor(2.0)).item())  # σ = exp(½·logvar) = 2, variance 4
    z = posterior.sample(torch.Generator().manual_seed(0))
    spread, centre = float(z.std()), float(z.mean())
    assert abs(centre - 3.0) < 0.1, f"z must be centred on the mean μ = 3, got {centre:.2f}"
    assert abs(spread - 2.0) < 0.1, (f"scale ε by the standard deviation σ = exp(½·logvar) = 2, not by the variance (4) "
                                     f"or by logvar (1.39): z's spread is {spread:.2f}")


def test_each_latent_gets_its_own_noise():
    _, posterior = posterior_of(0.0, 0.0)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert not torch.equal(z[0], z[1]), "each sample of the batch needs its own ε, shaped like the mean (B, C, h, w)"
    assert z.shape == posterior.mean.shape and z.dtype == posterior.mean.dtype


def test_gradients_reach_the_mean_and_the_log_variance_through_the_sample():
    """The point of the trick: z = μ + σ·ε is a differentiable function of μ and logvar (dz/dμ = 1, dz/dlogvar = ½·σ·ε),
    ε drawn from the generator; a sampler such as torch.normal(μ, σ) gives the same numbers and no gradient."""
    moments, posterior = posterior_of(0.5, 2 * torch.log(torch.tensor(2.0)).item(), requires_grad=True)  # σ = 2
    weights = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    (posterior.sample(torch.Generator().manual_seed(0)) * weights).sum().backward()
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    d_mean, d_logvar = moments.grad.chunk(2, dim=1)
    assert torch.allclose(d_mean, weights, atol=1e-5) and torch.allclose(d_logvar, weights * 0.5 * 2.0 * eps, atol=1e-4), \
        ("gradients must reach μ and logvar through z (the reparameterisation trick): z = μ + σ·ε with ε drawn from the "
         f"generator, so dz/dμ = 1 and dz/dlogvar = ½·σ·ε; a sampler such as torch.normal(μ, σ) cuts them (your dz/dμ: "
         f"{float((d_mean / weights).mean()):.2f})")


def test_posterior_sample_equals_diffusers(reference):
    x = pixels()
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
        ours = AutoencoderKL(tiny_config())
        ours.load_state_dict(reference.state_dict())
        sample = ours.encode(x).sample(torch.Generator().manual_seed(7))
    assert (sample - expected).abs().max() < 1e-4, \
        f"z differs from diffusers' latent_dist.sample with the same generator by {float((sample - expected).abs().max()):.3g}"


# ─── The levels rule of the LDM key map (a course assignment): one test per property, then diffusers' converter ──


def renamed(keys, levels=4, to_diffusers=True):
    return [keymap.renumber_levels(key, levels, to_diffusers) for key in keys]


def test_vae_encoder_levels_keep_their_numbers():
    """encoder.down.{i} ↔ encoder.down_blocks.{i}: the encoder counts its levels from the top in both formats."""
    ldm = [f"encoder.down.{i}.block.0.conv1.weight" for i in range(4)]
    ours = [f"encoder.down_blocks.{i}.block.0.conv1.weight" for i in range(4)]
    got = renamed(ldm)
    assert got == ours, (
        f"the encoder keeps its level numbers: encoder.down.{{i}} is encoder.down_blocks.{{i}} (only the decoder is reversed); "
        f"yours maps {ldm[0]} to {got[0]}")


def test_vae_decoder_levels_are_numbered_from_the_bottom():
    """decoder.up.{levels−1−i} ↔ decoder.up_blocks.{i}: LDM numbers the decoder from the bottom, diffusers in the order it runs."""
    for levels in (3, 4):
        ldm = [f"decoder.up.{i}.upsample.conv.weight" for i in range(levels)]
        want = [f"decoder.up_blocks.{levels - 1 - i}.upsample.conv.weight" for i in range(levels)]
        got = renamed(ldm, levels)
        named = {"decoder.up_blocks.0.upsample.conv.weight": "the decoder's levels are not reversed",
                 f"decoder.up_blocks.{levels}.upsample.conv.weight": "levels − i is one too many: levels − 1 − i"}
        assert got == want, (
            f"LDM numbers the decoder's levels from the bottom: with {levels} levels decoder.up.0 is decoder.up_blocks.{levels - 1} "
            f"(levels − 1 − i); yours gives {got[0]}" + (f": {named[got[0]]}" if got[0] in named else ""))


def test_renumber_levels_works_both_ways():
    """to_diffusers=False maps diffusers' names back to LDM's; there and back is every key itself."""
    ours = ["encoder.down_blocks.1.block.0.conv1.weight", "decoder.up_blocks.0.block.2.norm1.bias"]
    want = ["encoder.down.1.block.0.conv1.weight", "decoder.up.3.block.2.norm1.bias"]
    got = renamed(ours, to_diffusers=False)
    assert got == want, (
        f"renumber_levels must work both ways: with to_diffusers=False, diffusers' {ours[1]} is LDM's {want[1]}; yours gives {got[1]}")
    ldm = [f"{side}.{i}.block.0.conv1.weight" for side in ("encoder.down", "decoder.up") for i in range(4)]
    assert renamed(renamed(ldm), to_diffusers=False) == ldm, "LDM → diffusers → LDM must give every key back"


def test_renumber_levels_leaves_other_keys_alone():
    """Keys outside the levels (and keys already in the other naming) pass through unchanged."""
    others = ["encoder.conv_in.weight", "decoder.mid.block_1.norm1.weight", "quant_conv.bias", "decoder.conv_norm_out.weight",
              "decoder.up_blocks.0.resnets.0.conv1.weight", "encoder.down_blocks.2.resnets.1.conv2.bias"]
    got = renamed(others)
    changed = [(a, b) for a, b in zip(others, got) if a != b]
    assert not changed, (f"keys that are not encoder.down.{{i}} / decoder.up.{{i}} must stay as they are (match the whole "
                         f"'decoder.up.' with its dot); yours changed {changed[0][0]} into {changed[0][1]}")


def test_ldm_names_agree_with_diffusers_converter(reference):
    """Write the tiny model in LDM naming with minipa's rule, convert back with diffusers' own code."""
    ldm = ldm_state(reference)
    assert "first_stage_model.decoder.up.2.block.0.norm1.weight" in ldm  # up_blocks.0 is LDM's up.2 (reversed)
    back = convert_ldm_vae_checkpoint(ldm, dict(reference.config))
    original = reference.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_single_file_equals_diffusers(reference, tmp_path, suffix):
    state = ldm_state(reference)
    state["model.diffusion_model.conv_in.weight"] = torch.zeros(8, 4, 3, 3)  # the rest of a single file
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(8)
    path = tmp_path / f"sd{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 470000}, path)
    assert_matches_reference(load_vae(path, config=tiny_config()), reference)


def test_standalone_ldm_vae_file_without_prefix(reference, tmp_path):
    state = {k.removeprefix("first_stage_model."): v for k, v in ldm_state(reference).items()}
    save_file(state, tmp_path / "vae-ft-mse.safetensors")
    assert_matches_reference(load_vae(tmp_path / "vae-ft-mse.safetensors", config=tiny_config()), reference)


# ─── full-size coverage on meta ──────────────────────────────────────────────────────────────────


def full_size_states():
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**SD15)
        ours = AutoencoderKL(VAEConfig.sd15())
    return theirs, {k: v.shape for k, v in theirs.state_dict().items()}, {k: v.shape for k, v in ours.state_dict().items()}


def test_full_size_keys_and_shapes_equal_diffusers():
    _, theirs, ours = full_size_states()
    assert len(ours) == len(theirs) == 248
    assert sum(s.numel() for s in ours.values()) == 83_653_863
    assert ours == theirs


def test_full_size_ldm_keys_round_trip_and_match_diffusers_converter():
    model, theirs, ours = full_size_states()
    to_ldm = export.ldm_vae_keys(ours)
    assert len(set(to_ldm.values())) == 248
    assert to_ldm["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "first_stage_model.decoder.up.3.upsample.conv.weight"
    assert to_ldm["encoder.mid_block.attentions.0.to_out.0.weight"] == "first_stage_model.encoder.mid.attn_1.proj_out.weight"
    names, unmatched = keymap.ldm_vae_names(list(to_ldm.values()) + ["model.diffusion_model.out.2.bias"])
    assert unmatched == [] and names == to_ldm
    meta = {to_ldm[k]: torch.empty(s, device="meta") for k, s in theirs.items()}
    converted = convert_ldm_vae_checkpoint(meta, dict(model.config))
    assert {k: v.shape for k, v in converted.items()} == theirs


def test_config_json_round_trip(diffusers_folder):
    config = read_config(diffusers_folder / "config.json", VAEConfig)
    assert config == VAEConfig(**TINY, sample_size=32)


# ─── bad input ───────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("change, words", [
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
    ({"latents_mean": [0.1, 0.2, 0.3, 0.4]}, "latents_mean"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}, "down_block_types must be"),
    ({"mystery_setting": 3}, "mystery_setting=3 is not a setting"),
])
def test_unsupported_configs_are_clear_errors(diffusers_folder, tmp_path, change, words):
    config = json.loads((diffusers_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes((diffusers_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=words):
        load_vae(tmp_path)


def test_wrong_files_are_clear_errors(diffusers_folder, tmp_path):
    with pytest.raises(WeightsError, match="no such VAE folder"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weights file found.*VAE.*diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path)
    with pytest.raises(WeightsError) as err:  # the tiny VAE file where the full-size SD 1.5 VAE is expected
        load_vae(diffusers_folder / "diffusion_pytorch_model.safetensors")
    assert "does not match SD VAE (AutoencoderKL, channels (128, 256, 512, 512)" in str(err.value)
    assert "wrong shape" in str(err.value) and "looks like: an SD VAE" in str(err.value)


def test_text_encoder_file_given_as_vae_is_a_clear_error(tmp_path):
    save_file({"text_model.final_layer_norm.weight": torch.zeros(8)}, tmp_path / "te.safetensors")
    with pytest.raises(WeightsError, match="looks like: a CLIP text encoder") as err:
        load_vae(tmp_path / "te.safetensors", config=tiny_config())
    assert "missing key" in str(err.value) and "unexpected key" in str(err.value)
