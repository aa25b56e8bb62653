"""`pathloop experiment` with minimal settings on local Ray: two arms x two seeds end to end on the
same evaluation images, a rerun that skips every finished step, the weights each arm finetunes
with, and config mistakes as one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pathloop.config import load_config
from pathloop.experiment import ARMS, ExperimentConfig, arm_source, run_experiment, weighs_real

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = [
    "round.review_per_class=1",
    "round.pool_per_class=2",
    "round.sampler.steps=2",
    "reward.backbone_train.steps=5",
    "reward.train.steps=6",
    "reward.train.checkpoint_every=6",
    "reward.tracking.register_as=null",
    "finetune.train.steps=3",
    "finetune.train.batch_size=8",
    "finetune.train.checkpoint_every=3",
    "finetune.train.preview_per_class=1",
    "finetune.preview.steps=2",
    "finetune.tracking.register_as=null",
    "arms=[control,feedback]",
    "seeds=[0,1]",
    "evaluation.per_class=2",
    "evaluation.k=3",
    "evaluation.n_boot=200",
    "evaluation.features.steps=5",
    "evaluation.tstr_classifier.steps=5",
    "evaluation.tstr_classifier.synthetic_per_class=2",
]


def _columns(shards: Path, *cols: str) -> list[list]:
    from pathloop.data import iter_records

    rows = list(iter_records(shards, columns=list(cols)))
    return [[r[c] for r in rows] for c in cols]


def _mtimes(wd: Path) -> dict[Path, int]:
    done = [*wd.glob("**/result.json"), *wd.glob("**/eval.json"), *wd.glob("**/manifest.json")]
    return {p: p.stat().st_mtime_ns for p in done}


@pytest.mark.usefixtures("ray_session")
def test_two_arms_two_seeds_end_to_end_then_resume(phantom_shards, tiny_ckpt, tmp_path, capsys):
    import mlflow

    from pathloop.experiment_results import print_results, stage_text

    wd = tmp_path / "exp"
    over = [f"workdir={wd}", "data.source=shards", f"data.path={phantom_shards}"]
    steps = ["evaluation.steps=3"]  # the pool keeps round.sampler's 2 steps
    steps.append("parallel_finetunes=2")  # two finetuning runs at a time
    cfg = load_config(ExperimentConfig, None, [*over, f"pretrained={tiny_ckpt}", *MINIMAL, *steps])
    res = run_experiment(cfg)

    # every arm x seed and the pretrained model judged on the same 32 images (seed, class)
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["control", "feedback", "base"]
    assert [rows[a]["n_seeds"] for a in rows] == [2, 2, 1]
    sets = ("pool", "eval/base/samples", "eval/control-seed1/samples")
    drawn = {
        d: {
            p["steps"]
            for f in (wd / d).glob("*.parquet")
            for p in pq.read_table(f)["provenance"].to_pylist()
        }
        for d in sets
    }
    assert drawn == dict(zip(sets, [{2}, {3}, {3}], strict=True))
    assert {r["n_images"] for r in rows.values()} == {32}
    labels = ["base", "control-seed0", "control-seed1", "feedback-seed0", "feedback-seed1"]
    z = {lab: np.load(wd / "eval" / lab / "verdicts.npz") for lab in labels}
    for lab in labels:
        assert z[lab]["seed"].tolist() == list(range(100_000, 100_032))
        assert np.array_equal(z[lab]["class_id"], np.repeat(np.arange(16), 2))
    assert rows["feedback"]["diff"] is not None and rows["feedback"]["mcnemar_p"] is not None
    assert set(rows["feedback"]["per_class"]) and len(rows["feedback"]["criteria"]) == 7
    assert rows["feedback"]["prdc_precision"] is not None
    assert rows["feedback"]["tstr_macro_f1"] is not None
    # PRDC and TSTR: paired by seed with the control's models, a t interval over the 2 seeds
    fid = rows["feedback"]["fidelity_diff"]
    assert set(fid) == {"prdc_precision", "prdc_coverage", "tstr_macro_f1"}
    assert fid["prdc_precision"]["n_seeds"] == 2 and "fidelity_diff" not in rows["control"]
    # the arms' weights: control 0; feedback the reward model's rewards on the pool
    ft = {a: np.load(wd / f"arms/{a}/seed0/finetune_data.npz") for a in ("control", "feedback")}
    assert len(ft["feedback"]["weights"]) == 32 and not ft["control"]["weights"].any()
    assert 0 < ft["feedback"]["weights"].mean() < 1
    # no preview grid at the end of an arm's finetuning: its evaluation set is its picture
    assert (wd / "arms/feedback/seed0/result.json").exists()
    assert not (wd / "arms/feedback/seed0/previews").exists()
    # outputs: tables, plots, one parent run with a child per arm x seed and the reward model
    md = (wd / "results.md").read_text()
    assert "| control |" in md
    assert "## PRDC and TSTR: paired difference to the control [95 % t interval" in md
    assert "Evaluation images: ddim, 3 steps, CFG " in md  # evaluation.steps, not the pool's 2
    # colour drift: a column of the table, per class in results.json, its figure linked
    head = next(line for line in md.splitlines() if line.startswith("| arm |"))
    assert head.rstrip(" |").endswith("colour drift (worst class, real-spread units)")
    assert "](plot_colour.png)" in md
    # the benchmark's bars: the feedback arm against evaluation.bars' +0.10 over all classes
    [bars] = json.loads((wd / "results.json").read_text())["bars"]
    assert bars["arm"] == "feedback" and bars["bar"] == 0.10 and bars["over"] == "all classes"
    assert bars["gain"]["diff"] == pytest.approx(rows["feedback"]["diff"])
    assert "## Against the benchmark's bars" in md
    assert f"| feedback | {bars['gain']['diff']:+.3f} (bar +0.10): " in md
    colour = json.loads((wd / "results.json").read_text())["colour"]
    assert list(colour["labels"]) == ["control", "feedback", "base", "real"]
    cells = colour["labels"]["feedback"]["per_class"]
    assert len(cells) == 16 and {c["n"] for c in cells.values()} == {4}  # 2 images x 2 seeds
    assert all(np.isfinite(v["worst"]) and v["worst"] >= 0 for v in colour["labels"].values())
    for name in ("plot_arms", "plot_classes", "plot_colour"):
        assert Path(res["files"][name]).read_bytes()[:4] == b"\x89PNG"
    # the same images under each arm: a row per model (first seed), a column per sampling seed
    # (both of every class's), its pixels from that model's evaluation set, rejects framed red
    grid = np.asarray(Image.open(res["files"]["samples_paired"]).convert("RGB"))
    tile = 2 * 32 + 3  # scale 2, pad 3
    assert grid.shape[0] == 3 * tile + 3
    margin = grid.shape[1] - 32 * tile - 3
    assert "](samples_paired.png)" in md
    for r, lab in enumerate(["base", "control-seed0", "feedback-seed0"]):
        ims, provs = _columns(wd / "eval" / lab / "samples", "image", "provenance")
        images = {p["seed"]: im for im, p in zip(ims, provs, strict=True)}
        for c in range(32):
            x, y = margin + 3 + c * tile, 3 + r * tile
            assert np.array_equal(grid[y : y + 64 : 2, x : x + 64 : 2], images[100_000 + c])
            red = tuple(grid[y + 32, x - 1]) == (220, 0, 0)
            assert red == (z[lab]["plausible"][c] == 0), (lab, c)
    print_results(json.loads((wd / "results.json").read_text()))
    printed = capsys.readouterr().out
    assert "McNemar" in printed and "MLflow store" in printed and "colour drift" in printed
    assert "PRDC and TSTR minus the control's" in printed
    assert "benchmark's bars" in " ".join(printed.split())
    assert res["wall_seconds"] >= sum(res["step_seconds"].values()) / 2  # two at once at most
    assert f"wall time of this run: {res['wall_seconds'] / 60:.1f} min" in printed
    # the same wall time by stage; the model was given, so no pretraining in it
    stages = res["stage_seconds"]
    assert list(stages) == ["data", "pretraining", "shared steps", "finetuning", "evaluation"]
    assert stages["pretraining"] == 0 and min(stages.values()) >= 0
    assert sum(stages.values()) <= res["wall_seconds"] + 0.5
    tuned = [v for k, v in res["step_seconds"].items() if k.endswith(": finetune")]
    assert max(tuned) <= stages["finetuning"] + 0.5
    assert f"By stage: {stage_text(res)}." in md
    assert "by stage: data" in printed and " ".join(printed.split()).count(stage_text(res)) == 1
    client = mlflow.MlflowClient(res["tracking_uri"])
    parent = client.get_run(res["parent_run_id"])
    assert "feedback/diff" in parent.data.metrics and "feedback/colour_drift" in parent.data.metrics
    assert parent.data.metrics["feedback/bars_hold"] == float(bars["holds"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    runs = {r.info.run_name: r for r in children}
    assert {"reward", *labels[1:]} <= set(runs)
    assert "eval/judge_rate" in runs["feedback-seed1"].data.metrics
    # parallel_finetunes=2: the first two finetuning runs start together (one after the other,
    # the second would start after the first ended)
    spans = sorted((runs[n].info.start_time, runs[n].info.end_time) for n in labels[1:])
    assert spans[1][0] < spans[0][1], spans

    # rerun after an interruption: only the missing step runs again
    before = _mtimes(wd)
    (wd / "eval/feedback-seed1/eval.json").unlink()
    again = run_experiment(cfg)
    assert list(again["step_seconds"]) == ["feedback-seed1: the expert, PRDC, TSTR"]
    assert again["stage_seconds"]["finetuning"] < stages["finetuning"]  # every run found done
    after = _mtimes(wd)
    redone = {p for p in before if after.get(p) != before[p]}
    assert redone == {wd / "eval/feedback-seed1/eval.json"}
    assert [r["rate"] for r in again["rows"]] == [r["rate"] for r in res["rows"]]
    assert again["colour"] == res["colour"]  # recomputed from the saved images, not resampled

    # feedback-data added later: the same reward model draws the control's real images
    more = cfg.model_copy(update={"arms": ("control", "feedback", "feedback-data")})
    third = {r["arm"]: r for r in run_experiment(more)["rows"]}
    assert third["feedback-data"]["n_seeds"] == 2 and third["feedback-data"]["diff"] is not None
    fd = np.load(wd / "arms/feedback-data/seed0/finetune_data.npz")
    assert not fd["weights"].any()  # no pool: only the beta_r term trains
    w, y = fd["real_weights"], fd["real_class_ids"]
    assert w.std() > 0 and (w >= 0).all()  # the reward model's scores, not all equal
    for c in np.unique(y):  # class_norm: every class keeps its share of the real term
        assert w[y == c].mean() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.usefixtures("ray_session")
def test_later_rounds_go_on_from_each_arms_own_model(phantom_shards, tiny_ckpt, tmp_path):
    """Two rounds: round 2 of the oracle arm samples a fresh pool from its round-1 model at the
    next range of pool seeds, the expert's verdicts on that pool weigh it, and it finetunes from
    the round-1 checkpoint; the control goes on from its own round-1 model on real images
    alone. Every round's model is judged on the same images; the headline rows are round 2's."""
    import pyarrow.parquet as pq

    from pathloop.data import iter_records
    from pathloop.experiment import POOL_SEED

    wd = tmp_path / "exp"
    over = [f"workdir={wd}", "data.source=shards", f"data.path={phantom_shards}"]
    fast = ["arms=[control,oracle]", "seeds=[0]", "rounds=2", "evaluation.prdc=false"]
    fast += ["evaluation.tstr=false"]
    cfg = load_config(ExperimentConfig, None, [*over, f"pretrained={tiny_ckpt}", *MINIMAL, *fast])
    res = run_experiment(cfg)

    first = {a: json.loads((wd / f"arms/{a}/seed0/result.json").read_text()) for a in cfg.arms}
    pool = wd / "pools/oracle-seed0-round2"
    assert not (wd / "pools/control-seed0-round2").exists()  # the control draws no pool
    prov = [r["provenance"] for r in iter_records(pool, columns=["provenance"])]
    seeds = sorted(p["seed"] for p in prov)
    assert seeds == list(range(POOL_SEED + 32, POOL_SEED + 64))  # 2 per class x 16, after round 1
    assert {p["model_uri"] for p in prov} <= {
        first["oracle"][k] for k in ("checkpoint", "model_uri")
    }
    config = {
        a: yaml.safe_load((wd / f"arms/{a}/seed0-round2/config.yaml").read_text()) for a in cfg.arms
    }
    for arm in cfg.arms:
        assert config[arm]["pretrained"] == first[arm]["checkpoint"]
    ft = config["oracle"]
    assert ft["synthetic"] == str(pool)
    assert ft["rewards"] == str(wd / "oracle/oracle-seed0-round2.parquet")
    verdicts = pq.read_table(ft["rewards"]).to_pydict()
    weights = np.load(wd / "arms/oracle/seed0-round2/finetune_data.npz")["weights"]
    assert len(weights) == 32 and (weights > 0).sum() == sum(verdicts["reward"])
    assert not np.load(wd / "arms/control/seed0-round2/finetune_data.npz")["weights"].any()

    # every round judged on the same images; the headline compares round 2
    evals = ["control-seed0", "oracle-seed0", "control-seed0-round2", "oracle-seed0-round2"]
    rates = {
        lab: json.loads((wd / "eval" / lab / "eval.json").read_text())["rate"] for lab in evals
    }
    rows = {r["arm"]: r for r in res["rows"]}
    assert rows["oracle"]["rate"] == pytest.approx(rates["oracle-seed0-round2"])
    per_round = {(r["round"], r["arm"]): r for r in res["rounds"]}
    assert list(per_round) == [(1, "control"), (1, "oracle"), (2, "control"), (2, "oracle")]
    assert per_round[(1, "oracle")]["rate"] == pytest.approx(rates["oracle-seed0"])
    diff = rates["oracle-seed0-round2"] - rates["control-seed0-round2"]
    assert per_round[(2, "oracle")]["diff"] == pytest.approx(diff)
    gain = rates["oracle-seed0-round2"] - rates["oracle-seed0"]  # what round 2 added
    assert per_round[(2, "oracle")]["gain"]["diff"] == pytest.approx(gain)
    base = json.loads((wd / "eval/base/eval.json").read_text())["rate"]
    assert per_round[(1, "control")]["gain"]["diff"] == pytest.approx(rates["control-seed0"] - base)
    md = (wd / "results.md").read_text()
    assert "## Per round" in md and "](plot_rounds.png)" in md
    assert Path(res["files"]["plot_rounds"]).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def mixed_pool(phantom_shards, tmp_path) -> Path:
    """A pool of phantom cells, every other one declared as the wrong class (expert: no)."""
    from pathloop.data import ShardWriter, iter_records
    from pathloop.vocab import BONE_MARROW_16

    out = tmp_path / "pool"
    prov = {"model_uri": "test", "checkpoint_step": 0, "sampler": "ddim", "steps": 2}
    with ShardWriter(out, BONE_MARROW_16, source_note="test pool") as w:
        for i, r in enumerate(iter_records(phantom_shards, split="train")):
            cid = r["class_id"] if i % 2 == 0 else (r["class_id"] + 1) % 16
            p = {**prov, "guidance": 2.0, "seed": i}
            w.add(r["image"], cid, split="none", source="synthetic", provenance=p)
    return out


def test_each_arm_finetunes_with_its_own_weights(mixed_pool, phantom_shards, tiny_ckpt, tmp_path):
    from pathloop.experiment import Shared, arm_finetune, judge_set, write_oracle_rewards
    from pathloop.finetune import _finetune_data

    oracle = tmp_path / "oracle.parquet"
    write_oracle_rewards(mixed_pool, oracle, None)
    shared = Shared(phantom_shards, str(tiny_ckpt), None, mixed_pool, "reward-model", oracle)
    cfg = ExperimentConfig(workdir=str(tmp_path))
    verdict = dict(zip(*(judge_set(mixed_pool, None)[k] for k in ("id", "plausible")), strict=True))
    assert 0.3 < np.mean(list(verdict.values())) < 0.7  # the wrong-class half fails
    weights = {}
    for arm in ARMS:
        ft = arm_finetune(cfg, arm, 7, shared, tmp_path / arm)
        assert (ft.train.seed, ft.synthetic, ft.real) == (7, str(mixed_pool), str(phantom_shards))
        assert ft.pretrained == str(tiny_ckpt) and ft.method == "reward"
        if arm == "feedback":  # scored by the reward model inside the finetune job
            assert (ft.reward_model, ft.rewards, ft.reward_mode) == ("reward-model", None, "raw")
            continue
        (tmp_path / arm).mkdir()
        _finetune_data(ft, None, tmp_path / arm / "data.npz")
        weights[arm] = np.load(tmp_path / arm / "data.npz")["weights"]
    from pathloop.data import load_image_table

    ids = load_image_table(mixed_pool)[2]["id"]  # the order finetuning reads the pool in
    assert np.array_equal(weights["oracle"], [verdict[i] for i in ids])  # the expert's verdicts
    assert np.array_equal(weights["control"], np.zeros(len(ids)))
    assert np.array_equal(weights["self-training"], np.ones(len(ids)))
    checklist = tmp_path / "checklist.parquet"  # oracle-dpo: MAGIC's pairs from the checklist
    write_oracle_rewards(mixed_pool, checklist, None, checklist=True)
    shared = dataclasses.replace(shared, checklist=checklist)
    ft = arm_finetune(cfg, "oracle-dpo", 7, shared, tmp_path / "oracle-dpo")
    assert (ft.method, ft.rewards, ft.reward_model) == ("dpo", str(checklist), None)
    assert ft.optim.lr == pytest.approx(cfg.finetune.optim.lr * 2 / cfg.finetune.dpo_beta)
    given = cfg.model_copy(update={"dpo_lr": 1e-5})
    assert arm_finetune(given, "oracle-dpo", 7, shared, tmp_path / "d").optim.lr == 1e-5
    oracle_lr = arm_finetune(given, "oracle", 7, shared, tmp_path / "o").optim.lr
    assert oracle_lr == cfg.finetune.optim.lr != ft.optim.lr  # the other arms keep the shared rate
    (tmp_path / "oracle-dpo").mkdir()
    info = _finetune_data(ft, None, tmp_path / "oracle-dpo" / "data.npz")
    z = np.load(tmp_path / "oracle-dpo" / "data.npz")
    score = 1 - np.nanmean(judge_set(mixed_pool, None)["fails"], axis=1)  # seed order
    by_id = dict(zip(judge_set(mixed_pool, None)["id"], score, strict=True))
    s = np.array([by_id[i] for i in ids])  # the order finetuning reads the pool in
    one = z["pairs"][z["pairs"][:, 2] != z["pairs"][:, 3]]  # one winner: the higher score
    assert info["pairs_trained"] == len(one) > 0
    winner = np.where(one[:, 2] == 1, one[:, 0], one[:, 1])
    loser = np.where(one[:, 2] == 1, one[:, 1], one[:, 0])
    assert (s[winner] > s[loser]).all()
    import pyarrow.parquet as pq

    table = pq.read_table(checklist).to_pydict()  # fractions of the 7 criteria, not 0/1 verdicts
    assert np.allclose([by_id[i] for i in table["id"]], table["reward"])
    assert len(set(np.round(table["reward"], 6))) > 2
    for arm in ("feedback-nft", "oracle-nft"):  # the same rewards, the negative-aware loss
        ft = arm_finetune(cfg, arm, 7, shared, tmp_path / arm)
        assert (ft.method, ft.reward_mode, ft.train.seed) == ("nft", "class_z", 7)
        source = arm.removesuffix("-nft")
        assert (ft.reward_model, ft.rewards) == (
            ("reward-model", None) if source == "feedback" else (None, str(oracle))
        )


def test_the_pool_is_drawn_only_when_an_arm_trains_on_it(
    phantom_shards, tiny_ckpt, tmp_path, monkeypatch
):
    """Arms on real images alone (control, expert-data, feedback-data) do not need the pool: it
    is not drawn, and their finetuning configs name no synthetic set."""
    from pathloop import experiment
    from pathloop.finetune import _finetune_data
    from pathloop.pipeline import Steps

    drawn = []
    monkeypatch.setattr(experiment, "sample_set", lambda steps, title, *a: drawn.append(title))
    base = [f"workdir={tmp_path}", "data.source=shards", f"data.path={phantom_shards}"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for arms, pool in (("[control,expert-data]", None), ("[control,self-training]", "pool")):
        over = [*base, f"pretrained={tiny_ckpt}", f"arms={arms}"]
        cfg = load_config(ExperimentConfig, None, over)
        shared = experiment.shared_steps(Steps(cfg, uri, None), phantom_shards)
        assert shared.pool == (tmp_path / pool if pool else None)
        ft = experiment.arm_finetune(cfg, "control", 0, shared, tmp_path / "control")
        assert ft.synthetic == (str(tmp_path / pool) if pool else None)
    assert drawn == ["pool: sample"]  # the second set of arms only
    (tmp_path / "np").mkdir()
    no_pool = dataclasses.replace(shared, pool=None)
    ft = experiment.arm_finetune(cfg, "control", 0, no_pool, tmp_path / "np")
    info = _finetune_data(ft, None, tmp_path / "np" / "data.npz")
    z = np.load(tmp_path / "np" / "data.npz")
    assert info["synthetic_images"] == 0 and len(z["real_images"]) == info["real_images"] > 0
    assert z["images"].shape == (0, *z["real_images"].shape[1:])


def test_expert_data_keeps_the_train_images_the_expert_accepts(phantom_shards, tiny_ckpt, tmp_path):
    """expert-data: the control's training on the real train images the expert passes (half
    of them here declared as the wrong class), every other split as it was."""
    from pathloop.data import ShardWriter, iter_records, read_vocab
    from pathloop.experiment import Shared, arm_finetune, judge_set, write_expert_data

    real = tmp_path / "real"
    with ShardWriter(real, read_vocab(phantom_shards), source_note="half mislabelled") as w:
        for i, r in enumerate(iter_records(phantom_shards)):
            wrong = r["split"] == "train" and i % 2 == 1
            cid = (r["class_id"] + 1) % 16 if wrong else r["class_id"]
            w.add(r["image"], cid, r["split"], r["source"], None if wrong else r["subtype"])
    judged = judge_set(real, None, split="train")
    passed = set(judged["id"][judged["plausible"] == 1].tolist())
    assert 0.3 < len(passed) / len(judged["id"]) < 0.7
    out = tmp_path / "expert_data"
    assert write_expert_data(real, out, None) == {"kept": len(passed), "judged": len(judged["id"])}
    ids = lambda d, split: sorted(r["id"] for r in iter_records(d, split=split, columns=["id"]))  # noqa: E731
    assert ids(out, "train") == sorted(passed)
    assert ids(out, "test") == ids(real, "test") != []
    assert read_vocab(out) == read_vocab(real)
    shared = Shared(real, str(tiny_ckpt), None, tmp_path / "pool", None, None, expert_data=out)
    cfg = ExperimentConfig(workdir=str(tmp_path))
    ft = arm_finetune(cfg, "expert-data", 3, shared, tmp_path / "arm")
    assert (ft.real, ft.reward_mode, ft.method, ft.train.seed) == (str(out), "none", "reward", 3)
    assert arm_finetune(cfg, "control", 3, shared, tmp_path / "c").real == str(real)


def test_the_scenario_expert_labels_the_review_set(mixed_pool, tmp_path):
    import pyarrow.parquet as pq

    from pathloop.experiment import _judge_feedback, judge_set

    cfg = ExperimentConfig(workdir=str(tmp_path))
    export = pq.read_table(_judge_feedback(cfg, mixed_pool, tmp_path / "fb", "strict")).to_pydict()
    j = judge_set(mixed_pool, "strict")
    strict = dict(zip(j["id"], j["plausible"], strict=True))
    assert export["plausible"] == [strict[i] for i in export["id"]]
    default = judge_set(mixed_pool, None)["plausible"]
    assert np.mean(list(strict.values())) <= default.mean()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["arms=[feedback,oracle]"], "arms need control"),
        (["arms=[control,bogus]"], "arms.1: Input should be 'control'"),
        (["seeds=[1,1]"], "seeds must be distinct"),
        (["round.pool_guidance=1.0"], "round.pool_guidance=1.0 differs from"),
        (["finetune.reward_mode=ones"], "finetune.reward_mode=ones would give"),
        (["finetune.beta_r=0"], "finetune.beta_r must be > 0"),
        (["evaluation.per_class=8"], "evaluation.per_class=8 is below"),
        (["parallel_finetunes=2", "rounds=2"], "parallel_finetunes=2 works with rounds=1"),
        (["round.calibrate_real=true"], "round.calibrate_real needs round.review_from=real"),
        (["evaluation.bars={bogus: 0.1}"], "evaluation.bars.bogus.[key]: Input should be"),
    ],
)
def test_config_mistakes_are_one_line(args, needle, tmp_path, monkeypatch):
    from pathloop.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["experiment", *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_every_arm_with_a_bar_is_checked_against_each_of_the_benchmarks_bars():
    """evaluation.bars by the source of an arm's rewards: the gain over the changed classes
    (the focus) against the bar, its interval, the classes down, PRDC not below the control."""
    from pathloop.experiment_results import bar_checks, bar_rows

    def fid(diff, lo, hi):
        return {"diff": diff, "lo": lo, "hi": hi, "per_seed": [diff], "n_seeds": 3}

    def row(arm, gain, lo, down=(), precision=None, coverage=None):
        per_class = {"M2": {"diff": -0.07 if down else 0.0}, "M5": {"diff": 0.2}}
        prdc = {"prdc_precision": precision, "prdc_coverage": coverage}
        return {
            "arm": arm,
            "diff": 0.01,  # over all classes: not what a focused scenario is judged on
            "lo": -0.01,
            "focus": {"diff": gain, "lo": lo, "hi": gain + 0.05},
            "classes_down": list(down),
            "per_class": per_class,
            "fidelity_diff": prdc if precision or coverage else {},
        }

    rows = [
        {"arm": "control", "classes_down": []},
        row("feedback-nft-real", 0.10, 0.02, (), fid(0.01, 0.0, 0.02), fid(0.0, -0.01, 0.01)),
        row("oracle-nft-real", 0.149, 0.1, (), fid(0.01, 0.0, 0.02), fid(0.01, 0.0, 0.02)),
        row("feedback-data", 0.2, 0.1, ("M2",), fid(-0.01, -0.02, 0.0), fid(0.01, 0.0, 0.02)),
        row("oracle", 0.3, -0.01, (), fid(-0.01, -0.02, -0.005), fid(0.01, 0.0, 0.02)),
        row("expert-data", 0.3, 0.2),  # PRDC not run: not shown to hold
        row("self-training", 0.3, 0.2, (), fid(0.01, 0.0, 0.02), fid(0.01, 0.0, 0.02)),
        {"arm": "base", "classes_down": []},
    ]
    bars = {"feedback": 0.10, "oracle": 0.15}
    checked = {b["arm"]: b for b in bar_checks(rows, bars, 0.05)}
    assert list(checked) == ["feedback-nft-real", "oracle-nft-real", "feedback-data", "oracle"]
    assert [b["bar"] for b in checked.values()] == [0.10, 0.15, 0.10, 0.15]
    assert [b["holds"] for b in checked.values()] == [True, False, False, False]
    assert checked["oracle-nft-real"]["checks"]["gain"] is False  # +0.149 < +0.15
    fd = checked["feedback-data"]
    assert fd["down"] == {"M2": -0.07} and fd["checks"]["precision"] is False
    assert checked["oracle"]["checks"]["above_0"] is False
    assert checked["oracle"]["checks"]["precision"] is False
    assert checked["feedback-nft-real"]["over"] == "the changed classes"
    head, body = bar_rows({"bars": list(checked.values())})
    assert head[1] == "gain over the changed classes (bar)" and head[3].endswith("0.05")
    cells = {r[0]: r for r in body}
    assert cells["oracle-nft-real"][1] == "+0.149 (bar +0.15): no"
    assert cells["feedback-data"][3] == "no: M2 -0.070"
    assert cells["feedback-data"][4] == "-0.010 [-0.020, +0.000]: no, within noise"
    assert cells["oracle"][4] == "-0.010 [-0.020, -0.005]: no"
    assert [r[-1] for r in body] == ["yes", "no", "no", "no"]
    # a bar for the curated data too: PRDC not run there, so its bars are not shown to hold
    expert = bar_checks(rows, bars | {"expert-data": 0.2}, 0.05)[-1]
    assert expert["arm"] == "expert-data" and expert["checks"]["gain"]
    assert expert["precision"] is None and not expert["holds"]
    assert bar_rows({"bars": [expert]})[1][0][4] == "not run"
    assert bar_checks(rows, {}, 0.05) == [] and bar_rows({"bars": []}) is None


def test_a_failed_parallel_run_stops_the_queue_and_raises_at_once(monkeypatch):
    """parallel_finetunes=2: the first failure surfaces while the other thread still runs, and
    the runs not yet started are not started."""
    import time
    from types import SimpleNamespace

    import pathloop.experiment as E

    started = []

    def chain(steps, shared, arm, seed):
        started.append((arm, seed))
        if (arm, seed) == ("feedback", 0):
            raise RuntimeError("feedback-seed0 failed")
        time.sleep(0.5)
        return {E.model_label(arm, seed, 1): {}}

    monkeypatch.setattr(E, "run_chain", chain)
    monkeypatch.setattr(E, "_prepare_threads", lambda: None)
    cfg = ExperimentConfig(arms=("control", "feedback"), seeds=(0, 1, 2), parallel_finetunes=2)
    with pytest.raises(RuntimeError, match="feedback-seed0 failed"):
        E.run_arms(SimpleNamespace(cfg=cfg), None)
    # the pool arm first; the control's runs, queued behind, never start
    assert started[:2] == [("feedback", 0), ("feedback", 1)]
    assert not any(arm == "control" for arm, _ in started), started

    def ok(steps, shared, arm, seed):
        time.sleep(0.1 * (seed == 0))  # seed 0 ends last
        return {E.model_label(arm, seed, 1): {}}

    monkeypatch.setattr(E, "run_chain", ok)
    out = E.run_arms(SimpleNamespace(cfg=cfg), None)  # labels in arm, seed order all the same
    assert list(out) == [f"{a}-seed{s}" for a in ("control", "feedback") for s in (0, 1, 2)]


def test_evaluation_seeds_stay_clear_of_the_training_images():
    from pathloop.experiment import check_seed_ranges

    check_seed_ranges(ExperimentConfig(), 16)  # review 10000+, pool 15000+, evaluation 100000+
    cfg = load_config(ExperimentConfig, None, ["evaluation.seed=15500"])
    with pytest.raises(ValueError, match=r"the pool seeds \[15000, 16024\) overlap the evaluation"):
        check_seed_ranges(cfg, 16)


@pytest.mark.parametrize("scenario", ["artifacts", "strict-expert", "label-noise"])
def test_presets_load(scenario):
    from pathloop.experiment import check_config

    cfg = load_config(ExperimentConfig, ROOT / f"jobs/configs/experiment.{scenario}.yaml")
    check_config(cfg)
    assert cfg.data.scenario == scenario and cfg.seeds == (0, 1, 2)
    # every preset runs the benchmark's four roles, the feedback and the oracle by one method
    assert [arm_source(a)[0] for a in cfg.arms] == list(ARMS)
    assert len({arm.removeprefix(arm_source(arm)[0]) for arm in cfg.arms[1:3]}) == 1
    assert 1500 <= cfg.pretrain.train.steps <= 3000
    pool = cfg.round.pool_per_class * 16
    assert cfg.finetune.train.steps * cfg.finetune.train.batch_size / pool <= 4  # pool passes
    assert cfg.reward.lambda_r == (0 if scenario == "label-noise" else 0.3)
    # bf16 on CPUs that have it: within 30 min given the model
    assert cfg.pretrain.train.bf16_cpu and cfg.finetune.train.bf16_cpu
    assert cfg.round.sampler.bf16_cpu  # the pool, the review set and the evaluation sets
    # the expert labels real cells, and the feedback and oracle reach the real images (nft)
    assert cfg.round.review_from == "real" and cfg.arms[1:3] == (
        "feedback-nft-real",
        "oracle-nft-real",
    )


def test_real_arms_weigh_the_real_images_by_the_same_rewards(mixed_pool, tiny_ckpt, tmp_path):
    """A -real arm: the expert's verdicts on the real train images (oracle) or the reward model
    (feedback) weigh the beta_r term; the real images the expert rejects weigh 0 with Eq. 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathloop.data import ShardWriter, iter_records, read_vocab
    from pathloop.experiment import Shared, arm_finetune, judge_set, write_oracle_rewards
    from pathloop.finetune import _finetune_data

    assert arm_source("oracle-nft-real") == ("oracle", "nft") and weighs_real("feedback-real")
    assert arm_source("feedback-real") == ("feedback", None) and not weighs_real("oracle-nft")
    real = tmp_path / "real"  # train: the pool's half-mislabelled cells; test: one clean image
    with ShardWriter(real, read_vocab(mixed_pool), source_note="half mislabelled") as w:
        for i, r in enumerate(iter_records(mixed_pool)):
            w.add(r["image"], r["class_id"], "test" if i == 0 else "train", "phantom", None)
    table = tmp_path / "oracle" / "real.parquet"
    write_oracle_rewards(real, table, None, split="train")
    judged = judge_set(real, None, split="train")
    verdict = dict(zip(judged["id"], judged["plausible"], strict=True))
    shared = Shared(real, str(tiny_ckpt), None, mixed_pool, "reward-model", None, oracle_real=table)
    cfg = ExperimentConfig(workdir=str(tmp_path))
    ft = arm_finetune(cfg, "oracle-real", 5, shared, tmp_path / "o")
    assert (ft.weigh_real, ft.real_rewards, ft.method) == (True, str(table), "reward")
    nft = arm_finetune(cfg, "feedback-nft-real", 5, shared, tmp_path / "f")
    assert (nft.weigh_real, nft.real_rewards, nft.reward_model) == (True, None, "reward-model")
    assert nft.method == "nft" and not arm_finetune(cfg, "feedback", 5, shared, tmp_path).weigh_real
    data = arm_finetune(cfg, "feedback-data", 5, shared, tmp_path / "d")  # no pool, scored reals
    assert (data.weigh_real, data.reward_model, data.reward_mode) == (True, "reward-model", "none")
    assert (data.real, data.method, data.real_rewards) == (str(real), "reward", None)
    assert data.real_labels is None and nft.real_labels is None
    cal = cfg.model_copy(update={"round": cfg.round.model_copy(update={"calibrate_real": True})})
    export = str(tmp_path / "feedback" / "feedback.parquet")  # the review's labels
    for arm in ("feedback-nft-real", "feedback-data", "oracle-nft-real", "feedback"):
        got = arm_finetune(cal, arm, 5, shared, tmp_path / "c").real_labels
        assert got == (export if arm.startswith("feedback-") else None), arm
    ft = ft.model_copy(update={"rewards": None, "reward_mode": "none"})  # the real term alone
    (tmp_path / "o").mkdir()
    info = _finetune_data(ft, None, tmp_path / "o" / "data.npz")
    z = np.load(tmp_path / "o" / "data.npz")
    ids = [r["id"] for r in iter_records(real, split="train", columns=["id"])]
    ok = np.array([verdict[i] for i in ids])  # the order the beta_r term reads the images in
    assert 0.3 < ok.mean() < 0.7 and info["real_mean_score"] == pytest.approx(ok.mean())
    assert (z["real_weights"][ok == 0] == 0).all() and (z["real_weights"][ok == 1] > 1).all()
    for c in np.unique(z["real_class_ids"]):  # class_norm: every class keeps its weight
        assert z["real_weights"][z["real_class_ids"] == c].mean() == pytest.approx(1.0)
    pq.write_table(pa.table({"id": ids, "reward": [0.0] * len(ids)}), tmp_path / "zeros.parquet")
    zeros = ft.model_copy(update={"real_rewards": str(tmp_path / "zeros.parquet")})
    with pytest.raises(ValueError, match="every real image weighs 0"):
        _finetune_data(zeros, None, tmp_path / "o" / "zeros.npz")
    # feedback-data weighs its pool 0: the reward model scores the real images only (here
    # they come from the table, so a pool scored by the path-only model would raise)
    (tmp_path / "d").mkdir()
    info = _finetune_data(
        data.model_copy(update={"real_rewards": str(table)}), None, tmp_path / "d" / "data.npz"
    )
    assert info["mean_score"] is None and not (tmp_path / "d" / "rewards.npz").exists()
    assert (np.load(tmp_path / "d" / "data.npz")["weights"] == 0).all()


