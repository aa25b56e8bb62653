"""Ray Tune sweeps over dotted job-config keys, and the feedback-amount ablation (Figure 4a).

A trial is a function Tune runs in its own actor. It builds its job config the way the CLI does,
``load_config(JobConfig, yaml, overrides)`` with the searched values as ``key=value`` overrides,
and runs the job (``run_pretrain`` / ``run_reward`` / ``run_finetune``: a Ray Train run each) in
*segments*: runs of one work dir, each resuming to a larger step count. After every segment the
trial measures the model (the hooks in ``MEASURES``) and calls ``tune.report``, so ASHA can stop a
poor trial at a rung. Segments rather than Train's own reports because the metric that matters
for finetuning (the judge's plausibility of new samples) is measured outside the training loop.

Every trial's job runs log to the sweep's one MLflow store, tagged with the sweep id (the sweep's
own MLflow run id, which is also their parent run) and the Tune trial id. The best configuration is
written back as a full job config (``best.yaml``) that ``pathloop finetune --config`` accepts.

Step ``evaluate`` sweeps sampling settings of one fixed model (guidance scale, interval, guide):
each trial runs the evaluation job once (no training, one segment) and reports its model row:
precision, recall, density, coverage, FID, TSTR and plausibility. The evaluation classifier is
trained once by the driver and shared by every trial.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pathloop.config import Frozen, SamplerConfig, TrackingConfig, updated
from pathloop.jobs import Step, get_step

REWARD_PREFIX = "reward."  # step reward_finetune: keys of the reward-model job


class Param(Frozen):
    """One searched key: exactly one of grid, choice, uniform, loguniform."""

    grid: list[Any] | None = Field(None, description="Every value, each in its own trial.")
    choice: list[Any] | None = Field(None, description="Values drawn at random per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high) drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high) drawn uniformly in log space; low > 0."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Param:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"a search dimension needs exactly one of grid, choice, uniform, loguniform "
                f"(non-empty); got {given or 'none'}"
            )
        bounds = self.uniform or self.loguniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"bounds must be [low, high] with low < high, got {list(bounds)}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    def to_tune(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        if self.grid:
            return tune.grid_search(self.grid)
        if self.choice:
            return tune.choice(self.choice)
        if self.uniform:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def values(self) -> list[Any]:
        """The listed values, or the bounds: what is checked against the job config up front."""
        return list(self.grid or self.choice or self.uniform or self.loguniform)

    def first(self) -> Any:
        return self.values()[0]


class SchedulerConfig(Frozen):
    """Early stopping between segments."""

    kind: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop poor trials at rungs; fifo: run every trial to the end."
    )
    grace_period: int = Field(1, ge=1, description="Segments every trial runs before a stop.")
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA keeps about 1/reduction_factor of trials at each rung."
    )


class FidelityMeasure(Frozen):
    """The fidelity measure: FID and PRDC of the measured samples against real images, on the
    features of an evaluation classifier (``pathloop.metrics``; never the reward backbone)."""

    real: str | None = Field(
        None, description="Real shard set; None = the swept job's (real, or data.shards)."
    )
    split: str = Field("train", description="Real split the samples are compared to.")
    features: str | None = Field(
        None,
        description="Evaluation feature-model dir; None = train one into <workdir>/features, "
        "once per sweep.",
    )
    feature_steps: int = Field(300, gt=0, description="When features is None: training steps.")
    k: int = Field(5, gt=0, description="PRDC nearest neighbours (Naeem et al.: 5).")


class SweepConfig(Frozen):
    """A Ray Tune search over dotted keys of one job config (or of reward model + finetuning)."""

    workdir: str = Field("runs/sweep", description="Trials, Tune state, best.yaml, trials.csv.")
    name: str = Field("sweep", description="Tune experiment and MLflow run name.")
    step: Literal["pretrain", "reward", "finetune", "reward_finetune", "evaluate"] = Field(
        "finetune",
        description="The job each trial runs; reward_finetune: a reward model (Eq. 2), then "
        "finetuning with it (Eq. 3), its reward-job keys written reward.<key>; evaluate: the "
        "evaluation job once per trial (sampling settings of one model, e.g. sampler.guidance).",
    )
    config: str | None = Field(
        None,
        description="YAML of the swept job (reward_finetune: the finetune job); None = defaults.",
    )
    overrides: list[str] = Field(
        default_factory=list, description="key=value overrides of that job, before the search."
    )
    reward_config: str | None = Field(None, description="reward_finetune: the reward job YAML.")
    reward_overrides: list[str] = Field(
        default_factory=list, description="reward_finetune: overrides of the reward job."
    )
    space: dict[str, Param] = Field(
        default_factory=dict,
        description="Searched dotted keys, e.g. beta_r: {grid: [0, 1]}, optim.lr: "
        "{loguniform: [1e-5, 1e-3]}, reward.lambda_r: {choice: [0, 1]}.",
    )
    metric: str = Field("plausibility", description="Reported metric the search optimises.")
    mode: Literal["min", "max"] = Field("max", description="Minimise or maximise the metric.")
    measures: list[str] | None = Field(
        None,
        description="Metric hooks run after each segment (see MEASURES); None = train for "
        "step reward, judge + train otherwise. judge and fidelity share one sample set.",
    )
    num_samples: int = Field(
        1, ge=1, description="Random draws; with grid keys, repeats of the whole grid."
    )
    max_concurrent: int = Field(1, ge=1, description="Trials running at once.")
    trial_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.25},
        description="Resources of the trial function itself (it samples for the judge while "
        "its Train workers are idle); the Train workers reserve the job's scaling on top.",
    )
    segments: int = Field(2, ge=1, description="Train runs per trial; metrics after each.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    per_class: int = Field(4, ge=1, description="judge/fidelity: samples per class measured.")
    sampler: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(steps=25), description="judge/fidelity: sampler."
    )
    fidelity: FidelityMeasure = Field(default_factory=FidelityMeasure)
    seed: int = Field(0, description="Seed of the random search.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="The one store every trial logs to (register_as is ignored).",
    )

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.step != "reward_finetune":
            bad = [k for k in self.space if k.startswith(REWARD_PREFIX)]
            if bad or self.reward_config or self.reward_overrides:
                raise ValueError(
                    f"reward.* keys {bad} and reward_config/reward_overrides need "
                    "step=reward_finetune"
                )
        unknown = sorted(set(self.measure_names) - set(MEASURES))
        if unknown:
            raise ValueError(f"unknown measures {unknown}; valid measures: {', '.join(MEASURES)}")
        if self.step == "reward" and set(self.measure_names) - {"train"}:
            raise ValueError("step reward trains no diffusion model: use measures: [train]")
        if (self.step == "evaluate") != (self.measure_names == ["evaluate"]):
            raise ValueError("step evaluate measures with [evaluate], and only it does")
        if self.step == "evaluate" and self.segments != 1:
            raise ValueError("step evaluate trains nothing: segments must be 1")
        return self

    @property
    def measure_names(self) -> list[str]:
        if self.measures is not None:
            return self.measures
        if self.step == "evaluate":
            return ["evaluate"]
        return ["train"] if self.step == "reward" else ["judge", "train"]


# ----------------------------------------------------------------------------- jobs


def jobs() -> dict[str, Step]:
    """The steps a trial can run: the registered steps that train in segments, and evaluate."""
    return {name: get_step(name) for name in ("pretrain", "reward", "finetune", "evaluate")}


def _job(cfg: SweepConfig) -> Step:
    return jobs()["finetune" if cfg.step == "reward_finetune" else cfg.step]


def as_override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that ``config.parse_value`` reads it back."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000)
    return f"{key}={text.removesuffix(chr(10)).removesuffix('...').strip()}"


def split_params(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Searched values as overrides: (reward job's, swept job's)."""
    reward = [
        as_override(k[len(REWARD_PREFIX) :], v)
        for k, v in params.items()
        if k.startswith(REWARD_PREFIX)
    ]
    job = [as_override(k, v) for k, v in params.items() if not k.startswith(REWARD_PREFIX)]
    return reward, job


