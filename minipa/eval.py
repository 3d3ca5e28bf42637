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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minipa.data.shapes import BACKGROUNDS, HELD_OUT_TEMPLATES, ShapesDataset, clip_pixels, phrase, scene_labels, to_model_pixels
from minipa.ddim import DDIMScheduler
from minipa.ip_adapter import IPAdapter, attach_ip_adapter, image_features, uncond_image_features
from minipa.ip_scale import set_ip_scale
from minipa.pipeline import decode_latents, denoise, to_uint8
from minipa.train.classifier import ShapeClassifier, classify

FIDELITY = ("shape", "colour", "background")  # what a prompt asks for; "fidelity" = all three right


# ─── generation for evaluation: many different prompts in one batch ─────────────────────────────


@torch.no_grad()
def sample(pipe, context: torch.Tensor, uncond_context: torch.Tensor, *, image_tokens=None, uncond_image_tokens=None,
           concat: bool = False, guidance: float = 5.0, steps: int = 25, seed: int = 0) -> torch.Tensor:
    """DDIM + CFG (paper eq. 2) with a different condition per row → (B, 64, 64, 3) uint8, through the
    pipeline's own loop (`denoise`) and decode.

    context/uncond_context: (B, 77, D) text tokens; image_tokens/uncond_image_tokens: (B, N, D) or None.
    concat=True appends the image tokens to the text tokens (the ablation) instead of the image branch.
    """
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    x = torch.randn((len(context), pipe.unet.config.in_channels, size, size), generator=generator)  # x_T
    scheduler = DDIMScheduler(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    if concat and image_tokens is not None:  # the ablation: (B, 77 + N, D), read by the frozen text cross-attention
        context, uncond_context = torch.cat([context, image_tokens], dim=1), torch.cat([uncond_context, uncond_image_tokens], dim=1)
        image_tokens = uncond_image_tokens = None
    if guidance != 1:  # [unconditional; conditional] rows, as `denoise` reads them (w = 1: the conditional rows alone)
        context = torch.cat([uncond_context, context])
        image_tokens = None if image_tokens is None else torch.cat([uncond_image_tokens, image_tokens])
    x = denoise(pipe.unet, scheduler, x, context, image_tokens, guidance_scale=guidance, generator=generator)
    return to_uint8(decode_latents(pipe.vae, x))


@torch.no_grad()
def vae_reconstruction(pipe, images: torch.Tensor) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 → the same images through the VAE (encode, the posterior's mode, decode), uint8."""
    z = pipe.vae.encode(to_model_pixels(images).to(pipe.dtype)).mode()  # (B, 4, 8, 8)
    return to_uint8(decode_latents(pipe.vae, z * pipe.vae.config.scaling_factor))  # the latents as the UNet sees them: z·s


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

    def clip_t(self, images: torch.Tensor, captions: list[str]) -> float:
        """CLIP-T: the mean cosine between each generated image and its caption."""
        return float((self.image_embeds(images) * self.text_embeds(captions)).sum(-1).mean())

    def clip_i(self, images: torch.Tensor, prompt_images: torch.Tensor) -> float:
        """CLIP-I: the mean cosine between each generated image and its image prompt."""
        return float((self.image_embeds(images) * self.image_embeds(prompt_images)).sum(-1).mean())

    def match(self, images: torch.Tensor, wanted: dict[str, torch.Tensor], keys=FIDELITY) -> dict:
        predicted = classify(self.classifier, images)
        hits = {k: (predicted[k] == wanted[k]) for k in wanted}
        all_hit = torch.stack([hits[k] for k in keys]).all(dim=0)
        return {"all": float(all_hit.float().mean()), **{k: float(v.float().mean()) for k, v in hits.items()}}


# ─── the table, row by row ──────────────────────────────────────────────────────────────────────


@dataclass
class Evaluation:
    """What every row shares: the pipeline, the judge, n prompts per row, and the sampler's settings."""

    pipe: object
    judge: Judge
    n: int
    guidance: float
    steps: int
    seed: int
    empty: torch.Tensor = field(init=False)  # (n, 77, D): the empty prompt, the unconditional branch of every row

    def __post_init__(self):
        self.empty = self.pipe.encode_prompt([""] * self.n)

    def generate(self, context: torch.Tensor, guidance: float | None = None, **image_condition) -> torch.Tensor:
        """`sample` with this evaluation's settings → (n, 64, 64, 3) uint8."""
        return sample(self.pipe, context, self.empty, guidance=self.guidance if guidance is None else guidance,
                      steps=self.steps, seed=self.seed, **image_condition)

    def image_prompted(self, split: str, project, concat: bool = False, scale: float = 1.0, texts=None,
                       plus: bool = False) -> dict:
        """Generate from n image prompts of `split`: their tokens `project(features)`, with λ = `scale`
        (not for `concat`), and the text `texts(scenes)` or the empty prompt. → scenes, images, prompt_images."""
        pipe = self.pipe
        data = ShapesDataset(split, self.n, self.seed + 1)
        scenes, prompt_images = data.scenes(), data.images()
        embeds = image_features(pipe.image_encoder, clip_pixels(prompt_images).to(pipe.dtype), plus)
        tokens, uncond_tokens = project(embeds), project(uncond_image_features(pipe.image_encoder, embeds, plus))
        if not concat:
            set_ip_scale(pipe.unet, scale)
        context = self.empty if texts is None else pipe.encode_prompt(texts(scenes))
        images = self.generate(context, image_tokens=tokens, uncond_image_tokens=uncond_tokens, concat=concat)
        return {"scenes": scenes, "images": images, "prompt_images": prompt_images}


@torch.no_grad()
def evaluate(pipe, eval_file, *, n: int = 64, guidance: float = 5.0, steps: int = 25, seed: int = 0, concat_proj=None,
             plus_adapter=None) -> dict:
    """The table: every row measured on n held-out prompts or images. Returns a JSON-able dict.
    `concat_proj` (the ablation's image_proj) and `plus_adapter` (an IP-Adapter Plus) add image-prompt rows."""
    run = Evaluation(pipe, Judge(pipe, eval_file), n, guidance, steps, seed)
    rows = text_to_image_rows(run)
    rows.update(phrasing_rows(run))
    if pipe.ip_adapter is not None:
        variants = {"ip_adapter": (pipe.ip_adapter, False)}
        if concat_proj is not None:
            variants["concat_ablation"] = (concat_proj, True)
        if plus_adapter is not None:
            variants["ip_adapter_plus"] = (plus_adapter, False)
        image_rows, examples = image_prompt_rows(run, variants)
        rows.update(image_rows)
        rows["_examples"].update(examples)
        rows["text_plus_image_0.5"] = text_plus_image_row(run)
    rows.update(reference_rows(run))
    return rows


def text_to_image_rows(run: Evaluation) -> dict:
    """Text → image on held-out combinations, with λ = 0 (plain SD): fidelity and CLIP-T; 8 examples."""
    scenes = ShapesDataset("heldout", run.n, run.seed + 2).scenes()
    prompts = [s.caption for s in scenes]
    if run.pipe.ip_adapter is not None:
        set_ip_scale(run.pipe.unet, 0.0)  # λ = 0: plain SD
    images = run.generate(run.pipe.encode_prompt(prompts))
    row = {**run.judge.match(images, scene_labels(scenes)), "clip_t": run.judge.clip_t(images, prompts)}
    return {"text_to_image_heldout": row, "_examples": {"text_to_image": images[:8]}}


def phrasing_rows(run: Evaluation) -> dict:
    """Text → image on new images of the trained combinations, in words other than the caption form: the caption
    without the size ("a red circle on a blue background", what people type), and the held-out templates (word
    orders training never shows, half of them without the size too), also word order by word order
    ("text_to_image_test_new_phrasings/background_first", …). The caption form itself is
    `text_only_reference_test`, on the same scenes and noise."""
    scenes = ShapesDataset("test", run.n, run.seed + 1).scenes()
    held_out = list(HELD_OUT_TEMPLATES)
    prompts = {
        "text_to_image_test_without_size": [phrase(s.shape, s.colour, s.background, s.size, omit=("size",)) for s in scenes],
        "text_to_image_test_new_phrasings": [phrase(s.shape, s.colour, s.background, s.size, held_out[i % len(held_out)],
                                                    omit=("size",) if i % 2 else ()) for i, s in enumerate(scenes)],
    }
    if run.pipe.ip_adapter is not None:
        set_ip_scale(run.pipe.unet, 0.0)  # λ = 0: plain SD
    rows, labels = {}, scene_labels(scenes)
    for name, texts in prompts.items():
        images = run.generate(run.pipe.encode_prompt(texts))
        rows[name] = {**run.judge.match(images, labels), "clip_t": run.judge.clip_t(images, [s.caption for s in scenes])}
    for k, template in enumerate(held_out):  # the new phrasings' images (generated last), by word order
        these = torch.arange(k, len(scenes), len(held_out))
        if len(these):
            rows[f"text_to_image_test_new_phrasings/{template}"] = run.judge.match(images[these], {a: v[these] for a, v in labels.items()})
    return rows


def image_prompt_rows(run: Evaluation, variants: dict) -> tuple[dict, dict]:
    """Image prompt only (empty text, λ = 1) on test and held-out images, for each variant name → (image_proj
    or IPAdapter, concat). An IPAdapter brings its own image branch (the UNet's weights stay shared); the
    pipeline's own adapter is attached again at the end. → (rows, examples)."""
    rows, examples = {}, {}
    for name, (project, concat) in variants.items():
        plus = isinstance(project, IPAdapter) and project.plus
        if isinstance(project, IPAdapter):
            attach_ip_adapter(run.pipe.unet, project)
            project = project.image_tokens
        for split in ("test", "heldout"):
            r = run.image_prompted(split, project, concat, plus=plus)
            images, scenes = r["images"], r["scenes"]
            rows[f"{name}_image_only_{split}"] = {**run.judge.match(images, scene_labels(scenes)),
                                                  "clip_i": run.judge.clip_i(images, r["prompt_images"]),
                                                  "clip_t": run.judge.clip_t(images, [s.caption for s in scenes])}
            if name == "ip_adapter" and split == "test":
                examples = {"image_only": images[:8], "image_prompts": r["prompt_images"][:8]}
    attach_ip_adapter(run.pipe.unet, run.pipe.ip_adapter)
    return rows, examples


def other_backgrounds(scenes) -> list[str]:
    """For each scene, the next background in palette order that is neither its background nor its shape's colour."""
    new = [next(b for b in BACKGROUNDS[i + 1 :] + BACKGROUNDS[: i + 1] if b not in (s.background, s.colour))
           for s, i in ((s, BACKGROUNDS.index(s.background)) for s in scenes)]
    return [f"on a {b} background" for b in new]


def text_plus_image_row(run: Evaluation) -> dict:
    """Text + image, λ = 0.5: shape and colour from the image prompt, the background from the text (another one)."""
    r = run.image_prompted("test", run.pipe.ip_adapter.image_tokens, scale=0.5, texts=other_backgrounds)
    wanted = scene_labels(r["scenes"])
    wanted["background"] = torch.tensor([BACKGROUNDS.index(t.split()[2]) for t in other_backgrounds(r["scenes"])])
    row = run.judge.match(r["images"], {k: wanted[k] for k in FIDELITY})
    set_ip_scale(run.pipe.unet, 1.0)
    return row


def reference_rows(run: Evaluation) -> dict:
    """What the other rows compare with, on the test images: the ceiling the VAE sets (real images encoded and
    decoded, judged like generated ones), the caption itself (text only, λ = 0), and no condition at all."""
    data = ShapesDataset("test", run.n, run.seed + 1)
    scenes, real = data.scenes(), data.images()
    labels = scene_labels(scenes)
    rows = {"vae_reconstruction_test": run.judge.match(vae_reconstruction(run.pipe, real), labels)}
    adapter = run.pipe.ip_adapter
    if adapter is not None:
        set_ip_scale(run.pipe.unet, 0.0)
    images = run.generate(run.pipe.encode_prompt([s.caption for s in scenes]))
    rows["text_only_reference_test"] = {**run.judge.match(images, labels), "clip_i": run.judge.clip_i(images, real)}
    images = run.generate(run.empty, guidance=1.0)
    rows["unconditional_test"] = run.judge.match(images, labels)
    if adapter is not None:
        set_ip_scale(run.pipe.unet, 1.0)
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
