"""Stage 1: the tiny CLIP — a text tower and an image tower trained so that matching (image, caption)
pairs have similar embeddings (CLIP's contrastive loss).

    image ─clip_pixels─▶ vision tower ─▶ visual_projection ─▶ u (B, P), normalised
    caption ─tokenizer─▶ text tower ─▶ pool at <|endoftext|> ─▶ text_projection ─▶ v (B, P), normalised
    logits = exp(τ)·u·vᵀ;  loss = ½·(CE(logits, T) + CE(logitsᵀ, Tᵀ))

Our captions repeat (many images share "a small red star on a blue background"), so the target T
of image i spreads evenly over every caption in the batch that *is* its caption, instead of CLIP's
one-hot diagonal. Under torchrun each process contrasts its own slice of the batch.

A second phase (stage "clip_image") locks the text tower and trains the image tower and the text
projection on. Measured here: after phase 1 the image tower told colours and sizes apart but not
circle from square or star from triangle (the ViT learns shapes slowly), and the text embeddings of
"… circle …" and "… square …" had collapsed to cosine 0.998 to match — although the text tower's
pooled features still separate the shapes (a linear probe: 99.4%). A trainable projection re-opens
that gap, and locking the tower keeps the text features the UNet is trained on unchanged.
Phase 2 also contrasts each image with *every* caption (C = 144), not only the batch's: a batch of
64 rarely holds two captions that differ only in the shape, so in-batch negatives hardly ever ask
the image tower for the shape; the full caption set always does.

What the image embedding learns is what the captions say (shape, colour, background, size), and
nothing else: this is the global embedding IP-Adapter reads (seed §3.2.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minipa.clip import CLIPTextModel, CLIPVisionModelWithProjection
from minipa.data.shapes import clip_pixels
from minipa.train.trainer import TrainingModule


class CLIPTraining(TrainingModule):
    def __init__(self, text_encoder: CLIPTextModel, image_encoder: CLIPVisionModelWithProjection,
                 images: torch.Tensor, caption_ids: torch.Tensor, caption_index: torch.Tensor):
        """images: (N, 64, 64, 3) uint8; caption_ids: (C, 77) token ids of the distinct captions;
        caption_index: (N,) which caption each image has."""
        super().__init__()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        width, dim = text_encoder.config.hidden_size, image_encoder.config.projection_dim
        self.text_projection = nn.Linear(width, dim, bias=False)  # CLIPModel's; SD does not ship it
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # τ, learned, as in CLIP
        self.images, self.caption_ids, self.caption_index = images, caption_ids, caption_index

    def freeze_text(self) -> None:
        """Phase 2: lock the text tower (the UNet is trained on its features); the image tower and the
        text projection keep learning. The text tower's pooled caption features are computed once."""
        self.text_encoder.requires_grad_(False)
        with torch.no_grad():
            self.text_pooled = self.text_encoder.pool(self.caption_ids, self.text_encoder(self.caption_ids))  # (C, D)

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        index = torch.randint(len(self.images), (size,), generator=generator)
        return {"images": self.images[index], "captions": self.caption_index[index]}

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids → (B, P) unit vectors."""
        hidden = self.text_encoder(ids)  # (B, 77, D)
        return F.normalize(self.text_projection(self.text_encoder.pool(ids, hidden)), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 64, 64, 3) uint8 → (B, P) unit vectors."""
        return F.normalize(self.image_encoder(clip_pixels(images)).image_embeds, dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self.embed_images(batch["images"])  # (B, P)
        if getattr(self, "text_pooled", None) is not None:  # phase 2: every caption is a candidate, not just the batch's
            v = F.normalize(self.text_projection(self.text_pooled), dim=-1)  # (C, P)
            logits = self.logit_scale.exp().clamp(max=100) * u @ v.T  # (B, C)
            return F.cross_entropy(logits, batch["captions"])
        v = self.embed_text(self.caption_ids[batch["captions"]])  # (B, P)
        logits = self.logit_scale.exp().clamp(max=100) * u @ v.T  # (B, B): image i vs caption j
        same = (batch["captions"][:, None] == batch["captions"][None, :]).float()  # (B, B)
        target = same / same.sum(dim=1, keepdim=True)  # symmetric pattern: rows and columns alike
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def retrieval_accuracy(training: CLIPTraining, images: torch.Tensor, caption_ids: torch.Tensor, caption_index: torch.Tensor,
                       batch: int = 256) -> float:
    """Image → caption top-1: for each image ((N, 64, 64, 3) uint8), is its own caption the closest of
    the candidate captions (`caption_ids`, (C, 77))? `caption_index` (N,) says which one is its own."""
    text = training.embed_text(caption_ids)  # (C, P)
    hits = 0
    for i in range(0, len(images), batch):
        u = training.embed_images(images[i : i + batch])
        hits += int((((u @ text.T).argmax(dim=1)) == caption_index[i : i + batch]).sum())
    return hits / len(images)
