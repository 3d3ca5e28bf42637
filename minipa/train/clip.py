"""Stage 1: the tiny CLIP — a text tower and an image tower trained so that matching (image, caption)
pairs have similar embeddings (CLIP's contrastive loss).

    image ─clip_pixels─▶ vision tower ─▶ visual_projection ─▶ u (B, P), normalised
    caption ─tokenizer─▶ text tower ─▶ pool at <|endoftext|> ─▶ text_projection ─▶ v (B, P), normalised
    logits = exp(τ)·u·vᵀ;  loss = ½·(CE(logits, T) + CE(logitsᵀ, Tᵀ))

Our captions repeat (many images share "a small red star on a blue background"), so the target T
of image i spreads evenly over every caption in the batch that *is* its caption, instead of CLIP's
one-hot diagonal. Under torchrun each process contrasts its own slice of the batch.

A second phase (stage "clip_image") contrasts each image with *every* caption (C = 144), not only
the batch's: a batch rarely holds two captions that differ only in the shape, so in-batch negatives
hardly ever ask for the shape; the full caption set always does. Measured here: after phase 1 the
image tower told colours and sizes apart but not circle from square or star from triangle (the ViT
learns shapes slowly), and the text tower had followed it — the hidden states of "… circle …" and
"… square …" at the shape word had cosine 0.995. Both towers keep training in phase 2, so the text
tower separates the shapes again as the image tower learns them: the UNet reads these hidden states,
and with the text tower locked after phase 1 (our first recipe) it drew the right pair (round or
pointed) but a coin toss within it.
A third phase (stage "clip_shapes", `ShapeTraining` below) trains the image tower alone, so that it keeps
the shape apart from the colours. A fourth (stage "clip_words", `WordTraining`) trains the text tower alone on
the UNet's phrasings, so that each noun's state says which colour and size go with it: the text tower the
UNet reads is what phase 4 left.
Captions are encoded only up to the longest one's <|endoftext|>: the text tower is causal, so the
states there do not depend on the padding after it (the same numbers, a fraction of the work).

Captions come in other words too (`Phrasings` in data/shapes.py), but the tiny world's recipe shows phases 1–3
the captions alone: the phrasings are phase 4's, the UNet's and the adapter's. With `phrasings` (WorldConfig.clip_phrasings)
each image is also shown one other word order of its caption per step in phases 1 and 2 ("small red star, blue
background", "a blue background with a small red star"), and in phase 2 the batch's phrasings join the C
captions as candidates. That cost the image tower shapes, and every image-prompt row followed (weights/HISTORY.md,
recipe v9); phrasings that leave attributes out ("on a blue background") cost more: one fits every image whose
attributes it names, the target spreads over all of those (v9's first run: phase 2's top-1 70.7%).

What the image embedding learns is what the captions say (shape, colour, background, size), and
nothing else: this is the global embedding IP-Adapter reads (paper §3.2.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minipa.clip import CLIPTextModel, CLIPVisionModelWithProjection
from minipa.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_TEMPLATES,
    OMISSIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Phrasings,
    all_combos,
    clip_normalise,
    clip_resize,
    held_out_combos,
    phrase,
)
from minipa.train.classifier import CHANNEL_ORDERS, shuffle_channels
from minipa.train.trainer import TrainingModule, gather


class CLIPTraining(TrainingModule):
    def __init__(self, text_encoder: CLIPTextModel, image_encoder: CLIPVisionModelWithProjection,
                 pixels: torch.Tensor, caption_ids: torch.Tensor, caption_index: torch.Tensor,
                 phrasings: Phrasings | None = None, phrasing_ids: torch.Tensor | None = None):
        """pixels: (N, 3, 224, 224) uint8, the training images through `clip_resize` (resized once, 150 kB
        an image: the bicubic resize to 224 was a third of every step); caption_ids: (C, 77) token ids of
        the distinct captions; caption_index: (N,) which caption each image has. With `phrasings` (and their
        token ids, (P, 77)) each image is also shown one phrasing of its caption per step (`Phrasings`)."""
        super().__init__()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        width, dim = text_encoder.config.hidden_size, image_encoder.config.projection_dim
        self.text_projection = nn.Linear(width, dim, bias=False)  # CLIPModel's; SD does not ship it
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # τ, learned, as in CLIP
        self.pixels = pixels
        ids = caption_ids if phrasing_ids is None else torch.cat([caption_ids, phrasing_ids])
        longest = int(text_encoder.end_positions(ids).max()) + 1  # the tower is causal, so the padding changes nothing
        self.caption_ids = caption_ids[:, :longest]  # (C, L)
        self.caption_index = caption_index
        self.phrasings = phrasings
        if phrasings is not None:
            self.phrasing_ids = phrasing_ids[:, :longest]  # (P, L)
            self.image_attributes = phrasings.attributes[phrasings.index[:, 0]]  # (N, 4): phrasing 0 leaves nothing out
        self.every_caption = False  # phase 2, set by contrast_with_every_caption

    def contrast_with_every_caption(self) -> None:
        """Phase 2: each image against all C captions (not only the batch's); both towers train."""
        self.every_caption = True

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        """Indices, not pixels: under torchrun each process gathers only the images of its own slice."""
        index = torch.randint(len(self.pixels), (size,), generator=generator)
        b = {"index": index, "captions": self.caption_index[index]}
        if self.phrasings is not None:
            k = torch.multinomial(self.phrasings.probs, size, replacement=True, generator=generator)
            b["phrasing"] = self.phrasings.index[index, k]
        return b

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids → (B, P) unit vectors."""
        hidden = self.text_encoder(ids)  # (B, L, D)
        return F.normalize(self.text_projection(self.text_encoder.pool(ids, hidden)), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 64, 64, 3) uint8 → (B, P) unit vectors."""
        return self.embed_pixels(clip_resize(images))

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) uint8, already resized → (B, P) unit vectors."""
        return F.normalize(self.image_encoder(clip_normalise(pixels)).image_embeds, dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(τ), capped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=100)

    def every_caption_logits(self, u: torch.Tensor) -> torch.Tensor:
        """(B, P) image embeddings → (B, C) logits against every caption (phases 2 and 3)."""
        return self.scale() * u @ self.embed_text(self.caption_ids.to(u.device)).T

    def candidates(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts the batch's images are contrasted with, (C′, L) token ids, and which of them fit each
        image, (B, C′) bool. Phase 1: the batch's own captions (or phrasings); phase 2: every caption, and the
        batch's phrasings. A phrasing fits every image whose attributes it names (a left-out one fits any)."""
        captions = batch["captions"]
        if self.every_caption:
            texts = self.caption_ids.to(captions.device)
            fits = captions[:, None] == torch.arange(len(texts), device=captions.device)[None, :]
        else:
            texts, fits = gather(self.caption_ids, captions), captions[:, None] == captions[None, :]
        if self.phrasings is None:
            return texts, fits
        named = gather(self.phrasings.attributes, batch["phrasing"])  # (B, 4), −1 = left out
        image = gather(self.image_attributes, batch["index"])  # (B, 4)
        fits_phrasing = ((named[None] == image[:, None]) | (named[None] < 0)).all(dim=-1)  # (B images, B phrasings)
        phrasings = gather(self.phrasing_ids, batch["phrasing"])
        if self.every_caption:
            return torch.cat([texts, phrasings]), torch.cat([fits, fits_phrasing], dim=1)
        return phrasings, fits_phrasing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self.embed_pixels(gather(self.pixels, batch["index"]))  # (B, P)
        texts, fits = self.candidates(batch)
        logits = self.scale() * u @ self.embed_text(texts).T  # (B, C′): image i vs text j
        fits = fits.float()
        loss = F.cross_entropy(logits, fits / fits.sum(dim=1, keepdim=True))  # the target spreads over every text that fits
        if self.every_caption:  # phase 2: image → text only, every caption a candidate
            return loss
        return 0.5 * (loss + F.cross_entropy(logits.T, fits.T / fits.T.sum(dim=1, keepdim=True)))  # phase 1: both ways


