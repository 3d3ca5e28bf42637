"""Training: the shared loop (determinism, atomic checkpoints, bit-for-bit resume, DDP), each stage's
recipe, and the export formats (loaded back by minipa *and* by diffusers/transformers)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minipa.data.shapes import ShapesDataset, scene_labels
from minipa.ip_adapter import IPAdapter
from minipa.train.classifier import ClassifierTraining, ShapeClassifier
from minipa.train.ip_adapter import IPAdapterTraining
from minipa.train.trainer import CheckpointError, Schedule, fit, step_generator
from minipa.train.unet import DiffusionData
from minipa.train.world import EXTRA_STAGES, STAGES, WorldConfig, train_world
from minipa.unet import UNet2DConditionModel
from minipa.weights import WeightsError, verify_manifest

ROOT = Path(__file__).resolve().parent.parent


def _classifier_module(seed=0):
    data = ShapesDataset("train", 16)
    torch.manual_seed(seed)
    return ClassifierTraining(ShapeClassifier(width=8), data.images(), scene_labels(data.scenes()))


SCHEDULE = Schedule(steps=6, batch_size=4, lr=1e-3, warmup=2, checkpoint_every=2, ema=0.9)


class Interrupting(ClassifierTraining):
    """Raises KeyboardInterrupt (as Ctrl-C would) when asked for the batch of step `at`."""

    at = 3

    def batch(self, generator, size):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > self.at:
            raise KeyboardInterrupt
        return super().batch(generator, size)


def test_resume_after_interrupt_is_bit_for_bit(tmp_path):
    straight = _classifier_module()
    reference = fit(straight, SCHEDULE, tmp_path / "a.pt", name="cls", progress=False)

    interrupted = _classifier_module()
    interrupted.__class__ = Interrupting
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, SCHEDULE, tmp_path / "b.pt", name="cls", progress=False)
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert saved["step"] == 2  # the checkpoint of step 2 is intact; step 3 never completed
    assert not (tmp_path / "b.pt.tmp").exists()

    resumed = _classifier_module(seed=123)  # a different init: everything must come from the checkpoint
    result = fit(resumed, SCHEDULE, tmp_path / "b.pt", name="cls", resume=True, progress=False)
    assert result["losses"] == reference["losses"]
    for name, value in reference["ema"].items():
        assert torch.equal(result["ema"][name], value), name
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_randomness_comes_only_from_seed_and_step():
    module = _classifier_module()
    a, b = module.batch(step_generator(0, 5), 4), module.batch(step_generator(0, 5), 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(module.batch(step_generator(0, 6), 4)["noise"], a["noise"])


def test_resuming_with_other_settings_is_refused(tmp_path):
    fit(_classifier_module(), dataclasses.replace(SCHEDULE, steps=2), tmp_path / "c.pt", name="cls", progress=False)
    with pytest.raises(CheckpointError, match="would not continue the same run"):
        fit(_classifier_module(), dataclasses.replace(SCHEDULE, steps=2, lr=5e-4), tmp_path / "c.pt", name="cls",
            resume=True, progress=False)


def test_learning_rate_warms_up_then_decays():
    s = Schedule(steps=100, batch_size=1, lr=1.0, warmup=10, final_lr_fraction=0.1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0) and s.lr_at(99) == pytest.approx(0.1, abs=1e-3)


def _adapter_setup(init_from_text: bool = False, **rates):
    config = WorldConfig.smoke().unet
    torch.manual_seed(0)
    unet = UNet2DConditionModel(config)
    n = 32
    data = DiffusionData(torch.randn(n, 4, 8, 8), torch.full((n, 4, 8, 8), 0.1), 0.5, torch.randn(5, 77, 32),
                         torch.randint(0, 4, (n,)), torch.randn(n, 16))
    adapter = IPAdapter.for_unet(unet, 16, 4)
    if init_from_text:  # W′ ← W (only the recipe test needs it: the dropping tests then run no other assignment)
        adapter.init_from_text_attention(unet)
    return unet, adapter, IPAdapterTraining(unet, adapter, data, **rates)


def test_the_judge_learns_colours_only_from_images_in_their_true_colours():
    module = _classifier_module()
    batch = module.batch(step_generator(0, 0), 8)
    batch["order"] = torch.full((8,), 5)  # RGB → BGR
    batch["noise"].zero_()
    seen = []
    module.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    for recolour in (True, False):
        batch["recolour"] = torch.full((8,), recolour)
        module.classifier.zero_grad()
        module(batch).backward()
        grads = {k: module.classifier.heads[k].weight.grad.abs().sum().item() for k in ("shape", "colour", "background")}
        assert grads["shape"] > 0
        assert (grads["colour"] == 0 and grads["background"] == 0) == recolour
    pixels = module.images[batch["index"]].float() / 127.5 - 1  # (B, H, W, 3)
    assert torch.allclose(seen[0], pixels.flip(-1).permute(0, 3, 1, 2))  # shuffled: the channels reversed
    assert torch.allclose(seen[1], pixels.permute(0, 3, 1, 2))


def test_ip_adapter_recipe_trains_only_the_adapter_from_text_weights():
    unet, adapter, module = _adapter_setup(init_from_text=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"adapter.{n}" for n, _ in adapter.named_parameters()}
    first = adapter.layers["1"]
    assert torch.equal(first.to_k_ip.weight, unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight)
    frozen = {n: p.clone() for n, p in unet.named_parameters() if "_ip" not in n}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    module(module.batch(step_generator(0, 0), 4)).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in unet.named_parameters() if n in frozen)
    assert not torch.equal(first.to_k_ip.weight, unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight)


# ─── Dropping conditions (a course assignment): each band of u, then the rates ─────────────────────


def dropped(module, u: list[float]) -> tuple[list[bool], list[bool], dict]:
    """batch() with the uniform numbers u: which samples lost the image, which the text (and the batch)."""
    draw = module.draw
    module.draw = lambda generator, size: {**draw(generator, size), "u": torch.tensor(u)}
    try:
        b = module.batch(step_generator(0, 0), len(u))
    finally:
        del module.draw
    return (b["keep_image"] == 0).tolist(), (b["caption"] == module.data.empty).tolist(), b


def test_keep_image_is_a_float_one_or_zero():
    """forward multiplies the image embedding by keep_image: a float, 1.0 where the image stays."""
    _, _, module = _adapter_setup(image_drop=0.1, text_drop=0.2, both_drop=0.3)
    _, _, b = dropped(module, [0.05, 0.9])
    keep = b["keep_image"]
    assert keep.dtype == torch.float32 and set(keep.tolist()) <= {0.0, 1.0}, (
        f"keep_image must be a float tensor of 1.0 (keep the image) and 0.0 (drop it), since forward multiplies the image "
        f"embedding by it; yours is {keep.dtype} {keep.tolist()}")


def test_condition_dropping_follows_the_running_sums_of_the_rates():
    """One u per sample: [0, p_i) drops the image, [p_i, p_i+p_t) the text, [p_i+p_t, p_i+p_t+p_b) both, the rest nothing."""
    _, _, module = _adapter_setup(image_drop=0.1, text_drop=0.2, both_drop=0.3)
    bands = [("[0, p_i) = [0, 0.1): only the image", (True, False), [0.0, 0.05, 0.099]),
             ("[p_i, p_i + p_t) = [0.1, 0.3): only the text", (False, True), [0.1, 0.2, 0.299]),
             ("[p_i + p_t, p_i + p_t + p_b) = [0.3, 0.6): both the image and the text", (True, True), [0.3, 0.45, 0.599]),
             ("[p_i + p_t + p_b, 1) = [0.6, 1): nothing", (False, False), [0.6, 0.8, 0.999])]
    u = [x for *_, us in bands for x in us]
    image, text, _ = dropped(module, u)
    want_image = [w[0] for _, w, us in bands for _ in us]
    want_text = [w[1] for _, w, us in bands for _ in us]
    if image == [not w for w in want_image]:
        pytest.fail("keep_image is inverted: it must be 0.0 where the image is dropped and 1.0 where it stays")
    if text == [not w for w in want_text]:
        pytest.fail("the caption choice is inverted: self.data.empty where the text is dropped, the sample's own caption elsewhere")
    words = {(False, False): "nothing", (True, False): "only the image", (False, True): "only the text", (True, True): "the image and the text"}
    for i, x in enumerate(u):
        band, want, _ = bands[i // 3]
        got = (image[i], text[i])
        hint = {(0, (True, True)): ": the cases overlap — compare u with the running sums p_i, p_i + p_t, p_i + p_t + p_b",
                (2, (False, False)): ": the third case, both dropped, is missing",
                (2, (True, False)): ": the third case drops the text too", (2, (False, True)): ": the third case drops the image too"}
        assert got == want, (f"u = {x} falls in {band} must be dropped (rates p_i, p_t, p_b = 0.1, 0.2, 0.3); yours dropped "
                             f"{words[got]}{hint.get((i // 3, got), '')}")


def test_condition_dropping_rates():
    _, _, module = _adapter_setup(image_drop=0.05, text_drop=0.45, both_drop=0.05)
    b = module.batch(step_generator(0, 0), 20_000)
    no_text = b["caption"] == module.data.empty
    no_image = b["keep_image"] == 0
    for what, share, want, tolerance in (("only the image", no_image & ~no_text, 0.05, 0.01), ("only the text", no_text & ~no_image, 0.45, 0.015),
                                         ("both", no_text & no_image, 0.05, 0.01)):
        got = float(share.float().mean())
        assert got == pytest.approx(want, abs=tolerance), f"with rates (0.05, 0.45, 0.05), {what} must be dropped {want:.0%} of the time, yours {got:.1%}"
    with pytest.raises(ValueError, match="add up to more than 1"):
        _adapter_setup(image_drop=0.5, text_drop=0.5, both_drop=0.5)


def test_unet_batches_mix_phrasings_and_empty_captions(smoke_world):
    """10% empty captions (for CFG); the rest one phrasing of the image's caption, each drawn as often as
    `phrasing_probs` says; each row's text tokens are the text encoder's output for that phrasing."""
    from minipa.data.shapes import Phrasings
    from minipa.loading import load_text_encoder, load_tokenizer
    from minipa.train.unet import UNetTraining
    from minipa.train.world import World

    root, _ = smoke_world
    world = World(WorldConfig.smoke(), root / "out", root / "work", resume=True, progress=False)
    data = world.diffusion_data()
    module = UNetTraining(UNet2DConditionModel(WorldConfig.smoke().unet), data)
    b = module.batch(step_generator(0, 0), 40_000)
    empty = b["caption"] == data.empty
    which = (b["caption"][:, None] == data.phrasing_index[b["index"]])  # (B, K): which phrasings the row is
    assert bool((empty ^ which.any(dim=1)).all())  # every row is the empty caption or a phrasing of its own image
    assert float(empty.float().mean()) == pytest.approx(0.1, abs=0.01)
    caption_form = b["caption"] == data.caption_index[b["index"]]  # phrasing 0, the caption itself
    assert float(caption_form.float().mean()) == pytest.approx(0.9 * float(data.phrasing_probs[0]), abs=0.01)
    own = Phrasings.of([world.train_set["scenes"][3]])  # image 3's phrasings, encoded here on their own
    encoder, tokenizer = load_text_encoder(root / "out" / "text_encoder", dtype=torch.float32), load_tokenizer(root / "out" / "tokenizer")
    with torch.no_grad():
        expected = encoder(tokenizer(own.texts))[own.index[0]]  # (K, 77, D)
    torch.testing.assert_close(data.text[data.phrasing_index[3]], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty_caption_rate must be in"):
        UNetTraining(module.unet, data, empty_caption_rate=1.5)


def test_unet_curriculum_shows_the_caption_form_first(smoke_world):
    """With `caption_steps`, the steps before it draw each image's caption alone; from it on, its phrasings."""
    from minipa.train.trainer import fit
    from minipa.train.unet import UNetTraining
    from minipa.train.world import World

    root, _ = smoke_world
    world = World(WorldConfig.smoke(), root / "out", root / "work", resume=True, progress=False)
    data = world.diffusion_data()
    module = UNetTraining(UNet2DConditionModel(WorldConfig.smoke().unet), data, caption_steps=2)
    seen = []
    module.forward = lambda b: seen.append(b["caption"].clone()) or module.unet.conv_in.weight.sum() * 0
    fit(module, dataclasses.replace(WorldConfig.smoke().unet_schedule, steps=4, batch_size=4096), root / "curriculum.pt",
        name="curriculum", progress=False)
    for step, caption in enumerate(seen):
        index = module.batch(step_generator(WorldConfig.smoke().unet_schedule.seed, step), 4096)["index"]
        spoken = caption != data.empty
        caption_form = float((caption == data.caption_index[index])[spoken].float().mean())
        if step < 2:
            assert caption_form == 1.0, f"step {step} is before caption_steps = 2: only captions, found {caption_form:.1%}"
        else:
            assert caption_form == pytest.approx(float(data.phrasing_probs[0]), abs=0.03), f"step {step}: the phrasings"
    with pytest.raises(ValueError, match="caption_steps must be"):
        UNetTraining(module.unet, data, caption_steps=-1)