def _imposed(cfg: SweepConfig, shared: dict, workdir: Path, name: str) -> list[str]:
    """What the sweep decides for every job run: its own dir, the sweep's store and experiment,
    a child run of the sweep's run, no registry."""
    return [
        f"workdir={workdir}",
        f"name={name}",
        f"tracking.tracking_uri={shared['uri']}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"tracking.run_name={name}",
        f"tracking.parent_run_id={shared['sweep_id']}",
        "tracking.register_as=null",
    ]


def segment_plan(total: int, segments: int) -> list[int]:
    """Step counts the segments end at: about equal parts of ``total``, the last one ``total``."""
    if total == 0:
        return [0]  # a job that trains nothing: one run
    size = math.ceil(total / segments)
    return sorted({min(i * size, total) for i in range(1, segments + 1)})


def build_configs(
    cfg: SweepConfig,
    params: dict[str, Any],
    reward_extra: Sequence[str] = (),
    job_extra: Sequence[str] = (),
) -> tuple[Any, Any]:
    """(reward job config or None, swept job config) for searched ``params``, through
    ``load_config``: base YAML < base overrides < searched values < ``*_extra``. In
    reward_finetune the finetune job uses that reward model and records its fraction."""
    from pathloop.config import load_config

    reward, job = split_params(params)
    rcfg = None
    if cfg.step == "reward_finetune":
        rcfg = load_config(
            jobs()["reward"].config_cls,
            cfg.reward_config,
            [*cfg.reward_overrides, *reward, *reward_extra],
        )
        job.append(f"reward_model={Path(rcfg.workdir) / 'result.json'}")
        if "feedback_fraction" not in params:
            job.append(as_override("feedback_fraction", rcfg.fraction))
    return rcfg, load_config(_job(cfg).config_cls, cfg.config, [*cfg.overrides, *job, *job_extra])


