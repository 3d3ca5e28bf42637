"""Key-name rules between checkpoint formats and minipa's modules. No model imports here.

minipa's parameter names mirror diffusers/transformers, so those formats map by identity.
Other formats (the original LDM single-file checkpoint) go through short rule tables, and a
test proves each table covers every key of the full-size models. (Writing LDM files, the
inverse rules, is `train/export.py`'s job.)
"""

from __future__ import annotations


def place(file_keys, rule, prefix: str = "") -> tuple[dict[str, str], list[str]]:
    """Apply a key rule to a file: (names: minipa parameter name → file key, unmatched file keys).

    Keys outside `prefix` belong to other models of a single-file checkpoint and are skipped; `rule(key)`
    (prefix removed) gives the parameter name, or None. A key no rule places, or a second key for the
    same parameter, is unmatched: the loader reports both.
    """
    names, unmatched = {}, []
    for key in file_keys:
        if not key.startswith(prefix):
            continue
        name = rule(key[len(prefix):])
        if name is None or name in names:
            unmatched.append(key)
        else:
            names[name] = key
    return names, unmatched


def identity(file_keys) -> tuple[dict[str, str], list[str]]:
    """diffusers and transformers files: every file key is minipa's parameter name."""
    return place(file_keys, lambda key: key)


# ─── UNet: original LDM single-file checkpoint ↔ diffusers / minipa ─────────────────────────────
#
# LDM numbers the encoder as one flat list `input_blocks.{i}` and the decoder as `output_blocks.{i}`;
# diffusers groups them by resolution level. With L = layers_per_block (2 in SD 1.x):
#   input_blocks.0.0                      ↔ conv_in
#   input_blocks.{1 + b(L+1) + l}.0 / .1  ↔ down_blocks.{b}.resnets.{l} / .attentions.{l}    (l < L)
#   input_blocks.{1 + b(L+1) + L}.0.op    ↔ down_blocks.{b}.downsamplers.0.conv
#   middle_block.0 / .1 / .2              ↔ mid_block.resnets.0 / .attentions.0 / .resnets.1
#   output_blocks.{b(L+1) + l}.0 / .1     ↔ up_blocks.{b}.resnets.{l} / .attentions.{l}      (l ≤ L)
#   output_blocks.{b(L+1) + L}.{1|2}.conv ↔ up_blocks.{b}.upsamplers.0.conv  (.1 without attention, .2 with)
# Inside a transformer (attention) the names are the same in both formats; inside a resnet they are
# renamed by `LDM_RESNET_PARTS`.

LDM_UNET_PREFIX = "model.diffusion_model."

