"""Stage 4: the IP-Adapter, with the paper's recipe (paper §3.2): everything but the adapter frozen.

Trainable: image_proj (Linear + LayerNorm → N tokens; an MLP instead with `WorldConfig.ip_mlp`) and
Wk′, Wv′ of every cross-attention layer, initialised from Wk, Wv (`IPAdapter.init_from_text_attention`).
AdamW with weight decay 0.01.
The loss is paper eq. 1 again, now with both conditions: ‖ε − ε_θ(x_t, c_t, c_i, t)‖².

The text is one phrasing of the image's caption, drawn as the UNet's stage draws them (`UNetTraining.own_caption`).
Conditions are dropped at random, so that both guidance branches exist at inference:
the image (zero embedding → image_proj(0)), the text (the empty caption), or both.
The paper drops each 5% of the time. Its captions say little of what the image shows, so the image
carries information in nearly every sample; ours say almost everything, and with the text present
the image adds only what captions never mention. So, besides the paper's rates, the tiny world's
recipe drops the text more often (`text_drop`), giving the adapter samples where it must carry the
image alone; the model card reports this choice.

`variant="concat"` is the ablation the paper argues against: the image tokens are appended to the
text tokens and go through the *frozen* text cross-attention (only image_proj is trained).
"""

from __future__ import annotations

import torch

from minipa.ip_adapter import IPAdapter, attach_ip_adapter
from minipa.train.unet import DiffusionData, UNetTraining
from minipa.unet import UNet2DConditionModel

VARIANTS = ("decoupled", "concat")


class IPAdapterTraining(UNetTraining):
    def __init__(self, unet: UNet2DConditionModel, adapter: IPAdapter, data: DiffusionData, *,
                 image_drop: float = 0.05, text_drop: float = 0.05, both_drop: float = 0.05, variant: str = "decoupled"):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(data, DiffusionData) and data.image_embeds is None:
            raise ValueError("IP-Adapter training needs DiffusionData.image_embeds")
        if image_drop + text_drop + both_drop > 1:
            raise ValueError(f"drop rates add up to more than 1: {image_drop} + {text_drop} + {both_drop}")
        super().__init__(unet, data, adapter=adapter)  # the adapter owns Wk′/Wv′, shared with the UNet: named adapter.*
        self.rates = (image_drop, text_drop, both_drop)
        self.variant = variant
        unet.requires_grad_(False)
        adapter.requires_grad_(True)
        if variant == "decoupled":
            attach_ip_adapter(unet, adapter, scale=1.0)
        else:
            adapter.layers.requires_grad_(False)  # unused: the frozen text K/V read the image tokens

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        """The shared draw (images, t, ε, u), then which condition each sample drops: image, text, both or none."""
        b = self.draw(generator, size)
        b["caption"] = self.own_caption(generator, b["index"])  # one phrasing of each image's caption, unless dropped below
        # BEGIN ASSIGNMENT 16
        image_drop, text_drop, both_drop = self.rates
        u = b["u"]
        drop_image = (u < image_drop) | ((u >= image_drop + text_drop) & (u < image_drop + text_drop + both_drop))
        drop_text = (u >= image_drop) & (u < image_drop + text_drop + both_drop)
        b["caption"] = torch.where(drop_text, self.data.empty, b["caption"])
        b["keep_image"] = (~drop_image).float()
        return b
        # END ASSIGNMENT 16

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        mean, std, text, embeds = self.data.rows(b["index"], b["caption"])  # text (B, 77, D); embeds (B, E) or (B, L, E)
        uncond = self.data.uncond_image_embeds
        keep = b["keep_image"].view(-1, *[1] * (embeds.ndim - 1))
        # a dropped image is what inference uses for "no image": a zero embedding, or the features of a zero image (Plus)
        embeds = embeds * keep if uncond is None else torch.where(keep > 0, embeds, uncond.to(embeds.device))
        tokens = self.adapter.image_tokens(embeds)  # (B, N, D)
        if self.variant == "decoupled":
            return self.denoising_loss(b, mean, std, text, image_tokens=tokens)
        return self.denoising_loss(b, mean, std, torch.cat([text, tokens], dim=1))  # the frozen text K/V read the image tokens
