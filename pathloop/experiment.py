"""``pathloop experiment``: does expert feedback make samples more plausible than the data alone?

One frozen pretrained model, and what every arm shares: the review set the expert labels, the
reward model trained on it (Eq. 2), and the finetuning pool drawn once from the pretrained model at
the review set's sampler settings. Each arm finetunes the same model on that pool (Eq. 3) with its
own weights:

- ``control``: no feedback; the pool weighs 0 and only the beta_r term on real images trains;
- ``feedback``: the method under test, the reward model's rewards on the pool;
- ``oracle``: the expert's own verdicts on the pool (what perfect feedback can give);
- ``self-training``: every pool image weight 1 (the pool without feedback);
- ``expert-data``: the control's training on the real images the expert accepts: what the
  expert's knowledge gives applied to the data instead of the samples, a ceiling for the round;
- ``feedback-data``: the control with its real images drawn by the reward model's scores: the
  same curation learnt from the expert's feedback, no pool;
- the ``-nft``, ``-dpo`` and ``-real`` variants (``arms.py``): another method on the same rewards,
  or the same rewards weighing the real images of the beta_r term too.

With ``rounds`` > 1 each arm goes on from its own model: every later round draws a fresh pool
from the arm's previous model (the same sampling seeds in every arm), weighs it the arm's way and
finetunes again; the control trains as many steps on the real images alone.

Every arm runs with every finetuning seed, and then samples the SAME evaluation images (image i has
the same sampling seed and class in every arm, seed and the pretrained model), which the scenario's
expert judges. ``stats.compare_arms`` pairs each arm with the control image by image (paired
difference over images and seeds, McNemar, per class and per criterion); PRDC against the held-out
test split and train-on-synthetic/test-on-real sit beside it. Every step leaves a result file and
is skipped on rerun; every run is an MLflow child of one parent ``experiment`` run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from rich.console import Console

from pathloop import drift
from pathloop.arms import (  # noqa: F401  (the arm vocabulary, re-exported)
    ARMS,
    BASE,
    CONTROL,
    EXPERT_DATA,
    FEEDBACK_DATA,
    MAX_POOL_PASSES,
    NO_POOL,
    POOL_SEED,
    REAL,
    REVIEW_SEED,
    Arm,
    arm_source,
    model_label,
    pool_seed,
    weighs_real,
)
from pathloop.config import Frozen, TrackingConfig, updated
from pathloop.evaluate import FeatureModelConfig
from pathloop.finetune import FinetuneConfig
from pathloop.harness import TrainConfig
from pathloop.judged import (
    judge_set,
    write_expert_data,
    write_oracle_rewards,
    write_real_review,
)
from pathloop.metrics import TSTRConfig
from pathloop.pipeline import (
    PRETRAIN_STEP,
    FeedbackSourceConfig,
    LoopConfig,
    LoopDataConfig,
    RoundConfig,
    Steps,
    collect_feedback,
    judge_options,
    make_data,
    parent_run,
    pretrained_model,
    read_result,
    reward_step,
    sample_set,
    scenario_expert,
    training_config,
    write_json,
)
from pathloop.pretrain import PretrainConfig
from pathloop.reward import RewardConfig

console = Console()

# ----------------------------------------------------------------------------- config


class ExperimentEvalConfig(Frozen):
    """How every model (each arm x seed, and the pretrained one) is evaluated."""

    per_class: int = Field(
        128, gt=0, description="Evaluation images per class and model, judged by the expert."
    )
    seed: int = Field(
        100_000,
        ge=0,
        description="Base sampling seed: image i gets seed + i in every arm, finetuning seed and "
        "the pretrained model, so verdicts pair image by image. Keep it clear of the review "
        f"({REVIEW_SEED} + i) and pool ({POOL_SEED} + i) seeds.",
    )
    guidance: float | None = Field(
        None, ge=0, description="CFG scale of the evaluation images; None = round.sampler's."
    )
    steps: int | None = Field(
        None,
        gt=0,
        description="Sampler steps of the evaluation images; None = round.sampler's. The pool "
        "is the model's training data, so it can be drawn with more steps (round.sampler) than "
        "the evaluation needs.",
    )
    prdc: bool = Field(True, description="PRDC against the real test split (equal class counts).")
    k: int = Field(5, gt=0, description="PRDC nearest neighbours (Naeem et al. 2020: 5).")
    features: FeatureModelConfig = Field(
        default_factory=FeatureModelConfig,
        description="The evaluation classifier whose features PRDC uses (trained once).",
    )
    tstr: bool = Field(True, description="Train on synthetic, test on the real test split.")
    tstr_classifier: TSTRConfig = Field(
        default_factory=TSTRConfig,
        description="TSTR classifier; it trains on synthetic_per_class (paper: 128) of the "
        "evaluation images per class, so per_class must be at least that.",
    )
    device: str = Field("auto", description="PRDC and TSTR device: auto, cpu, cuda.")
    n_boot: int = Field(2000, ge=100, description="Bootstrap draws of each paired interval.")
    every_round: bool = Field(
        True, description="rounds > 1: evaluate every round's model (the gain each round adds)."
    )
    down_by: float = Field(
        0.05, ge=0, description="A class is down when its paired difference is below -down_by."
    )
    bars: dict[Literal["feedback", "oracle", "self-training", "expert-data"], float] = Field(
        default_factory=lambda: {"feedback": 0.10, "oracle": 0.15},
        description="The benchmark's gain bars by the source of an arm's rewards (feedback: "
        "the reward model's, feedback-data included; oracle: the expert's verdicts): the least "
        "paired difference to the control over the classes the scenario changes (all classes "
        "where it changes every class). results.md checks each such arm against it and the "
        "other bars: its interval above 0, no class down by more than down_by, PRDC precision "
        "and coverage not below the control's. {} = no check.",
    )


class SharedRoundConfig(RoundConfig):
    """The one feedback round every arm shares: the review set the expert labels and the pool
    the arms finetune on, both drawn from the pretrained model with ``sampler`` (the experiment
    fixes their seeds; pool_guidance must stay None: the pool is drawn where the reward model
    was trained). Draw both at guidance 1.0 and set ``evaluation.guidance``: finetuning on
    guided images and sampling with guidance again compounds it, and on the artifacts phantoms
    that alone took every arm below the control (docs/experiments.md)."""

    pool_per_class: int = Field(
        64, gt=0, description="Images per class every arm finetunes on, drawn once."
    )
    review_from: Literal["samples", "real"] = Field(
        "samples",
        description="What the expert labels for the reward model: review_per_class samples "
        "of the pretrained model per class (the paper's round), or as many real train images "
        "per class (the expert reviews the data, so the reward model learns what in them the "
        "expert rejects; for the -real arms).",
    )
    calibrate_real: bool = Field(
        False,
        description="review_from=real: the feedback arms that weigh the real images shift the "
        "reward model's scores of them per class to the expert's rate on the reviewed cells.",
    )


class ExperimentConfig(Frozen):
    """Arms x finetuning seeds from one pretrained model, judged on the same images; the data,
    pretrain, round, reward and finetune sections are those of ``pathloop loop``."""

    workdir: str = Field("runs/experiment", description="Every step's outputs live under here.")
    name: str = Field("experiment", description="Parent MLflow run name.")
    data: LoopDataConfig = Field(
        default_factory=LoopDataConfig,
        description="The real images (phantoms with a scenario, a folder, or shards); the "
        "expert profile comes from the shard manifest's scenario.",
    )
    pretrained: str | None = Field(
        None,
        description="Start every arm from this model instead of pretraining: a checkpoint dir, "
        "a training job's result.json, or a models:/ URI in the experiment's MLflow store.",
    )
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig,
        description="Pretraining when pretrained is None: run once into <workdir>/pretrain.",
    )
    round: SharedRoundConfig = Field(
        default_factory=SharedRoundConfig, description="The review set and pool all arms share."
    )
    reward: RewardConfig = Field(
        default_factory=RewardConfig,
        description="The reward model (Eq. 2), trained once on the review set; lambda_r = 0 "
        "drops its real-image term (for wrong labels in the real data).",
    )
    finetune: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(
            train=TrainConfig(steps=96, batch_size=32, sample_every=0, checkpoint_every=48),
            tracking=TrackingConfig(register_as=None),
        ),
        description="Settings every arm shares (Eq. 3); the arms set the weights, the pool, "
        "the real images and train.seed. reward_mode shapes the feedback and oracle rewards.",
    )
    arms: tuple[Arm, ...] = Field(
        ARMS,
        min_length=1,
        description=f"Arms: {', '.join(ARMS)}; feedback-nft and oracle-nft add the feedback "
        "and oracle rewards finetuned with method=nft (reward_mode=class_z); oracle-dpo the "
        "expert's checklist scores as MAGIC preference pairs (method=dpo); expert-data the "
        "control on the real train images the expert accepts (a ceiling: clean data); "
        "feedback-data the control with its real images drawn by the reward model's scores; a "
        "-real suffix (feedback-real, oracle-nft-real, ...) weighs the real images of the "
        "beta_r term by the same rewards (pathloop/arms.py).",
    )
    seeds: tuple[int, ...] = Field(
        (0, 1, 2), min_length=1, description="Finetuning seeds (train.seed) of every arm."
    )
    rounds: int = Field(
        1,
        ge=1,
        le=10,
        description="Feedback rounds. Round 1 finetunes every arm on the shared pool; each later "
        "round draws a fresh pool from the arm's previous model (the same sampling seeds in every "
        "arm and seed, so the pools pair), weighs it the arm's way (the expert judges it for the "
        "oracle arms, the round-1 reward model scores it for the feedback arms, all ones for "
        "self-training) and finetunes from that model; the control trains as many steps on the "
        "real images alone.",
    )
    parallel_finetunes: int = Field(
        1,
        ge=1,
        le=8,
        description="Finetuning runs at once (rounds=1 only: later rounds sample pools between "
        "runs), each in a thread of the driver with its own Ray Train worker, which needs a "
        "free CPU. On 2 cores, two runs at finetune.scaling.torch_threads=1 overlap what each "
        "run does besides training (worker start, data, checkpoints, MLflow) and use both "
        "cores better than one two-thread run (docs/experiments.md).",
    )
    dpo_lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the oracle-dpo arm; None = finetune.optim.lr x 2 / "
        "finetune.dpo_beta, where the preference loss's first gradient (beta/2 x that of the "
        "error difference) matches the other arms' MSE steps. At the shared rate it collapses.",
    )
    evaluation: ExperimentEvalConfig = Field(
        default_factory=ExperimentEvalConfig,
        description="The same images for every model, the expert's verdicts, PRDC and TSTR.",
    )
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="pathloop-experiment"),
        description="The one MLflow store and experiment of the parent run and its children.",
    )

    @field_validator("arms")
    @classmethod
    def _arms_have_a_control(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms must be distinct, got {list(arms)}")
        if CONTROL not in arms:
            raise ValueError(
                f"arms need {CONTROL}: every arm is compared with it on the same images"
            )
        return arms

    @model_validator(mode="after")
    def _parallel_in_one_round(self) -> ExperimentConfig:
        if self.parallel_finetunes > 1 and self.rounds > 1:
            raise ValueError(
                f"parallel_finetunes={self.parallel_finetunes} works with rounds=1 (later rounds "
                "sample a pool between finetuning runs); set parallel_finetunes=1 (with "
                "finetune.scaling.torch_threads=2 on 2 cores) or rounds=1"
            )
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {list(seeds)}")
        return seeds


def check_config(cfg: ExperimentConfig) -> None:
    """What no single field can check: the pool's guidance, the arms' weights, TSTR's images."""
    from pathloop.finetune import REWARD_FREE

    r, ft, ev = cfg.round, cfg.finetune, cfg.evaluation
    if r.calibrate_real and r.review_from != "real":
        raise ValueError("round.calibrate_real needs round.review_from=real (the expert's labels)")
    if r.pool_guidance not in (None, r.sampler.guidance):
        raise ValueError(
            f"round.pool_guidance={r.pool_guidance} differs from round.sampler.guidance="
            f"{r.sampler.guidance}: the pool is drawn at the guidance the reward model was "
            "trained on; leave round.pool_guidance unset"
        )
    if ft.method == "dpo":
        raise ValueError(
            "finetune.method=dpo trains on pairs, which the experiment's pool does not have; "
            "use reward (Eq. 3) or nft (negative-aware)"
        )
    if ft.reward_mode in REWARD_FREE:
        raise ValueError(
            f"finetune.reward_mode={ft.reward_mode} would give the feedback and oracle arms "
            "fixed weights; use raw, threshold, class_norm or class_z (the control and "
            "self-training arms set none and ones themselves)"
        )
    if ft.beta_r == 0:
        raise ValueError("finetune.beta_r must be > 0: the control arm trains only that term")
    if ev.tstr and ev.per_class < ev.tstr_classifier.synthetic_per_class:
        raise ValueError(
            f"evaluation.per_class={ev.per_class} is below evaluation.tstr_classifier."
            f"synthetic_per_class={ev.tstr_classifier.synthetic_per_class}; raise the one or "
            "lower the other (or evaluation.tstr=false)"
        )