def test_clip_stages_show_only_phrasings_that_name_every_attribute(smoke_world):
    """CLIP's phrasings, where it is shown any, leave nothing out (with omissions the towers lost the shapes:
    weights/HISTORY.md); by default it is shown none. The UNet's data keeps them all."""
    from minipa.train.world import World

    root, _ = smoke_world
    world = World(WorldConfig.smoke(), root / "out", root / "work", resume=True, progress=False)
    assert world._phrasings(None) == {}
    world.config = dataclasses.replace(world.config, clip_phrasings=True)
    shown = world._phrasings(lambda texts: torch.zeros(len(texts), 77, dtype=torch.long))["phrasings"]  # ids unused here
    drawn = shown.index[:, shown.probs > 0]
    assert (shown.attributes[drawn] >= 0).all() and (shown.attributes < 0).any()  # the strings are all there, undrawn
    assert (world.diffusion_data().phrasing_probs > 0).all()


def test_adapter_batches_show_the_same_phrasings(smoke_world):
    """The adapter's stage draws the text as the UNet's does: where it is not dropped, one phrasing of the image's caption."""
    from minipa.train.world import World

    root, _ = smoke_world
    world = World(WorldConfig.smoke(), root / "out", root / "work", resume=True, progress=False)
    module = world._adapter_module("decoupled")
    b = module.batch(step_generator(0, 0), 40_000)
    kept = b["caption"] != module.data.empty
    own = (b["caption"][:, None] == module.data.phrasing_index[b["index"]]).any(dim=1)
    assert bool(own[kept].all()) and float(kept.float().mean()) == pytest.approx(1 - 0.05 - WorldConfig.smoke().text_drop, abs=0.01)
    caption_form = b["caption"][kept] == module.data.caption_index[b["index"][kept]]
    assert float(caption_form.float().mean()) == pytest.approx(float(module.data.phrasing_probs[0]), abs=0.01)


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    """Every stage of the tiny world, at toy size, 3 steps each (the same code as the real run)."""
    root = tmp_path_factory.mktemp("world")
    summary = train_world(WorldConfig.smoke(), root / "out", root / "work", stages=STAGES + EXTRA_STAGES, progress=False)
    return root, summary


