"""Per-worker Ray Train loops (pretrain; reward and finetune grow here) and their drivers.

Each loop's first line re-validates its config from the dict Ray hands it. Randomness of a step
(noise, timesteps, class dropout) is drawn for the *global* batch from one generator seeded by
(seed, step) and sliced by rank, so N workers compute exactly what 1 worker would on the same data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from pathloop.config import (
    Frozen,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    SamplerConfig,
    ScalingConfig,
    TrackingConfig,
)
from pathloop.data import AugmentConfig


class DataConfig(Frozen):
    """Which shards feed training."""

    shards: str = Field("runs/demo/phantoms", description="Shard-set directory (train split used).")
    split: str | None = Field("train", description="Split to train on; None = all rows.")
    classes: list[str] | None = Field(None, description="Subset of classes (names or codes).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentations.")


class TrainConfig(Frozen):
    """Step arithmetic, logging cadence and the GPU path."""

    steps: int = Field(2000, gt=0, description="Total optimizer steps (resume runs up to this).")
    batch_size: int = Field(64, gt=0, description="Global batch; must divide by num_workers.")
    seed: int = Field(0, description="Seed of init and of per-step noise.")
    log_every: int = Field(25, gt=0, description="Steps between metric reports.")
    sample_every: int = Field(500, ge=0, description="Steps between preview grids; 0 = only at end.")
    checkpoint_every: int = Field(500, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray keeps on storage.")
    preview_per_class: int = Field(4, ge=1, description="Images per class in preview grids.")
    bf16: bool = Field(True, description="bf16 autocast (CUDA only).")
    channels_last: bool = Field(True, description="channels_last memory format (CUDA only).")
    compile: bool = Field(False, description="torch.compile the UNet (CUDA recommended).")
    fail_at_step: int | None = Field(
        None, description="Fault injection for tests: raise once at this step (marker in workdir)."
    )


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
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(register_as="pathloop-pretrain"))


# ----------------------------------------------------------------------------- one train step


@dataclass
class StepState:
    """What a step needs besides the batch; built the same way by Ray and bare loops."""

    model: Any  # the (possibly DDP-wrapped) UNet
    raw: Any  # the bare UNet (EMA, checkpoints)
    ema: Any
    opt: Any
    lr_sched: Any
    scheduler: Any  # diffusers noise scheduler
    device: Any
    autocast: bool


def global_draw(cfg: PretrainConfig, step: int, shape: tuple[int, ...], num_classes: int):
    """Noise (B,C,H,W), timesteps (B,) and class-dropout mask (B,) for the global batch."""
    import torch

    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, cfg.noise.num_train_timesteps, (shape[0],), generator=g)
    drop = torch.rand(shape[0], generator=g) < cfg.model.p_uncond
    return noise, t, drop


def build_state(cfg: PretrainConfig, num_classes: int, device: Any, wrap=None) -> StepState:
    """UNet, EMA, AdamW with warm-up, the DDPM scheduler; ``wrap`` applies DDP (Ray)."""
    import torch

    from pathloop.diffusion import build_ema, build_scheduler, build_unet

    torch.manual_seed(cfg.train.seed)  # same init on every rank and in the bare loop
    raw = build_unet(cfg.model, num_classes).to(device)
    cuda = device.type == "cuda"
    if cuda and cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    ema = build_ema(raw, cfg.optim)
    opt = torch.optim.AdamW(
        raw.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=cuda
    )
    warm = max(cfg.optim.warmup_steps, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model = wrap(raw) if wrap else raw
    if cfg.train.compile:
        model = torch.compile(model)
    return StepState(
        model, raw, ema, opt, lr_sched, build_scheduler(cfg.noise, "ddpm"), device,
        autocast=cuda and cfg.train.bf16,
    )


def train_step(st: StepState, x0, class_ids, noise, t, drop, grad_clip: float) -> float:
    """One optimizer step on this rank's slice; returns the local mean loss."""
    import torch

    from pathloop.diffusion import null_class
    from pathloop.losses import diffusion_loss

    x0, class_ids = x0.to(st.device, non_blocking=True), class_ids.to(st.device)
    labels = torch.where(drop.to(st.device), null_class(st.raw), class_ids)  # CFG dropout
    with torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=st.autocast):
        per_sample = diffusion_loss(
            st.model, st.scheduler, x0, labels, noise=noise.to(st.device), timesteps=t.to(st.device)
        )  # (B,)
    loss = per_sample.mean()
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(st.raw.parameters(), grad_clip)
    st.opt.step()
    st.lr_sched.step()
    st.ema.step(st.raw.parameters())
    return float(loss.detach())


