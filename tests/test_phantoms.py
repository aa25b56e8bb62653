"""Phantom renderer: class specs, shapes, determinism, label noise."""

from __future__ import annotations

import numpy as np
import pytest

from pathloop import judge as J
from pathloop import phantoms as P
from pathloop.vocab import BONE_MARROW_16, CRITERIA

K = len(BONE_MARROW_16)
M5 = BONE_MARROW_16.lookup("M5").id


def _batch(per_class: int, size: int, seed: int, classes: list[int] | None = None) -> tuple:
    images, ids, subtypes = zip(*P.generate(per_class, size, seed, classes), strict=True)
    return np.stack(images), np.array(ids), list(subtypes)


@pytest.fixture(scope="module")
def fresh32() -> tuple:
    return _batch(40, 32, seed=12345)


@pytest.fixture(scope="module")
def fresh64() -> tuple:
    return _batch(12, 64, seed=4321)


# --- renderer --------------------------------------------------------------------------------


def test_specs_cover_the_vocabulary() -> None:
    assert set(P.SPECS) == {c.code for c in BONE_MARROW_16.classes}
    assert set(J.ACCEPT) == set(P.SPECS)
    for accept in J.ACCEPT.values():
        assert "cell_diam" in accept  # every class checks size, so blanks always fail
        assert set(accept) <= set(J.MEASURE_CRITERION)
    assert set(J.MEASURE_CRITERION.values()) == set(CRITERIA)


@pytest.mark.parametrize("size", [32, 64])
def test_generate_shapes_and_subtypes(size: int) -> None:
    items = list(P.generate(2, size, seed=3))
    assert [c for _, c, _ in items] == [c for c in range(K) for _ in range(2)]
    for image, cid, subtype in items:
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert (subtype in ("band", "segmented")) if cid == M5 else subtype is None


def test_generate_is_deterministic_and_prefix_stable() -> None:
    a, ids_a, sub_a = _batch(3, 32, seed=7, classes=[0, M5])
    b, ids_b, sub_b = _batch(3, 32, seed=7, classes=[0, M5])
    assert np.array_equal(a, b) and np.array_equal(ids_a, ids_b) and sub_a == sub_b
    # Image i of class c depends only on (seed, c, i): a subset or a longer run repeats it.
    only_m5, _, _ = _batch(2, 32, seed=7, classes=[M5])
    assert np.array_equal(only_m5, a[3:5])
    other, _, _ = _batch(3, 32, seed=8, classes=[0, M5])
    assert not np.array_equal(a, other)


def test_render_cell_looks_like_a_smear() -> None:
    image, _ = P.render_cell(0, np.random.default_rng(0), size=32)
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]].astype(float)
    centre = image[14:18, 14:18].astype(float).mean(axis=(0, 1))
    assert corners.mean() > 180  # pale background (or a pink red cell) at the corners
    assert centre.mean() < corners.mean() - 60  # a stained cell in the middle


# --- judge: targets --------------------------------------------------------------------------


# --- judge: API ------------------------------------------------------------------------------


def test_shuffle_classes_always_changes_the_class() -> None:
    ids = np.repeat(np.arange(K), 200)
    wrong = P.shuffle_classes(ids, seed=0, num_classes=K)
    assert wrong.shape == ids.shape and np.all(wrong != ids)
    assert np.all((wrong >= 0) & (wrong < K))
    counts = np.bincount(wrong[ids == 0], minlength=K)[1:]  # class 0 maps uniformly to 1..15
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()
    assert np.array_equal(wrong, P.shuffle_classes(ids, seed=0, num_classes=K))


def test_label_noise_redraws_only_training_labels(tmp_path) -> None:
    from pathloop.data import load_image_table

    def table(name: str, noise: float) -> tuple:
        P.write_phantoms(tmp_path / name, per_class=12, test_per_class=3, seed=5, label_noise=noise)
        images, ids, cols = load_image_table(tmp_path / name)
        order = np.argsort(cols["id"])  # rows by image id: the same pixels line up
        return images[order], ids[order], cols["split"][order]

    clean_img, clean_ids, split = table("clean", 0.0)
    noisy_img, noisy_ids, noisy_split = table("noisy", 0.4)
    assert np.array_equal(clean_img, noisy_img) and np.array_equal(split, noisy_split)
    changed = clean_ids != noisy_ids
    assert not changed[split == "test"].any()  # test labels stay clean
    assert 0.25 < changed[split == "train"].mean() < 0.55  # 0.4 of 192 training labels
    with pytest.raises(ValueError, match="label_noise is a fraction"):
        P.write_phantoms(tmp_path / "bad", per_class=1, label_noise=1.0)