def check_space(cfg: SweepConfig) -> Any:
    """Build the job configs with every listed value of every key (bounds for uniform ones),
    the other keys at their first value: an unknown key or a bad value fails here, naming the
    key, before any trial starts. Returns the swept job's config at the first values."""
    first = {k: p.first() for k, p in cfg.space.items()}
    for key, p in cfg.space.items():
        for v in p.values()[1:]:
            build_configs(cfg, {**first, key: v})
    return build_configs(cfg, first)[1]


# ----------------------------------------------------------------------------- measures


@dataclass
class Segment:
    """What a measure sees after a segment; the samples are drawn once, on first use."""

    sweep: SweepConfig
    job: Any  # the job config of this segment
    result: dict  # the job driver's result (result.json)
    reward: dict | None  # reward_finetune: the reward job's result
    shared: dict  # the sweep's: store URI, feature model, ...
    _samples: tuple | None = None

    def samples(self) -> tuple[Any, Any, Any]:
        """(uint8 images (N, H, W, 3), class ids (N,), vocabulary): ``per_class`` per class from
        the run's checkpoint (EMA weights) through the one ``sample()`` loop."""
        if self._samples is None:
            import numpy as np
            import torch

            from pathloop.diffusion import sample, to_uint8
            from pathloop.sampling import load_models, resolve_guide
            from pathloop.viz import image_grid

            torch.set_num_threads(self.job.scaling.torch_threads or 1)
            sc, ckpt = self.sweep.sampler, Path(self.result["checkpoint"])
            ck, guide = load_models(ckpt, resolve_guide(sc.guide, ckpt, self.job.tracking), sc)
            n, codes = self.sweep.per_class, [c.code for c in ck.vocab.classes]
            ids = np.repeat(np.arange(len(ck.vocab)), n)  # (K * n,)
            x = sample(ck.unet, ck.noise, ids.tolist(), **{**sc.model_dump(), "guide": guide})
            images = to_uint8(x)  # (K * n, H, W, 3)
            grid = image_grid(list(images), len(ck.vocab), n, 2, codes)
            grid.save(Path(self.job.workdir) / f"samples_step{self.result['step']}.png")
            self._samples = images, ids, ck.vocab
        return self._samples


