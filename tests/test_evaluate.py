"""`pathloop evaluate` end to end: a registered tiny checkpoint (sampled on local Ray) against a
phantom shard set as the baseline, then `pathloop compare` on the MLflow runs."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pathloop.cli import app

TINY = Path(__file__).resolve().parents[1] / "jobs/configs/evaluate.tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny CNNs on 1 thread


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def registered(tiny_ckpt, mlflow_uri) -> str:
    """tiny_ckpt registered as models:/eval-tiny/1 by a run that logged a training loss."""
    from pathloop import tracking
    from pathloop.config import TrackingConfig

    tc = TrackingConfig(tracking_uri=mlflow_uri, experiment="train")
    run_id = tracking.start_run(tc, ".", {"train.steps": 3}, run_name="tiny-train")
    tracking.log_metrics(mlflow_uri, run_id, {"loss": 0.5}, 3)
    uri = tracking.log_checkpoint_model(mlflow_uri, run_id, tiny_ckpt, "eval-tiny")
    tracking.end_run(mlflow_uri, run_id)
    return uri


@pytest.fixture(scope="module")
def evaluated(ray_session, registered, phantom_shards, mlflow_uri, tmp_path_factory):
    """One `pathloop evaluate` through the CLI: the registered (untrained) model against the
    phantom shard set itself as the baseline, i.e. 'perfect samples' of the real data."""
    work = tmp_path_factory.mktemp("evaluate")
    ablation = work / "ablation.csv"
    ablation.write_text("fraction,fid,plausible_rate,trial_id\n0,9,0.2,a\n0.5,6,0.5,b\n1,4,0.7,c\n")
    overrides = [
        f"workdir={work / 'run'}",
        f"real={phantom_shards}",
        f"tracking.tracking_uri={mlflow_uri}",
        "per_class=2",
        "sampler.steps=2",
        "features.steps=40",
        "tstr.steps=30",
        "tstr.fewshot_k=2",
        "grid_per_class=2",
        f"ablation={ablation}",
    ]
    args = ["evaluate", "--config", str(TINY), "--model", registered]
    args += ["--baseline", str(phantom_shards), *overrides]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads((work / "run" / "result.json").read_text())


def test_evaluate_measures_every_label(evaluated):
    fid = {k: v["fid"] for k, v in evaluated["fidelity"].items()}
    assert set(fid) == {"real", "baseline", "model"} and evaluated["labels"][-1] == "model"
    # The phantoms themselves are far closer to the real (phantom) data than untrained noise.
    assert fid["baseline"] < fid["model"] / 5
    prec = {k: v["precision"] for k, v in evaluated["fidelity"].items()}
    assert prec["baseline"] > 0.9 and prec["model"] < 0.1
    tstr = evaluated["tstr"]
    assert set(tstr["real"]) == {"real", "fewshot"}
    assert set(tstr["model"]) == {"synthetic", "real_synthetic", "fewshot_synthetic"}
    assert tstr["baseline"]["synthetic"]["accuracy"] > tstr["model"]["synthetic"]["accuracy"]
    judge = evaluated["plausibility"]["judge"]
    assert judge["model"]["overall"]["n"] == 32 and judge["model"]["overall"]["rate"] < 0.2
    assert judge["baseline"]["overall"]["rate"] > 0.8


def test_report_is_self_contained(evaluated):
    page = Path(evaluated["report"]).read_text()
    assert page.count("data:image/png;base64,") >= 2 + 16 * 3  # bars, curve, 16 classes x 3
    assert 'src="http' not in page and "<link" not in page
    for title in ("FID and PRDC", "Train on synthetic, test on real", "Few-shot", "ablation"):
        assert title in page
    assert "<h1>pathloop evaluation: evaluate-tiny</h1>" in page  # the config's name
    assert "model vs baseline:" in page and f"/runs/{evaluated['run_id']}'>" in page


def test_mlflow_run_holds_metrics_and_report(evaluated):
    import mlflow

    client = mlflow.MlflowClient(evaluated["tracking_uri"])
    run = client.get_run(evaluated["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pathloop.step"] == "evaluate"
    m = run.data.metrics
    assert m["model/fid"] == pytest.approx(evaluated["fidelity"]["model"]["fid"])
    for key in ("model/prdc/coverage", "real/tstr/real/auc_ovr", "baseline/plausibility/judge/hi"):
        assert key in m
    assert "model/tstr/fewshot_synthetic/macro_f1" in m and "features/test_accuracy" in m
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "report.html",
        "metrics.json",
        "feature_model",
    }


def test_compare_writes_side_by_side_csv(evaluated, registered, mlflow_uri, tmp_path):
    out = tmp_path / "cmp.csv"
    args = ["compare", evaluated["run_id"], registered, "tiny-train", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--tracking-uri", mlflow_uri])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = list(csv.reader(out.open()))
    assert rows[0][0] == "metric" and len(rows[0]) == 4
    table = {r[0]: r[1:] for r in rows[1:]}
    assert float(table["model/fid"][0]) == pytest.approx(evaluated["fidelity"]["model"]["fid"])
    assert table["loss"][1:] == ["0.5", "0.5"]  # models:/ → its source run, by name too
    assert not any("/class/" in k for k in table)  # per-class rates are not "main" metrics
    bad = CliRunner().invoke(app, ["compare", "no-such-run", "--tracking-uri", mlflow_uri])
    assert bad.exit_code == 2 and "no run id, run name" in bad.output


def test_evaluate_without_model_or_with_bad_split_fails_clearly(
    phantom_shards, mlflow_uri, tmp_path
):
    from pathloop.evaluate import EvaluateConfig, evaluate_models

    res = CliRunner().invoke(app, ["evaluate", f"workdir={tmp_path}"])
    assert res.exit_code == 2 and "--model" in res.output
    cfg = EvaluateConfig(
        workdir=str(tmp_path),
        real=str(phantom_shards),
        model=str(phantom_shards),
        fidelity={"real_split": "val"},
        tracking={"tracking_uri": mlflow_uri},
    )
    with pytest.raises(ValueError, match=r"no rows in split\(s\) \['val'\]"):
        evaluate_models(cfg)


def test_presets_load_and_resolve():
    from pathloop.config import load_config
    from pathloop.evaluate import EvaluateConfig
    from pathloop.metrics import CLASSIFIER_PRESETS, FEATURE_PRESETS, _resolved

    cfg = load_config(EvaluateConfig, TINY)
    assert cfg.tstr.synthetic_per_class == 128 and cfg.features.seed != 0
    assert yaml.safe_load(TINY.read_text())["per_class"] == 16
    paper = load_config(EvaluateConfig, TINY.with_name("evaluate.paper.yaml"))
    assert _resolved(paper.tstr, CLASSIFIER_PRESETS).arch == "resnext50_32x4d"
    assert _resolved(paper.features, FEATURE_PRESETS).arch == "resnet50"


def test_baseline_labels_name_the_columns():
    from pathloop.evaluate import EvaluateConfig, model_labels

    cfg = EvaluateConfig(model="m", baselines=("a", "b"))
    assert model_labels(cfg) == {"baseline1": "a", "baseline2": "b", "model": "m"}
    named = cfg.model_copy(update={"baseline_labels": ("pretrained", "round1")})
    assert model_labels(named) == {"pretrained": "a", "round1": "b", "model": "m"}
    for bad in (("pretrained",), ("x", "x"), ("real", "y"), ("model", "y")):
        with pytest.raises(ValueError, match="baseline_labels"):
            model_labels(cfg.model_copy(update={"baseline_labels": bad}))
