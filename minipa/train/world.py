"""The tiny world from nothing: one command trains CLIP → VAE → UNet → IP-Adapter and writes weights/tiny.

    python -m minipa.train --out weights/tiny --work runs/tiny          # or: minipa train …
    torchrun --nproc_per_node 2 -m minipa.train --out … --work …        # the same, data-parallel

Each stage reads the models it freezes back from `--out` through minipa's own loaders (the fp16
files that ship), so every later stage trains against exactly the weights users get. Stage state
lives in `--work`: `<stage>/checkpoint.pt` (atomic, resumable) and `<stage>/done.json` (metrics and
training time). `--resume` skips finished stages and continues an interrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from minipa.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from minipa.data.shapes import (
    Phrasings,
    ShapesDataset,
    caption_table,
    clip_pixels,
    clip_resize,
    describe_domain,
    scene_labels,
    tiny_tokenizer,
)
from minipa.ddpm import ScheduleConfig
from minipa.ip_adapter import IPAdapter, image_features, uncond_image_features
from minipa.loading import load_image_encoder, load_text_encoder, load_tokenizer, load_unet, load_vae
from minipa.projections import image_projection
from minipa.train import export
from minipa.train.classifier import ClassifierTraining, ShapeClassifier, classifier_accuracy
from minipa.train.clip import CLIPTraining, ShapeTraining, WordTraining, binding_labels, retrieval_accuracy, word_order_check
from minipa.train.ip_adapter import IPAdapterTraining
from minipa.train.trainer import Compute, Schedule, distributed, fit, split_rows
from minipa.train.unet import DiffusionData, UNetTraining
from minipa.train.vae import VAETraining, encode_all, psnr
from minipa.unet import UNetConfig
from minipa.vae import VAEConfig
from minipa.weights import sha256_of

STAGES = ("clip", "clip_image", "clip_shapes", "clip_words", "vae", "vae_refine", "unet", "ip", "classifier")  # what ships; `minipa train` runs these by default
EXTRA_STAGES = ("ablation", "ip_plus")  # experiments for the model card, run on request
CLIP_STAGES = ("clip", "clip_image", "clip_shapes", "clip_words")  # the stages that read the training images resized for CLIP
GPU_SAMPLES = 4  # the gpu preset: this many times the UNet's and the adapter's steps
PLUS_FILE = "ip-adapter-plus.safetensors"  # the ip_plus experiment's output, in --work (not shipped)
EVAL_FILE = "eval.safetensors"  # CLIP's text projection and the evaluation classifier (not part of SD)


@dataclass
class WorldConfig:
    """Every size and budget of the tiny world. `tiny()` is the recipe `minipa train` runs (weights/README.md says
    which recipe made the shipped files); `gpu()` gives it more samples; `smoke()` is for tests."""

    seed: int = 0
    train_images: int = 10_000
    eval_images: int = 512  # held-out images for each stage's own check (retrieval, PSNR, classifier accuracy)
    text: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(
        vocab_size=len(tiny_tokenizer().vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=64))
    vision: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=224, patch_size=28,
        projection_dim=64))
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64))
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        block_out_channels=(64, 128, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16, sample_size=8))
    ip_tokens: int = 4
    ip_mlp: int | None = None  # None: the paper's Linear image_proj; m: an MLP with a hidden layer m·E wide (FaceID's layout)
    ip_plus_tokens: int = 16  # IP-Adapter Plus (the `ip_plus` experiment): the official 16 Resampler queries
    text_drop: float = 0.45  # see minipa/train/ip_adapter.py: the paper's 0.05 starves the adapter here
    clip_phrasings: bool = False  # CLIP phases 1–2 shown other word orders too (they cost the towers shapes: weights/HISTORY.md)
    clip_schedule: Schedule = field(default_factory=lambda: Schedule(steps=300, batch_size=128, lr=2e-3, weight_decay=0.1))
    clip_image_schedule: Schedule = field(default_factory=lambda: Schedule(steps=2000, batch_size=128, lr=2e-3, weight_decay=0.1))
    clip_shapes_schedule: Schedule = field(default_factory=lambda: Schedule(steps=1000, batch_size=128, lr=1e-3, weight_decay=0.1))
    clip_words_schedule: Schedule = field(default_factory=lambda: Schedule(steps=1000, batch_size=128, lr=1e-3, weight_decay=0.01))  # recipe v13 (HISTORY)
    vae_schedule: Schedule = field(default_factory=lambda: Schedule(steps=750, batch_size=16, lr=1e-3))
    vae_refine_schedule: Schedule = field(default_factory=lambda: Schedule(steps=1500, batch_size=16, lr=5e-4, warmup=20))  # at 750 the judge misread 7.6% of test images after the round trip (HISTORY, v12)
    unet_schedule: Schedule = field(default_factory=lambda: Schedule(steps=11_000, batch_size=64, lr=1e-3, ema=0.995))
    unet_caption_share: float = 0.3  # the UNet's first steps show the caption form alone, then the phrasings (weights/HISTORY.md)
    ip_schedule: Schedule = field(default_factory=lambda: Schedule(steps=2000, batch_size=64, lr=2e-3, weight_decay=0.01))
    classifier_schedule: Schedule = field(default_factory=lambda: Schedule(steps=1000, batch_size=64, lr=2e-3))

    @classmethod
    def tiny(cls) -> "WorldConfig":
        return cls()

    @classmethod
    def gpu(cls) -> "WorldConfig":
        """The same models and data with several times the UNet's and the adapter's samples, for a machine with a
        GPU (`minipa train --device cuda --preset gpu`): more UNet samples are what composes held-out combinations."""
        return cls().with_steps({"unet": GPU_SAMPLES * cls().unet_schedule.steps, "ip": GPU_SAMPLES * cls().ip_schedule.steps})

    @classmethod
    def smoke(cls, steps: int = 3) -> "WorldConfig":
        """The same pipeline at toy size and a few steps: for tests (seconds, not minutes)."""
        def quick(s: Schedule, batch: int) -> Schedule:
            return dataclasses.replace(s, steps=steps, batch_size=batch, warmup=1, checkpoint_every=2)

        base = cls()
        return dataclasses.replace(
            base, train_images=32, eval_images=16,
            text=dataclasses.replace(base.text, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            vision=dataclasses.replace(base.vision, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       projection_dim=16),
            vae=dataclasses.replace(base.vae, block_out_channels=(8, 8, 8, 8), norm_num_groups=4),
            unet=dataclasses.replace(base.unet, block_out_channels=(16, 16, 16), attention_head_dim=2, cross_attention_dim=32,
                                     norm_num_groups=4),
            clip_schedule=quick(base.clip_schedule, 8), clip_image_schedule=quick(base.clip_image_schedule, 8),
            clip_shapes_schedule=quick(base.clip_shapes_schedule, 8), clip_words_schedule=quick(base.clip_words_schedule, 8),
            vae_schedule=quick(base.vae_schedule, 4), vae_refine_schedule=quick(base.vae_refine_schedule, 4),
            unet_schedule=quick(base.unet_schedule, 8), ip_schedule=quick(base.ip_schedule, 8),
            classifier_schedule=quick(base.classifier_schedule, 8),
        )

    def with_steps(self, steps: dict[str, int]) -> "WorldConfig":
        """The same recipe with other step counts for some stages, e.g. {"unet": 5000}; the learning-rate
        schedule stretches with them. The extra stages train with `ip`'s schedule."""
        for stage, n in steps.items():
            if stage not in STAGES:
                raise ValueError(f"steps: no stage {stage!r} has its own schedule; the stages are {', '.join(STAGES)}"
                                 + (" (the extras train with ip's)" if stage in EXTRA_STAGES else ""))
            if type(n) is not int or n < 1:
                raise ValueError(f"steps: {stage} needs a whole number of steps ≥ 1, found {n!r}")
        return dataclasses.replace(self, **{f"{stage}_schedule": dataclasses.replace(getattr(self, f"{stage}_schedule"), steps=n)
                                            for stage, n in steps.items()})


