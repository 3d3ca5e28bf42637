"""IP-Adapter pieces (paper §3.2): image projection, decoupled cross-attention, the official layer
numbering and checkpoint formats — each against diffusers."""

import pytest
import torch
from conftest import TINY_UNET, random_ip_adapter_mlp_state, random_ip_adapter_plus_state, save_nested
from diffusers import UNet2DConditionModel as RefUNet
from diffusers.models.attention_processor import Attention as RefAttention
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterFaceIDImageProjection, IPAdapterPlusImageProjection
from safetensors.torch import save_file

from minipa import keymap
from minipa.attention import Attention, attention, attention_backend
from minipa.ip_adapter import (
    DecoupledCrossAttention,
    ImageKeyValue,
    ImageProjection,
    IPAdapter,
    attach_ip_adapter,
    cross_attention_layers,
    decoupled_attention,
    detach_ip_adapter,
)
from minipa.ip_scale import layer_scales, set_ip_scale
from minipa.loading import load_image_encoder, load_ip_adapter
from minipa.projections import MLPProjection, Resampler, image_projection
from minipa.unet import UNet2DConditionModel, UNetConfig
from minipa.weights import WeightsError

SD15_UNET = dict(cross_attention_dim=768)  # diffusers' defaults are SD 1.5's UNet otherwise


def sd15_unets():
    with torch.device("meta"):
        return UNet2DConditionModel(UNetConfig.sd15()), RefUNet(**SD15_UNET)


def test_numbering_matches_diffusers_attention_processor_order():
    ours, ref = sd15_unets()
    ref_order = [name.removesuffix(".processor") for name in ref.attn_processors]
    table = cross_attention_layers(ours)
    assert [i for i, _, _ in table] == list(range(1, 32, 2))
    for i, name, _ in table:
        assert ref_order[i] == name  # the official index is the position among all attention layers
    assert table[0][1] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert table[6][1] == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert table[-1][1] == "mid_block.attentions.0.transformer_blocks.0.attn2"


