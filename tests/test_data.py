"""Tests of the data stage (pipeline.data): fetching, verification, tokenisation, output folder."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.data import (
    CANONICAL_FACTS,
    DATASETS,
    SAMPLE_TEXT_PATH,
    DataError,
    DatasetManifest,
    FileFacts,
    SourceFacts,
    load_manifest,
    load_tokens,
    load_vocab,
    prepare_dataset,
    verify_prepared,
)

SHARED = Path("/work/shared/data")
PTB_DIR = SHARED / "ptb"
needs_shared = pytest.mark.skipif(not (PTB_DIR / "ptb.zip").is_file(), reason="shared PTB copy not available")


# ----------------------------------------------------------------------------------------------
# helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(path: Path, member: str, data: bytes, *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(member, data)
    return path


def facts_for(archive: Path, member: str, data: bytes) -> SourceFacts:
    raw = archive.read_bytes()
    return SourceFacts(archive=FileFacts(len(raw), sha(raw)), members={member: FileFacts(len(data), sha(data))})


def enwik8_bytes(n: int = 4003, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, size=n - 256, dtype=np.uint8).tobytes()
    return bytes(range(256)) + body  # every byte value occurs


def text8_bytes(n: int = 3001, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    return alphabet[rng.integers(0, 27, size=n)].tobytes()


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Temporary / partial files the stage must not leave behind."""
    return sorted(p.name for p in parent.rglob("*") if ".tmp-" in p.name or ".part-" in p.name or ".old-" in p.name)


@pytest.fixture
def enwik8_zip(tmp_path: Path) -> tuple[Path, bytes, SourceFacts]:
    data = enwik8_bytes()
    path = make_zip(tmp_path / "enwik8.zip", "enwik8", data)
    return path, data, facts_for(path, "enwik8", data)


@pytest.fixture
def mem_root():
    root = f"memory://test-data-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ----------------------------------------------------------------------------------------------
# enwik8 / text8 / text


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare_dataset("enwik9", "x.zip", tmp_path / "out")
    for name in DATASETS:
        assert name in str(err.value)
    assert not (tmp_path / "out").exists()


def test_enwik8_splits_round_trip_and_manifest(tmp_path: Path, enwik8_zip) -> None:
    archive, data, facts = enwik8_zip
    out = tmp_path / "data" / "enwik8"
    manifest = prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)

    n = len(data)
    n_train, n_valid = n * 90 // 100, n * 5 // 100
    assert (n_train, n_valid, n - n_train - n_valid) == (3602, 200, 201)
    expected = {"train": data[:n_train], "valid": data[n_train : n_train + n_valid], "test": data[n_train + n_valid :]}
    for split, raw in expected.items():
        arr = load_tokens(out, split)
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
        assert arr.dtype == np.uint8
        assert arr.tobytes() == raw  # identity ids: bytes round-trip
        info = manifest.splits[split]
        assert info.num_tokens == len(raw) and info.dtype == "uint8" and info.file == f"{split}.npy"
        assert info.sha256 == sha((out / info.file).read_bytes())
        assert np.array_equal(np.load(out / info.file), np.frombuffer(raw, np.uint8))

    assert manifest.name == "enwik8" and manifest.unit == "char" and manifest.vocab_size == 256
    assert manifest.source == str(archive) and manifest.source_sha256 == sha(archive.read_bytes())
    assert manifest.format_version == 1 and manifest.created_at
    assert load_vocab(out) == [chr(i) for i in range(256)]
    assert load_manifest(out) == manifest == verify_prepared(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]
    assert json.loads((out / "manifest.json").read_text())["splits"]["valid"]["num_tokens"] == 200
    assert not (tmp_path / "data" / ".downloads").exists()  # local sources are read in place
    assert leftovers(tmp_path) == []


