"""Bad input: corpus-level problems raise DataError (one line, naming what and where) before expensive work;
per-document problems are skipped, counted in the manifest with their first location, and the rest is kept."""

import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from chinchax.data import DataError, make_loader, open_corpus, open_store, prepare


def store_text(path) -> bytes:
    """All documents of a bytes-tokenizer store, in order per split, EOS-separated (b'|')."""
    store = open_store(path)
    tokens = np.concatenate([store.arrays[s].read().result() for s in ("train", "validation", "test")])
    return bytes(np.where(tokens == 256, ord("|"), tokens).astype(np.uint8))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_empty_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError) as error:
        prepare(tmp_path / "corpus", "bytes", tmp_path / "out", progress=False)
    assert "is empty: it holds no files" in one_line(error)
    assert not (tmp_path / "out").exists(), "nothing may be written for an empty corpus"


def test_only_empty_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    (corpus / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError) as error:
        prepare(corpus, "bytes", tmp_path / "out", progress=False)
    assert "has no usable documents (skipped 2 documents: 2 empty (first: a.txt))" in one_line(error)
    assert list((tmp_path / "out").iterdir()) == [], "the partial folder must be removed"


def test_binary_and_invalid_utf8_files_are_skipped_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {"a.txt": "alpha text. ", "sub/c.md": "gamma, ünïcode ✓ "}
    for name, text in texts.items():
        (corpus / name).write_text(text * 5)
    (corpus / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(64))
    (corpus / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (corpus / ".hidden").write_bytes(b"\x00")  # hidden entries are not part of a corpus
    path = prepare(corpus, "bytes", tmp_path / "out", validation_fraction=0, test_fraction=0, progress=False)
    manifest = open_store(path).manifest
    assert manifest["skipped"] == {
        "binary": {"count": 1, "first": "b.png"},
        "invalid_utf8": {"count": 1, "first": "latin1.txt"},
    }
    assert manifest["splits"]["train"]["documents"] == 2
    assert store_text(path) == ("alpha text. " * 5 + "|" + "gamma, ünïcode ✓ " * 5 + "|").encode()


def jsonl_lines() -> list[bytes]:
    return [
        json.dumps({"text": "first record", "meta": {"pile_set_name": "x"}}).encode(),
        json.dumps({"content": "no text field"}).encode(),
        b"",
        b"{not json",
        json.dumps({"text": 42}).encode(),
        "\u00e9".encode("latin-1"),
        json.dumps({"text": "second record ✓"}).encode(),
    ]


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_bad_lines_are_skipped_with_their_location(tmp_path, suffix):
    raw = b"\n".join(jsonl_lines()) + b"\n"
    compress = {"": lambda b: b, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}[suffix]
    corpus = tmp_path / f"shard.jsonl{suffix}"
    corpus.write_bytes(compress(raw))
    path = prepare(corpus, "bytes", tmp_path / "out", validation_fraction=0, test_fraction=0, progress=False)
    manifest = open_store(path).manifest
    assert manifest["skipped"] == {
        "malformed_json": {"count": 2, "first": f"shard.jsonl{suffix}:4"},
        "missing_text": {"count": 2, "first": f"shard.jsonl{suffix}:2"},
    }
    assert store_text(path) == "first record|second record ✓|".encode()


def test_truncated_compressed_file(tmp_path):
    corpus = tmp_path / "data.jsonl.gz"
    corpus.write_bytes(gzip.compress(b'{"text": "abc"}\n' * 1000)[:-20])
    with pytest.raises(DataError) as error:
        prepare(corpus, "bytes", tmp_path / "out", progress=False)
    assert one_line(error).startswith(f"cannot read {corpus}: ")
    assert list((tmp_path / "out").iterdir()) == []


def test_unknown_corpus_and_bad_options(tmp_path):
    with pytest.raises(DataError) as error:
        open_corpus("pile")
    assert (
        one_line(error) == "corpus 'pile' is neither a known name ['embedded', 'stdlib'] nor an existing path"
    )
    with pytest.raises(DataError, match="max_bytes must be positive"):
        open_corpus("embedded", max_bytes=0)
    with pytest.raises(DataError, match="must be >= 0, sum < 1"):
        prepare("embedded", "bytes", tmp_path, validation_fraction=0.6, test_fraction=0.4)


def test_store_without_manifest_or_with_another_format(tmp_path):
    corpus = tmp_path / "doc.txt"
    corpus.write_text("some words " * 400)
    path = prepare(corpus, "bytes", tmp_path / "out", progress=False)
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(DataError) as error:
        open_store(path)
    assert "has format_version 0; this code reads 1" in one_line(error)
    manifest_path.write_text(
        json.dumps({**manifest, "splits": {**manifest["splits"], "train": {"tokens": 5}}})
    )
    with pytest.raises(DataError, match="split 'train' holds 4401 tokens, manifest says 5"):
        open_store(path)
    manifest_path.unlink()
    for attempt in (lambda: open_store(path), lambda: make_loader(path, "train", 8, 2, seed=0)):
        with pytest.raises(DataError) as error:
            attempt()
        assert one_line(error) == (
            f"{path} is not a complete token store: manifest.json is missing (left by an interrupted prepare?); "
            "delete the folder and prepare again"
        )
    with pytest.raises(DataError, match="not a folder"):
        open_store(tmp_path / "nowhere")