LDM_RESNET_PARTS = {  # LDM ResBlock ↔ diffusers ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
LDM_UNET_TOP = {  # whole-model layers outside the blocks
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
LDM_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
LDM_SLOTS = {"0": "resnets", "1": "attentions"}  # inside input/output_blocks.{i}: the resnet, then the attention


def swap_prefix(key: str, table: dict[str, str]) -> str | None:
    """Replace the longest table entry that `key` starts with (at a dot boundary); None if none does."""
    for old in sorted(table, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return table[old] + key[len(old):]
    return None


def _ldm_unet_key_to_diffusers(key: str, layers_per_block: int) -> str | None:
    """One LDM UNet key (prefix removed) → its diffusers name, or None if no rule applies."""
    top = swap_prefix(key, LDM_UNET_TOP)
    if top is not None:
        return top
    parts = key.split(".")
    if parts[0] == "middle_block" and len(parts) > 2 and parts[1] in LDM_MIDDLE:
        return _block_part(f"mid_block.{LDM_MIDDLE[parts[1]]}", ".".join(parts[2:]))
    if len(parts) < 4 or not parts[1].isdigit():
        return None
    group, i, part, rest = parts[0], int(parts[1]), parts[2], ".".join(parts[3:])
    per_level = layers_per_block + 1
    if group == "input_blocks" and i > 0:
        b, l = divmod(i - 1, per_level)
        if l == layers_per_block:  # the last slot of a level holds its downsampler
            return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}" if part == "0" and rest.startswith("op.") else None
        return _block_part(f"down_blocks.{b}.{LDM_SLOTS[part]}.{l}", rest) if part in LDM_SLOTS else None
    if group == "output_blocks":
        b, l = divmod(i, per_level)
        if rest.startswith("conv.") and part in ("1", "2"):  # an Upsample: `.1` after a resnet, `.2` after an attention
            return f"up_blocks.{b}.upsamplers.0.{rest}" if l == layers_per_block else None
        return _block_part(f"up_blocks.{b}.{LDM_SLOTS[part]}.{l}", rest) if part in LDM_SLOTS else None
    return None


def _block_part(name: str, rest: str) -> str | None:
    """`name` (a resnet or attention inside a block) + the rest of the key, renaming resnet parts."""
    if ".resnets." in name:
        rest = swap_prefix(rest, LDM_RESNET_PARTS)
    return None if rest is None else f"{name}.{rest}"


def ldm_unet_names(
    file_keys, layers_per_block: int = 2, prefix: str = LDM_UNET_PREFIX
) -> tuple[dict[str, str], list[str]]:
    """Place the UNet keys of an LDM single-file checkpoint.

    Returns (names, unmatched): names maps each diffusers/minipa parameter name to its file key;
    unmatched lists the UNet keys (those under `prefix`) no rule could place. Keys outside `prefix`
    (the VAE, the text encoder, EMA copies, schedule buffers) belong to other models and are skipped.
    """
    return place(file_keys, lambda key: _ldm_unet_key_to_diffusers(key, layers_per_block), prefix)


def unet_names(file_keys, layers_per_block: int = 2) -> tuple[dict[str, str], list[str]]:
    """A UNet single file: LDM names (`model.diffusion_model.*`) through the rules above, diffusers names as they are."""
    file_keys = list(file_keys)
    if any(k.startswith(LDM_UNET_PREFIX) for k in file_keys):
        return ldm_unet_names(file_keys, layers_per_block)
    return identity(file_keys)


# ─── What is this file? A guess for error messages ─────────────────────────────────────────────


def describe_checkpoint(shapes: dict[str, tuple]) -> str:
    """Guess which model a checkpoint holds from its key names and shapes, for `load_weights(describe=…)`.

    Returns a short phrase such as "an SDXL UNet (has add_embedding)"; it is a hint, not a verdict.
    """
    keys = list(shapes)
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_UNET_PREFIX)}
        names, _ = ldm_unet_names(unet, prefix="")
        inner = _describe_unet({name: unet[key] for name, key in names.items()}, has_extra="label_emb.0.0.weight" in unet)
        return f"an LDM single-file checkpoint (model.diffusion_model.*) holding {inner}"
    if "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in keys):
        if any(k.startswith("encoder.") for k in keys) or any(k.startswith("decoder.") for k in keys):
            return "an SD VAE (encoder/decoder)"
        return _describe_unet(shapes, has_extra=any(k.startswith("add_embedding.") for k in keys))
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.")) for k in keys):
        return "an SD VAE (encoder/decoder)"
    if any(k.startswith(("text_model.", "cond_stage_model.", "embeddings.token_embedding.")) for k in keys):
        return "a CLIP text encoder" + _clip_size(shapes, "embeddings.token_embedding.weight", ".self_attn.q_proj.weight")
    if any(k.startswith("vision_model.") for k in keys):
        return "a CLIP vision (image) encoder" + _clip_size(shapes, "embeddings.class_embedding", ".self_attn.q_proj.weight")
    if any(k.startswith(("image_proj.", "ip_adapter.")) or "to_k_ip" in k for k in keys):
        return "an IP-Adapter"
    sample = ", ".join(keys[:3]) or "no tensors at all"
    return f"not a model minipa recognises ({len(keys)} tensors, e.g. {sample})"


def _describe_unet(shapes: dict[str, tuple], has_extra: bool) -> str:
    """Tell the UNets apart: SDXL (extra embedding), SD 2.x (1024-wide text), inpainting (9 input channels), SD 1.x."""
    if has_extra:
        return "an SDXL UNet (has add_embedding)"
    widths = sorted({shape[1] for k, shape in shapes.items() if k.endswith("attn2.to_k.weight")})
    in_channels = shapes["conv_in.weight"][1] if "conv_in.weight" in shapes else None
    if widths == [1024]:
        return "an SD 2.x UNet (cross-attention width 1024)"
    if in_channels == 9:
        return "an inpainting UNet (9 input channels)"
    width = shapes["conv_in.weight"][0] if "conv_in.weight" in shapes else "?"
    text = ", ".join(map(str, widths)) or "?"
    return f"an SD 1.x-style UNet ({in_channels} input channels, {width} channels at the first level, cross-attention width {text})"


# ─── CLIP text and vision encoders ↔ transformers / LDM ─────────────────────────────────────────
#
# minipa's CLIP modules carry transformers' names, so the rules are prefixes only:
#   text_model.X                              (transformers 4 files, SD 1.5's text_encoder/)  ↔ text_model.X
#   X = embeddings.* | encoder.* | final_layer_norm.*   (transformers 5 saves CLIPTextModel flat) ↔ text_model.X
#   cond_stage_model.transformer.text_model.X (LDM single file)                              ↔ text_model.X
#   vision_model.X, visual_projection.X       (CLIPVisionModelWithProjection)                ↔ the same
# `position_ids` is a constant (0, 1, 2, …) that older transformers saved as a buffer; minipa
# computes it in forward, so that file key is skipped by name (and only that one).