def measure_judge(seg: Segment) -> dict[str, float]:
    """The phantom judge on the samples: plausible rate with its Wilson interval, per class."""
    from pathloop.metrics import plausibility_table, plausible_by_evaluator

    images, ids, vocab = seg.samples()
    table = plausibility_table(plausible_by_evaluator("judge", images, ids, vocab), ids, vocab)
    o = table["overall"]
    per_class = {f"plausibility_{code}": r["rate"] for code, r in table["per_class"].items()}
    return {
        "plausibility": o["rate"],
        "plausibility_lo": o["lo"],
        "plausibility_hi": o["hi"],
        **per_class,
    }


def measure_fidelity(seg: Segment) -> dict[str, float]:
    """FID and PRDC of the samples against the real reference split (evaluation features)."""
    from pathloop.data import load_arrays
    from pathloop.metrics import embed, fid, load_feature_model, prdc

    images, _, _ = seg.samples()
    fm = load_feature_model(seg.shared["features"])
    real, _ = load_arrays(seg.shared["real"], split=seg.sweep.fidelity.split)
    ref, fake = embed(fm, real, device="cpu"), embed(fm, images, device="cpu")
    return {"fid": fid(ref, fake), **prdc(ref, fake, seg.sweep.fidelity.k, device="cpu")}


def measure_train(seg: Segment) -> dict[str, float]:
    """What the Train run measured itself: held-out AUC/accuracy/ECE of a reward model, the last
    logged loss of a diffusion run."""
    from pathloop import tracking

    out: dict[str, float] = {}
    for prefix, res in (("", seg.result), ("reward_", seg.reward)):
        if res is None:
            continue
        if "auc" in res:
            out.update({f"{prefix}{k}": float(res[k]) for k in ("auc", "accuracy", "ece")})
        else:
            last = tracking.run_metrics(res["tracking_uri"], res["run_id"])
            out.update({f"{prefix}{k}": v for k, v in last.items() if k == "loss"})
    return out


def measure_evaluate(seg: Segment) -> dict[str, float]:
    """Step evaluate: the evaluation job's ``model`` row, flat (precision, coverage, fid,
    tstr_synthetic_macro_f1, plausibility_judge_rate, ...; per-class rates left out)."""
    from pathloop.evaluate import flat_metrics

    flat = flat_metrics(seg.result)
    return {
        k.removeprefix("model/").removeprefix("prdc/").replace("/", "_"): v
        for k, v in flat.items()
        if k.startswith("model/") and "/class/" not in k
    }


# Metric hooks: (segment) -> {name: value}. Add one here to make it a sweep metric.
MEASURES: dict[str, Callable[[Segment], dict[str, float]]] = {
    "judge": measure_judge,
    "fidelity": measure_fidelity,
    "train": measure_train,
    "evaluate": measure_evaluate,
}


def prepare_fidelity(cfg: SweepConfig, job_cfg: Any, workdir: Path) -> dict[str, str]:
    """Driver side of the fidelity measure: the real shards and the feature model (trained once
    here, not in every trial)."""
    if "fidelity" not in cfg.measure_names:
        return {}
    from pathloop import storage
    from pathloop.metrics import FeatureConfig, train_feature_model

    real = cfg.fidelity.real or getattr(job_cfg, "real", None) or job_cfg.data.shards
    real = storage.absolute(real)
    features = cfg.fidelity.features
    if features is None:  # trained here once; reused while its data and settings are the same
        features, fm_cfg = workdir / "features", FeatureConfig(steps=cfg.fidelity.feature_steps)
        meta = features / "config.json"
        same = meta.is_file() and json.loads(meta.read_text()).get("shards") == real
        if not same or json.loads(meta.read_text()).get("train") != fm_cfg.model_dump():
            train_feature_model(real, features, fm_cfg)
    return {"real": real, "features": storage.absolute(features)}


def prepare_evaluate(cfg: SweepConfig, job_cfg: Any, workdir: Path) -> dict[str, str]:
    """Driver side of step evaluate: the evaluation classifier, trained once into
    <workdir>/features unless the job names one (``features.path``)."""
    if cfg.step != "evaluate" or job_cfg.features.path:
        return {}
    from pathloop import storage
    from pathloop.evaluate import feature_model

    real = storage.absolute(job_cfg.real)
    feature_model(updated(job_cfg, workdir=str(workdir), real=real))
    return {"features": storage.absolute(workdir / "features")}


