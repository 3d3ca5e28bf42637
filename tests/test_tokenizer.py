"""The CLIP tokenizer gives the same ids and masks as transformers' CLIPTokenizer (what diffusers calls),
on the real CLIP vocabulary. transformers reads a `tokenizer/` folder that this test writes itself from CLIP's
published `bpe_simple_vocab_16e6.txt.gz` (not minipa's writer), and a few prompts' ids are pinned outright."""

import gzip
import json
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SD15_SPECIAL_TOKENS_MAP, SD15_TOKENIZER_CONFIG, write_sd15_tokenizer
from minipa.loading import load_tokenizer, vocab_from_bpe_gz
from minipa.tokenizer import CLIPTokenizer, TokenizerError

BPE_GZ = Path(__file__).resolve().parents[1] / "weights" / "bpe_simple_vocab_16e6.txt.gz"

@pytest.fixture(scope="module")
def sd_tokenizer_dir(tmp_path_factory):
    """vocab.json + merges.txt converted from CLIP's .gz by minipa, plus SD 1.5's two config files."""
    return write_sd15_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def clip_files_written_independently(folder: Path) -> Path:
    """vocab.json + merges.txt derived from CLIP's .gz the way CLIP's own simple_tokenizer.py reads it: the first
    line is a header, the next 49152 − 256 − 2 lines are the merges by rank; the vocabulary is the 256 byte symbols
    (GPT-2's printable mapping), the same with "</w>", one entry per merge, then the two special tokens."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = [chr(b) for b in printable] + [chr(256 + k) for k, _ in enumerate(b for b in range(256) if b not in printable)]
    merges = gzip.open(BPE_GZ, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(SD15_TOKENIZER_CONFIG))  # SD 1.5's files, as shipped
    (folder / "special_tokens_map.json").write_text(json.dumps(SD15_SPECIAL_TOKENS_MAP))
    return folder


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(BPE_GZ)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(clip_files_written_independently(tmp_path_factory.mktemp("independent")))


# ─── The BPE merge loop (a course assignment): one test per rule, on merge tables small enough to follow by hand ──


def bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIPTokenizer.bpe on a tiny merge table (rank = position in the list), without a vocabulary."""
    return CLIPTokenizer.bpe(SimpleNamespace(cache={}, ranks={pair: rank for rank, pair in enumerate(merges)}), word)


def test_bpe_merges_the_lowest_ranked_pair_first():
    """The pair earliest in merges.txt goes first, wherever it is in the word; then the next best of what is left."""
    merges = [("l", "o"), ("e", "r</w>"), ("w", "e"), ("o", "w"), ("low", "er</w>")]
    got = bpe("lower", merges)
    named = {("l", "ow", "er</w>"): "you merged the highest rank first; the lowest rank (earliest line of merges.txt) goes first",
             ("lo", "we", "r</w>"): "you merged the leftmost pair that has a rank; the pair with the lowest rank goes first, wherever it is"}
    assert got == ["lo", "w", "er</w>"], (
        f"BPE merges the adjacent pair with the lowest rank first: 'lower' with merges l o, e r</w>, w e, o w (ranks 0–3) must "
        f"end as ['lo', 'w', 'er</w>'], yours gives {got}" + (f": {named[tuple(got)]}" if tuple(got) in named else ""))


def test_bpe_stops_when_no_pair_has_a_rank():
    """A pair missing from merges.txt is never merged: with no ranked pair left the loop ends."""
    got = bpe("xyz", [("l", "o")]), bpe("lower", [("l", "o")])
    assert got == (["x", "y", "z</w>"], ["lo", "w", "e", "r</w>"]), (
        f"BPE stops when no adjacent pair is in merges.txt (rank ∞): 'xyz' with no merge for its pairs must stay ['x', 'y', "
        f"'z</w>'] and 'lower' with only l o must end as ['lo', 'w', 'e', 'r</w>']; yours gives {got[0]} and {got[1]}: "
        "pairs that have no rank were merged")


def test_bpe_keeps_merging_until_one_symbol_or_no_ranked_pair_is_left():
    """After each merge the pairs are looked at again: merges build on merges."""
    merges = [("l", "o"), ("lo", "w"), ("e", "r</w>"), ("low", "er</w>")]
    got = bpe("lower", merges)
    assert got == ["lower</w>"], (
        f"BPE repeats until one symbol is left or no adjacent pair has a rank: 'lower' with merges l o, lo w, e r</w>, "
        f"low er</w> must end as ['lower</w>'], yours stops at {got}: after a merge, look for the best pair again")


