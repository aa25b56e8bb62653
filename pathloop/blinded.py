"""The blinded real-vs-synthetic test: can experts tell the model's cells from real ones?

``write_blinded_set`` mixes real test images with synthetic ones into a new shard set: per class
the same number of each (so guessing scores 0.5), every image re-encoded the same way at the
synthetic images' size, in a seeded random order, without provenance. Image ids are content
hashes, so neither an id, the PNG bytes nor the position tells the source. The truth stays in
the set's ``source`` column and the round's ``images.truth``; the review API never sends either,
and shows no real examples beside a blinded round's images.

``create_blinded_round`` opens a round of mode ``blinded`` on it. Raters answer real or synthetic
(or unsure, or skip), and ``pathloop.review_stats.blinded_stats`` scores them.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pathloop.vocab import Vocabulary

log = logging.getLogger(__name__)


def class_map(src: Vocabulary, dst: Vocabulary) -> dict[int, int]:
    """{class id in ``src``: class id in ``dst``} for classes matched by name or code
    (case-insensitive); unmatched classes are left out."""
    ours = {key.lower(): c.id for c in dst.classes for key in (c.name, c.code)}
    out = {}
    for c in src.classes:
        hit = ours.get(c.name.lower(), ours.get(c.code.lower()))
        if hit is not None:
            out[c.id] = hit
    return out


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W, 3) at ``size`` (H, W); Lanczos, the usual choice for downscaling."""
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image

    im = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def _pools(
    synthetic: str | Path, real: str | Path, real_split: str | None
) -> tuple[Vocabulary, dict[int, list], dict[int, list], tuple[int, int]]:
    """The synthetic set's vocabulary, images by class of both sets, and the synthetic size."""
    from pathloop.data import iter_records, read_manifest, read_vocab

    vocab = read_vocab(synthetic)
    size = read_manifest(synthetic).get("image_size")
    if not size:
        raise ValueError(f"{synthetic}: images differ in size; a blinded set needs one size")
    to_ours = class_map(read_vocab(real), vocab)
    syn: dict[int, list] = defaultdict(list)
    for r in iter_records(synthetic, columns=["image", "class_id"]):
        syn[int(r["class_id"])].append(r["image"])
    reals: dict[int, list] = defaultdict(list)
    for r in iter_records(real, split=real_split, columns=["image", "class_id", "source"]):
        if r["source"] == "synthetic":
            raise ValueError(
                f"{real} holds synthetic images; --blinded-real takes real (or phantom) test cells"
            )
        if int(r["class_id"]) in to_ours:
            reals[to_ours[int(r["class_id"])]].append(r["image"])
    return vocab, syn, reals, (int(size[0]), int(size[1]))


def write_blinded_set(
    synthetic: str | Path,
    real: str | Path,
    out: str | Path,
    per_class: int | None = None,
    real_split: str | None = "test",
    seed: int = 0,
) -> dict[str, Any]:
    """Write the mixed shard set to ``out`` (new or empty); see the module docstring.

    Per class, ``k = min(synthetic, real, per_class)`` images of each source, drawn at random
    with ``seed``; classes without both are left out. Real images of another size are resized
    to the synthetic size. Returns the round's ``items`` (image_id, class_id, class_name, truth)
    in review order, and counts.
    """
    from pathloop.data import ShardWriter

    out = Path(out)
    if out.resolve() in (Path(synthetic).resolve(), Path(real).resolve()):
        raise ValueError(f"the blinded set needs its own folder, not {out}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new folder for the set")
    vocab, syn, reals, size = _pools(synthetic, real, real_split)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[np.ndarray, int, str]] = []  # (image, class id, truth)
    dropped = [vocab.lookup(c).name for c in sorted(syn) if not reals.get(c)]
    for cid in sorted(c for c in syn if reals.get(c)):
        k = min(len(syn[cid]), len(reals[cid]), per_class or math.inf)
        for truth, pool in (("synthetic", syn[cid]), ("real", reals[cid])):
            chosen += [(pool[j], cid, truth) for j in rng.choice(len(pool), int(k), replace=False)]
    if not chosen:
        raise ValueError(
            f"no class has both synthetic images in {synthetic} and real ones in {real} "
            f"(split {real_split}); classes are matched by name or code"
        )
    items, resized = [], 0
    note = f"blinded real-vs-synthetic set: {synthetic} + {real} (split {real_split}), seed {seed}"
    with ShardWriter(out, vocab, source_note=note) as writer:
        for j in rng.permutation(len(chosen)):
            image, cid, truth = chosen[j]
            resized += int(image.shape[:2] != size)
            rid = writer.add(_resized(image, size), cid, split="none", source=truth)
            if rid is not None:  # the same pixels twice (e.g. a memorised cell) are kept once
                name = vocab.lookup(cid).name
                items.append({"image_id": rid, "class_id": cid, "class_name": name, "truth": truth})
    if resized:
        log.warning("blinded set: %d real images resized to %dx%d", resized, *size)
    return {
        "items": items,
        "n_real": sum(it["truth"] == "real" for it in items),
        "n_synthetic": sum(it["truth"] == "synthetic" for it in items),
        "n_resized": resized,
        "classes_left_out": dropped,
    }


def create_blinded_round(
    store: Any,
    synthetic: str | Path,
    real: str | Path,
    out: str | Path,
    name: str | None = None,
    per_class: int | None = None,
    real_split: str | None = "test",
    seed: int = 0,
) -> tuple[int, dict[str, Any]]:
    """Write the blinded set to ``out`` and open a ``blinded`` round on it; returns (round id,
    what ``write_blinded_set`` returned)."""
    made = write_blinded_set(synthetic, real, out, per_class, real_split, seed)
    rid = store.create_round(
        out, name=name or f"blinded {Path(synthetic).name}", mode="blinded", items=made["items"]
    )
    return rid, made
