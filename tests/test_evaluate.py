"""`pathloop evaluate` end to end: a registered tiny checkpoint (sampled on local Ray) against a
phantom shard set as the baseline, then `pathloop compare` on the MLflow runs."""

import csv
import json
import shlex
from pathlib import Path

import numpy as np
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
        "tstr.seeds=2",
        "tstr.synthetic_per_class=8",  # the baseline set holds 10 per class, real train 8
        "fidelity.seeds=2",
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
    assert set(tstr["model"]) == {
        "synthetic", "real_synthetic", "fewshot_synthetic", "real_equal", "ratio"
    }  # fmt: skip
    assert tstr["baseline"]["synthetic"]["accuracy"] > tstr["model"]["synthetic"]["accuracy"]
    # TRTR at equal counts: as many real images per class as the synthetic set gave TSTR
    for lab, n in (("model", 2), ("baseline", 8)):
        syn, eq = tstr[lab]["synthetic"], tstr[lab]["real_equal"]
        assert syn["n_per_class"] == eq["n_per_class"] == n and syn["n_train"] == eq["n_train"]
        assert syn["n_seeds"] == eq["n_seeds"] == 2 and len(eq["macro_f1_per_seed"]) == 2
        assert eq["macro_f1_lo"] <= eq["macro_f1"] <= eq["macro_f1_hi"]
        ratio = tstr[lab]["ratio"]["macro_f1"]
        assert ratio == pytest.approx(syn["macro_f1"] / eq["macro_f1"])
    assert tstr["baseline"]["ratio"]["macro_f1"] > tstr["model"]["ratio"]["macro_f1"]
    test = evaluated["prdc_test"]  # 2 held-out images per class: every side subsampled to 2
    assert set(test) == {"real", "baseline", "model"}
    assert all(m["n_per_class"] == 2 and m["n_seeds"] == 2 for m in test.values())
    assert test["baseline"]["precision"] > test["model"]["precision"]
    judge = evaluated["plausibility"]["judge"]
    assert judge["model"]["overall"]["n"] == 32 and judge["model"]["overall"]["rate"] < 0.2
    assert judge["baseline"]["overall"]["rate"] > 0.8
    # the sampling time of the set it sampled, none for the set it was given
    timing = evaluated["sampling"]
    assert set(timing) == {"model"} and timing["model"]["images"] == 32
    assert timing["model"]["images_per_s"] == pytest.approx(32 / timing["model"]["seconds"], 0.01)


def test_report_is_self_contained(evaluated):
    page = Path(evaluated["report"]).read_text()
    assert page.count("data:image/png;base64,") >= 2 + 16 * 3  # bars, curve, 16 classes x 3
    assert 'src="http' not in page and "<link" not in page
    titles = ("FID and PRDC", "Train on synthetic, test on real", "Few-shot", "ablation")
    titles += ("PRDC against the held-out test split", "Synthetic vs real at equal counts")
    for title in titles:
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
    ratio = evaluated["tstr"]["model"]["ratio"]["macro_f1"]
    assert m["model/tstr/ratio/macro_f1"] == pytest.approx(ratio)
    for key in ("model/tstr/real_equal/macro_f1_lo", "model/prdc_test/coverage_hi"):
        assert key in m
    assert "real/prdc_test/n_per_class" in m and not any("per_seed" in k for k in m)
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


def _commands(path: Path) -> dict[str, list[str]]:
    """The header's `pathloop <step> ...` commands (``\\`` continuations joined): step -> argv."""
    cmds, current = {}, None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if current is None and text.startswith("pathloop "):
            current = []
        if current is not None:
            current.append(text.rstrip("\\"))
            if not text.endswith("\\"):
                argv = shlex.split(" ".join(current))
                cmds.setdefault(argv[1], argv)
                current = None
    return cmds


