"""Review rounds beyond plausible/implausible, end to end through the store, the API and the CLI.

- unsure and skip: stored, never counted as plausible or implausible, and an older database gets
  the columns they need when opened;
- a blinded real-vs-synthetic round: created by the CLI, labelled through the HTTP API by three
  raters, scored by ``review stats`` (accuracy with its exact interval, checked against scipy;
  agreement, checked against sklearn and statsmodels);
- a pairwise round: exported to Label Studio with the ``Pairwise`` tag, annotations imported
  back, and its pairs turned into the preference pairs the dpo finetune reads.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from pathloop.data import ShardWriter, decode_png, iter_records
from pathloop.feedback import FeedbackStore
from pathloop.feedback_db import FeedbackError
from pathloop.vocab import BONE_MARROW_16

CLASSES = [14, 3, 9]  # neutrophil (has subtypes), eosinophil, erythrocyte


def shards(path: Path, per_class: int, source: str, split: str, size: int, seed: int) -> Path:
    """Phantom cells of CLASSES written as ``source`` images of ``split``."""
    from pathloop.phantoms import generate

    with ShardWriter(path, BONE_MARROW_16) as w:
        for img, c, sub in generate(per_class, size=size, seed=seed, classes=CLASSES):
            w.add(img, c, split=split, source=source, subtype=sub)
    return path


def client(db: Path, round_id: int, **kw) -> TestClient:
    from serve.api import build_local_api
    from serve.args import ServeArgs

    args = ServeArgs(feedback_url=str(db), review_round=round_id, **kw)
    return TestClient(build_local_api(args))


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ----------------------------------------------------------------------------- unsure and skip


def test_unsure_and_skip_are_no_verdicts(tmp_path: Path) -> None:
    samples = shards(tmp_path / "samples", 2, "synthetic", "none", 16, seed=1)
    store = FeedbackStore(tmp_path / "fb.db")
    rid = store.create_round(samples)
    ids = [im.image_id for im in store.images(rid)]
    a, b = store.ensure_rater("a"), store.ensure_rater("b")
    store.put_label(rid, ids[0], a, True)
    store.put_label(rid, ids[0], b, None, answer="unsure", comment="blurry")
    store.put_label(rid, ids[1], a, False, ["nc_ratio"])
    store.put_label(rid, ids[1], b, None, answer="skip")
    with pytest.raises(FeedbackError, match="not both"):
        store.put_label(rid, ids[2], a, True, answer="unsure")
    with pytest.raises(FeedbackError, match="valid: unsure, skip"):
        store.put_label(rid, ids[2], a, None, answer="real")  # a blinded round's answer

    export = store.export_round(rid, tmp_path / "export")
    import pyarrow.parquet as pq

    rows = {r["id"]: r for r in pq.read_table(export).to_pylist()}
    assert set(rows) == {ids[0], ids[1]}
    assert rows[ids[0]]["n_raters"] == 1 and rows[ids[0]]["plausible"] == 1.0  # unsure: no vote
    assert rows[ids[1]]["n_raters"] == 1 and rows[ids[1]]["plausible"] == 0.0  # skip: no vote
    stats = store.round_stats(rid)
    assert stats["raters"]["b"] == {"kind": "human", "n_labels": 2, "n_scored": 0, "n_plausible": 0}
    assert stats["answers"] == {"b": {"skip": 1, "unsure": 1}}
    images = store.images(rid)
    assert images[0].class_name == images[1].class_name == "neutrophil"
    assert stats["classes"]["neutrophil"]["plausible_rate"] == 0.5  # a's two votes only
    # Progress: unsure is done, skip is not (the image comes back), undo restores the answer.
    assert store.progress(rid, b)[0] == 1
    store.put_label(rid, ids[0], b, False, ["granules"])
    assert store.undo(rid, ids[0], b).answer == "unsure"
    assert store.history(rid, ids[0], b)[0].answer == "unsure"


def test_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    samples = shards(tmp_path / "samples", 1, "synthetic", "none", 16, seed=2)
    db = tmp_path / "old.db"
    store = FeedbackStore(db)
    rid = store.create_round(samples)
    ids = [im.image_id for im in store.images(rid)]
    rater = store.ensure_rater("old")
    store.put_label(rid, ids[0], rater, True, comment="kept")
    store.close()
    with sqlite3.connect(db) as con:  # as a pathloop without these columns made it
        for table, col in [
            ("labels", "answer"),
            ("label_history", "answer"),
            ("rounds", "mode"),
            ("rounds", "settings"),
            ("images", "truth"),
        ]:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    store = FeedbackStore(db)
    assert store.round_info(rid).mode == "plausibility"
    assert store.labels(rid)[0].comment == "kept" and store.labels(rid)[0].answer is None
    assert store.put_label(rid, ids[1], rater, None, answer="unsure").answer == "unsure"
    with sqlite3.connect(db) as con:
        cols = {r[1] for r in con.execute("PRAGMA table_info(labels)")}
    assert "answer" in cols


def test_api_answers_and_required_criteria(tmp_path: Path) -> None:
    samples = shards(tmp_path / "samples", 2, "synthetic", "none", 16, seed=3)
    store = FeedbackStore(tmp_path / "fb.db")
    rid = store.create_round(samples, settings={"require_criteria": True})
    _, token = store.add_rater("dr")
    with client(tmp_path / "fb.db", rid) as api:
        h = auth(token)
        meta = api.get("/v1/review/meta", headers=h).json()
        assert (meta["mode"], meta["require_criteria"]) == ("plausibility", True)
        first = api.get("/v1/review/next", headers=h).json()
        one = first["image_id"]

        def post(body: dict):
            return api.post("/v1/review/labels", headers=h, json={"image_id": one, **body})

        r = post({"plausible": False})
        assert r.status_code == 422 and "at least one" in r.json()["detail"]
        assert (
            post({}).status_code == 422
            and post({"plausible": True, "answer": "skip"}).status_code == 422
        )
        assert post({"answer": "real"}).status_code == 422  # not in a plausibility round
        skip = post({"answer": "skip", "comment": "later"}).json()
        assert skip["done"] == 0 and skip["next_id"] == first["next_id"]
        nxt = api.get("/v1/review/next", headers=h).json()
        assert nxt["image_id"] == first["next_id"] and nxt["skipped"] == 1
        assert {p["name"]: (p["done"], p["total"]) for p in nxt["class_progress"]} == {
            "eosinophil": (0, 2),
            "erythrocyte": (0, 2),
            "neutrophil": (0, 2),
        }
        for im in store.images(rid)[1:]:
            body = {"image_id": im.image_id, "answer": "unsure"}
            assert api.post("/v1/review/labels", headers=h, json=body).status_code == 200
        back = api.get("/v1/review/next", headers=h).json()
        assert back["image_id"] == one and back["label"]["answer"] == "skip"  # skipped: last
        assert back["label"]["comment"] == "later"
        assert post({"plausible": False, "failed_criteria": ["chromatin"]}).json()["done"] == 6
    with client(tmp_path / "fb.db", rid, review_require_criteria=False) as api:  # server setting
        h = auth(token)
        assert api.get("/v1/review/meta", headers=h).json()["require_criteria"] is False
        r = api.post("/v1/review/labels", headers=h, json={"image_id": one, "plausible": False})
        assert r.status_code == 200 and r.json()["label"]["failed_criteria"] == []


# ----------------------------------------------------------------------------- blinded


def test_blinded_round_end_to_end(tmp_path: Path) -> None:
    from scipy.stats import binomtest
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    from pathloop.cli import app

    syn = shards(tmp_path / "syn", 5, "synthetic", "none", 32, seed=10)
    real = shards(tmp_path / "real", 6, "phantom", "test", 64, seed=11)  # another size: resized
    db, out = tmp_path / "fb.db", tmp_path / "blind"
    args = ["review", "create", "--samples", str(syn), "--blinded-real", str(real)]
    res = CliRunner().invoke(
        app, [*args, "--per-class", "4", "--out", str(out), "--store", str(db)]
    )
    assert res.exit_code == 0, res.output
    rid = int(res.stdout.strip().splitlines()[-1])
    store = FeedbackStore(db)
    images = store.images(rid)
    truth = {im.image_id: im.truth for im in images}
    assert len(images) == 24 and sorted(truth.values()).count("real") == 12  # 4 + 4 per class
    rows = list(iter_records(out, columns=["id", "image", "source", "provenance"]))
    assert {r["image"].shape for r in rows} == {(32, 32, 3)} and all(
        not r["provenance"] for r in rows
    )
    assert [truth[r["id"]] for r in rows] == [r["source"] for r in rows]
    first_half = [truth[im.image_id] for im in images[:12]]
    assert 0 < first_half.count("real") < 12  # shuffled, not real then synthetic

    # --- three raters through the API; none of them can see the truth
    raters = {name: store.add_rater(name)[1] for name in ("ann", "ben", "cat")}
    rng = np.random.default_rng(0)
    given: dict[str, dict[str, str]] = {}
    with client(db, rid, real_examples=str(real)) as api:
        for name, token in raters.items():
            h = auth(token)
            assert api.get("/v1/review/meta", headers=h).json()["mode"] == "blinded"
            nxt = api.get("/v1/review/next", headers=h).json()
            text = json.dumps(nxt)  # the truth is nowhere in what a rater gets
            assert nxt["real_examples"] == [] and '"real"' not in text and "synthetic" not in text
            bad = {"image_id": nxt["image_id"], "plausible": True}
            assert api.post("/v1/review/labels", headers=h, json=bad).status_code == 422
            given[name] = {}
            for k, im in enumerate(images):
                if name == "ann":  # wrong on every sixth image: right 20 times in 24
                    answer = truth[im.image_id] if k % 6 else _other(truth[im.image_id])
                else:
                    answer = ["real", "synthetic"][int(rng.integers(2))]
                if name == "cat" and k in (3, 7):
                    answer = "unsure" if k == 3 else "skip"
                body = {"image_id": im.image_id, "answer": answer}
                assert api.post("/v1/review/labels", headers=h, json=body).status_code == 200
                if answer in ("real", "synthetic"):
                    given[name][im.image_id] = answer

    # --- the statistics, checked against scipy, sklearn and statsmodels
    stats = store.round_stats(rid)["blinded"]
    every = [(truth[i] == a) for g in given.values() for i, a in g.items()]
    k, n = sum(every), len(every)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    pooled = stats["pooled"]
    assert (pooled["n"], pooled["correct"]) == (n, k) == (70, k)  # 24 + 24 + 22: no abstentions
    assert pooled["accuracy"] == pytest.approx(k / n)
    assert pooled["ci"] == pytest.approx([ci.low, ci.high])
    assert pooled["p_value"] == pytest.approx(binomtest(k, n, 0.5).pvalue)
    ann = stats["raters"]["ann"]
    assert (ann["correct"], ann["n"]) == (20, 24) and ann["ci"][0] > 0.5  # better than chance
    assert (stats["raters"]["cat"]["n_unsure"], stats["raters"]["cat"]["n_skipped"]) == (1, 1)
    shared = sorted(set.intersection(*(set(g) for g in given.values())))
    table = np.array([[given[r][i] for r in sorted(given)] for i in shared])
    assert stats["agreement"]["method"] == "fleiss" and stats["agreement"]["n_items"] == 22
    assert stats["agreement"]["kappa"] == pytest.approx(fleiss_kappa(aggregate_raters(table)[0]))
    two = {r: given[r] for r in ("ann", "ben")}
    from pathloop.review_stats import categorical_agreement

    both = sorted(set(two["ann"]) & set(two["ben"]))
    want = cohen_kappa_score([two["ann"][i] for i in both], [two["ben"][i] for i in both])
    assert categorical_agreement(two)["kappa"] == pytest.approx(want)

    # --- the CLI shows it
    stats_cmd = ["review", "stats", str(rid), "--store", str(db)]
    res = CliRunner().invoke(app, stats_cmd, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert re.search(r"pooled\W+70\W+" + f"{k / n:.3f}", res.output), res.output
    assert f"{ci.low:.3f}-{ci.high:.3f}" in res.output and "fleiss kappa" in res.output


def _other(truth: str) -> str:
    return "synthetic" if truth == "real" else "real"


def test_blinded_set_refuses_a_synthetic_real_set(tmp_path: Path) -> None:
    from pathloop.blinded import write_blinded_set

    syn = shards(tmp_path / "syn", 2, "synthetic", "none", 16, seed=4)
    with pytest.raises(ValueError, match="holds synthetic images"):
        write_blinded_set(syn, syn, tmp_path / "out", real_split=None)


# ----------------------------------------------------------------------------- pairwise


def _pair_annotation(who: int, selected: str | None = None, other: str | None = None) -> dict:
    result = []
    if selected:
        value = {"selected": selected}
        result.append(
            {"from_name": "pairwise", "to_name": "left,right", "type": "pairwise", "value": value}
        )
    if other:
        value = {"choices": [other]}
        result.append(
            {"from_name": "no_preference", "to_name": "left", "type": "choices", "value": value}
        )
    return {"completed_by": who, "result": result, "was_cancelled": False}


def test_pairwise_round_through_label_studio_to_dpo_pairs(tmp_path: Path) -> None:
    from pathloop import labelstudio
    from pathloop.cli import app
    from pathloop.finetune import FinetuneConfig, _finetune_data, given_pairs
    from pathloop.pairwise import pair_ids

    samples = shards(tmp_path / "samples", 4, "synthetic", "none", 16, seed=5)
    db = tmp_path / "fb.db"
    create = ["review", "create", "--samples", str(samples), "--pairwise", "--store", str(db)]
    res = CliRunner().invoke(app, [*create, "--seed", "1"])
    assert res.exit_code == 0, res.output
    rid = int(res.stdout.strip().splitlines()[-1])
    store = FeedbackStore(db)
    items = store.images(rid)
    assert len(items) == 6  # 4 images per class: 2 pairs per class
    for im in items:
        a, b = pair_ids(im.image_id)
        assert a != b
    shard = {r["id"]: r for r in iter_records(samples)}
    assert all(
        shard[a]["class_id"] == shard[b]["class_id"] == im.class_id
        for im in items
        for a, b in [pair_ids(im.image_id)]
    )

    # --- Label Studio export: the Pairwise tag over two images
    tasks = json.loads(labelstudio.export_tasks(store, rid, tmp_path / "ls").read_text())
    config = ET.fromstring((tmp_path / "ls" / "labeling_config.xml").read_text())
    tag = config.find("Pairwise")
    assert tag is not None and tag.get("toName") == "left,right"
    assert {im.get("name"): im.get("value") for im in config.iter("Image")} == {
        "left": "$left",
        "right": "$right",
    }
    first = tasks[0]["data"]
    left, right = pair_ids(first["image_id"])
    png = base64.b64decode(first["right"].removeprefix("data:image/png;base64,"))
    assert np.array_equal(decode_png(png), shard[right]["image"])

    # --- what Label Studio would export: one pair each way, both, neither, unsure; a second
    # annotator disagrees on pair 0 (a tie: left out) and agrees on pair 1; one bad annotation
    answers = [
        ("left", None),
        ("right", None),
        (None, "both"),
        (None, "Neither is plausible"),
        (None, "unsure"),
        ("left", None),
    ]
    for i, (task, (sel, other)) in enumerate(zip(tasks, answers, strict=True)):
        task["id"] = i
        task["annotations"] = [_pair_annotation(7, sel, other)]
    tasks[0]["annotations"].append(_pair_annotation(8, "right"))
    tasks[1]["annotations"].append(_pair_annotation(8, "right"))
    tasks[2]["annotations"].append(_pair_annotation(9, "left", "both"))  # two answers: refused
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    report = labelstudio.import_annotations(store, rid, export)
    assert (report.n_annotations, report.n_stored, len(report.bad)) == (9, 8, 1)
    assert "no-preference" in report.bad[0].reason
    by_item = {(lab.image_id, lab.rater_id): lab.answer for lab in store.labels(rid)}
    seven = store.ensure_rater("ls:7")
    assert [by_item[(t["data"]["image_id"], seven)] for t in tasks] == [
        "a",
        "b",
        "both",
        "neither",
        "unsure",
        "a",
    ]
    stats = store.round_stats(rid)["pairwise"]
    assert stats["choices"]["ls:7"] == {"a": 2, "b": 1, "both": 1, "neither": 1, "unsure": 1}
    assert stats["left_preferred"]["n"] == 5  # a or b decisions: 2 + 1 by ls:7, 2 by ls:8

    # --- preference pairs, as the dpo finetune reads them
    path = tmp_path / "pairs.parquet"
    pairs_cmd = ["review", "pairs", str(rid), "--out", str(path), "--store", str(db)]
    res = CliRunner().invoke(app, pairs_cmd)
    assert res.exit_code == 0 and path.exists(), res.output
    cfg = FinetuneConfig(method="dpo", synthetic=str(samples), pairs=str(path))
    _finetune_data(cfg, BONE_MARROW_16, tmp_path / "data.npz")
    data = np.load(tmp_path / "data.npz")
    ids = [r["id"] for r in iter_records(samples, columns=["id"])]
    want = {  # pair 0 is a 1:1 tie and pair 4 unsure: both left out
        1: (-1, 1),  # right more plausible (two votes)
        2: (1, 1),  # both equally plausible: both win
        3: (-1, -1),  # neither: both lose
        5: (1, -1),
    }
    got = [(ids[a], ids[b], sa, sb) for a, b, sa, sb in data["pairs"]]
    assert got == [(*pair_ids(tasks[i]["data"]["image_id"]), *s) for i, s in want.items()]
    assert data["pairs"].dtype == np.int64 and data["pairs"].shape == (4, 4)
    assert np.array_equal(data["images"][data["pairs"][0, 0]], shard[got[0][0]]["image"])
    with pytest.raises(ValueError, match="not in synthetic"):
        given_pairs(str(path), ids[:3])


def test_pairwise_round_over_the_api(tmp_path: Path) -> None:
    from pathloop.pairwise import create_pairwise_round, pair_ids

    samples = shards(tmp_path / "samples", 2, "synthetic", "none", 16, seed=6)
    store = FeedbackStore(tmp_path / "fb.db")
    rid = create_pairwise_round(store, samples)
    _, token = store.add_rater("dr")
    pngs = {r["id"]: r["image"] for r in iter_records(samples)}
    with client(tmp_path / "fb.db", rid) as api:
        h = auth(token)
        nxt = api.get("/v1/review/next", headers=h).json()
        assert nxt["pair"] == list(pair_ids(nxt["image_id"])) and nxt["subtypes"] == []
        right = decode_png(base64.b64decode(nxt["image_b_b64"]))
        assert np.array_equal(right, pngs[nxt["pair"][1]])
        body = {"image_id": nxt["image_id"], "answer": "b", "comment": "sharper nucleus"}
        r = api.post("/v1/review/labels", headers=h, json=body)
        assert r.status_code == 200 and r.json()["label"]["answer"] == "b"
        verdict = {"image_id": nxt["image_id"], "plausible": True}
        assert api.post("/v1/review/labels", headers=h, json=verdict).status_code == 422
    with pytest.raises(FeedbackError, match="pairwise"):
        store.export_round(rid, tmp_path / "export")


def test_the_docs_show_the_review_page() -> None:
    """docs/usage.md shows the review page; the screenshots are the browser test's."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "usage.md").read_text()
    for name in ("review_ui.png", "review_ui_pairwise.png"):
        assert f"]({name})" in text, name
        assert (docs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