class ShapeTraining(CLIPTraining):
    """Phase 3 (stage "clip_shapes"): the image tower alone learns the shape apart from the colours.

    After phase 2 the image embedding holds the shape only together with the colour pair it was seen in:
    a linear map reads the shape of held-out combinations at chance (weights/HISTORY.md). Here the text
    tower, its projection and τ are frozen, and each batch is the phase-2 loss (each image against every
    caption) plus a share of other images shown with their RGB channels shuffled (the judge's trick,
    `train/classifier.py`) against 8 learned (shape, size) prototypes; those images' colours are no guide to
    their shape, so the tower has to find the shape in the outline. The text tower, and so the UNet
    trained on it, are what phase 2 left; only the image encoder (and the adapter on top of it) change.
    """

    def __init__(self, *args, shape_size: torch.Tensor, every: int = 2):
        """shape_size: (N,) the class 2·shape + size of each training image; every: one shuffled copy per
        `every` rows of a batch (rows 0, every, 2·every, …: the same rows whether or not torchrun splits it)."""
        super().__init__(*args)
        self.contrast_with_every_caption()
        self.shape_size, self.every = shape_size, every
        self.prototypes = nn.Parameter(torch.randn(int(shape_size.max()) + 1, self.image_encoder.config.projection_dim) * 0.02)
        for p in (*self.text_encoder.parameters(), self.text_projection.weight, self.logit_scale):
            p.requires_grad_(False)

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        b = super().batch(generator, size)
        b["other"] = torch.randint(len(self.pixels), (size,), generator=generator)  # the images shown shuffled
        b["order"] = torch.randint(len(CHANNEL_ORDERS), (size,), generator=generator)
        return b

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B = len(batch["index"])
        other = batch["other"][:: self.every]
        shuffled = shuffle_channels(gather(self.pixels, other), batch["order"][:: self.every])  # (S, 3, 224, 224)
        u = self.embed_pixels(torch.cat([gather(self.pixels, batch["index"]), shuffled]))  # (B + S, P)
        captions = F.cross_entropy(self.every_caption_logits(u[:B]), batch["captions"])  # the text side is frozen
        shapes = F.cross_entropy(self.scale() * u[B:] @ F.normalize(self.prototypes, dim=-1).T, gather(self.shape_size, other))
        return captions + shapes


