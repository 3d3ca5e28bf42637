"""The judge of evaluation: a small CNN that reads shape, colour, background, size and pattern off a
64×64 image. It is trained here, on *real* dataset images only (never on generated ones), so that
`minipa/eval.py` can score what the generator draws with a judge that is independent of it.

Its training shows half the images with their RGB channels shuffled (`shuffle_channels`), and there
only the colour-blind heads learn: the shape is read from the outline, not from the colours it was seen in.
The `clip_shapes` stage (`train/clip.py`) borrows the same trick for the image tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minipa.data.shapes import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, SIZES, to_model_pixels
from minipa.train.trainer import TrainingModule, gather

HEADS = {"shape": len(SHAPES), "colour": len(COLOURS), "background": len(BACKGROUNDS), "size": len(SIZES),
         "pattern": len(PATTERNS)}
COLOUR_HEADS = ("colour", "background")
NOISE_STD = 0.05  # training augmentation: generated images are never pixel-perfect
RECOLOUR = 0.5  # training augmentation: the share of images shown with their RGB channels shuffled (below)
CHANNEL_ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def shuffle_channels(pixels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → the same images with their channels in `CHANNEL_ORDERS[order]` ((B,) indices)."""
    return pixels.gather(1, CHANNEL_ORDERS.to(order.device)[order][:, :, None, None].expand_as(pixels))


class ShapeClassifier(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] → logits for each attribute in HEADS. Four stride-2 convolutions, 64 → 4,
    then average and max pooling over positions (a shape means the same thing anywhere in the image)."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 2 * width, 2 * width)
        layers = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(chans[-1] * 2, n) for name, n in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixels)  # (B, 2w, 4, 4)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 4w): where the shape is does not matter
        return {name: head(h) for name, head in self.heads.items()}


class ClassifierTraining(TrainingModule):
    """Cross-entropy on every head. Half the images have their RGB channels shuffled, and there only the
    colour-blind heads (shape, size, pattern) learn: without it the judge learned shapes *with* their
    colours, and read the large green circles on purple of a held-out combination as squares 21% of the time."""

    def __init__(self, classifier: ShapeClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]):
        super().__init__()
        self.classifier, self.images, self.labels = classifier, images, labels

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        index = torch.randint(len(self.images), (size,), generator=generator)
        return {"index": index, "noise": NOISE_STD * torch.randn((size, 3, *self.images.shape[1:3]), generator=generator),
                "recolour": torch.rand(size, generator=generator) < RECOLOUR,
                "order": torch.randint(len(CHANNEL_ORDERS), (size,), generator=generator)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = to_model_pixels(gather(self.images, batch["index"]))  # (B, 3, H, W)
        shuffled = shuffle_channels(pixels, batch["order"])
        recolour = batch["recolour"]
        logits = self.classifier(torch.where(recolour[:, None, None, None], shuffled, pixels) + batch["noise"])
        coloured = (~recolour).float()
        colour_weight = coloured / coloured.sum().clamp(min=1)  # colour, background: images in their true colours only
        every_weight = torch.full_like(coloured, 1 / len(coloured))  # shape, size, pattern: every image
        loss = 0
        for k in HEADS:
            per_image = F.cross_entropy(logits[k], gather(self.labels[k], batch["index"]), reduction="none")
            loss = loss + (per_image * (colour_weight if k in COLOUR_HEADS else every_weight)).sum()
        return loss


@torch.no_grad()
def classify(classifier: ShapeClassifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 64, 64, 3) uint8 → predicted class index per attribute, each (B,)."""
    logits = classifier(to_model_pixels(images))
    return {k: v.argmax(dim=1) for k, v in logits.items()}


def classifier_accuracy(classifier: ShapeClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    predicted = classify(classifier, images)
    return {k: float((predicted[k] == labels[k]).float().mean()) for k in HEADS}
