"""Image shards: the schema, the writer, ingest of real images, and the readers.

A shard set is a folder of Parquet files (one row per image, PNG bytes) plus ``manifest.json``,
which holds the class vocabulary, the counts and a checksum of every shard, so a path alone says
what the data is. Every step downstream reads images through this module:

- ``ingest`` turns an image-folder tree or a CSV of paths into a shard set, quarantining what it
  cannot read and listing why;
- ``ShardWriter`` is what ``ingest``, phantoms and samplers use to write shards;
- ``iter_records`` / ``load_arrays`` read in-process; ``read_shards`` returns a Ray Dataset and
  ``torch_batches`` a single-process iterator, both through the one ``transform_batch``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from pathloop import storage
from pathloop.config import Frozen
from pathloop.vocab import ClassInfo, Vocabulary

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    import torch

SPLITS: tuple[str, ...] = ("train", "test", "val", "none")
SOURCES: tuple[str, ...] = ("real", "phantom", "synthetic")

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
FORMAT_VERSION = 1

# 20 hex chars = 80 bits: collisions are negligible for any dataset this project will see.
ID_HEX_CHARS = 20
# Fixed so the same pixels always give the same bytes (and the same shard checksums).
PNG_COMPRESS_LEVEL = 6


_PROVENANCE_REQUIRED = ("model_uri", "checkpoint_step", "sampler", "steps", "guidance", "seed")
_PROVENANCE_OPTIONAL = ("strength", "init_id")


class NotAShardSetError(FileNotFoundError):
    """A folder was given where a shard set was expected; the message says how to make one."""


# ----------------------------------------------------------------------------- schema


def shard_schema() -> pa.Schema:
    """The Parquet schema of a shard: one row per image, PNG bytes plus labels and provenance."""
    import pyarrow as pa

    provenance = pa.struct(
        [
            pa.field("model_uri", pa.string()),
            pa.field("checkpoint_step", pa.int64()),
            pa.field("sampler", pa.string()),
            pa.field("steps", pa.int32()),
            pa.field("guidance", pa.float32()),
            pa.field("seed", pa.int64()),
            pa.field("strength", pa.float32()),  # image-to-image only
            pa.field("init_id", pa.string()),  # image-to-image only: id of the starting image
        ]
    )
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("image", pa.binary(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("class_id", pa.int32(), nullable=False),
            pa.field("class_name", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("subtype", pa.string()),
            pa.field("provenance", provenance),
        ]
    )


# ----------------------------------------------------------------------------- PNG and ids


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {getattr(image, 'dtype', image)}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 (RGB), got shape {image.shape}")


def encode_png(image: np.ndarray) -> bytes:
    """Deterministic PNG of an HxWx3 uint8 array: no metadata chunks, fixed compression."""
    from PIL import Image

    _check_image(image)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes to an HxWx3 uint8 array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def image_id(image: np.ndarray) -> str:
    """Stable content id of an image: sha256 of its shape and raw RGB bytes (hex prefix).

    Hashing pixels rather than PNG bytes keeps ids stable across zlib/Pillow versions, which
    matters because feedback rows refer to images by id.
    """
    _check_image(image)
    h = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}x3:".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:ID_HEX_CHARS]


# ----------------------------------------------------------------------------- writer


# Control characters would break a line of quarantine.csv or a terminal; show them as escapes.
_CONTROL_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(32), 127)}


def printable(text: str | Path) -> str:
    """``text`` safe to write as UTF-8 and to print: the raw bytes of a file name that is not
    UTF-8 (``os.fsdecode``'s surrogate escapes) become ``\\xff``, control characters ``\\x0a``."""
    text = str(text)
    try:
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that did not come from a file name
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL_ESCAPES)


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{what} {value!r} is not one of: {', '.join(valid)}")


def _check_provenance(prov: dict | None) -> dict | None:
    """Fill the optional image-to-image fields; reject unknown or missing keys by name."""
    if prov is None:
        return None
    known = _PROVENANCE_REQUIRED + _PROVENANCE_OPTIONAL
    unknown = sorted(set(prov) - set(known))
    missing = [k for k in _PROVENANCE_REQUIRED if prov.get(k) is None]
    if unknown or missing:
        raise ValueError(
            f"bad provenance: unknown keys {unknown}, missing keys {missing}; "
            f"valid keys: {', '.join(known)}"
        )
    return {k: prov.get(k) for k in known}