def test_full_size_ip_adapter_sd15_keys_and_parameter_count():
    ours, ref = sd15_unets()
    with torch.device("meta"):
        adapter = IPAdapter.for_unet(ours, image_embed_dim=1024)  # OpenCLIP ViT-H/14 projection width
    # the reference key set: diffusers' own processor order and widths, on meta
    modules = dict(ref.named_modules())
    expected = {
        "image_proj.proj.weight": (4 * 768, 1024),
        "image_proj.proj.bias": (4 * 768,),
        "image_proj.norm.weight": (768,),
        "image_proj.norm.bias": (768,),
    }
    for i, name in enumerate(ref.attn_processors):
        if name.endswith("attn2.processor"):
            width = modules[name.removesuffix(".processor")].to_k.out_features
            expected[f"ip_adapter.{i}.to_k_ip.weight"] = (width, 768)
            expected[f"ip_adapter.{i}.to_v_ip.weight"] = (width, 768)
    file_keys = keymap.ip_adapter_file_keys(adapter.state_dict())  # minipa's names → the official file's
    ours_shapes = {file_keys[k]: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert ours_shapes == expected
    assert len(ours_shapes) == 4 + 2 * 16
    assert sum(v.numel() for v in adapter.parameters()) == 22_319_616  # the paper's "22M"


def test_full_size_ip_adapter_plus_sd15_matches_diffusers_resampler():
    ours, ref = sd15_unets()
    with torch.device("meta"):
        adapter = IPAdapter.for_unet(ours, 1280, 16, image_projection(1280, 768, 16, resampler={}))  # ViT-H/14 hidden width
        theirs = IPAdapterPlusImageProjection(embed_dims=1280, output_dims=768, hidden_dims=768, heads=12, num_queries=16)
    shapes = {k: tuple(v.shape) for k, v in adapter.image_proj.state_dict().items()}
    assert shapes["latents"] == (1, 16, 768) and shapes["proj_in.weight"] == (768, 1280)
    assert shapes["layers.3.0.to_kv.weight"] == (2 * 768, 768) and shapes["layers.3.1.3.weight"] == (768, 4 * 768)
    assert sum(v.numel() for v in adapter.image_proj.parameters()) == sum(v.numel() for v in theirs.parameters())
    assert len([k for k in adapter.state_dict() if k.startswith("layers.")]) == 2 * 16  # ip_adapter.{1,…,31}.* in the file


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_resampler_equals_diffusers_plus_projection(backend):
    state = random_ip_adapter_plus_state(TINY_UNET, hidden_size=32)  # official key names, written out in conftest
    official = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    with torch.device("meta"):
        ref_unet = RefUNet(**TINY_UNET)
    theirs = ref_unet._convert_ip_adapter_image_proj_to_diffusers(official, low_cpu_mem_usage=False)
    ours = Resampler(32, TINY_UNET["cross_attention_dim"], hidden_dim=128)  # two heads of 64
    ours.load_state_dict(official)  # strict: the official names are ours
    features = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))  # not the global RNG: what ran before varies
    with attention_backend(backend):
        torch.testing.assert_close(ours(features), theirs(features), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mult", [1, 2])
def test_mlp_projection_equals_diffusers_faceid_projection(mult):
    state = random_ip_adapter_mlp_state(TINY_UNET, 16, mult=mult)  # official FaceID image_proj names, written out in conftest
    official = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    with torch.device("meta"):
        ref_unet = RefUNet(**TINY_UNET)
    theirs = ref_unet._convert_ip_adapter_image_proj_to_diffusers(official, low_cpu_mem_usage=False)
    assert isinstance(theirs, IPAdapterFaceIDImageProjection)
    ours = MLPProjection(16, TINY_UNET["cross_attention_dim"], num_tokens=4, mult=mult)
    ours.load_state_dict(official)
    embeds = torch.randn(3, 16)
    torch.testing.assert_close(ours(embeds), theirs(embeds), atol=1e-5, rtol=1e-5)


def test_full_size_faceid_image_proj_matches_diffusers():
    with torch.device("meta"):  # ip-adapter-faceid_sd15: a 512-wide face embedding, hidden 1024, 4 tokens of 768
        ours = MLPProjection(512, 768, num_tokens=4, mult=2)
        theirs = IPAdapterFaceIDImageProjection(image_embed_dim=512, cross_attention_dim=768, mult=2, num_tokens=4)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        "proj.0.weight": (1024, 512), "proj.0.bias": (1024,), "proj.2.weight": (4 * 768, 1024), "proj.2.bias": (4 * 768,),
        "norm.weight": (768,), "norm.bias": (768,)}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# ─── Decoupled cross-attention, paper §3.2.2 with §3.2.3's λ (a course assignment): one test per property ──