def check_seed_ranges(cfg: ExperimentConfig, n_classes: int) -> None:
    """Review, pool and evaluation images must not share sampling seeds (image i of a set of
    n images gets seed start + i), or the evaluation would judge images the arms trained on."""
    r, ev = cfg.round, cfg.evaluation
    ranges = {
        "review": (REVIEW_SEED, r.review_per_class * n_classes),
        "pool": (POOL_SEED, r.pool_per_class * n_classes * cfg.rounds),  # one range a round
        "evaluation": (ev.seed, ev.per_class * n_classes),
    }
    names = list(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (sa, na), (sb, nb) = ranges[a], ranges[b]
            if sa < sb + nb and sb < sa + na:
                raise ValueError(
                    f"the {a} seeds [{sa}, {sa + na}) overlap the {b} seeds [{sb}, {sb + nb}); "
                    f"set evaluation.seed past {max(s + n for s, n in ranges.values())} or use "
                    "fewer images"
                )


# ----------------------------------------------------------------------------- the expert


# ----------------------------------------------------------------------------- shared steps


@dataclass(frozen=True)
class Shared:
    """What every arm shares."""

    shards: Path  # the real images (train: beta_r term; test: PRDC and TSTR)
    model: str  # the frozen pretrained checkpoint every arm starts from
    expert: str | None  # the judge's expert profile (from the shard manifest)
    pool: Path | None  # the finetuning pool, drawn once from the pretrained model (if trained on)
    reward: str | None  # the reward model's checkpoint (feedback arm)
    oracle: Path | None  # the expert's verdicts on the pool as a rewards table (oracle arm)
    checklist: Path | None = None  # the expert's checklist scores on the pool (oracle-dpo)
    expert_data: Path | None = None  # the real train images the expert accepts (expert-data)
    oracle_real: Path | None = None  # the expert's verdicts on the real train images


def _judge_feedback(cfg: ExperimentConfig, review: Path, export: Path, expert: str | None) -> Path:
    """The expert (the judge with the scenario's profile) labels the review set in the store."""
    loop = LoopConfig(workdir=cfg.workdir, feedback=FeedbackSourceConfig(source="judge"))
    return collect_feedback(loop, review, export, "experiment-review", **judge_options(expert))


def review_labels(workdir: str | Path) -> Path:
    """The expert's labels of the review set: the reward model's data; calibrate_real reads them."""
    return Path(workdir) / "feedback" / "feedback.parquet"


def train_reward_model(steps: Steps, shards: Path, model: str, expert: str | None) -> str:
    """Review set → the expert's feedback → the reward model (Eq. 2); its checkpoint."""
    cfg, wd = steps.cfg, Path(steps.cfg.workdir)
    review, export, reward_wd = wd / "review", review_labels(wd).parent, wd / "reward"
    n = cfg.round.review_per_class
    if cfg.round.review_from == "real":
        done = lambda: write_real_review(shards, review, n, REVIEW_SEED)  # noqa: E731
        steps.run("review set: real train images", review / "manifest.json", done)
    else:
        sample_set(steps, "review set: sample", model, review, n, REVIEW_SEED)
    done = lambda: _judge_feedback(cfg, review, export, expert)  # noqa: E731
    steps.run("review set: the expert's feedback", review_labels(wd), done)
    return reward_step(steps, "", reward_wd, export, shards, "reward")["checkpoint"]


def shared_steps(steps: Steps, shards: Path) -> Shared:
    """Pretrained model, pool, and (for the arms that need them) reward model and oracle."""
    cfg, wd = steps.cfg, Path(steps.cfg.workdir)
    model = pretrained_model(steps, shards)["checkpoint"]
    expert = scenario_expert(shards)
    console.print(f"expert: judge ({expert or 'default'} profile)")
    sources = {arm_source(arm)[0] for arm in cfg.arms}
    pool = wd / "pool" if sources - set(NO_POOL) else None  # no arm trains on it: not drawn
    if pool is not None:
        sample_set(steps, "pool: sample", model, pool, cfg.round.pool_per_class, POOL_SEED)
    needs_model = sources & {"feedback", FEEDBACK_DATA}
    reward = train_reward_model(steps, shards, model, expert) if needs_model else None
    oracle = wd / "oracle" / "rewards.parquet" if "oracle" in sources else None
    if oracle is not None:
        title = "oracle: the expert judges the pool"
        steps.run(title, oracle, lambda: write_oracle_rewards(pool, oracle, expert))
    checklist = wd / "oracle" / "checklist.parquet" if "oracle-dpo" in cfg.arms else None
    if checklist is not None:
        title = "oracle: the expert's checklist scores on the pool"
        steps.run(title, checklist, lambda: write_oracle_rewards(pool, checklist, expert, True))
    expert_data = wd / "expert_data" if EXPERT_DATA in cfg.arms else None
    if expert_data is not None:
        title = "expert data: the expert judges the real train images"
        done = lambda: write_expert_data(shards, expert_data, expert)  # noqa: E731
        steps.run(title, expert_data / "manifest.json", done)
    real_sources = {arm_source(arm)[0] for arm in cfg.arms if weighs_real(arm)}
    oracle_real = wd / "oracle" / "real.parquet" if "oracle" in real_sources else None
    if oracle_real is not None:
        title = "oracle: the expert judges the real train images"
        done = lambda: write_oracle_rewards(shards, oracle_real, expert, split="train")  # noqa: E731
        steps.run(title, oracle_real, done)
    return Shared(shards, model, expert, pool, reward, oracle, checklist, expert_data, oracle_real)


# ----------------------------------------------------------------------------- arms


def arm_finetune(
    cfg: ExperimentConfig, arm: str, seed: int, shared: Shared, workdir: Path
) -> FinetuneConfig:
    """The finetuning config of one arm and seed: the shared section on the pool and the real
    images, with the arm's weights (Eq. 3, or the method its suffix names)."""
    source, method = arm_source(arm)
    weights = {
        "control": {"reward_mode": "none"},  # only the beta_r real term trains
        EXPERT_DATA: {"reward_mode": "none"},  # the same, on the images the expert accepts
        # the same, its real images drawn in proportion to the reward model's scores
        FEEDBACK_DATA: {"reward_mode": "none", "reward_model": shared.reward, "weigh_real": True},
        "feedback": {"reward_model": shared.reward},
        "oracle": {"rewards": str(shared.oracle)},
        "self-training": {"reward_mode": "ones"},
    }[source]
    if method == "nft":  # nft moves toward r > 0.5 and away from r < 0.5: centred per class
        weights["reward_mode"] = "class_z"
    if weighs_real(arm):  # the same rewards weigh the real images of the beta_r term
        given = str(shared.oracle_real) if source == "oracle" else None  # else the reward model
        weights |= {"weigh_real": True, "real_rewards": given}
    if weights.get("weigh_real") and source != "oracle" and cfg.round.calibrate_real:
        weights["real_labels"] = str(review_labels(cfg.workdir))
    if method == "dpo":  # pairs of one class from the checklist scores, MAGIC's rule
        ft = cfg.finetune
        lr = cfg.dpo_lr or ft.optim.lr * 2 / ft.dpo_beta
        weights = {"rewards": str(shared.checklist), "reward_mode": "raw", "optim": {"lr": lr}}
    return training_config(
        cfg.finetune,
        workdir,
        **dict.fromkeys(("reward_model", "rewards", "real_rewards", "real_labels"))
        | {"weigh_real": False}
        | weights,
        # the arms without feedback train Eq. 3's way whatever the method under test
        method=method or (cfg.finetune.method if source in ("feedback", "oracle") else "reward"),
        pretrained=shared.model,
        synthetic=str(shared.pool) if shared.pool else None,  # the control's weighs nothing
        real=str(shared.expert_data if source == EXPERT_DATA else shared.shards),
        train={"seed": seed, "final_preview": False},  # the evaluation set draws its images
    )


def round_inputs(steps: Steps, shared: Shared, arm: str, seed: int, rnd: int, model: str) -> Shared:
    """What round ``rnd`` of one arm and seed finetunes on, starting from ``model`` (its previous
    round's checkpoint): round 1 the shared pool; later rounds a fresh pool drawn from ``model``
    at the round's seeds (the same in every arm), judged by the expert for the oracle arms.
    The control keeps the shared pool, which weighs nothing."""
    from pathloop.data import read_vocab

    if rnd == 1:
        return shared
    cfg, wd = steps.cfg, Path(steps.cfg.workdir)
    source, method = arm_source(arm)
    if source in NO_POOL:
        return replace(shared, model=model)
    tag = model_label(arm, seed, rnd)
    pool = wd / "pools" / tag
    first = pool_seed(rnd, len(read_vocab(shared.pool)) * cfg.round.pool_per_class)
    sample_set(steps, f"{tag}: sample the pool", model, pool, cfg.round.pool_per_class, first)
    out = replace(shared, model=model, pool=pool)
    if source == "oracle":
        scores = wd / "oracle" / f"{tag}.parquet"
        checklist = method == "dpo"  # MAGIC's pairs read the checklist fractions
        judged = lambda: write_oracle_rewards(pool, scores, shared.expert, checklist)  # noqa: E731
        steps.run(f"{tag}: the expert judges the pool", scores, judged)
        out = replace(out, **{"checklist" if checklist else "oracle": scores})
    return out


def run_chain(steps: Steps, shared: Shared, arm: str, seed: int) -> dict[str, dict[str, Any]]:
    """Finetune one arm with one seed, round after round; {model_label: finetune result}."""
    from pathloop.finetune import run_finetune

    cfg, out, model = steps.cfg, {}, shared.model
    for rnd in range(1, cfg.rounds + 1):
        label = model_label(arm, seed, rnd)
        ft_wd = Path(cfg.workdir) / "arms" / arm / label.removeprefix(f"{arm}-")
        inputs = round_inputs(steps, shared, arm, seed, rnd, model)
        ft = arm_finetune(cfg, arm, seed, inputs, ft_wd)
        ft = updated(ft, tracking=steps.tracking(cfg.finetune.tracking, label))
        title, done = f"{label}: finetune", ft_wd / "result.json"
        steps.run(title, done, lambda ft=ft: run_finetune(ft))
        out[label] = read_result(ft_wd)
        model = out[label]["checkpoint"]
    return out


def _prepare_threads() -> None:
    """Start Ray and resolve diffusers' lazily loaded names in the main thread: two finetuning
    runs doing either at once in their threads fail (ray.init's connect asserts; diffusers'
    lazy module raises ImportError for a name another thread is importing)."""
    from diffusers import (  # noqa: F401
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UNet2DModel,
    )
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401

    from pathloop import reaper

    reaper.init_ray(ignore_reinit_error=True)


def run_arms(steps: Steps, shared: Shared) -> dict[str, dict[str, Any]]:
    """Finetune every arm with every seed (``parallel_finetunes`` at once, the arms that
    train on the pool first, so the short runs fill the end); {model_label: finetune result}
    in arm, seed order. A failed run stops the ones not yet started and raises at once."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    cfg = steps.cfg
    chains = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    if cfg.parallel_finetunes == 1:  # in the main thread, where Ray Train handles Ctrl-C
        done = {c: run_chain(steps, shared, *c) for c in chains}
    else:
        _prepare_threads()
        order = sorted(chains, key=lambda c: arm_source(c[0])[0] in NO_POOL)
        with ThreadPoolExecutor(cfg.parallel_finetunes) as pool:
            futures = {pool.submit(run_chain, steps, shared, *c): c for c in order}
            done = {}
            try:
                for f in as_completed(futures):
                    done[futures[f]] = f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return {label: r for c in chains for label, r in done[c].items()}


# ----------------------------------------------------------------------------- evaluation


@lru_cache(maxsize=2)
def _real(shards: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The real train and test splits (images, class ids), read once per process."""
    from pathloop.data import load_arrays

    return {s: load_arrays(shards, split=s) for s in ("train", "test")}


def _first_per_class(ids: np.ndarray, m: int) -> np.ndarray:
    """Indices of the first ``m`` rows of each class (seed order: the same images per arm)."""
    return np.sort(np.concatenate([np.flatnonzero(ids == c)[:m] for c in np.unique(ids)]))


def _feature_cfg(cfg: ExperimentConfig, shards: Path) -> Any:
    from pathloop.evaluate import EvaluateConfig

    ev, wd = cfg.evaluation, Path(cfg.workdir) / "eval"
    return EvaluateConfig(workdir=str(wd), real=str(shards), features=ev.features, device=ev.device)


def prdc_vs_test(cfg: ExperimentConfig, shards: Path, images: np.ndarray, ids: np.ndarray) -> dict:
    """PRDC of ``images`` against the real test split, the same count per class on both sides
    (the smaller of the two sets' least per-class count)."""
    from pathloop.evaluate import feature_model
    from pathloop.metrics import embed, prdc

    ev = cfg.evaluation
    tx, ty = _real(str(shards))["test"]
    m = int(
        min(np.unique(ids, return_counts=True)[1].min(), np.unique(ty, return_counts=True)[1].min())
    )
    fm, _ = feature_model(_feature_cfg(cfg, shards))
    real = embed(fm, tx[_first_per_class(ty, m)], device=ev.device)
    fake = embed(fm, images[_first_per_class(ids, m)], device=ev.device)
    return {**prdc(real, fake, ev.k, device=ev.device), "per_class": m}


def tstr_on_test(cfg: ExperimentConfig, shards: Path, images: Any, ids: Any) -> dict:
    """TSTR macro F1 and accuracy on the real test split of a classifier trained on ``images``
    (synthetic_per_class of each class); ``images`` None trains on the real train split."""
    from pathloop.data import read_vocab
    from pathloop.metrics import as_input, tstr

    ev, real = cfg.evaluation, _real(str(shards))
    tc = ev.tstr_classifier
    px = tc.in_px or real["test"][0].shape[1]
    train, test = ((as_input(x, px), y) for x, y in (real["train"], real["test"]))
    syn = None if images is None else (as_input(images, px), ids)
    setting = "real" if images is None else "synthetic"
    m = tstr(setting, train, test, len(read_vocab(shards)), tc, syn, ev.device)
    return {k: m[k] for k in ("macro_f1", "accuracy", "n_train")}


def measure(cfg: ExperimentConfig, d: Path, shared: Shared, log_to: tuple[str, str] | None) -> dict:
    """The expert's verdicts (``verdicts.npz``) and PRDC/TSTR of a model's evaluation set in
    ``d``; ``log_to`` (tracking URI, run id): the arm x seed run that gets the metrics."""
    from pathloop import tracking
    from pathloop.data import read_vocab
    from pathloop.metrics import remap_ids

    ev, j = cfg.evaluation, judge_set(d / "samples", shared.expert)
    np.savez(d / "verdicts.npz", **{k: j[k] for k in ("seed", "class_id", "plausible", "fails")})
    ids = remap_ids(j["class_id"], read_vocab(d / "samples"), read_vocab(shared.shards))
    out: dict[str, Any] = {"n": len(ids), "rate": float(np.nanmean(j["plausible"]))}
    if ev.prdc:
        out["prdc"] = prdc_vs_test(cfg, shared.shards, j["images"], ids)
    if ev.tstr:
        out["tstr"] = tstr_on_test(cfg, shared.shards, j["images"], ids)
    if log_to:
        flat = {"eval/judge_rate": out["rate"]}
        for group in ("prdc", "tstr"):
            flat.update({f"eval/{group}/{k}": v for k, v in out.get(group, {}).items()})
        tracking.log_metrics(*log_to, flat, step=0)
    write_json(d / "eval.json", out)
    return out


def measure_real(cfg: ExperimentConfig, d: Path, shared: Shared) -> dict:
    """The real test split as a reference: the expert's rate on it, PRDC of the real train
    split against it, and TSTR trained on the real train split."""
    ev, p = cfg.evaluation, judge_set(shared.shards, shared.expert, split="test")["plausible"]
    x, y = _real(str(shared.shards))["train"]
    out: dict[str, Any] = {"n": len(p), "rate": float(np.nanmean(p))}
    if ev.prdc:
        out["prdc"] = prdc_vs_test(cfg, shared.shards, x, y)
    if ev.tstr:
        out["tstr"] = tstr_on_test(cfg, shared.shards, None, None)
    write_json(d / "eval.json", out)
    return out


def evaluate_all(
    steps: Steps, shared: Shared, finetuned: dict[str, dict]
) -> dict[str, dict[str, Any]]:
    """Evaluation set of the pretrained model and of every arm x seed (x round, with
    ``evaluation.every_round``) on the same seeds and classes, judged and measured, and the real
    reference; {label: its eval.json}."""
    from pathloop.evaluate import feature_model

    cfg, ev = steps.cfg, steps.cfg.evaluation
    root = Path(cfg.workdir) / "eval"
    if ev.prdc:
        fcfg = _feature_cfg(cfg, shared.shards)
        title = "evaluation: feature model (PRDC)"
        steps.run(title, root / "features" / "config.json", lambda: feature_model(fcfg))
    labels = {REAL: (None, None), BASE: (shared.model, None)}
    last = {lab for ls in final_labels(cfg).values() for lab in ls}
    keep = finetuned if ev.every_round else {k: v for k, v in finetuned.items() if k in last}
    labels.update({k: (v["checkpoint"], v["run_id"]) for k, v in keep.items()})
    out = {}
    for label, (model, run_id) in labels.items():
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        if label == REAL:
            fn = lambda d=d: measure_real(cfg, d, shared)  # noqa: E731
        else:
            n, seed = ev.per_class, ev.seed
            title = f"{label}: sample the evaluation set"
            sample_set(steps, title, model, d / "samples", n, seed, ev.guidance, ev.steps)
            log_to = (steps.uri, run_id) if run_id else None
            fn = lambda d=d, log_to=log_to: measure(cfg, d, shared, log_to)  # noqa: E731
        steps.run(f"{label}: the expert, PRDC, TSTR", d / "eval.json", fn)
        out[label] = json.loads((d / "eval.json").read_text())
    return out


# ----------------------------------------------------------------------------- the experiment


def arithmetic(cfg: ExperimentConfig, shards: Path) -> dict[str, Any]:
    """The derived numbers, printed before anything trains: images, runs, pool passes."""
    from pathloop.data import iter_records

    rows = list(iter_records(shards, columns=["class_id", "split"]))
    n_cls = len({r["class_id"] for r in rows})
    n_train = sum(r["split"] == "train" for r in rows)
    n_test = sum(r["split"] == "test" for r in rows)
    r, ft, ev = cfg.round, cfg.finetune.train, cfg.evaluation
    drawn, runs = ft.steps * ft.batch_size, len(cfg.arms) * len(cfg.seeds)
    n_eval = ev.per_class * n_cls
    sources = {arm_source(a)[0] for a in cfg.arms}
    n_pool = r.pool_per_class * n_cls if sources - set(NO_POOL) else 0  # drawn if trained on
    return {
        "classes": n_cls,
        "real_train_images": n_train,
        "real_test_images": n_test,
        "review_images": r.review_per_class * n_cls if sources & {"feedback", FEEDBACK_DATA} else 0,
        "pool_images": n_pool,
        "rounds": cfg.rounds,
        "finetune_runs": runs * cfg.rounds,
        "pools_drawn_after_round_1": (cfg.rounds - 1)
        * len(cfg.seeds)
        * sum(arm_source(a)[0] not in NO_POOL for a in cfg.arms),
        "synthetic_rows_drawn_per_run": drawn,
        "pool_passes_per_run": round(drawn / n_pool, 2) if n_pool else 0,
        "real_passes_per_run": round(drawn / max(n_train, 1), 2),
        "eval_images_per_model": n_eval,
        "eval_images_sampled": n_eval * (runs * (cfg.rounds if ev.every_round else 1) + 1),
        "paired_verdicts_per_arm": n_eval * len(cfg.seeds),
        "prdc_images_per_class": min(ev.per_class, n_test // max(n_cls, 1)) if ev.prdc else None,
        "tstr_images_per_class": ev.tstr_classifier.synthetic_per_class if ev.tstr else None,
    }


def _print_arithmetic(a: dict[str, Any]) -> None:
    console.print({k: v for k, v in a.items() if v is not None})
    if a["pool_passes_per_run"] > MAX_POOL_PASSES:
        console.print(
            f"[yellow]warning:[/] each finetuning run visits the pool "
            f"{a['pool_passes_per_run']} times (> {MAX_POOL_PASSES}); lower finetune.train.steps "
            "or raise round.pool_per_class"
        )


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Data → pretrained model → review, reward, pool, oracle (shared) → arms x seeds →
    evaluation on the same images → paired statistics, results.md/json and plots."""
    from pathloop import experiment_results as res
    from pathloop import storage, tracking
    from pathloop.config import dump_config

    check_config(cfg)
    t0 = time.perf_counter()
    wd = Path(storage.absolute(cfg.workdir))
    cfg = updated(cfg, workdir=str(wd))
    wd.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, wd / "config.yaml")
    uri, parent = parent_run(cfg, wd, step="experiment")
    steps = Steps(cfg, uri, parent)
    shards = Path(storage.absolute(make_data(cfg, wd)))
    arith = arithmetic(cfg, shards)
    _print_arithmetic(arith)
    check_seed_ranges(cfg, arith["classes"])
    marks = [t0, time.perf_counter()]  # stage boundaries: data, shared steps, arms, evaluation
    shared = shared_steps(steps, shards)
    marks.append(time.perf_counter())
    finetuned = run_arms(steps, shared)
    marks.append(time.perf_counter())
    evals = evaluate_all(steps, shared, finetuned)
    marks.append(time.perf_counter())
    focus = res.scenario_classes(shards)
    rows = res.paired_table(cfg, evals, focus)
    results = {
        "config": cfg.model_dump(mode="json"),
        "workdir": str(wd),
        "tracking_uri": uri,
        "parent_run_id": parent,
        "expert": shared.expert or "default",
        "arithmetic": arith,
        "rows": rows,
        "rounds": res.round_table(cfg, evals, focus),
        "focus_classes": focus,
        "bars": res.bar_checks(rows, cfg.evaluation.bars, cfg.evaluation.down_by),
        "real": evals[REAL],
        "colour": drift.eval_colour(wd / "eval", shards, final_labels(cfg), BASE),  # cheap
        "evaluations": {k: v for k, v in evals.items() if k != REAL},
        "step_seconds": steps.timings,
        # this invocation's wall time: steps found done are not in it; with
        # parallel_finetunes > 1 the finetuning step times overlap and sum to more
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": res.stage_seconds(np.diff(marks), steps.timings.get(PRETRAIN_STEP, 0)),
    }
    results["files"] = res.write_outputs(results, wd)
    tracking.log_metrics(uri, parent, res.parent_metrics(results), 0)
    for f in results["files"].values():
        tracking.log_artifact(uri, parent, f)
    tracking.end_run(uri, parent)
    return results


def final_labels(cfg: ExperimentConfig) -> dict[str, list[str]]:
    """{arm: its seeds' last-round model labels}: what the headline table compares."""
    return {a: [model_label(a, s, cfg.rounds) for s in cfg.seeds] for a in cfg.arms}