def test_known_prompts_have_clip_s_published_ids(ours):
    """Ids that CLIP's own tokenizer gives (and that SD tutorials print): start 49406, end 49407 and padding 49407."""
    assert ours("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert ours("a photograph of an astronaut riding a horse")[0, :11].tolist() == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, 49407]
    assert ours("")[0].tolist() == [49406] + [49407] * 76


def test_minipa_writes_the_same_folder_as_the_independent_derivation(sd_tokenizer_dir, tmp_path):
    independent = clip_files_written_independently(tmp_path)
    merges = lambda folder: (folder / "merges.txt").read_text(encoding="utf-8").splitlines()  # noqa: E731
    vocab = lambda folder: json.loads((folder / "vocab.json").read_text(encoding="utf-8"))  # noqa: E731
    assert merges(sd_tokenizer_dir) == merges(independent) and vocab(sd_tokenizer_dir) == vocab(independent)


WORDS = (
    "a photo of an astronaut riding horse on mars cat dog portrait landscape painting by greg rutkowski "
    "trending artstation highly detailed 8k octane render cinematic lighting bokeh sunset over the ocean "
    "watercolor sketch anime girl with long hair cyberpunk city at night neon lights ultra realistic "
    "don't it's we're they've i'm you'll she'd rock'n'roll o'clock DSLR HDR 4K RAW f/1.8 35mm"
).split()
ODD = [
    "café", "naïve", "Ångström", "façade", "jalapeño", "Straße", "ΟΔΟΣ", "İstanbul", "Œuvre", "ǅemal",
    "東京タワー", "北京", "한국어", "русский", "العربية", "हिन्दी", "ไทย", "😀", "🐶🐱", "👩‍🚀", "🇫🇷", "❤️",
    "½", "²", "Ⅻ", "٣", "１２３", "ＡＢＣ", "e\u0301", "A\u030a", "x\u200by", "\u00a0", "\u3000", "\x1c", "\x85",
    "—", "…", "«quoted»", "“smart”", "‘single’", "$100", "50%", "#hashtag", "@user", "a+b=c", "C++",
    "(masterpiece:1.2)", "[best quality]", "{x|y}", "<lora:foo:0.7>", "http://example.com/a?b=c&d=e",
    "&amp;", "&lt;b&gt;", "it''s", "''", "'", "'s", "'S", "'LL", "rock 'n' roll", "'twas", "y'all", "!!!",
    "?!?", "...", "--", "__init__", "snake_case", "CamelCase", "ALLCAPS", "tab\there", "new\nline",
    "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "end<|endoftext|>more",
]


def make_corpus(n=1200, seed=0):
    """≥ 1,000 varied prompts: plain, punctuated, accented, emoji, spaced, empty and over-long."""
    rng = random.Random(seed)
    corpus = ["", " ", "   ", "\t\n", "a", "A", "1", "2024", "3.14159", "I", "ok."]
    while len(corpus) < n:
        k = rng.randrange(6)
        length = rng.choice([1, 2, 4, 8, 16, 40, 90])
        parts = [rng.choice(WORDS if rng.random() < 0.6 else ODD) for _ in range(length)]
        if k == 0:  # plain
            text = " ".join(parts)
        elif k == 1:  # glued punctuation and digits
            text = "".join(p + rng.choice([",", ".", "!", "?", ";", ":", "-", "'", '"', "", str(rng.randrange(1000))]) for p in parts)
        elif k == 2:  # repeated and odd whitespace
            text = "".join(p + rng.choice([" ", "  ", "    ", "\t", "\n", " \u00a0 ", "\u3000"]) for p in parts)
        elif k == 3:  # mixed case
            text = " ".join(p.upper() if rng.random() < 0.5 else p.title() for p in parts)
        elif k == 4:  # random unicode characters from a few blocks
            blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x400), (0x4E00, 0x4E80), (0x1F300, 0x1F650), (0x2000, 0x2070)]
            text = "".join(chr(rng.randrange(*rng.choice(blocks))) for _ in range(length * 3))
        else:  # a long prompt, well over 77 tokens
            text = ", ".join(rng.choice(WORDS) for _ in range(rng.randrange(40, 120)))
        corpus.append(text)
    return corpus