def test_a_real_review_set_is_drawn_per_class_and_labelled_by_the_expert(phantom_shards, tmp_path):
    """round.review_from=real: the expert labels real train images, review_per_class of each
    class (seeded), and the export the reward model trains on holds their verdicts."""
    import pyarrow.parquet as pq

    from pathloop.data import iter_records
    from pathloop.experiment import _judge_feedback
    from pathloop.judged import judge_set, write_real_review

    out = tmp_path / "review"
    assert write_real_review(phantom_shards, out, 3, seed=5) == {"images": 48}
    rows = list(iter_records(out, columns=["id", "class_id", "split"]))
    train = {r["id"] for r in iter_records(phantom_shards, split="train", columns=["id"])}
    assert {r["split"] for r in rows} == {"train"} and {r["id"] for r in rows} <= train
    assert np.bincount([r["class_id"] for r in rows]).tolist() == [3] * 16
    again = tmp_path / "again"
    write_real_review(phantom_shards, again, 3, seed=5)
    assert [r["id"] for r in iter_records(again, columns=["id"])] == [r["id"] for r in rows]
    cfg = ExperimentConfig(workdir=str(tmp_path), round={"review_from": "real"})
    export = pq.read_table(_judge_feedback(cfg, out, tmp_path / "fb", None)).to_pydict()
    j = judge_set(out, None)
    verdict = dict(zip(j["id"], j["plausible"], strict=True))
    assert sorted(export["id"]) == sorted(verdict)
    assert export["plausible"] == [verdict[i] for i in export["id"]]
