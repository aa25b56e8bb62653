"""``pathloop loop``: the whole method in one command, for R feedback rounds.

data → pretrain → [sample a review round → feedback (judge | MLLM | human) → reward model →
finetuning (``finetune.method``: reward-weighted, Eq. 3; negative-aware; or preference pairs from
the checklist scores) → evaluate against the previous model] × R → report.

Every step is one library call whose stored output (a manifest, a ``result.json``, an export)
marks it done, so a killed loop resumes where it stopped: finished steps are skipped and a
training step that left checkpoints continues from its newest one (``resume``). All step runs
are MLflow children of one parent ``loop`` run in one tracking store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from rich.console import Console

from pathloop.config import Frozen, SamplerConfig, TrackingConfig, updated
from pathloop.evaluate import EvaluateConfig
from pathloop.finetune import FinetuneConfig
from pathloop.pretrain import PretrainConfig
from pathloop.reward import RewardConfig

console = Console()


class LoopDataConfig(Frozen):
    """Where the "real" training images come from."""

    source: Literal["phantoms", "folder", "shards"] = Field(
        "phantoms", description="phantoms (generated), folder (ingest images), shards (ready)."
    )
    path: str | None = Field(None, description="Image folder (folder) or shard set (shards).")
    labels: str | None = Field(None, description="folder: labels CSV (default <path>/LABELS.csv).")
    per_class: int = Field(96, gt=0, description="phantoms: training images per class.")
    test_per_class: int = Field(24, ge=0, description="phantoms: test images per class.")
    size: int = Field(32, gt=0, description="Image side in px (phantoms and folder ingest).")
    seed: int = Field(0, description="phantoms: generator seed.")
    label_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "phantoms: fraction of training labels redrawn as another class (annotation "
            "errors that the real-image term keeps teaching; test labels stay clean). The "
            "older spelling of scenario=label-noise."
        ),
    )
    scenario: Literal["artifacts", "strict-expert", "label-noise"] | None = Field(
        None,
        description="phantoms: what the expert knows that the data do not (scenarios.SCENARIOS): "
        "artifacts on scenario_fraction of the training cells, a strict judge profile named in "
        "the manifest, or wrong labels on scenario_fraction of them; None = clean data.",
    )
    scenario_fraction: float = Field(
        0.3, ge=0, lt=1, description="phantoms: the scenario's fraction of training cells."
    )


class RoundConfig(Frozen):
    """What each feedback round samples."""

    review_per_class: int = Field(16, gt=0, description="Images per class sent for feedback.")
    pool_per_class: int = Field(
        0,
        ge=0,
        description="Extra images per class that the reward model scores for finetuning "
        "(the paper's reward model generalises the feedback); 0 = finetune on the reviewed set.",
    )
    sampler: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(steps=25), description="Sampling of every round."
    )
    pool_guidance: float | None = Field(
        None,
        ge=0,
        description="CFG scale of the finetuning pool; None = the sampler's. 1.0 draws the "
        "model's own class-conditional distribution, which Eq. 3 reweights; a pool drawn with "
        "guidance and sampled with guidance again after finetuning compounds it (saturated, "
        "less varied images).",
    )
    num_actors: int = Field(1, ge=1, description="Ray Data sampling actors (one model each).")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per sampling actor; None = its reserved CPU (1)."
    )
    use_gpu: bool = Field(False, description="One GPU per sampling actor.")


class FeedbackSourceConfig(Frozen):
    """Who labels the review rounds."""

    source: Literal["judge", "mllm", "human"] = Field(
        "judge", description="judge (phantoms), mllm (OpenAI-compatible checklist), human (UI)."
    )
    store: str | None = Field(None, description="Feedback store URL; None = <workdir>/feedback.db.")
    mllm_model: str | None = Field(None, description="mllm: model name at the endpoint.")
    mllm_base_url: str | None = Field(
        None, description="mllm: endpoint; None = $PATHLOOP_MLLM_BASE_URL."
    )
    min_raters: int = Field(1, ge=1, description="Labels an image needs before it is exported.")
    poll_s: float = Field(15.0, gt=0, description="human: seconds between checks of the round.")
    timeout_s: float | None = Field(
        None, description="human: give up after this long; None = wait."
    )


class LoopConfig(Frozen):
    """One command from data to an aligned, evaluated model. Step sections are the step jobs'
    own configs; the loop sets their paths, inputs and MLflow parent."""

    workdir: str = Field("runs/loop", description="Every step's outputs live under here.")
    name: str = Field("loop", description="Parent MLflow run name.")
    rounds: int = Field(1, ge=1, le=20, description="Feedback rounds R.")
    data: LoopDataConfig = Field(default_factory=LoopDataConfig)
    pretrained: str | None = Field(
        None,
        description="Start from this model instead of pretraining: a checkpoint dir, a training "
        "job's result.json, or a models:/ URI in the loop's MLflow store.",
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    round: RoundConfig = Field(default_factory=RoundConfig)
    feedback: FeedbackSourceConfig = Field(default_factory=FeedbackSourceConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="loop"))


# ----------------------------------------------------------------------------- step plumbing

PRETRAIN_STEP = "pretrain the diffusion model"  # its title, the key of its seconds in timings


class Steps:
    """Runs a step unless its output exists; every step a child of the parent MLflow run."""

    def __init__(self, cfg: LoopConfig, uri: str, parent: str) -> None:
        self.cfg, self.uri, self.parent = cfg, uri, parent
        self.timings: dict[str, float] = {}

    def tracking(self, sub: TrackingConfig, run_name: str) -> TrackingConfig:
        """A step's tracking settings: the loop's store, experiment and parent run."""
        return updated(
            sub,
            tracking_uri=self.uri,
            experiment=self.cfg.tracking.experiment,
            parent_run_id=self.parent,
            run_name=run_name,
        )

    def run(self, title: str, done: Path, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless ``done`` exists; True when it ran."""
        if done.exists():
            console.rule(f"[dim]{title}: done ({done})")
            return False
        console.rule(f"[bold]{title}")
        t0 = time.perf_counter()
        fn()
        self.timings[title] = round(time.perf_counter() - t0, 1)
        return True


