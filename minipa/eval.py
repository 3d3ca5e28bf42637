"""Evaluating the tiny world: the paper's Table 1 in miniature.

Two judges, both independent of the generator:
- `ShapeClassifier` (`minipa/train/classifier.py`), a small CNN trained on *real* dataset images (never on
  generated ones), reads shape, colour, background, size and pattern off a 64×64 image. "Fidelity" = the
  generated image has the requested shape, colour and background (all three);
- the tiny CLIP: CLIP-T = cos(generated image, caption) and CLIP-I = cos(generated image, image
  prompt) with the tiny CLIP's embeddings, the paper's two columns.

Rows: text-to-image on held-out prompts; image prompt only (empty text, λ = 1) on held-out images;
text + image (λ = 0.5: shape and colour from the image, background from the text); the stripes that
no caption mentions (transfer rate vs chance); and the paper's ablation — the same adapter budget
spent on concatenating image tokens to the text tokens in the frozen cross-attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minipa.data.shapes import BACKGROUNDS, ShapesDataset, clip_pixels, scene_labels, to_model_pixels
from minipa.ddim import DDIMScheduler
from minipa.guidance import classifier_free_guidance
from minipa.ip_adapter import IPAdapter, attach_ip_adapter, image_features, uncond_image_features
from minipa.ip_scale import set_ip_scale
from minipa.train.classifier import ShapeClassifier, classify

# ─── generation for evaluation: many different prompts in one batch ─────────────────────────────


@torch.no_grad()
def sample(pipe, context: torch.Tensor, uncond_context: torch.Tensor, *, image_tokens=None, uncond_image_tokens=None,
           concat: bool = False, guidance: float = 5.0, steps: int = 25, seed: int = 0) -> torch.Tensor:
    """DDIM + CFG (paper eq. 2) with a different condition per row → (B, 64, 64, 3) uint8.

    context/uncond_context: (B, 77, D) text tokens; image_tokens/uncond_image_tokens: (B, N, D) or None.
    concat=True appends the image tokens to the text tokens (the ablation) instead of the image branch.
    """
    B = len(context)
    size = pipe.unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((B, pipe.unet.config.in_channels, size, size), generator=generator)
    scheduler = DDIMScheduler(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    both_context = torch.cat([uncond_context, context])
    tokens = None if image_tokens is None else torch.cat([uncond_image_tokens, image_tokens])
    if concat and tokens is not None:
        both_context, tokens = torch.cat([both_context, tokens], dim=1), None
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = pipe.unet(torch.cat([x, x]), t, both_context, image_tokens=tokens).chunk(2)
        x = scheduler.step(classifier_free_guidance(eps_uncond, eps_cond, guidance), t, x).prev_sample  # ε̂ = ε_u + w·(ε_c − ε_u)
    pixels = pipe.vae.decode(x / pipe.vae.config.scaling_factor)
    return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class Judge:
    """The classifier and the tiny CLIP's two projections, read from `eval.safetensors`."""

    def __init__(self, pipe, eval_file: str | Path):
        from minipa.weights import Checkpoint

        ckpt = Checkpoint(eval_file)
        self.pipe = pipe
        self.classifier = ShapeClassifier()
        state = {k.removeprefix("classifier."): ckpt.tensor(k).float() for k in ckpt.keys() if k.startswith("classifier.")}
        self.classifier.load_state_dict(state, strict=True)
        self.classifier.eval()
        self.text_projection = ckpt.tensor("text_projection.weight").float()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pipe.image_encoder(clip_pixels(images)).image_embeds.float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        ids = self.pipe.tokenizer(prompts)
        pooled = self.pipe.text_encoder.pool(ids, self.pipe.text_encoder(ids))
        return F.normalize(pooled.float() @ self.text_projection.T, dim=-1)

    def match(self, images: torch.Tensor, wanted: dict[str, torch.Tensor], keys=("shape", "colour", "background")) -> dict:
        predicted = classify(self.classifier, images)
        hits = {k: (predicted[k] == wanted[k]) for k in wanted}
        all_hit = torch.stack([hits[k] for k in keys]).all(dim=0)
        return {"all": float(all_hit.float().mean()), **{k: float(v.float().mean()) for k, v in hits.items()}}


