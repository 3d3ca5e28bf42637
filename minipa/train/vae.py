"""Stage 2: the tiny SD VAE — reconstruct 64×64 images through an 8×8×4 latent.

    loss = (Σ |x − x̂| + Σ (x − x̂)²  +  β·Σ KL(q(z|x) ‖ N(0, I))) / (B·3·H·W),   β = 1e-6
    KL per latent element = ½·(μ² + σ² − 1 − log σ²)

β is LDM's KL weight in its own convention (sums over pixels and latents, per image): just enough
to keep the latents near N(0, I) scale without blurring. The UNet later trains on z·s, with the
scaling factor s = 1/std(z) measured on the training set, as LDM chose SD's 0.18215.
"""

from __future__ import annotations

import torch

from minipa.data.shapes import to_model_pixels
from minipa.train.trainer import TrainingModule
from minipa.vae import AutoencoderKL

KL_WEIGHT = 1e-6


class VAETraining(TrainingModule):
    def __init__(self, vae: AutoencoderKL, images: torch.Tensor, kl_weight: float = KL_WEIGHT):
        super().__init__()
        self.vae, self.images, self.kl_weight = vae, images, kl_weight
        side = images.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_shape = (vae.config.latent_channels, side, side)

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        index = torch.randint(len(self.images), (size,), generator=generator)
        noise = torch.randn((size, *self.latent_shape), generator=generator)  # for z = μ + σ·ε
        return {"images": self.images[index], "noise": noise}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = to_model_pixels(batch["images"])  # (B, 3, 64, 64) in [-1, 1]
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * batch["noise"]  # (B, 4, 8, 8)
        error = x - self.vae.decode(z)
        kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1 - posterior.logvar)
        return (error.abs().sum() + (error**2).sum() + self.kl_weight * kl.sum()) / x.numel()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 64, 64, 3) uint8 → the posterior's (mean, std), each (N, 4, 8, 8), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(to_model_pixels(images[i : i + batch]))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> float:
    """Mean PSNR (dB) of mode reconstructions, pixels in [0, 1]."""
    values = []
    for i in range(0, len(images), batch):
        x = to_model_pixels(images[i : i + batch])
        x_hat = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        mse = (((x - x_hat) / 2) ** 2).flatten(1).mean(dim=1)
        values.append(-10 * torch.log10(mse.clamp(min=1e-10)))
    return float(torch.cat(values).mean())