def training_config(sub: Any, workdir: Path, **update: Any) -> Any:
    """A training step's config at ``workdir``, resuming when a killed run left checkpoints."""
    return updated(sub, workdir=str(workdir), resume=(workdir / "ray").exists(), **update)


def read_result(workdir: Path) -> dict:
    return json.loads((workdir / "result.json").read_text())


# ----------------------------------------------------------------------------- steps


def make_data(cfg: LoopConfig, wd: Path) -> Path:
    """Phantoms, an ingested image folder, or a ready shard set; returns the shard directory."""
    d = cfg.data
    if d.label_noise and d.source != "phantoms":
        raise ValueError(
            f"data.label_noise applies to generated phantoms, not data.source={d.source}; "
            "set data.source=phantoms or data.label_noise=0"
        )
    if d.scenario and d.source != "phantoms":
        raise ValueError(
            f"data.scenario applies to generated phantoms, not data.source={d.source}; "
            "set data.source=phantoms or data.scenario=null"
        )
    if d.source == "shards":
        if not d.path:
            raise ValueError("data.source=shards needs data.path=<shard set>")
        return Path(d.path)
    out = wd / "data"
    if (out / "manifest.json").exists():
        return out
    if d.source == "phantoms":
        from pathloop.scenarios import write_phantoms

        write_phantoms(
            out,
            per_class=d.per_class,
            test_per_class=d.test_per_class,
            size=d.size,
            seed=d.seed,
            label_noise=d.label_noise,
            scenario=d.scenario,
            scenario_fraction=d.scenario_fraction,
        )
        return out
    if not d.path:
        raise ValueError("data.source=folder needs data.path=<image folder>")
    from pathloop.ingest import ingest

    labels = Path(d.labels) if d.labels else Path(d.path) / "LABELS.csv"
    rep = ingest(d.path, out, labels=labels, size=d.size)
    console.print(f"ingested {rep.num_ingested} images, quarantined {rep.num_quarantined}")
    return out


