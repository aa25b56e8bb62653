"""Ingest of real images into a shard set: an image-folder tree or a CSV of paths in, shards out,
with everything that cannot be used quarantined and listed with its reason.

The input is treated as hostile (a folder from a collaborator, a CSV from a spreadsheet):

- nothing outside the source root (the folder, or the CSV's folder) is opened: ``../``,
  absolute paths and symlinks are resolved and checked first, unless ``allow_outside_root``;
- every input ends as a record, a duplicate of one, or a ``quarantine.csv`` row with its reason
  (a name that is not UTF-8 as ``\\xNN`` escapes); only hidden files are skipped, and counted;
- the set is written to a hidden sibling of ``out`` and swapped in only when complete, so an
  existing set survives any failure;
- a bad option, CSV or labels file raises ``IngestError`` (a ValueError, which the CLI prints as
  one ``error: <what> — <fix>`` line, exit 2) before anything is written.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import errno
import io
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from pydantic import BaseModel, Field

from pathloop import storage
from pathloop.data import MANIFEST, SPLITS, ShardWriter, image_id, printable
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

SIZE_RANGE = (8, 1024)  # output side in px: below, no cell is left; above, memory runs out
MIN_SIDE = 8  # px: a smaller input holds no cell, however it is resized
MAX_ASPECT = 16  # longer / shorter side: resizing a thin strip's short side costs unbounded memory
MAX_CLASSES = 1000  # more class names than this means the class column is not one

# Exit codes of `pathloop ingest` (2, a usage error, is the CLI's for every command).
EXIT_QUARANTINED = 3  # done, but --strict and some input was quarantined
EXIT_NOTHING_INGESTED = 4  # every input was quarantined; an existing set at --out is kept

# Modes that convert to RGB without losing meaning; 16-bit and CMYK need a decision by a person.
_ACCEPTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX"}

# What a shard-set folder may hold (ShardWriter's files and its temporaries): anything else in
# --out would be lost when the new set is swapped in, so ingest refuses such a folder.
_SET_FILE = re.compile(
    r"(manifest\.json|quarantine\.csv|part-\d{5,}\.parquet|\.tmp-\d+-part-\d{5,}\.parquet"
    r"|\.(manifest\.json|quarantine\.csv)\.tmp-\d+)"
)


class IngestError(ValueError):
    """A bad option, source, CSV or labels file; the message says what and how to fix it."""


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
    notes: list[str] = Field([], description="What the user should know: encoding, skipped files.")
    strict: bool = Field(False, description="Whether any quarantined input counts as failure.")

    def exit_code(self, strict: bool | None = None) -> int:
        """0 done; EXIT_QUARANTINED (3) done but strict and something quarantined;
        EXIT_NOTHING_INGESTED (4) nothing could be used."""
        strict = self.strict if strict is None else strict
        if self.num_ingested == 0:
            return EXIT_NOTHING_INGESTED
        return EXIT_QUARANTINED if strict and self.num_quarantined > 0 else 0


@dataclass(frozen=True)
class _Item:
    """One input and what the source says about it."""

    path: Path  # as listed (a symlink, not its target): labels match its stem
    rel: str  # as reported: printable, relative to the source root (CSV: as written)
    class_name: str
    split: str | None = None
    subtype: str | None = None
    real: Path | None = None  # the file to read: resolved and checked against the root
    reject: str | None = None  # why it goes to quarantine unopened


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


# ----------------------------------------------------------------------------- the source root


def _resolve_inside(path: Path, root: Path, allow_outside: bool) -> tuple[Path | None, str | None]:
    """(the file ``path`` names, None), or (None, why it is not read). Symlinks and ``..`` are
    resolved before anything is opened; the target must lie under ``root``."""
    try:
        real = path.resolve()  # non-strict: a path outside the root is never stat'ed as a file
    except RuntimeError:  # how Python < 3.13 reports a symlink loop
        return None, "symlink loop"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "symlink loop"
        return None, f"cannot resolve the path ({err.strerror})"
    except ValueError:  # an embedded NUL byte
        return None, "not a valid path"
    if not allow_outside and not real.is_relative_to(root):
        how = "a symlink out of" if path.is_symlink() else "outside"
        return None, f"{how} the source root — pass --allow-outside-root to read it"
    if not os.path.lexists(real):
        return None, "dangling symlink" if path.is_symlink() else "file not found"
    return real, None


def _is_image_name(name: str) -> bool:
    from PIL import Image

    return Path(name).suffix.lower() in Image.registered_extensions()


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode kept undecodable bytes as surrogates
        return False
    return True


# ----------------------------------------------------------------------------- folder source


def _scandir(folder: Path) -> list[os.DirEntry]:
    return sorted(os.scandir(folder), key=lambda e: e.name)


def _walk_class(root: Path, top: Path, allow_outside: bool) -> tuple[list[_Item], int]:
    """Every entry under one class folder, as items (rejected ones with their reason), and the
    number of hidden entries skipped. Symlinked folders are followed once, inside the root."""
    cls = printable(top.name)
    items, hidden, seen = [], 0, set()
    stack = [(top, cls, False)]  # (folder, its printable path, whether named like an image)
    while stack:
        folder, rel, image_named = stack.pop()
        real = folder.resolve()
        if real in seen:
            items.append(_Item(folder, rel + "/", cls, reject="folder reached twice (a link loop)"))
            continue
        seen.add(real)
        try:
            entries = _scandir(folder)
        except OSError as err:
            items.append(_Item(folder, rel + "/", cls, reject=f"cannot list ({err.strerror})"))
            continue
        visible = [e for e in entries if not e.name.startswith(".")]
        hidden += len(entries) - len(visible)
        why = "a folder, not an image file" if image_named else None if visible else "empty folder"
        if why is not None:
            items.append(_Item(folder, rel + "/", cls, reject=why))
        for e in visible:
            path, erel = Path(e.path), f"{rel}/{printable(e.name)}"
            target, reason = _resolve_inside(path, root, allow_outside)
            if target is not None and target.is_dir():
                stack.append((path, erel, _is_image_name(e.name)))
            else:
                items.append(_Item(path, erel, cls, real=target, reject=reason))
    if not _is_utf8(top.name):
        why = "class folder name is not UTF-8 — rename the folder"
        items = [dataclasses.replace(it, reject=it.reject or why) for it in items]
    return items, hidden


def _items_from_folder(root: Path, allow_outside: bool) -> tuple[list[_Item], list[str]]:
    """SRC/<class>/...: one item per entry under a class folder; hidden entries are skipped.
    Loose images directly in SRC are quarantined; other loose files (README, CSVs) are noted."""
    try:
        entries = _scandir(root)
    except OSError as err:
        raise IngestError(f"cannot list {root} ({err.strerror}) — check its permissions") from None
    hidden = sum(e.name.startswith(".") for e in entries)
    items, loose, classes = [], [], 0
    for e in (e for e in entries if not e.name.startswith(".")):
        path, name = Path(e.path), printable(e.name)
        target, reason = _resolve_inside(path, root, allow_outside)
        if target is not None and target.is_dir():
            walked, n_hidden = _walk_class(root, path, allow_outside)
            items += walked
            hidden, classes = hidden + n_hidden, classes + 1
        elif _is_image_name(e.name) or reason is not None:
            why = reason or "not in a class folder — move it to SRC/<class>/"
            items.append(_Item(path, name, "", reject=why))
        else:
            loose.append(name)
    if not classes and not items:
        raise IngestError(
            f"{root} has no class sub-folders — expected SRC/<class>/<image> "
            "or a CSV with columns path,class[,split][,subtype]"
        )
    notes = [f"skipped {hidden} hidden files or folders (names starting with '.')"] * bool(hidden)
    if loose:
        notes.append(
            f"ignored {len(loose)} non-image files directly in SRC: {', '.join(loose[:5])}"
        )
    return items, notes


# ----------------------------------------------------------------------------- CSV source


def _decode_text(data: bytes, path: Path, notes: list[str]) -> str:
    """UTF-8 (a spreadsheet's byte-order mark dropped) or UTF-16 with its mark, else Latin-1
    with a note."""
    try:
        utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        text = data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        notes.append(f"{path} is not UTF-8; read it as Latin-1 — save it as UTF-8 to be sure")
    if "\x00" in text:
        raise IngestError(f"{path} holds NUL bytes, so it is not a text CSV — export it as CSV")
    return text


def _read_table(
    path: Path, what: str, required: tuple[str, ...], notes: list[str]
) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) per non-blank row of a CSV, keyed by the stripped lower-case header;
    a malformed file raises IngestError naming the line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IngestError(f"{what} {path} does not exist — check the path") from None
    except OSError as err:
        raise IngestError(f"cannot read {what} {path} ({err.strerror}) — pass a CSV file") from None
    text = _decode_text(data, path, notes)
    # Spreadsheets in some locales separate with ';' (or a tab): take it when the header has no ','.
    first = text.split("\n", 1)[0]
    delimiter = next((d for d in ",;\t" if d in first), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    cols = ",".join(required)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if not header:
            raise IngestError(f"{what} {path} is empty — it needs a header row: {cols}")
        missing = [c for c in required if c not in header]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if missing or dupes:
            what_is_wrong = " and ".join(
                [f"lacks columns {', '.join(missing)}"] * bool(missing)
                + [f"repeats columns {', '.join(dupes)}"] * bool(dupes)
            )
            raise IngestError(
                f"{what} {path} {what_is_wrong} (header: {','.join(header)}) — its header row "
                f"must name {cols} once each"
            )
        rows = []
        for row in reader:
            if not any(v.strip() for v in row):
                continue  # blank lines and ",,," rows that spreadsheets append
            if len(row) != len(header):
                raise IngestError(
                    f"{path}:{reader.line_num}: {len(row)} fields, the header has "
                    f"{len(header)} — fix the row (quote a value that holds a comma)"
                )
            rows.append((reader.line_num, dict(zip(header, row, strict=True))))
    except csv.Error as err:
        raise IngestError(f"{path}:{reader.line_num}: {err} — fix the CSV") from None
    return rows


def _split_of(row: dict[str, str], where: str) -> str | None:
    split = (row.get("split") or "").strip() or None
    if split is not None and split not in SPLITS:
        raise IngestError(
            f"{where}: split {split!r} is not one of {', '.join(SPLITS)} — fix it or leave it empty"
        )
    return split


def _items_from_csv(csv_path: Path, allow_outside: bool) -> tuple[list[_Item], list[str]]:
    """CSV with columns path,class[,split][,subtype]; paths relative to the CSV's folder."""
    notes: list[str] = []
    root = csv_path.parent
    items = []
    for n, row in _read_table(csv_path, "CSV", ("path", "class"), notes):
        where = f"{csv_path}:{n}"
        text, cls = row["path"].strip(), row["class"].strip()
        if not text or not cls:
            empty = "path" if not text else f"class for {text!r}"
            raise IngestError(f"{where}: empty {empty} — fill it in or delete the row")
        split, subtype = _split_of(row, where), (row.get("subtype") or "").strip() or None
        real, reason = _resolve_inside(root / text, root, allow_outside)
        items.append(_Item(root / text, printable(text), cls, split, subtype, real, reason))
    return items, notes


# ----------------------------------------------------------------------------- labels


def read_labels(path: str | Path, notes: list[str] | None = None) -> dict[str, _Label]:
    """A labels CSV (``id,split[,class_name][,source_file]``) keyed by file stem; a note about
    its encoding, if any, is appended to ``notes``."""
    labels, notes = {}, [] if notes is None else notes
    for n, row in _read_table(Path(path), "labels file", ("id", "split"), notes):
        split = _split_of(row, f"{path}:{n}") or ""
        if not split:
            raise IngestError(f"{path}:{n}: empty split — fill it in or delete the row")
        subtype = subtype_from_filename(row.get("source_file") or "")
        class_name = (row.get("class_name") or "").strip() or None
        labels[row["id"].strip()] = _Label(split, subtype, class_name)
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
    return dataclasses.replace(
        item, split=item.split or label.split, subtype=item.subtype or label.subtype
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


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading: never through a symlink swapped in after the check,
    never blocking on a FIFO; anything else is rejected."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise _Rejected("file not found") from None
    except OSError as err:
        raise _Rejected(f"cannot open ({err.strerror})") from None
    f = os.fdopen(fd, "rb")
    mode, size = os.fstat(fd).st_mode, os.fstat(fd).st_size
    reason = None
    if stat.S_ISDIR(mode):
        reason = "a folder, not an image file"
    elif not stat.S_ISREG(mode):
        reason = "not a regular file (a FIFO, socket or device)"
    elif size == 0:
        reason = "empty file"
    if reason:
        f.close()
        raise _Rejected(reason)
    return f


def _check_mode(mode: str) -> None:
    if mode in _ACCEPTED_MODES:
        return
    if mode.startswith("I;16"):
        raise _Rejected(f"unsupported mode {mode} (16-bit); convert to 8-bit RGB")
    if mode in ("I", "F"):
        raise _Rejected(f"unsupported mode {mode} (32-bit); convert to 8-bit RGB")
    raise _Rejected(f"unsupported mode {mode}; convert to RGB")


def _check_header(im: PILImage.Image, pixel_limit: int) -> None:
    """Reject from the header alone: too many pixels, too small, too thin, several frames, mode."""
    w, h = im.size
    if w * h > pixel_limit:
        raise _Rejected(f"over pixel limit ({w}x{h} > {pixel_limit:,})")
    if min(w, h) < MIN_SIDE:
        raise _Rejected(f"too small ({w}x{h} px; the minimum is {MIN_SIDE} px a side)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise _Rejected(f"aspect ratio over {MAX_ASPECT}:1 ({w}x{h} px) — crop it to the cell")
    frames = getattr(im, "n_frames", 1)
    if frames > 1 and im.format != "MPO":  # MPO: a camera JPEG plus previews; frame 0 is it
        raise _Rejected(f"multi-frame image ({frames} frames) — save the frame you want alone")
    _check_mode(im.mode)


def _decode(f: BinaryIO, pixel_limit: int) -> PILImage.Image:
    """Check the header, verify, then reopen and decode fully (verify leaves it unusable)."""
    from PIL import Image

    with Image.open(f) as im:
        _check_header(im, pixel_limit)
        im.verify()  # checks structure and checksums without decoding
    f.seek(0)
    im = Image.open(f)
    im.load()
    return im


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
    from PIL import Image, ImageOps, UnidentifiedImageError

    with _open_regular(path) as f:
        try:
            with _pixel_guard(pixel_limit):
                im = _decode(f, pixel_limit)
                # Camera JPEGs may store their orientation only in EXIF; apply it before it is
                # dropped.
                return _square(_to_rgb(ImageOps.exif_transpose(im)), size)
        except _Rejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _Rejected(f"over pixel limit ({pixel_limit:,} px)") from None
        except UnidentifiedImageError:
            raise _Rejected("not an image (cannot identify image file)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _Rejected(f"truncated or corrupt image ({err})") from None
        except Exception as err:  # a hostile file reaches odd corners of a decoder
            raise _Rejected(f"cannot decode ({type(err).__name__}: {err})") from None


def load_image(path: str | Path, size: int = 64, pixel_limit: int = 50_000_000) -> np.ndarray:
    """Read one image file as a size x size x 3 uint8 array, as ingest does.

    Raises ValueError with the quarantine reason (empty, truncated, 16-bit, CMYK, ...).
    """
    real, reason = _resolve_inside(Path(path), Path("/"), allow_outside=True)
    try:
        if real is None:
            raise _Rejected(reason)
        return _load(real, size, pixel_limit)
    except _Rejected as rej:
        raise ValueError(f"{path}: {rej}") from None


# ----------------------------------------------------------------------------- source and output


def _check_options(size: int, pixel_limit: int) -> None:
    lo, hi = SIZE_RANGE
    if not lo <= size <= hi:
        raise IngestError(f"--size {size} is out of range — pass {lo} to {hi} px (64 is typical)")
    if pixel_limit < MIN_SIDE * MIN_SIDE:
        raise IngestError(f"pixel_limit {pixel_limit} is too small — pass at least {MIN_SIDE**2}")


def _discover(src: Path, allow_outside: bool) -> tuple[list[_Item], Path, list[str]]:
    """The items of a folder or CSV source (sorted), its root, and notes for the user."""
    if not src.exists():
        raise FileNotFoundError(f"ingest source {src} does not exist — pass a folder or a CSV")
    if src.is_dir():
        root = src.resolve()
        items, notes = _items_from_folder(root, allow_outside)
    elif src.is_file() and src.suffix.lower() == ".csv":
        root = src.absolute().parent.resolve()  # paths are relative to where the CSV is listed
        items, notes = _items_from_csv(root / src.name, allow_outside)
    else:
        raise IngestError(f"ingest source {src} is not a folder or a .csv file — pass one")
    if not items:
        raise IngestError(f"{src} lists no images — add rows path,class[,split][,subtype]")
    # Sorted so that ids, shard contents and which copy of a duplicate is kept never vary.
    return sorted(items, key=lambda it: (it.class_name, it.rel)), root, notes


def _check_out(out: Path, root: Path, folder_source: bool) -> Path:
    """The resolved output folder; refused when swapping a new set in could lose anything but
    a shard set, or when it overlaps the source."""
    if storage.is_uri(out):
        raise IngestError(f"--out {out} is a URI — ingest to a local folder, then copy it")
    target = Path(out).resolve()
    if target == root or root.is_relative_to(target):
        raise IngestError(f"--out {out} holds the source {root} — pass a folder outside it")
    if folder_source and target.is_relative_to(root):
        raise IngestError(f"--out {out} is inside the source folder — pass a folder outside it")
    if target.exists() and not target.is_dir():
        raise IngestError(f"--out {out} is a file — pass a new folder or a shard set")
    if target.is_dir():
        other = [printable(n) for n in sorted(os.listdir(target)) if not _SET_FILE.fullmatch(n)]
        if other:
            raise IngestError(
                f"--out {out} holds files that are not part of a shard set "
                f"({', '.join(other[:3])}) — pass a new or empty folder, or a shard set"
            )
    return target


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A fresh hidden sibling of ``target`` to write into; removed unless it was swapped in."""
    stage = target.parent / f".{target.name}.ingest-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()  # not mkdtemp: the set keeps the umask's permissions, not 0700
    except OSError as err:
        why = f"cannot write beside --out {target} ({err.strerror})"
        raise IngestError(f"{why} — pass a folder you can write to") from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # already gone if it was swapped in


def _swap_in(stage: Path, target: Path) -> None:
    """Put the complete set at ``target``; an old set there is removed only afterwards. (Two
    renames: a crash between them leaves the old set beside ``target`` as .<name>.old-*.)"""
    if not target.exists():
        os.rename(stage, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- ingest


def _track(items: list[_Item], progress: bool) -> Iterator[_Item]:
    if not progress:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description="ingest", total=len(items))


def _write(
    items: list[_Item],
    writer: ShardWriter,
    labels: dict[str, _Label] | None,
    size: int,
    pixel_limit: int,
    progress: bool,
) -> list[tuple[str, str]]:
    """Each item to a record or a quarantine row; returns (path, kept path) per duplicate."""
    # By name, not vocab.lookup: a folder called "3" is a name, not class id 3.
    class_ids = {c.name: c.id for c in writer.vocab.classes}
    kept: dict[str, str] = {}  # id -> path of the copy that was written
    duplicates: list[tuple[str, str]] = []
    for item in _track(items, progress):
        try:
            if item.reject is not None:
                raise _Rejected(item.reject)
            if labels is not None:
                item = _apply_label(item, labels)
            image = _load(item.real, size, pixel_limit)
        except _Rejected as rej:
            writer.quarantine(item.rel, str(rej))
            continue
        cid = class_ids[item.class_name]
        rid = writer.add(image, cid, item.split or "train", "real", subtype=item.subtype)
        if rid is None:
            duplicates.append((item.rel, kept[image_id(image)]))
        else:
            kept[rid] = item.rel
    return duplicates


def ingest(
    src: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    size: int = 64,
    strict: bool = False,
    pixel_limit: int = 50_000_000,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> IngestReport:
    """Turn an image-folder tree or a CSV of paths into a shard set of ``size`` px RGB images.

    Unreadable, truncated, oversized, tiny (< MIN_SIDE px), multi-frame, 16-bit and CMYK files,
    links out of the source root and the like go to ``quarantine.csv`` with the reason; exact
    duplicates are written once. ``labels`` (a CSV with ``id,split`` and optionally
    ``class_name,source_file``, matched by file stem) supplies splits and sub-types. A run that
    ingests nothing never replaces an existing set at ``out``.
    """
    _check_options(size, pixel_limit)
    items, root, notes = _discover(Path(src), allow_outside_root)
    target = _check_out(Path(out), root, folder_source=Path(src).is_dir())
    label_rows = read_labels(labels, notes) if labels is not None else None
    names = sorted({it.class_name for it in items if it.reject is None})
    if len(names) > MAX_CLASSES:
        what = f"{printable(src)} names {len(names)} classes (at most {MAX_CLASSES})"
        raise IngestError(f"{what} — check the class column or folders")
    vocab = Vocabulary.from_names(names)
    note = "; ".join([f"ingest {printable(src)}", *notes])
    with _staged(target) as stage:
        with ShardWriter(stage, vocab, source_note=note) as writer:
            duplicates = _write(items, writer, label_rows, size, pixel_limit, progress)
        if writer.num_records or not (target / MANIFEST).is_file():
            _swap_in(stage, target)
        else:
            notes.append(f"nothing ingested: the shard set at {printable(out)} was kept")
    return IngestReport(
        out=str(out),
        num_ingested=writer.num_records,
        num_quarantined=len(writer.quarantined),
        num_duplicates=writer.num_duplicates,
        counts=(writer.manifest or {}).get("counts", {}),
        quarantined=writer.quarantined,
        duplicates=duplicates,
        notes=notes,
        strict=strict,
    )
