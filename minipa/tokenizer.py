"""CLIP's byte-pair-encoding tokenizer, as Stable Diffusion 1.5 uses it: text → 77 token ids.

The path a prompt takes:
0. special: "<|endoftext|>" typed in the prompt becomes its id, and so does "<|startoftext|>" after
            step 1 (in any case). This odd pair of rules is what SD 1.5's tokenizer files set up
            (`normalized: true` on the start token only); other text goes through steps 1–4;
1. clean:   Unicode NFC, runs of whitespace → one space, lower-case (character by character);
2. split:   CLIP's pre-tokenisation rule — a run of letters, a single digit, a run of other
            symbols, or an English contraction ('s 't 're 've 'm 'll 'd) is one "word"; spaces go;
3. bytes:   each word's UTF-8 bytes become printable characters (GPT-2's byte-to-unicode table),
            so every string, emoji included, is spelled with 256 symbols and nothing is unknown;
4. BPE:     the last symbol gets the end-of-word mark "</w>"; then the adjacent pair with the
            best (lowest) rank in `merges.txt` is merged, again and again, until no pair has a rank;
5. ids:     each final symbol is looked up in `vocab.json`; `<|startoftext|>` goes in front and
            `<|endoftext|>` behind; longer prompts are truncated to 77 (with a warning), shorter
            ones padded to 77 with `<|endoftext|>`, exactly as SD 1.5's tokenizer files ask
            (77 is their `model_max_length`; a folder whose tokenizer_config.json says another
            length gets that one, as in transformers).

This reproduces transformers 5's `CLIPTokenizer` (which diffusers calls): like it, no ftfy
and no HTML unescaping. `loading.load_tokenizer` reads the files: a diffusers `tokenizer/` folder
(vocab.json + merges.txt, or transformers 5's tokenizer.json) or CLIP's original `bpe_simple_vocab_16e6.txt.gz`.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from typing import NamedTuple

import torch

START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # SD 1.5's text encoder has 77 positions
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode's White_Space property (what `\s` means in the regex CLIP and `tokenizers` use;
# Python's str.isspace() differs on a few control characters, so the set is spelled out).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)


class TokenizerError(ValueError):
    """Tokenizer files that are missing or malformed."""


class TokenizedText(NamedTuple):
    input_ids: torch.Tensor  # (B, 77) long
    attention_mask: torch.Tensor  # (B, 77) long: 1 for real tokens (start and end included), 0 for padding


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte 0..255 ↦ one printable character.

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space, …)
    map to the characters 256, 257, … in order, so no symbol is whitespace or invisible.
    The dict lists the printable bytes first: that order gives CLIP's first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class CLIPTokenizer:
    """Text → CLIP token ids, exactly as SD 1.5's `tokenizer/` does it."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        for special in (START, END):
            if special not in vocab:
                raise TokenizerError(f"the vocabulary has no {special!r} token; is this a CLIP vocab.json?")
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.context_length = context_length
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.pad_id = self.end_id  # SD 1.5 pads with <|endoftext|>
        self.cache = {}

    # ---- steps 1–2: cleaning and pre-tokenisation --------------------------------------------
    @staticmethod
    def clean(text: str) -> str:
        """NFC, whitespace runs → " ", then lower-case one character at a time (as `tokenizers` does:
        no context rules, so a word-final capital sigma becomes σ, not ς)."""
        text = unicodedata.normalize("NFC", text)
        text = "".join(" " if c in WHITESPACE else c for c in text)
        return "".join(c.lower() for c in text)

    @staticmethod
    def split_words(text: str) -> list[str]:
        """CLIP's rule  's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+ , written as a
        left-to-right scan over Unicode categories (L = letter, N = number); spaces separate words."""

        def kind(c: str) -> str:
            return "space" if c in WHITESPACE else unicodedata.category(c)[0]

        words, i = [], 0
        while i < len(text):
            short = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
            if short:
                word = short
            elif kind(text[i]) == "space":
                i += 1
                continue
            elif kind(text[i]) == "N":  # every digit is its own word
                word = text[i]
            else:  # a run of letters, or a run of symbols (neither letter, number nor space)
                k, j = kind(text[i]), i + 1
                while j < len(text) and (kind(text[j]) == k == "L" or k != "L" and kind(text[j]) not in ("L", "N", "space")):
                    j += 1
                word = text[i:j]
            words.append(word)
            i += len(word)
        return words

    # ---- steps 3–4: bytes and BPE ------------------------------------------------------------
    def bpe(self, word: str) -> list[str]:
        """Byte-pair-encode one pre-token (already spelled with byte characters); cached."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # BEGIN ASSIGNMENT 12
        while len(symbols) > 1:
            pairs = [(symbols[k], symbols[k + 1]) for k in range(len(symbols) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, k = [], 0
            while k < len(symbols):  # merge every occurrence of `best`, left to right
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
        # END ASSIGNMENT 12
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens, padding or truncation."""
        ids = []
        for k, piece in enumerate(re.split(f"({re.escape(END)})", text)):
            if k % 2:  # <|endoftext|> typed in the prompt, matched exactly as typed
                ids.append(self.end_id)
                continue
            for j, part in enumerate(re.split(f"({re.escape(START)})", self.clean(piece))):
                if j % 2:  # <|startoftext|> typed in the prompt, matched after cleaning (so in any case)
                    ids.append(self.start_id)
                    continue
                for word in self.split_words(part):
                    spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                    ids += [self.vocab[symbol] for symbol in self.bpe(spelled)]
        return ids

    def decode(self, ids) -> str:
        """Ids → text (special tokens dropped, "</w>" read as a space); for inspection only."""
        symbols = [self.id_to_token[int(i)] for i in ids if int(i) not in (self.start_id, self.end_id)]
        spelled = "".join(symbols).replace("</w>", self.byte_encoder[ord(" ")])
        return bytes(self.byte_decoder[c] for c in spelled).decode("utf-8", errors="replace").strip()

    # ---- step 5: framing, truncation, padding ------------------------------------------------
    def tokenize(self, text: str | list[str]) -> TokenizedText:
        """[start] + tokens + [end], truncated or padded (with <|endoftext|>) to 77; plus the mask."""
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [None]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CLIPTokenizer expects a string or a list of strings, got {type(text).__name__}")
        room = self.context_length - 2
        rows, masks = [], []
        for t in texts:
            ids = self.encode(t)
            if len(ids) > room:
                warnings.warn(
                    f"The prompt is {len(ids) + 2} tokens long; CLIP reads only {self.context_length}, so the last "
                    f"{len(ids) - room} tokens were dropped: {self.decode(ids[room:])!r}",
                    stacklevel=2,
                )
                ids = ids[:room]
            ids = [self.start_id] + ids + [self.end_id]
            padding = self.context_length - len(ids)
            rows.append(ids + [self.pad_id] * padding)
            masks.append([1] * len(ids) + [0] * padding)
        return TokenizedText(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))

    def __call__(self, text: str | list[str]) -> torch.Tensor:
        """Token ids (B, 77), as SD 1.5 feeds them to its text encoder."""
        return self.tokenize(text).input_ids
