"""prepare / open_store / resolve_store: contents checked against an independent re-tokenization (HF tokenizers,
plain single-threaded tiktoken, raw UTF-8 bytes) of the corpus read by the test itself; reuse, atomicity and the
CLI."""

import collections
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest
import tokenizers
from test_data_tokenizers import SEED, plain_tiktoken, random_documents

from chinchax.data import DataError, ensure_embedded_store, make_loader, open_store, prepare, resolve_store
from chinchax.data.tokenizers import gpt2_files

REPO = pathlib.Path(__file__).resolve().parents[1]
CAP = 1_500_000
FRACTIONS = {"validation_fraction": 0.1, "test_fraction": 0.1}


def stdlib_documents(max_bytes: int) -> list[bytes]:
    """The embedded corpus as documented: stdlib *.py in sorted order, non-UTF-8 / binary / empty skipped, capped."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (
            p
            for p in root.rglob("*.py")
            if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    documents, total = [], 0
    for f in files:
        raw = f.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if raw and b"\0" not in raw:
            documents.append(raw)
            total += len(raw)
            if total >= max_bytes:
                break
    return documents


def reference_ids(tokenizer: str, documents: list[bytes]) -> list[list[int]]:
    if tokenizer == "bytes":
        return [list(d) for d in documents]
    files = gpt2_files()
    hf = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"]))
    )
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return [e.ids for e in hf.encode_batch([d.decode() for d in documents], add_special_tokens=False)]


def reference_split(document: bytes) -> str:
    u = int.from_bytes(hashlib.blake2b(document, digest_size=16).digest()[:8], "big") / 2**64
    return "validation" if u < 0.1 else "test" if u < 0.2 else "train"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


@pytest.mark.parametrize("tokenizer,eos,dtype", [("gpt2", 50256, "uint16"), ("bytes", 256, "uint16")])
def test_store_equals_independent_recount(out_dir, tokenizer, eos, dtype):
    path = prepare("embedded", tokenizer, out_dir, max_bytes=CAP, progress=False, **FRACTIONS)
    store = open_store(path)
    documents = stdlib_documents(CAP)
    expected = {"train": [], "validation": [], "test": []}
    for document, ids in zip(documents, reference_ids(tokenizer, documents), strict=True):
        expected[reference_split(document)].append(ids + [eos])
    manifest = store.manifest
    assert manifest["tokenizer"] == {"name": tokenizer, "vocab_size": eos + 1, "eos_id": eos}
    assert manifest["corpus"]["python_version"] == sysconfig.get_python_version() + "." + str(
        sys.version_info.micro
    )
    digests = b"".join(hashlib.blake2b(d, digest_size=16).digest() for d in documents)
    assert manifest["content_hash"] == "sha256:" + hashlib.sha256(digests).hexdigest()
    for split, docs in expected.items():
        assert docs, f"fixture corpus too small: split {split} is empty"
        array = store.arrays[split]
        tokens = array.read().result()
        assert json.loads((path / split / "zarr.json").read_text())["data_type"] == dtype == tokens.dtype.name
        np.testing.assert_array_equal(tokens, np.concatenate(docs))
        assert manifest["splits"][split]["tokens"] == tokens.size == sum(map(len, docs))
        assert manifest["splits"][split]["documents"] == int((tokens == eos).sum()) == len(docs)


def test_parallel_prepare_matches_plain_tiktoken(tmp_path, monkeypatch):
    """Random documents in many small chunks on 3 threads: each stored document holds plain tiktoken's ids, in corpus
    order, and every array file equals the one written on 1 thread byte for byte."""
    monkeypatch.setattr(sys.modules["chinchax.data.prepare"], "CHUNK_CHARS", 1 << 16)
    documents = random_documents(np.random.default_rng(SEED), 120)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    reference = plain_tiktoken()
    expected = {"train": [], "validation": [], "test": []}
    for document in filter(None, documents):  # the corpus skips empty documents
        expected[reference_split(document.encode())].append(reference.encode_ordinary(document))
    stores = {
        threads: prepare(
            corpus, "gpt2", tmp_path / str(threads), num_threads=threads, progress=False, **FRACTIONS
        )
        for threads in (1, 3)
    }
    store = open_store(stores[3])
    for split, docs in expected.items():
        tokens = store.arrays[split].read().result()
        stored = [d[:-1].tolist() for d in np.split(tokens, np.flatnonzero(tokens == 50256) + 1)[:-1]]
        differing = [i for i, (a, b) in enumerate(zip(stored, docs, strict=False)) if a != b]
        assert len(stored) == len(docs) and not differing, (
            f"seed {SEED}, {split}: {len(stored)} documents stored, {len(docs)} expected, "
            f"documents {differing[:5]} differ"
        )
        for single in (stores[1] / split).rglob("*"):
            parallel = stores[3] / single.relative_to(stores[1])
            assert single.is_dir() or parallel.read_bytes() == single.read_bytes(), f"{parallel} differs"


def test_same_inputs_reuse_the_store(out_dir):
    first = prepare("embedded", "bytes", out_dir, max_bytes=200_000, progress=False)
    manifest_time = (first / "manifest.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare("embedded", "bytes", out_dir, max_bytes=200_000, progress=False) == first
    assert time.perf_counter() - start < 2.0
    assert (first / "manifest.json").stat().st_mtime_ns == manifest_time
    other = prepare("embedded", "bytes", out_dir, max_bytes=200_000, validation_fraction=0.2, progress=False)
    assert (
        other != first
        and open_store(other).manifest["content_hash"] == open_store(first).manifest["content_hash"]
    )


def test_changed_corpus_file_makes_a_new_store(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document " * 50)
    first = prepare(corpus, "bytes", tmp_path / "stores", progress=False)
    (corpus / "a.txt").write_text("edited document " * 50)
    second = prepare(corpus, "bytes", tmp_path / "stores", progress=False)
    assert second != first
    assert open_store(second).manifest["content_hash"] != open_store(first).manifest["content_hash"]


def test_killed_prepare_leaves_no_store(tmp_path):
    """SIGKILL mid-write: only a hidden partial folder remains, never taken for a store, cleaned by the next run."""
    out = tmp_path / "stores"
    script = f"from chinchax.data import prepare; prepare('embedded', 'gpt2', {str(out)!r}, progress=False)"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(out.glob(".partial-*/train/zarr.json")) and time.monotonic() < deadline:
        assert process.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partials = list(out.glob(".partial-*"))
    assert len(partials) == 1 and [p for p in out.iterdir() if not p.name.startswith(".")] == []
    with pytest.raises(DataError, match="manifest.json is missing"):
        open_store(partials[0])
    with pytest.raises(DataError, match="manifest.json is missing"):
        make_loader(partials[0], "train", 8, 2, seed=0)
    store_name = partials[0].name.removeprefix(".partial-").split(f"-{os.uname().nodename}-")[0]
    (out / store_name).mkdir()  # a store folder without manifest is refused, not reused or overwritten
    with pytest.raises(DataError, match="manifest.json is missing"):
        prepare("embedded", "gpt2", out, progress=False)
    (out / store_name).rmdir()
    small = prepare("embedded", "gpt2", out, max_bytes=50_000, progress=False)
    assert partials[0].exists(), "another store's run must not touch this store's partial folder"
    assert small.is_dir()


def test_stale_partial_of_a_dead_process_is_removed(tmp_path):
    out = tmp_path / "stores"
    store = prepare("embedded", "bytes", out, max_bytes=50_000, progress=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = os.uname().nodename
    stale = out / f".partial-{store.name}-{host}-{int(dead.stdout)}-deadbeef"
    stale.mkdir()
    shutil.rmtree(store)  # force a rebuild under the same store name
    assert prepare("embedded", "bytes", out, max_bytes=50_000, progress=False) == store
    assert not stale.exists()


def test_resolve_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CHINCHAX_DATA", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# A title\n\nSome prose for the store.\n" * 20)
    prepared = resolve_store(corpus, "bytes", progress=False)
    assert prepared.parent == tmp_path / "cache"
    assert resolve_store(prepared, "bytes") == prepared
    assert resolve_store(str(corpus), "bytes", progress=False) == prepared
    with pytest.raises(DataError, match="prepared with tokenizer 'bytes', the config asks for 'gpt2'"):
        resolve_store(prepared, "gpt2")
    embedded = resolve_store("embedded", "bytes", progress=False)  # the CPU configs' path: full corpus
    assert embedded == ensure_embedded_store("bytes", progress=False)
    assert (
        embedded.parent == tmp_path / "cache" and open_store(embedded).manifest["corpus"]["max_bytes"] is None
    )


def test_prepare_data_cli(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("hello there\n" * 100)
    command = [sys.executable, "-m", "experiments.prepare_data", f"--corpus={corpus}", "--tokenizer=gpt2"]
    done = subprocess.run([*command, f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(summary["tokens"].values()) == len(reference_ids("gpt2", [b"hello there\n" * 100])[0]) + 1
    assert pathlib.Path(summary["store"]).parent == tmp_path / "out"
    bad = subprocess.run([*command[:3], "--corpus=/no/such/corpus"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: corpus '/no/such/corpus' is neither")


def test_unigram_entropy_against_a_counter(tmp_path):
    rng = np.random.default_rng()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["".join(rng.choice(list("abcdefgh \n"), size=int(rng.integers(50, 400)))) for _ in range(40)]
    for i, text in enumerate(texts):
        (corpus / f"{i}.txt").write_text(text)
    store = open_store(prepare(corpus, "bytes", tmp_path / "stores", progress=False, validation_fraction=0.3))
    tokens = store.arrays["validation"].read().result().tolist()
    counts = collections.Counter(tokens)
    expected = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert store.unigram_entropy("validation") == pytest.approx(expected, rel=1e-12)