def test_the_whole_world_trains_and_exports_in_the_real_formats(smoke_world):
    root, summary = smoke_world
    out = root / "out"
    assert set(summary["stages"]) == set(STAGES) | {"ablation", "ip_plus"}
    assert all(r["steps"] == 3 for r in summary["stages"].values())
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "text_encoder/model.safetensors", "image_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "scheduler/scheduler_config.json", "ip-adapter.safetensors", "eval.safetensors", "SHA256SUMS"):
        assert (out / f).is_file(), f
    verify_manifest(out)
    from safetensors import safe_open

    with safe_open(str(out / "ip-adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"} <= keys
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)


def test_exported_world_loads_and_generates_through_load_pipeline(smoke_world):
    from minipa.pipeline import load_pipeline

    out = smoke_world[0] / "out"
    pipe = load_pipeline(out, ip_adapter=out / "ip-adapter.safetensors")  # image_encoder/: found beside the adapter
    assert pipe.ip_adapter is not None and pipe.image_encoder is not None
    image = pipe("a small red star on a blue background", ip_image=ShapesDataset("test", 1).images()[0].numpy(),
                 ip_scale=0.5, num_steps=2, progress=False)[0]
    assert image.size == (64, 64)


def test_exported_world_matches_diffusers_and_transformers(smoke_world):
    """The export is the real format: the reference libraries load it and compute what minipa computes."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from minipa.pipeline import load_pipeline

    out = smoke_world[0] / "out"
    pipe = load_pipeline(out, ip_adapter=out / "ip-adapter.safetensors")
    torch.manual_seed(0)
    ids = pipe.tokenizer(["a large green circle on a red background", ""])
    text_ref = transformers.CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert (text_ref(ids).last_hidden_state - pipe.text_encoder(ids)).abs().max() < 1e-4
        pixels = torch.randn(2, 3, 224, 224)
        vision_ref = transformers.CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder", torch_dtype=torch.float32)
        assert (vision_ref.eval()(pixels).image_embeds - pipe.image_encoder(pixels).image_embeds).abs().max() < 1e-4
        unet_ref = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32).eval()
        x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        pipe.unet.eval()
        from minipa.ip_scale import set_ip_scale

        set_ip_scale(pipe.unet, 0.0)
        assert (unet_ref(x, 500, context).sample - pipe.unet(x, 500, context)).abs().max() < 1e-4
        vae_ref = diffusers.AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
        z = torch.randn(1, 4, 8, 8)
        assert (vae_ref.decode(z).sample - pipe.vae.decode(z)).abs().max() < 1e-4
        assert vae_ref.config.scaling_factor == pipe.vae.config.scaling_factor


def test_extra_stages_load_and_evaluate(smoke_world):
    """The ablation's image_proj and the IP-Adapter Plus experiment go through `minipa eval`'s loaders and rows."""
    from minipa.eval import evaluate
    from minipa.ip_adapter import cross_attention_layers
    from minipa.pipeline import load_pipeline
    from minipa.train.world import EVAL_FILE, load_concat_projection, load_plus_adapter

    root = smoke_world[0]
    pipe = load_pipeline(root / "out", ip_adapter=root / "out" / "ip-adapter.safetensors")
    plus = load_plus_adapter(root / "work", pipe)
    assert plus.plus and plus.image_proj.num_tokens == WorldConfig.smoke().ip_plus_tokens
    rows = evaluate(pipe, root / "out" / EVAL_FILE, n=2, steps=1, concat_proj=load_concat_projection(root / "work", pipe),
                    plus_adapter=plus)
    for name in ("ip_adapter", "concat_ablation", "ip_adapter_plus"):
        assert 0 <= rows[f"{name}_image_only_heldout"]["all"] <= 1
    for name in ("text_to_image_test_without_size", "text_to_image_test_new_phrasings", "text_only_reference_test"):
        assert 0 <= rows[name]["all"] <= 1
    by_order = [rows[f"text_to_image_test_new_phrasings/{t}"]["colour"] for t in ("background_first", "with_after")]  # n = 2: one each
    assert sum(by_order) / 2 == pytest.approx(rows["text_to_image_test_new_phrasings"]["colour"])
    assert "text_to_image_test_new_phrasings/list_background_first" not in rows
    index, _, first = cross_attention_layers(pipe.unet)[0]
    assert first.to_k_ip is pipe.ip_adapter.layers[str(index)].to_k_ip  # the pipeline's own adapter is back
    assert load_plus_adapter(root / "nowhere", pipe) is None


def test_a_mis_shaped_ablation_file_is_named(smoke_world, tmp_path):
    from safetensors.torch import save_file

    from minipa.pipeline import load_pipeline
    from minipa.train.world import load_concat_projection
    from minipa.weights import WeightsError

    pipe = load_pipeline(smoke_world[0] / "out")
    (tmp_path / "ablation").mkdir()
    save_file({"proj.weight": torch.zeros(7, 5)}, tmp_path / "ablation" / "concat_image_proj.safetensors")  # 7 is no multiple of D
    with pytest.raises(WeightsError, match=r"concat_image_proj\.safetensors.*run the `ablation` stage again"):
        load_concat_projection(tmp_path, pipe)


def test_the_resized_clip_images_are_dropped_after_the_last_clip_stage(tmp_path):
    """`World.run` keeps the training images resized for CLIP (1.5 GB in the real run) while a CLIP stage
    is still to come in the list, and drops them after the last one."""
    from minipa.train.world import World

    world = World(WorldConfig.smoke(), tmp_path / "out", tmp_path / "work", progress=False)
    held = {}

    def stage(name):
        def run():
            if name.startswith("clip"):
                world.resized_images  # what the CLIP stages read
            held[name] = "resized" in world.train_set
            return {}
        return run

    for name in ("clip", "vae", "clip_shapes", "unet"):
        setattr(world, f"stage_{name}", stage(name))
    world.run(("clip", "vae", "clip_shapes", "unet"))
    assert held == {"clip": True, "vae": True, "clip_shapes": True, "unet": False}


def test_steps_option_changes_only_the_named_stages(tmp_path, capsys):
    """`minipa train --steps unet=5000,ip=1500`: those two schedules get the new counts, nothing else changes;
    a bad value is a one-line error naming --steps, before anything is written."""
    from minipa.cli import main, parse_steps

    base = WorldConfig.tiny()
    config = base.with_steps(parse_steps("unet=5000, ip=1500"))
    assert (config.unet_schedule.steps, config.ip_schedule.steps) == (5000, 1500)
    assert dataclasses.replace(config, unet_schedule=base.unet_schedule, ip_schedule=base.ip_schedule) == base
    for bad, says in [("unet5000", "--steps: expected STAGE=N"), ("unet=2.5", "found 'unet=2.5'"),
                      ("ablation=3", "the extras train with ip's"), ("unett=3", "no stage 'unett'"), ("unet=0", "≥ 1")]:
        assert main(["train", "--steps", bad, "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]) == 1
        assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_steps_option_trains_a_stage_that_many_steps(tmp_path):
    from minipa.cli import main

    args = ["train", "--preset", "smoke", "--stages", "clip", "--steps", "clip=2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]) == 0
    assert json.loads((tmp_path / "w" / "clip" / "done.json").read_text())["steps"] == 2


def test_train_refuses_to_overwrite_a_run_without_resume(smoke_world):
    root, _ = smoke_world
    with pytest.raises(FileExistsError, match="--resume"):
        train_world(WorldConfig.smoke(), root / "out", root / "work", stages=("vae",), progress=False)
    again = train_world(WorldConfig.smoke(), root / "out", root / "work", stages=("vae",), resume=True, progress=False)
    assert again["stages"]["vae"] == json.loads((root / "work" / "vae" / "done.json").read_text())


def test_manifest_mismatch_is_a_clear_error(smoke_world, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(smoke_world[0] / "out", copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    (copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(WeightsError, match="2 file") as err:
        verify_manifest(copy, restore_hint="retrain with minipa train")
    message = str(err.value)
    assert "vae/diffusion_pytorch_model.safetensors: sha256 mismatch" in message
    assert "tokenizer/merges.txt: missing" in message and "retrain with minipa train" in message


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes × half the batch ≡ 1 process with the whole batch (VAE stage); ~10 s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "minipa.train", "--preset", "smoke", "--stages", "vae", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "o1"), "--work", str(tmp_path / "w1")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    subprocess.run([*torchrun, *args, "--out", str(tmp_path / "o2"), "--work", str(tmp_path / "w2")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    one = json.loads((tmp_path / "w1" / "vae" / "losses.json").read_text())
    two = json.loads((tmp_path / "w2" / "vae" / "losses.json").read_text())
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5  # float summation order differs, nothing else
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "o1" / "vae" / "diffusion_pytorch_model.safetensors"))
    w2 = load_file(str(tmp_path / "o2" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) < 1e-3  # fp16 files: ≤ one fp16 step


def test_clip_phase_two_contrasts_each_image_with_every_caption():
    """Phase 2's loss: CE of each image against all C captions, both towers training; encoding the
    captions only up to the longest <|endoftext|> gives the same features as the full 77 tokens."""
    from minipa.clip import CLIPTextModel, CLIPVisionModelWithProjection
    from minipa.data.shapes import caption_table, clip_resize, tiny_tokenizer
    from minipa.train.clip import CLIPTraining

    config = WorldConfig.smoke()
    data = ShapesDataset("train", 16)
    captions, index = caption_table(data.scenes())
    torch.manual_seed(0)
    module = CLIPTraining(CLIPTextModel(config.text), CLIPVisionModelWithProjection(config.vision), clip_resize(data.images()),
                          tiny_tokenizer()(captions), index)
    module.contrast_with_every_caption()
    assert module.caption_ids.shape[1] < 77
    batch = module.batch(step_generator(0, 0), 4)
    loss = module(batch)
    index = torch.randint(len(data), (4,), generator=step_generator(0, 0))  # the batch's draw
    u = module.embed_images(data.images()[index])  # resized afresh (the module keeps its images resized)
    v = module.embed_text(tiny_tokenizer()(captions))  # all C captions, all 77 positions
    expected = torch.nn.functional.cross_entropy(module.logit_scale.exp() * u @ v.T, batch["captions"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert module.text_encoder.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0  # the text tower trains too
    assert all(p.grad is not None for p in module.image_encoder.parameters() if p.requires_grad)


def test_clip_phrasings_fit_every_image_they_describe():
    """With phrasings, phase 2's candidates are the C captions and the batch's phrasings, and the target of an
    image spreads evenly over every candidate that describes it: its caption, and each phrasing that is one of
    its own caption's phrasings ("on a blue background" describes every image on blue)."""
    from minipa.clip import CLIPTextModel, CLIPVisionModelWithProjection
    from minipa.data.shapes import Phrasings, caption_table, clip_resize, tiny_tokenizer
    from minipa.train.clip import CLIPTraining

    config, data = WorldConfig.smoke(), ShapesDataset("train", 16)
    scenes = data.scenes()
    captions, index = caption_table(scenes)
    phrasings, tokenizer = Phrasings.of(scenes), tiny_tokenizer()
    torch.manual_seed(0)
    module = CLIPTraining(CLIPTextModel(config.text), CLIPVisionModelWithProjection(config.vision), clip_resize(data.images()),
                          tokenizer(captions), index, phrasings=phrasings, phrasing_ids=tokenizer(phrasings.texts))
    module.contrast_with_every_caption()
    batch = module.batch(step_generator(0, 0), 64)
    texts = captions + [phrasings.texts[p] for p in batch["phrasing"]]
    own = [set(Phrasings.of([scenes[i]]).texts) for i in batch["index"]]
    fits = torch.tensor([[t == captions[index[i]] if j < len(captions) else t in own[row]
                          for j, t in enumerate(texts)] for row, i in enumerate(batch["index"])]).float()
    assert (fits[:, len(captions):].sum(dim=1) > 1).any()  # some phrasings describe several images of the batch
    u = module.embed_images(data.images()[batch["index"]])
    v = module.embed_text(tokenizer(texts))
    expected = torch.nn.functional.cross_entropy(module.logit_scale.exp() * u @ v.T, fits / fits.sum(dim=1, keepdim=True))
    torch.testing.assert_close(module(batch), expected, rtol=1e-5, atol=1e-5)