def branches(seed=0):
    """q, k, v (text) and k_ip, v_ip (image) for one small decoupled attention: (B, heads, L, d), 77 text and 4 image tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 77, 8, generator=g), torch.randn(2, 2, 77, 8, generator=g)
    k_ip, v_ip = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 4, 8, generator=g)
    return q, k, v, k_ip, v_ip


def coefficient(y, x) -> float:
    """c minimising ‖y − c·x‖: how many times x the tensor y is."""
    return float((y * x).sum() / (x * x).sum())


def test_each_branch_has_its_own_softmax():
    """With V′ = 0 the image branch adds nothing, whatever the image keys K′: the text weights never see them."""
    q, k, v, k_ip, v_ip = branches()
    a = decoupled_attention(q, k, v, k_ip, torch.zeros_like(v_ip), 1.0)
    b = decoupled_attention(q, k, v, 3 * k_ip, torch.zeros_like(v_ip), 1.0)
    assert torch.allclose(a, b, atol=1e-6), (
        f"each branch needs its own softmax: with V′ = 0 the image branch adds nothing, yet changing the image keys K′ changed "
        f"your output by {(a - b).abs().max():.3g}: the image tokens take attention weight from the text tokens, as in one "
        "softmax over [text; image] — the design the paper argues against (§3.2.2). Add attention(q, k, v) and attention(q, k_ip, v_ip)")


def test_lambda_scales_only_the_image_branch():
    """With V′ = 0 the output is the text attention Softmax(QKᵀ/√d)V itself, for every λ."""
    q, k, v, k_ip, v_ip = branches(1)
    text = attention(q, k, v)
    for scale in (2.0, 0.5):  # λ = 2 first: at 0.5, λ and 1 − λ are the same number
        out = decoupled_attention(q, k, v, k_ip, torch.zeros_like(v_ip), scale)
        c = coefficient(out, text)
        named = {"λ multiplies the text branch too: λ·(text + image)": scale, "(1−λ)·text + λ·image: the text branch must keep weight 1": 1 - scale}
        name = next((f" = {n}" for n, value in named.items() if abs(c - value) < 1e-4), "")
        assert torch.allclose(out, text, atol=1e-5), (
            f"λ must scale only the image branch: with V′ = 0 the output must be the text attention Softmax(QKᵀ/√d)V for "
            f"every λ; at λ = {scale} yours is {c:.4g}× the text attention{name}")


def test_output_grows_with_lambda_by_the_image_attention():
    """out(λ) − out(0) = λ·Softmax(QK′ᵀ/√d)V′: linear in λ, with the image attention (K′ and V′ from c_i) as slope."""
    q, k, v, k_ip, v_ip = branches(2)
    base = decoupled_attention(q, k, v, k_ip, v_ip, 0.0)
    for scale in (0.5, 1.0, 2.0):
        slope = (decoupled_attention(q, k, v, k_ip, v_ip, scale) - base) / scale
        named = {"the image branch used the text keys K instead of K′": attention(q, k, v_ip),
                 "the image branch used the text values V instead of V′": attention(q, k_ip, v),
                 "the image branch repeats the text attention": attention(q, k, v)}
        name = next((f": {n}" for n, value in named.items() if torch.allclose(slope, value, atol=1e-5)), "")
        assert torch.allclose(slope, attention(q, k_ip, v_ip), atol=1e-5), (
            f"out(λ) − out(0) must be λ·Softmax(QK′ᵀ/√d)V′, the image attention with K′ = k_ip and V′ = v_ip: at λ = {scale} "
            f"yours differs from it by {(slope - attention(q, k_ip, v_ip)).abs().max():.3g}·λ{name}")


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])  # one test per attention path (the course grades them apart)
def test_decoupled_attention_layer_equals_diffusers_ip_processor(backend):
    torch.manual_seed(0)
    dim, ctx, heads = 64, 32, 8
    ref = RefAttention(query_dim=dim, cross_attention_dim=ctx, heads=heads, dim_head=dim // heads)
    ref.set_processor(IPAdapterAttnProcessor2_0(hidden_size=dim, cross_attention_dim=ctx, num_tokens=(8,), scale=0.7))
    with torch.no_grad():
        for p in ref.processor.parameters():
            p.normal_(0, 0.2)
    base = Attention(dim, ctx, heads=heads)
    base.load_state_dict({k: v for k, v in ref.state_dict().items() if "processor" not in k})
    kv = ImageKeyValue(ctx, dim)
    kv.to_k_ip.weight.data.copy_(ref.processor.to_k_ip[0].weight)
    kv.to_v_ip.weight.data.copy_(ref.processor.to_v_ip[0].weight)
    ours = DecoupledCrossAttention(base, kv, scale=0.7)

    x, text, image = torch.randn(2, 16, dim), torch.randn(2, 77, ctx), torch.randn(2, 8, ctx)
    expected = ref(x, encoder_hidden_states=(text, [image[:, None]]))
    with attention_backend(backend):
        assert (ours(x, text, image_tokens=image) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_the_image_branch_is_added_with_weight_lambda(scale):
    q, k, v, k_ip, v_ip = torch.randn(5, 2, 4, 6, 8).unbind(0)
    expected = attention(q, k, v) + scale * attention(q, k_ip, v_ip)
    torch.testing.assert_close(decoupled_attention(q, k, v, k_ip, v_ip, scale), expected)


def test_scale_zero_is_exactly_plain_attention():
    base = Attention(64, 32, heads=8)
    ours = DecoupledCrossAttention(base, ImageKeyValue(32, 64), scale=0.0)
    x, text, image = torch.randn(2, 16, 64), torch.randn(2, 77, 32), torch.randn(2, 4, 32)
    assert torch.equal(ours(x, text, image_tokens=image), base(x, text))
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    assert torch.equal(decoupled_attention(q, k, v, k * 2, v * 2, 0.0), decoupled_attention(q, k, v, k, v, 0.0))


@pytest.fixture
def unet_and_adapter():
    torch.manual_seed(0)
    config = UNetConfig.tiny()
    unet = UNet2DConditionModel(config).eval()
    adapter = IPAdapter.for_unet(unet, image_embed_dim=16)
    return unet, adapter


def test_attach_shares_weights_and_detach_restores_the_unet(unet_and_adapter):
    unet, adapter = unet_and_adapter
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t = torch.randn(1, 4, 16, 16), 500
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    plain = unet(x, t, text)

    attach_ip_adapter(unet, adapter, scale=0.0)
    layers = cross_attention_layers(unet)
    assert all(isinstance(m, DecoupledCrossAttention) for _, _, m in layers)
    first = layers[0][2]
    assert first.to_k_ip.weight.data_ptr() == adapter.layers[str(layers[0][0])].to_k_ip.weight.data_ptr()
    tokens = adapter.image_tokens(torch.randn(1, 16))
    assert torch.equal(unet(x, t, text, image_tokens=tokens), plain)  # λ = 0 ≡ plain SD
    set_ip_scale(unet, 0.5)
    assert not torch.allclose(unet(x, t, text, image_tokens=tokens), plain)

    detach_ip_adapter(unet)
    assert not any(isinstance(m, DecoupledCrossAttention) for m in unet.modules())
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(unet(x, t, text), plain)


@pytest.mark.usefixtures("lend_timestep_embedding")  # the embedding is another assignment (conftest.py)
def test_without_image_tokens_an_attached_unet_is_plain_sd_and_a_second_adapter_replaces_the_first(unet_and_adapter):
    unet, adapter = unet_and_adapter
    x, t, text = torch.randn(1, 4, 16, 16), 300, torch.randn(1, 77, unet.config.cross_attention_dim)
    plain, to_q = unet(x, t, text), cross_attention_layers(unet)[0][2].to_q
    attach_ip_adapter(unet, adapter, scale=0.7)
    assert torch.equal(unet(x, t, text), plain)  # no image prompt: each layer's text branch alone
    other = IPAdapter.for_unet(unet, image_embed_dim=16, num_tokens=8)
    assert other.image_embed_dim == 16 and other.image_tokens(torch.randn(2, 16)).shape == (2, 8, unet.config.cross_attention_dim)
    attach_ip_adapter(unet, other, scale=0.7)
    index, _, first = cross_attention_layers(unet)[0]
    assert first.to_k_ip is other.layers[str(index)].to_k_ip and first.to_q is to_q  # the new Wk′, the same Wq
    detach_ip_adapter(unet)
    assert torch.equal(unet(x, t, text), plain)
    with pytest.raises(ValueError) as err:
        attach_ip_adapter(unet, IPAdapter(16, unet.config.cross_attention_dim, {1: 32}))
    numbers = [i for i, _, _ in cross_attention_layers(unet)]
    assert str(err.value) == f"this IP-Adapter has layers [1], but the UNet's cross-attention layers are numbered {numbers}"


def test_plus_tokens_from_one_or_several_images(unet_and_adapter):
    unet, _ = unet_and_adapter
    D = unet.config.cross_attention_dim
    plus = IPAdapter.for_unet(unet, 16, 6, image_projection(16, D, 6, resampler={"hidden_dim": 128}))
    assert plus.plus and plus.image_tokens(torch.randn(2, 5, 16)).shape == (2, 6, D)  # (B, L, E): one image
    assert plus.image_tokens(torch.randn(2, 3, 5, 16)).shape == (2, 18, D)  # (B, n, L, E): three images, one attention


def test_defaults_are_the_papers(unet_and_adapter):
    """N = 4 image tokens (§3.2.1) and λ = 1, the weight the adapter is trained with, unless told otherwise."""
    unet, adapter = unet_and_adapter
    assert ImageProjection(16, 32).num_tokens == 4 and IPAdapter(16, 32, {1: 64}).image_proj.num_tokens == 4
    assert DecoupledCrossAttention(Attention(64, 32), ImageKeyValue(32, 64)).scale == 1.0
    attach_ip_adapter(unet, adapter)
    assert {layer.scale for _, _, layer in cross_attention_layers(unet)} == {1.0}


# ─── W′ ← W, the paper's initialisation of the image keys and values (a course assignment) ──────────────


def initialised(unet_and_adapter):
    """(unet, adapter, the UNet's weights before init, the adapter's before init), after init_from_text_attention."""
    unet, adapter = unet_and_adapter
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    adapter.init_from_text_attention(unet)
    return unet, adapter, unet_before, adapter_before


def check_copied(unet, adapter, unet_before, adapter_before, which: str) -> None:
    """Every layer's W′ (which: "k" or "v") holds that layer's text W as it was before init, with a message naming the mistake."""
    other = {"k": "v", "v": "k"}[which]
    for i, name, attn in cross_attention_layers(unet):
        text_w = unet_before[f"{name}.to_{which}.weight"]
        if not torch.equal(getattr(attn, f"to_{which}").weight, text_w):
            pytest.fail(f"init changed the UNet's W{which} in layer {i} ({name}): copy from the UNet's text attention into the "
                        f"adapter (W{which}′ ← W{which}); the UNet stays frozen")
        ours = getattr(adapter.layers[str(i)], f"to_{which}_ip").weight
        if torch.equal(ours, text_w):
            continue
        why = ("it holds W{0} of the same layer: K and V are swapped".format(other) if torch.equal(ours, unet_before[f"{name}.to_{other}.weight"])
               else "it was not copied: it still holds its random initialisation"
               if torch.equal(ours, adapter_before[f"layers.{i}.to_{which}_ip.weight"]) else "it holds something else")
        pytest.fail(f"layer {i} ({name}): W{which}′ must start as a copy of that layer's text W{which} ({why})")


def test_init_copies_each_layers_wk_into_its_wk_prime(unet_and_adapter):
    check_copied(*initialised(unet_and_adapter), "k")


def test_init_copies_each_layers_wv_into_its_wv_prime(unet_and_adapter):
    check_copied(*initialised(unet_and_adapter), "v")


def test_init_copies_the_weights_and_does_not_share_them(unet_and_adapter):
    """Training moves Wk′ and Wv′ (the adapter's own parameters) and must leave the frozen Wk, Wv alone."""
    unet, adapter, unet_before, _ = initialised(unet_and_adapter)
    for i, _, attn in cross_attention_layers(unet):
        for which in ("k", "v"):
            ours = getattr(adapter.layers[str(i)], f"to_{which}_ip").weight
            assert isinstance(ours, torch.nn.Parameter) and ours.requires_grad, \
                f"layer {i}: W{which}′ must stay the adapter's own trainable nn.Parameter (copy into it with .copy_())"
    with torch.no_grad():
        for p in adapter.parameters():  # what an optimizer step does to the adapter
            p.add_(1.0)
    changed = [n for n, v in unet.state_dict().items() if not torch.equal(v, unet_before[n])]
    assert not changed, (f"copy Wk into Wk′ and Wv into Wv′ (.copy_()); do not share the UNet's tensors: training the adapter "
                         f"changed the frozen UNet's {changed[0]}")


def test_init_from_text_attention_copies_wk_and_wv(unet_and_adapter):
    unet, adapter, unet_before, _ = initialised(unet_and_adapter)
    for i, name, attn in cross_attention_layers(unet):
        for which in ("k", "v"):
            ours, text = getattr(adapter.layers[str(i)], f"to_{which}_ip").weight, getattr(attn, f"to_{which}").weight
            assert torch.equal(ours, unet_before[f"{name}.to_{which}.weight"]) and torch.equal(text, unet_before[f"{name}.to_{which}.weight"]), \
                f"layer {i}: after init W{which}′ must equal the text W{which} of the same layer, and the UNet must be unchanged"
            assert ours.data_ptr() != text.data_ptr(), f"layer {i}: W{which}′ must be a copy of W{which}, not the same tensor (do not share them)"


# ─── The image projection, paper §3.2.1 (a course assignment): one test per property, then diffusers ──


def plain_projection(E=16, D=32, N=4, seed=0):
    """An ImageProjection whose LayerNorm is the plain normalisation (weight 1, bias 0): its tokens show it."""
    torch.manual_seed(seed)
    proj = ImageProjection(E, D, N)
    return proj, torch.randn(3, E)


def test_image_tokens_are_layer_normalised():
    """Each of the N tokens goes through LayerNorm over its own D features: mean 0, variance 1 before the affine part."""
    proj, x = plain_projection()
    with torch.no_grad():
        tokens = proj(x)
    mean, var = tokens.mean(-1), tokens.var(-1, unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5) and torch.allclose(var, torch.ones_like(var), atol=1e-3), (
        "each image token must go through LayerNorm over its D features (paper §3.2.1: Linear, then LayerNorm, self.norm): "
        f"with the norm's weight 1 and bias 0 every token should have mean 0 and variance 1, yours have means up to "
        f"{mean.abs().max():.3g} and variances {var.min():.3g}…{var.max():.3g}")


def test_image_token_j_is_the_jth_slice_of_the_projection():
    """The projection's N·D outputs are N tokens side by side: token j is features j·D … (j+1)·D − 1."""
    proj, x = plain_projection()
    with torch.no_grad():
        tokens, flat = proj(x), proj.proj(x)
    expected = torch.stack([proj.norm(flat[:, j * 32 : (j + 1) * 32]) for j in range(4)], dim=1)
    interleaved = proj.norm(flat.reshape(3, 32, 4).transpose(1, 2))
    name = ": yours takes every N-th feature — reshape (B, N·D) → (B, N, D), not (B, D, N) and a transpose" if torch.allclose(tokens, interleaved, atol=1e-5) else ""
    assert torch.allclose(tokens, expected, atol=1e-5), (
        f"token j must be features j·D … (j+1)·D − 1 of the projection, normalised (reshape the (B, N·D) output to (B, N, D)){name}")


def test_image_projection_keeps_leading_axes():
    """Several images arrive as (B, n_images, E) and leave as (B, n_images, N, D), each image's tokens its own."""
    proj, _ = plain_projection()
    x = torch.randn(3, 2, 16)
    rule = "keep every leading axis: (…, E) → (…, N, D) — reshape to (*image_embeds.shape[:-1], N, D), not (image_embeds.shape[0], N, D)"
    try:
        with torch.no_grad():
            tokens = proj(x)
    except RuntimeError as error:
        pytest.fail(f"{rule}; with (3, 2, E) embeddings yours fails: {error}")
    assert tokens.shape == (3, 2, 4, 32), f"{rule}; (3, 2, E) embeddings gave {tuple(tokens.shape)}, not (3, 2, 4, 32)"
    with torch.no_grad():
        assert torch.allclose(tokens[:, 1], proj(x[:, 1]), atol=1e-6), f"{rule}; image 2's tokens differ from what it gives alone"


def test_image_projection_equals_diffusers():
    """diffusers' ImageProjection (image_embeds = our proj, norm), every weight random; one image or two per sample."""
    from diffusers.models.embeddings import ImageProjection as RefImageProjection

    torch.manual_seed(1)
    ref = RefImageProjection(image_embed_dim=16, cross_attention_dim=32, num_image_text_embeds=4)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    ours = ImageProjection(16, 32, 4)
    ours.load_state_dict({k.replace("image_embeds.", "proj."): v for k, v in ref.state_dict().items()})
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:, 0]), ref(x[:, 0]), msg=lambda m: f"the image tokens differ from diffusers' ImageProjection: {m}")
        torch.testing.assert_close(ours(x).reshape(6, 4, 32), ref(x.reshape(6, 16)),
                                   msg=lambda m: f"with two images per sample the tokens differ from diffusers' ImageProjection: {m}")


