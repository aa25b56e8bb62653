"""Ingest of real images into a shard set: an image-folder tree or a CSV of paths in, shards out,
with everything that cannot be read quarantined and listed with its reason.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from pathloop.data import SPLITS, ShardWriter, _check_choice, image_id
from pathloop.vocab import Vocabulary

if TYPE_CHECKING:
    from PIL import Image as PILImage


# File-name prefixes of the PBC dataset (Acevedo et al. 2020) that carry a sub-type.
SUBTYPE_PREFIXES: dict[str, str] = {
    "SNE_": "segmented",
    "BNE_": "band",
    "MMY_": "metamyelocyte",
    "MY_": "myelocyte",
    "PMY_": "promyelocyte",
}


# Modes that convert to RGB without losing meaning; 16-bit and CMYK need a decision by a person.
_ACCEPTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX"}


# ----------------------------------------------------------------------------- reports and items


class IngestReport(BaseModel):
    """What ``ingest`` did: counts, and every input it skipped with the reason."""

    out: str = Field(description="The shard set written.")
    num_ingested: int = Field(description="Images written.")
    num_quarantined: int = Field(description="Inputs that could not be used.")
    num_duplicates: int = Field(description="Inputs whose pixels equal an earlier input's.")
    counts: dict[str, dict[str, int]] = Field(description="class name -> split -> images.")
    quarantined: list[tuple[str, str]] = Field(description="(path, reason) per bad input.")
    duplicates: list[tuple[str, str]] = Field([], description="(path, path of the kept copy).")
    strict: bool = Field(False, description="Whether any quarantined input counts as failure.")

    def exit_code(self, strict: bool | None = None) -> int:
        """0 if something was ingested and (not strict or nothing quarantined), else 1."""
        strict = self.strict if strict is None else strict
        ok = self.num_ingested > 0 and not (strict and self.num_quarantined > 0)
        return 0 if ok else 1


@dataclass(frozen=True)
class _Item:
    """One input file and what the source says about it."""

    path: Path
    rel: str  # path as reported: relative to the source root
    class_name: str
    split: str | None = None
    subtype: str | None = None


@dataclass(frozen=True)
class _Label:
    split: str
    subtype: str | None
    class_name: str | None


class _Rejected(Exception):
    """An input file that goes to quarantine; the message is the reason."""


def subtype_from_filename(name: str) -> str | None:
    """Sub-type from a PBC file-name prefix (``SNE_123.jpg`` -> ``segmented``), else None."""
    base = Path(name).name
    for prefix, subtype in SUBTYPE_PREFIXES.items():
        if base.startswith(prefix):
            return subtype
    return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- discovery


def _items_from_folder(root: Path) -> list[_Item]:
    """SRC/<class>/<file>: one item per non-hidden file; hidden files (.DS_Store) are skipped."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"{root} has no class sub-folders; expected SRC/<class>/<image> "
            "or a CSV with columns path,class[,split][,subtype]"
        )
    items = []
    for d in class_dirs:
        for f in d.rglob("*"):
            hidden = any(p.startswith(".") for p in f.relative_to(d).parts)
            if f.is_file() and not hidden:
                items.append(_Item(f, _rel(f, root), d.name))
    return items


def _items_from_csv(csv_path: Path) -> list[_Item]:
    """CSV with columns path,class[,split][,subtype]; paths relative to the CSV's folder."""
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if not {"path", "class"} <= set(cols):
            raise ValueError(f"{csv_path} needs columns path,class[,split][,subtype]; got {cols}")
        items = []
        for n, row in enumerate(reader, start=2):  # line 1 is the header
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise ValueError(f"{csv_path}:{n}: split {split!r} is not one of {SPLITS}")
            path = csv_path.parent / row["path"].strip()
            subtype = (row.get("subtype") or "").strip() or None
            items.append(_Item(path, row["path"].strip(), row["class"].strip(), split, subtype))
    return items


def read_labels(path: str | Path) -> dict[str, _Label]:
    """A labels CSV (``id,split[,class_name][,source_file]``) keyed by file stem."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if not {"id", "split"} <= set(cols):
            raise ValueError(f"labels file {path} needs columns id,split; got {cols}")
        labels = {}
        for row in reader:
            split = row["split"].strip()
            _check_choice(f"labels file {path}: split of {row['id']!r}:", split, SPLITS)
            subtype = subtype_from_filename(row.get("source_file") or "")
            labels[row["id"].strip()] = _Label(split, subtype, row.get("class_name") or None)
    return labels


def _apply_label(item: _Item, labels: dict[str, _Label]) -> _Item:
    """Split and sub-type from the labels file; a missing or conflicting row is rejected."""
    label = labels.get(item.path.stem)
    if label is None:
        raise _Rejected(f"no row for {item.path.stem!r} in the labels file")
    if label.class_name and label.class_name != item.class_name:
        raise _Rejected(
            f"labels file says class {label.class_name!r}, source says {item.class_name!r}"
        )
    return _Item(
        item.path,
        item.rel,
        item.class_name,
        item.split or label.split,
        item.subtype or label.subtype,
    )


# ----------------------------------------------------------------------------- decoding


@contextmanager
def _pixel_guard(pixel_limit: int) -> Iterator[None]:
    """Make PIL's decompression-bomb check use our limit, and make its warning an error."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixel_limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_mode(mode: str) -> None:
    if mode in _ACCEPTED_MODES:
        return
    if mode.startswith("I;16"):
        raise _Rejected(f"unsupported mode {mode} (16-bit); convert to 8-bit RGB")
    if mode in ("I", "F"):
        raise _Rejected(f"unsupported mode {mode} (32-bit); convert to 8-bit RGB")
    raise _Rejected(f"unsupported mode {mode}; convert to RGB")