LDM_TEXT_PREFIX = "cond_stage_model.transformer."
_CLIP_TEXT_FLAT = ("embeddings.", "encoder.", "final_layer_norm.")
_CLIP_SKIPPED_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def clip_text_names(file_keys) -> tuple[dict[str, str], list[str]]:
    """Place the keys of a CLIP text-encoder file (transformers 4/5 or LDM single file).

    Returns (names: minipa parameter → file key, unmatched file keys). In an LDM file only the
    keys under `cond_stage_model.transformer.` are the text encoder's; the rest are skipped.
    """
    file_keys = list(file_keys)
    prefix = LDM_TEXT_PREFIX if any(k.startswith(LDM_TEXT_PREFIX) for k in file_keys) else ""
    rule = lambda key: "text_model." + key if key.startswith(_CLIP_TEXT_FLAT) else key  # noqa: E731
    kept = [k for k in file_keys if rule(k.removeprefix(prefix)) not in _CLIP_SKIPPED_BUFFERS]  # a constant, not a weight
    return place(kept, rule, prefix)


def clip_vision_names(file_keys) -> tuple[dict[str, str], list[str]]:
    """Place the keys of a transformers CLIPVisionModelWithProjection file (identity, minus position_ids)."""
    return identity(k for k in file_keys if k not in _CLIP_SKIPPED_BUFFERS)


def _clip_size(shapes: dict[str, tuple], width_key: str, layer_key: str) -> str:
    """" (hidden 1280, 32 layers)" for a CLIP tower, read off the shapes (for describe_checkpoint)."""
    width = next((shape[-1] for k, shape in shapes.items() if k.endswith(width_key)), "?")
    layers = len({k for k in shapes if k.endswith(layer_key)})
    return f" (hidden {width}, {layers} layers)"


# ─── VAE: original LDM (`first_stage_model.*`) ↔ diffusers / minipa ──────────────────────────────
#
# The same network under other names. Renames of dotted pieces, applied in this order (both ways):
LDM_VAE_RENAMES = [  # (LDM, diffusers)
    ("mid.block_1", "mid_block.resnets.0"),
    ("mid.block_2", "mid_block.resnets.1"),
    ("mid.attn_1.norm", "mid_block.attentions.0.group_norm"),
    ("mid.attn_1.q", "mid_block.attentions.0.to_q"),  # LDM's q/k/v/proj_out are 1×1 convs, diffusers'
    ("mid.attn_1.k", "mid_block.attentions.0.to_k"),  # are Linear layers: same numbers, shape (C, C, 1, 1)
    ("mid.attn_1.v", "mid_block.attentions.0.to_v"),  # vs (C, C); weights.load_weights accepts both
    ("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0"),
    ("norm_out", "conv_norm_out"),
    ("nin_shortcut", "conv_shortcut"),
    ("downsample.conv", "downsamplers.0.conv"),
    ("upsample.conv", "upsamplers.0.conv"),
    ("block", "resnets"),
]
# …and the levels: encoder.down.{i} ↔ encoder.down_blocks.{i}, but the decoder is numbered from the
# bottom in LDM: decoder.up.{levels − 1 − i} ↔ decoder.up_blocks.{i}.
LDM_VAE_PREFIX = "first_stage_model."


def rename_pieces(key: str, pairs) -> str:
    dotted = f".{key}."
    for old, new in pairs:
        dotted = dotted.replace(f".{old}.", f".{new}.")
    return dotted[1:-1]


def renumber_levels(key: str, levels: int, to_diffusers: bool) -> str:
    """encoder.down.{i} ↔ encoder.down_blocks.{i}, decoder.up.{levels−1−i} ↔ decoder.up_blocks.{i}; other keys as they are."""
    # BEGIN ASSIGNMENT 17
    down, up = ("down", "down_blocks"), ("up", "up_blocks")
    for side, (ldm, ours) in (("encoder", down), ("decoder", up)):
        src, dst = (ldm, ours) if to_diffusers else (ours, ldm)
        head = f"{side}.{src}."
        if key.startswith(head):
            level, rest = key[len(head):].split(".", 1)
            level = int(level) if side == "encoder" else levels - 1 - int(level)
            return f"{side}.{dst}.{level}.{rest}"
    return key
    # END ASSIGNMENT 17