def test_image_projection_gives_n_tokens_and_concatenates_several_images(unet_and_adapter):
    _, adapter = unet_and_adapter
    D = adapter.image_proj.norm.normalized_shape[0]
    assert adapter.image_tokens(torch.randn(3, 16)).shape == (3, 4, D)
    two = torch.randn(3, 2, 16)
    tokens = adapter.image_tokens(two)
    assert tokens.shape == (3, 8, D)
    torch.testing.assert_close(tokens[:, 4:], adapter.image_tokens(two[:, 1]))  # image 2 → tokens 5–8
    zero = adapter.image_tokens(torch.zeros(1, 16))  # the unconditional tokens: LayerNorm(bias), not zeros
    assert zero.abs().sum() > 0


def test_per_block_scales_follow_instantstyle_semantics():
    ours, _ = sd15_unets()
    scales = layer_scales(ours, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": 0.5}})
    assert scales["down_blocks.2.attentions.1.transformer_blocks.0.attn2"] == 1.0
    assert scales["down_blocks.2.attentions.0.transformer_blocks.0.attn2"] == 0.0
    assert all(scales[f"up_blocks.1.attentions.{j}.transformer_blocks.0.attn2"] == 0.5 for j in range(3))
    assert scales["mid_block.attentions.0.transformer_blocks.0.attn2"] == 0.0  # not mentioned → 0
    assert sum(v > 0 for v in scales.values()) == 4


@pytest.mark.parametrize(
    "scale, words",
    [
        (-0.5, "finite number >= 0"),
        (float("nan"), "finite number >= 0"),
        ({"sideways": 1.0}, "unknown group"),
        ({"down": {"block_3": 1.0}}, "no block(s) ['block_3']"),
        ({"up": {"block_1": [1.0, 0.0]}}, "expected one value or 3"),
    ],
)
def test_bad_scales_are_clear_errors(scale, words):
    ours, _ = sd15_unets()
    with pytest.raises(ValueError) as err:
        layer_scales(ours, scale)
    assert words in str(err.value)


def test_set_scale_without_adapter_is_an_error(unet_and_adapter):
    unet, _ = unet_and_adapter
    with pytest.raises(ValueError, match="no IP-Adapter is attached"):
        set_ip_scale(unet, 0.5)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", ["base", "plus", "mlp"])
def test_official_formats_load_strictly(tmp_path, unet_and_adapter, fmt, variant):
    unet, _ = unet_and_adapter
    N, options = {"base": (4, {}), "plus": (8, dict(resampler={"hidden_dim": 128})), "mlp": (3, dict(mlp=2))}[variant]
    D = unet.config.cross_attention_dim
    shapes = {k: v.shape for k, v in IPAdapter.for_unet(unet, 16, N, image_projection(16, D, N, **options)).state_dict().items()}
    state = {key: torch.randn(shapes[name]) for name, key in keymap.ip_adapter_file_keys(shapes).items()}  # official names
    path = tmp_path / f"ip.{fmt}"
    save_nested(state, path) if fmt == "bin" else save_file(state, path)
    adapter = load_ip_adapter(path, unet)
    assert adapter.plus == (variant == "plus") and isinstance(adapter.image_proj, MLPProjection) == (variant == "mlp")
    loaded = {keymap.ip_adapter_file_keys([k])[k]: v for k, v in adapter.state_dict().items()}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def _bad_adapter(tmp_path, unet, edit):
    state = {k: torch.zeros(v.shape) for k, v in IPAdapter.for_unet(unet, 16).state_dict().items()}
    state = {key: state[name] for name, key in keymap.ip_adapter_file_keys(state).items()}  # the official names
    edit(state)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    return path


def test_wrong_adapters_are_named(tmp_path, unet_and_adapter):
    unet, _ = unet_and_adapter
    D = unet.config.cross_attention_dim

    def sdxl(state):
        for k in list(state):
            if k.endswith("_ip.weight"):
                state[k] = torch.zeros(state[k].shape[0], 2048)
        state["image_proj.proj.weight"] = torch.zeros(4 * 2048, 16)
        state["image_proj.proj.bias"] = torch.zeros(4 * 2048)

    def plus(state):
        state.clear()
        state.update({"image_proj.latents": torch.zeros(1, 16, D), "image_proj.proj_in.weight": torch.zeros(D, 16),
                      "image_proj.layers.0.0.norm1.weight": torch.zeros(16)})

    def missing_layer(state):
        del state["ip_adapter.31.to_k_ip.weight"]

    def faceid_with_lora(state):  # ip-adapter-faceid_sd15: an MLP image_proj (supported) + LoRA in the attention (not)
        proj = state.pop("image_proj.proj.weight")
        state.update({"image_proj.proj.0.weight": torch.zeros(32, 16), "image_proj.proj.0.bias": torch.zeros(32),
                      "image_proj.proj.2.weight": torch.zeros(len(proj), 32), "image_proj.proj.2.bias": state.pop("image_proj.proj.bias")})
        state["ip_adapter.1.to_q_lora.down.weight"] = torch.zeros(4, D)

    def full(state):  # ip-adapter-full-face: a token-wise MLP with its LayerNorm inside `proj`
        state.update({"image_proj.proj.0.weight": torch.zeros(16, 16), "image_proj.proj.3.weight": torch.zeros(D)})

    cases = ((sdxl, "SDXL"), (plus, "IP-Adapter Plus"), (missing_layer, "ip_adapter.31.to_k_ip.weight"),
             (faceid_with_lora, "FaceID with LoRA"), (full, "IP-Adapter Full"))
    for edit, words in cases:
        with pytest.raises(WeightsError) as err:
            load_ip_adapter(_bad_adapter(tmp_path, unet, edit), unet)
        assert words in str(err.value) and "bad.safetensors" in str(err.value)


@pytest.mark.parametrize("plus", [False, True])
def test_image_features_and_no_image_equal_diffusers_encode_image(tiny_world, plus):
    """What the adapter reads (the embedding, or every patch's penultimate hidden state for Plus) and CFG's "no image"
    (a zero embedding; for Plus the features of an all-zero image) against diffusers' `encode_image`."""
    from conftest import diffusers_pipeline
    from PIL import Image

    from minipa.ip_adapter import image_features, uncond_image_features
    from minipa.preprocess import preprocess_image

    theirs = diffusers_pipeline(tiny_world, adapter="ip_safetensors")
    image = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    expected, expected_uncond = theirs.encode_image(image, "cpu", 1, output_hidden_states=plus)
    ours = load_image_encoder(tiny_world["image_encoder"])
    with torch.no_grad():
        got = image_features(ours, preprocess_image(image), plus) if plus else image_features(ours, preprocess_image(image))
        got_uncond = uncond_image_features(ours, got, plus) if plus else uncond_image_features(ours, got)  # the default: base
    assert got.shape == expected.shape and got_uncond.shape == expected_uncond.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_uncond, expected_uncond, atol=1e-4, rtol=0)
    assert got_uncond.abs().max() > 0 if plus else torch.equal(got_uncond, torch.zeros_like(got))
