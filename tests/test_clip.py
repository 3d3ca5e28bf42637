"""CLIP text and vision towers equal transformers' on tiny random models saved in transformers' formats,
load SD 1.5 / LDM / ip-adapter file layouts, and cover every full-size key (on `meta`)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_every_weight_random, randomize

from minipa import keymap
from minipa.train import export
from minipa.attention import attention_backend
from minipa.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from minipa.config import ConfigError
from minipa.loading import load_image_encoder, load_text_encoder
from minipa.weights import WeightsError

transformers = pytest.importorskip("transformers")

TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=16, hidden_act="quick_gelu")
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                   patch_size=14, projection_dim=24, hidden_act="gelu")
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
               patch_size=14, projection_dim=1024, hidden_act="gelu")


def random_ids(batch=3, vocab=1000, eos=999, seed=0):
    """Rows shaped like tokenizer output: start, words, end, then end-token padding (highest id = eos)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, eos - 1, (batch, 77), generator=g)
    for row, n in zip(ids, (5, 30, 75)[:batch]):
        row[0], row[n + 1:] = eos - 1, eos
    return ids


def save_text_model(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    reference = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TINY_TEXT, **overrides})), seed).eval()
    assert_every_weight_random(reference)
    reference.save_pretrained(folder)
    return reference


def save_vision_model(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    reference = randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**{**TINY_VISION, **overrides})), seed)
    assert_every_weight_random(reference.eval())
    reference.save_pretrained(folder)
    return reference


@pytest.mark.parametrize("eos_token_id", [2, 999])  # legacy SD 1.5 config (pool at argmax) and the modern rule
def test_text_encoder_equals_transformers(tmp_path, eos_token_id):
    reference = save_text_model(tmp_path, eos_token_id=eos_token_id)
    ours = load_text_encoder(tmp_path)
    ids = random_ids()
    with torch.no_grad():
        expected = reference(input_ids=ids)
        got = ours(ids)
        pooled = ours.pool(ids, got)
    assert got.shape == (3, 77, 32)
    assert (got - expected.last_hidden_state).abs().max() < 1e-4
    assert (pooled - expected.pooler_output).abs().max() < 1e-4


def test_text_encoder_causal_mask_explicit_and_sdpa_agree(tmp_path):
    save_text_model(tmp_path)
    ours = load_text_encoder(tmp_path)
    ids = random_ids()
    with torch.no_grad():
        fast = ours(ids)
        with attention_backend("explicit"):
            explicit = ours(ids)
        ids2 = ids.clone()
        ids2[:, 40] = 7  # changing token 40 must leave positions 0..39 untouched (causal)
        changed = ours(ids2)
    assert (fast - explicit).abs().max() < 1e-5
    assert torch.equal(changed[:, :40], fast[:, :40]) and not torch.allclose(changed[:, 40:], fast[:, 40:])


def test_text_encoder_loads_sd15_layout_with_prefix_and_position_ids(tmp_path):
    """SD 1.5's text_encoder/ was written by transformers 4: `text_model.*` keys plus a position_ids buffer."""
    reference = save_text_model(tmp_path / "v5")
    state = {"text_model." + k: v.contiguous() for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    folder = tmp_path / "model" / "text_encoder"
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    config = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
              "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_text_model",
              "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "bos_token_id": 0, "eos_token_id": 2,
              "pad_token_id": 1, "layer_norm_eps": 1e-05, **{k: v for k, v in TINY_TEXT.items()}}
    (folder / "config.json").write_text(json.dumps(config))
    ours = load_text_encoder(tmp_path / "model")  # the model folder: text_encoder/ is found inside
    ids = random_ids()
    with torch.no_grad():
        assert (ours(ids) - reference(input_ids=ids).last_hidden_state).abs().max() < 1e-4