def _with_subtypes(vocab: Vocabulary, seen: dict[str, Counter]) -> Vocabulary:
    """The vocabulary with every sub-type seen in the data listed on its class."""
    classes = []
    for c in vocab.classes:
        extra = sorted(set(seen.get(c.name, ())) - set(c.subtypes))
        classes.append(
            ClassInfo.model_validate({**c.model_dump(), "subtypes": c.subtypes + tuple(extra)})
        )
    return Vocabulary(classes=tuple(classes))


class ShardWriter:
    """Write images to ``part-NNNNN.parquet`` shards plus ``manifest.json``; use as a context.

    Shards go to hidden temporary files and are renamed on ``close``; the manifest is written
    last, so a crash never leaves a folder that looks like a complete shard set. ``out_dir`` is
    a local path or a ``pyarrow.fs`` URI (``s3://bucket/set``; see ``pathloop.storage``).
    """

    def __init__(
        self,
        out_dir: str | Path,
        vocab: Vocabulary,
        rows_per_shard: int = 2048,
        source_note: str = "",
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = storage.absolute(out_dir)
        self.vocab = vocab
        self.rows_per_shard = rows_per_shard
        self.source_note = source_note
        self.num_duplicates = 0
        self.quarantined: list[tuple[str, str]] = []
        self.manifest: dict | None = None
        self._rows: list[dict] = []
        self._tmp_shards: list[tuple[str, int]] = []  # (temporary path, rows)
        self._ids: set[str] = set()
        self._counts: dict[str, Counter] = defaultdict(Counter)
        self._sources: Counter = Counter()
        self._subtypes: dict[str, Counter] = defaultdict(Counter)  # class name -> subtype -> n
        self._sizes: set[tuple[int, int]] = set()

    def __enter__(self) -> ShardWriter:
        storage.makedirs(self.out_dir)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    @property
    def num_records(self) -> int:
        return len(self._ids)

    def add(
        self,
        image: np.ndarray,
        class_id: int,
        split: str,
        source: str,
        subtype: str | None = None,
        provenance: dict | None = None,
    ) -> str | None:
        """Add one HxWx3 uint8 image; return its id, or None if the same pixels were added."""
        info = self.vocab.lookup(int(class_id))
        _check_choice("split", split, SPLITS)
        _check_choice("source", source, SOURCES)
        rid = image_id(image)
        if rid in self._ids:
            self.num_duplicates += 1
            return None
        self._ids.add(rid)
        h, w = int(image.shape[0]), int(image.shape[1])
        row = dict(id=rid, image=encode_png(image), height=h, width=w, class_id=info.id)
        row.update(class_name=info.name, split=split, source=source, subtype=subtype)
        row["provenance"] = _check_provenance(provenance)
        self._rows.append(row)
        self._counts[info.name][split] += 1
        self._sources[source] += 1
        self._sizes.add((h, w))
        if subtype:
            self._subtypes[info.name][subtype] += 1
        if len(self._rows) >= self.rows_per_shard:
            self._flush()
        return rid

    def quarantine(self, path: str | Path, reason: str) -> None:
        """Record an input that was not written, and why (both kept as ``printable`` text)."""
        self.quarantined.append((printable(path), printable(reason)))

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        name = f".tmp-{os.getpid()}-part-{len(self._tmp_shards):05d}.parquet"
        tmp = storage.join(self.out_dir, name)
        fs, inner = storage.resolve(tmp)
        pq.write_table(
            pa.Table.from_pylist(self._rows, schema=shard_schema()), inner, filesystem=fs
        )
        self._tmp_shards.append((tmp, len(self._rows)))
        self._rows = []

    def _discard(self) -> None:
        for tmp, _ in self._tmp_shards:
            storage.delete_file(tmp)
        self._tmp_shards = []

    def _commit_shards(self) -> list[dict]:
        """Move temporary shards into place and drop stale shards of an earlier run."""
        shards = []
        for i, (tmp, n) in enumerate(self._tmp_shards):
            file = f"part-{i:05d}.parquet"
            final = storage.join(self.out_dir, file)
            storage.move(tmp, final)
            shards.append({"file": file, "num_rows": n, "sha256": storage.sha256(final)})
        keep = {s["file"] for s in shards}
        for old in storage.listdir(self.out_dir):
            if old.startswith("part-") and old.endswith(".parquet") and old not in keep:
                storage.delete_file(storage.join(self.out_dir, old))
        return shards

    def _write_quarantine(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(self.quarantined)
        storage.write_text(storage.join(self.out_dir, QUARANTINE), buf.getvalue())

    def close(self) -> dict:
        """Write the remaining rows, the shards, ``quarantine.csv`` and ``manifest.json``."""
        if self.manifest is not None:
            return self.manifest
        storage.makedirs(self.out_dir)
        self._flush()
        # Remove the old manifest first: between here and the new one the folder is not a set.
        storage.delete_file(storage.join(self.out_dir, MANIFEST))
        shards = self._commit_shards()
        self._write_quarantine()
        self.manifest = self._manifest(shards)
        manifest_text = json.dumps(self.manifest, indent=2) + "\n"
        storage.write_text(storage.join(self.out_dir, MANIFEST), manifest_text)
        return self.manifest

    def _manifest(self, shards: list[dict]) -> dict:
        vocab = _with_subtypes(self.vocab, self._subtypes)
        return {
            "format": "pathloop-shards",
            "version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "num_records": self.num_records,
            "counts": {c.name: dict(sorted(self._counts[c.name].items())) for c in vocab.classes},
            "subtype_counts": {
                k: dict(sorted(v.items())) for k, v in sorted(self._subtypes.items())
            },
            "sources": dict(sorted(self._sources.items())),
            "source_note": self.source_note,
            "quarantined": len(self.quarantined),
            "duplicates": self.num_duplicates,
            # [H, W] when every image has the same size, else null.
            "image_size": list(next(iter(self._sizes))) if len(self._sizes) == 1 else None,
            "classes": [c.model_dump(mode="json") for c in vocab.classes],
            "shards": shards,
        }


# ----------------------------------------------------------------------------- manifest


def read_manifest(shard_dir: str | Path) -> dict:
    """Load ``manifest.json`` of a shard set (a path or URI); a folder without one raises
    NotAShardSetError."""
    d = str(shard_dir)
    hint = "create one with `pathloop ingest` or `pathloop phantoms`"
    if not storage.is_dir(d):
        raise NotAShardSetError(f"{d} is not a shard set: no such folder; {hint}")
    path = storage.join(d, MANIFEST)
    if not storage.is_file(path):
        raise NotAShardSetError(f"{d} is not a shard set: it has no {MANIFEST}; {hint}")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as err:
        raise NotAShardSetError(f"{path} is not valid JSON ({err}); {hint}") from None
    missing = [k for k in ("classes", "shards", "num_records") if k not in manifest]
    if missing:
        raise NotAShardSetError(f"{path} lacks keys {missing}; {hint}")
    return manifest


def read_vocab(shard_dir: str | Path) -> Vocabulary:
    """The class vocabulary stored in a shard set's manifest."""
    return Vocabulary.model_validate({"classes": read_manifest(shard_dir)["classes"]})


def _shard_paths(shard_dir: str | Path, manifest: dict) -> tuple[list[str], Any]:
    """The shard files of a set as paths inside its filesystem, and that filesystem."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(shard_dir)
    paths = [f"{root.rstrip('/')}/{s['file']}" for s in manifest["shards"]]
    infos = fs.get_file_info(paths)
    found = [i.type == pafs.FileType.File for i in infos]
    missing = [s["file"] for s, ok in zip(manifest["shards"], found, strict=True) if not ok]
    if missing:
        raise NotAShardSetError(f"{shard_dir}: shards listed in {MANIFEST} are missing: {missing}")
    return paths, fs


# ----------------------------------------------------------------------------- ingest


# ----------------------------------------------------------------------------- transforms


class AugmentConfig(Frozen):
    """Training-time augmentation; cells have no set orientation, so flips and turns are safe."""

    flips: bool = Field(True, description="Random horizontal and vertical flips, p=0.5 each.")
    rot90: bool = Field(True, description="Random rotation by k*90 degrees (square images only).")
    color_jitter: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Max relative change of brightness and saturation; 0 = off. Keep it small "
        "(<= 0.1): stain colour carries class information.",
    )
    seed: int | None = Field(
        None,
        description="None: fresh randomness on every pass; an int: each image (by id) gets the "
        "same augmentation on every pass and in every reader (reproducible tests).",
    )


def _augment_one(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Augment one (H, W, 3) float image in [0, 1]."""
    if cfg.flips:
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.5:
            img = img[::-1]
    if cfg.rot90 and img.shape[0] == img.shape[1]:
        img = np.rot90(img, k=int(rng.integers(4)))
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        brightness, saturation = 1 + rng.uniform(-j, j, size=2)
        gray = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]  # (H, W, 1)
        img = np.clip((gray + saturation * (img - gray)) * brightness, 0.0, 1.0)
    return img


def _image_rng(seed: int, rid: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(rid[:15], 16)])


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PNG bytes -> uint8 (B, H, W, 3); ``id`` and ``class_id`` kept. The costly half of
    ``transform_batch``, which ``read_shards(cache=True)`` runs once and keeps."""
    images = [decode_png(bytes(png)) for png in batch["image"]]  # (H, W, 3) each
    return {
        "id": np.asarray([str(i) for i in batch["id"]], dtype=object),
        "image": np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8),
        "class_id": np.asarray(batch["class_id"], dtype=np.int64),
    }


def augment_batch(
    batch: dict[str, np.ndarray],
    augment: AugmentConfig | dict | None = None,
    rng: np.random.Generator | None = None,
    keep_id: bool = True,
) -> dict[str, np.ndarray]:
    """Decoded uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], augmented per image."""
    cfg = AugmentConfig.model_validate(augment) if isinstance(augment, dict) else augment
    rng = rng if rng is not None else np.random.default_rng()
    ids = [str(i) for i in batch["id"]]
    images = []
    for rid, img in zip(ids, batch["image"], strict=True):
        img = img.astype(np.float32) / 255.0  # (H, W, 3) in [0, 1]
        if cfg is not None:
            img_rng = _image_rng(cfg.seed, rid) if cfg.seed is not None else rng
            img = _augment_one(img, cfg, img_rng)
        images.append(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, H, W)
    out = np.stack(images) * 2.0 - 1.0 if images else np.zeros((0, 3, 0, 0), np.float32)
    result = {
        "image": out.astype(np.float32),  # (B, 3, H, W) in [-1, 1]
        "class_id": np.asarray(batch["class_id"], dtype=np.int64),
    }
    if keep_id:
        result["id"] = np.asarray(ids, dtype=object)
    return result


def transform_batch(
    batch: dict[str, np.ndarray],
    augment: AugmentConfig | dict | None = None,
    rng: np.random.Generator | None = None,
    keep_id: bool = True,
) -> dict[str, np.ndarray]:
    """PNG bytes -> float32 (B, 3, H, W) in [-1, 1], augmented; ``class_id`` -> int64.

    The one transform behind both ``read_shards`` (Ray ``map_batches``) and ``torch_batches``:
    ``decode_batch`` then ``augment_batch``. ``augment`` may be a dict because it crosses process
    boundaries; it is re-validated here.
    """
    return augment_batch(decode_batch(batch), augment, rng, keep_id)


# ----------------------------------------------------------------------------- readers


def _class_ids(vocab: Vocabulary, classes: list[str | int] | None) -> list[int] | None:
    """Resolve names, codes or ids; an unknown one raises KeyError listing the valid classes."""
    if classes is None:
        return None
    if isinstance(classes, str | int):
        classes = [classes]
    return sorted({vocab.lookup(c).id for c in classes})


def _selection(
    shard_dir: str | Path, split: str | None, classes: list[str | int] | None
) -> tuple[list[str], Any, Any]:
    """Shard paths, their filesystem and a pyarrow filter expression (or None) for a
    split/class selection."""
    import pyarrow.dataset as pads

    d = str(shard_dir)
    manifest = read_manifest(d)
    vocab = Vocabulary.model_validate({"classes": manifest["classes"]})
    ids = _class_ids(vocab, classes)
    expr = None
    if split is not None:
        _check_choice("split", split, SPLITS)
        expr = pads.field("split") == split
    if ids is not None:
        cls_expr = pads.field("class_id").isin(ids)
        expr = cls_expr if expr is None else expr & cls_expr
    return (*_shard_paths(d, manifest), expr)


def _scanner(files: list[str], fs: Any, expr: Any, columns: list[str] | None) -> Any:
    import pyarrow.dataset as pads

    ds = pads.dataset(files, format="parquet", schema=shard_schema(), filesystem=fs)
    return ds.scanner(
        columns=columns,
        filter=expr,
        use_threads=False,  # no threads: keep shard order
    )


def _decode_rows(batch: Any) -> Iterator[dict]:
    for row in batch.to_pylist():
        if "image" in row:
            row["image"] = decode_png(row["image"])
        yield row


def iter_records(
    shard_dir: str | Path,
    split: str | None = None,
    classes: list[str | int] | None = None,
    columns: list[str] | None = None,
) -> Iterator[dict]:
    """Rows of a shard set in order, ``image`` decoded to HxWx3 uint8; filters are pushed down."""
    files, fs, expr = _selection(shard_dir, split, classes)  # eager: bad arguments fail here
    if columns is not None:
        unknown = sorted(set(columns) - set(shard_schema().names))
        if unknown:
            raise KeyError(f"unknown columns {unknown}; valid: {', '.join(shard_schema().names)}")

    def rows() -> Iterator[dict]:
        if not files:
            return
        for batch in _scanner(files, fs, expr, columns).to_batches():
            yield from _decode_rows(batch)

    return rows()


def load_arrays(
    shard_dir: str | Path,
    split: str | None = None,
    classes: list[str | int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All selected images as (N, H, W, 3) uint8 and their class ids as (N,) int64."""
    images, labels = [], []
    for row in iter_records(shard_dir, split, classes, columns=["image", "class_id"]):
        images.append(row["image"])
        labels.append(row["class_id"])
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64)
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"{shard_dir}: images differ in size; load_arrays needs one size")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_image_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Images (N, H, W, 3) uint8, class ids (N,) and the other columns, from a shard set *or* a
    single Parquet file with ``image`` PNG bytes and ``class_id`` (e.g. a feedback export)."""
    import pyarrow.parquet as pq

    p = str(path)
    if storage.is_file(p):
        fs, inner = storage.resolve(p)
        table = pq.read_table(inner, filesystem=fs)
        missing = {"image", "class_id"} - set(table.column_names)
        if missing:
            raise ValueError(f"{p} lacks columns {sorted(missing)}; expected a feedback export")
        rows = table.to_pylist()
        for r in rows:
            r["image"] = decode_png(r["image"])
    else:
        rows = list(iter_records(p))
    if not rows:
        raise ValueError(f"{p} holds no images")
    images = np.stack([r.pop("image") for r in rows])  # (N, H, W, 3)
    class_ids = np.asarray([r.pop("class_id") for r in rows], dtype=np.int64)  # (N,)
    cols = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    return images, class_ids, cols


def read_shards(
    shard_dir: str | Path,
    split: str | None = None,
    classes: list[str | int] | None = None,
    augment: AugmentConfig | None = None,
    with_ids: bool = False,
    cache: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of ``image`` float32 (3, H, W) in [-1, 1] and ``class_id`` int64.

    The split/class filter and the column projection are pushed down to the Parquet scan;
    decoding and augmentation run in ``map_batches``. ``with_ids`` adds the string ``id``
    column; leave it off for ``iter_torch_batches``, which cannot turn strings into tensors.
    ``cache`` reads and decodes once, keeps the uint8 images in Ray's object store
    (``materialize``) and leaves only augmentation to every epoch: for sets that fit in it.
    """
    aug = augment.model_dump() if augment is not None else None
    kw = {"augment": aug, "keep_id": with_ids}
    if cache:
        decoded = decoded_shards(shard_dir, split, classes)
        return decoded.map_batches(augment_batch, batch_format="numpy", fn_kwargs=kw)
    ds = _scan_shards(shard_dir, split, classes)
    return ds.map_batches(transform_batch, batch_format="numpy", fn_kwargs=kw)