def measure(seg: Segment) -> dict[str, float]:
    """Run the sweep's measures; a measure's name not in MEASURES lists the valid ones."""
    out: dict[str, float] = {}
    for name in seg.sweep.measure_names:
        out.update(MEASURES[name](seg))
    return out


# ----------------------------------------------------------------------------- the trial


def _tag(uri: str, run_id: str, shared: dict, params: dict) -> None:
    from pathloop import tracking

    tracking.set_tags(
        uri,
        run_id,
        {
            "pathloop.sweep_id": shared["sweep_id"],
            "pathloop.trial_id": shared["trial_id"],
            "pathloop.sweep_params": json.dumps(params, sort_keys=True),
        },
    )


def trial(params: dict[str, Any], sweep: dict, shared: dict) -> None:
    """One Tune trial: build the job config through ``load_config`` (as the CLI does), run it in
    segments, measure and ``tune.report`` after each."""
    from ray import tune

    from pathloop import tracking

    cfg = SweepConfig.model_validate(sweep)
    # Tune runs a trial in its own dir; relative paths in job YAMLs mean what they mean on the CLI:
    # the driver's cwd, or (another node) the actor's original dir, e.g. a Ray job's working_dir.
    here = os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd())
    os.chdir(shared["cwd"] if Path(shared["cwd"]).is_dir() else here)
    shared = {**shared, "trial_id": tune.get_context().get_trial_id()}
    trial_dir, uri, name = (
        Path(shared["workdir"]) / "trials" / shared["trial_id"],
        shared["uri"],
        f"{cfg.name}-{shared['trial_id']}",
    )
    reward_extra = _imposed(cfg, shared, trial_dir / "reward", f"{name}-reward")
    job_extra = _imposed(cfg, shared, trial_dir / cfg.step.split("_")[-1], name)
    if cfg.step == "evaluate" and "features" in shared:
        job_extra.append(f"features.path={shared['features']}")
    rcfg, job_cfg = build_configs(cfg, params, reward_extra, job_extra)
    reward_result = None
    if rcfg is not None:  # reward_finetune: the trial's reward model, once, before finetuning
        reward_result = jobs()["reward"].run(rcfg)
        _tag(uri, reward_result["run_id"], shared, params)
    job = _job(cfg)
    for k, n in enumerate(segment_plan(_steps_of(job_cfg, job), cfg.segments), 1):
        resume = [f"{job.steps_key}={n}", f"resume={str(k > 1).lower()}"] if job.steps_key else []
        _, jcfg = build_configs(cfg, params, reward_extra, [*job_extra, *resume])
        result = job.run(jcfg)
        if k == 1:
            _tag(uri, result["run_id"], shared, params)
        metrics = measure(Segment(cfg, jcfg, result, reward_result, shared))
        tracking.log_metrics(uri, result["run_id"], metrics, n)
        tune.report({**metrics, "step": n, "segment": k, "mlflow_run_id": result["run_id"]})


def _steps_of(job_cfg: Any, job: Step) -> int:
    """The job's optimizer steps; 0 for a job that trains nothing (one segment, at step 0)."""
    if job.steps_key is None:
        return 0
    node = job_cfg
    for part in job.steps_key.split("."):
        node = getattr(node, part)
    return int(node)


# ----------------------------------------------------------------------------- the driver


def _scheduler(cfg: SweepConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",  # = segments reported so far
        max_t=cfg.segments,
        grace_period=min(cfg.scheduler.grace_period, cfg.segments),
        reduction_factor=cfg.scheduler.reduction_factor,
    )


def _tuner(cfg: SweepConfig, shared: dict) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    fn = tune.with_parameters(trial, sweep=cfg.model_dump(mode="json"), shared=shared)
    return tune.Tuner(
        tune.with_resources(fn, dict(cfg.trial_resources)),
        param_space={k: p.to_tune() for k, p in cfg.space.items()},
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            num_samples=cfg.num_samples,
            scheduler=_scheduler(cfg),
            # Tune ignores max_concurrent_trials when given a generator: the limit goes here.
            search_alg=BasicVariantGenerator(
                max_concurrent=cfg.max_concurrent, random_state=cfg.seed
            ),
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(Path(cfg.workdir) / "tune"), verbose=1
        ),
    )


