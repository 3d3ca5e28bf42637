"""The tiny world's dataset: deterministic, held-out splits, captions, the CLIP view and the tokenizer."""

import numpy as np
import pytest
import torch
from PIL import Image

from minipa.data.shapes import (
    BACKGROUNDS, COLOURS, HELD_OUT_TEMPLATES, OMISSIONS, PATTERNS, SHAPES, SIZES, TEMPLATES, Phrasings, ShapesDataset,
    all_combos, caption_table, caption_words, clip_pixels, held_out_combos, phrase, render, sample_scene, scene_labels,
    tiny_tokenizer, to_model_pixels, unknown_words,
)
from minipa.preprocess import CLIP_STD, preprocess_image
from minipa.loading import load_tokenizer
from minipa.tokenizer import END, START


def test_scenes_and_images_are_pure_functions_of_seed_split_and_index():
    a, b = ShapesDataset("train", 16, seed=3), ShapesDataset("train", 16, seed=3)
    assert a.scenes() == b.scenes()
    assert torch.equal(a.images(), b.images())
    assert ShapesDataset("train", 16, seed=4).scenes() != a.scenes()
    assert ShapesDataset("test", 16, seed=3).scenes() != a.scenes()


def test_held_out_combinations_never_appear_in_training():
    held_out = set(held_out_combos())
    assert len(held_out) == 8 and held_out < set(all_combos())
    train = {(s.shape, s.colour, s.background) for s in ShapesDataset("train", 3000).scenes()}
    assert not train & held_out
    assert train == set(all_combos()) - held_out  # every training combination is actually used
    assert {(s.shape, s.colour, s.background) for s in ShapesDataset("test", 500).scenes()} <= train
    assert {(s.shape, s.colour, s.background) for s in ShapesDataset("heldout", 200).scenes()} == held_out


@pytest.mark.parametrize("seed", [1, 2, 9])
def test_the_splits_do_not_move_with_the_seed(seed):
    """Evaluations draw new images with other seeds: their "heldout" must still be what training never saw."""
    held_out = set(held_out_combos())
    assert {(s.shape, s.colour, s.background) for s in ShapesDataset("heldout", 200, seed=seed).scenes()} == held_out
    assert not {(s.shape, s.colour, s.background) for s in ShapesDataset("test", 500, seed=seed).scenes()} & held_out
    assert not {(s.shape, s.colour, s.background) for s in ShapesDataset("train", 500, seed=seed).scenes()} & held_out


def test_captions_name_shape_colours_and_size_but_never_pattern_or_position():
    scene = sample_scene(0, "train", 5)
    assert scene.caption == f"a {scene.size} {scene.colour} {scene.shape} on a {scene.background} background"
    for s in ShapesDataset("train", 200).scenes():
        assert s.colour != s.background
        assert not any(p in s.caption for p in PATTERNS)
    assert {s.pattern for s in ShapesDataset("train", 200).scenes()} == set(PATTERNS)


def test_render_paints_the_shape_colour_inside_and_the_background_outside():
    scene = sample_scene(0, "train", 0)
    scene = type(scene)("circle", "red", "blue", "large", "plain", 0.5, 0.5)
    pixels = render(scene)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[32, 32]) == COLOURS["red"]
    assert tuple(pixels[1, 1]) == COLOURS["blue"]
    striped = render(type(scene)("square", "yellow", "green", "large", "striped", 0.5, 0.5))
    inside = striped[26:38, 26:38].reshape(-1, 3)
    assert len({tuple(p) for p in inside}) > 2  # light stripes, dark stripes and the anti-aliased edges between them


def test_labels_and_model_pixels():
    data = ShapesDataset("test", 8)
    labels = scene_labels(data.scenes())
    assert set(labels) == {"shape", "colour", "background", "size", "pattern"}
    assert SHAPES[int(labels["shape"][0])] == data.scene(0).shape
    assert BACKGROUNDS[int(labels["background"][0])] == data.scene(0).background
    x = data[0]["pixels"]
    assert x.shape == (3, 64, 64) and -1 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(to_model_pixels(data.images()[:1])[0], x)


def test_caption_table_indexes_distinct_captions():
    scenes = ShapesDataset("train", 50).scenes()
    captions, index = caption_table(scenes)
    assert len(set(captions)) == len(captions)
    assert all(captions[i] == s.caption for i, s in zip(index, scenes))


def test_clip_pixels_matches_preprocess_image_pil_path():
    """Training feeds the tiny CLIP through clip_pixels; inference through preprocess_image (PIL).
    PIL rounds its fixed-point bicubic weights, so a pixel may differ by up to two 8-bit steps."""
    images = ShapesDataset("test", 24).images()
    ours = clip_pixels(images)
    reference = preprocess_image([Image.fromarray(x) for x in images.numpy()])
    step = 1 / 255 / min(CLIP_STD)
    diff = (ours - reference).abs()
    assert ours.shape == reference.shape == (24, 3, 224, 224)
    assert float(diff.max()) <= 2 * step + 1e-6
    assert float((diff > 1e-5).float().mean()) < 0.01  # nearly every value is exact