def test_text8_ids_and_splits(tmp_path: Path) -> None:
    data = text8_bytes()
    archive = make_zip(tmp_path / "text8.zip", "text8", data)
    out = tmp_path / "text8"
    manifest = prepare_dataset("text8", str(archive), out, expected=facts_for(archive, "text8", data), progress=False)
    vocab = load_vocab(out)
    assert vocab == [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    assert manifest.vocab_size == 27 and manifest.unit == "char"
    decoded = "".join(vocab[i] for split in ("train", "valid", "test") for i in load_tokens(out, split))
    assert decoded.encode() == data
    assert [manifest.splits[s].num_tokens for s in ("train", "valid", "test")] == [2700, 150, 151]
    assert load_tokens(out, "train").dtype == np.uint8


def test_text8_rejects_other_characters(tmp_path: Path) -> None:
    data = bytearray(text8_bytes())
    data[1234] = ord("Q")
    archive = make_zip(tmp_path / "text8.zip", "text8", bytes(data))
    out = tmp_path / "text8"
    with pytest.raises(DataError, match=r"'Q'.*0x51.*offset 1,234") as err:
        prepare_dataset("text8", str(archive), out, expected=facts_for(archive, "text8", bytes(data)), progress=False)
    assert "'text'" in str(err.value)  # the fix: prepare it as a byte-level text dataset
    assert not out.exists() and leftovers(tmp_path) == []


def test_sample_text_dataset(tmp_path: Path) -> None:
    assert SAMPLE_TEXT_PATH.is_file() and SAMPLE_TEXT_PATH.name == "wikitext2_sample.txt.gz"
    readme = (SAMPLE_TEXT_PATH.parent / "README.md").read_text()
    assert "Merity" in readme and "CC BY-SA" in readme and "validation" in readme
    raw = gzip.decompress(SAMPLE_TEXT_PATH.read_bytes())
    assert 500_000 < len(raw) < 700_000 and raw.endswith(b"\n")
    assert (SHARED / "wikitext-2" / "wiki.valid.tokens").read_bytes().startswith(raw) or not SHARED.exists()

    out = tmp_path / "sample"
    manifest = prepare_dataset("text", str(SAMPLE_TEXT_PATH), out, progress=False)
    joined = b"".join(load_tokens(out, s).tobytes() for s in ("train", "valid", "test"))
    assert joined == raw
    assert manifest.splits["train"].num_tokens == len(raw) * 90 // 100
    assert manifest.vocab_size == 256 and manifest.unit == "char"


# ----------------------------------------------------------------------------------------------
# idempotency, force, tampering


def test_second_run_skips_and_leaves_files_untouched(tmp_path: Path, enwik8_zip, caplog) -> None:
    archive, _, facts = enwik8_zip
    out = tmp_path / "enwik8"
    first = prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    before = mtimes(out)
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        second = prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    assert second == first
    assert mtimes(out) == before
    assert "already prepared, verified" in caplog.text


def test_damaged_output_raises_then_force_rebuilds(tmp_path: Path, enwik8_zip) -> None:
    archive, data, facts = enwik8_zip
    out = tmp_path / "enwik8"
    prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    valid = out / "valid.npy"
    raw = bytearray(valid.read_bytes())
    raw[-1] ^= 0xFF
    valid.write_bytes(bytes(raw))
    (out / "junk.txt").write_text("left over")

    with pytest.raises(DataError) as err:
        prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    msg = str(err.value)
    assert "valid.npy" in msg and "force=True" in msg and "--force" in msg
    with pytest.raises(DataError, match="valid.npy"):
        verify_prepared(out)
    with pytest.raises(DataError, match="valid.npy"):
        load_tokens(out, "valid", verify=True)

    prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False, force=True)
    verify_prepared(out)
    assert not (out / "junk.txt").exists()  # the whole folder was rebuilt
    n_train = len(data) * 90 // 100
    assert load_tokens(out, "valid").tobytes() == data[n_train : n_train + len(data) * 5 // 100]
    assert leftovers(tmp_path) == []


def test_failed_force_rebuild_keeps_previous_output(tmp_path: Path, enwik8_zip) -> None:
    archive, _, facts = enwik8_zip
    out = tmp_path / "enwik8"
    prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    before = mtimes(out)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(archive.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt or truncated"):
        prepare_dataset("enwik8", str(broken), out, force=True, verify_source=False, progress=False)
    assert mtimes(out) == before
    verify_prepared(out)
    assert leftovers(tmp_path) == []


def test_output_holding_another_dataset_is_refused(tmp_path: Path, enwik8_zip) -> None:
    archive, _, facts = enwik8_zip
    out = tmp_path / "data"
    prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    with pytest.raises(DataError, match="already holds dataset 'enwik8'"):
        prepare_dataset("text", str(SAMPLE_TEXT_PATH), out, progress=False)
    assert load_manifest(out).name == "enwik8"


def test_non_dataset_folder_is_left_alone(tmp_path: Path, enwik8_zip) -> None:
    archive, _, facts = enwik8_zip
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(DataError, match="not a prepared dataset"):
            prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False, force=force)
    assert (out / "notes.txt").read_text() == "precious"


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": "x"}')
    with pytest.raises(DataError, match="invalid"):
        load_manifest(tmp_path)


def test_manifest_forbids_extra_fields() -> None:
    good = {
        "name": "text", "unit": "char", "source": "s", "source_sha256": None, "vocab_size": 256,
        "splits": {"train": {"file": "train.npy", "num_tokens": 3, "dtype": "uint8", "sha256": "0" * 64}},
        "format_version": 1, "created_at": "2026-01-01T00:00:00+00:00",
    }
    DatasetManifest.model_validate(good)
    with pytest.raises(ValidationError):
        DatasetManifest.model_validate({**good, "extra": 1})
    with pytest.raises(ValidationError):
        DatasetManifest.model_validate({**good, "unit": "byte"})


# ----------------------------------------------------------------------------------------------
# corrupt / truncated / wrong sources (and no partial output)


def test_truncated_zip_reports_sizes(tmp_path: Path, enwik8_zip) -> None:
    archive, _, facts = enwik8_zip
    full = archive.stat().st_size
    archive.write_bytes(archive.read_bytes()[: full // 2])
    out = tmp_path / "enwik8"
    with pytest.raises(DataError) as err:
        prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    msg = str(err.value)
    assert "corrupt or truncated" in msg and f"expected {full:,} bytes, got {full // 2:,}" in msg
    assert str(archive) in msg
    assert not out.exists() and leftovers(tmp_path) == []

    # Without size facts the zip reader itself notices.
    with pytest.raises(DataError, match="corrupt or truncated"):
        prepare_dataset("enwik8", str(archive), out, verify_source=False, progress=False)
    assert not out.exists()


def test_corrupt_zip(tmp_path: Path, enwik8_zip) -> None:
    archive, _, facts = enwik8_zip
    raw = bytearray(archive.read_bytes())
    raw[100] ^= 0xFF  # inside the compressed data: same size, broken content
    archive.write_bytes(bytes(raw))
    out = tmp_path / "enwik8"
    # With the facts: the archive checksum fails first, naming both digests.
    with pytest.raises(DataError) as err:
        prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)
    msg = str(err.value)
    assert "checksum mismatch" in msg and facts.archive.sha256 in msg and sha(bytes(raw)) in msg
    # Without the facts: zip's CRC / inflate check fails while reading.
    with pytest.raises(DataError, match="corrupt or truncated"):
        prepare_dataset("enwik8", str(archive), out, verify_source=False, progress=False)
    # Garbage that is not a zip at all.
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DataError, match=r"junk\.zip is corrupt or truncated"):
        prepare_dataset("enwik8", str(junk), out, verify_source=False, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []


def test_member_checksum_mismatch(tmp_path: Path, enwik8_zip) -> None:
    archive, data, facts = enwik8_zip
    wrong = "ab" * 32
    bad_facts = SourceFacts(archive=facts.archive, members={"enwik8": FileFacts(len(data), wrong)})
    out = tmp_path / "enwik8"
    with pytest.raises(DataError) as err:
        prepare_dataset("enwik8", str(archive), out, expected=bad_facts, progress=False)
    msg = str(err.value)
    assert "checksum mismatch" in msg and f"expected sha256 {wrong}" in msg and f"got {sha(data)}" in msg
    with pytest.raises(DataError, match=r"expected 4,004 bytes, got 4,003"):
        prepare_dataset(
            "enwik8", str(archive), out, expected=SourceFacts(members={"enwik8": FileFacts(size=4004)}), progress=False
        )
    assert not out.exists()


def test_canonical_facts_reject_a_small_archive(tmp_path: Path, enwik8_zip) -> None:
    archive, _, _ = enwik8_zip
    with pytest.raises(DataError, match=r"expected 36,445,475 bytes"):
        prepare_dataset("enwik8", str(archive), tmp_path / "out", progress=False)


def test_canonical_facts_match_readme() -> None:
    enwik8 = CANONICAL_FACTS["enwik8"]
    assert enwik8.archive.size == 36_445_475
    assert enwik8.members["enwik8"] == FileFacts(100_000_000, "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8")
    assert CANONICAL_FACTS["text8"].members["text8"].size == 100_000_000
    assert CANONICAL_FACTS["ptb_word"].members["ptb.train.txt"].sha256 == (
        "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"
    )
    char_train = CANONICAL_FACTS["ptb_char"].members["ptb.char.train.txt"]
    assert char_train.size == 10_034_964 and char_train.sha256.startswith("e313d914") and char_train.sha256.endswith("22f91da9")


def test_wrong_member_name_lists_contents(tmp_path: Path) -> None:
    data = enwik8_bytes()
    archive = make_zip(tmp_path / "enwik8.zip", "enwik9", data)
    out = tmp_path / "enwik8"
    with pytest.raises(DataError) as err:
        prepare_dataset("enwik8", str(archive), out, verify_source=False, progress=False)
    msg = str(err.value)
    assert "'enwik8'" in msg and "not found" in msg and "enwik9" in msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_local_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "enwik8.zip"
    with pytest.raises(DataError, match=r"not found.*nope/enwik8\.zip"):
        prepare_dataset("enwik8", str(missing), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# streamed prepare of the single-stream corpora: same bytes as the plain way, same checks


TEXT8_ALPHABET = b" abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=4)
def reference_files(name: str, data: bytes) -> dict[str, bytes]:
    """What the prepare stage must write for member ``data``, computed the straightforward way: the
    whole member, sliced 90/5/5, mapped byte by byte through a dict, saved with np.save."""
    table = {c: i for i, c in enumerate(TEXT8_ALPHABET)} if name == "text8" else {c: c for c in range(256)}
    vocab = [chr(c) for c in TEXT8_ALPHABET] if name == "text8" else [chr(i) for i in range(256)]
    n = len(data)
    n_train, n_valid = n * 90 // 100, n * 5 // 100
    parts = {"train": data[:n_train], "valid": data[n_train : n_train + n_valid], "test": data[n_train + n_valid :]}
    files = {"vocab.json": json.dumps(vocab).encode()}
    for split, part in parts.items():
        saved = io.BytesIO()
        np.save(saved, np.array([table[c] for c in part], dtype=np.uint8))
        files[f"{split}.npy"] = saved.getvalue()
    return files


def assert_matches_reference(out: Path, name: str, data: bytes, manifest: DatasetManifest) -> None:
    expected = reference_files(name, data)
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    assert written.keys() == expected.keys()
    for file, content in expected.items():
        assert written[file] == content, file
    for split, info in manifest.splits.items():
        assert info.sha256 == sha(expected[info.file]) and info.num_tokens == len(np.load(io.BytesIO(expected[info.file])))
    assert verify_prepared(out) == manifest


@pytest.fixture
def small_chunks(monkeypatch):
    """Stream in pieces of a few hundred bytes so that reads, inflate pieces and split boundaries
    fall at every kind of offset relative to each other."""
    from pipeline.data import streaming

    monkeypatch.setattr(streaming, "STREAM_READ", 257)
    monkeypatch.setattr(streaming, "STREAM_PIECE_MAX", 389)


@pytest.mark.parametrize("name", ["enwik8", "text8"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_streamed_splits_match_the_reference(tmp_path: Path, small_chunks, name: str, compression: int) -> None:
    data = enwik8_bytes(20_011) if name == "enwik8" else text8_bytes(20_011)
    with zipfile.ZipFile(tmp_path / f"{name}.zip", "w", compression=compression) as zf:
        zf.writestr("README", b"another member first: the member is found by name, not position")
        zf.writestr(f"data/{name}", data)
    archive = tmp_path / f"{name}.zip"
    out = tmp_path / "out"
    manifest = prepare_dataset(name, str(archive), out, expected=facts_for(archive, name, data), progress=False)
    assert_matches_reference(out, name, data, manifest)
    assert manifest.source_sha256 == sha(archive.read_bytes())
    assert leftovers(tmp_path) == []


def test_streamed_splits_at_full_chunk_sizes_and_other_layouts(tmp_path: Path, mem_root: str) -> None:
    """Default chunk sizes; a plain file, a tar.gz, a gzipped member and a download give the same files."""
    data = text8_bytes((1 << 20) + (1 << 19) + 17)  # more than one read
    zipped = make_zip(tmp_path / "text8.zip", "text8", data)
    manifest = prepare_dataset("text8", str(zipped), tmp_path / "zip", expected=facts_for(zipped, "text8", data),
                               progress=False)
    assert_matches_reference(tmp_path / "zip", "text8", data, manifest)

    plain = tmp_path / "plain" / "text8"
    plain.parent.mkdir()
    plain.write_bytes(data)
    member_facts = SourceFacts(members={"text8": FileFacts(len(data), sha(data))})
    others = {"plain": str(plain), "tgz": str(tmp_path / "text8.tgz"), "gz_member": str(tmp_path / "gz.zip")}
    with tarfile.open(others["tgz"], "w:gz") as tf:
        info = tarfile.TarInfo("text8/text8")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    make_zip(Path(others["gz_member"]), "text8.gz", gzip.compress(data, compresslevel=1))
    url = f"{mem_root}/text8.zip"
    fsspec.filesystem("memory").pipe(url, zipped.read_bytes())
    others["download"] = url
    for kind, source in others.items():
        out = tmp_path / f"out-{kind}"
        manifest = prepare_dataset("text8", source, out, expected=member_facts, progress=False,
                                   cache_dir=tmp_path / "cache")
        assert_matches_reference(out, "text8", data, manifest)
    assert leftovers(tmp_path) == []


def test_npy_header_is_what_np_save_writes() -> None:
    from pipeline.data.prepare import npy_header

    for dtype in (np.uint8, np.uint16, np.uint32):
        for length in (0, 2, 4003, 90_000_000, 10**12):
            saved = io.BytesIO()
            np.save(saved, np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=(length,), strides=(0,))
                    if length <= 4003 else np.zeros(0, dtype=dtype))
            header = npy_header(np.dtype(dtype), length)
            if length <= 4003:
                assert saved.getvalue()[: len(header)] == header
            stream = io.BytesIO(header)
            assert np.lib.format.read_magic(stream) == (1, 0)
            assert np.lib.format.read_array_header_1_0(stream) == ((length,), False, np.dtype(dtype))
            assert stream.tell() == len(header) and len(header) % 64 == 0


def test_text8_bad_character_offset_across_chunks(tmp_path: Path, small_chunks) -> None:
    data = bytearray(text8_bytes(9_000))
    data[5_000] = ord("Q")
    data[8_999] = ord("!")
    archive = make_zip(tmp_path / "text8.zip", "text8", bytes(data))
    with pytest.raises(DataError, match=r"'Q' \(byte 0x51\) at offset 5,000 \(2 such bytes in all\)"):
        prepare_dataset("text8", str(archive), tmp_path / "out", verify_source=False, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _flip(path: Path, offset: int) -> bytes:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    return bytes(raw)


def test_corruption_late_in_the_stream_is_reported_and_leaves_no_output(tmp_path: Path, small_chunks) -> None:
    """A damaged byte near the end of a stored member: train.npy is written by then; nothing of it stays."""
    data = enwik8_bytes(20_000)
    archive = make_zip(tmp_path / "enwik8.zip", "enwik8", data, compression=zipfile.ZIP_STORED)
    facts = facts_for(archive, "enwik8", data)
    out = tmp_path / "enwik8"
    prepare_dataset("enwik8", str(archive), out, expected=facts, progress=False)  # a good previous output
    before = mtimes(out)
    damaged = _flip(archive, len(archive.read_bytes()) - 200)  # in the test split's bytes

    # The archive's sha256 is known: that is what is reported.
    with pytest.raises(DataError) as err:
        prepare_dataset("enwik8", str(archive), out, expected=facts, force=True, progress=False)
    assert "checksum mismatch" in str(err.value) and sha(damaged) in str(err.value) and str(archive) in str(err.value)
    # Only the member's sha256 is known (as for the canonical enwik8).
    member_only = SourceFacts(members=facts.members)
    with pytest.raises(DataError, match=r"checksum mismatch for member 'enwik8' of .*enwik8\.zip:enwik8"):
        prepare_dataset("enwik8", str(archive), out, expected=member_only, force=True, progress=False)
    # No sha256 at all: the zip's CRC-32 catches it.
    with pytest.raises(DataError, match=r"enwik8\.zip is corrupt or truncated .*Bad CRC-32 for file 'enwik8'"):
        prepare_dataset("enwik8", str(archive), out, verify_source=False, force=True, progress=False)

    assert mtimes(out) == before and verify_prepared(out)  # the previous output is untouched
    assert archive.read_bytes() == damaged  # the source is left as it is
    assert leftovers(tmp_path) == []
    with pytest.raises(DataError, match="checksum mismatch"):  # a fresh folder is not created either
        prepare_dataset("enwik8", str(archive), tmp_path / "fresh", expected=facts, progress=False)
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_truncated_deflate_stream_and_wrong_declared_size(tmp_path: Path) -> None:
    data = text8_bytes(30_000)
    archive = make_zip(tmp_path / "text8.zip", "text8", data)
    raw = archive.read_bytes()
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("text8")
    # The central directory says the deflate stream is shorter than it is: it ends without its end marker.
    short = bytearray(raw)
    directory = raw.rindex(b"PK\x01\x02")
    short[directory + 20 : directory + 24] = (info.compress_size // 2).to_bytes(4, "little")
    (tmp_path / "short.zip").write_bytes(bytes(short))
    with pytest.raises(DataError, match=r"short\.zip is corrupt or truncated .*end-of-stream"):
        prepare_dataset("text8", str(tmp_path / "short.zip"), tmp_path / "out", verify_source=False, progress=False)
    # The central directory understates the member's size: more comes out than it says.
    small = bytearray(raw)
    small[directory + 24 : directory + 28] = (len(data) - 1000).to_bytes(4, "little")
    (tmp_path / "small.zip").write_bytes(bytes(small))
    with pytest.raises(DataError, match=r"small\.zip is corrupt or truncated .*more than the 29,000 bytes"):
        prepare_dataset("text8", str(tmp_path / "small.zip"), tmp_path / "out", verify_source=False, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failing_writer_stops_the_stream_threads(tmp_path: Path, small_chunks, monkeypatch) -> None:
    import threading

    from pipeline.data import prepare as prepare_module

    data = enwik8_bytes(20_000)
    archive = make_zip(tmp_path / "enwik8.zip", "enwik8", data)
    calls = []

    def write(self, ids) -> None:
        calls.append(len(ids))
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        original_write(self, ids)

    original_write = prepare_module._SplitFiles.write
    monkeypatch.setattr(prepare_module._SplitFiles, "write", write)
    threads_before = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        prepare_dataset("enwik8", str(archive), tmp_path / "out", verify_source=False, progress=False)
    assert len(calls) == 5 and threading.active_count() == threads_before  # reader and digest threads ended
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# fsspec sources


def test_file_url_source(tmp_path: Path, enwik8_zip) -> None:
    archive, data, facts = enwik8_zip
    url = archive.resolve().as_uri()
    assert url.startswith("file://")
    out = tmp_path / "enwik8"
    manifest = prepare_dataset("enwik8", url, out, expected=facts, progress=False)
    assert manifest.source == url
    assert load_tokens(out, "train").tobytes() == data[: len(data) * 90 // 100]
    assert not (tmp_path / ".downloads").exists()  # read in place


def test_memory_source_download_and_cache(tmp_path: Path, mem_root: str) -> None:
    data = text8_bytes()
    local = make_zip(tmp_path / "text8.zip", "text8", data)
    facts = facts_for(local, "text8", data)
    url = f"{mem_root}/dc/text8.zip"
    fs = fsspec.filesystem("memory")
    fs.pipe(url, local.read_bytes())
    out = tmp_path / "data" / "text8"

    manifest = prepare_dataset("text8", url, out, expected=facts, progress=False)
    assert manifest.source == url and manifest.source_sha256 == facts.archive.sha256
    cache = tmp_path / "data" / ".downloads"  # default: <output_dir>/../.downloads
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("text8.zip")
    assert cached[0].read_bytes() == local.read_bytes()

    # The verified cache is reused: the remote can vanish.
    fs.rm(url)
    stamp = cached[0].stat().st_mtime_ns
    prepare_dataset("text8", url, out, expected=facts, progress=False, force=True)
    assert cached[0].stat().st_mtime_ns == stamp

    # A cached copy that does not verify is downloaded again.
    fs.pipe(url, local.read_bytes())
    cached[0].write_bytes(b"garbage")
    prepare_dataset("text8", url, out, expected=facts, progress=False, force=True)
    assert cached[0].read_bytes() == local.read_bytes()
    assert leftovers(tmp_path) == []


def test_memory_source_bad_download_is_not_cached(tmp_path: Path, mem_root: str) -> None:
    data = text8_bytes()
    local = make_zip(tmp_path / "text8.zip", "text8", data)
    facts = facts_for(local, "text8", data)
    url = f"{mem_root}/text8.zip"
    fsspec.filesystem("memory").pipe(url, local.read_bytes()[:-10])
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"download of memory://.*corrupt or truncated \(expected [\d,]+ bytes"):
        prepare_dataset("text8", url, out, cache_dir=cache, expected=facts, progress=False)
    assert list(cache.iterdir()) == [] and not out.exists()


def test_unreachable_source_names_url(tmp_path: Path, mem_root: str) -> None:
    url = f"{mem_root}/missing/enwik8.zip"
    with pytest.raises(DataError, match=f"not found: {url}"):
        prepare_dataset("enwik8", url, tmp_path / "out", verify_source=False, progress=False)
    with pytest.raises(DataError, match="nosuchproto"):
        prepare_dataset("enwik8", "nosuchproto://host/enwik8.zip", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# PTB


PTB_TRAIN = " the cat sat on the mat \n the dog sat \n a cat ran \n"
PTB_VALID = " the cat ran \n"
PTB_TEST = " a dog sat on the mat \n the cat \n"


def char_level(text: str) -> str:
    """Mikolov's char-level form (as in /work/shared/data/ptb/derive_ptb_char.py)."""
    lines = text.split("\n")[:-1]
    body = "\n".join("_".join(line.split()) for line in lines) + "\n"
    return "".join(c + " " for c in body)


def make_simple_examples(path: Path, *, gzip_char_train: bool = False) -> Path:
    files = {
        "simple-examples/data/ptb.train.txt": PTB_TRAIN,
        "simple-examples/data/ptb.valid.txt": PTB_VALID,
        "simple-examples/data/ptb.test.txt": PTB_TEST,
        "simple-examples/data/ptb.char.valid.txt": char_level(PTB_VALID),
        "simple-examples/data/ptb.char.test.txt": char_level(PTB_TEST),
        "simple-examples/models/README": "not data",
    }
    char_train = char_level(PTB_TRAIN).encode()
    if gzip_char_train:
        entries = {**{k: v.encode() for k, v in files.items()},
                   "simple-examples/data/ptb.char.train.txt.gz": gzip.compress(char_train)}
    else:
        entries = {**{k: v.encode() for k, v in files.items()}, "simple-examples/data/ptb.char.train.txt": char_train}
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def decode(out: Path, split: str) -> list[str]:
    vocab = load_vocab(out)
    return [vocab[i] for i in load_tokens(out, split)]


@pytest.mark.parametrize("gzip_char_train", [False, True])
def test_ptb_from_simple_examples_tgz(tmp_path: Path, gzip_char_train: bool) -> None:
    tgz = make_simple_examples(tmp_path / "simple-examples.tgz", gzip_char_train=gzip_char_train)
    word = tmp_path / "ptb_word"
    m = prepare_dataset("ptb_word", str(tgz), word, expected=SourceFacts(), progress=False)
    assert m.unit == "word" and m.splits["train"].dtype == "uint16"
    assert decode(word, "train") == "the cat sat on the mat <eos> the dog sat <eos> a cat ran <eos>".split()
    assert decode(word, "test") == "a dog sat on the mat <eos> the cat <eos>".split()
    vocab = load_vocab(word)
    assert vocab[:4] == ["the", "<eos>", "cat", "sat"]  # most frequent first, ties by first appearance
    assert sorted(vocab) == sorted(set(PTB_TRAIN.split()) | {"<eos>"}) and m.vocab_size == len(vocab)

    char = tmp_path / "ptb_char"
    m = prepare_dataset("ptb_char", str(tgz), char, expected=SourceFacts(), progress=False)
    assert m.unit == "char" and m.splits["train"].dtype == "uint8"
    assert decode(char, "valid") == list("the_cat_ran") + ["<eos>"]
    assert decode(char, "train").count("<eos>") == 3  # the trailing " " after the last newline is no line
    assert "_" in load_vocab(char) and " " not in load_vocab(char)


def test_ptb_word_from_memory_prefix(tmp_path: Path, mem_root: str) -> None:
    fs = fsspec.filesystem("memory")
    prefix = f"{mem_root}/ptb/"
    fs.pipe(prefix + "ptb.train.txt", PTB_TRAIN.encode())
    fs.pipe(prefix + "ptb.valid.txt.gz", gzip.compress(PTB_VALID.encode()))  # members may be gzipped
    fs.pipe(prefix + "ptb.test.txt", PTB_TEST.encode())
    out = tmp_path / "ptb"
    facts = SourceFacts(members={"ptb.valid.txt": FileFacts(len(PTB_VALID), sha(PTB_VALID.encode()))})
    m = prepare_dataset("ptb_word", prefix, out, expected=facts, progress=False)
    assert m.source_sha256 is None
    assert decode(out, "valid") == "the cat ran <eos>".split()
    assert len(list((tmp_path / ".downloads").iterdir())) == 3


def test_ptb_layout_error_lists_members(tmp_path: Path) -> None:
    zpath = tmp_path / "ptb.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ptb/ptb.train.txt", PTB_TRAIN)
        zf.writestr("ptb/ptb.valid.txt", PTB_VALID)
        zf.writestr("ptb/ptb.tst.txt", PTB_TEST)
    with pytest.raises(DataError) as err:
        prepare_dataset("ptb_word", str(zpath), tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "'ptb.test.txt'" in msg and "ptb/ptb.tst.txt" in msg and "ptb/ptb.train.txt" in msg
    assert not (tmp_path / "out").exists()


def test_ptb_unknown_valid_token(tmp_path: Path) -> None:
    d = tmp_path / "ptbdir"
    d.mkdir()
    (d / "ptb.train.txt").write_text(PTB_TRAIN)
    (d / "ptb.valid.txt").write_text(" the cat \n the zebra ran \n")
    (d / "ptb.test.txt").write_text(PTB_TEST)
    with pytest.raises(DataError, match=r"valid split .* line 2: token 'zebra' is not in the training vocabulary"):
        prepare_dataset("ptb_word", str(d), tmp_path / "out", verify_source=False, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # With verification on, the canonical PTB facts reject the toy file first.
    with pytest.raises(DataError, match=r"ptb\.train\.txt .*expected 5,101,618 bytes, got 51"):
        prepare_dataset("ptb_word", str(d), tmp_path / "out", progress=False)


@needs_shared
def test_real_ptb_word(tmp_path: Path) -> None:
    out = tmp_path / "ptb_word"
    m = prepare_dataset("ptb_word", str(PTB_DIR / "ptb.zip"), out, progress=False)  # canonical shas checked
    assert {s: i.num_tokens for s, i in m.splits.items()} == {"train": 929_589, "valid": 73_760, "test": 82_430}
    assert m.vocab_size == 10_000 and m.unit == "word"
    vocab = load_vocab(out)
    assert len(vocab) == 10_000 and "<eos>" in vocab and "<unk>" in vocab
    train = load_tokens(out, "train", verify=True)
    assert train.dtype == np.uint16
    assert [vocab[i] for i in train[:4]] == ["aer", "banknote", "berlitz", "calloway"]
    assert int((train == vocab.index("<eos>")).sum()) == 42_068


@needs_shared
def test_real_ptb_char(tmp_path: Path) -> None:
    # The shared folder holds ptb.char.train.txt.gz + plain valid/test: a directory source.
    out = tmp_path / "ptb_char"
    m = prepare_dataset("ptb_char", str(PTB_DIR), out, progress=False)  # canonical shas checked
    assert m.vocab_size == 50 and m.unit == "char" and m.source_sha256 is None
    vocab = load_vocab(out)
    train = load_tokens(out, "train")
    assert train.dtype == np.uint8
    assert "".join(vocab[i] for i in train[:15]) == "aer_banknote_be"
    assert int((train == vocab.index("<eos>")).sum()) == 42_068
    assert m.splits["train"].num_tokens == 5_017_482
    assert sorted(os.listdir(PTB_DIR)) == sorted(
        ["derive_ptb_char.py", "ptb.char.test.txt", "ptb.char.train.txt.gz", "ptb.char.valid.txt", "ptb.zip"]
    )  # nothing written into the shared folder