def test_clip_phase_three_trains_the_image_tower_alone_on_shuffled_copies():
    """The `clip_shapes` stage: the text side frozen, every 2nd row adds a channel-shuffled image against
    its (shape, size) prototype, and a batch split over processes uses the same rows as the whole."""
    from minipa.clip import CLIPTextModel, CLIPVisionModelWithProjection
    from minipa.data.shapes import caption_table, clip_normalise, clip_resize, scene_labels, tiny_tokenizer
    from minipa.train.classifier import CHANNEL_ORDERS
    from minipa.train.clip import ShapeTraining
    from minipa.train.trainer import local_slice

    config = WorldConfig.smoke()
    data = ShapesDataset("train", 16)
    captions, index = caption_table(data.scenes())
    labels = scene_labels(data.scenes())
    torch.manual_seed(0)
    module = ShapeTraining(CLIPTextModel(config.text), CLIPVisionModelWithProjection(config.vision), clip_resize(data.images()),
                           tiny_tokenizer()(captions), index, shape_size=2 * labels["shape"] + labels["size"])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"prototypes"} | {f"image_encoder.{n}" for n, _ in module.image_encoder.named_parameters()}
    batch = module.batch(step_generator(0, 0), 8)
    seen = []
    module.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    loss = module(batch)
    loss.backward()
    pixels = seen[0]  # (8 + 4, 3, 224, 224), CLIP-normalised
    other, order = batch["other"][::2], CHANNEL_ORDERS[batch["order"][::2]]
    expected = clip_resize(data.images()[other])
    expected = torch.stack([e[o] for e, o in zip(expected, order)])
    torch.testing.assert_close(pixels[8:], clip_normalise(expected))
    u = torch.nn.functional.normalize(module.image_encoder(pixels).image_embeds, dim=-1)
    scale = module.logit_scale.exp()
    v = module.embed_text(module.caption_ids)
    shape_loss = torch.nn.functional.cross_entropy(scale * u[8:] @ torch.nn.functional.normalize(module.prototypes, dim=-1).T,
                                                   2 * labels["shape"][other] + labels["size"][other])
    caption_loss = torch.nn.functional.cross_entropy(scale * u[:8] @ v.T, batch["captions"])
    torch.testing.assert_close(loss, caption_loss + shape_loss, rtol=1e-5, atol=1e-5)
    assert module.prototypes.grad.abs().sum() > 0
    halves = [local_slice(batch, r, 2)["other"][::2] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), batch["other"][::2])  # the same shuffled images under torchrun



