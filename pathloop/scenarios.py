"""Phantom shard sets and their scenarios: where the expert knows what the data do not.

``write_phantoms`` renders a shard set (``phantoms.py`` draws the cells). A scenario changes what
the training data teach against what the expert accepts: ``artifacts`` (a fraction of training
cells carry a slide artifact the expert rejects), ``strict-expert`` (the data as usual, a stricter
expert profile of the judge) and ``label-noise`` (a fraction of training labels name another
class). The test split is always clean, and the manifest records the scenario (docs/scenarios.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pathloop.data import ShardWriter
from pathloop.phantoms import (
    ARTIFACTS,
    STRICT_SPECS,
    artifact_kinds,
    class_code,
    generate,
    shuffle_classes,
)
from pathloop.vocab import BONE_MARROW_16

SCENARIOS: tuple[str, ...] = ("artifacts", "strict-expert", "label-noise")


# Spawn keys of the scenario streams: disjoint from the (class id, index) keys of the cells.
_LABEL_NOISE_KEY = 1_000_003


_ARTIFACT_KEY = 2_000_003


def check_scenario(scenario: str | None, fraction: float) -> None:
    """A one-line ValueError unless ``scenario`` is None or one of ``SCENARIOS`` and
    ``fraction`` lies in [0, 1)."""
    if scenario is not None and scenario not in SCENARIOS:
        raise ValueError(
            f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)} (or none)"
        )
    if not 0 <= fraction < 1:
        raise ValueError(f"the scenario fraction is a fraction in [0, 1), got {fraction}")


def artifact_plan(
    per_class: int, seed: int, fraction: float, classes: list[int] | None = None
) -> dict[tuple[int, int], str]:
    """Which cells carry which artifact: (class id, index) -> ``ARTIFACTS`` name.

    ``fraction * per_class`` cells (rounded) of each class, each with a kind drawn uniformly from
    ``artifact_kinds`` of its class; the choice depends only on (seed, class).
    """
    ids = list(range(len(BONE_MARROW_16))) if classes is None else [int(c) for c in classes]
    plan: dict[tuple[int, int], str] = {}
    for cid in ids:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ARTIFACT_KEY, cid)))
        kinds = artifact_kinds(class_code(cid))
        chosen = rng.choice(per_class, size=int(fraction * per_class + 0.5), replace=False)
        for i in sorted(int(i) for i in chosen):
            plan[(cid, i)] = kinds[int(rng.integers(len(kinds)))]
    return plan


def _resolve_scenario(
    scenario: str | None, fraction: float, label_noise: float
) -> tuple[str | None, float]:
    """(scenario, fraction), with the older ``label_noise`` argument as the label-noise one."""
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise is a fraction in [0, 1), got {label_noise}")
    if label_noise:
        if scenario not in (None, "label-noise"):
            raise ValueError(
                f"label_noise is the label-noise scenario; it does not combine with {scenario!r}"
            )
        scenario, fraction = "label-noise", label_noise
    check_scenario(scenario, fraction)
    return scenario, fraction


def _rows(
    per_class: int, test_per_class: int, size: int, seed: int, plan: dict[tuple[int, int], str]
) -> Iterator[tuple[str, np.ndarray, int, str | None, str | None]]:
    """(split, image, class id, subtype, artifact) of the training, then the test cells.

    Test cells come from a disjoint seed and never carry artifacts.
    """
    for k, (img, cid, sub) in enumerate(generate(per_class, size, seed, artifacts=plan)):
        yield "train", img, cid, sub, plan.get((cid, k % per_class))
    for img, cid, sub in generate(test_per_class, size, seed + 7919):
        yield "test", img, cid, sub, None


def _scenario_record(
    scenario: str | None, fraction: float, seed: int, ids: dict[str, list[str]]
) -> dict | None:
    """The manifest's ``scenario`` entry: what was done to which rows (ids per kind)."""
    if scenario is None:
        return None
    if scenario == "strict-expert":
        return {"name": scenario, "expert": "strict", "classes": list(STRICT_SPECS)}
    kinds = list(ARTIFACTS) if scenario == "artifacts" else ["relabelled"]
    record = {"name": scenario, "fraction": fraction, "seed": seed}
    record["counts"] = {k: len(ids.get(k, [])) for k in kinds}
    if scenario == "artifacts":
        record["criteria"] = {k: a.criterion for k, a in ARTIFACTS.items()}
    record["ids"] = {k: ids.get(k, []) for k in kinds}
    return record


class _ScenarioWriter(ShardWriter):
    """A ShardWriter whose manifest also records the scenario (set before it closes), so the
    manifest is still written once, last."""

    scenario: dict | None = None

    def _manifest(self, shards: list[dict]) -> dict:
        return {**super()._manifest(shards), "scenario": self.scenario}


def write_phantoms(
    out: str | Path,
    per_class: int,
    test_per_class: int = 0,
    size: int = 32,
    seed: int = 0,
    label_noise: float = 0.0,
    scenario: str | None = None,
    scenario_fraction: float = 0.3,
) -> dict:
    """Render phantoms into a shard set (train, then test from a disjoint seed); the manifest.

    ``scenario`` (``SCENARIOS``) makes the expert know what the training data do not; test
    cells are always clean and every label but label-noise's is correct:

    - "artifacts": ``scenario_fraction`` of the training cells carry a slide artifact
      (``ARTIFACTS``) that the judge rejects on one named criterion;
    - "strict-expert": the data are drawn as without a scenario; the manifest names the judge's
      "strict" profile, which rejects about half the cells of the ``STRICT_SPECS`` classes;
    - "label-noise" (or ``label_noise`` > 0, its older spelling): that fraction of the
      training labels is redrawn as a different class, from the images of no scenario.

    The manifest's ``scenario`` entry records it, with the ids of the rows each kind touched.
    The same seed gives the same images, artifacts and labels.
    """
    from rich.progress import track

    scenario, fraction = _resolve_scenario(scenario, scenario_fraction, label_noise)
    plan = artifact_plan(per_class, seed, fraction) if scenario == "artifacts" else {}
    noise = fraction if scenario == "label-noise" else 0.0
    note = f"phantoms seed={seed} size={size}" + (f" scenario={scenario}" if scenario else "")
    if scenario in ("artifacts", "label-noise"):
        note += f" fraction={fraction}"
    flip = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LABEL_NOISE_KEY,)))
    ids: dict[str, list[str]] = {}
    total = 16 * (per_class + test_per_class)
    with _ScenarioWriter(out, BONE_MARROW_16, source_note=note) as w:
        rows = _rows(per_class, test_per_class, size, seed, plan)
        for split, img, cid, subtype, tag in track(rows, total=total, description="phantoms"):
            if split == "train" and noise and flip.random() < noise:
                cid = int(shuffle_classes([cid], int(flip.integers(2**31)))[0])
                subtype, tag = None, "relabelled"  # the new class's sub-types do not apply
            rid = w.add(img, cid, split=split, source="phantom", subtype=subtype)
            if tag and rid:
                ids.setdefault(tag, []).append(rid)
        w.scenario = _scenario_record(scenario, fraction, seed, ids)
    return w.manifest