def _open_verified(path: Path, pixel_limit: int) -> PILImage.Image:
    """Open, check size and mode, verify, then reopen and decode fully; else raise _Rejected."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise _Rejected("file not found")
    if path.stat().st_size == 0:
        raise _Rejected("empty file")
    over = f"over pixel limit ({pixel_limit:,} px)"
    try:
        with _pixel_guard(pixel_limit):
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > pixel_limit:
                    raise _Rejected(
                        f"over pixel limit ({im.size[0]}x{im.size[1]} > {pixel_limit:,})"
                    )
                _check_mode(im.mode)
                im.verify()  # checks structure and checksums without decoding
            im = Image.open(path)  # verify() leaves the image unusable: reopen to decode
            im.load()
            return im
    except _Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Rejected(over) from None
    except UnidentifiedImageError:
        raise _Rejected("not an image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _Rejected(f"truncated or corrupt image ({err})") from None


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    """RGB; transparent pixels become white (slide background), not black."""
    from PIL import Image

    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _square(im: PILImage.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (Lanczos), centre crop; images already size x size are untouched."""
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    # A fresh array: nothing of the source file (EXIF, text, ICC) can reach the shard.
    return np.array(im, dtype=np.uint8)


def _load(path: Path, size: int, pixel_limit: int) -> np.ndarray:
    from PIL import ImageOps

    with _open_verified(path, pixel_limit) as im:
        # Camera JPEGs may store their orientation only in EXIF; apply it before it is dropped.
        return _square(_to_rgb(ImageOps.exif_transpose(im)), size)


def load_image(path: str | Path, size: int = 64, pixel_limit: int = 50_000_000) -> np.ndarray:
    """Read one image file as a size x size x 3 uint8 array, as ingest does.

    Raises ValueError with the quarantine reason (empty, truncated, 16-bit, CMYK, ...).
    """
    try:
        return _load(Path(path), size, pixel_limit)
    except _Rejected as rej:
        raise ValueError(f"{path}: {rej}") from None


# ----------------------------------------------------------------------------- ingest


def _discover(src: Path) -> list[_Item]:
    if not src.exists():
        raise FileNotFoundError(f"ingest source {src} does not exist")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise ValueError(f"ingest source {src} must be a folder or a .csv file")
        items = _items_from_csv(src)
    else:
        items = _items_from_folder(src)
    # Sorted so that ids, shard contents and which copy of a duplicate is kept never vary.
    return sorted(items, key=lambda it: (it.class_name, it.rel))


def _track(items: list[_Item], progress: bool) -> Iterator[_Item]:
    if not progress:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description="ingest", total=len(items))


def ingest(
    src: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    size: int = 64,
    strict: bool = False,
    pixel_limit: int = 50_000_000,
    progress: bool = True,
) -> IngestReport:
    """Turn an image-folder tree or a CSV of paths into a shard set of ``size`` px RGB images.

    Unreadable, truncated, oversized, 16-bit and CMYK files go to ``quarantine.csv`` with the
    reason; exact duplicates are written once. ``labels`` (a CSV with ``id,split`` and optionally
    ``class_name,source_file``, matched by file stem) supplies splits and sub-types.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1 px, got {size}")
    items = _discover(Path(src))
    label_rows = read_labels(labels) if labels is not None else None
    vocab = Vocabulary.from_names(sorted({it.class_name for it in items}))
    # By name, not vocab.lookup: a folder called "3" is a name, not class id 3.
    class_ids = {c.name: c.id for c in vocab.classes}
    kept: dict[str, str] = {}  # id -> path of the copy that was written
    duplicates: list[tuple[str, str]] = []
    with ShardWriter(out, vocab, source_note=f"ingest {src}") as writer:
        for item in _track(items, progress):
            try:
                if label_rows is not None:
                    item = _apply_label(item, label_rows)
                image = _load(item.path, size, pixel_limit)
            except _Rejected as rej:
                writer.quarantine(item.rel, str(rej))
                continue
            cid = class_ids[item.class_name]
            rid = writer.add(image, cid, item.split or "train", "real", subtype=item.subtype)
            if rid is None:
                duplicates.append((item.rel, kept[image_id(image)]))
            else:
                kept[rid] = item.rel
    manifest = writer.manifest or {}
    return IngestReport(
        out=str(out),
        num_ingested=writer.num_records,
        num_quarantined=len(writer.quarantined),
        num_duplicates=writer.num_duplicates,
        counts=manifest.get("counts", {}),
        quarantined=writer.quarantined,
        duplicates=duplicates,
        strict=strict,
    )