class World:
    """Runs the stages of one `WorldConfig` between a work folder and an output (weights) folder."""

    def __init__(self, config: WorldConfig, out: str | Path, work: str | Path, *, resume: bool = False, progress: bool = True,
                 device: str = "cpu"):
        """`device`: where the stages train ("cuda": under torchrun, each process its GPU); the data tables, the
        frozen models' precomputed outputs and every check and export stay on the CPU."""
        self.config, self.out, self.work = config, Path(out), Path(work)
        self.resume, self.progress, self.compute = resume, progress, Compute(device)
        self.rank, self.world_size = distributed(device)
        self._train = None

    # ── shared data ─────────────────────────────────────────────────────────────────────────────
    @property
    def train_set(self) -> dict:
        """The training images (rendered once), their scenes, caption table and phrasings."""
        if self._train is None:
            dataset = ShapesDataset("train", self.config.train_images, self.config.seed)
            scenes = dataset.scenes()
            captions, index = caption_table(scenes)
            self._train = {"images": dataset.images(), "scenes": scenes, "captions": captions, "caption_index": index,
                           "phrasings": Phrasings.of(scenes)}
        return self._train

    @property
    def resized_images(self) -> torch.Tensor:
        """The training images resized for CLIP's image tower: once for all CLIP stages (1.5 GB; `run` drops them after the last)."""
        if "resized" not in self.train_set:
            self.train_set["resized"] = clip_resize(self.train_set["images"])
        return self.train_set["resized"]

    def seeded(self, schedule: Schedule) -> Schedule:
        return dataclasses.replace(schedule, seed=self.config.seed * 100 + schedule.seed)

    # ── bookkeeping ─────────────────────────────────────────────────────────────────────────────
    def done(self, stage: str) -> dict | None:
        path = self.work / stage / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _finish(self, stage: str, result: dict, metrics: dict) -> dict:
        record = {"stage": stage, "seconds": round(result["seconds"], 1), "steps": len(result["losses"]),
                  "final_loss": sum(result["losses"][-50:]) / max(1, len(result["losses"][-50:])), **metrics}
        if self.rank == 0:
            export.write_json(self.work / stage / "done.json", record)
            losses = self.work / stage / "losses.json"
            losses.write_text(json.dumps(result["losses"]))
        self._barrier()
        return record

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def _fit(self, stage: str, module, schedule: Schedule) -> dict:
        checkpoint = self.work / stage / "checkpoint.pt"
        if checkpoint.exists() and not self.resume:
            raise FileExistsError(f"{checkpoint} exists: pass --resume to continue that run, or delete {self.work} to start over")
        torch.manual_seed(self.config.seed)  # model initialisation is reproducible too
        result = fit(module, self.seeded(schedule), checkpoint, name=stage, resume=self.resume, progress=self.progress,
                     compute=self.compute)
        module.cpu()  # what follows a stage (its checks, the export) runs on the CPU, wherever it trained
        return result

    def run(self, stages=STAGES) -> dict[str, dict]:
        records = {}
        for stage in stages:
            if stage not in STAGES + EXTRA_STAGES:
                raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES + EXTRA_STAGES)}")
        for i, stage in enumerate(stages):
            records[stage] = self.done(stage) if self.resume and self.done(stage) else getattr(self, f"stage_{stage}")()
            if self._train is not None and not set(stages[i + 1 :]) & set(CLIP_STAGES):
                self._train.pop("resized", None)  # 1.5 GB that no later stage reads
        if self.rank == 0 and (self.out / "model_index.json").is_file():
            export.write_manifest(self.out)
        return records

    # ── the stages ──────────────────────────────────────────────────────────────────────────────
    def stage_clip(self) -> dict:
        data, cfg = self.train_set, self.config
        tokenizer = tiny_tokenizer(cfg.text.max_position_embeddings)
        torch.manual_seed(cfg.seed)
        module = CLIPTraining(CLIPTextModel(cfg.text), CLIPVisionModelWithProjection(cfg.vision), self.resized_images,
                              tokenizer(data["captions"]), data["caption_index"], **self._phrasings(tokenizer))
        _init_clip(module)
        result = self._fit("clip", module, cfg.clip_schedule)
        metrics = self._clip_metrics(module, tokenizer)
        self._export_clip("clip", module)
        if self.rank == 0:
            export.save_tokenizer(tokenizer, self.out / "tokenizer")
        return self._finish("clip", result, metrics)

    def stage_clip_image(self) -> dict:
        """Phase 2 of CLIP: both towers on, each image contrasted with every caption (see train/clip.py)."""
        cfg, tokenizer = self.config, load_tokenizer(self.out / "tokenizer")
        module = self._clip_from_out(CLIPTraining, tokenizer, "clip", **self._phrasings(tokenizer))
        module.contrast_with_every_caption()
        result = self._fit("clip_image", module, cfg.clip_image_schedule)
        metrics = self._clip_metrics(module, tokenizer)
        self._export_clip("clip_image", module)
        return self._finish("clip_image", result, metrics)

    def stage_clip_shapes(self) -> dict:
        """Phase 3 of CLIP (train/clip.py, ShapeTraining): the image tower alone learns the shape apart from
        the colours. It rewrites image_encoder/ in --out: the stages after it (diffusion data, `ip`) read that."""
        cfg, tokenizer = self.config, load_tokenizer(self.out / "tokenizer")
        labels = scene_labels(self.train_set["scenes"])
        torch.manual_seed(cfg.seed)  # the prototypes' initialisation
        module = self._clip_from_out(ShapeTraining, tokenizer, "clip_image", shape_size=2 * labels["shape"] + labels["size"])
        result = self._fit("clip_shapes", module, cfg.clip_shapes_schedule)
        metrics = self._clip_metrics(module, tokenizer)
        if self.rank == 0:
            export.save_component(module.image_encoder, self.out / "image_encoder")
        return self._finish("clip_shapes", result, metrics)

    def stage_clip_words(self) -> dict:
        """Phase 4 of CLIP (train/clip.py, WordTraining): the text tower alone learns which words go together, on
        the phrasings the UNet will see. It rewrites text_encoder/ in --out: the UNet's text tokens are read from that."""
        cfg, tokenizer, data = self.config, load_tokenizer(self.out / "tokenizer"), self.train_set
        clip = self._clip_from_out(CLIPTraining, tokenizer, "clip_image")
        with torch.no_grad():
            image_embeds = self._split_rows(lambda lo, hi: clip.embed_pixels(self.resized_images[lo:hi]), len(self.resized_images))
        phrasings = data["phrasings"]
        phrasing_ids = tokenizer(phrasings.texts)
        length = int(clip.text_encoder.end_positions(phrasing_ids).max()) + 1  # the captions are phrasings too
        labels = binding_labels(tokenizer.vocab, phrasings, phrasing_ids[:, :length])
        torch.manual_seed(cfg.seed)  # the heads' initialisation
        module = WordTraining(clip.text_encoder, clip.text_projection.weight, clip.logit_scale, image_embeds, clip.caption_ids,
                              data["caption_index"], phrasings, phrasing_ids, labels)
        result = self._fit("clip_words", module, cfg.clip_words_schedule)
        with torch.no_grad():
            clip.text_projection.weight.copy_(module.text_projection.weight)
        metrics = self._clip_metrics(clip, tokenizer)
        metrics["reader_new_word_orders"] = word_order_check(lambda texts: clip.text_encoder(tokenizer(texts)))
        self._export_clip("clip_words", clip)
        return self._finish("clip_words", result, metrics)

    def _phrasings(self, tokenizer) -> dict:
        """What CLIPTraining needs to show each image other word orders of its caption, with `clip_phrasings`
        (every attribute named: see minipa/train/clip.py for why the phrasings that leave some out are the UNet's
        alone); by default CLIP learns from the captions and only the UNet and the adapter see phrasings."""
        if not self.config.clip_phrasings:
            return {}
        phrasings = self.train_set["phrasings"].whole()
        return {"phrasings": phrasings, "phrasing_ids": tokenizer(phrasings.texts)}

    def _export_clip(self, stage: str, module: CLIPTraining) -> None:
        """Both towers to --out, in transformers' format; the text projection and τ, which SD's files do not
        hold, to --work/<stage>/projection.safetensors (the next CLIP stage and the judge read them there)."""
        if self.rank == 0:
            export.save_component(module.text_encoder, self.out / "text_encoder")
            export.save_component(module.image_encoder, self.out / "image_encoder")
            export.save_safetensors({"text_projection.weight": module.text_projection.weight,
                              "logit_scale": module.logit_scale.detach().reshape(1)}, self.work / stage / "projection.safetensors")

    def _clip_from_out(self, cls, tokenizer, stage: str, **kwargs) -> CLIPTraining:
        """A CLIP training module on the towers in --out, with the text projection and τ that `stage` left
        in --work (SD's files do not hold them)."""
        from safetensors.torch import load_file

        path = self.work / stage / "projection.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage first (into this --work folder)")
        data = self.train_set
        module = cls(load_text_encoder(self.out / "text_encoder", dtype=torch.float32),
                     load_image_encoder(self.out / "image_encoder", dtype=torch.float32), self.resized_images,
                     tokenizer(data["captions"]), data["caption_index"], **kwargs)
        extra = load_file(str(path))
        with torch.no_grad():
            module.text_projection.weight.copy_(extra["text_projection.weight"])
            module.logit_scale.copy_(extra["logit_scale"][0])
        return module

    def _clip_metrics(self, module: CLIPTraining, tokenizer) -> dict:
        test = ShapesDataset("test", self.config.eval_images, self.config.seed)
        test_captions, test_index = caption_table(test.scenes())  # candidates: every distinct test caption
        accuracy = retrieval_accuracy(module.eval(), test.images(), tokenizer(test_captions), test_index)
        return {"image_to_caption_top1_test": accuracy, "candidates": len(test_captions)}

    def stage_vae(self) -> dict:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        vae = VAETraining(_init_vae(cfg.vae), self.train_set["images"])
        result = self._fit("vae", vae, cfg.vae_schedule)
        return self._export_vae("vae", vae.vae, result)

    def stage_vae_refine(self) -> dict:
        """Phase 2 of the VAE: the same loss, continued from phase 1's (fp32) weights with a fresh schedule."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = _init_vae(cfg.vae)
        state = torch.load(self.work / "vae" / "checkpoint.pt", map_location="cpu", weights_only=True)["ema"]
        model.load_state_dict({k.removeprefix("vae."): v for k, v in state.items()}, strict=True)
        vae = VAETraining(model, self.train_set["images"])
        result = self._fit("vae_refine", vae, cfg.vae_refine_schedule)
        return self._export_vae("vae_refine", vae.vae, result)

    def _export_vae(self, stage: str, model, result: dict) -> dict:
        cfg = self.config
        model.eval()
        images = self.train_set["images"][:2048]
        packed = self._split_rows(lambda lo, hi: torch.cat(encode_all(model, images[lo:hi]), dim=1).flatten(1), len(images))
        mean, std = packed.chunk(2, dim=1)  # (N, 4·8·8) each
        z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
        scaling = round(1.0 / float(z.std()), 5)  # LDM's rule: unit-variance latents for the UNet
        model.config = dataclasses.replace(model.config, scaling_factor=scaling)
        model.scaling_factor = scaling
        metrics = {"psnr_test": psnr(model, ShapesDataset("test", cfg.eval_images, cfg.seed).images()), "scaling_factor": scaling}
        if self.rank == 0:
            export.save_component(model, self.out / "vae")
        return self._finish(stage, result, metrics)

    def diffusion_data(self) -> DiffusionData:
        """Latents (frozen VAE), text tokens (frozen text encoder) and image embeddings (frozen image
        encoder) of every training image: computed once (each process its share), cached in --work."""
        frozen = [self.out / "vae" / "diffusion_pytorch_model.safetensors", self.out / "text_encoder" / "model.safetensors",
                  self.out / "image_encoder" / "model.safetensors"]
        # the captions are part of the cache key; their scenes need no rendering
        scenes = self._train["scenes"] if self._train else ShapesDataset("train", self.config.train_images, self.config.seed).scenes()
        phrasings = Phrasings.of(scenes)
        captions = phrasings.texts  # every phrasing of every caption; phrasing 0 of an image is its caption
        key = [sha256_of(p) for p in frozen] + captions  # a new frozen model or new captions: compute again
        cache = self.work / "diffusion_data.pt"
        if cache.is_file():
            state = torch.load(cache, weights_only=True)
            if state["key"] == key:
                return DiffusionData(**state["data"])
        data = self.train_set
        vae = load_vae(self.out / "vae", dtype=torch.float32)
        image_encoder = load_image_encoder(self.out / "image_encoder", dtype=torch.float32)

        def rows(lo: int, hi: int) -> torch.Tensor:  # (hi − lo, 2·4 + E/64, 8, 8): mean, std, and the embedding folded in
            mean, std = encode_all(vae, data["images"][lo:hi])
            embeds = image_embeddings(image_encoder, data["images"][lo:hi])
            return torch.cat([mean.flatten(1), std.flatten(1), embeds], dim=1)

        packed = self._split_rows(rows, len(data["images"]))
        latent = torch.Size((vae.config.latent_channels, *encode_all(vae, data["images"][:1])[0].shape[2:]))
        mean, std, embeds = packed.split([latent.numel(), latent.numel(), packed.shape[1] - 2 * latent.numel()], dim=1)
        text_encoder = load_text_encoder(self.out / "text_encoder", dtype=torch.float32)
        with torch.no_grad():
            text = text_encoder(load_tokenizer(self.out / "tokenizer")(captions + [""]))  # (C + 1, 77, D): "" last
        fields = {"latent_mean": mean.reshape(-1, *latent).contiguous(), "latent_std": std.reshape(-1, *latent).contiguous(),
                  "scaling_factor": vae.config.scaling_factor, "text": text, "caption_index": phrasings.index[:, 0],
                  "image_embeds": embeds.contiguous(), "phrasing_index": phrasings.index, "phrasing_probs": phrasings.probs}
        if self.rank == 0:
            from minipa.train.trainer import save_atomically

            save_atomically({"key": key, "data": fields}, cache)
        return DiffusionData(**fields)

    def _split_rows(self, fn, n: int) -> torch.Tensor:
        return split_rows(fn, n, self.rank, self.world_size)

    def stage_unet(self) -> dict:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        from minipa.unet import UNet2DConditionModel

        caption_steps = round(cfg.unet_caption_share * cfg.unet_schedule.steps)
        module = UNetTraining(UNet2DConditionModel(cfg.unet), self.diffusion_data(), caption_steps=caption_steps)
        result = self._fit("unet", module, cfg.unet_schedule)
        if self.rank == 0:
            export.save_component(module.unet, self.out / "unet")
            export.save_scheduler(ScheduleConfig.sd15(), self.out / "scheduler")
            export.save_model_index(self.out)
        return self._finish("unet", result, {})

    def patch_data(self) -> DiffusionData:
        """`diffusion_data` with what IP-Adapter Plus reads in place of the global embeddings: the image
        encoder's penultimate hidden states (every patch), and those of a zero image for a dropped one."""
        encoder = load_image_encoder(self.out / "image_encoder", dtype=torch.float32)
        images = self.train_set["images"]
        flat = self._split_rows(lambda lo, hi: image_embeddings(encoder, images[lo:hi], patches=True).flatten(1), len(images))
        features = flat.reshape(len(images), -1, encoder.config.hidden_size)  # (N, L, E)
        with torch.no_grad():
            uncond = uncond_image_features(encoder, features[:1], plus=True)[0]  # (L, E)
        return dataclasses.replace(self.diffusion_data(), image_embeds=features, uncond_image_embeds=uncond)

    def _adapter_module(self, variant: str, plus: bool = False) -> IPAdapterTraining:
        cfg = self.config
        unet = load_unet(self.out / "unet", dtype=torch.float32)
        data = self.patch_data() if plus else self.diffusion_data()
        torch.manual_seed(cfg.seed)
        # Plus: the Resampler's defaults (hidden width = D, 4 blocks, heads of 64)
        tokens, resampler = (cfg.ip_plus_tokens, {}) if plus else (cfg.ip_tokens, None)
        E = data.image_embeds.shape[-1]
        image_proj = image_projection(E, unet.config.cross_attention_dim, tokens, resampler=resampler, mlp=None if plus else cfg.ip_mlp)
        adapter = IPAdapter.for_unet(unet, E, tokens, image_proj)
        adapter.init_from_text_attention(unet)  # Wk′ ← Wk, Wv′ ← Wv   (paper §3.2.2)
        return IPAdapterTraining(unet, adapter, data, text_drop=cfg.text_drop, variant=variant)

    def stage_ip(self) -> dict:
        module = self._adapter_module("decoupled")
        result = self._fit("ip", module, self.config.ip_schedule)
        if self.rank == 0:
            export.save_ip_adapter(module.adapter, self.out / "ip-adapter.safetensors")
        return self._finish("ip", result, {"text_drop": self.config.text_drop, "tokens": self.config.ip_tokens})

    def stage_ablation(self) -> dict:
        """The concatenation baseline, with the IP-Adapter's budget (only image_proj trains)."""
        module = self._adapter_module("concat")
        result = self._fit("ablation", module, self.config.ip_schedule)
        if self.rank == 0:
            export.save_safetensors(module.adapter.image_proj, self.work / "ablation" / "concat_image_proj.safetensors")
        return self._finish("ablation", result, {"variant": "concat"})

    def stage_ip_plus(self) -> dict:
        """IP-Adapter Plus (a Resampler over patch features) with the IP-Adapter's recipe and budget."""
        module = self._adapter_module("decoupled", plus=True)
        result = self._fit("ip_plus", module, self.config.ip_schedule)
        if self.rank == 0:
            export.save_ip_adapter(module.adapter, self.work / "ip_plus" / PLUS_FILE)
        return self._finish("ip_plus", result, {"text_drop": self.config.text_drop, "tokens": self.config.ip_plus_tokens})

    def stage_classifier(self) -> dict:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        module = ClassifierTraining(ShapeClassifier(), self.train_set["images"], scene_labels(self.train_set["scenes"]))
        result = self._fit("classifier", module, cfg.classifier_schedule)
        test = ShapesDataset("heldout", cfg.eval_images, cfg.seed)
        metrics = {"accuracy_heldout": classifier_accuracy(module.classifier.eval(), test.images(), scene_labels(test.scenes()))}
        if self.rank == 0:
            state = {f"classifier.{k}": v for k, v in module.classifier.state_dict().items()}
            projection = next((p for p in (self.work / s / "projection.safetensors" for s in ("clip_words", "clip_image", "clip")) if p.is_file()), None)
            if projection is not None:
                from safetensors.torch import load_file

                state.update(load_file(str(projection)))
            export.save_safetensors(state, self.out / EVAL_FILE, dtype=torch.float16)
        return self._finish("classifier", result, metrics)