@torch.no_grad()
def evaluate(pipe, eval_file, *, n: int = 64, guidance: float = 5.0, steps: int = 25, seed: int = 0, concat_proj=None,
             plus_adapter=None) -> dict:
    """The table: every row measured on n held-out prompts or images. Returns a JSON-able dict.
    `concat_proj` (the ablation's image_proj) and `plus_adapter` (an IP-Adapter Plus) add image-prompt rows."""
    judge = Judge(pipe, eval_file)
    adapter = pipe.ip_adapter
    empty = pipe.encode_prompt([""] * n)
    rows = {}

    def image_prompt_row(split: str, project, concat=False, scale=1.0, texts=None, plus=False) -> dict:
        data = ShapesDataset(split, n, seed + 1)
        scenes, prompt_images = data.scenes(), data.images()
        embeds = image_features(pipe.image_encoder, clip_pixels(prompt_images).to(pipe.dtype), plus)
        tokens, uncond_tokens = project(embeds), project(uncond_image_features(pipe.image_encoder, embeds, plus))
        if not concat:
            set_ip_scale(pipe.unet, scale)
        context = empty if texts is None else pipe.encode_prompt(texts(scenes))
        images = sample(pipe, context, empty, image_tokens=tokens, uncond_image_tokens=uncond_tokens, concat=concat,
                        guidance=guidance, steps=steps, seed=seed)
        return {"scenes": scenes, "images": images, "prompt_images": prompt_images}

    # text → image, held-out combinations
    data = ShapesDataset("heldout", n, seed + 2)
    scenes = data.scenes()
    prompts = [s.caption for s in scenes]
    if adapter is not None:
        set_ip_scale(pipe.unet, 0.0)  # λ = 0: plain SD
    images = sample(pipe, pipe.encode_prompt(prompts), empty, guidance=guidance, steps=steps, seed=seed)
    labels = scene_labels(scenes)
    rows["text_to_image_heldout"] = {**judge.match(images, labels),
                                     "clip_t": float((judge.image_embeds(images) * judge.text_embeds(prompts)).sum(-1).mean())}
    rows["_examples"] = {"text_to_image": images[:8]}

    if adapter is not None:
        variants = {"ip_adapter": (adapter, False)}
        if concat_proj is not None:
            variants["concat_ablation"] = (concat_proj, True)
        if plus_adapter is not None:
            variants["ip_adapter_plus"] = (plus_adapter, False)
        for name, (project, concat) in variants.items():
            plus = isinstance(project, IPAdapter) and project.plus
            if isinstance(project, IPAdapter):
                attach_ip_adapter(pipe.unet, project)  # its own image branch (the UNet's weights stay shared)
                project = project.image_tokens
            for split in ("test", "heldout"):
                r = image_prompt_row(split, project, concat, plus=plus)
                labels = scene_labels(r["scenes"])
                match = judge.match(r["images"], labels)
                clip_i = float((judge.image_embeds(r["images"]) * judge.image_embeds(r["prompt_images"])).sum(-1).mean())
                clip_t = float((judge.image_embeds(r["images"]) * judge.text_embeds([s.caption for s in r["scenes"]])).sum(-1).mean())
                rows[f"{name}_image_only_{split}"] = {**match, "clip_i": clip_i, "clip_t": clip_t}
                if name == "ip_adapter" and split == "test":
                    rows["_examples"]["image_only"] = r["images"][:8]
                    rows["_examples"]["image_prompts"] = r["prompt_images"][:8]

        attach_ip_adapter(pipe.unet, adapter)  # the pipeline's own adapter again

        # text + image, λ = 0.5: shape and colour from the image, background from the text
        def other_background(scenes):  # the next background in palette order that is neither the image's nor its shape's colour
            new = [next(b for b in BACKGROUNDS[i + 1 :] + BACKGROUNDS[: i + 1] if b not in (s.background, s.colour))
                   for s, i in ((s, BACKGROUNDS.index(s.background)) for s in scenes)]
            return [f"on a {b} background" for b in new]

        r = image_prompt_row("test", adapter.image_tokens, scale=0.5, texts=other_background)
        wanted = scene_labels(r["scenes"])
        wanted["background"] = torch.tensor([BACKGROUNDS.index(t.split()[2]) for t in other_background(r["scenes"])])
        rows["text_plus_image_0.5"] = judge.match(r["images"], {k: wanted[k] for k in ("shape", "colour", "background")})
        set_ip_scale(pipe.unet, 1.0)

    # reference rows: the caption itself (text only) on the same held-out test images, and no condition at all
    data = ShapesDataset("test", n, seed + 1)
    scenes = data.scenes()
    # the ceiling the VAE sets: real test images, encoded and decoded, judged like generated ones
    decoded = pipe.vae.decode(pipe.vae.encode(to_model_pixels(data.images()).to(pipe.dtype)).mode())
    decoded = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    rows["vae_reconstruction_test"] = judge.match(decoded, scene_labels(scenes))
    if adapter is not None:
        set_ip_scale(pipe.unet, 0.0)
    images = sample(pipe, pipe.encode_prompt([s.caption for s in scenes]), empty, guidance=guidance, steps=steps, seed=seed)
    clip_i = float((judge.image_embeds(images) * judge.image_embeds(data.images())).sum(-1).mean())
    rows["text_only_reference_test"] = {**judge.match(images, scene_labels(scenes)), "clip_i": clip_i}
    images = sample(pipe, empty, empty, guidance=1.0, steps=steps, seed=seed)
    rows["unconditional_test"] = judge.match(images, scene_labels(scenes))
    if adapter is not None:
        set_ip_scale(pipe.unet, 1.0)
    return rows


def save_examples(rows: dict, path: str | Path) -> None:
    """One PNG: the example rows (text→image; image prompts; what the image prompts gave), 8 each."""
    from PIL import Image

    strips = [np.concatenate(list(v.numpy()), axis=1) for v in rows["_examples"].values()]
    Image.fromarray(np.concatenate(strips, axis=0)).save(path)


def format_table(rows: dict, settings: dict) -> str:
    """The rows as a Markdown table (fractions as percentages)."""
    lines = [f"Settings: {json.dumps(settings)}", "", "| row | shape+colour+background | shape | colour | background | pattern | CLIP-T | CLIP-I |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        cell = lambda k: f"{100 * r[k]:.1f}%" if k in r else "–"  # noqa: E731
        num = lambda k: f"{r[k]:.3f}" if k in r else "–"  # noqa: E731
        lines.append(f"| {name} | {cell('all')} | {cell('shape')} | {cell('colour')} | {cell('background')} | {cell('pattern')} "
                     f"| {num('clip_t')} | {num('clip_i')} |")
    return "\n".join(lines)