def test_text_encoder_loads_ldm_single_file(tmp_path):
    reference = save_text_model(tmp_path / "ref")
    names = {"text_model." + k: v.contiguous() for k, v in reference.state_dict().items()}
    state = {export.clip_text_ldm_keys(names)[n]: t for n, t in names.items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model.diffusion_model.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # another component of the file
    save_file(state, tmp_path / "sd.safetensors")
    ours = load_text_encoder(tmp_path / "sd.safetensors", config=CLIPTextConfig(**{k: TINY_TEXT[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}))
    ids = random_ids()
    with torch.no_grad():
        assert (ours(ids) - reference(input_ids=ids).last_hidden_state).abs().max() < 1e-4


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_vision_encoder_equals_transformers(tmp_path, act):
    reference = save_vision_model(tmp_path, hidden_act=act)
    ours = load_image_encoder(tmp_path)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels)
    assert got.image_embeds.shape == (2, 24) and got.last_hidden_state.shape == (2, 17, 32)
    assert (got.image_embeds - expected.image_embeds).abs().max() < 1e-4
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max() < 1e-4
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert (a - b).abs().max() < 1e-4


def test_vision_encoder_loads_ip_adapter_layout_in_fp16(tmp_path):
    """ip-adapter's image_encoder/ is a transformers 4 folder saved in fp16; load it cast to fp32."""
    reference = save_vision_model(tmp_path / "ref")
    folder = tmp_path / "models" / "image_encoder"
    folder.mkdir(parents=True)
    state = {k: v.half().contiguous() for k, v in reference.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    config.pop("dtype")
    config.update(torch_dtype="float16", transformers_version="4.28.0.dev0", dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    ours = load_image_encoder(tmp_path / "models", dtype=torch.float32)
    assert ours.visual_projection.weight.dtype == torch.float32
    reference.half().float()  # the same fp16-rounded weights in the reference
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(pixels).image_embeds - reference(pixel_values=pixels).image_embeds).abs().max() < 1e-4


# ─── full-size coverage on meta ──────────────────────────────────────────────────────────────────


def _meta_state(model_cls, config):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}


def test_full_size_text_encoder_keys_and_shapes_all_map():
    theirs = _meta_state(transformers.CLIPTextModel, transformers.CLIPTextConfig(**SD15_TEXT))  # transformers 5: flat keys
    ours = _meta_state(CLIPTextModel, CLIPTextConfig.sd15())
    assert len(ours) == len(theirs) == 196 and sum(torch.Size(s).numel() for s in ours.values()) == 123_060_480
    v4_keys = ["text_model." + k for k in theirs] + ["text_model.embeddings.position_ids"]  # SD 1.5's file
    for keys in (list(theirs), v4_keys, [keymap.LDM_TEXT_PREFIX + k for k in v4_keys]):
        names, unmatched = keymap.clip_text_names(keys)
        assert unmatched == [] and set(names) == set(ours)
        file_shape = {k: theirs[k.removeprefix(keymap.LDM_TEXT_PREFIX).removeprefix("text_model.")] for k in keys
                      if not k.endswith("position_ids")}
        assert all(file_shape[names[n]] == ours[n] for n in ours)


def test_full_size_text_encoder_ldm_names_round_trip():
    ours = _meta_state(CLIPTextModel, CLIPTextConfig.sd15())
    ldm = export.clip_text_ldm_keys(ours)
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm.values())
    names, unmatched = keymap.clip_text_names(list(ldm.values()) + ["first_stage_model.encoder.conv_in.weight"])
    assert unmatched == [] and names == {n: ldm[n] for n in ours}


def test_full_size_vit_h14_keys_and_shapes_all_map():
    theirs = _meta_state(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(**VIT_H14))
    ours = _meta_state(CLIPVisionModelWithProjection, CLIPVisionConfig.vit_h14())
    assert len(ours) == len(theirs) == 520 and sum(torch.Size(s).numel() for s in ours.values()) == 632_076_800
    assert ours["vision_model.embeddings.position_embedding.weight"] == (257, 1280)
    names, unmatched = keymap.clip_vision_names(list(theirs) + ["vision_model.embeddings.position_ids"])
    assert unmatched == [] and set(names) == set(ours) and all(theirs[names[n]] == ours[n] for n in ours)


def test_full_size_configs_match_transformers_defaults_we_rely_on():
    text, vision = CLIPTextConfig.sd15(), CLIPVisionConfig.vit_h14()
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act, text.max_position_embeddings) == (768, 12, "quick_gelu", 77)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.projection_dim, vision.hidden_act, vision.num_positions) == (1280, 32, 16, 5120, 1024, "gelu", 257)


# ─── bad input ───────────────────────────────────────────────────────────────────────────────────


def test_weights_of_another_clip_size_are_a_clear_error(tmp_path):
    """A ViT-L-shaped file where a ViT-H-shaped model is configured (tiny stand-ins of both)."""
    save_vision_model(tmp_path, hidden_size=48, num_hidden_layers=2, projection_dim=16)
    config = CLIPVisionConfig(**{k: v for k, v in TINY_VISION.items()})
    with pytest.raises(WeightsError) as err:
        load_image_encoder(tmp_path, config=config)
    message = str(err.value)
    assert "does not match CLIP vision encoder (hidden 32, 3 layers" in message and "model.safetensors" in message
    assert "missing key" in message and "wrong shape" in message
    assert "vision_model.embeddings.class_embedding: file has (48,)" in message
    assert "looks like: a CLIP vision (image) encoder (hidden 48, 2 layers)" in message


def test_text_weights_given_as_image_encoder_are_a_clear_error(tmp_path):
    save_text_model(tmp_path)
    with pytest.raises(ConfigError, match="model_type is 'clip_text_model', expected 'clip_vision_model'"):
        load_image_encoder(tmp_path)
    with pytest.raises(WeightsError, match="196|missing|unexpected"):
        load_image_encoder(tmp_path, config=CLIPVisionConfig.tiny())


def test_unsupported_config_values_are_clear_errors(tmp_path):
    save_text_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="hidden_act='relu' is not supported"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_theta": 10000}))
    with pytest.raises(ConfigError, match="rope_theta"):
        load_text_encoder(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="expected a text encoder folder"):
        load_text_encoder(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weights file found.*model.safetensors"):
        load_image_encoder(tmp_path)


def test_wrong_pixel_shape_is_a_clear_error():
    model = CLIPVisionModelWithProjection(CLIPVisionConfig.tiny())
    with pytest.raises(ValueError, match=r"pixel_values should be \(B, 3, 224, 224\)"):
        model(torch.zeros(1, 3, 56, 56))