@torch.no_grad()
def image_embeddings(image_encoder: CLIPVisionModelWithProjection, images: torch.Tensor, batch: int = 256,
                     patches: bool = False) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 → (N, E) global image embeddings (paper §3.2.1), unnormalised as IP-Adapter reads
    them; patches=True: (N, L, hidden) penultimate hidden states, as IP-Adapter Plus reads them."""
    return torch.cat([image_features(image_encoder, clip_pixels(images[i : i + batch]), patches) for i in range(0, len(images), batch)])


def _init_clip(module: CLIPTraining) -> None:
    """CLIP's initialisation, roughly: small normal weights for embeddings and projections."""
    for name, p in module.named_parameters():
        if name.endswith("logit_scale"):
            continue
        if "norm" in name:
            torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
        elif p.ndim >= 2 or name.endswith("class_embedding"):
            torch.nn.init.normal_(p, std=0.02)
        else:
            torch.nn.init.zeros_(p)


def _init_vae(config: VAEConfig):
    from minipa.vae import AutoencoderKL

    return AutoencoderKL(config)  # PyTorch's default initialisation of every layer


def train_world(config: WorldConfig, out, work, *, stages=STAGES, resume=False, progress=True, device: str = "cpu") -> dict:
    started = time.perf_counter()
    world = World(config, out, work, resume=resume, progress=progress, device=device)
    records = world.run(stages)
    if world.rank == 0:
        total = sum(r["seconds"] for r in records.values())
        summary = {"domain": json.loads(describe_domain()), "stages": records, "training_seconds": round(total, 1),
                   "wall_seconds": round(time.perf_counter() - started, 1), "processes": world.world_size,
                   "threads": torch.get_num_threads(), "device": world.compute.device}
        export.write_json(Path(work) / "summary.json", summary)
        return summary
    return {}