def test_binding_labels_put_each_attribute_on_the_word_it_belongs_to():
    """The `clip_words` targets: the shape's noun carries its shape, colour and size, "background" (or, in "… on
    blue" and "on blue, …", the colour word after "on") the background colour, every other token nothing — in any
    word order."""
    from minipa.data.shapes import HELD_OUT_TEMPLATES, TEMPLATES, Phrasings, Scene, tiny_tokenizer
    from minipa.train.clip import binding_labels

    tokenizer = tiny_tokenizer()
    phrasings = Phrasings.of([Scene("star", "red", "blue", "small", "plain", 0.5, 0.5)], {**TEMPLATES, **HELD_OUT_TEMPLATES})
    labels = binding_labels(tokenizer.vocab, phrasings, tokenizer(phrasings.texts)[:, :12])
    star = (3, 0, -1, 0)  # (shape, colour, background, size): star, red, —, small
    nothing, blue = (-1, -1, -1, -1), (-1, -1, 2, -1)
    expected = {
        "a blue background with a small red star": [nothing, nothing, blue, nothing, nothing, nothing, nothing, star],
        "on a blue background, a small red star": [nothing, nothing, nothing, blue, nothing, nothing, nothing, nothing, star],
        "a small red star on blue": [nothing, nothing, nothing, star, nothing, blue],
        "on blue, a small red star": [nothing, blue, nothing, nothing, nothing, nothing, star],
        "on blue, a small red shape": [nothing, blue, nothing, nothing, nothing, nothing, (-1, 0, -1, 0)],
        "small red shape on a blue background": [nothing, nothing, (-1, 0, -1, 0), nothing, nothing, nothing, blue],
        "small star on a blue background": [nothing, (3, -1, -1, 0), nothing, nothing, nothing, blue],
        "a red star": [nothing, nothing, (3, 0, -1, -1)],
    }
    for text, rows in expected.items():
        got = labels[phrasings.texts.index(text)]
        assert got[1 : len(rows) + 1].tolist() == [list(r) for r in rows], text  # position 0 is <|startoftext|>
        assert (got[0] == -1).all() and (got[len(rows) + 1 :] == -1).all(), text