def collect_feedback(
    cfg: LoopConfig, samples: Path, export_dir: Path, round_name: str, **judge: Any
) -> Path:
    """Create (or reopen) the round in the store, label it with the chosen source, export it.
    ``judge``: options of the judge evaluator (e.g. an expert profile)."""
    from pathloop.experts import evaluate_round
    from pathloop.feedback import FeedbackStore

    fb = cfg.feedback
    store = FeedbackStore(fb.store or Path(cfg.workdir).resolve() / "feedback.db")
    with store:
        existing = [r.id for r in store.rounds() if r.name == round_name]
        rid = existing[0] if existing else store.create_round(samples, name=round_name)
        if fb.source == "judge":
            evaluate_round(store, rid, "judge", **judge)
        elif fb.source == "mllm":
            if not fb.mllm_model:
                raise ValueError("feedback.source=mllm needs feedback.mllm_model=<model name>")
            opts = {"model": fb.mllm_model}
            if fb.mllm_base_url:
                opts["base_url"] = fb.mllm_base_url
            evaluate_round(store, rid, "mllm", **opts)
        else:
            wait_for_labels(store, rid, fb)
        return store.export_round(rid, export_dir, min_raters=fb.min_raters)


def judge_options(expert: str | None) -> dict[str, str]:
    """Options of the judge evaluator for an expert profile (None: the default expert)."""
    return {"expert": expert} if expert else {}


def scenario_expert(shards: str | Path) -> str | None:
    """The expert profile the shard set's scenario names (``manifest["scenario"]["expert"]``)."""
    from pathloop.data import read_manifest

    return (read_manifest(shards).get("scenario") or {}).get("expert")


def wait_for_labels(store: Any, rid: int, fb: FeedbackSourceConfig) -> None:
    """Block until every image of round ``rid`` has ``min_raters`` labels (the review UI)."""
    t0 = time.monotonic()
    n = len(store.images(rid))
    console.print(
        f"waiting for {n} images of round {rid} to be labelled in the review UI "
        "(`pathloop serve`, then open /review); the loop continues when they are"
    )
    while True:
        classes = store.round_stats(rid)["classes"].values()
        done = sum(c["n_labelled"] for c in classes)
        if done >= n:
            return
        if fb.timeout_s is not None and time.monotonic() - t0 > fb.timeout_s:
            raise TimeoutError(
                f"round {rid}: {done}/{n} images labelled after {fb.timeout_s:.0f} s; "
                "rerun the loop to keep waiting (finished steps are skipped)"
            )
        time.sleep(fb.poll_s)


def sample_set(
    steps: Steps,
    title: str,
    model: str,
    out: Path,
    per_class: int,
    seed: int,
    guidance: float | None = None,
    sampler_steps: int | None = None,
) -> None:
    """``run_sample`` of ``per_class`` images per class from ``model`` into ``out`` (with the
    round's sampler, at ``guidance`` and ``sampler_steps`` when given)."""
    from pathloop.sampling import SampleConfig, run_sample

    update = {"seed": seed} | ({"guidance": guidance} if guidance is not None else {})
    update |= {"steps": sampler_steps} if sampler_steps is not None else {}
    sampler = updated(steps.cfg.round.sampler, **update)
    steps.run(
        title,
        out / "manifest.json",
        lambda: run_sample(
            SampleConfig(
                model=model,
                out=str(out),
                per_class=per_class,
                sampler=sampler,
                num_actors=steps.cfg.round.num_actors,
                torch_threads=steps.cfg.round.torch_threads,
                use_gpu=steps.cfg.round.use_gpu,
            )
        ),
    )