def decoded_shards(
    shard_dir: str | Path, split: str | None = None, classes: list[str | int] | None = None
) -> ray.data.Dataset:
    """The selected records decoded once and kept in Ray's object store (``materialize``):
    ``id``, ``image`` uint8 (H, W, 3) and ``class_id``, not augmented (``held_epochs``)."""
    return (
        _scan_shards(shard_dir, split, classes)
        .map_batches(decode_batch, batch_format="numpy")
        .materialize()
    )


def _scan_shards(
    shard_dir: str | Path, split: str | None, classes: list[str | int] | None
) -> ray.data.Dataset:
    """The Parquet scan of ``read_shards``: split and class filters pushed down, three columns."""
    import ray.data
    from ray.data.expressions import col, lit

    d = str(shard_dir)
    manifest = read_manifest(d)
    vocab = Vocabulary.model_validate({"classes": manifest["classes"]})
    ids = _class_ids(vocab, classes)
    files, fs = _shard_paths(d, manifest)
    if not files:
        raise ValueError(f"{d} holds no records; nothing to read")
    # Ray Data's V1 Parquet reader: V2 lists files through a pool of FooterReader actors (32
    # unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise), each a new process that
    # imports Ray Data and pandas, on every scan. A job reading a few shard files spends more
    # CPU starting them than reading. V1 reads the footers in the caller (in tasks when there
    # are many files), samples a file's size in a task on Ray's reused worker processes, and
    # pushes the same filters and projection down.
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(files, filesystem=fs)
    finally:
        ctx.use_datasource_v2 = v2
    if split is not None:
        _check_choice("split", split, SPLITS)
        ds = ds.filter(expr=col("split") == lit(split))
    if ids is not None:
        ds = ds.filter(expr=col("class_id").is_in(ids))
    return ds.select_columns(["id", "image", "class_id"])