class WordTraining(TrainingModule):
    """Phase 4 (stage "clip_words"): the text tower alone learns which words go together, in any word order.

    Phases 1–3 show the text tower the caption form only, and contrast its pooled state: nothing asks the state
    of "star" to say that the star is red. The UNet then reads colours by position ("the first colour is the
    shape's"), which is right in the caption form and wrong once the background comes first (weights/HISTORY.md,
    recipe v13). Here each step draws the training phrasings (`Phrasings`, the UNet's mix) and asks linear heads
    to read, at the shape's noun, the shape, its colour and size and, at "background", the background's colour
    (`binding_labels`); plus phase 2's loss (each image against every caption, the image tower frozen and its
    embeddings computed once), so that the text projection still fits. The image tower does not change.
    """

    def __init__(self, text_encoder: CLIPTextModel, text_projection: torch.Tensor, logit_scale: torch.Tensor,
                 image_embeds: torch.Tensor, caption_ids: torch.Tensor, caption_index: torch.Tensor,
                 phrasings: Phrasings, phrasing_ids: torch.Tensor, labels: torch.Tensor):
        """image_embeds: (N, P) unit vectors of the training images (the frozen image tower); caption_ids (C, L),
        caption_index (N,) as in `CLIPTraining`; phrasing_ids (P′, L) and their `labels` (P′, L, 4)."""
        super().__init__()
        self.text_encoder = text_encoder
        width = text_encoder.config.hidden_size
        self.text_projection = nn.Linear(width, text_projection.shape[0], bias=False)
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().reshape(()), requires_grad=False)
        with torch.no_grad():
            self.text_projection.weight.copy_(text_projection)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in (len(SHAPES), len(COLOURS), len(BACKGROUNDS), len(SIZES)))
        longest = labels.shape[1]
        self.image_embeds, self.caption_index = image_embeds, caption_index
        self.caption_ids, self.phrasing_ids, self.labels = caption_ids[:, :longest], phrasing_ids[:, :longest], labels
        self.phrasings = phrasings

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        index = torch.randint(len(self.image_embeds), (size,), generator=generator)
        k = torch.multinomial(self.phrasings.probs, size, replacement=True, generator=generator)
        return {"index": index, "phrasing": self.phrasings.index[index, k]}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.text_encoder(gather(self.phrasing_ids, batch["phrasing"]))  # (B, L, D)
        labels = gather(self.labels, batch["phrasing"])  # (B, L, 4), −1 where a token names nothing
        binding = sum(F.cross_entropy(head(hidden).flatten(0, 1), labels[..., j].flatten(), ignore_index=-1, reduction="sum")
                      / (labels[..., j] >= 0).sum().clamp(min=1) for j, head in enumerate(self.heads))
        ids = self.caption_ids.to(hidden.device)
        text = F.normalize(self.text_projection(self.text_encoder.pool(ids, self.text_encoder(ids))), dim=-1)  # (C, P)
        u = gather(self.image_embeds, batch["index"])
        captions = F.cross_entropy(self.logit_scale.exp().clamp(max=100) * u @ text.T, gather(self.caption_index, batch["index"]))
        return binding + captions


