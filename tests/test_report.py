"""The evaluation report from a made-up result: the verdict, metric directions, only tables with
data, a page that fits 1,280 px, the run's name and its MLflow link (no models, no Ray)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

from pathloop import report
from pathloop.metrics import plausibility_table
from pathloop.vocab import BONE_MARROW_16

CODES = [c.code for c in BONE_MARROW_16.classes]


def _plaus(rates: dict[str, float], n: int = 20) -> dict:
    """A plausibility table over the 16 classes: ``rates`` by code, 0.5 for the others."""
    votes, ids = [], []
    for c in BONE_MARROW_16.classes:
        k = round(rates.get(c.code, 0.5) * n)
        votes += [1.0] * k + [0.0] * (n - k)
        ids += [c.id] * n
    return plausibility_table(votes, ids, BONE_MARROW_16)


def _classifier(f1: float) -> dict:
    return {"macro_f1": f1, "accuracy": f1, "macro_precision": f1, "macro_recall": f1,
            "auc_ovr": float("nan")}  # fmt: skip


@pytest.fixture
def result() -> dict:
    """A loop's round 2: pretrained, round1, model; M5 falls clearly, E4 a little."""
    labels = ["pretrained", "round1", "model"]
    fid = {"real": 1.0, "pretrained": 40.0, "round1": 30.0, "model": 25.5}
    rng = np.random.default_rng(0)
    grid = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    return {
        "title": "pathloop evaluation: round2-evaluate",
        "labels": labels,
        "models": {"real": "/data/real", **{lab: f"/runs/{lab}" for lab in labels}},
        "fidelity": {
            lab: {"fid": v, "precision": 0.5, "recall": 0.4, "density": 0.9, "coverage": 0.6}
            for lab, v in fid.items()
        },
        "tstr": {
            "real": {"real": _classifier(0.9)},  # MAGIC's real reference: no synthetic rows
            **{lab: {"synthetic": _classifier(0.3 + 0.1 * i)} for i, lab in enumerate(labels)},
        },
        "plausibility": {
            "judge": {
                "real": _plaus({}),
                "pretrained": _plaus({"M5": 0.9}),
                "round1": _plaus({"M5": 0.95, "E4": 0.6}),
                "model": _plaus({"M5": 0.2, "E4": 0.5, "B1": 0.9}),
            },
            "mllm": {lab: plausibility_table([], [], BONE_MARROW_16) for lab in labels},
        },
        "grids": {code: {lab: grid for lab in ["real", *labels]} for code in CODES},
        "mlflow": {
            "run_id": "abc123",
            "run_name": "round2-evaluate",
            "url": "http://127.0.0.1:5000/#/experiments/1/runs/abc123",
            "ui": "mlflow ui --backend-store-uri sqlite:////x/runs/mlflow.db",
            "parent": "loop",
        },
    }


def test_verdict_says_what_changed_with_intervals_and_which_classes_fell(result):
    lines = report.verdict(result)
    assert lines[0] == "model vs round1:"
    judge = next(x for x in lines if x.startswith("plausible rate (judge"))
    # 16 classes x 20 images: round1 has 0.5 in 14 classes, 0.95 and 0.6; the model 0.2, 0.9
    assert "higher is better" in judge and "(320 and 320 images)" in judge
    d, lo, hi = (float(v.replace("−", "-")) for v in re.findall(r"[−+]\d\.\d+", judge)[:3])
    assert lo < d < hi and d == pytest.approx((0.2 + 0.9 - 0.95 - 0.6) / 16, abs=5e-4)
    assert "FID (lower is better): 30 → 25.5 (−4.5)" in lines
    assert any(x.startswith("TSTR macro F1 (higher is better): 0.4 → 0.5") for x in lines)
    fell = next(x for x in lines if x.startswith("classes that fell (judge)"))
    assert fell.index("M5 −0.75") < fell.index("E4 −0.10")  # worst first
    assert "M5 −0.75 [" in fell and "] clearly" in fell and "1 clearly" in fell
    assert not any("(mllm" in x for x in lines)  # an evaluator that scored nothing says nothing


def test_verdict_without_a_baseline_gives_the_model_alone(result):
    result["labels"] = ["model"]
    lines = report.verdict(result)
    assert lines[0] == "model (no baseline to compare with):"
    assert lines[1].startswith("plausible rate (judge, higher is better): 0.")
    assert "FID (lower is better): 25.5" in lines and not any("fell" in x for x in lines)


