"""pyarrow.fs locations: shards, samples and Ray Train checkpoints at URIs, not only local paths.

``file://`` URIs go through pyarrow's URI handling; ``memory://`` (fsspec's in-process store,
wrapped in ``pyarrow.fs.PyFileSystem``) is a filesystem that is *not* the local disk, so any code
path still using ``pathlib`` on a shard set fails there.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from pathloop import storage
from pathloop.data import (
    ShardWriter,
    iter_records,
    load_arrays,
    load_image_table,
    read_manifest,
    read_shards,
)
from pathloop.vocab import BONE_MARROW_16


@pytest.fixture
def mem_uri() -> str:
    """A fresh directory in fsspec's process-wide in-memory filesystem."""
    return f"memory://pathloop-test/{uuid.uuid4().hex}"


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _write(out: str, n: int = 6) -> dict:
    with ShardWriter(out, BONE_MARROW_16, rows_per_shard=4) as w:
        for i, im in enumerate(_images(n)):
            w.add(im, i % 3, split="train" if i % 2 else "test", source="phantom")
    return w.manifest


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_storage_helpers_round_trip(kind, tmp_path, mem_uri):
    base = {"local": str(tmp_path), "file": tmp_path.as_uri(), "memory": mem_uri}[kind]
    d = storage.join(base, "a", "b")
    storage.makedirs(d)
    storage.write_text(storage.join(d, "x.json"), '{"k": 1}')
    assert storage.is_dir(d) and storage.is_file(storage.join(d, "x.json"))
    assert json.loads(storage.read_text(storage.join(d, "x.json"))) == {"k": 1}
    storage.move(storage.join(d, "x.json"), storage.join(d, "y.json"))
    assert storage.listdir(d) == ["y.json"]
    assert storage.listdir(storage.join(base, "missing")) == []
    local = storage.copy_to_local(storage.join(base, "a"), tmp_path / "copy")
    assert (local / "b" / "y.json").read_text() == '{"k": 1}'
    storage.delete_file(storage.join(d, "y.json"))
    assert not storage.is_file(storage.join(d, "y.json"))


def test_unknown_scheme_names_the_fix():
    with pytest.raises(ValueError, match="s3://, gs://"):
        storage.resolve("nosuchscheme://bucket/x")


def test_shard_set_on_a_non_local_filesystem(mem_uri, tmp_path):
    """Writer, manifest, readers and the feedback-style table all work off the local disk, and
    give the same rows as the same set written locally."""
    man = _write(mem_uri)
    assert man["num_records"] == 6 and len(man["shards"]) == 2
    assert sorted(storage.listdir(mem_uri)) == [
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "quarantine.csv",
    ]  # no temporary shard left behind
    assert read_manifest(mem_uri) == man
    _write(str(tmp_path / "local"))
    remote_rows = list(iter_records(mem_uri, split="train"))
    local_rows = list(iter_records(tmp_path / "local", split="train"))
    assert [r["id"] for r in remote_rows] == [r["id"] for r in local_rows] and len(remote_rows) == 3
    x, y = load_arrays(mem_uri)
    assert x.shape == (6, 8, 8, 3) and np.array_equal(x, _images(6))
    images, class_ids, cols = load_image_table(mem_uri)
    assert np.array_equal(images, x) and set(cols) >= {"id", "split"}
    part = storage.join(mem_uri, "part-00000.parquet")
    assert storage.sha256(part) == man["shards"][0]["sha256"]
    assert len(load_image_table(part)[0]) == 4  # a single Parquet file at a URI


def test_rewriting_a_remote_set_drops_stale_shards(mem_uri):
    _write(mem_uri, n=6)  # two shards
    man = _write(mem_uri, n=3)  # one shard
    assert [s["file"] for s in man["shards"]] == ["part-00000.parquet"]
    assert "part-00001.parquet" not in storage.listdir(mem_uri)