def best_job_config(cfg: SweepConfig, params: dict, trial_dir: Path) -> tuple[Any, Any]:
    """The winning (job config, reward job config), through the same override path, with work
    dirs under <workdir>/best; a reward_finetune winner reuses its trial's reward model."""
    out = Path(cfg.workdir) / "best"
    job_extra = [f"workdir={out / cfg.step.split('_')[-1]}"]
    if cfg.step == "reward_finetune":
        job_extra.append(f"reward_model={trial_dir / 'reward' / 'result.json'}")
    rcfg, job = build_configs(cfg, params, [f"workdir={out / 'reward'}"], job_extra)
    return job, rcfg


class NoTrialReported(ValueError):
    """Every trial of a sweep failed before reporting its metric (the CLI prints one line)."""


def _summarise(cfg: SweepConfig, grid: Any, workdir: Path) -> dict[str, Any]:
    """Best trial, best.yaml (+ best-reward.yaml), trials.csv; how many ASHA stopped early."""
    from pathloop.config import dump_config

    ok = [r for r in grid if r.error is None and cfg.metric in (r.metrics or {})]
    if not ok:
        errors = [str(r.error).splitlines()[-1] for r in grid if r.error is not None]
        raise NoTrialReported(
            f"no trial reported {cfg.metric!r}; {len(errors)} failed: {errors[:3]}; "
            f"see {workdir / 'tune'}"
        )
    best = grid.get_best_result(cfg.metric, cfg.mode, scope="last")
    trial_id = best.metrics["trial_id"]
    job, rcfg = best_job_config(cfg, best.config, workdir / "trials" / trial_id)
    dump_config(job, workdir / "best.yaml")
    if rcfg is not None:
        dump_config(rcfg, workdir / "best-reward.yaml")
    grid.get_dataframe().to_csv(workdir / "trials.csv", index=False)
    segments = len(segment_plan(_steps_of(job, _job(cfg)), cfg.segments))
    rows = [trial_row(r) for r in ok]
    (workdir / "trials.json").write_text(json.dumps(rows, indent=2))
    return {
        "best_params": best.config,
        "best_metric": best.metrics[cfg.metric],
        "best_trial": trial_id,
        "best_run_id": best.metrics["mlflow_run_id"],
        "best_config": str(workdir / "best.yaml"),
        "trials": len(grid),
        "failed": sum(r.error is not None for r in grid),
        "stopped_early": sum(r.metrics.get("segment", 0) < segments for r in ok),
        "rows": rows,
    }


def trial_row(result: Any) -> dict[str, Any]:
    """A trial's searched values and last measured metrics, without Tune's bookkeeping."""
    from ray.tune.result import AUTO_RESULT_KEYS

    skip = {*AUTO_RESULT_KEYS, "done", "experiment_tag", "trial_id", "mlflow_run_id"}
    m = result.metrics
    measured = {k: v for k, v in m.items() if k not in skip and isinstance(v, int | float)}
    return {
        "trial_id": m["trial_id"],
        "mlflow_run_id": m["mlflow_run_id"],
        **result.config,
        **measured,
    }


TRADEOFF_FILES = ("tradeoff.md", "tradeoff.png")


