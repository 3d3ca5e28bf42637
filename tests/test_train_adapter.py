"""`minipa train-adapter`: the paper's recipe on real SD-shaped models and your own images.

One training step equals a reference built from diffusers and transformers parts (UNet2DConditionModel with
IPAdapterAttnProcessor2_0, ImageProjection / IPAdapterPlusImageProjection, AutoencoderKL, CLIP, DDPMScheduler,
VaeImageProcessor, CLIPImageProcessor), loss and every gradient; a short run on 16 generated images lowers the
loss, and what it writes loads in diffusers and minipa alike; resuming, two gloo processes and bf16 are checked
against the plain run; bad input stops the command before training with one line naming the file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline, randomize
from PIL import Image, ImageDraw

from minipa.cli import main as cli
from minipa.keymap import ip_adapter_file_keys
from minipa.train.adapter import AdapterSettings, build_training, train_adapter
from minipa.train.images import read_dataset
from minipa.train.trainer import Compute, step_generator

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("MINIPA_TEST_DEVICE", "cpu")  # benchmarks/train_adapter_gpu.sh runs these tests on "cuda" too
if DEVICE != "cpu":
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32 here, for the 1e-5 comparisons
SIZE = 64  # the tiny UNet's sample_size 8 × the VAE's factor 8
DROPS = dict(image_drop=0.25, text_drop=0.25, both_drop=0.25)  # every case in a batch of 8 (seed 0, step 1), for the parity test


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """16 generated images (several sizes and aspect ratios) with same-named .txt captions."""
    folder = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(0)
    for i in range(16):
        w, h = [(64, 64), (96, 64), (64, 120), (101, 77)][i % 4]
        background, colour = (tuple(int(c) for c in g.integers(0, 256, 3)) for _ in range(2))
        image = Image.new("RGB", (w, h), background)
        x, y = int(g.integers(0, w // 2)), int(g.integers(0, h // 2))
        ImageDraw.Draw(image).ellipse((x, y, x + w // 3, y + h // 3), fill=colour)
        image.save(folder / f"photo{i:02d}.png")
        (folder / f"photo{i:02d}.txt").write_text(f"a {['round', 'small', 'bright', 'dark'][i % 4]} shape, number {i}\n")
    return folder


def settings(world, data, out, **kwargs) -> AdapterSettings:
    options = dict(image_encoder=str(world["image_encoder"]), resolution=SIZE, batch_size=4, steps=6, checkpoint_every=3,
                   progress=False, device=DEVICE)
    return AdapterSettings(model=str(world["model"]), data=str(data), out=str(out), **{**options, **kwargs})


# ─── one step against diffusers parts ────────────────────────────────────────────────────────────


def official_rule(u: float, i: float, t: float, ti: float) -> tuple[bool, bool]:
    """(drop image, drop text), as the official tutorial_train.py decides them from one uniform number."""
    if u < i:
        return True, False
    if u < i + t:
        return False, True
    if u < i + t + ti:
        return True, True
    return False, False


def reference_step(world, examples, b, adapter_state: dict, plus: bool):
    """The same step with diffusers/transformers parts; → (loss, unet with the adapter's gradients)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model = Path(world["model"])
    vae, text_encoder = AutoencoderKL.from_pretrained(model / "vae"), CLIPTextModel.from_pretrained(model / "text_encoder")
    encoder, tokenizer = CLIPVisionModelWithProjection.from_pretrained(world["image_encoder"]), CLIPTokenizer.from_pretrained(model / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(model / "unet").requires_grad_(False)
    unet._load_ip_adapter_weights([nest(adapter_state)], low_cpu_mem_usage=False)  # what load_ip_adapter does to the UNet
    assert isinstance(unet.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection if plus else ImageProjection)
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for n, p in unet.attn_processors.items() if "attn2" in n)
    unet.encoder_hid_proj.requires_grad_(True)
    for n, p in unet.attn_processors.items():
        if "attn2" in n:
            p.requires_grad_(True)

    drops = [official_rule(float(u), DROPS["image_drop"], DROPS["text_drop"], DROPS["both_drop"]) for u in b["u"]]
    images = [Image.open(examples[i].image) for i in b["index"]]
    pixels = torch.cat([VaeImageProcessor(resample="bilinear").preprocess(im, SIZE, SIZE, resize_mode="crop") for im in images])
    clip = CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values
    ids = tokenizer(["" if text else examples[i].caption for i, (_, text) in zip(b["index"].tolist(), drops)],
                    padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    dropped_image = torch.tensor([image for image, _ in drops])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        z = (posterior.mean + posterior.std * b["latent_noise"]) * vae.config.scaling_factor
        noisy = DDPMScheduler.from_pretrained(model / "scheduler").add_noise(z, b["noise"], b["t"])
        text = text_encoder(ids)[0]
        if plus:  # a dropped image is an all-zero (normalised) image, then its penultimate hidden states
            clip = torch.where(dropped_image[:, None, None, None], torch.zeros_like(clip), clip)
            embeds = encoder(clip, output_hidden_states=True).hidden_states[-2]
        else:  # a dropped image is a zero embedding
            embeds = torch.where(dropped_image[:, None], 0.0, encoder(clip).image_embeds)
    eps = unet(noisy, b["t"], encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    loss = torch.nn.functional.mse_loss(eps.float(), b["noise"].float())
    loss.backward()
    return loss, unet


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_one_training_step_equals_diffusers_parts(tiny_world, photos, tmp_path, plus):
    """Loss and every trainable gradient of one step (same weights, images, noise, timesteps and dropped
    conditions) agree with diffusers' UNet + IP-Adapter processors and projection within 1e-5."""
    s = settings(tiny_world, photos, tmp_path, plus=plus, **DROPS)
    dataset = read_dataset(photos)
    module, pipe = build_training(s, dataset, Compute(DEVICE))
    randomize(pipe.ip_adapter, seed=3)  # norms and biases too: nothing left at 1 or 0
    state = {key: p.detach().cpu().clone() for key, p in _official(pipe.ip_adapter, lambda p: p).items()}
    b = module.batch(step_generator(0, 1), 8)
    cases = {(bool(k == 0), bool(c == module.data.empty)) for k, c in zip(b["keep_image"], b["caption"])}
    assert cases == {(False, False), (True, False), (False, True), (True, True)}  # kept, image, text and both dropped
    loss = module({k: v.to(DEVICE) for k, v in b.items()})
    loss.backward()
    ref_loss, unet = reference_step(tiny_world, dataset.examples, b, state, plus)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5

    grads = _official(pipe.ip_adapter, lambda p: p.grad.cpu())  # minipa's gradients under the file's names
    nested = nest(grads)
    # diffusers' own key conversion maps them onto its modules (it splits Plus's to_kv into to_k and to_v),
    # run by a UNet without an adapter (the Resampler's own attention layers would join the numbering)
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(Path(tiny_world["model"]) / "unet")
    proj = plain._convert_ip_adapter_image_proj_to_diffusers(nested["image_proj"], low_cpu_mem_usage=False)
    pairs = [(f"image_proj.{n}", g, ref.grad) for (n, g), ref in
             zip(proj.named_parameters(), unet.encoder_hid_proj.image_projection_layers[0].parameters(), strict=True)]
    processors = plain._convert_ip_adapter_attn_to_diffusers([nested], low_cpu_mem_usage=False)
    for name, ref in unet.attn_processors.items():
        if "attn2" in name:
            pairs += [(f"{name}.{n}", g, r.grad) for (n, g), r in zip(processors[name].named_parameters(), ref.parameters(), strict=True)]
    assert len(pairs) == len(grads) + (4 if plus else 0)  # Plus: 4 to_kv gradients are 8 in diffusers
    worst = max((float((g.detach() - r).abs().max()), name) for name, g, r in pairs)
    print(f"loss {loss.item():.6f} vs {ref_loss.item():.6f}; largest gradient difference {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= 1e-5, worst


def nest(flat: dict) -> dict:
    """The official flat keys → the nested {"image_proj": {…}, "ip_adapter": {…}} that diffusers' loaders take."""
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = value
    return nested


def _official(adapter, value) -> dict:
    """{official file key: value(parameter)} for every parameter of a minipa IPAdapter."""
    params = dict(adapter.named_parameters())
    return {key: value(params[name]) for name, key in ip_adapter_file_keys(params).items()}


def test_sd_and_clip_preprocessing_equal_diffusers_and_transformers(photos):
    """SD's: shorter side to the resolution (bilinear), centre crop, [-1, 1] = diffusers' VaeImageProcessor with
    resize_mode="crop"; the image encoder's = CLIPImageProcessor. Images of four sizes, odd margins included."""
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPImageProcessor

    dataset = read_dataset(photos)
    sd, clip = dataset.load(range(4), SIZE)
    images = [Image.open(e.image) for e in dataset.examples[:4]]
    expected = torch.cat([VaeImageProcessor(resample="bilinear").preprocess(im, SIZE, SIZE, resize_mode="crop") for im in images])
    assert (sd - expected).abs().max() <= 1e-6
    assert (clip - CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values).abs().max() <= 1e-6


def test_json_and_jsonl_records_read_like_the_folder(photos, tmp_path):
    """The official layout: {"image_file", "text"} records, image files relative to an image root."""
    folder = read_dataset(photos).examples
    records = [{"image_file": e.image.name, "text": e.caption} for e in folder]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_dataset(tmp_path / "data.json", image_root=photos).examples == folder
    assert read_dataset(tmp_path / "data.jsonl", image_root=photos).examples == folder
    (photos.parent / "list.jsonl").write_text(json.dumps({"image_file": f"{photos.name}/photo00.png", "text": "x"}))
    assert read_dataset(photos.parent / "list.jsonl").examples[0].image == photos / "photo00.png"  # default root: the list's folder


# ─── the command: a short run and what it writes ─────────────────────────────────────────────────

RUN = ["--resolution", str(SIZE), "--batch-size", "4", "--steps", "12", "--checkpoint-every", "6", "--lr", "1e-3",
       "--device", DEVICE, "--no-progress"]


def command(world, data, out, *extra):
    return ["train-adapter", "--model", str(world["model"]), "--image-encoder", str(world["image_encoder"]),
            "--data", str(data), "--out", str(out), *RUN, *extra]


@pytest.fixture(scope="module")
def run(tiny_world, photos, tmp_path_factory) -> Path:
    """12 steps of 4 images through `minipa train-adapter` (lr 1e-3, to move fast), both adapter formats, samples."""
    out = tmp_path_factory.mktemp("run")
    assert cli(command(tiny_world, photos, out, "--save-bin", "--sample-every", "6", "--sample-steps", "2",
                       "--sample-prompt", "", "--sample-prompt", "a round shape")) == 0
    return out


def test_a_short_run_lowers_the_loss_and_logs_every_step(tiny_world, photos, run, tmp_path):
    log = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(r["lr"] == 1e-3 for r in log)
    dataset = read_dataset(photos)
    before, _ = build_training(settings(tiny_world, photos, tmp_path), dataset, Compute())
    after, _ = build_training(settings(tiny_world, photos, tmp_path, init_adapter=str(run / "ip-adapter.safetensors")), dataset, Compute())
    with torch.no_grad():  # the same held batches (image, noise, t, drops) before and after training
        losses = [(before(b).item(), after(b).item()) for b in (before.batch(step_generator(99, i), 16) for i in range(2))]
    print("fixed-batch loss before → after:", losses)
    assert all(a < 0.97 * b for b, a in losses)
    with Image.open(run / "samples" / "step-000012.png") as grid:  # 4 rows: the image prompt, then 2 generations
        assert grid.size == (3 * SIZE, 4 * SIZE)
    assert (run / "samples" / "step-000006.png").is_file()
    assert sorted(p.name for p in (run / "adapters").iterdir()) == [
        "ip-adapter-000006.bin", "ip-adapter-000006.safetensors", "ip-adapter-000012.bin", "ip-adapter-000012.safetensors"]


def test_the_trained_adapter_gives_the_same_image_in_diffusers_and_minipa(tiny_world, photos, run):
    import minipa

    image, latents = Image.open(photos / "photo05.png"), torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    files = {"safetensors": run / "ip-adapter.safetensors", "bin": run / "ip-adapter.bin"}
    ours = {kind: minipa.load_pipeline(tiny_world["model"], ip_adapter=path, image_encoder=tiny_world["image_encoder"])
            for kind, path in files.items()}
    theirs = diffusers_pipeline({**tiny_world, "trained": files["safetensors"]}, adapter="trained")  # λ = 1 after loading
    kwargs = dict(num_steps=4, height=SIZE, width=SIZE, output="np", progress=False, ip_scale=1.0)
    a, b = (ours[k]("a round shape", ip_image=image, latents=latents.clone(), **kwargs) for k in files)
    c = theirs("a round shape", negative_prompt="", ip_adapter_image=image, num_inference_steps=4, height=SIZE, width=SIZE,
               latents=latents.clone(), output_type="np").images
    assert np.abs(a - c).max() <= 1e-4 and np.array_equal(a, b)
    untrained = minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_safetensors"])
    assert not torch.equal(ours["bin"].ip_adapter.layers["1"].to_k_ip.weight, untrained.ip_adapter.layers["1"].to_k_ip.weight)


def test_resume_continues_bit_for_bit(tiny_world, photos, run, tmp_path, monkeypatch):
    """Interrupted at step 8 (the checkpoint of step 6 is the last), then --resume: the same weights, optimizer
    state, losses and files as the uninterrupted run."""
    from minipa.train.ip_adapter import IPAdapterTraining

    draw, calls = IPAdapterTraining.batch, []

    def interrupted(self, generator, size):
        calls.append(size)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as Ctrl-C would
        return draw(self, generator, size)

    monkeypatch.setattr(IPAdapterTraining, "batch", interrupted)
    assert cli(command(tiny_world, photos, tmp_path, "--save-bin")) == 130
    assert torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 6
    monkeypatch.undo()
    assert cli(command(tiny_world, photos, tmp_path, "--save-bin")) == 1  # without --resume: refused
    assert cli(command(tiny_world, photos, tmp_path, "--save-bin", "--resume")) == 0
    a, b = (torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True) for folder in (run, tmp_path))
    assert a["step"] == b["step"] == 12 and a["losses"] == b["losses"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert all(torch.equal(x, y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()) for x, y in
               zip(s.values(), t.values()))
    for name in ("ip-adapter.safetensors", "ip-adapter.bin", "adapters/ip-adapter-000012.safetensors"):
        assert (run / name).read_bytes() == (tmp_path / name).read_bytes(), name
    losses = [[json.loads(line)["loss"] for line in (f / "losses.jsonl").read_text().splitlines()] for f in (run, tmp_path)]
    assert losses[0] == losses[1]  # the log of steps 7 and 8, written before the interruption, was replaced


@pytest.mark.skipif(DEVICE != "cpu", reason="gloo runs on the CPU (one GPU cannot host two NCCL processes)")
def test_two_gloo_processes_equal_one(tiny_world, photos, run, tmp_path):
    """torchrun with 2 processes × 2 images ≡ 1 process × 4 images, 12 steps (float summation order aside)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minipa"]
    done = subprocess.run([*torchrun, *command(tiny_world, photos, tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True) for folder in (run, tmp_path))
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) <= 1e-5
    worst = max(float((a["model"][n] - b["model"][n]).abs().max()) for n in a["model"])
    print(f"largest weight difference after 12 steps: {worst:.1e}")
    assert worst <= 1e-5


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32(tiny_world, photos, tmp_path):
    """3 steps with bf16 frozen models and autocast, against fp32 from the same start: the adapter and AdamW's state
    stay float32; the losses agree within 1% (relative), the weight updates θ₃ − θ₀ within 20% in L2 (Adam's first
    steps move each weight by about ±lr, so a tiny gradient whose sign bf16 flips moves it the other way)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        summary = train_adapter(settings(tiny_world, photos, tmp_path / precision, steps=3, lr=1e-3, precision=precision))
        assert summary["precision"] == precision
        runs[precision] = torch.load(tmp_path / precision / "checkpoint.pt", map_location="cpu", weights_only=True)
    a, b = runs["fp32"], runs["bf16"]
    assert all(v.dtype == torch.float32 for v in b["model"].values())
    assert all(t.dtype == torch.float32 for s in b["optimizer"]["state"].values() for k, t in s.items() if k != "step")
    _, pipe = build_training(settings(tiny_world, photos, tmp_path / "start"), read_dataset(photos), Compute())
    start = {f"adapter.{n}": p.detach() for n, p in pipe.ip_adapter.named_parameters()}  # θ₀: the seed's initialisation
    update = {k: torch.cat([(run["model"][n] - start[n]).flatten() for n in start]) for k, run in runs.items()}
    loss_gap = max(abs(x - y) / x for x, y in zip(a["losses"], b["losses"]))
    update_gap = float((update["bf16"] - update["fp32"]).norm() / update["fp32"].norm())
    print(f"bf16 vs fp32 after 3 steps: losses within {loss_gap:.1e} (relative), updates within {update_gap:.1e} (relative L2)")
    assert 0 < loss_gap < 0.01 and 0 < update_gap < 0.2


def test_memory_options_leave_the_step_unchanged(tiny_world, photos, tmp_path):
    """Gradient checkpointing, the cache of encoded images and 2 micro-batches of gradient accumulation give the
    gradients of the plain step."""
    from minipa.train.adapter import checkpoint_unet_blocks
    from minipa.train.trainer import Schedule, fit

    dataset = read_dataset(photos)

    def step(module, pipe):
        module(module.batch(step_generator(0, 3), 4)).backward()
        return {n: p.grad.clone() for n, p in pipe.ip_adapter.named_parameters()}

    plain = step(*build_training(settings(tiny_world, photos, tmp_path), dataset, Compute()))
    module, pipe = build_training(settings(tiny_world, photos, tmp_path), dataset, Compute())
    checkpoint_unet_blocks(pipe.unet)
    assert all(torch.allclose(plain[n], g, rtol=0, atol=1e-7) for n, g in step(module, pipe).items())
    cached = step(*build_training(settings(tiny_world, photos, tmp_path, cache=True), dataset, Compute()))
    assert (tmp_path / "cache.pt").is_file()
    assert all(torch.allclose(plain[n], g, rtol=0, atol=1e-6) for n, g in cached.items())

    grads = []
    for n in (1, 2):  # the gradient the optimizer stepped with (fit leaves it in .grad)
        module, pipe = build_training(settings(tiny_world, photos, tmp_path), dataset, Compute())
        fit(module, Schedule(steps=1, batch_size=4, lr=1e-3, warmup=0), tmp_path / f"acc{n}.pt", name="acc", progress=False,
            compute=Compute(accumulation=n))
        grads.append({name: p.grad for name, p in pipe.ip_adapter.named_parameters()})
    assert all(torch.allclose(grads[0][n], g, rtol=0, atol=1e-7) for n, g in grads[1].items())


# ─── bad input ───────────────────────────────────────────────────────────────────────────────────


def bad_inputs(root: Path, photos: Path, world) -> list:
    """(what is wrong, extra arguments, words the one-line error must hold)."""
    (root / "empty").mkdir()
    (root / "uncaptioned").mkdir()
    Image.new("RGB", (32, 32)).save(root / "uncaptioned" / "lonely.png")
    (root / "broken").mkdir()
    (root / "broken" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    (root / "broken" / "bad.txt").write_text("a caption")
    (root / "list.json").write_text(json.dumps([{"image_file": "photo00.png", "text": "ok"}, {"text": "no image"}]))
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from conftest import TINY_VISION

    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, "projection_dim": 24})).save_pretrained(root / "narrow")
    return [
        ("an empty folder", ["--data", str(root / "empty")], ["empty", "no images found"]),
        ("an image without a caption", ["--data", str(root / "uncaptioned")], ["lonely.png", "no caption", "--allow-empty-captions"]),
        ("an unreadable image", ["--data", str(root / "broken")], ["bad.png", "not an image file"]),
        ("a record without image_file", ["--data", str(root / "list.json"), "--image-root", str(photos)],
         ["list.json", "record 1", "image_file"]),
        ("an image encoder of another width", ["--image-encoder", str(root / "narrow"), "--init-adapter", str(world["ip_safetensors"])],
         ["narrow", "24-wide", "48-wide"]),
        ("a resolution that is no multiple of 8", ["--resolution", "60"], ["--resolution", "multiple of 8", "60"]),
        ("fp16 on the CPU", ["--precision", "fp16", "--device", "cpu"], ["fp16", "CUDA", "bf16"]),
    ]


def test_bad_input_stops_before_training_with_one_line_naming_the_file(tiny_world, photos, tmp_path, capsys, monkeypatch):
    import minipa.train.adapter

    monkeypatch.setattr(minipa.train.adapter, "fit", lambda *args, **kwargs: pytest.fail("training started"))
    cases = bad_inputs(tmp_path, photos, tiny_world)
    capsys.readouterr()  # what writing the cases printed
    for what, extra, words in cases:
        out = tmp_path / "out" / what.replace(" ", "_")
        assert cli([*command(tiny_world, photos, out), *extra]) == 1, what
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) == 1 and all(w in message for w in words), (what, message)
        assert not (out / "checkpoint.pt").exists(), what
    examples = read_dataset(tmp_path / "uncaptioned", allow_empty_captions=True).examples
    assert [e.caption for e in examples] == [""]