CORPUS = make_corpus()


def test_vocabulary_from_gz_has_sd_layout(sd_tokenizer_dir):
    vocab, merges = vocab_from_bpe_gz(BPE_GZ)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512
    lines = (sd_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894


def test_ids_and_masks_equal_transformers_on_corpus(ours, reference):
    assert len(CORPUS) >= 1000
    assert sum(len(reference(t).input_ids) > 77 for t in CORPUS) >= 100  # many prompts need truncation
    expected = reference(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours.tokenize(CORPUS)
    assert got.input_ids.shape == (len(CORPUS), 77)
    wrong = [t for t, a, b in zip(CORPUS, got.input_ids, expected["input_ids"]) if not torch.equal(a, b)]
    assert wrong == [], f"{len(wrong)} prompts differ, first: {wrong[:3]!r}"
    assert torch.equal(got.attention_mask, expected["attention_mask"])


def test_unpadded_encode_equals_transformers(ours, reference):
    for text in CORPUS[:400]:
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, text


def test_call_returns_ids_padded_with_endoftext(ours):
    ids = ours(["a photo of a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[1, 0] == 49406 and (ids[1, 1:] == 49407).all()
    assert ours.decode(ids[0]) == "a photo of a cat"


def test_long_prompt_is_truncated_with_a_warning_counting_dropped_tokens(ours):
    text = " ".join(["cat"] * 80)  # 80 tokens + start + end
    with pytest.warns(UserWarning, match=r"^The prompt is 82 tokens long; CLIP reads only 77, so the last 5 tokens were dropped") as record:
        ids = ours.tokenize(text).input_ids
    assert not record[0].filename.endswith("minipa/tokenizer.py")  # the warning points at the caller, not at minipa
    assert ids[0, -1] == 49407 and ids[0, -2] == ours.vocab["cat</w>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit: no warning
        assert ours(" ".join(["cat"] * 75))[0, -2:].tolist() == [ours.vocab["cat</w>"], 49407]


def test_bad_input_and_vocabulary_are_named(ours):
    with pytest.raises(TypeError, match="^CLIPTokenizer expects a string or a list of strings, got int$"):
        ours.tokenize(3)
    with pytest.raises(TokenizerError, match="^the vocabulary has no '<|startoftext|>' token; is this a CLIP vocab.json"):
        type(ours)({"a": 0}, [])


def test_bpe_gz_and_folder_give_the_same_tokenizer(ours):
    direct = load_tokenizer(BPE_GZ)
    assert direct.vocab == ours.vocab and direct.ranks == ours.ranks


def test_missing_vocab_file_is_a_clear_error(tmp_path, sd_tokenizer_dir):
    (tmp_path / "merges.txt").write_text((sd_tokenizer_dir / "merges.txt").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(TokenizerError, match="missing vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="bpe_simple_vocab"):
        load_tokenizer(tmp_path / "missing.txt.gz")


def test_corrupt_tokenizer_files_are_clear_errors(tmp_path):
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(TokenizerError, match=r"vocab.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="two symbols"):
        load_tokenizer(tmp_path)
    gz = tmp_path / "bpe.txt.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(TokenizerError, match="gzip"):
        load_tokenizer(gz)


def test_model_max_length_in_tokenizer_config_sets_the_padded_length_as_in_transformers(tmp_path, sd_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((sd_tokenizer_dir / name).read_bytes())
    settings = json.loads((sd_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 12}))
    ours, reference = load_tokenizer(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    prompts = ["a photo of a cat", "", "a photo of an astronaut riding a horse on mars at sunset"]  # the last: 14 ids
    expected = reference(prompts, padding="max_length", max_length=reference.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="reads only 12"):
        got = ours(prompts)
    assert reference.model_max_length == 12 and got.shape == (3, 12) and torch.equal(got, expected)
    reference.save_pretrained(tmp_path / "saved")  # transformers 5 writes tokenizer.json + tokenizer_config.json
    assert load_tokenizer(tmp_path / "saved").context_length == 12
    for bad in (1, "twelve", 12.5, True):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": bad}))
        with pytest.raises(TokenizerError, match=r"tokenizer_config.json: model_max_length should be a whole number"):
            load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": int(1e30)}))
    assert load_tokenizer(tmp_path).context_length == 77  # transformers' "no limit": CLIP's own 77
