"""Stage 3: the tiny UNet, trained with the ε-loss of paper eq. 1 on frozen VAE latents and frozen
tiny-CLIP text features.

    z  = s·(μ + σ·ε_z)                         a fresh sample of q(z|x), scaled (s = vae scaling_factor)
    t  ~ U{0, …, T−1},  ε ~ N(0, I)
    x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε                   (paper eq. 1, `add_noise`)
    L  = ‖ε − ε_θ(x_t, c, t)‖²                  (paper eq. 1, `diffusion_loss`)

c is the text tokens of one phrasing of the caption (`Phrasings`: another word order, some attributes
left out, "red star, blue background"), so that a prompt need not be in the caption form, and a prompt
may leave part of the image to an image prompt ("on a blue background"); 10% of the time it is the
empty caption's, so that the same network also predicts ε_θ(x_t, t) for classifier-free guidance (paper eq. 2).
With `caption_steps`, the first steps show the caption form alone (a curriculum: the UNet learns to compose
shape, colour and background from one wording first, then the other wordings).
The VAE and the text encoder are frozen: their outputs are computed once, before training
(`DiffusionData`), which is most of what makes this stage affordable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minipa.ddpm import NoiseSchedule, add_noise, diffusion_loss
from minipa.train.trainer import TrainingModule, gather
from minipa.unet import UNet2DConditionModel

EMPTY_CAPTION_RATE = 0.1


@dataclass
class DiffusionData:
    """Frozen-model outputs for every training image, computed once."""

    latent_mean: torch.Tensor  # (N, 4, 8, 8), unscaled
    latent_std: torch.Tensor  # (N, 4, 8, 8)
    scaling_factor: float
    text: torch.Tensor  # (C + 1, 77, D): the text tokens of each distinct caption or phrasing; the last row is ""
    caption_index: torch.Tensor  # (N,) row of `text` with each image's caption
    image_embeds: torch.Tensor | None = None  # (N, E) tiny-CLIP image embeddings, or (N, L, E) patch features (Plus)
    uncond_image_embeds: torch.Tensor | None = None  # (E,) or (L, E): what a dropped image becomes; None = zeros
    phrasing_index: torch.Tensor | None = None  # (N, K): rows of `text` with the K phrasings of each image's caption
    phrasing_probs: torch.Tensor | None = None  # (K,): how often each is drawn

    @property
    def empty(self) -> int:
        return len(self.text) - 1

    @property
    def num_images(self) -> int:
        return len(self.latent_mean)

    @property
    def latent_shape(self) -> torch.Size:
        return self.latent_mean.shape[1:]

    def rows(self, index: torch.Tensor, caption: torch.Tensor):
        """The frozen models' outputs for a batch: the latent posterior (mean, std) of images `index`, the text
        tokens of captions `caption` and the image features of images `index` (None without them). The tables
        stay in host memory; the rows go to the device of `index`."""
        embeds = None if self.image_embeds is None else gather(self.image_embeds, index)
        return gather(self.latent_mean, index), gather(self.latent_std, index), gather(self.text, caption), embeds


class UNetTraining(TrainingModule):
    def __init__(self, unet: UNet2DConditionModel, data: DiffusionData, empty_caption_rate: float = EMPTY_CAPTION_RATE,
                 caption_steps: int = 0, **owners: nn.Module):
        """`caption_steps`: how many steps show each image its caption alone, before its phrasings are drawn.
        `owners`: modules registered before the UNet, that own parameters it shares (see `TrainingModule`)."""
        super().__init__(**owners)
        if not 0 <= empty_caption_rate <= 1:
            raise ValueError(f"empty_caption_rate must be in [0, 1], got {empty_caption_rate}")
        if type(caption_steps) is not int or caption_steps < 0:
            raise ValueError(f"caption_steps must be a whole number ≥ 0, got {caption_steps!r}")
        self.unet, self.data = unet, data
        self.empty_caption_rate = empty_caption_rate
        self.caption_steps = caption_steps
        self.step = 0  # the step being drawn, which `fit` tells `at_step`
        self.alphas_cumprod = NoiseSchedule().alphas_cumprod  # SD 1.5's schedule (scaled_linear, T = 1000)

    def draw(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        """The randomness every diffusion stage shares: images, posterior noise, t, ε."""
        d = self.data
        index = torch.randint(d.num_images, (size,), generator=generator)
        return {
            "index": index,
            "latent_noise": torch.randn((size, *d.latent_shape), generator=generator),
            "t": torch.randint(len(self.alphas_cumprod), (size,), generator=generator),
            "noise": torch.randn((size, *d.latent_shape), generator=generator),
            "u": torch.rand(size, generator=generator),  # decides which conditions are dropped
        }

    def at_step(self, step: int) -> None:
        self.step = step

    def own_caption(self, generator: torch.Generator, index: torch.Tensor) -> torch.Tensor:
        """The row of `text` each image `index` is shown with: one of its phrasings, drawn as often as
        `phrasing_probs` says (its caption, when the data has no phrasings or in the first `caption_steps`)."""
        if self.data.phrasing_index is None or self.step < self.caption_steps:
            return self.data.caption_index[index]
        which = torch.multinomial(self.data.phrasing_probs, len(index), replacement=True, generator=generator)
        return self.data.phrasing_index[index, which]

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        """The shared draw; then u < empty rate: the empty caption, else one phrasing of the image's caption."""
        b = self.draw(generator, size)
        caption = self.own_caption(generator, b["index"])
        b["caption"] = torch.where(b["u"] < self.empty_caption_rate, self.data.empty, caption)
        return b

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        mean, std, text, _ = self.data.rows(b["index"], b["caption"])
        return self.denoising_loss(b, mean, std, text)

    def denoising_loss(self, b: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor, text: torch.Tensor,
                       image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One training step's loss, paper eq. 1: a fresh latent z of each image, noised to x_t at the batch's t with
        the batch's ε, the UNet's ε_θ(x_t, c, t), and ‖ε − ε_θ‖². mean, std: the latent posterior q(z|x) of the batch's
        images (B, 4, h, w), unscaled; text: the caption tokens c (B, 77, D); image_tokens: the IP-Adapter's (B, N, D)
        or None (the adapter's stage calls this too). b holds the step's draw: "latent_noise" ε_z and "noise" ε
        (B, 4, h, w), "t" (B,)."""
        # BEGIN ASSIGNMENT 4
        z = self.data.scaling_factor * (mean + std * b["latent_noise"])  # z = s·(μ + σ·ε_z): a fresh sample of q(z|x)
        x_t = add_noise(z, b["noise"], b["t"], self.alphas_cumprod)  # x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε   (paper eq. 1)
        eps = self.unet(x_t, b["t"], text, image_tokens=image_tokens)  # ε_θ(x_t, c, t)
        return diffusion_loss(eps, b["noise"])  # ‖ε − ε_θ(x_t, c, t)‖²   (paper eq. 1)
        # END ASSIGNMENT 4