def ldm_vae_names(file_keys, levels: int = 4, prefix: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Place the VAE keys of an LDM checkpoint: (names: minipa parameter → file key, unmatched file keys).

    `prefix` defaults to "first_stage_model." when the file has it (SD single file), else "" (a
    standalone LDM VAE such as vae-ft-mse-840000). Keys outside the prefix belong to other models.
    """
    file_keys = list(file_keys)
    if prefix is None:
        prefix = LDM_VAE_PREFIX if any(k.startswith(LDM_VAE_PREFIX) for k in file_keys) else ""
    return place(file_keys, lambda key: renumber_levels(rename_pieces(key, LDM_VAE_RENAMES), levels, to_diffusers=True), prefix)


# ─── IP-Adapter files ─────────────────────────────────────────────────────────────────────────────
# The official files name the image branch of cross-attention layer i `ip_adapter.{i}.*`; minipa's
# IPAdapter keeps those pairs in `layers`. `image_proj.*` is the same in both.

def ip_adapter_names(file_keys) -> tuple[dict[str, str], list[str]]:
    """(names: minipa IPAdapter parameter → official file key, unmatched file keys): `ip_adapter.{i}.…` ↔ `layers.{i}.…`."""
    return place(file_keys, lambda key: swap_prefix(key, {"ip_adapter": "layers", "image_proj": "image_proj"}))


def ip_adapter_file_keys(names) -> dict[str, str]:
    """The inverse rule, for writing official files: minipa name → file key."""
    return {name: swap_prefix(name, {"layers": "ip_adapter", "image_proj": "image_proj"}) for name in names}


IP_ADAPTER_FAMILY = ("an IP-Adapter for SD 1.x (base: image_proj = Linear + LayerNorm, or FaceID's MLP + LayerNorm; "
                     "Plus: a Resampler; to_k_ip/to_v_ip per cross-attention layer)")


def describe_ip_adapter(shapes: dict[str, tuple]) -> str:
    """A guess at which IP-Adapter variant a file holds, from its key names and shapes."""
    keys = list(shapes)
    if any("perceiver" in k for k in keys):
        return "an IP-Adapter FaceID Plus (an MLP and a Resampler over face embeddings), which minipa does not support"
    if "image_proj.proj.3.weight" in shapes:
        return "an IP-Adapter Full (an MLP over every patch feature), which minipa does not support"
    if any("_lora." in k for k in keys):
        return "an IP-Adapter FaceID with LoRA weights for the UNet's attention, which minipa does not support"
    widths = {shape[1] for k, shape in shapes.items() if k.endswith("to_k_ip.weight")}
    if widths == {2048}:
        return "an IP-Adapter for SDXL (2048-wide text tokens)"
    if not any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return "not an IP-Adapter (no image_proj./ip_adapter. keys)"
    variant = ("an IP-Adapter Plus (a Resampler in image_proj)" if "image_proj.latents" in shapes else
               "an IP-Adapter with an MLP image projection (FaceID's layout)" if "image_proj.proj.0.weight" in shapes else "an IP-Adapter")
    return f"{variant} whose image branch takes {sorted(widths)}-wide tokens"


def resampler_options(shapes: dict[str, tuple], D: int) -> tuple[int, int, dict] | None:
    """(E, N, Resampler options) read from an IP-Adapter Plus file's shapes; None if they do not fit."""
    latents, proj_in, q, ff = (shapes.get(f"image_proj.{k}") for k in ("latents", "proj_in.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"))
    if None in (latents, proj_in, q, ff) or len(latents) != 3 or shapes.get("image_proj.proj_out.weight", (None,))[0] != D:
        return None
    hidden = latents[2]
    depth = len({k.split(".")[2] for k in shapes if k.startswith("image_proj.layers.")})
    heads, head_dim = (q[0] // 64, 64) if q[0] % 64 == 0 else (1, q[0])  # the official heads are 64 wide
    return proj_in[1], latents[1], dict(hidden_dim=hidden, depth=depth, heads=heads, head_dim=head_dim, ff_mult=ff[0] // hidden)


def projection_sizes(shapes: dict[str, tuple], D: int, prefix: str = "image_proj.") -> tuple[int, int, int | None] | None:
    """(E, N, m) of an `image_projection` read from its weights' shapes (m None for the Linear one), or None
    if the shapes under `prefix` are neither layout with D-wide tokens.
    Linear: `proj.weight` is (N·D, E). MLP: `proj.0.weight` is (m·E, E), `proj.2.weight` (N·D, m·E)."""
    proj, hidden, out = (shapes.get(f"{prefix}proj{k}.weight") for k in ("", ".0", ".2"))
    if proj is not None and len(proj) == 2 and proj[0] % D == 0:
        return proj[1], proj[0] // D, None
    if (hidden is not None and out is not None and len(hidden) == len(out) == 2 and hidden[0] % hidden[1] == 0
            and out[1] == hidden[0] and out[0] % D == 0):
        return hidden[1], out[0] // D, hidden[0] // hidden[1]
    return None
