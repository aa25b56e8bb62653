"""drift.py on fixed arrays: a set moved by k real spreads drifts by k, the real set by ~0; the
experiment's reading of saved evaluation images; the preview metrics' names and values."""

from __future__ import annotations

import numpy as np
import pytest

from pathloop import drift


def _real(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image colours (N, 3) of two classes with different means and per-channel spreads."""
    rng = np.random.default_rng(seed)
    a = rng.normal([0.8, 0.6, 0.7], [0.02, 0.05, 0.03], (n, 3))
    b = rng.normal([0.5, 0.5, 0.9], [0.04, 0.01, 0.02], (n, 3))
    return np.concatenate([a, b]), np.repeat(np.array(["A", "B"]), n)


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_a_set_moved_by_k_real_stds_drifts_by_k(k):
    rgb, codes = _real()
    moved = rgb.copy()
    for c in ("A", "B"):  # every channel up by k of its real std (ddof 0, as the reference's)
        moved[codes == c] += k * rgb[codes == c].std(0)
    report = drift.colour_report({"moved": (moved, codes), "real": (rgb, codes)}, (rgb, codes))
    cells = report["labels"]["moved"]["per_class"]
    assert [cells[c]["drift"] for c in ("A", "B")] == pytest.approx([k, k])
    assert all(cells[c]["brightening"] > 0 for c in ("A", "B"))  # every channel went up
    assert report["labels"]["moved"]["worst"] == pytest.approx(k)
    assert report["labels"]["real"]["worst"] == pytest.approx(0, abs=1e-12)  # itself: 0
    # darker along one direction only: k spreads of the class, whatever the direction
    spread = np.sqrt(rgb[codes == "B"].var(0).sum())
    dark = rgb.copy()
    dark[codes == "B", 2] -= k * spread
    cell = drift.colour_report({"d": (dark, codes)}, (rgb, codes))["labels"]["d"]
    assert cell["worst_class"] == "B" and cell["worst"] == pytest.approx(k)
    assert cell["per_class"]["B"]["brightening"] < 0 and cell["per_class"]["A"]["drift"] == 0


def test_a_fresh_draw_of_the_real_data_drifts_little():
    """Sampling alone: a second draw of n images per class drifts by about 1/sqrt(n)."""
    rgb, codes = _real(seed=0)
    other = _real(seed=1)
    got = drift.colour_report({"test": other}, (rgb, codes))["labels"]["test"]
    assert got["worst"] < 4 / np.sqrt(400) and got["mean"] > 0


def test_image_colours_and_the_table_cell():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    grey = np.full((4, 4, 3), 51, np.uint8)
    assert drift.image_colours([red, grey]) == pytest.approx(np.array([[1, 0, 0], [0.2] * 3]))
    rgb, codes = _real()
    report = drift.colour_report({"arm": (rgb[:400] + 0.1, codes[:400])}, (rgb, codes))
    assert list(report["labels"]["arm"]["per_class"]) == ["A"]  # a class the set lacks: left out
    cell = drift.worst_cell(report, "arm")
    assert cell.endswith("(A)") and float(cell.split()[0]) > 1
    assert drift.worst_cell(None, "arm") == drift.worst_cell(report, "other") == "–"
    section = "\n".join(drift.markdown(report))
    assert "plot_colour.png" in section and "| B |" in section


def test_eval_colour_reads_the_saved_samples(phantom_shards, tmp_path):
    """The experiment's layout: <root>/<label>/samples per arm x seed, pooled per arm; the real
    test split as its own row, the real train split as the reference."""
    for lab in ("arm-seed0", "arm-seed1", "base"):
        (tmp_path / lab).mkdir()
        (tmp_path / lab / "samples").symlink_to(phantom_shards)
    got = drift.eval_colour(tmp_path, phantom_shards, {"arm": ["arm-seed0", "arm-seed1"]})
    assert list(got["labels"]) == ["arm", "base", "real"] and len(got["reference"]) == 16
    arm = got["labels"]["arm"]["per_class"]
    assert {c["n"] for c in arm.values()} == {20}  # (8 train + 2 test) x 2 seeds
    assert {c["n"] for c in got["labels"]["base"]["per_class"].values()} == {10}
    assert {c["n"] for c in got["labels"]["real"]["per_class"].values()} == {2}
    assert {c["n"] for c in got["reference"].values()} == {8}
    assert all(0 <= c["intensity"] <= 1 for c in arm.values())
    assert set(drift.metrics(got)) == {
        f"{g}/colour_drift{s}" for g in got["labels"] for s in ("", "_mean")
    }


def test_preview_metrics_per_class():
    from pathloop.vocab import BONE_MARROW_16

    c0, c1 = BONE_MARROW_16.classes[:2]
    images = [np.full((4, 4, 3), v, np.uint8) for v in (0, 255, 255)]
    images[2][..., 1:] = 0  # class 1: one white image, one red
    m = drift.preview_metrics(images, [c0.id, c1.id, c1.id], BONE_MARROW_16)
    p = drift.PREVIEW
    assert m[f"{p}/class/{c0.code}/intensity"] == 0
    assert [m[f"{p}/class/{c1.code}/{ch}"] for ch in "rgb"] == [1.0, 0.5, 0.5]
    assert m[f"{p}/intensity"] == pytest.approx((0 + 1 + 1 / 3) / 3)
    assert len(m) == 4 * 3 and drift.preview_metrics([], [], BONE_MARROW_16) == {}
