"""The shared dataset store of multi-container runs, against a real S3 API (the moto server):
prepare publishes (or skips a verified store), train / evaluate containers fetch and verify."""

from __future__ import annotations

import filecmp
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml

from pipeline.config import validate_config
from pipeline.data import DataError, SAMPLE_TEXT_PATH, prepare_dataset, verify_prepared
from pipeline.data.store import fetch_dataset, publish_dataset, read_stored_manifest, verify_stored
from pipeline.prepare_stage import ensure_local_dataset, run_prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store_url(s3_endpoint) -> str:
    """A dataset URL in a bucket that does not exist yet (publishing creates it, as on a fresh MinIO)."""
    return f"s3://datastore-{uuid.uuid4().hex[:12]}/datasets/text"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "text"
    prepare_dataset("text", str(SAMPLE_TEXT_PATH), out, progress=False)
    return out


def demo_config(tmp_path: Path, *, data_dir: Path, dataset_url: str | None):
    raw = yaml.safe_load((REPO / "pipeline" / "configs" / "demo.yaml").read_text())
    raw["work_dir"] = str(tmp_path / "run")
    raw["data"]["dir"] = str(data_dir)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    raw["tracking"] = {"enabled": False}
    raw["cluster"] = {"dataset_url": dataset_url}
    return validate_config(raw)


def store_fs(url: str):
    return fsspec.core.url_to_fs(url)


def test_publish_then_fetch_round_trip(prepared, store_url, tmp_path):
    published = publish_dataset(prepared, store_url)
    assert read_stored_manifest(store_url) == published
    assert verify_stored(store_url) == published

    fetched_dir = tmp_path / "pod" / "data"
    fetched = fetch_dataset(store_url, fetched_dir)
    assert fetched == published
    assert verify_prepared(fetched_dir) == published
    for name in ["train.npy", "valid.npy", "test.npy", "vocab.json", "manifest.json"]:
        assert filecmp.cmp(prepared / name, fetched_dir / name, shallow=False), name
    # no temporary folder is left next to the destination
    assert sorted(p.name for p in fetched_dir.parent.iterdir()) == ["data"]


