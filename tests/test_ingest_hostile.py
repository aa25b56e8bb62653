"""Ingest of hostile input: every input ends as a record, a duplicate or a quarantine row; nothing
outside the source root is opened; an existing set survives any failure; every bad CSV or option
is one `error: <what> — <fix>` line and exit 2. Tiny 16 px images, no Ray."""

from __future__ import annotations

import builtins
import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pathloop.cli import app
from pathloop.data import ShardWriter, load_arrays, read_manifest
from pathloop.ingest import EXIT_NOTHING_INGESTED, EXIT_QUARANTINED, ingest

SIZE = 16


def _png(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """Write a random RGB PNG; return its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _fs(path: Path, raw: bytes) -> Path:
    """``path`` / a name given as raw bytes (e.g. not UTF-8)."""
    return Path(os.fsdecode(os.fsencode(path) + b"/" + raw))


def _invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def _quarantine(out: Path) -> dict[str, str]:
    with (out / "quarantine.csv").open(encoding="utf-8", newline="") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _contains(images: np.ndarray, pixels: np.ndarray) -> bool:
    return any(np.array_equal(im, pixels) for im in images)


# ----------------------------------------------------------------------------- every input counted


@pytest.fixture()
def hostile(tmp_path: Path) -> dict:
    """A class-folder tree with one of each hostile input, and two secrets outside its root."""
    src = tmp_path / "src"
    secret, secret2 = tmp_path / "secret.png", tmp_path / "elsewhere" / "secret2.png"
    secrets = [_png(secret, seed=99), _png(secret2, seed=98)]
    a, b = src / "a", src / "b"
    _png(a / "ok1.png", 1)
    _png(a / "ok2.png", 2)
    _png(b / "ok3.png", 3)
    _png(b / "sub" / "ok4.png", 4)  # nested folders are read
    (a / "zz_dup.png").write_bytes((a / "ok1.png").read_bytes())
    (b / "inlink.png").symlink_to("../a/ok2.png")  # a link inside the root is read
    _png(a / "tiny.png", 5, (1, 1))
    frames = [Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:])
    _png(a / "strip.png", 6, (8, 200))
    (a / "x.png").mkdir()
    (a / "link_out.png").symlink_to(secret)
    (a / "dangling.png").symlink_to("nope.png")
    (a / "loop1.png").symlink_to("loop2.png")
    (a / "loop2.png").symlink_to("loop1.png")
    os.mkfifo(a / "fifo.png")  # opening it for reading would block forever
    try:
        _fs(a, b"bad\xffname.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    except OSError:  # macOS (APFS) refuses names that are not UTF-8
        pytest.skip(
            "this filesystem refuses file names that are not UTF-8; runs on Linux filesystems (CI)"
        )
    (a / "[red]bad.png").write_text("rich markup in a name, and not an image\n")
    (a / ".DS_Store").write_bytes(b"\0\0")
    _png(_fs(src, b"\xffclass") / "good.png", 7)
    (src / "empty").mkdir()
    (src / "outlink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _png(src / "loose.png", 8)
    (src / "README.md").write_text("not an input\n")
    expected = {
        "a/anim.gif": "multi-frame image (3 frames)",
        "a/[red]bad.png": "not an image",
        "a/bad\\xffname.png": "truncated or corrupt",
        "a/dangling.png": "dangling symlink",
        "a/fifo.png": "not a regular file",
        "a/link_out.png": "a symlink out of the source root",
        "a/loop1.png": "symlink loop",
        "a/loop2.png": "symlink loop",
        "a/strip.png": "aspect ratio over 16:1",
        "a/tiny.png": "too small (1x1 px",
        "a/x.png/": "a folder, not an image file",
        "\\xffclass/good.png": "class folder name is not UTF-8",
        "empty/": "empty folder",
        "loose.png": "not in a class folder",
        "outlink": "a symlink out of the source root",
    }
    return {"src": src, "expected": expected, "secrets": secrets}


def test_every_input_is_a_record_a_duplicate_or_a_quarantine_row(hostile, tmp_path):
    out = tmp_path / "out"
    report = ingest(hostile["src"], out, size=SIZE, progress=False)
    reasons = _quarantine(out)
    assert set(reasons) == set(hostile["expected"]), sorted(reasons)
    for path, needle in hostile["expected"].items():
        assert needle in reasons[path], (path, reasons[path])
    # 21 inputs: 15 quarantined, 4 written, 2 the same pixels as one written.
    assert report.num_ingested == 4 and read_manifest(out)["num_records"] == 4
    assert report.duplicates == [("a/zz_dup.png", "a/ok1.png"), ("b/inlink.png", "a/ok2.png")]
    assert report.counts == {"a": {"train": 2}, "b": {"train": 2}}
    assert any("hidden" in n for n in report.notes) and any("README.md" in n for n in report.notes)
    images, _ = load_arrays(out)
    assert not any(_contains(images, pixels) for pixels in hostile["secrets"])


def test_hostile_folder_through_the_cli(hostile, tmp_path):
    out = tmp_path / "out"
    res = _invoke("ingest", hostile["src"], "--out", out, "--size", SIZE)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "a/bad\\xffname.png" in res.output and "a/[red]bad.png" in res.output
    res = _invoke("ingest", hostile["src"], "--out", out, "--size", SIZE, "--strict")
    assert res.exit_code == EXIT_QUARANTINED == 3, res.output
    assert read_manifest(out)["num_records"] == 4  # --strict still writes the set


# ----------------------------------------------------------------------------- the source root


@pytest.fixture()
def open_spy(monkeypatch) -> list[Path]:
    """Every path opened through os.open, io.open or builtins.open, resolved."""
    opened: list[Path] = []

    def spy(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike):
                opened.append(Path(os.fsdecode(file)).resolve())
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "open", spy(os.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    return opened


def test_nothing_outside_the_root_is_opened(tmp_path, open_spy):
    root = tmp_path / "src"
    secret = _png(tmp_path / "secret.png", seed=99)
    _png(root / "imgs" / "ok.png", 1)
    (root / "imgs" / "link.png").symlink_to(tmp_path / "secret.png")
    rows = ["../secret.png", str(tmp_path / "secret.png"), "imgs/../../secret.png", "imgs/link.png"]
    table = root / "cells.csv"
    table.write_text("path,class\nimgs/ok.png,a\n" + "".join(f"{r},a\n" for r in rows))
    out = tmp_path / "out"
    open_spy.clear()  # what the set-up wrote
    report = ingest(table, out, size=SIZE, progress=False)
    assert report.num_ingested == 1
    assert [p for p, _ in report.quarantined] == rows
    assert all(
        "outside the source root" in r or "symlink out of" in r for _, r in report.quarantined
    )
    assert (tmp_path / "secret.png").resolve() not in open_spy
    assert not _contains(load_arrays(out)[0], secret)

    # Control: the same CSV with the root check off does open and ingest the secret.
    ingest(table, tmp_path / "out2", size=SIZE, progress=False, allow_outside_root=True)
    assert (tmp_path / "secret.png").resolve() in open_spy
    assert _contains(load_arrays(tmp_path / "out2")[0], secret)


# ----------------------------------------------------------------------------- an existing set


def test_an_existing_set_survives_a_failure(tmp_path, monkeypatch):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    _png(first / "a" / "ok.png", 1)
    for i in range(3):
        _png(second / "b" / f"ok{i}.png", 10 + i)
    (second / "b" / "broken.png").write_text("not an image\n")
    ingest(first, out, size=SIZE, progress=False)
    before = _snapshot(out)
    real_add, calls = ShardWriter.add, []

    def fail_on_second_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_add(self, *args, **kwargs)

    def fail_at_close(self):
        raise RuntimeError("disk full")

    # Mid-run (the second image), and at close (after the new shards were written).
    for name, fake in (("add", fail_on_second_add), ("_write_quarantine", fail_at_close)):
        with monkeypatch.context() as m:
            m.setattr(ShardWriter, name, fake)
            with pytest.raises(RuntimeError, match="disk full"):
                ingest(second, out, size=SIZE, progress=False)
        assert _snapshot(out) == before, name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out", "second"], name

    # A run that ingests nothing keeps it too, and says so with exit 4 (a crash's is 1).
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "broken.png").write_text("not an image\n")
    res = _invoke("ingest", tmp_path / "bad", "--out", out, "--size", SIZE)
    assert res.exit_code == EXIT_NOTHING_INGESTED == 4, res.output
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- bad CSV and options


def _error_line(res) -> str:
    """Exit 2, no traceback, exactly one `error: <what> — <fix>` line."""
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert " — " in errors[0], errors[0]
    return errors[0]


BAD_CSVS = {
    "short row": (b"path,class\nimgs/a.png\n", ":2: 1 fields, the header has 2"),
    "long row": (b"path,class\nimgs/a.png,a,b\n", ":2: 3 fields, the header has 2"),
    "open quote": (b'path,class\n"imgs/a.png,a\n', ":2: 1 fields"),
    "missing column": (
        b"file,label\nimgs/a.png,a\n",
        "lacks columns path, class (header",
    ),
    "repeated column": (b"path,class,class\nimgs/a.png,a,b\n", "repeats columns class"),
    "empty class": (b"path,class\nimgs/a.png, \n", ":2: empty class for 'imgs/a.png'"),
    "empty path": (b"path,class\n,a\n", ":2: empty path"),
    "bad split": (b"path,class,split\nimgs/a.png,a,training\n", "split 'training' is not one"),
    "no rows": (b"path,class\n\n,\n", "lists no images"),
    "empty file": (b"", "is empty"),
    "NUL bytes": (b"path,class\nimgs/a.png\0,a\n", "NUL bytes"),
    "huge field": (b"path,class\n" + b"x" * 200_000 + b",a\n", "field larger than field limit"),
}


@pytest.mark.parametrize("content, needle", BAD_CSVS.values(), ids=BAD_CSVS.keys())
def test_bad_csv_is_one_error_line_and_exit_2(content, needle, tmp_path):
    _png(tmp_path / "src" / "imgs" / "a.png", 1)
    table = tmp_path / "src" / "cells.csv"
    table.write_bytes(content)
    res = _invoke("ingest", table, "--out", tmp_path / "out")
    assert needle in _error_line(res)
    assert not (tmp_path / "out").exists()


BAD_OPTIONS = {
    "size 0": (["--size", "0"], "--size 0 is out of range"),
    "size 100000": (["--size", "100000"], "--size 100000 is out of range"),
    "labels missing": (["--labels", "{tmp}/nope.csv"], "labels file {tmp}/nope.csv does not exist"),
    "labels bad split": (["--labels", "{tmp}/labels.csv"], "labels.csv:2: split 'x' is not one"),
    "labels short row": (["--labels", "{tmp}/short.csv"], "short.csv:2: 1 fields"),
    "empty folder": (["--src", "{tmp}/void"], "has no class sub-folders"),
    "not a CSV": (["--src", "{tmp}/notes.txt"], "is not a folder or a .csv file"),
    "out is a file": (["--out", "{tmp}/notes.txt"], "is a file"),
    "out holds the source": (["--out", "{tmp}"], "holds the source"),
    "out not a shard set": (["--out", "{tmp}/other"], "not part of a shard set (keep.txt)"),
    "out inside the source": (["--out", "{tmp}/src/shards"], "inside the source folder"),
}


@pytest.mark.parametrize("extra, needle", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_is_one_error_line_and_exit_2(extra, needle, tmp_path):
    _png(tmp_path / "src" / "a" / "ok.png", 1)
    (tmp_path / "labels.csv").write_text("id,split\nok,x\n")
    (tmp_path / "short.csv").write_text("id,split\nok\n")
    (tmp_path / "void").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("precious\n")
    args = {"--src": "{tmp}/src", "--out": "{tmp}/out"}
    rest = []
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        if key in args:
            args[key] = value
        else:
            rest += [key, value]
    fill = {"tmp": tmp_path}
    cmd = ["ingest", args["--src"], "--out", args["--out"], *rest]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = _invoke(*(c.format(**fill) for c in cmd))
    assert needle.format(**fill) in _error_line(res)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------- spreadsheets


SPREADSHEET_CSVS = {  # content, the class it names, the note it earns
    "UTF-8 with BOM": (b"\xef\xbb\xbfPath, Class \r\nimgs/a.png,M5\r\n", "M5", None),
    "Latin-1": ("path,class\nimgs/a.png,\u00e9o\n".encode("latin-1"), "\u00e9o", "Latin-1"),
    "semicolons": (b"path;class\nimgs/a.png;M5\n", "M5", None),
    "UTF-16": ("path,class\nimgs/a.png,\u00e9o\n".encode("utf-16"), "\u00e9o", None),
}


@pytest.mark.parametrize("content, name, note", SPREADSHEET_CSVS.values(), ids=SPREADSHEET_CSVS)
def test_what_spreadsheets_write_is_read(content, name, note, tmp_path):
    _png(tmp_path / "imgs" / "a.png", 1)
    (tmp_path / "cells.csv").write_bytes(content)
    res = _invoke("ingest", tmp_path / "cells.csv", "--out", tmp_path / "out", "--size", SIZE)
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == (note is not None) and all(note in n for n in notes), res.output
    assert read_manifest(tmp_path / "out")["counts"] == {name: {"train": 1}}