def binding_labels(vocab: dict[str, int], phrasings: Phrasings, ids: torch.Tensor) -> torch.Tensor:
    """(P, L, 4): for each token of the phrasings' ids ((P, L), from a tokenizer with this `vocab`), the (shape,
    colour, background, size) class it carries, −1 elsewhere. The shape's noun (or "shape") carries the shape, its
    colour and size; "background" carries the background colour, and where a phrasing names no "background" ("a
    red star on blue", "on blue, a red star") the colour word after "on" does."""
    word = {w: vocab[w + "</w>"] for w in (*SHAPES, "shape", *COLOURS, "background")}
    labels = torch.full((*ids.shape, 4), -1)
    shape, colour, background, size = phrasings.attributes.unbind(-1)  # (P,) each, −1 = left out
    noun = torch.isin(ids, torch.tensor([word[w] for w in (*SHAPES, "shape")]))
    rows = noun.nonzero()[:, 0]
    for j, value in ((0, shape), (1, colour), (3, size)):
        labels[..., j][noun] = value[rows]
    after_on = torch.isin(ids, torch.tensor([word[c] for c in COLOURS])) & (ids.roll(1, dims=1) == vocab["on</w>"])
    said = ids == word["background"]
    at = torch.where(said.any(1), said.int().argmax(1), after_on.int().argmax(1))
    named = background >= 0
    labels[named.nonzero()[:, 0], at[named], 2] = background[named]
    return labels


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


class Reader(nn.Module):
    """What `word_order_check` trains: learned queries attend over text states, as a UNet's cross-attention reads
    them (one multi-head attention), and a linear head per attribute reads (shape, colour, background) off them."""

    def __init__(self, width: int, queries: int = 8, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.1)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(queries * width, n) for n in (len(SHAPES), len(COLOURS), len(BACKGROUNDS)))

    def forward(self, states: torch.Tensor) -> list[torch.Tensor]:
        read, _ = self.attention(self.queries.expand(len(states), -1, -1), states, states)
        return [head(read.flatten(1)) for head in self.heads]


def word_order_check(encode, steps: int = 1500, seeds: int = 3) -> dict[str, float]:
    """Do the text tower's states let a reader learn the scene in the training word orders and read it in the held-out
    ones? `encode`: prompts → (n, 77, D) states (the tower and its tokenizer). A `Reader` trains on the trained
    combinations in every training phrasing (an attribute left out is not asked for), then reads the same
    combinations in each held-out word order, every attribute named. → {word order: fraction with shape, colour and
    background all right}, the mean of `seeds` readers. A minute's proxy for the UNet's new-phrasing rows: on recipe
    v12's tower it read 3% and 0.2% of the two orders that name the background first, where that UNet drew 9% and 6%."""
    combos = [(s, c, b, z) for s, c, b in all_combos() if (s, c, b) not in held_out_combos() for z in SIZES]
    wanted = torch.tensor([[SHAPES.index(s), list(COLOURS).index(c), BACKGROUNDS.index(b)] for s, c, b, _ in combos])
    asked = ("shape", "colour", "background")
    with torch.no_grad():
        states = torch.cat([encode([phrase(*k, t, omit) for k in combos]) for t in TEMPLATES for omit in OMISSIONS]).float()
        held_out = {t: encode([phrase(*k, t) for k in combos]).float() for t in HELD_OUT_TEMPLATES}
    labels = torch.cat([wanted.masked_fill(torch.tensor([a in omit for a in asked]), -100) for _ in TEMPLATES for omit in OMISSIONS])
    scores = dict.fromkeys(held_out, 0.0)
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            reader = Reader(states.shape[-1])
        optimizer = torch.optim.Adam(reader.parameters(), lr=3e-3)
        for _ in range(steps):
            rows = torch.randint(len(states), (128,), generator=generator)
            loss = sum(F.cross_entropy(logits, labels[rows, j], ignore_index=-100) for j, logits in enumerate(reader(states[rows])))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for t, x in held_out.items():
                read = torch.stack([logits.argmax(-1) for logits in reader(x)], dim=-1)
                scores[t] += float((read == wanted).all(dim=-1).float().mean()) / seeds
    return scores
