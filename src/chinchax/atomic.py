"""Write-then-rename: a file is either its old content or its new content, never half written.

The one helper every results, config, manifest, figure and export writer uses: the new content goes to a
temporary file beside the target (hidden, unique per writer), which is renamed over it only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without an error,
    removed otherwise."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield pathlib.Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text`."""
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Replace `path` with `obj` as JSON (keys in their order), a newline at the end."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")