def write_tradeoff(rows: list[dict], params: list[str], workdir: Path) -> dict[str, str]:
    """An evaluation sweep's fidelity-diversity table (markdown) and plot."""
    from pathloop import report, viz

    table = report.tradeoff_table(rows, params)
    md = workdir / TRADEOFF_FILES[0]
    md.write_text(viz.markdown_table(table["columns"], table["rows"]) + "\n")
    png = workdir / TRADEOFF_FILES[1]
    png.write_bytes(report.figure_png(report.plot_tradeoff(rows, params)))
    return {"md": str(md), "png": str(png)}


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Driver: check the space, open the sweep's MLflow run, run the Tuner, write best.yaml."""
    from rich import print as rprint

    from pathloop import storage, tracking
    from pathloop.config import dump_config

    workdir = Path(storage.absolute(cfg.workdir))
    cfg = updated(cfg, workdir=str(workdir))
    if not cfg.space:
        raise ValueError("space is empty: give at least one key, e.g. beta_r: {grid: [0, 1]}")
    job_cfg = check_space(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir / "sweep.yaml")
    uri = tracking.resolve_uri(cfg.tracking, workdir)
    sweep_id = tracking.start_run(
        cfg.tracking,
        workdir,
        params=cfg.model_dump(mode="json"),
        tags={"pathloop.step": "sweep", "pathloop.swept_step": cfg.step},
        run_name=cfg.tracking.run_name or cfg.name,
    )
    tracking.set_tags(uri, sweep_id, {"pathloop.sweep_id": sweep_id})
    from pathloop.reaper import init_ray

    init_ray(ignore_reinit_error=True)  # a local Ray goes with this process, even on kill -9
    shared = {"cwd": os.getcwd(), "workdir": str(workdir), "uri": uri, "sweep_id": sweep_id}
    try:
        shared.update(prepare_fidelity(cfg, job_cfg, workdir))
        shared.update(prepare_evaluate(cfg, job_cfg, workdir))
        out = _summarise(cfg, _tuner(cfg, shared).fit(), workdir)
    except Exception:
        tracking.end_run(uri, sweep_id, "FAILED")
        raise
    tracking.log_metrics(uri, sweep_id, {f"best_{cfg.metric}": out["best_metric"]}, 0)
    if cfg.step == "evaluate":
        out["tradeoff"] = write_tradeoff(out["rows"], list(cfg.space), workdir)
    for f in ("best.yaml", "best-reward.yaml", "trials.csv", "trials.json", *TRADEOFF_FILES):
        if (workdir / f).exists():
            tracking.log_artifact(uri, sweep_id, workdir / f)
    tracking.end_run(uri, sweep_id)
    out = {"sweep_id": sweep_id, "tracking_uri": uri, **out}
    (workdir / "result.json").write_text(json.dumps(out, indent=2, default=str))
    shown = {k: v for k, v in out.items() if k != "rows"}
    rprint({"sweep": shown, "best.yaml": (workdir / "best.yaml").read_text()})
    return out


# ----------------------------------------------------------------------------- ablation


