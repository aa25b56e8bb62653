"""Pretraining (step 1 of Sun et al. 2023): class-conditional diffusion on real patches.

``PretrainConfig`` is the job's manual, ``pretrain_loop`` the Ray Train worker loop (an endless
stream of Ray Data batches), ``run_pretrain`` the driver.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from pathloop.config import (
    Frozen,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    SamplerConfig,
    TrackingConfig,
    WorkersConfig,
    updated,
)
from pathloop.harness import (
    DataConfig,
    MlflowRun,
    TrainConfig,
    WorkerInputs,
    build_state,
    finish_run,
    fit,
    global_draw,
    prepare_run,
    shuffled_batches,
    train_diffusion,
    train_step,
    worker_context,
)

# ----------------------------------------------------------------------------- config


class PretrainConfig(Frozen):
    """Step 1 of Sun et al. 2023: class-conditional diffusion pretraining."""

    workdir: str = Field("runs/pretrain", description="Checkpoints, Ray results, result.json.")
    name: str = Field("pretrain", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preview: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(steps=25), description="Sampler of preview grids."
    )
    scaling: WorkersConfig = Field(default_factory=WorkersConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-pretrain")
    )


class PretrainInputs(WorkerInputs):
    """What ``run_pretrain`` hands ``pretrain_loop`` (the images come as the Ray Data shard)."""

    cfg: PretrainConfig = Field(description="The job's config, paths absolute.")


# ----------------------------------------------------------------------------- Ray Train loop


def pretrain_loop(config: dict) -> None:
    """Ray Train worker loop for pretraining (one per rank): an endless stream of Ray Data
    batches, epochs chained in the background, until the step count."""
    inputs = PretrainInputs.model_validate(config)
    import ray.train
    import ray.train.torch

    cfg, vocab = inputs.cfg, inputs.vocab
    rank, world, device = worker_context(cfg)
    st = build_state(cfg, len(vocab), device, wrap=ray.train.torch.prepare_model)
    per_worker = cfg.train.batch_size // world
    sl = slice(rank * per_worker, (rank + 1) * per_worker)  # this rank's rows of the global draw

    def one_step(step: int, batch: dict) -> tuple[Any, dict]:
        x0 = batch["image"]  # (b, C, H, W) in [-1, 1]
        shape = (cfg.train.batch_size, *x0.shape[1:])
        noise, t, drop = global_draw(cfg, step, shape, len(vocab), device)  # on the step's device
        grad_clip = cfg.optim.grad_clip
        return train_step(st, x0, batch["class_id"], noise[sl], t[sl], drop[sl], grad_clip), {}

    batches = shuffled_batches(ray.train.get_dataset_shard("train"), cfg, per_worker, rank)
    train_diffusion(cfg, st, inputs, rank, one_step, batches)
    batches.close()


# ----------------------------------------------------------------------------- driver


def check_arithmetic(cfg: PretrainConfig, num_records: int) -> dict[str, Any]:
    """State the numbers before the loop and check that they divide."""
    w = cfg.scaling.num_workers
    if cfg.train.batch_size % w:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must divide by scaling.num_workers={w}; "
            f"use e.g. train.batch_size={cfg.train.batch_size // w * w or w}"
        )
    per_worker = cfg.train.batch_size // w
    if num_records < cfg.train.batch_size:
        raise ValueError(
            f"{num_records} training images < global batch {cfg.train.batch_size}; "
            "lower train.batch_size or add data"
        )
    steps_per_epoch = num_records // cfg.train.batch_size
    return {
        "train_images": num_records,
        "workers": w,
        "global_batch": cfg.train.batch_size,
        "per_worker_batch": per_worker,
        "steps": cfg.train.steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": round(cfg.train.steps / max(steps_per_epoch, 1), 2),
        "images_seen": cfg.train.steps * cfg.train.batch_size,
        "checkpoints": math.ceil(cfg.train.steps / cfg.train.checkpoint_every),
    }


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Driver: arithmetic, MLflow run, TorchTrainer.fit(), model logging and registration."""
    from rich import print as rprint

    from pathloop import storage
    from pathloop.data import decoded_shards, read_manifest, read_shards, read_vocab

    # Workers do not share the driver's cwd: every path crosses as an absolute one (or a URI).
    shards = storage.absolute(cfg.data.shards)
    cfg = updated(cfg, data={"shards": shards})
    vocab, manifest = read_vocab(shards), read_manifest(shards)
    arith = check_arithmetic(cfg, _count(manifest, cfg.data.split, cfg.data.classes, vocab))
    _check_image_size(cfg, manifest)
    cfg, uri, run_id = prepare_run(cfg, "pretrain", {"pathloop.shards": shards})
    rprint({"config": cfg.model_dump(mode="json"), "arithmetic": arith})
    import ray.data

    # One bar and one plan per epoch from Ray Data drown the step log; the loop prints its own
    # progress (Ray Data still writes its logs under the Ray session's logs/ray-data).
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if cfg.data.cache:  # decoded once; every worker shuffles and augments its share itself
        ds = decoded_shards(shards, split=cfg.data.split, classes=cfg.data.classes)
    else:
        ds = read_shards(
            shards, split=cfg.data.split, classes=cfg.data.classes, augment=cfg.data.augment
        )
    inputs = PretrainInputs(cfg=cfg, vocab=vocab, mlflow=MlflowRun(uri=uri, run_id=run_id))
    ckpt_dir = fit(pretrain_loop, inputs, datasets={"train": ds})
    return finish_run(cfg, uri, run_id, ckpt_dir, {"arithmetic": arith})


def _check_image_size(cfg: PretrainConfig, manifest: dict) -> None:
    """The model's sample size must match the shards' image size."""
    from pathloop.diffusion import resolve_model_config

    size = resolve_model_config(cfg.model)["sample_size"]
    have = manifest.get("image_size")
    if have and tuple(have) != (size, size):
        raise ValueError(
            f"shards {cfg.data.shards} hold {have[0]}x{have[1]} images but the model samples "
            f"{size}x{size}; set model.sample_size={have[0]} or re-make the shards at {size} px"
        )


def _count(manifest: dict, split: str | None, classes: list[str] | None, vocab) -> int:
    """Training rows selected by split and classes, from the manifest's counts."""
    names = {vocab.lookup(c).name for c in classes} if classes else None
    total = 0
    for name, per_split in manifest["counts"].items():
        if names is not None and name not in names:
            continue
        total += sum(v for s, v in per_split.items() if split is None or s == split)
    return total