# ----------------------------------------------------------------------------- Ray Train loop


def pretrain_loop(config: dict) -> None:
    """Ray Train worker loop for pretraining (one per rank)."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = PretrainConfig.model_validate(config["cfg"])
    from pathloop.vocab import Vocabulary

    vocab = Vocabulary.model_validate(config["vocab"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.scaling.torch_threads or cfg.scaling.cpus_per_worker)
    st = build_state(cfg, len(vocab), device, wrap=lambda m: ray.train.torch.prepare_model(m))
    step = _maybe_restore(st, ray.train.get_checkpoint())
    per_worker = cfg.train.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    log = _RankZeroLog(cfg, config.get("mlflow"), rank, vocab)

    # ---- epochs until the global step count is reached
    t_wait = t_total = 0.0
    losses: list[float] = []
    while step < cfg.train.steps:
        batches = shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, dtypes={"image": torch.float32, "class_id": torch.int64}
        )
        t0 = time.perf_counter()
        for batch in batches:
            t1 = time.perf_counter()
            x0 = batch["image"]  # (b, C, H, W) in [-1, 1]
            shape = (cfg.train.batch_size, *x0.shape[1:])
            noise, t, drop = global_draw(cfg, step, shape, len(vocab))
            sl = slice(rank * per_worker, (rank + 1) * per_worker)
            losses.append(train_step(st, x0, batch["class_id"], noise[sl], t[sl], drop[sl],
                                     cfg.optim.grad_clip))
            step += 1
            _maybe_inject_failure(cfg, step)
            t2 = time.perf_counter()
            t_wait, t_total = t_wait + (t1 - t0), t_total + (t2 - t0)
            metrics = None
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics = {
                    "loss": sum(losses) / len(losses),
                    "images_per_s": cfg.train.batch_size * len(losses) / max(t_total, 1e-9),
                    "data_wait_frac": t_wait / max(t_total, 1e-9),
                    "lr": st.lr_sched.get_last_lr()[0],
                    "step": step,
                }
                losses, t_wait, t_total = [], 0.0, 0.0
            _report(cfg, st, step, metrics, rank, vocab, log)
            if step >= cfg.train.steps:
                break
            t0 = time.perf_counter()
    log.close()


def _maybe_inject_failure(cfg: PretrainConfig, step: int) -> None:
    """Raise once at ``train.fail_at_step`` (tests of FailureConfig and --resume)."""
    marker = Path(cfg.workdir) / ".injected_failure"
    if cfg.train.fail_at_step == step and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")


def _maybe_restore(st: StepState, checkpoint) -> int:
    """Load UNet, EMA and optimizer from a Ray checkpoint; return its step (0 if none)."""
    if checkpoint is None:
        return 0
    import torch

    from pathloop.diffusion import load_checkpoint

    with checkpoint.as_directory() as d:
        ck = load_checkpoint(d, ema=False)
        st.raw.load_state_dict(ck.raw_unet.state_dict())
        if ck.ema is not None:
            st.ema.load_state_dict(ck.ema.state_dict())
        if ck.optimizer_state is not None:
            st.opt.load_state_dict(ck.optimizer_state)
        for _ in range(ck.step):  # keep the warm-up position
            st.lr_sched.step()
        return ck.step


def _report(cfg, st, step, metrics, rank, vocab, log) -> None:
    """Report metrics every log step; checkpoint (rank 0 writes) on schedule. All ranks call."""
    import tempfile

    import ray.train

    from pathloop.diffusion import save_checkpoint

    last = step >= cfg.train.steps
    want_ckpt = step % cfg.train.checkpoint_every == 0 or last
    if metrics is None and not want_ckpt:
        return
    if rank == 0 and metrics:
        log.metrics(metrics, step)
    if rank == 0 and (last or (cfg.train.sample_every and step % cfg.train.sample_every == 0)):
        log.preview(st, step)
    metrics = metrics or {"step": step}
    if not want_ckpt:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(tmp, st.raw, ema_unet=st.ema, optimizer=st.opt, step=step,
                            config=cfg.model_dump(mode="json"), vocab=vocab)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


class _RankZeroLog:
    """Metrics and preview grids to MLflow and stdout, from rank 0 only."""

    def __init__(self, cfg: PretrainConfig, mlflow_info: dict | None, rank: int, vocab) -> None:
        self.cfg, self.info, self.rank, self.vocab = cfg, mlflow_info, rank, vocab

    def metrics(self, m: dict, step: int) -> None:
        from pathloop import tracking

        print(
            f"[pretrain] step {step}/{self.cfg.train.steps} loss {m['loss']:.4f} "
            f"{m['images_per_s']:.1f} img/s data-wait {m['data_wait_frac']:.1%}",
            flush=True,
        )
        if self.info:
            tracking.log_metrics(self.info["uri"], self.info["run_id"],
                                 {k: v for k, v in m.items() if k != "step"}, step)

    def preview(self, st: StepState, step: int) -> None:
        from pathloop import tracking
        from pathloop.diffusion import ema_copy
        from pathloop.viz import class_grid

        grid = class_grid(ema_copy(st.raw, st.ema), self.cfg.noise, self.vocab, self.cfg.preview,
                          per_class=self.cfg.train.preview_per_class)
        out = Path(self.cfg.workdir) / "previews" / f"step_{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        if self.info:
            tracking.log_artifact(self.info["uri"], self.info["run_id"], out, "samples")

    def close(self) -> None:
        pass


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step under a Ray run dir (for --resume)."""
    best, best_step = None, -1
    for state in run_dir.glob("checkpoint_*/state.json"):
        s = json.loads(state.read_text()).get("step", -1)
        if s > best_step:
            best, best_step = state.parent, s
    return best


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Driver: arithmetic, MLflow run, TorchTrainer.fit(), model logging and registration."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from rich import print as rprint

    from pathloop import tracking
    from pathloop.config import dump_config
    from pathloop.data import read_manifest, read_shards, read_vocab

    workdir = Path(cfg.workdir).resolve()
    # Workers do not share the driver's cwd: every path crosses as an absolute one.
    cfg = cfg.model_copy(update={
        "workdir": str(workdir),
        "data": cfg.data.model_copy(update={"shards": str(Path(cfg.data.shards).resolve())}),
    })
    run_dir = workdir / "ray" / cfg.name
    state_file = workdir / "run.json"
    if run_dir.exists() and not cfg.resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume (resume=true) to continue it, "
            "or choose another workdir/name"
        )
    vocab = read_vocab(cfg.data.shards)
    manifest = read_manifest(cfg.data.shards)
    n = _count(manifest, cfg.data.split, cfg.data.classes, vocab)
    arith = check_arithmetic(cfg, n)
    _check_image_size(cfg, manifest)
    rprint({"config": cfg.model_dump(mode="json"), "arithmetic": arith})
    workdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir / "config.yaml")

    # ---- MLflow run (driver creates; rank 0 logs into it; resume keeps the same run)
    uri = tracking.resolve_uri(cfg.tracking, workdir)
    prev = json.loads(state_file.read_text()) if (cfg.resume and state_file.exists()) else {}
    run_id = prev.get("run_id") or tracking.start_run(
        cfg.tracking, workdir, params=cfg.model_dump(mode="json"),
        tags={"pathloop.step": "pretrain", "pathloop.shards": str(Path(cfg.data.shards).resolve())},
        run_name=cfg.tracking.run_name or cfg.name,
    )
    state_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))

    ray.init(ignore_reinit_error=True)
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "vocab": vocab.model_dump(mode="json"),
            "mlflow": {"uri": uri, "run_id": run_id},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        datasets={
            "train": read_shards(cfg.data.shards, split=cfg.data.split, classes=cfg.data.classes,
                                 augment=cfg.data.augment)
        },
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(workdir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        resume_from_checkpoint=ray.train.Checkpoint(str(resume_from)) if resume_from else None,
    )
    result = trainer.fit()
    ckpt_dir = Path(result.checkpoint.path)

    # ---- the final model, logged and registered from the driver
    model_uri = tracking.log_checkpoint_model(uri, run_id, ckpt_dir, cfg.tracking.register_as)
    tracking.end_run(uri, run_id)
    out = {
        "run_id": run_id,
        "tracking_uri": uri,
        "model_uri": model_uri,
        "checkpoint": str(ckpt_dir),
        "step": json.loads((ckpt_dir / "state.json").read_text())["step"],
        "arithmetic": arith,
    }
    (workdir / "result.json").write_text(json.dumps(out, indent=2))
    return out


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