def test_ray_data_reads_shards_at_a_file_uri(ray_session, phantom_shards):
    uri = Path(phantom_shards).as_uri()
    n = read_shards(uri, split="train").count()
    assert n == read_manifest(phantom_shards)["num_records"] - 16 * 2  # 2 test rows per class


def test_local_checkpoint_downloads_from_a_non_local_filesystem(tmp_path):
    """Ray Train returns checkpoints on its storage filesystem; the driver gets a local copy."""
    import pyarrow.fs as pafs
    import ray.train

    from pathloop.harness import local_checkpoint

    remote = tmp_path / "bucket"
    (remote / "ckpt").mkdir(parents=True)
    (remote / "ckpt" / "state.json").write_text('{"step": 7}')
    fs = pafs.SubTreeFileSystem(str(remote), pafs.LocalFileSystem())
    ckpt = ray.train.Checkpoint("ckpt", filesystem=fs)
    local = local_checkpoint(ckpt, tmp_path / "work")
    assert local == tmp_path / "work" / "final_checkpoint"
    assert json.loads((local / "state.json").read_text()) == {"step": 7}
    on_disk = ray.train.Checkpoint(str(remote / "ckpt"))
    assert local_checkpoint(on_disk, tmp_path / "work") == remote / "ckpt"


def test_pretrain_checkpoints_to_a_storage_uri(ray_session, phantom_shards, tmp_path):
    from pathloop.config import load_config
    from pathloop.pretrain import PretrainConfig, run_pretrain

    store = tmp_path / "shared" / "ray-results"
    overrides = [
        f"workdir={tmp_path / 'run'}",
        f"data.shards={Path(phantom_shards).as_uri()}",
        f"train.storage={store.as_uri()}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.register_as=null",
        "model.block_out_channels=[16, 32]",
        "model.layers_per_block=1",
        "train.steps=2",
        "train.batch_size=8",
        "train.sample_every=0",
        "train.preview_per_class=1",
        "preview.steps=1",
        "scaling.torch_threads=1",
    ]
    res = run_pretrain(load_config(PretrainConfig, None, overrides))
    assert res["step"] == 2
    assert Path(res["checkpoint"]).is_relative_to(store / "pretrain")
    assert not (tmp_path / "run" / "ray").exists()  # nothing went to the default place
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_pretrain(load_config(PretrainConfig, None, overrides))


def test_sample_job_reads_and_writes_uris(ray_session, tiny_ckpt, mem_uri):
    """Model at a file:// URI, output in memory: the actors get the checkpoint through Ray."""
    from pathloop.config import SamplerConfig
    from pathloop.sampling import SampleConfig, run_sample

    cfg = SampleConfig(
        model=Path(tiny_ckpt).as_uri(),
        out=mem_uri,
        per_class=1,
        classes=["M5", "B1"],
        sampler=SamplerConfig(steps=1, batch_size=2),
    )
    res = run_sample(cfg)
    assert res["out"] == mem_uri and res["num_records"] == 2
    rows = list(iter_records(mem_uri))
    assert {r["provenance"]["model_uri"] for r in rows} == {Path(tiny_ckpt).as_uri()}


def test_feedback_export_at_a_uri(mem_uri):
    """The reward model's input, a feedback export, read from a folder URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathloop.data import encode_png
    from pathloop.feedback import FEEDBACK_FILE
    from pathloop.reward import load_feedback

    table = pa.table(
        {
            "image": [encode_png(im) for im in _images(3)],
            "class_id": [0, 1, 2],
            "plausible": [1.0, None, 0.25],  # the unjudged row is dropped
        }
    )
    storage.makedirs(mem_uri)
    fs, inner = storage.resolve(storage.join(mem_uri, FEEDBACK_FILE))
    pq.write_table(table, inner, filesystem=fs)
    images, class_ids, targets, vocab = load_feedback(mem_uri)
    assert images.shape == (2, 8, 8, 3) and list(class_ids) == [0, 2]
    assert list(targets) == [1.0, 0.25] and vocab is None
