"""Corpora: where documents come from, one `Document` at a time, with bad ones counted and skipped.

- `embedded` (alias `stdlib`): the running interpreter's standard-library `.py` sources (code, comments and
  docstrings), one document per file in sorted order. Present on every machine with Python; the Python
  version and a content hash go into the manifest so runs are comparable.
- a path: a text file (one document), a JSONL file (*.jsonl / *.ndjson, one document per line's "text"), or
  a folder of both (recursively, sorted, hidden entries ignored). Each may be plain, `.gz` or `.zst` (the
  Pile's format).

Per-document problems (binary file, invalid UTF-8, a JSONL line that is not JSON or has no string "text",
an empty document) are counted in `Skips` and reported at the end; corpus-level problems raise `DataError`.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import platform
import re
import sysconfig
from collections.abc import Iterator

from chinchax.data.errors import DataError

EMBEDDED_NAMES = ("embedded", "stdlib")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
# Folders of the standard-library tree that hold third-party packages, not the standard library.
NON_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
    """One document's text and where it came from (a relative path, or path:line for JSONL)."""

    text: str
    source: str


class Skips:
    """Counts of skipped documents per reason, with the first place each reason occurred."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, source: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, source)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict]:
        return {r: {"count": n, "first": self.first[r]} for r, n in sorted(self.counts.items())}

    def summary(self) -> str:
        """One line, e.g. 'skipped 3 documents: 2 invalid_utf8 (first: a.txt), 1 binary (first: b.bin)'."""
        if not self.counts:
            return "skipped 0 documents"
        parts = [f"{n} {r} (first: {self.first[r]})" for r, n in sorted(self.counts.items())]
        return f"skipped {self.total} documents: " + ", ".join(parts)


def _open_binary(path: pathlib.Path) -> io.BufferedIOBase:
    """`path` opened for reading bytes, decompressed when it ends in .gz or .zst/.zstd."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".zstd"):
        import zstandard

        # The Pile's shards need a window larger than zstandard's default limit.
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader)
    return open(path, "rb")


def _is_jsonl(path: pathlib.Path) -> bool:
    name = path.name
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith((".jsonl", ".ndjson"))


def _file_documents(path: pathlib.Path, source: str, skips: Skips) -> Iterator[Document]:
    """The one document of a text file, or nothing (counted in `skips`) when it is binary, not UTF-8 or empty."""
    with _open_binary(path) as f:
        data = f.read()
    if b"\x00" in data:
        skips.add("binary", source)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("invalid_utf8", source)
        return
    if not text:
        skips.add("empty", source)
        return
    yield Document(text, source)


def _jsonl_documents(path: pathlib.Path, source: str, skips: Skips) -> Iterator[Document]:
    """One document per line's "text"; blank lines are ignored, other bad lines counted in `skips`."""
    with _open_binary(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{source}:{line_number}"
            try:
                record = json.loads(line)
            except ValueError:  # includes invalid UTF-8
                skips.add("malformed_json", where)
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.add("missing_text", where)
            elif not text:
                skips.add("empty", where)
            else:
                yield Document(text, where)


class Corpus:
    """Documents from files under `root` ({relative path: path}, in order), optionally capped at `max_bytes`."""

    kind = "files"

    def __init__(
        self, root: pathlib.Path, files: dict[str, pathlib.Path], name: str, max_bytes: int | None = None
    ):
        if max_bytes is not None and max_bytes <= 0:
            raise DataError(f"max_bytes must be positive, got {max_bytes}")
        if not files:
            raise DataError(f"corpus {str(root)!r} is empty: it holds no files")
        self.root = root
        self.files = files
        self.name = name
        self.max_bytes = max_bytes

    @property
    def approx_bytes(self) -> int | None:
        """Bytes of text the corpus yields (for the progress bar): from file sizes, or the cap when compressed."""
        if any(f.suffix in COMPRESSED_SUFFIXES for f in self.files.values()):
            return self.max_bytes
        total = sum(f.stat().st_size for f in self.files.values())
        return total if self.max_bytes is None else min(total, self.max_bytes)

    def identity(self) -> dict:
        """What decides whether a prepared store can be reused: kind, root, file listing (sizes, mtimes), cap."""
        listing = hashlib.sha256()
        for source, f in self.files.items():
            st = f.stat()
            listing.update(f"{source}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return {
            "kind": self.kind,
            "root": str(self.root),
            "listing_sha256": listing.hexdigest(),
            "max_bytes": self.max_bytes,
        }

    def describe(self) -> dict:
        """The manifest's record of the corpus."""
        return {
            "name": self.name,
            "kind": self.kind,
            "root": str(self.root),
            "files": len(self.files),
            "max_bytes": self.max_bytes,
        }

    def documents(self, skips: Skips) -> Iterator[Document]:
        """Documents in a fixed order; stops after the one that reaches `max_bytes` of UTF-8 text."""
        taken = 0
        for source, path in self.files.items():
            reader = _jsonl_documents if _is_jsonl(path) else _file_documents
            try:
                for document in reader(path, source, skips):
                    yield document
                    if self.max_bytes is not None:
                        taken += len(document.text.encode("utf-8"))
                        if taken >= self.max_bytes:
                            return
            except _read_errors() as error:  # e.g. a truncated or corrupt .gz / .zst
                raise DataError(f"cannot read {path}: {error}") from error


def _read_errors() -> tuple[type[BaseException], ...]:
    import zlib

    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


class StdlibCorpus(Corpus):
    """The running interpreter's standard-library sources: one document per `.py` file."""

    kind = "stdlib"

    def __init__(self, max_bytes: int | None = None):
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = {
            rel: f for rel, f in _walk_files(root, skip_dirs=NON_STDLIB_DIRS).items() if f.suffix == ".py"
        }
        super().__init__(root, files, "embedded", max_bytes)

    def identity(self) -> dict:
        return {**super().identity(), **self._interpreter()}

    def describe(self) -> dict:
        return {**super().describe(), **self._interpreter()}

    @staticmethod
    def _interpreter() -> dict:
        return {
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
        }


def _walk_files(root: pathlib.Path, skip_dirs: set[str] = frozenset()) -> dict[str, pathlib.Path]:
    """{relative posix path: path} of regular files under `root`, sorted; hidden entries and `skip_dirs` skipped."""
    found = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in skip_dirs]
        prefix = pathlib.Path(os.path.relpath(folder, root)).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        found.update((prefix + n, pathlib.Path(folder, n)) for n in names if not n.startswith("."))
    return {rel: found[rel] for rel in sorted(found) if found[rel].is_file()}


def _slug(text: str) -> str:
    for suffix in (*COMPRESSED_SUFFIXES, ".jsonl", ".ndjson", ".txt"):
        text = text.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "corpus"


def open_corpus(name_or_path: str | os.PathLike, max_bytes: int | None = None) -> Corpus:
    """The corpus called `name_or_path` ('embedded' / 'stdlib') or found at that path (file or folder)."""
    if str(name_or_path) in EMBEDDED_NAMES:
        return StdlibCorpus(max_bytes)
    path = pathlib.Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(
            f"corpus {str(name_or_path)!r} is neither a known name {list(EMBEDDED_NAMES)} nor an existing path"
        )
    path = path.resolve()
    files = _walk_files(path) if path.is_dir() else {path.name: path}
    return Corpus(path, files, _slug(path.name), max_bytes)
