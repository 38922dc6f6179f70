"""The token store: one folder per prepared (corpus, tokenizer), read-only once its manifest exists.

Layout of a store folder:
    manifest.json            written last; a folder without it is never a store
    train/  validation/  test/   1-D tensorstore zarr3 arrays of token ids (uint16 when the vocabulary
                                 fits, else uint32), documents concatenated with EOS after each one.
Arrays are sharded (zarr3 `sharding_indexed`): files of SHARD_TOKENS tokens holding independently
readable chunks of CHUNK_TOKENS tokens, so a random (seq_len+1)-token window reads ~64 KiB.
"""

import dataclasses
import json
import os
import pathlib

import numpy as np
import tensorstore as ts

from chinchax.data.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
SHARD_TOKENS = 2**23
CHUNK_TOKENS = 2**15
READ_CACHE_BYTES = 256 << 20


def array_spec(path: pathlib.Path) -> dict:
    """tensorstore spec of the token array stored at `path` (a folder)."""
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def _create_array(path: pathlib.Path, dtype: np.dtype) -> ts.TensorStore:
    raw = {"name": "bytes", "configuration": {"endian": "little"}}
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [CHUNK_TOKENS],
            "codecs": [raw],
            "index_codecs": [raw, {"name": "crc32c"}],
        },
    }
    metadata = {
        "shape": [0],
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD_TOKENS]}},
        "codecs": [sharding],
    }
    return ts.open({**array_spec(path), "metadata": metadata}, create=True).result()


class TokenArrayWriter:
    """Appends token ids to a new 1-D array, writing whole shards at a time (each shard file written once)."""

    def __init__(self, path: pathlib.Path, dtype: np.dtype):
        self._array = _create_array(path, dtype)
        self._dtype = np.dtype(dtype)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.tokens = 0

    def append(self, ids: np.ndarray) -> None:
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        if self._pending_tokens >= SHARD_TOKENS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        buffered = np.concatenate(self._pending).astype(self._dtype, copy=False)
        cut = len(buffered) if final else len(buffered) // SHARD_TOKENS * SHARD_TOKENS
        block, rest = buffered[:cut], buffered[cut:]
        if len(block):
            end = self.tokens + len(block)
            self._array = self._array.resize(exclusive_max=[end], expand_only=True).result()
            self._array[self.tokens : end].write(block).result()
            self.tokens = end
        self._pending = [rest] if len(rest) else []
        self._pending_tokens = len(rest)

    def close(self) -> int:
        """Writes what is buffered; returns the array's length in tokens."""
        self._flush(final=True)
        return self.tokens


def read_manifest(path: pathlib.Path) -> dict:
    """The manifest of the store at `path`; DataError when there is no complete, readable store there."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise DataError(f"no token store at {path}: not a folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(
            f"{path} is not a complete token store: {MANIFEST} is missing "
            "(left by an interrupted prepare?); delete the folder and prepare again"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise DataError(f"{manifest_path} is not valid JSON: {error}") from error
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format_version {version!r}; this code reads {FORMAT_VERSION}: prepare again"
        )
    return manifest


@dataclasses.dataclass(frozen=True)
class Store:
    """An opened store: its manifest and one read-only 1-D token array per split."""

    path: pathlib.Path
    manifest: dict
    arrays: dict[str, ts.TensorStore]

    def tokens(self, split: str) -> int:
        """Tokens in `split` (documents plus one EOS each)."""
        return int(self.manifest["splits"][split]["tokens"])

    def unigram_entropy(self, split: str) -> float:
        """Entropy of the split's token frequencies in nats/token: the loss of the best context-free model."""
        counts = np.bincount(self.arrays[split].read().result())
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


_READ_CONTEXT: ts.Context | None = None


def _read_context() -> ts.Context:
    """One tensorstore context per process, so every reader shares one chunk cache."""
    global _READ_CONTEXT
    if _READ_CONTEXT is None:
        _READ_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})
    return _READ_CONTEXT


def open_store(path: str | os.PathLike) -> Store:
    """Opens the store at `path` for reading; DataError if it is incomplete or its arrays disagree with it."""
    path = pathlib.Path(path).expanduser()
    manifest = read_manifest(path)
    arrays = {}
    for split in SPLITS:
        spec = {**array_spec(path / split), "recheck_cached_data": "open", "recheck_cached_metadata": "open"}
        try:
            array = ts.open(spec, read=True, context=_read_context()).result()
        except ValueError as error:
            raise DataError(f"token store {path}: cannot open split {split!r}: {error}") from error
        expected = manifest["splits"][split]["tokens"]
        if array.shape != (expected,):
            raise DataError(
                f"token store {path}: split {split!r} holds {array.shape[0]} tokens, manifest says {expected}"
            )
        arrays[split] = array
    return Store(path, manifest, arrays)