def reward_step(
    steps: Steps, title: str, reward_wd: Path, export: Path, shards: Path, run_name: str
) -> dict[str, Any]:
    """The reward model (Eq. 2) on a feedback export and the real shards; its result."""
    from pathloop.reward import run_reward

    steps.run(
        f"{title}reward model (Eq. 2)",
        reward_wd / "result.json",
        lambda: run_reward(
            training_config(
                steps.cfg.reward,
                reward_wd,
                feedback=str(export / "feedback.parquet"),
                real_shards=str(shards),
                tracking=steps.tracking(steps.cfg.reward.tracking, run_name),
            )
        ),
    )
    return read_result(reward_wd)


def run_round(steps: Steps, r: int, shards: Path, model: str) -> dict[str, Any]:
    """One feedback round from ``model``; returns the finetuned model's result and evaluation."""
    from pathloop.evaluate import evaluate_models
    from pathloop.finetune import run_finetune

    cfg, wd = steps.cfg, Path(steps.cfg.workdir) / f"round{r}"
    seed = 10_000 * r  # each round reviews new images
    review = wd / "review"
    sample_set(
        steps, f"round {r}: sample the review set", model, review, cfg.round.review_per_class, seed
    )
    export = wd / "feedback"
    steps.run(
        f"round {r}: feedback ({cfg.feedback.source})",
        export / "feedback.parquet",
        lambda: collect_feedback(
            cfg, review, export, f"loop-round{r}", **judge_options(scenario_expert(shards))
        ),
    )
    reward_wd = wd / "reward"
    reward = reward_step(steps, f"round {r}: ", reward_wd, export, shards, f"round{r}-reward")
    pool = None
    if cfg.round.pool_per_class and cfg.finetune.method == "dpo":
        console.print("round.pool_per_class is unused: method=dpo pairs the reviewed images")
    elif cfg.round.pool_per_class:
        pool = wd / "pool"
        sample_set(
            steps,
            f"round {r}: sample the finetuning pool",
            model,
            pool,
            cfg.round.pool_per_class,
            seed + 5000,
            cfg.round.pool_guidance,
        )
    ft_wd = wd / "finetune"
    ft = round_finetune(steps, r, model, shards, export, pool, reward["checkpoint"])
    steps.run(
        f"round {r}: finetune ({METHOD_TITLES[ft.method]})",
        ft_wd / "result.json",
        lambda: run_finetune(ft),
    )
    finetuned = read_result(ft_wd)
    ev_wd = wd / "evaluate"
    # One evaluation classifier for all rounds (trained in round 1), so rounds are comparable;
    # later rounds also show the pretrained model. Earlier models enter through the samples
    # their evaluations drew (same seeds and sampler), so nothing is sampled twice.
    features = cfg.evaluate.features
    baselines, names = (model,), ()
    if r > 1:
        first, last = (read_result(wd.parent / f"round{k}/evaluate") for k in (1, r - 1))
        if not features.path:
            features = updated(features, path=str(wd.parent / "round1/evaluate/features"))
        baselines = (first["samples"]["baseline"], last["samples"]["model"])
        names = ("pretrained", f"round{r - 1}")
    steps.run(
        f"round {r}: evaluate (before vs after)",
        ev_wd / "result.json",
        lambda: evaluate_models(
            updated(
                cfg.evaluate,
                workdir=str(ev_wd),
                real=str(shards),
                model=finetuned["checkpoint"],
                baselines=baselines,
                baseline_labels=names,
                features=features,
                tracking=steps.tracking(cfg.evaluate.tracking, f"round{r}-evaluate"),
            )
        ),
    )
    return {"reward": reward, "finetune": finetuned, "evaluate": read_result(ev_wd)}


METHOD_TITLES = {"reward": "Eq. 3", "nft": "negative-aware", "dpo": "preference pairs"}