def test_nothing_published_reads_as_none_and_fetch_names_the_fix(store_url, tmp_path):
    # The bucket does not even exist here.
    assert read_stored_manifest(store_url) is None
    assert verify_stored(store_url) is None
    with pytest.raises(DataError, match="no dataset is published at .*run the prepare stage"):
        fetch_dataset(store_url, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_damaged_store_is_detected_and_fetch_leaves_the_local_copy_alone(prepared, store_url, tmp_path):
    publish_dataset(prepared, store_url)
    fs, root = store_fs(store_url)
    damaged = np.arange(1000, dtype=np.uint8)
    with fs.open(f"{root}/valid.npy", "wb") as f:
        np.save(f, damaged)

    with pytest.raises(DataError, match=r"damaged: valid.npy has sha256 .*--force"):
        verify_stored(store_url)

    local = tmp_path / "data"
    local.mkdir()
    (local / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="does not verify"):
        fetch_dataset(store_url, local)
    assert [p.name for p in local.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the partial download is gone


def test_interrupted_publish_leaves_the_store_uncommitted(prepared, store_url, monkeypatch):
    publish_dataset(prepared, store_url)
    fs, _ = store_fs(store_url)  # fsspec caches the instance: publish_dataset gets this very one
    real_put = fs.put_file
    calls = []

    def flaky_put(lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if rpath.endswith("vocab.json"):
            raise ConnectionError("storage went away")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    with pytest.raises(DataError, match="uploading vocab.json .* failed .*reachable"):
        publish_dataset(prepared, store_url, attempts=1)
    monkeypatch.undo()
    # The old manifest was removed before any file was replaced: readers see "not published".
    assert read_stored_manifest(store_url) is None
    assert [c.rsplit("/", 1)[1] for c in calls] == ["train.npy", "valid.npy", "test.npy", "vocab.json"]


def test_prepare_publishes_once_then_skips_a_verified_store(store_url, tmp_path):
    first = demo_config(tmp_path / "a", data_dir=tmp_path / "a" / "data", dataset_url=store_url)
    manifest = run_prepare(first)
    assert verify_stored(store_url) == manifest

    # A fresh container: no local data, a verified store -> nothing is downloaded or tokenised.
    second = demo_config(tmp_path / "b", data_dir=tmp_path / "b" / "data", dataset_url=store_url)
    assert run_prepare(second) == manifest
    assert not (tmp_path / "b").exists()


def test_prepare_republishes_a_damaged_store(store_url, tmp_path):
    config = demo_config(tmp_path, data_dir=tmp_path / "data", dataset_url=store_url)
    run_prepare(config)
    fs, root = store_fs(store_url)
    fs.rm_file(f"{root}/test.npy")
    with pytest.raises(DataError, match="test.npy is missing"):
        verify_stored(store_url)
    manifest = run_prepare(config)
    assert verify_stored(store_url) == manifest


def test_prepare_refuses_a_store_holding_another_dataset(prepared, s3_endpoint, tmp_path):
    url = f"s3://datastore-{uuid.uuid4().hex[:12]}/datasets/text"
    publish_dataset(prepared, url)
    raw = yaml.safe_load((REPO / "pipeline" / "configs" / "demo.yaml").read_text())
    other_source = tmp_path / "other.txt"
    other_source.write_text("another corpus\n" * 2000)
    raw.update(work_dir=str(tmp_path / "run"), tracking={"enabled": False}, cluster={"dataset_url": url})
    raw["data"].update(source=str(other_source), dir=str(tmp_path / "data"))
    with pytest.raises(DataError, match="holds dataset 'text' prepared from .*set cluster.dataset_url to another"):
        run_prepare(validate_config(raw))


def test_ensure_local_dataset_fetches_when_missing_and_uses_a_verified_copy(store_url, tmp_path):
    run_prepare(demo_config(tmp_path / "prep", data_dir=tmp_path / "prep" / "data", dataset_url=store_url))
    pod = demo_config(tmp_path / "pod", data_dir=tmp_path / "pod" / "data", dataset_url=store_url)
    manifest = ensure_local_dataset(pod)
    assert verify_prepared(pod.data_dir) == manifest

    # A verified local copy is used without touching the store (here: the store is gone).
    fs, root = store_fs(store_url)
    fs.rm(root, recursive=True)
    assert ensure_local_dataset(pod) == manifest


def test_ensure_local_dataset_replaces_a_damaged_local_copy(store_url, tmp_path):
    run_prepare(demo_config(tmp_path / "prep", data_dir=tmp_path / "prep" / "data", dataset_url=store_url))
    pod = demo_config(tmp_path / "pod", data_dir=tmp_path / "pod" / "data", dataset_url=store_url)
    manifest = ensure_local_dataset(pod)
    train = pod.data_dir / "train.npy"
    train.chmod(0o644)
    data = bytearray(train.read_bytes())
    data[-1] ^= 0xFF
    train.write_bytes(bytes(data))
    assert ensure_local_dataset(pod) == manifest
    assert verify_prepared(pod.data_dir) == manifest


def test_ensure_local_dataset_without_store_names_the_fix(tmp_path):
    config = demo_config(tmp_path, data_dir=tmp_path / "data", dataset_url=None)
    with pytest.raises(DataError, match=r"no prepared text data in .*run the prepare stage first.*cluster.dataset_url"):
        ensure_local_dataset(config)
    run_prepare(config)  # locally, without a store, prepare + ensure is all there is
    assert ensure_local_dataset(config) == verify_prepared(config.data_dir)


def test_ensure_local_dataset_never_replaces_other_data(prepared, store_url, tmp_path):
    run_prepare(demo_config(tmp_path / "prep", data_dir=tmp_path / "prep" / "data", dataset_url=store_url))
    # a folder that is not a prepared dataset
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset .* left alone"):
        ensure_local_dataset(demo_config(tmp_path / "p1", data_dir=foreign, dataset_url=store_url))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # a prepared folder of another dataset (same name, other source)
    other_source = tmp_path / "other.txt"
    other_source.write_text("another corpus\n" * 2000)
    other_dir = tmp_path / "other"
    other = prepare_dataset("text", str(other_source), other_dir, progress=False)
    with pytest.raises(DataError, match="holds dataset 'text' prepared from .*other.txt"):
        ensure_local_dataset(demo_config(tmp_path / "p2", data_dir=other_dir, dataset_url=store_url))
    assert verify_prepared(other_dir) == other
