"""corpus -> tokenizer -> token store, once: tokenize in parallel (long documents in pieces), split by document
hash, write atomically.

A store's folder name carries a fingerprint of everything that decides its contents (corpus identity,
tokenizer, split fractions, format version), so preparing the same inputs again returns the existing store.
The store is built in a hidden `.partial-*` folder next to it, its manifest written last, then renamed into
place: a folder left by a killed process is never taken for a store.
"""

import collections
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import chinchax
from chinchax import atomic
from chinchax.data.corpora import Corpus, Document, Skips, open_corpus
from chinchax.data.errors import DataError
from chinchax.data.store import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TokenArrayWriter,
    read_manifest,
)
from chinchax.data.tokenizers import Tokenizer, get_tokenizer

# Text is tokenized in chunks of about this many characters (long documents cut into pieces of at least this
# many), a few chunks in flight per thread.
CHUNK_CHARS = 1 << 20
CHUNKS_IN_FLIGHT_PER_THREAD = 2
PARTIAL_PREFIX = ".partial-"


def split_of(digest: bytes, validation_fraction: float, test_fraction: float) -> str:
    """The split of a document whose 16-byte BLAKE2b digest of its UTF-8 text is `digest`.

    u = first 8 bytes as a big-endian integer / 2**64; validation when u < validation_fraction, test when
    u < validation_fraction + test_fraction, else train. Equal documents land in the same split.
    """
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def _document_end(text: str) -> tuple[bytes, int]:
    """The 16-byte BLAKE2b digest of `text`'s UTF-8 encoding and its length in bytes."""
    data = text.encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).digest(), len(data)


def _encode_chunk(
    tokenizer: Tokenizer, pieces: list[str], ends: list[str | None]
) -> list[tuple[np.ndarray, tuple[bytes, int] | None]]:
    """Per piece: its ids, and where it ends a document (`ends[i]`, that document's text) the document's digest
    and UTF-8 bytes. Runs on a worker thread (tiktoken and hashing release the GIL)."""
    ids = tokenizer.encode_batch(pieces, num_threads=1)
    return [(i, None if end is None else _document_end(end)) for i, end in zip(ids, ends, strict=True)]


def _chunks(documents: Iterable[Document], tokenizer: Tokenizer, chars: int):
    """Work for one thread, in corpus order: (pieces, ends) of about `chars` characters of text. A longer document
    is cut at `tokenizer.cut_points` into pieces that encode apart; ends[i] is the document's text where pieces[i]
    ends it, else None."""
    pieces, ends, size = [], [], 0
    for document in documents:
        text = document.text
        for start, stop in itertools.pairwise([0, *tokenizer.cut_points(text, chars), len(text)]):
            pieces.append(text[start:stop])
            ends.append(text if stop == len(text) else None)
            size += stop - start
            if size >= chars:
                yield pieces, ends
                pieces, ends, size = [], [], 0
    if pieces:
        yield pieces, ends


def _write_splits(
    folder: pathlib.Path,
    corpus: Corpus,
    tokenizer: Tokenizer,
    fractions: tuple[float, float],
    num_threads: int,
    progress: bool,
) -> tuple[dict, str, Skips]:
    """Tokenizes `corpus` into one array per split under `folder`; returns counts per split, content hash, skips."""
    skips = Skips()
    writers = {s: TokenArrayWriter(folder / s, tokenizer.storage_dtype) for s in SPLITS}
    counts = {s: {"documents": 0, "text_bytes": 0} for s in SPLITS}
    content = hashlib.sha256()
    eos = np.array([tokenizer.eos_id], np.uint32)
    pending: collections.deque[Future] = collections.deque()
    document_ids: list[np.ndarray] = []  # the current document's ids, piece by piece
    bar = tqdm(
        total=corpus.approx_bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {corpus.name}",
        disable=not progress,
    )

    def consume_oldest():
        for ids, end in pending.popleft().result():
            document_ids.append(ids)
            if end is None:
                continue
            digest, text_bytes = end
            split = split_of(digest, *fractions)
            for piece_ids in document_ids:
                writers[split].append(piece_ids)
            writers[split].append(eos)
            document_ids.clear()
            content.update(digest)
            counts[split]["documents"] += 1
            counts[split]["text_bytes"] += text_bytes
            bar.update(text_bytes)

    with ThreadPoolExecutor(num_threads) as pool, bar:
        for pieces, ends in _chunks(corpus.documents(skips), tokenizer, CHUNK_CHARS):
            pending.append(pool.submit(_encode_chunk, tokenizer, pieces, ends))
            while len(pending) > CHUNKS_IN_FLIGHT_PER_THREAD * num_threads:
                consume_oldest()
        while pending:
            consume_oldest()
    for split in SPLITS:
        counts[split]["tokens"] = writers[split].close()
    if not sum(c["documents"] for c in counts.values()):
        raise DataError(f"corpus {str(corpus.root)!r} has no usable documents ({skips.summary()})")
    return counts, "sha256:" + content.hexdigest(), skips


def store_fingerprint(corpus: Corpus, tokenizer: Tokenizer, fractions: tuple[float, float]) -> str:
    """Hex digest of everything that decides a store's contents."""
    key = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus.identity(),
        "tokenizer": tokenizer.name,
        "validation_fraction": fractions[0],
        "test_fraction": fractions[1],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out_dir: pathlib.Path, store_name: str) -> None:
    """Deletes partial folders of `store_name` left on this host by processes that no longer run."""
    host = socket.gethostname()
    for partial in out_dir.glob(f"{PARTIAL_PREFIX}{store_name}-*"):
        parts = partial.name[len(PARTIAL_PREFIX) + len(store_name) + 1 :].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(partial, ignore_errors=True)