def round_finetune(
    steps: Steps,
    r: int,
    model: str,
    shards: Path,
    export: Path,
    pool: Path | None,
    reward_model: str,
) -> FinetuneConfig:
    """Round ``r``'s finetune job, by ``finetune.method``: reward (Eq. 3) and nft weigh the pool
    (or, without one, the reviewed images) by the round's reward model; dpo pairs the reviewed
    images of each class by their checklist scores (the export's fail_* columns: the judge's,
    the MLLM's or the raters' failed criteria) and needs no reward model."""
    return training_config(
        steps.cfg.finetune,
        Path(steps.cfg.workdir) / f"round{r}" / "finetune",
        pretrained=model,
        real=str(shards),
        feedback_round=f"loop-round{r}",
        tracking=steps.tracking(steps.cfg.finetune.tracking, f"round{r}-finetune"),
        **finetune_inputs(steps.cfg.finetune.method, export, pool, reward_model),
    )


def finetune_inputs(
    method: str, export: Path, pool: Path | None, reward_model: str
) -> dict[str, str | None]:
    """The synthetic images of a round's finetune job and what scores them (``round_finetune``)."""
    feedback = str(export / "feedback.parquet")
    if method == "dpo":
        return {"synthetic": feedback, "reward_model": None}
    return {"synthetic": str(pool or feedback), "reward_model": reward_model}


def given_model(ref: str, uri: str) -> dict[str, str]:
    """``pretrained=`` of the loop as a local checkpoint: {checkpoint, model_uri}; an MLflow URI
    resolves in the loop's store ``uri``."""
    from pathloop.tracking import resolve_model_ref

    local, shown = resolve_model_ref(ref, tracking_uri=uri)
    console.print(f"pretraining skipped: starting from {shown}")
    return {"checkpoint": str(local), "model_uri": shown}


def pretrained_model(steps: Steps, shards: Path) -> dict[str, Any]:
    """The model every round (or arm) starts from: ``pretrained`` when given, else the pretrain
    step on ``shards`` into <workdir>/pretrain, run once. Its ``result.json``-style dict."""
    from pathloop.pretrain import run_pretrain

    cfg = steps.cfg
    if cfg.pretrained:
        return given_model(cfg.pretrained, steps.uri)
    pre_wd = Path(cfg.workdir) / "pretrain"
    steps.run(
        PRETRAIN_STEP,
        pre_wd / "result.json",
        lambda: run_pretrain(
            training_config(
                cfg.pretrain,
                pre_wd,
                data={"shards": str(shards)},
                tracking=steps.tracking(cfg.pretrain.tracking, "pretrain"),
            )
        ),
    )
    return read_result(pre_wd)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------- the loop


def parent_run(cfg: LoopConfig, wd: Path, step: str = "loop") -> tuple[str, str]:
    """(tracking URI, parent run id): reopened from ``<step>.json`` when resuming."""
    from pathloop import tracking

    state = wd / f"{step}.json"
    uri = tracking.resolve_uri(cfg.tracking, wd)
    if state.exists():
        return uri, json.loads(state.read_text())["run_id"]
    run_id = tracking.start_run(
        cfg.tracking,
        wd,
        params=cfg.model_dump(mode="json"),
        tags={"pathloop.step": step},
        run_name=cfg.name,
    )
    write_json(state, {"run_id": run_id, "tracking_uri": uri})
    return uri, run_id


def run_loop(cfg: LoopConfig) -> dict[str, Any]:
    """Data → pretrain → R rounds of feedback, reward, finetuning and evaluation."""
    from pathloop import storage, tracking
    from pathloop.config import dump_config
    from pathloop.finetune import check_reward_source

    wd = Path(storage.absolute(cfg.workdir))
    cfg = updated(cfg, workdir=str(wd))
    # A finetune config the rounds cannot run fails now, not after pretraining and feedback.
    ft_inputs = finetune_inputs(cfg.finetune.method, wd, None, "<the round's reward model>")
    check_reward_source(updated(cfg.finetune, real="<the loop's shards>", **ft_inputs))
    wd.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, wd / "config.yaml")
    uri, parent = parent_run(cfg, wd)
    steps = Steps(cfg, uri, parent)
    shards = Path(storage.absolute(make_data(cfg, wd)))

    pretrained = pretrained_model(steps, shards)
    model = pretrained["checkpoint"]
    rounds = []
    for r in range(1, cfg.rounds + 1):
        rounds.append(run_round(steps, r, shards, model))
        log_round(uri, parent, r, rounds[-1])
        model = rounds[-1]["finetune"]["checkpoint"]
    summary = {
        "workdir": str(wd),
        "tracking_uri": uri,
        "parent_run_id": parent,
        "pretrained": pretrained,
        "rounds": rounds,
        "step_seconds": steps.timings,
    }
    write_json(wd / "summary.json", summary)
    tracking.end_run(uri, parent)
    return summary


