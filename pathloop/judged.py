"""The expert's verdicts on image sets in ``pathloop experiment``, and the sets built from them:
the oracle's rewards on a pool, the real train images the expert accepts (the expert-data arm),
and a review set of real train images (``round.review_from=real``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pathloop.pipeline import judge_options

console = Console()


def judge_set(shards: Path, expert: str | None, split: str | None = None) -> dict[str, Any]:
    """The expert's verdicts on a shard set, rows in sampling-seed order (file order for real
    images): {id, seed, class_id (N,), plausible (N,) 1/0/NaN, fails (N, 7) 1/0/NaN, images}."""
    from pathloop.data import iter_records, read_vocab
    from pathloop.experts import get_evaluator
    from pathloop.vocab import CRITERIA

    cols = ["id", "image", "class_id", "provenance"]
    rows = list(iter_records(shards, split=split, columns=cols))
    if not rows:
        raise ValueError(f"{shards} holds no images to judge")
    seeds = np.array([sampling_seed(r["provenance"]) for r in rows], dtype=np.int64)  # (N,)
    order = np.argsort(seeds, kind="stable")  # the same image index in every arm
    rows = [rows[i] for i in order]
    images = np.stack([r["image"] for r in rows])  # (N, H, W, 3)
    ids = np.array([r["class_id"] for r in rows], dtype=np.int64)  # (N,)
    judge = get_evaluator("judge", **judge_options(expert))
    verdicts = judge(list(images), ids.tolist(), read_vocab(shards))
    plausible = np.array([np.nan if v.plausible is None else float(v.plausible) for v in verdicts])
    fails = np.array(  # (N, 7): 1 - the criterion's pass score
        [[np.nan if v.plausible is None else 1 - v.scores[c] for c in CRITERIA] for v in verdicts]
    ).reshape(len(rows), len(CRITERIA))
    return {
        "id": np.array([r["id"] for r in rows]),
        "seed": seeds[order],
        "class_id": ids,
        "plausible": plausible,
        "fails": fails,
        "images": images,
    }


def sampling_seed(provenance: dict | None) -> int:
    """The sampling seed of a synthetic row; -1 for a real image (no provenance)."""
    seed = (provenance or {}).get("seed")
    return -1 if seed is None else int(seed)


def write_oracle_rewards(
    pool: Path, out: Path, expert: str | None, checklist: bool = False, split: str | None = None
) -> dict[str, float]:
    """The oracle arm's rewards: the expert's verdict on each pool image (1 plausible, 0 not or
    unscored) as a table of id, reward for ``finetune.rewards``; with ``checklist`` the fraction
    of the criteria it passes instead (the scores MAGIC's pair rule reads). With ``split`` the
    images of that split of a shard set (the real train images, for ``finetune.real_rewards``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = judge_set(pool, expert, split=split)
    score = 1.0 - np.nanmean(j["fails"], axis=1) if checklist else j["plausible"]  # (N,)
    reward = np.nan_to_num(score, nan=0.0)  # (N,) an unscored image earns nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": j["id"], "class_id": j["class_id"], "reward": reward}), out)
    return {"n": len(reward), "rate": float(reward.mean())}


def write_expert_data(shards: Path, out: Path, expert: str | None) -> dict[str, int]:
    """``shards`` with only the train images the expert passes (the other splits as they are)
    written to ``out``: the data as an expert who curated them would leave them."""
    from pathloop.data import ShardWriter, iter_records, read_vocab

    judged = judge_set(shards, expert, split="train")
    keep = set(judged["id"][judged["plausible"] == 1].tolist())
    note = f"{shards}: the train images the expert accepts"
    cols = ["id", "image", "class_id", "split", "source", "subtype"]
    with ShardWriter(out, read_vocab(shards), source_note=note) as w:
        for r in iter_records(shards, columns=cols):
            if r["split"] != "train" or r["id"] in keep:
                w.add(r["image"], r["class_id"], r["split"], r["source"], r["subtype"])
    console.print(f"expert data: {len(keep)} of {len(judged['id'])} real train images kept")
    return {"kept": len(keep), "judged": len(judged["id"])}


def write_real_review(shards: Path, out: Path, per_class: int, seed: int) -> dict[str, int]:
    """A review set of ``per_class`` real train images per class (drawn with ``seed``; fewer
    where a class has fewer) written to ``out`` as a shard set for the expert to label."""
    from pathloop.data import ShardWriter, iter_records, read_vocab

    cols = ["id", "image", "class_id", "split", "source", "subtype"]
    rows = list(iter_records(shards, split="train", columns=cols))
    cls = np.array([r["class_id"] for r in rows])  # (N,)
    rng = np.random.default_rng(seed)
    pick = [
        i
        for c in np.unique(cls)
        for i in rng.permutation(np.flatnonzero(cls == c))[:per_class].tolist()
    ]
    with ShardWriter(out, read_vocab(shards), source_note=f"{shards}: real train images") as w:
        for i in sorted(pick):
            r = rows[i]
            w.add(r["image"], r["class_id"], r["split"], r["source"], r["subtype"])
    return {"images": len(pick)}