def _reuse(path: pathlib.Path, fingerprint: str) -> bool:
    """True when `path` holds the complete store for `fingerprint`; DataError when it holds something else."""
    if not path.exists():
        return False
    manifest = read_manifest(path)
    if manifest.get("fingerprint") != fingerprint:
        raise DataError(
            f"{path} holds a store for other inputs (fingerprint differs); delete it or use another out dir"
        )
    return True


def prepare(
    corpus: str | os.PathLike | Corpus,
    tokenizer: str | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    validation_fraction: float = 0.01,
    test_fraction: float = 0.01,
    num_threads: int | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Tokenizes `corpus` into a store under `out_dir` and returns its path; reuses an existing one.

    corpus: 'embedded' / 'stdlib', a path (text, JSONL, folder; plain/.gz/.zst) or a `Corpus`.
    max_bytes: stop after the document that reaches this many bytes of UTF-8 text (a fixed, ordered subset).
    validation_fraction, test_fraction: expected shares of documents held out (by document hash).
    num_threads: tokenizer threads (default: the CPUs this process may use).
    """
    corpus, tokenizer, fractions = _inputs(corpus, tokenizer, max_bytes, validation_fraction, test_fraction)
    num_threads = num_threads or len(os.sched_getaffinity(0))
    out_dir = pathlib.Path(out_dir).expanduser()
    fingerprint = store_fingerprint(corpus, tokenizer, fractions)
    path = out_dir / f"{corpus.name}-{tokenizer.name}-{fingerprint[:12]}"
    if _reuse(path, fingerprint):
        if progress:
            tqdm.write(f"reusing {path}")
        return path

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir, path.name)
    partial = (
        out_dir / f"{PARTIAL_PREFIX}{path.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    partial.mkdir()
    try:
        start = time.perf_counter()
        splits, content_hash, skips = _write_splits(
            partial, corpus, tokenizer, fractions, num_threads, progress
        )
        seconds = time.perf_counter() - start
        manifest = _manifest(
            fingerprint, corpus, tokenizer, fractions, splits, content_hash, skips, seconds, num_threads
        )
        atomic.write_json(partial / MANIFEST, manifest)
        _move_into_place(partial, path, fingerprint)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if progress:
        tqdm.write(_prepared_line(path, splits, skips, seconds))
    return path


def _inputs(
    corpus: str | os.PathLike | Corpus,
    tokenizer: str | Tokenizer,
    max_bytes: int | None,
    validation_fraction: float,
    test_fraction: float,
) -> tuple[Corpus, Tokenizer, tuple[float, float]]:
    """prepare's arguments opened and checked: the corpus, the tokenizer, the (validation, test) fractions."""
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus, max_bytes)
    elif max_bytes is not None:
        raise DataError("pass max_bytes to open_corpus when giving prepare a Corpus")
    tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    fractions = (float(validation_fraction), float(test_fraction))
    if min(fractions) < 0 or sum(fractions) >= 1:
        raise DataError(
            f"validation_fraction={fractions[0]} and test_fraction={fractions[1]} must be >= 0, sum < 1"
        )
    return corpus, tokenizer, fractions


def _manifest(
    fingerprint: str,
    corpus: Corpus,
    tokenizer: Tokenizer,
    fractions: tuple[float, float],
    splits: dict,
    content_hash: str,
    skips: Skips,
    seconds: float,
    num_threads: int,
) -> dict:
    """The store's manifest: what it was built from, how it splits, what each split holds (splits: documents,
    text bytes and tokens per split) and how fast it was built (seconds of tokenizing on num_threads)."""
    text_bytes = sum(c["text_bytes"] for c in splits.values())
    tokens = sum(c["tokens"] for c in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "corpus": corpus.describe(),
        "content_hash": content_hash,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "dtype": tokenizer.storage_dtype.name,
        "eos": "after every document",
        "split_rule": "blake2b-128 of the document's UTF-8 text; first 8 bytes / 2**64 vs the fractions",
        "validation_fraction": fractions[0],
        "test_fraction": fractions[1],
        "splits": splits,
        "skipped": skips.as_dict(),
        "build": {
            "seconds": round(seconds, 3),
            "threads": num_threads,
            "chinchax_version": chinchax.__version__,
            "text_mb_per_s": round(text_bytes / seconds / 1e6, 3),
            "tokens_per_s": round(tokens / seconds),
        },
    }


def _move_into_place(partial: pathlib.Path, path: pathlib.Path, fingerprint: str) -> None:
    """Renames the finished `partial` folder to `path`; where another process finished the same store first,
    keeps that one and deletes `partial`."""
    try:
        os.rename(partial, path)
    except OSError:
        if not _reuse(path, fingerprint):
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _prepared_line(path: pathlib.Path, splits: dict, skips: Skips, seconds: float) -> str:
    """One line on a store just built: text in, tokens per split out, the rates, what was skipped."""
    text_bytes = sum(c["text_bytes"] for c in splits.values())
    tokens = sum(c["tokens"] for c in splits.values())
    counts = ", ".join(f"{s} {c['tokens']:,}" for s, c in splits.items())
    return (
        f"prepared {path}: {text_bytes / 1e6:.1f} MB of text -> tokens {counts} in {seconds:.1f} s "
        f"({text_bytes / seconds / 1e6:.2f} MB/s, {tokens / seconds:,.0f} tokens/s); {skips.summary()}"
    )