def test_tables_hold_data_and_say_which_way_is_better(result):
    tables = {t["title"]: t for t in report.metric_tables(result)}
    assert not any("MAGIC" in title for title in tables)  # the real row alone is no table
    tstr = tables["Train on synthetic, test on real (Sun et al. 2023, Table 4)"]
    assert [r[0] for r in tstr["rows"]] == ["real (real)", "pretrained", "round1", "model"]
    assert "auc_ovr" not in tstr["columns"]  # NaN in every row
    assert tstr["note"] == "macro_f1, accuracy, macro_precision, macro_recall: higher is better"
    fidelity = tables["Fidelity: FID and PRDC on evaluation-classifier features"]
    assert fidelity["note"].startswith("fid: lower is better; precision, recall")
    assert [t for t in tables if t.startswith("Plausibility")] == [
        "Plausibility per class (judge), 95 % Wilson interval"
    ]
    assert report.direction("model/fid") == report.LOWER
    assert report.direction("model/plausibility/judge/rate") == report.HIGHER


def _png_widths(page: str) -> list[int]:
    from PIL import Image

    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(p))).size[0] for p in pngs]


def test_report_fits_the_page_and_links_its_run(result, tmp_path):
    page = report.render_report(result, tmp_path / "report.html").read_text()
    widths = _png_widths(page)
    assert len(widths) == 1 + 16 * 4  # the judge's bars (mllm scored nothing), 16 x 4 strips
    assert max(widths) <= report.PAGE_PX - 64, widths  # the bars were 1,727 px wide
    strips = widths[1:]
    assert 4 * max(strips) + 90 <= report.PAGE_PX - 64  # a row of strips fits beside its class
    assert "<title>pathloop evaluation: round2-evaluate</title>" in page
    assert "<h1>pathloop evaluation: round2-evaluate</h1>" in page
    assert page.index("model vs round1:") < page.index("<h2>Models</h2>")  # the verdict first
    assert "href='http://127.0.0.1:5000/#/experiments/1/runs/abc123'>round2-evaluate</a>" in page
    assert "a step of run loop" in page and "mlflow ui --backend-store-uri" in page
    assert "MAGIC" not in page and "fid ↓" in page and "macro_f1 ↑" in page
    assert f"max-width:{report.PAGE_PX - 64}px" in page


def _seeds(mean: float, lo: float, hi: float, **extra: float) -> dict:
    return {"macro_f1": mean, "macro_f1_lo": lo, "macro_f1_hi": hi, "accuracy": mean,
            "n_seeds": 3.0, "macro_f1_per_seed": [lo, mean, hi], **extra}  # fmt: skip


def _prdc_test(p: float, n: int) -> dict:
    cells = {m: p for m in ("precision", "recall", "density", "coverage")}
    cells |= {f"{m}_lo": p - 0.1 for m in cells} | {f"{m}_hi": p + 0.1 for m in cells}
    return {**cells, "n_per_class": float(n), "n_seeds": 3.0}


def test_equal_count_rows_show_intervals_ratio_and_directions(result, tmp_path):
    for lab, f1 in (("round1", 0.4), ("model", 0.5)):
        result["tstr"][lab]["synthetic"] = _seeds(f1, f1 - 0.05, f1 + 0.05, n_per_class=100.0)
        result["tstr"][lab]["real_equal"] = _seeds(0.8, 0.75, 0.85, n_per_class=100.0)
        result["tstr"][lab]["ratio"] = {"macro_f1": f1 / 0.8}
    result["prdc_test"] = {"real": _prdc_test(0.9, 100), "model": _prdc_test(0.5, 100)}
    tables = {t["title"].split(":")[0].split(" at ")[0]: t for t in report.metric_tables(result)}
    eq = tables["Synthetic vs real"]
    assert "over 3 classifier seeds" in eq["title"]
    assert eq["columns"] == ["", "images per class", *report.EQUAL_COLUMNS]
    assert eq["rows"] == [
        ["round1", 100, "0.400 [0.350, 0.450]", "0.800 [0.750, 0.850]", pytest.approx(0.5)],
        ["model", 100, "0.500 [0.450, 0.550]", "0.800 [0.750, 0.850]", pytest.approx(0.625)],
    ]  # pretrained has no real_equal: no row
    assert eq["note"].startswith(
        "TSTR macro_f1, TRTR-equal macro_f1, TSTR / TRTR-equal: higher is better; TRTR-equal"
    )
    prdc = tables["PRDC against the held-out test split"]
    assert [r[:3] for r in prdc["rows"]] == [["real", 100, "0.900 [0.800, 1.000]"],
                                            ["model", 100, "0.500 [0.400, 0.600]"]]  # fmt: skip
    assert prdc["note"].startswith("precision, recall, density, coverage: higher is better")
    assert "TSTR / TRTR-equal macro F1 (higher is better): 0.5 → 0.625 (+0.125)" in (
        report.verdict(result)
    )
    page = report.render_report(result, tmp_path / "report.html").read_text()
    assert "TSTR / TRTR-equal ↑" in page and "images per class</th>" in page
    assert "0.500 [0.450, 0.550]" in page and "0.625" in page


def test_equal_count_table_is_left_out_without_both_settings(result):
    assert report.equal_count_table(result["tstr"], result["labels"]) is None
    titles = [t["title"] for t in report.metric_tables(result)]
    assert not any(t.startswith(("Synthetic vs real", "PRDC against")) for t in titles)