class AblationConfig(Frozen):
    """Paper Figure 4a: a reward model on 0/10/50/100 % of a feedback round, finetuning (Eq. 3,
    or the overrides' method) with each from the same pretrained model, and every metric
    against the fraction."""

    workdir: str = Field("runs/ablation", description="Trials, rows, plots, MLflow db.")
    name: str = Field("ablation", description="Tune experiment and MLflow run name.")
    fractions: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.5, 1.0],
        description="Fractions of the round's (non-held-out) feedback; 0 = the reward model "
        "learns only Eq. 2's real-image term.",
    )
    config: str | None = Field(
        None, description="YAML of the finetune job (any method: reward, nft, dpo)."
    )
    overrides: list[str] = Field(default_factory=list, description="Finetune job overrides.")
    reward_config: str | None = Field(None, description="YAML of the reward job.")
    reward_overrides: list[str] = Field(default_factory=list, description="Reward overrides.")
    measures: list[str] = Field(
        default_factory=lambda: ["judge", "fidelity", "train"],
        description="Metric hooks (see MEASURES).",
    )
    per_class: int = Field(8, ge=1, description="judge/fidelity: samples per class measured.")
    sampler: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(steps=25), description="judge/fidelity: sampler."
    )
    fidelity: FidelityMeasure = Field(default_factory=FidelityMeasure)
    max_concurrent: int = Field(1, ge=1, description="Fractions running at once.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _fractions(self) -> AblationConfig:
        if not self.fractions or any(not 0 <= f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be a non-empty list in [0, 1], got {self.fractions}")
        return self

    def as_sweep(self) -> SweepConfig:
        """The ablation is a grid sweep over reward.fraction, one segment, no early stopping."""
        shared = self.model_dump(exclude={"fractions"})
        return SweepConfig(
            **shared,
            step="reward_finetune",
            space={"reward.fraction": Param(grid=sorted(set(self.fractions)))},
            metric="plausibility" if "judge" in self.measures else "reward_auc",
            segments=1,
            scheduler=SchedulerConfig(kind="fifo"),
        )


CI_KEYS = ("plausibility_lo", "plausibility_hi")  # Wilson bounds: in the rows, not plotted


def _save_curve(
    rows: list[dict], metrics: list[str], out: Path, title: str, reference: dict
) -> Path:
    """``report.plot_metric_curve`` (each metric against the fraction) as a PNG file, with the
    pretrained model's value as a dashed line where it has one."""
    from pathloop.report import figure_png, plot_metric_curve

    fig = plot_metric_curve(rows, "fraction", metrics, f"{title} (dashed: pretrained)")
    for ax, name in zip(fig.axes, metrics, strict=False):
        if name in reference:
            ax.axhline(reference[name], linestyle="--", color="grey")
    out.write_bytes(figure_png(fig))
    return out


def measure_pretrained(sweep: SweepConfig) -> dict[str, float]:
    """The starting point of every fraction: the pretrained model under the same sample-based
    measures (judge, fidelity; ``train`` has no run to read)."""
    from pathloop.tracking import resolve_model_ref

    names = [m for m in sweep.measure_names if m != "train"]
    if not names:
        return {}
    job = check_space(sweep)
    ckpt, _ = resolve_model_ref(job.pretrained, job.tracking)
    out = Path(sweep.workdir) / "pretrained"
    out.mkdir(parents=True, exist_ok=True)
    shared = prepare_fidelity(sweep, job, Path(sweep.workdir))
    seg = Segment(
        sweep,
        updated(job, workdir=str(out)),
        {"checkpoint": str(ckpt), "step": 0},
        None,
        shared,
    )
    return {k: v for name in names for k, v in MEASURES[name](seg).items()}


def run_ablation(cfg: AblationConfig) -> dict[str, Any]:
    """Run the fraction grid (``run_sweep``), then write rows {fraction, metrics…} as CSV and
    JSON, plot each metric against the fraction and log it all to the ablation's MLflow run."""
    import csv

    from pathloop import storage, tracking
    from pathloop.report import BOOKKEEPING

    workdir = Path(storage.absolute(cfg.workdir))
    sweep = updated(cfg, workdir=str(workdir)).as_sweep()
    res = run_sweep(sweep)
    uri, run_id = res["tracking_uri"], res["sweep_id"]
    reference = measure_pretrained(sweep)
    rows = sorted(
        ({"fraction": r.pop("reward.fraction"), **r} for r in res["rows"]),
        key=lambda r: r["fraction"],
    )
    metrics = [k for k in rows[0] if k != "fraction" and k not in BOOKKEEPING]
    saved = {"rows": rows, "pretrained": reference}  # report.load_curve_rows reads "rows"
    (workdir / "ablation.json").write_text(json.dumps(saved, indent=2))
    with (workdir / "ablation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    per_class = [k for k in metrics if k.startswith("plausibility_") and k not in CI_KEYS]
    main = [k for k in metrics if k not in per_class and k not in CI_KEYS]
    plots = [_save_curve(rows, main, workdir / "ablation.png", cfg.name, reference)]
    if per_class:
        title = f"{cfg.name}: judge plausibility per class"
        out = workdir / "ablation_per_class.png"
        plots.append(_save_curve(rows, per_class, out, title, reference))
    tracking.set_tags(uri, run_id, {"pathloop.step": "ablation"})
    tracking.log_metrics(uri, run_id, {f"pretrained_{k}": v for k, v in reference.items()}, 0)
    for r in rows:  # MLflow step = percent of the feedback: the UI draws the curve
        tracking.log_metrics(uri, run_id, {k: r[k] for k in metrics}, round(100 * r["fraction"]))
    for f in ("ablation.json", "ablation.csv", *[p.name for p in plots]):
        tracking.log_artifact(uri, run_id, workdir / f, "ablation")
    out = {"rows": rows, "pretrained": reference, "plots": [str(p) for p in plots]}
    return {**res, **out, "metrics": metrics}
