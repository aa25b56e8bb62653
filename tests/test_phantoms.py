"""Phantom renderer: class specs, shapes, determinism, label noise."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import phantom_batch

from pathloop import judge as J
from pathloop import phantoms as P
from pathloop import scenarios as S
from pathloop.vocab import BONE_MARROW_16, CRITERIA

K = len(BONE_MARROW_16)
M5 = BONE_MARROW_16.lookup("M5").id


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
    a, ids_a, sub_a = phantom_batch(3, 32, seed=7, classes=[0, M5])
    b, ids_b, sub_b = phantom_batch(3, 32, seed=7, classes=[0, M5])
    assert np.array_equal(a, b) and np.array_equal(ids_a, ids_b) and sub_a == sub_b
    # Image i of class c depends only on (seed, c, i): a subset or a longer run repeats it.
    only_m5, _, _ = phantom_batch(2, 32, seed=7, classes=[M5])
    assert np.array_equal(only_m5, a[3:5])
    other, _, _ = phantom_batch(3, 32, seed=8, classes=[0, M5])
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
        S.write_phantoms(tmp_path / name, per_class=12, test_per_class=3, seed=5, label_noise=noise)
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
        S.write_phantoms(tmp_path / "bad", per_class=1, label_noise=1.0)


# --- scenarios -------------------------------------------------------------------------------


def _table(path) -> tuple:
    """Images, class ids, ids and splits of a shard set, in write order."""
    from pathloop.data import load_image_table

    images, class_ids, cols = load_image_table(path)
    return images, class_ids, cols["id"], cols["split"]


@pytest.fixture(scope="module")
def scenario_sets(tmp_path_factory) -> dict:
    """The same seed written clean and under each scenario: {name: (manifest, table)}."""
    root = tmp_path_factory.mktemp("scenarios")
    out = {}
    for name in (None, *S.SCENARIOS):
        m = S.write_phantoms(
            root / str(name), per_class=10, test_per_class=2, seed=4, scenario=name
        )
        out[name] = (m, _table(root / str(name)))
    return out


def test_artifact_plan_is_seeded_and_exact() -> None:
    plan = S.artifact_plan(per_class=20, seed=9, fraction=0.3)
    assert plan == S.artifact_plan(per_class=20, seed=9, fraction=0.3)
    assert plan != S.artifact_plan(per_class=20, seed=10, fraction=0.3)
    for cid in range(K):
        mine = {i: kind for (c, i), kind in plan.items() if c == cid}
        assert len(mine) == 6 and all(0 <= i < 20 for i in mine)
        assert set(mine.values()) <= set(P.artifact_kinds(P.class_code(cid)))
    assert {kind for kind in plan.values()} == set(P.ARTIFACTS)  # every kind is drawn
    assert all(len(P.artifact_kinds(code)) >= 2 for code in P.SPECS)


def test_render_cell_refuses_unknown_or_inapplicable_artifacts() -> None:
    with pytest.raises(ValueError, match="valid artifacts: vacuoles, precipitate"):
        P.render_cell(0, np.random.default_rng(0), artifact="smudge")
    er6 = BONE_MARROW_16.lookup("ER6").id
    with pytest.raises(ValueError, match="not drawn on class ER6; valid there: precipitate"):
        P.render_cell(er6, np.random.default_rng(0), artifact="vacuoles")


def test_artifacts_touch_only_the_planned_training_rows(scenario_sets) -> None:
    manifest, (images, class_ids, ids, split) = scenario_sets["artifacts"]
    _, (clean_images, clean_ids, _, clean_split) = scenario_sets[None]
    record = manifest["scenario"]
    assert record["name"] == "artifacts" and record["fraction"] == 0.3 and record["seed"] == 4
    assert record["criteria"] == {k: a.criterion for k, a in P.ARTIFACTS.items()}
    tagged = {i: kind for kind, rows in record["ids"].items() for i in rows}
    assert {k: len(v) for k, v in record["ids"].items()} == record["counts"]
    assert sum(record["counts"].values()) == 16 * 3  # round(0.3 * 10) per class
    carries = np.array([i in tagged for i in ids])
    assert not carries[split == "test"].any()  # the test split is always clean
    assert np.array_equal(class_ids, clean_ids) and np.array_equal(split, clean_split)
    same = np.array([np.array_equal(a, b) for a, b in zip(images, clean_images, strict=True)])
    assert np.array_equal(same, ~carries)  # only the artifact rows differ from the clean set


def test_scenarios_are_deterministic(scenario_sets, tmp_path) -> None:
    for name in ("artifacts", "label-noise"):
        manifest, table = scenario_sets[name]
        again = S.write_phantoms(tmp_path / name, 10, test_per_class=2, seed=4, scenario=name)
        assert again["scenario"] == manifest["scenario"]
        again_table = _table(tmp_path / name)
        assert all(np.array_equal(a, b) for a, b in zip(table, again_table, strict=True))


def test_manifest_records_each_scenario(scenario_sets) -> None:
    assert scenario_sets[None][0]["scenario"] is None
    strict, (images, _, _, _) = scenario_sets["strict-expert"]
    assert strict["scenario"] == {
        "name": "strict-expert",
        "expert": "strict",
        "classes": list(P.STRICT_SPECS),
    }
    assert np.array_equal(images, scenario_sets[None][1][0])  # the data are drawn as without
    noisy, (_, noisy_ids, ids, split) = scenario_sets["label-noise"]
    changed = set(ids[noisy_ids != scenario_sets[None][1][1]])
    assert set(noisy["scenario"]["ids"]["relabelled"]) == changed
    assert noisy["scenario"]["counts"] == {"relabelled": len(changed)} and changed
    assert not changed & set(ids[split == "test"])
    assert "scenario=label-noise fraction=0.3" in noisy["source_note"]


def test_label_noise_is_the_label_noise_scenario(tmp_path) -> None:
    old = S.write_phantoms(tmp_path / "old", per_class=4, seed=2, label_noise=0.25)
    new = S.write_phantoms(
        tmp_path / "new", per_class=4, seed=2, scenario="label-noise", scenario_fraction=0.25
    )
    assert old["scenario"] == new["scenario"] and old["scenario"]["name"] == "label-noise"
    assert old["shards"][0]["sha256"] == new["shards"][0]["sha256"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scenario": "artefacts"}, "unknown scenario 'artefacts'; valid scenarios: artifacts"),
        ({"scenario": "artifacts", "scenario_fraction": 1.0}, "fraction in \\[0, 1\\)"),
        ({"scenario": "artifacts", "label_noise": 0.2}, "does not combine with 'artifacts'"),
    ],
)
def test_bad_scenarios_are_one_line_errors(kwargs, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message) as err:
        S.write_phantoms(tmp_path / "bad", per_class=1, **kwargs)
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()


def test_the_loop_offers_the_same_scenarios() -> None:
    from typing import get_args

    from pathloop.pipeline import LoopDataConfig

    literal, _none = get_args(LoopDataConfig.model_fields["scenario"].annotation)
    assert get_args(literal) == S.SCENARIOS
    assert LoopDataConfig().scenario is None and LoopDataConfig().scenario_fraction == 0.3
