"""Pairwise rounds: two images of one class side by side; the rater picks the more plausible.

A pairwise round's items are pairs ``<id a>|<id b>`` of images of one class from one shard set,
drawn at random per class (each image in at most one pair, left and right at random). A rater
answers ``a`` (the left is more plausible), ``b`` (the right), ``both`` (equally plausible),
``neither`` (neither is plausible), ``unsure`` or ``skip``.

``preference_rows`` turns the answers into signed preference pairs by MAGIC's rule (Wang et al.
2025: the better image wins and the other loses, two good ones both win, two bad ones both lose),
and ``write_preference_pairs`` writes them as the table that finetuning reads (method=dpo,
``pairs=``): id_a, id_b, sign_a, sign_b (+1 win, -1 lose) over the round's shard set.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pathloop.feedback_db import FeedbackError

PAIR_SEP = "|"  # a pair item's id: "<id a>|<id b>" (shard ids are hex)
SIGNS = {"a": (1, -1), "b": (-1, 1), "both": (1, 1), "neither": (-1, -1)}  # answer -> signs
PAIR_COLUMNS = ("id_a", "id_b", "sign_a", "sign_b")  # what finetune's pairs= table needs


def pair_id(a: str, b: str) -> str:
    return f"{a}{PAIR_SEP}{b}"


def pair_ids(item_id: str) -> tuple[str, str]:
    """(left id, right id) of a pair item."""
    a, sep, b = item_id.partition(PAIR_SEP)
    if not (sep and a and b):
        raise FeedbackError(f"{item_id!r} is not a pair item (<id a>{PAIR_SEP}<id b>)")
    return a, b


# ----------------------------------------------------------------------------- the round


def pair_items(samples_dir: str | Path, seed: int = 0, per_class: int | None = None) -> list[dict]:
    """Pairs of images of one class in a shard set, as round items (image_id, class_id,
    class_name), in a seeded random order; at most ``per_class`` pairs per class."""
    from pathloop.data import iter_records

    by_class: dict[int, list[dict]] = defaultdict(list)
    for r in iter_records(samples_dir, columns=["id", "class_id", "class_name"]):
        by_class[int(r["class_id"])].append(r)
    rng = np.random.default_rng(seed)
    items = []
    for cid in sorted(by_class):
        rows = [by_class[cid][i] for i in rng.permutation(len(by_class[cid]))]
        pairs = list(zip(rows[0::2], rows[1::2], strict=False))[: per_class or None]
        for left, right in pairs:  # already in random order: left and right are random
            name = left["class_name"]
            items.append(
                {"image_id": pair_id(left["id"], right["id"]), "class_id": cid, "class_name": name}
            )
    if not items:
        raise ValueError(f"{samples_dir}: no class has two images to pair")
    return [items[i] for i in rng.permutation(len(items))]


def create_pairwise_round(
    store: Any,
    samples_dir: str | Path,
    name: str | None = None,
    seed: int = 0,
    per_class: int | None = None,
) -> int:
    """Open a ``pairwise`` round on a shard set; returns its id."""
    items = pair_items(samples_dir, seed, per_class)
    name = name or f"pairwise {Path(samples_dir).name}"
    return store.create_round(samples_dir, name=name, mode="pairwise", items=items)


# ----------------------------------------------------------------------------- preference pairs


def preference_rows(store: Any, round_id: int) -> list[dict]:
    """One signed pair per pair item the raters decided (a, b, both or neither), in review order.

    With several raters the most common decision wins and a tie leaves the pair out, as an
    image's majority label does in ``export_round``; unsure and skip are no decision.
    """
    if store.round_info(round_id).mode != "pairwise":
        raise FeedbackError(f"round {round_id} is not pairwise: it has no preference pairs")
    votes: dict[str, Counter] = defaultdict(Counter)
    for lab in store.labels(round_id):
        if lab.answer in SIGNS:
            votes[lab.image_id][lab.answer] += 1
    rows = []
    for im in store.images(round_id):
        top = votes[im.image_id].most_common(2)
        if not top or (len(top) == 2 and top[0][1] == top[1][1]):
            continue
        answer = top[0][0]
        a, b = pair_ids(im.image_id)
        sign_a, sign_b = SIGNS[answer]
        rows.append(
            {
                "id_a": a,
                "id_b": b,
                "sign_a": sign_a,
                "sign_b": sign_b,
                "answer": answer,
                "class_id": im.class_id,
                "n_votes": sum(votes[im.image_id].values()),
            }
        )
    return rows


def write_preference_pairs(store: Any, round_id: int, out: str | Path) -> Path:
    """Write ``preference_rows`` to a Parquet file for finetuning (method=dpo, pairs=<out>,
    synthetic=<the round's shard set>); returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = preference_rows(store, round_id)
    if not rows:
        raise ValueError(f"round {round_id}: no pair has a decision yet; nothing to write")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    meta = {
        "pathloop.round_id": str(round_id),
        "pathloop.synthetic": store.round_info(round_id).samples_dir,
    }
    pq.write_table(table.replace_schema_metadata(meta), out)
    return out