def test_tiny_tokenizer_makes_one_token_per_caption_word_and_handles_any_text():
    tok = tiny_tokenizer()
    assert len(tok.vocab) < 600
    assert tok.vocab[END] == len(tok.vocab) - 1 and tok.vocab[START] == len(tok.vocab) - 2  # CLIP pools at the highest id
    for word in caption_words():
        assert len(tok.encode(word)) == 1, word
    text = "a small red star on a blue background"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == 8
    assert tok.decode(tok.encode("Ünïcødé 🐱 text!")) == "ünïcødé 🐱 text !"  # unknown words fall back to byte tokens


def test_phrasings_say_the_caption_in_other_words():
    assert phrase("star", "red", "blue", "small") == "a small red star on a blue background"  # the caption form
    assert phrase("star", "red", "blue", "small", "list", omit=("size",)) == "red star, blue background"
    assert phrase("star", "red", "blue", "small", "with") == "a blue background with a small red star"
    assert phrase("star", "red", "blue", "small", "on_first", omit=("size",)) == "on blue, a red star"
    assert phrase("star", "red", "blue", "small", "with_comma") == "a blue background, with a small red star"
    assert phrase("star", "red", "blue", "small", "short", omit=("shape",)) == "a small red shape on blue"
    assert phrase("star", "red", "blue", "small", omit=("shape", "colour", "size")) == "on a blue background"
    assert phrase("star", "red", "blue", "small", "list", omit=("background",)) == "small red star"
    assert phrase("star", "red", "blue", "small", "background_first") == "on a blue background, a small red star"
    with pytest.raises(ValueError, match="keep the subject or the background"):
        phrase("star", "red", "blue", "small", omit=("shape", "colour", "size", "background"))
    with pytest.raises(ValueError, match="omit: expected some of"):
        phrase("star", "red", "blue", "small", omit=("position",))


def test_whole_phrasings_name_every_attribute_in_each_training_order():
    """CLIP's phrasings (`Phrasings.whole`): the same strings, drawn only where nothing is left out, every
    template in its share."""
    phrasings = Phrasings.of(ShapesDataset("train", 20).scenes())
    whole = phrasings.whole()
    drawn = whole.index[:, whole.probs > 0]  # (N, templates): the rows CLIP can draw
    assert drawn.shape[1] == len(TEMPLATES) and (phrasings.attributes[drawn] >= 0).all()
    assert torch.allclose(whole.probs[whole.probs > 0], torch.tensor([t.share for t in TEMPLATES.values()]))
    assert whole.texts == phrasings.texts and (phrasings.probs > 0).sum() == len(TEMPLATES) * len(OMISSIONS)


def test_held_out_templates_are_new_orders_of_known_words():
    """Held-out phrasings measure new word orders, not new words: every word is one training uses."""
    trained = {phrase(*combo, size, t, omit) for combo in all_combos() for size in SIZES for t in TEMPLATES.values() for omit in OMISSIONS}
    for name, template in HELD_OUT_TEMPLATES.items():
        for omit in ((), ("size",)):
            text = phrase("star", "red", "blue", "small", template, omit)
            assert not unknown_words(text) and text not in trained, (name, text)
    assert not [w for t in trained for w in unknown_words(t)]  # and every training word is in the tokenizer


def test_phrasing_table_rows_name_what_they_say():
    scenes = ShapesDataset("train", 200).scenes()
    p = Phrasings.of(scenes)
    assert p.index.shape == (200, len(TEMPLATES) * len(OMISSIONS)) and float(p.probs.sum()) == pytest.approx(1.0)
    assert [p.texts[i] for i in p.index[:, 0]] == [s.caption for s in scenes]  # phrasing 0 is the caption itself
    labels = scene_labels(scenes)
    for n in (0, 57, 199):
        for k in range(p.index.shape[1]):
            row = int(p.index[n, k])
            for a, attribute in enumerate(("shape", "colour", "background", "size")):
                named = int(p.attributes[row, a])
                assert named in (-1, int(labels[attribute][n])), (p.texts[row], attribute)
                word = {"shape": SHAPES, "colour": list(COLOURS), "background": BACKGROUNDS, "size": list(SIZES)}[attribute]
                if named >= 0 and attribute != "background":
                    assert word[named] in p.texts[row].split() or word[named] + "," in p.texts[row].split()
    assert len(set(p.texts)) == len(p.texts)


def test_tiny_tokenizer_round_trips_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from minipa.train.export import save_tokenizer

    tok = tiny_tokenizer()
    save_tokenizer(tok, tmp_path / "tokenizer")
    again = load_tokenizer(tmp_path / "tokenizer")
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    prompts = [s.caption for s in ShapesDataset("heldout", 20).scenes()] + ["", "A Purple   STAR!", "on a green background"]
    assert torch.equal(again(prompts), tok(prompts))
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tok(prompts), expected)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset("validation")
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset("test", 4).scene(4)
    with pytest.raises(ValueError, match="square uint8 images"):
        clip_pixels(torch.zeros(2, 64, 32, 3, dtype=torch.uint8))
    assert len(SIZES) == 2