def held_epochs(
    source: Any, batch_size: int, augment: AugmentConfig | None, seed: int, shuffle: bool = True
) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """Endless epochs over decoded images read once from ``source`` (a ``decoded_shards``
    dataset or a Ray Train shard of one) into this process's memory: each epoch an iterator of
    full batches {"image": float32 (b, 3, H, W) in [-1, 1], "class_id": int64 (b,)}, in an
    order drawn from (seed, epoch) (file order with ``shuffle=False``) and augmented here,
    reproducibly. Ray Data reads the shard once instead of running a pipeline every epoch."""
    import torch

    parts = list(source.iter_batches(batch_format="numpy"))
    n = sum(len(p["class_id"]) for p in parts)
    if n < batch_size:
        raise ValueError(
            f"{n} images in this worker's share < its batch {batch_size}; "
            "lower train.batch_size or add data"
        )
    held = {k: np.concatenate([p[k] for p in parts]) for k in ("id", "image", "class_id")}

    def epoch(rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            out = augment_batch({k: v[idx] for k, v in held.items()}, augment, rng, False)
            yield {k: torch.from_numpy(out[k]) for k in ("image", "class_id")}

    for e in itertools.count():
        yield epoch(np.random.default_rng([seed, e]))


def torch_batches(
    shard_dir: str | Path,
    batch_size: int = 64,
    split: str | None = None,
    classes: list[str | int] | None = None,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Single-process batches: (images float32 (B, 3, H, W) in [-1, 1], class ids int64 (B,)).

    Holds the selected PNG bytes in memory (compressed; ~8 KB per 64 px image) and shuffles by
    ``seed``; augmentation is reproducible from ``seed`` unless ``augment.seed`` fixes it per image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files, fs, expr = _selection(shard_dir, split, classes)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        if not files:
            return
        table = _scanner(files, fs, expr, ["id", "image", "class_id"]).to_table()
        cols = {
            name: np.asarray(table.column(name).to_pylist(), dtype=object)
            for name in ("id", "image")
        }
        cols["class_id"] = table.column("class_id").to_numpy()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(table)) if shuffle else np.arange(len(table))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            out = transform_batch({k: v[idx] for k, v in cols.items()}, augment, rng)
            yield torch.from_numpy(out["image"]), torch.from_numpy(out["class_id"])

    return batches()
