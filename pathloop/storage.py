"""Where bytes live: a local path or a URI on any ``pyarrow.fs`` filesystem.

Shard sets, sample outputs and Ray Train checkpoints can sit on a laptop disk, an NFS mount or
an object store; callers pass a string and never branch on which. ``resolve`` turns it into a
``(pyarrow.fs.FileSystem, path)`` pair: pyarrow's own filesystems for local paths, ``file://``,
``s3://``, ``gs://`` and ``hdfs://``, and any other fsspec protocol (``abfs://``, ``memory://``)
wrapped in ``pyarrow.fs.PyFileSystem``. Ray Data and Ray Train take the same pair.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs


# ``scheme:/`` with a scheme of two or more letters: ``s3://b/k``, ``file:///x``, ``models:/m/1``.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def is_uri(path: str | Path) -> bool:
    """True for a URI (``s3://...``, ``file://...``, MLflow's ``models:/...``); a plain path,
    relative or absolute, is local."""
    return bool(_URI.match(str(path)))


def resolve(path: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it). Local paths become absolute, so a Ray worker with another
    working directory sees the same file."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    text = str(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        return pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid:
        pass  # not a filesystem pyarrow knows: try fsspec's registry
    import fsspec.core

    try:
        fs, inner = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"cannot open {text!r}: neither pyarrow.fs nor fsspec knows its scheme ({err}); "
            "use a local path or s3://, gs://, hdfs://, file:// (or install the fsspec backend)"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def absolute(path: str | Path) -> str:
    """The location as a string every process can use: URIs unchanged, local paths absolute
    (workers do not share the driver's working directory)."""
    return str(path) if is_uri(path) else os.path.abspath(str(path))


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike."""
    if not is_uri(base):
        return str(Path(base, *parts))
    return posixpath.join(str(base).rstrip("/"), *parts)


def name(path: str | Path) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(path).rstrip("/"))


def _info(path: str | Path):
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def is_file(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.Directory


def makedirs(path: str | Path) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def listdir(path: str | Path) -> list[str]:
    """Names of the entries directly inside a directory ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    sel = pafs.FileSelector(inner, allow_not_found=True)
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in fs.get_file_info(sel))


def read_bytes(path: str | Path) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file at once: readers never see half of it (a local file is written beside
    its target and renamed; an object-store put is atomic by itself)."""
    if not is_uri(path):
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    fs, inner = resolve(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def delete_file(path: str | Path, missing_ok: bool = True) -> None:
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        if not missing_ok:
            raise


def move(src: str | Path, dst: str | Path) -> None:
    """Rename within one filesystem (a copy and delete on object stores)."""
    fs, src_inner = resolve(src)
    fs.move(src_inner, resolve(dst)[1])


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def copy_to_local(src: str | Path, dest: str | Path) -> Path:
    """Copy the tree (or file) at ``src``, on any filesystem, into the local directory ``dest``."""
    import pyarrow.fs as pafs

    fs, inner = resolve(src)
    local = pafs.LocalFileSystem()
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        pafs.copy_files(
            inner, str(root / name(inner)), source_filesystem=fs, destination_filesystem=local
        )
    else:
        pafs.copy_files(inner, str(root), source_filesystem=fs, destination_filesystem=local)
    return root


def pack_dir(path: str | Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """A local directory tree as {relative posix path: bytes}, to ship through Ray's object
    store to processes on other nodes (files named in ``skip`` are left out)."""
    root = Path(path)
    return {
        f.relative_to(root).as_posix(): f.read_bytes()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name not in skip
    }


def unpack_dir(files: dict[str, bytes], dest: str | Path) -> Path:
    """Write what ``pack_dir`` packed under the local directory ``dest``."""
    root = Path(dest)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root
