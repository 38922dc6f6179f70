"""Name-or-path -> ready store: what training configs call to turn `data.dataset` into a store path."""

import os
import pathlib

from chinchax.data.corpora import EMBEDDED_NAMES
from chinchax.data.errors import DataError
from chinchax.data.prepare import prepare
from chinchax.data.store import MANIFEST, SPLITS, read_manifest
from chinchax.data.tokenizers import get_tokenizer


def default_cache_dir() -> pathlib.Path:
    """Where prepared stores live by default: $CHINCHAX_DATA, else $XDG_CACHE_HOME/chinchax, else ~/.cache/chinchax."""
    if os.environ.get("CHINCHAX_DATA"):
        return pathlib.Path(os.environ["CHINCHAX_DATA"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache_home) / "chinchax"


def ensure_embedded_store(
    tokenizer: str,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """The store of the embedded corpus for `tokenizer`, prepared into `cache_dir` on first use."""
    return prepare(
        "embedded", tokenizer, cache_dir or default_cache_dir(), max_bytes=max_bytes, progress=progress
    )


def _looks_like_store(path: pathlib.Path) -> bool:
    return (path / MANIFEST).exists() or any((path / s / "zarr.json").exists() for s in SPLITS)


def resolve_store(
    dataset: str | os.PathLike,
    tokenizer: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """A ready store for `dataset`: a corpus name, a store folder, or a corpus path (prepared on first use).

    A store folder must have been made with `tokenizer`; a corpus is prepared into `cache_dir`
    (default `default_cache_dir()`) and reused afterwards.
    """
    get_tokenizer(tokenizer)  # fail on an unknown name before any work
    path = pathlib.Path(dataset).expanduser()
    if str(dataset) not in EMBEDDED_NAMES and path.is_dir() and _looks_like_store(path):
        made_with = read_manifest(path)["tokenizer"]["name"]
        if made_with != tokenizer:
            raise DataError(
                f"store {path} was prepared with tokenizer {made_with!r}, the config asks for {tokenizer!r}"
            )
        return path
    return prepare(dataset, tokenizer, cache_dir or default_cache_dir(), progress=progress)