def log_round(uri: str, parent: str, r: int, rnd: dict[str, Any]) -> dict[str, float]:
    """The round's headline metrics (``evaluate.headline_metrics``: plausibility per evaluator,
    FID, PRDC, TSTR) on the parent run at step ``r``, under the names the evaluate child uses,
    and in the description of the finetuned model's registered version."""
    from pathloop import tracking
    from pathloop.evaluate import headline_metrics

    metrics = headline_metrics(rnd["evaluate"])
    tracking.log_metrics(uri, parent, metrics, step=r)
    model_uri = rnd["finetune"].get("model_uri") or ""
    if model_uri.startswith("models:/"):
        source = f"Evaluated in round {r} of the loop (run {rnd['evaluate']['run_id']})"
        tracking.describe_model_version(uri, model_uri, metrics, source)
    return metrics


def print_summary(summary: dict[str, Any]) -> None:
    """Before/after tables of every round, where the report and MLflow store are, what next."""
    from pathloop import report

    for r, rnd in enumerate(summary["rounds"], start=1):
        ev = rnd["evaluate"]
        console.rule(f"[bold]round {r}: baseline (before) vs model (after)")
        report.print_tables(report.metric_tables(ev))
        console.print("\n  ".join(report.verdict(ev)))
        console.print(reward_line(rnd["reward"]))
        console.print(f"report: [bold]{ev['report']}[/]")
    last = summary["rounds"][-1]["finetune"] if summary["rounds"] else summary["pretrained"]
    uri = summary["tracking_uri"]
    console.print(
        f"\nMLflow store: {uri} (parent run {summary['parent_run_id']})\n"
        f"  open it:   mlflow ui --backend-store-uri {uri}\n"
        f"final model: {last['checkpoint']}"
        + (f"  ({last['model_uri']})" if last.get("model_uri") else "")
        + f"\n  serve it:  {serve_command(summary, last['checkpoint'])}\n"
        f"step times (s): {summary['step_seconds']}"
    )


def reward_line(reward: dict[str, Any]) -> str:
    """One line on the round's reward model against the held-out feedback."""
    held = reward.get("arithmetic", {}).get("held_out")
    if held is None or "auc" not in reward:
        return "reward model: no held-out feedback"
    ci = f" [{reward['auc_lo']:.2f}, {reward['auc_hi']:.2f}]" if "auc_lo" in reward else ""
    return (
        f"reward model: held-out AUC {reward['auc']:.3f}{ci} on {held} judged images, "
        f"accuracy {reward['accuracy']:.3f}, calibration error {reward['ece']:.3f}"
    )


def serve_command(summary: dict[str, Any], checkpoint: str) -> str:
    """``pathloop serve`` for the loop's final model, with its feedback store and the last
    round's review set, so the printed line starts as pasted."""
    wd, rounds = Path(summary["workdir"]), len(summary["rounds"])
    line = f"pathloop serve --config serve/config.yaml model={checkpoint}"
    if rounds:
        review = wd / f"round{rounds}" / "review"
        line += f" feedback_url={wd / 'feedback.db'} review_samples_dir={review}"
    if reward := _last_reward(summary):
        line += f" reward_model={reward}"
    return line


def _last_reward(summary: dict[str, Any]) -> str | None:
    return summary["rounds"][-1]["reward"]["checkpoint"] if summary["rounds"] else None
