"""Shards: ingest of real and broken images, the manifest, and the plain and Ray readers."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pathloop.data import (
    AugmentConfig,
    NotAShardSetError,
    ShardWriter,
    encode_png,
    iter_records,
    load_arrays,
    read_manifest,
    read_shards,
    read_vocab,
    shard_schema,
    torch_batches,
    transform_batch,
)
from pathloop.ingest import ingest
from pathloop.vocab import Vocabulary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk_types(data: bytes) -> list[bytes]:
    assert data[:8] == PNG_SIGNATURE
    pos, types = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length  # length, type, data, CRC
    return types


def _raw_rows(shard_dir: Path) -> list[dict]:
    """Rows as stored (PNG bytes, not decoded), in shard order."""
    import pyarrow.parquet as pq

    rows = []
    for s in read_manifest(shard_dir)["shards"]:
        rows += pq.read_table(shard_dir / s["file"]).to_pylist()
    return rows


# ----------------------------------------------------------------------------- real cells


@pytest.fixture(scope="module")
def real_shards(real_cells: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real_shards")
    report = ingest(real_cells, out, labels=real_cells / "LABELS.csv", progress=False)
    assert report.num_ingested == 3200 and report.num_quarantined == 0, report.quarantined[:5]
    assert report.exit_code(strict=True) == 0
    return out


def test_ingest_real_cells_with_labels(real_shards: Path) -> None:
    manifest = read_manifest(real_shards)
    vocab = read_vocab(real_shards)
    assert manifest["num_records"] == 3200 and len(vocab) == 8
    assert manifest["image_size"] == [64, 64] and manifest["sources"] == {"real": 3200}
    per_split = {"train": 0, "test": 0}
    for splits in manifest["counts"].values():
        assert splits == {"test": 100, "train": 300}
        for split, n in splits.items():
            per_split[split] += n
    assert per_split == {"train": 2400, "test": 800}
    neut = manifest["subtype_counts"]["neutrophil"]
    assert neut["band"] > 100 and neut["segmented"] > 100
    assert {"band", "segmented"} <= set(vocab.lookup("neutrophil").subtypes)
    assert {"metamyelocyte", "myelocyte", "promyelocyte"} == set(vocab.lookup("ig").subtypes)
    assert vocab.lookup("basophil").subtypes == ()
    # Checksums in the manifest are those of the files on disk.
    for s in manifest["shards"]:
        assert hashlib.sha256((real_shards / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert sum(s["num_rows"] for s in manifest["shards"]) == 3200


def test_real_cells_pixels_kept_exactly(real_shards: Path, real_cells: Path) -> None:
    # 64 px inputs at size=64 must not be resampled: stored pixels equal the source file's.
    row = next(iter_records(real_shards, split="test", classes=["platelet"]))
    src = sorted((real_cells / "platelet").glob("*.png"))
    by_stem = {p.stem: p for p in src}
    labels = {r["id"]: r for r in csv.DictReader((real_cells / "LABELS.csv").open())}
    first_test = next(s for s in sorted(by_stem) if labels[s]["split"] == "test")
    expected = np.asarray(Image.open(by_stem[first_test]).convert("RGB"))
    np.testing.assert_array_equal(row["image"], expected)


# ----------------------------------------------------------------------------- broken inputs


def _save_with_metadata(src: Path, dst: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "patient: Jane Doe, slide 42")
    exif = Image.Exif()
    exif[0x010E] = "ImageDescription with a name in it"
    Image.open(src).save(dst, pnginfo=info, exif=exif)


@pytest.fixture(scope="module")
def messy_src(real_cells: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 5 real images plus broken files, one duplicate and two odd good images."""
    src = tmp_path_factory.mktemp("messy")
    for cls in ("basophil", "ig", "neutrophil"):
        (src / cls).mkdir()
        for f in sorted((real_cells / cls).glob("*.png"))[:5]:
            shutil.copy(f, src / cls / f.name)
    b = src / "basophil"
    good = sorted(b.glob("*.png"))
    (b / "empty.png").write_bytes(b"")
    data = good[0].read_bytes()
    (b / "truncated.png").write_bytes(data[: len(data) // 2])
    (b / "notimage.png").write_text("a text file, not an image\n")
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gray16).save(b / "gray16.png")  # mode I;16
    Image.new("CMYK", (64, 64), (0, 128, 255, 0)).save(src / "ig" / "cmyk.jpg")
    shutil.copy(good[1], b / "zz_copy.png")  # exact duplicate, sorts after its original
    # Good but odd: text chunk + EXIF (must be stripped), and a non-square RGBA image.
    extra = sorted((real_cells / "neutrophil").glob("*.png"))[5]
    _save_with_metadata(extra, src / "neutrophil" / "with_meta.png")
    rgba = Image.open(extra).convert("RGBA").resize((96, 80))
    rgba.putalpha(Image.linear_gradient("L").resize((96, 80)))
    rgba.save(src / "ig" / "rgba_wide.png")
    return src


EXPECTED_REASONS = {
    "basophil/empty.png": "empty file",
    "basophil/truncated.png": "truncated",
    "basophil/notimage.png": "not an image (cannot identify image file)",
    "basophil/gray16.png": "unsupported mode I;16 (16-bit)",
    "ig/cmyk.jpg": "unsupported mode CMYK; convert to RGB",
}


def test_ingest_quarantines_each_broken_file(messy_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = ingest(messy_src, out, progress=False)
    assert report.num_ingested == 17  # 15 plain + metadata + RGBA
    assert report.num_duplicates == 1
    assert report.duplicates == [("basophil/zz_copy.png", "basophil/pbc_00002.png")]
    with (out / "quarantine.csv").open() as f:
        rows = list(csv.DictReader(f))
    reasons = {r["path"]: r["reason"] for r in rows}
    assert set(reasons) == set(EXPECTED_REASONS)
    for path, expected in EXPECTED_REASONS.items():
        assert expected in reasons[path], (path, reasons[path])
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 3  # EXIT_QUARANTINED
    manifest = read_manifest(out)
    assert manifest["quarantined"] == 5 and manifest["duplicates"] == 1
    assert read_vocab(out).names == ["basophil", "ig", "neutrophil"]

    images, labels = load_arrays(out)
    assert images.shape == (17, 64, 64, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5, 6, 6]
    for row in _raw_rows(out):
        assert set(_png_chunk_types(row["image"])) <= {b"IHDR", b"IDAT", b"IEND"}, row["id"]


def test_ingest_is_deterministic(messy_src: Path, tmp_path: Path) -> None:
    first = ingest(messy_src, tmp_path / "a", progress=False)
    second = ingest(messy_src, tmp_path / "a", progress=False)  # same dir again: overwritten
    third = ingest(messy_src, tmp_path / "b", progress=False)
    ids = [[r["id"] for r in iter_records(tmp_path / d, columns=["id"])] for d in "ab"]
    assert ids[0] == ids[1] and len(set(ids[0])) == 17
    assert first.num_duplicates == second.num_duplicates == third.num_duplicates == 1
    shas = [[s["sha256"] for s in read_manifest(tmp_path / d)["shards"]] for d in "ab"]
    assert shas[0] == shas[1]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "manifest.json",
        "part-00000.parquet",
        "quarantine.csv",
    ]


def test_ingest_csv_source_and_pixel_limit(real_cells: Path, tmp_path: Path) -> None:
    imgs = tmp_path / "src" / "imgs"
    imgs.mkdir(parents=True)
    picks = [("eosinophil", 0), ("eosinophil", 1), ("monocyte", 0), ("monocyte", 1)]
    lines = ["path,class,split,subtype"]
    for i, (cls, k) in enumerate(picks):
        src = sorted((real_cells / cls).glob("*.png"))[k]
        shutil.copy(src, imgs / f"cell{i}.png")
        lines.append(f"imgs/cell{i}.png,{cls},{'test' if k else 'train'},{'x' if i == 3 else ''}")
    lines.append("imgs/missing.png,monocyte,,")
    table = tmp_path / "src" / "cells.csv"
    table.write_text("\n".join(lines) + "\n")

    report = ingest(table, tmp_path / "out", progress=False)
    assert report.num_ingested == 4
    assert report.quarantined == [("imgs/missing.png", "file not found")]
    assert report.counts == {
        "eosinophil": {"test": 1, "train": 1},
        "monocyte": {"test": 1, "train": 1},
    }
    assert read_vocab(tmp_path / "out").lookup("monocyte").subtypes == ("x",)

    over = ingest(table, tmp_path / "tiny_limit", pixel_limit=1000, progress=False)
    assert over.num_ingested == 0 and over.exit_code() == 4  # EXIT_NOTHING_INGESTED
    assert all(r.startswith("over pixel limit") for p, r in over.quarantined if "cell" in p)

    table.write_text("file,label\nimgs/cell0.png,eosinophil\n")
    with pytest.raises(ValueError, match="path,class"):
        ingest(table, tmp_path / "bad", progress=False)


# ----------------------------------------------------------------------------- writer + readers


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 random 16 px images, 3 classes, 2 splits, 4 shards of <= 8 rows; 10 synthetic."""
    out = tmp_path_factory.mktemp("tiny")
    vocab = Vocabulary.from_names(["alpha", "beta", "gamma"])
    rng = np.random.default_rng(0)
    with ShardWriter(out, vocab, rows_per_shard=8, source_note="test") as w:
        for i in range(30):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            prov = None
            if i >= 20:
                prov = dict(model_uri="runs:/x/model", checkpoint_step=5, sampler="ddim")
                prov.update(steps=2, guidance=2.0, seed=i)
            src = "synthetic" if prov else "real"
            w.add(img, i % 3, "test" if i % 5 == 0 else "train", src, provenance=prov)
    return out


def test_writer_manifest_and_validation(tiny_shards: Path, tmp_path: Path) -> None:
    m = read_manifest(tiny_shards)
    assert [s["num_rows"] for s in m["shards"]] == [8, 8, 8, 6]
    assert m["sources"] == {"real": 20, "synthetic": 10} and m["image_size"] == [16, 16]
    rows = list(iter_records(tiny_shards, columns=["id", "source", "provenance"]))
    synth = [r for r in rows if r["source"] == "synthetic"]
    assert synth[0]["provenance"]["model_uri"] == "runs:/x/model"
    assert synth[0]["provenance"]["strength"] is None
    assert all(r["provenance"] is None for r in rows if r["source"] == "real")

    vocab = Vocabulary.from_names(["a"])
    img = np.zeros((8, 8, 3), np.uint8)
    with ShardWriter(tmp_path / "v", vocab) as w:
        assert w.add(img, 0, "train", "phantom") is not None
        assert w.add(img.copy(), 0, "test", "phantom") is None  # same pixels: duplicate
        for bad in (
            dict(split="dev"),
            dict(source="fake"),
            dict(provenance={"model_uri": "m"}),
            dict(image=img.astype(np.float32)),
            dict(image=img[..., 0]),
        ):
            args = {**dict(image=img + 1, class_id=0, split="train", source="phantom"), **bad}
            with pytest.raises(ValueError):
                w.add(**args)
        with pytest.raises(KeyError, match="valid classes"):
            w.add(img + 2, 3, "train", "phantom")
    assert read_manifest(tmp_path / "v")["duplicates"] == 1

    # A crash inside the writer leaves no manifest and no temporary shards behind.
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "crash", vocab, rows_per_shard=1) as w:
            w.add(img, 0, "train", "real")
            raise RuntimeError("boom")
    assert list((tmp_path / "crash").iterdir()) == []
    assert encode_png(img) == encode_png(img.copy())  # deterministic bytes
    assert "provenance" in shard_schema().names


def test_bad_selection_and_non_shard_dir(tiny_shards: Path, tmp_path: Path) -> None:
    for call in (
        lambda: iter_records(tiny_shards, classes=["delta"]),
        lambda: load_arrays(tiny_shards, classes=["alpha", "delta"]),
        lambda: torch_batches(tiny_shards, classes=["delta"]),
        lambda: read_shards(tiny_shards, classes=["delta"]),  # fails before Ray is needed
    ):
        with pytest.raises(KeyError, match="valid classes: alpha"):
            call()
    with pytest.raises(ValueError, match="split 'dev'"):
        iter_records(tiny_shards, split="dev")
    (tmp_path / "x.png").write_bytes(b"")
    for call in (read_manifest, read_vocab, iter_records, read_shards):
        with pytest.raises(NotAShardSetError, match="no manifest.json; create one with `pathl"):
            call(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_vocab(tmp_path / "nope")


def test_plain_readers(tiny_shards: Path) -> None:
    assert len(list(iter_records(tiny_shards))) == 30
    images, labels = load_arrays(tiny_shards, split="test", classes=["alpha", 1])
    assert images.shape == (4, 16, 16, 3) and set(labels.tolist()) <= {0, 1}

    batches = list(torch_batches(tiny_shards, batch_size=8, split="train", seed=1))
    assert [len(b[1]) for b in batches] == [8, 8, 8]
    x, y = batches[0]
    assert tuple(x.shape) == (8, 3, 16, 16) and str(x.dtype) == "torch.float32"
    assert str(y.dtype) == "torch.int64" and -1.0 <= x.min() and x.max() <= 1.0
    again = next(iter(torch_batches(tiny_shards, batch_size=8, split="train", seed=1)))
    assert (again[0] == x).all()  # same seed, same order
    kept = list(torch_batches(tiny_shards, batch_size=8, split="train", drop_last=True))
    assert len(kept) == 3  # 24 train rows


def test_augment_is_shared_and_seeded(tiny_shards: Path) -> None:
    rows = _raw_rows(tiny_shards)[:6]
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in ("id", "image")}
    batch["class_id"] = np.asarray([r["class_id"] for r in rows])
    plain = transform_batch(batch)
    aug = AugmentConfig(color_jitter=0.0, seed=3)
    a = transform_batch(batch, aug.model_dump())
    b = transform_batch(batch, aug)
    np.testing.assert_array_equal(a["image"], b["image"])  # per-image seed: reproducible
    for x, y in zip(plain["image"], a["image"], strict=True):
        # Flips and 90-degree turns only move pixels around.
        np.testing.assert_array_equal(np.sort(x, axis=None), np.sort(y, axis=None))
    jit = transform_batch(batch, AugmentConfig(flips=False, rot90=False, color_jitter=0.1, seed=0))
    assert jit["image"].min() >= -1 and jit["image"].max() <= 1
    assert not np.array_equal(jit["image"], plain["image"])


def test_ray_reader_matches_plain_reader(ray_session: object, tiny_shards: Path) -> None:
    import torch

    plain = {r["id"]: r for r in iter_records(tiny_shards)}
    rows = read_shards(tiny_shards, with_ids=True).take_all()
    assert len(rows) == len(plain) == 30
    for r in rows:
        assert r["image"].shape == (3, 16, 16) and r["image"].dtype == np.float32
        expected = plain[r["id"]]["image"].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(r["image"], expected, atol=1e-6)
        assert r["class_id"] == plain[r["id"]]["class_id"]

    sel = read_shards(tiny_shards, split="test", classes=["alpha", "beta"], with_ids=True)
    got = sorted(r["id"] for r in sel.take_all())
    want = sorted(r["id"] for r in iter_records(tiny_shards, "test", ["alpha", "beta"], ["id"]))
    assert got == want and len(got) == 4

    # Same seeded augmentation in Ray and in-process: one transform behind both.
    aug = AugmentConfig(color_jitter=0.05, seed=7)
    ray_aug = {
        r["id"]: r["image"] for r in read_shards(tiny_shards, augment=aug, with_ids=True).take_all()
    }
    batch = {
        k: np.asarray([r[k] for r in _raw_rows(tiny_shards)], dtype=object)
        for k in ("id", "image", "class_id")
    }
    local = transform_batch(batch, aug)
    for rid, img in zip(local["id"], local["image"], strict=True):
        np.testing.assert_allclose(ray_aug[rid], img, atol=1e-6)
    # Decoded once and cached in the object store: the same images, augmentations re-drawn.
    cached = read_shards(tiny_shards, augment=aug, with_ids=True, cache=True)
    for _ in range(2):  # every pass over the cache augments again from the kept uint8 images
        rows = cached.take_all()
        assert len(rows) == 30
        for r in rows:
            np.testing.assert_allclose(r["image"], ray_aug[r["id"]], atol=1e-6)
    unseeded = read_shards(tiny_shards, augment=AugmentConfig(), with_ids=True, cache=True)
    a, b = ({r["id"]: r["image"] for r in unseeded.take_all()} for _ in range(2))
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # fresh flips on every epoch

    # What the trainers call inside Ray Train workers.
    ds = read_shards(tiny_shards, split="train", augment=AugmentConfig())
    dtypes = {"image": torch.float32, "class_id": torch.int64}
    batches = list(ds.iter_torch_batches(batch_size=8, dtypes=dtypes, drop_last=True))
    assert len(batches) == 3 and set(batches[0]) == {"image", "class_id"}
    assert tuple(batches[0]["image"].shape) == (8, 3, 16, 16)
    assert batches[0]["class_id"].dtype == torch.int64


def test_shards_are_scanned_without_footer_reader_actors(
    ray_session: object, tiny_shards: Path
) -> None:
    """The scan goes through Ray Data's V1 Parquet reader, which starts no FooterReader actors
    (V2 starts 32 processes per scan), and leaves the caller's DataContext as it was."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ds = read_shards(tiny_shards, split="train").materialize()
    assert ds.count() == 24 and ctx.use_datasource_v2 == before
    stats = ds.stats()
    assert "ReadParquet" in stats and "ReadFiles" not in stats  # V2: ListFiles -> ReadFiles