def test_clip_phase_four_trains_the_text_tower_on_the_phrasings():
    """The `clip_words` stage: the text tower, its projection and the heads train (τ stays); the loss is the heads'
    cross-entropy at the labelled tokens plus phase 2's image-against-every-caption term on the frozen image embeddings."""
    from minipa.clip import CLIPTextModel
    from minipa.data.shapes import Phrasings, caption_table, tiny_tokenizer
    from minipa.train.clip import WordTraining, binding_labels

    config = WorldConfig.smoke()
    data = ShapesDataset("train", 16)
    captions, index = caption_table(data.scenes())
    tokenizer = tiny_tokenizer()
    phrasings = Phrasings.of(data.scenes())
    torch.manual_seed(0)
    text = CLIPTextModel(config.text)
    projection, scale = torch.randn(16, config.text.hidden_size), torch.tensor(2.5)
    embeds = torch.nn.functional.normalize(torch.randn(16, 16), dim=-1)
    labels = binding_labels(tokenizer.vocab, phrasings, tokenizer(phrasings.texts)[:, :12])
    module = WordTraining(text, projection, scale, embeds, tokenizer(captions), index, phrasings, tokenizer(phrasings.texts), labels)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"text_encoder.{n}" for n, _ in text.named_parameters()} | {"text_projection.weight"} | {
        f"heads.{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    batch = module.batch(step_generator(0, 0), 8)
    assert ((phrasings.index[batch["index"]] == batch["phrasing"][:, None]).any(dim=1)).all()  # a phrasing of its own image
    loss = module(batch)
    ids = tokenizer(phrasings.texts)[batch["phrasing"], :12]
    hidden, want = text(ids), labels[batch["phrasing"]]
    binding = 0
    for j, head in enumerate(module.heads):
        at = want[..., j] >= 0
        binding = binding + torch.nn.functional.cross_entropy(head(hidden[at]), want[..., j][at])
    caption_ids = tokenizer(captions)
    v = torch.nn.functional.normalize(text.pool(caption_ids, text(caption_ids)) @ projection.T, dim=-1)
    contrast = torch.nn.functional.cross_entropy(scale.exp() * embeds[batch["index"]] @ v.T, index[batch["index"]])
    torch.testing.assert_close(loss, binding + contrast, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(module.heads[j].weight.grad.abs().sum() > 0 for j in range(4)) and module.logit_scale.grad is None


def test_word_order_check_tells_words_that_bind_from_words_in_their_places():
    """`word_order_check` at its two extremes. States that hold, at every token, the scene the words describe (the
    colour just before the noun is the shape's, the one just before "background" or after "on" the background's)
    read every held-out word order. States that hold only each token's word and its position (a tower that mixes
    nothing) do not read the orders that name the background first."""
    from minipa.data.shapes import COLOURS, SHAPES, tiny_tokenizer
    from minipa.train.clip import word_order_check

    tokenizer = tiny_tokenizer()
    words = {i: t.removesuffix("</w>") for t, i in tokenizer.vocab.items()}

    def scene(ids: list[int]) -> torch.Tensor:  # one-hot (shape, its colour, background colour), 24 wide
        w = [words[i] for i in ids]
        state = torch.zeros(24)
        for k, word in enumerate(w):
            before = w[k - 1] if k else ""
            if word in SHAPES:
                state[SHAPES.index(word)] = 1
                if before in COLOURS:
                    state[4 + list(COLOURS).index(before)] = 1
            if word in COLOURS and (w[k + 1 : k + 2] == ["background"] or before == "on"):
                state[9 + list(COLOURS).index(word)] = 1
        return state

    def binding(texts):
        ids = tokenizer(texts)
        return torch.stack([scene(row.tolist()) for row in ids])[:, None, :].expand(-1, ids.shape[1], -1)

    generator = torch.Generator().manual_seed(0)
    table, places = torch.randn(len(tokenizer.vocab), 24, generator=generator), torch.randn(77, 24, generator=generator)

    def positions(texts):
        return table[tokenizer(texts)] + places

    bound, placed = word_order_check(binding, steps=300, seeds=1), word_order_check(positions, steps=300, seeds=1)
    assert min(bound.values()) > 0.95, bound
    assert max(placed["background_first"], placed["list_background_first"]) < 0.5, placed

def test_gpu_preset_is_the_tiny_recipe_with_more_unet_and_adapter_samples():
    from minipa.train.world import GPU_SAMPLES

    tiny, gpu = WorldConfig.tiny(), WorldConfig.gpu()
    assert gpu.unet_schedule.steps == GPU_SAMPLES * tiny.unet_schedule.steps >= 3 * tiny.unet_schedule.steps
    assert gpu.ip_schedule.steps == GPU_SAMPLES * tiny.ip_schedule.steps
    same = dataclasses.replace(gpu, unet_schedule=tiny.unet_schedule, ip_schedule=tiny.ip_schedule)
    assert same == tiny  # models, data and every other schedule unchanged


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_train_on_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    from minipa.cli import main

    assert main(["train", "--preset", "smoke", "--device", "cuda", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                 "--no-progress"]) != 0
    assert "PyTorch sees no CUDA GPU here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