@pytest.mark.parametrize("suffix", ["real", "real-gpu"])
def test_real_presets_chain_ingest_pretrain_sample_evaluate(suffix):
    from pathloop.config import load_config
    from pathloop.evaluate import EvaluateConfig
    from pathloop.pretrain import PretrainConfig
    from pathloop.sampling import SampleConfig

    ev_path = TINY.with_name(f"evaluate.{suffix}.yaml")
    pre_path = TINY.with_name(f"pretrain.{suffix}.yaml")
    ev, pre = load_config(EvaluateConfig, ev_path), load_config(PretrainConfig, pre_path)
    assert ev.per_class == ev.tstr.synthetic_per_class == 100 and ev.tstr.seeds >= 3
    assert {"synthetic", "real_equal"} <= set(ev.tstr.settings) and ev.fidelity.equal_counts
    assert ev.real == pre.data.shards and ev.per_class <= 300  # 300 real train cells per class
    for path in (ev_path, pre_path):
        # the CPU chain has been run and says so; the GPU one says it has not
        assert ("Measured (2-core CPU" if suffix == "real" else "NOT MEASURED") in path.read_text()
        cmds = _commands(path)
        assert list(cmds) == ["ingest", "pretrain", "sample", "evaluate"], cmds
        ingest = cmds["ingest"]
        assert ingest[ingest.index("--out") + 1] == ev.real
        size = int(ingest[ingest.index("--size") + 1])
        assert size == (32 if suffix == "real" else 64)
        assert Path(cmds["pretrain"][-1]).name == pre_path.name
        sample_cfg, *overrides = cmds["sample"][3:]
        sc = load_config(SampleConfig, TINY.parents[2] / sample_cfg, overrides)
        assert sc.model == f"{pre.workdir}/result.json" and sc.per_class == ev.per_class
        assert sc.sampler == ev.sampler and sc.use_gpu == ev.use_gpu  # evaluate would sample alike
        assert cmds["evaluate"][-1] == sc.out and Path(cmds["evaluate"][3]).name == ev_path.name


def test_config_mistakes_are_one_line_errors():
    from pathloop.cli import one_line
    from pathloop.config import ConfigError, load_config
    from pathloop.evaluate import EvaluateConfig

    cases = {
        "tstr.seeds=0": "tstr.seeds: Input should be greater than or equal to 1",
        "tstr.settings=[synthetic,bogus]": "unknown TSTR setting(s) ['bogus']; valid: real,",
        "fidelity.seeds=0": "fidelity.seeds: Input should be greater than or equal to 1",
        "fidelity.equal=1": "not a field at fidelity; valid keys: chunk, equal_counts, k,",
    }
    for override, words in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(EvaluateConfig, TINY, [override])
        line = one_line(err.value)
        assert "\n" not in line and words in line, line


def test_real_equal_needs_enough_real_images_before_training():
    from pathloop.config import updated
    from pathloop.evaluate import EvaluateConfig, check_equal_counts

    cfg = EvaluateConfig(tstr={"synthetic_per_class": 5})
    real_ids = np.repeat(np.arange(2), 3)  # 3 real train images per class
    samples = {"model": (None, np.repeat(np.arange(2), 6))}
    with pytest.raises(ValueError, match="lower tstr.synthetic_per_class to 3 or drop real_equal"):
        check_equal_counts(cfg, real_ids, samples)
    check_equal_counts(updated(cfg, tstr={"synthetic_per_class": 3}), real_ids, samples)
    check_equal_counts(updated(cfg, tstr={"settings": ("synthetic",)}), real_ids, samples)


def test_flat_metrics_name_every_equal_count_figure():
    from pathloop.evaluate import flat_metrics, headline_metrics

    seeds = {"macro_f1": 0.4, "macro_f1_lo": 0.3, "macro_f1_hi": 0.5, "n_seeds": 3.0,
             "macro_f1_per_seed": [0.3, 0.4, 0.5], "n_per_class": 100.0}  # fmt: skip
    result = {
        "fidelity": {},
        "prdc_test": {"model": {"precision": 0.6, "precision_lo": float("nan"), "n_seeds": 1.0}},
        "tstr": {"model": {"synthetic": seeds, "real_equal": seeds, "ratio": {"macro_f1": 1.0}}},
        "plausibility": {},
        "feature_model": {},
    }
    m = flat_metrics(result)
    assert m["model/tstr/synthetic/macro_f1_lo"] == 0.3
    assert m["model/tstr/real_equal/n_per_class"] == 100 and m["model/tstr/ratio/macro_f1"] == 1
    assert m["model/prdc_test/precision"] == 0.6 and "model/prdc_test/precision_lo" not in m
    assert not any("per_seed" in k for k in m)  # lists stay in result.json
    head = headline_metrics(result)
    assert {"model/tstr/ratio/macro_f1", "model/tstr/real_equal/macro_f1"} <= set(head)
    assert "model/prdc_test/precision" in head and "model/tstr/synthetic/macro_f1_lo" not in head


def test_baseline_labels_name_the_columns():
    from pathloop.evaluate import EvaluateConfig, model_labels

    cfg = EvaluateConfig(model="m", baselines=("a", "b"))
    assert model_labels(cfg) == {"baseline1": "a", "baseline2": "b", "model": "m"}
    named = cfg.model_copy(update={"baseline_labels": ("pretrained", "round1")})
    assert model_labels(named) == {"pretrained": "a", "round1": "b", "model": "m"}
    for bad in (("pretrained",), ("x", "x"), ("real", "y"), ("model", "y")):
        with pytest.raises(ValueError, match="baseline_labels"):
            model_labels(cfg.model_copy(update={"baseline_labels": bad}))