def load_plus_adapter(work, pipe):
    """The `ip_plus` experiment's adapter (from a work folder) for `pipe`'s UNet, or None if it has not run."""
    from minipa.loading import load_ip_adapter

    path = Path(work) / "ip_plus" / PLUS_FILE
    return load_ip_adapter(path, pipe.unet, dtype=pipe.dtype, device=pipe.device) if path.is_file() else None


def load_concat_projection(work, pipe):
    """The ablation's trained image_proj (from a work folder), or None if that stage has not run."""
    from minipa.keymap import projection_sizes
    from minipa.weights import Checkpoint, WeightsError, load_weights

    path = Path(work) / "ablation" / "concat_image_proj.safetensors"
    if not path.is_file():
        return None
    ckpt, D = Checkpoint(path), pipe.unet.config.cross_attention_dim
    if (sizes := projection_sizes(ckpt.shapes, D, prefix="")) is None:
        raise WeightsError(f"{path}: expected the ablation's image_proj (proj.weight, or proj.0/proj.2 of an MLP) for "
                           f"{D}-wide tokens, found {dict(ckpt.shapes)}; run the `ablation` stage again")
    E, N, mlp = sizes
    with torch.device("meta"):
        proj = image_projection(E, D, N, mlp=mlp)
    load_weights(proj, ckpt, {k: k for k in ckpt.keys()}, family="the concatenation ablation's image_proj")
    return proj.eval()
