"""Per-worker Ray Train loops (pretrain; reward and finetune grow here) and their drivers.

Each loop's first line re-validates its config from the dict Ray hands it. Randomness of a step
(noise, timesteps, class dropout) is drawn for the *global* batch from one generator seeded by
(seed, step) and sliced by rank, so N workers compute exactly what 1 worker would on the same data.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    shuffle_buffer: int = Field(
        4096,
        ge=0,
        description="Images in each worker's Ray Data shuffle buffer, reshuffled every epoch "
        "(shards are stored class by class, so 0 = file order gives one-class batches; a buffer "
        "at least the dataset's size is a full shuffle).",
    )
    cache: bool = Field(
        True,
        description="Decode the shards once and keep the images in Ray's object store, so an "
        "epoch only augments (uint8: 3 KB per 32 px image, 12 KB at 64 px); false streams and "
        "decodes every epoch, for sets larger than the object store.",
    )


class TrainConfig(Frozen):
    """Step arithmetic, logging cadence and the GPU path."""

    steps: int = Field(2000, gt=0, description="Total optimizer steps (resume runs up to this).")
    batch_size: int = Field(64, gt=0, description="Global batch; must divide by num_workers.")
    seed: int = Field(0, description="Seed of init and of per-step noise.")
    log_every: int = Field(25, gt=0, description="Steps between metric reports.")
    sample_every: int = Field(
        500, ge=0, description="Steps between preview grids; 0 = only at end."
    )
    checkpoint_every: int = Field(500, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray keeps on storage.")
    storage: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints and run state: a path or pyarrow.fs URI "
        "(s3://bucket/prefix, gs://..., file://...) every node reaches; None = <workdir>/ray.",
    )
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
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-pretrain")
    )


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


def build_state(
    cfg: Any, num_classes: int, device: Any, wrap=None, init_unet: Any = None
) -> StepState:
    """UNet (fresh, or ``init_unet`` to finetune), EMA, AdamW with warm-up, the DDPM scheduler;
    ``wrap`` applies DDP (Ray)."""
    import torch

    from pathloop.diffusion import build_ema, build_lr_schedule, build_scheduler, build_unet

    torch.manual_seed(cfg.train.seed)  # same init on every rank and in the bare loop
    raw = (init_unet if init_unet is not None else build_unet(cfg.model, num_classes)).to(device)
    raw.train()
    cuda = device.type == "cuda"
    if cuda and cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    ema = build_ema(raw, cfg.optim)
    opt = torch.optim.AdamW(
        raw.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=cuda
    )
    lr_sched = build_lr_schedule(opt, cfg.optim, cfg.train.steps)
    model = wrap(raw) if wrap else raw
    if cfg.train.compile:
        model = torch.compile(model)
    return StepState(
        model,
        raw,
        ema,
        opt,
        lr_sched,
        build_scheduler(cfg.noise, "ddpm"),
        device,
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
    return optimizer_step(st, per_sample.mean(), grad_clip)


def optimizer_step(st: StepState, loss: Any, grad_clip: float) -> float:
    """Backward ``loss``, clip, AdamW step, LR schedule and EMA update; returns the loss."""
    import torch

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

    # ---- one endless stream of batches (epochs chained in the background) until the step count
    t_wait = t_total = 0.0
    losses: list[float] = []
    batches = shuffled_batches(shard, cfg, per_worker, rank)
    t0 = time.perf_counter()
    while step < cfg.train.steps:
        batch = next(batches)
        t1 = time.perf_counter()
        x0 = batch["image"]  # (b, C, H, W) in [-1, 1]
        shape = (cfg.train.batch_size, *x0.shape[1:])
        noise, t, drop = global_draw(cfg, step, shape, len(vocab))
        sl = slice(rank * per_worker, (rank + 1) * per_worker)
        losses.append(
            train_step(st, x0, batch["class_id"], noise[sl], t[sl], drop[sl], cfg.optim.grad_clip)
        )
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
        t0 = time.perf_counter()
    batches.close()
    log.close()


def shuffled_batches(source: Any, cfg: PretrainConfig, per_worker: int, rank: int) -> Any:
    """Endless training batches {"image": (b, C, H, W), "class_id": (b,)} from a Ray Data
    dataset or shard iterator, reshuffled every epoch through a seeded local buffer."""
    import torch

    epoch = itertools.count()
    buffer = cfg.data.shuffle_buffer or None
    return epochs_in_background(
        lambda: source.iter_torch_batches(
            batch_size=per_worker,
            drop_last=True,
            dtypes={"image": torch.float32, "class_id": torch.int64},
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=(cfg.train.seed * 1009 + next(epoch)) * 1013 + rank
            if buffer
            else None,
        )
    )


def epochs_in_background(make_epoch: Any, depth: int = 8) -> Any:
    """Endless batches from ``make_epoch()`` called again at each epoch's end, read ahead by a
    thread. Starting a Ray Data epoch costs seconds; on small shard sets (tens of steps per
    epoch) that start-up would otherwise show up as data wait at every epoch boundary."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                for b in make_epoch():
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as err:  # surface reader errors in the training thread
            q.put(err)

    threading.Thread(target=produce, daemon=True, name="epochs").start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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

    from pathloop.diffusion import load_checkpoint

    with checkpoint.as_directory() as d:
        ck = load_checkpoint(d, ema=False)
        st.raw.load_state_dict(ck.raw_unet.state_dict())
        if ck.ema is not None:
            st.ema.load_state_dict(ck.ema.state_dict())
        if ck.optimizer_state is not None:
            st.opt.load_state_dict(ck.optimizer_state)
        with warnings.catch_warnings():  # stepping before any optimizer.step() is intended here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            for _ in range(ck.step):  # keep the warm-up position
                st.lr_sched.step()
        return ck.step


def _report(cfg, st, step, metrics, rank, vocab, log) -> None:
    """Report metrics every log step; checkpoint (rank 0 writes) on schedule. All ranks call."""

    from pathloop.diffusion import save_checkpoint

    last = step >= cfg.train.steps
    want_ckpt = step % cfg.train.checkpoint_every == 0 or last
    if metrics is None and not want_ckpt:
        return
    if rank == 0 and metrics:
        log.metrics(metrics, step)
    if rank == 0 and (last or (cfg.train.sample_every and step % cfg.train.sample_every == 0)):
        log.preview(st, step)
    report_step(
        metrics or {"step": step},
        want_ckpt,
        rank,
        lambda tmp: save_checkpoint(
            tmp,
            st.raw,
            ema_unet=st.ema,
            optimizer=st.opt,
            step=step,
            config=cfg.model_dump(mode="json"),
            vocab=vocab,
        ),
    )


def report_step(metrics: dict, want_ckpt: bool, rank: int, save: Any) -> None:
    """Every rank reports; with a checkpoint due, rank 0 writes it with ``save(tmp_dir)``."""
    import tempfile

    import ray.train

    if not want_ckpt:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save(tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def judge_rates(images: list[Any], ids: list[int], vocab: Any) -> dict[str, float]:
    """The phantom judge's plausible rate (``metrics.plausibility_table``) overall and per class
    code, as ``judge_plausible`` and ``judge_plausible_<code>``, over the classes the judge
    knows (phantom data); {} when it knows none of them."""
    import numpy as np

    from pathloop.metrics import plausibility_table, plausible_by_evaluator

    p = plausible_by_evaluator("judge", images, ids, vocab) if images else np.zeros(0)
    if np.isnan(p).all():
        return {}
    table = plausibility_table(p, ids, vocab)
    per_class = {c: row["rate"] for c, row in table["per_class"].items() if row["n"]}
    return {
        "judge_plausible": table["overall"]["rate"],
        **{f"judge_plausible_{c}": rate for c, rate in per_class.items()},
    }


def say(line: str) -> None:
    """One progress line from a Train worker to the driver's console, once.

    Train V2 patches ``print`` to log the line and, as a Ray worker's ``sys.stdout`` is wrapped,
    also to print it, so the driver showed every line twice. The process's own stdout is what
    Ray forwards, and writing there passes the line once, with no runtime env for the workers.
    """
    print(line, file=sys.__stdout__, flush=True)


class _RankZeroLog:
    """Metrics and preview grids to MLflow and stdout, from rank 0 only."""

    def __init__(self, cfg: PretrainConfig, mlflow_info: dict | None, rank: int, vocab) -> None:
        self.cfg, self.info, self.rank, self.vocab = cfg, mlflow_info, rank, vocab

    def metrics(self, m: dict, step: int) -> None:
        from pathloop import tracking

        say(
            f"[{self.cfg.name}] step {step}/{self.cfg.train.steps} loss {m['loss']:.4f} "
            f"{m['images_per_s']:.1f} img/s data-wait {m['data_wait_frac']:.1%}"
        )
        if self.info:
            tracking.log_metrics(
                self.info["uri"],
                self.info["run_id"],
                {k: v for k, v in m.items() if k != "step"},
                step,
            )

    def preview(self, st: StepState, step: int) -> None:
        from pathloop import tracking
        from pathloop.diffusion import ema_copy
        from pathloop.viz import class_samples, samples_grid

        per_class = self.cfg.train.preview_per_class
        images, ids = class_samples(
            ema_copy(st.raw, st.ema), self.cfg.noise, self.vocab, self.cfg.preview, per_class
        )
        out = Path(self.cfg.workdir) / "previews" / f"step_{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        samples_grid(images, self.vocab, per_class).save(out)
        rates = judge_rates(images, ids, self.vocab)
        if rates:
            say(
                f"[{self.cfg.name}] step {step}: the phantom judge passes "
                f"{rates['judge_plausible']:.2f} of {len(images)} preview samples"
            )
        if self.info:
            tracking.log_artifact(self.info["uri"], self.info["run_id"], out, "samples")
            if rates:
                tracking.log_metrics(self.info["uri"], self.info["run_id"], rates, step)

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


def prepare_run(cfg: Any, step: str, tags: dict[str, str]) -> tuple[Any, str, str]:
    """Driver side of any training job: absolute workdir, refuse to clobber a run unless resuming,
    save the resolved config, create (or, on resume, reopen) the MLflow run.

    Returns (cfg with absolute workdir, tracking URI, run id).
    """
    from pathloop import storage

    workdir = Path(cfg.workdir).resolve()
    cfg = cfg.model_copy(update={"workdir": str(workdir)})
    run_dir, state_file = storage.join(ray_storage(cfg), cfg.name), workdir / "run.json"
    if storage.is_dir(run_dir) and not cfg.resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume (resume=true) to continue it, "
            "or choose another workdir/name"
        )
    prev = json.loads(state_file.read_text()) if (cfg.resume and state_file.exists()) else {}
    cfg, uri, run_id = start_tracked_run(cfg, step, tags, prev.get("run_id"))
    state_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return cfg, uri, run_id


def start_tracked_run(
    cfg: Any, step: str, tags: dict[str, str], run_id: str | None = None
) -> tuple[Any, str, str]:
    """The workdir made absolute and created, the resolved config saved there as config.yaml,
    and an MLflow run (a new one, or ``run_id`` reopened). Returns (cfg, tracking URI, run id)."""
    from pathloop import tracking
    from pathloop.config import dump_config

    workdir = Path(cfg.workdir).resolve()
    cfg = cfg.model_copy(update={"workdir": str(workdir)})
    workdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir / "config.yaml")
    uri = tracking.resolve_uri(cfg.tracking, workdir)
    run_id = run_id or tracking.start_run(
        cfg.tracking,
        workdir,
        params=cfg.model_dump(mode="json"),
        tags={"pathloop.step": step, **tags},
        run_name=cfg.tracking.run_name or cfg.name,
    )
    return cfg, uri, run_id


def ray_storage(cfg: Any) -> str:
    """Ray Train's storage for a job: ``train.storage`` (path or URI), else <workdir>/ray."""
    from pathloop import storage

    return storage.absolute(cfg.train.storage or Path(cfg.workdir) / "ray")


def local_checkpoint(ckpt: Any, workdir: str | Path) -> Path:
    """A Ray ``Checkpoint`` as a local directory: its own path on local disk, else a download
    to <workdir>/final_checkpoint (logging and registering the model need local files)."""
    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem):
        return Path(ckpt.path)
    return Path(ckpt.to_directory(str(Path(workdir) / "final_checkpoint")))


def fit(loop: Any, cfg: Any, loop_config: dict, datasets: dict | None = None) -> Path:
    """Run ``loop`` on a TorchTrainer with the job's scaling, failure and checkpoint settings.

    Resume needs nothing here: Train V2 restores a run's checkpoint manager from its storage
    (same name and storage_path), so ``get_checkpoint()`` in the loop returns the newest one.
    ``prepare_run`` refuses to reuse a run dir unless ``resume`` is set. Returns the final
    checkpoint as a local directory."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pathloop import storage

    fs, path = storage.resolve(ray_storage(cfg))
    ray.init(ignore_reinit_error=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    return local_checkpoint(trainer.fit().checkpoint, cfg.workdir)


def finish_run(cfg: Any, uri: str, run_id: str, ckpt_dir: Path, extra: dict) -> dict[str, Any]:
    """Log and register the final checkpoint from the driver; write result.json."""
    from pathloop import tracking

    model_uri = tracking.log_checkpoint_model(uri, run_id, ckpt_dir, cfg.tracking.register_as)
    tracking.end_run(uri, run_id)
    out = {
        "run_id": run_id,
        "tracking_uri": uri,
        "model_uri": model_uri,
        "checkpoint": str(ckpt_dir),
        "step": json.loads((ckpt_dir / "state.json").read_text())["step"],
        **extra,
    }
    (Path(cfg.workdir) / "result.json").write_text(json.dumps(out, indent=2))
    return out


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Driver: arithmetic, MLflow run, TorchTrainer.fit(), model logging and registration."""
    from rich import print as rprint

    from pathloop import storage
    from pathloop.data import read_manifest, read_shards, read_vocab

    # Workers do not share the driver's cwd: every path crosses as an absolute one (or a URI).
    shards = storage.absolute(cfg.data.shards)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": shards})})
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
    ds = read_shards(
        shards,
        split=cfg.data.split,
        classes=cfg.data.classes,
        augment=cfg.data.augment,
        cache=cfg.data.cache,
    )
    ckpt_dir = fit(
        pretrain_loop,
        cfg,
        {
            "cfg": cfg.model_dump(mode="json"),
            "vocab": vocab.model_dump(mode="json"),
            "mlflow": {"uri": uri, "run_id": run_id},
        },
        datasets={"train": ds},
    )
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


# ---- finetuning with feedback: reward-weighted (Eq. 3) and preference (Diffusion-DPO) ----


class FinetuneConfig(Frozen):
    """Step 3 of Sun et al. 2023 (method=reward) or MAGIC's preference route (method=dpo)."""

    workdir: str = Field("runs/finetune", description="Checkpoints, Ray results, result.json.")
    name: str = Field("finetune", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    method: Literal["reward", "dpo"] = Field("reward", description="Eq. 3 or Diffusion-DPO.")
    pretrained: str = Field("runs/pretrain/result.json", description="Model to start from.")
    synthetic: str = Field(
        "runs/samples",
        description=(
            "Synthetic images: a shard set or a feedback.parquet (dpo needs its fail_* columns "
            "unless a reward model scores them)."
        ),
    )
    reward_model: str | None = Field(None, description="Reward model ref (path or MLflow URI).")
    real: str | None = Field(None, description="Real shard set for the beta_r term.")
    real_split: str | None = Field("train", description="Split of the real shards.")
    beta_r: float = Field(1.0, ge=0, description="Weight of the plain loss on real images.")
    reward_mode: Literal["raw", "threshold", "class_norm", "none"] = Field(
        "raw",
        description=(
            "raw r; threshold: 1[r >= reward_threshold]; class_norm: r / mean_class(r); "
            "none: weights 0, the control arm (only the beta_r real term trains, so what the "
            "feedback adds is the difference to a run with it)."
        ),
    )
    reward_threshold: float = Field(0.5, ge=0, le=1, description="For reward_mode=threshold.")
    dpo_beta: float = Field(
        100.0, gt=0, description="Diffusion-DPO beta (errors are per-pixel MSE)."
    )
    dpo_bar: float = Field(1.0, ge=0, le=1, description="MAGIC's bar on checklist scores.")
    feedback_round: str | None = Field(None, description="Lineage: the feedback round id.")
    feedback_fraction: float | None = Field(None, description="Lineage: fraction of feedback used.")
    p_uncond: float = Field(0.1, ge=0, le=1, description="Class dropout kept during finetuning.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Set from `pretrained`.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Set from `pretrained`.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=500, sample_every=0))
    preview: SamplerConfig = Field(default_factory=lambda: SamplerConfig(steps=25))
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-finetune")
    )


def shape_rewards(r: Any, class_ids: Any, mode: str, threshold: float) -> Any:
    """Turn cached rewards (N,) into finetuning weights (N,) per ``reward_mode``."""
    import numpy as np

    r = np.asarray(r, dtype=np.float64)
    if mode == "none":  # the no-feedback control: the synthetic term weighs nothing
        return np.zeros_like(r)
    if mode == "threshold":
        return (r >= threshold).astype(np.float64)
    if mode == "class_norm":  # every class keeps the same total weight, whatever its reward level
        out = r.copy()
        for c in np.unique(class_ids):
            m = class_ids == c
            out[m] = r[m] / max(r[m].mean(), 1e-6)
        return out
    return r


def _finetune_batch(cfg: FinetuneConfig, step: int, n_syn: int, n_real: int, shape, rank, world):
    """This rank's slice of the step's global draw: synthetic/real indices, noise, t, dropout."""
    import torch

    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    b = cfg.train.batch_size
    pick = torch.randint(0, n_syn, (b,), generator=g)  # (B,) synthetic rows (or pairs)
    pick_real = torch.randint(0, max(n_real, 1), (b,), generator=g)  # (B,)
    k = 2 if cfg.method == "dpo" else 1  # a pair needs noise for both images
    noise = torch.randn((b, k, *shape), generator=g)  # (B, k, C, H, W)
    noise_real = torch.randn((b, *shape), generator=g)  # (B, C, H, W)
    t = torch.randint(0, cfg.noise.num_train_timesteps, (b, 2), generator=g)  # (B, 2)
    drop = torch.rand(b, generator=g) < cfg.p_uncond
    drop_real = torch.rand(b, generator=g) < cfg.p_uncond
    sl = slice(rank * (b // world), (rank + 1) * (b // world))
    return pick[sl], pick_real[sl], noise[sl], noise_real[sl], t[sl], drop[sl], drop_real[sl]


def _to_x(images: Any, idx: Any) -> Any:
    """uint8 (N, H, W, 3) rows → float (b, C, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1


def finetune_loss(cfg, st, ref, data, step: int, rank: int, world: int):
    """Eq. 3 (reward) or the preference loss (dpo) for this rank's slice, plus beta_r * real."""
    import torch

    from pathloop.diffusion import null_class
    from pathloop.losses import diffusion_loss, preference_loss, reward_weighted_loss

    syn, cls, w = data["images"], data["class_ids"], data["weights"]
    n_syn = len(data["pairs"]) if cfg.method == "dpo" else len(syn)
    shape = (3, syn.shape[1], syn.shape[2])
    pick, pick_real, noise, noise_real, t, drop, drop_real = _finetune_batch(
        cfg, step, n_syn, len(data["real_images"]), shape, rank, world
    )
    null, dev = null_class(st.raw), st.device
    noise, noise_real = noise.to(dev), noise_real.to(dev)  # drawn on the CPU for every rank alike

    def err(model, idx, k):  # per-sample denoising error of image set idx with noise k: (b,)
        y = torch.where(drop, null, torch.from_numpy(cls[idx.numpy()]))
        x0 = _to_x(syn, idx).to(dev)
        return diffusion_loss(model, st.scheduler, x0, y, noise=noise[:, k], timesteps=t[:, k])

    if cfg.method == "reward":
        l_syn = err(st.model, pick, 0)  # (b,)
        r = torch.from_numpy(w[pick.numpy()]).float()  # (b,) cached, shaped rewards
    else:
        p = torch.from_numpy(data["pairs"][pick.numpy()])  # (b, 4): a, b, sign a, sign b
        ea, eb = err(st.model, p[:, 0], 0), err(st.model, p[:, 1], 1)
        with torch.no_grad():
            ra, rb = err(ref, p[:, 0], 0), err(ref, p[:, 1], 1)
        l_pref = preference_loss(ea, eb, ra, rb, p[:, 2], p[:, 3], cfg.dpo_beta).mean()
    l_real = None
    if cfg.beta_r > 0 and len(data["real_images"]):
        # Class dropout on the real term too: without it the null class (CFG's unconditional
        # branch) learns only from reward-weighted synthetic rows and goes stale while the
        # conditional branch moves, and guidance then extrapolates the mismatch.
        y = torch.where(
            drop_real, null, torch.from_numpy(data["real_class_ids"][pick_real.numpy()])
        )
        l_real = diffusion_loss(
            st.model,
            st.scheduler,
            _to_x(data["real_images"], pick_real).to(dev),
            y,
            noise=noise_real,
            timesteps=t[:, 0],
        )  # (b,)
    if cfg.method == "reward":
        return reward_weighted_loss(l_syn, r, l_real, cfg.beta_r)  # Eq. 3, Sun et al. 2023
    return l_pref + (cfg.beta_r * l_real.mean() if l_real is not None else 0.0)


def finetune_loop(config: dict) -> None:
    """Ray Train worker loop for finetuning. Data are small (a review round and the real train
    split), so each worker holds them in memory; rows are drawn per step from the seeded global
    draw and sliced by rank, as in pretraining."""
    import copy

    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    cfg = FinetuneConfig.model_validate(config["cfg"])
    from pathloop.diffusion import load_checkpoint

    vocab, rank, world, device = worker_context(cfg, config)
    start = load_checkpoint(config["pretrained_dir"])  # EMA weights of the pretrained model
    ref = copy.deepcopy(start.unet).eval().requires_grad_(False) if cfg.method == "dpo" else None
    ref = ref.to(device) if ref is not None else None  # the frozen reference beside the model
    st = build_state(
        cfg, len(vocab), device, wrap=ray.train.torch.prepare_model, init_unet=start.unet
    )
    step = _maybe_restore(st, ray.train.get_checkpoint())
    data = dict(np.load(config["data_file"], allow_pickle=False))
    log = _RankZeroLog(cfg, config.get("mlflow"), rank, vocab)

    def loss_fn(s: int) -> tuple[Any, dict]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=st.autocast):
            return finetune_loss(cfg, st, ref, data, s, rank, world), {}

    step_until_done(cfg, st, step, loss_fn, (rank, vocab, log))


def worker_context(cfg: Any, config: dict) -> tuple[Any, int, int, Any]:
    """First lines of a Ray Train worker loop: (vocabulary from ``config["vocab"]``, rank, world
    size, device); sets torch's thread count from the job's scaling."""
    import ray.train
    import ray.train.torch
    import torch

    from pathloop.vocab import Vocabulary

    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.torch_threads or cfg.scaling.cpus_per_worker)
    return (
        Vocabulary.model_validate(config["vocab"]),
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),
    )


def step_until_done(cfg: Any, st: StepState, step: int, loss_fn: Any, where: tuple) -> None:
    """Optimizer steps on ``loss_fn(step) -> (loss, extra metrics)`` from ``step`` up to
    ``cfg.train.steps`` (data held in memory), with windowed metrics, fault injection, reports
    and checkpoints; ``where`` is (rank, vocab, _RankZeroLog)."""
    rank, vocab, log = where
    parts: list[dict] = []
    t0 = time.perf_counter()
    while step < cfg.train.steps:
        loss, extra = loss_fn(step)
        parts.append({"loss": optimizer_step(st, loss, cfg.optim.grad_clip), **extra})
        step += 1
        _maybe_inject_failure(cfg, step)
        metrics = None
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            dt = time.perf_counter() - t0
            metrics = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
            metrics.update(
                step=step,
                data_wait_frac=0.0,
                images_per_s=cfg.train.batch_size * len(parts) / max(dt, 1e-9),
            )
            parts, t0 = [], time.perf_counter()
        _report(cfg, st, step, metrics, rank, vocab, log)


def _finetune_data(cfg: FinetuneConfig, vocab, out: Path) -> dict[str, Any]:
    """Load the synthetic set, compute rewards (cached) or pairs, load real rows; save as .npz."""
    import numpy as np

    from pathloop.data import load_arrays, load_image_table
    from pathloop.feedback import preference_pairs

    images, class_ids, cols = load_image_table(cfg.synthetic)
    scores = None
    if cfg.reward_model:
        scores = _cached_rewards(cfg, images, class_ids, out.parent / "rewards.npz")
    else:
        fails = [k for k in cols if k.startswith("fail_")]
        if not fails:
            raise ValueError(
                f"{cfg.synthetic} has no fail_* checklist columns and no "
                "reward_model is set; pass a feedback export or a reward model"
            )
        scores = 1.0 - np.mean([cols[k].astype(float) for k in fails], axis=0)  # (N,)
    weights = shape_rewards(scores, class_ids, cfg.reward_mode, cfg.reward_threshold)
    pairs = (
        preference_pairs(scores, class_ids, cfg.dpo_bar, cfg.train.seed)
        if cfg.method == "dpo"
        else np.zeros((0, 4), np.int64)
    )
    if cfg.method == "dpo" and len(pairs) == 0:
        raise ValueError("no preference pairs: each class needs at least 2 synthetic images")
    real_x, real_y = (
        load_arrays(cfg.real, split=cfg.real_split)
        if cfg.real
        else (np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64))
    )
    np.savez(
        out,
        images=images,
        class_ids=class_ids,
        weights=weights.astype(np.float32),
        pairs=pairs,
        real_images=real_x,
        real_class_ids=real_y,
    )
    return {
        "synthetic_images": len(images),
        "pairs": len(pairs),
        "real_images": len(real_x),
        "mean_weight": float(np.mean(weights)),
        "mean_score": float(np.mean(scores)),
    }


def _cached_rewards(cfg: FinetuneConfig, images, class_ids, cache: Path):
    """Reward of every synthetic image, computed once per (reward model, synthetic set)."""
    import numpy as np

    from pathloop import storage

    key = f"{cfg.reward_model}|{storage.absolute(cfg.synthetic)}|{len(images)}"
    if cache.exists():
        z = np.load(cache)
        if str(z["key"]) == key:
            return z["rewards"]
    from pathloop.reward import load_reward_model

    rewards = np.asarray(load_reward_model(cfg.reward_model).score(images, class_ids))
    np.savez(cache, key=np.array(key), rewards=rewards)
    return rewards


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Driver: resolve the pretrained model, cache rewards or build pairs, fit, register."""
    from rich import print as rprint

    from pathloop.diffusion import load_checkpoint
    from pathloop.sampling import resolve_model_ref

    if cfg.method == "reward" and not cfg.reward_model:
        raise ValueError(
            "method=reward needs reward_model=<path or MLflow URI> (Eq. 3 weights "
            "each synthetic image by its reward); or use method=dpo with a "
            "feedback export"
        )
    if cfg.method == "reward" and cfg.reward_mode == "none" and (cfg.beta_r == 0 or not cfg.real):
        raise ValueError(
            "reward_mode=none weighs the synthetic images 0, so only the beta_r term on real "
            "images trains: set beta_r > 0 and real=<shard set>, or pick another reward_mode"
        )
    ckpt_dir, pre_uri = resolve_model_ref(cfg.pretrained, cfg.tracking)
    start = load_checkpoint(ckpt_dir)
    abs_ = {
        k: str(Path(v).resolve())
        for k in ("synthetic", "real")
        if (v := getattr(cfg, k)) and "://" not in v
    }
    cfg = cfg.model_copy(
        update={
            **abs_,
            "model": ModelConfig.model_validate(start.config["model"]),
            "noise": start.noise or cfg.noise,
        }
    )
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must divide by "
            f"scaling.num_workers={cfg.scaling.num_workers}"
        )
    tags = {
        "pathloop.pretrained": pre_uri,
        "pathloop.reward_model": str(cfg.reward_model),
        "pathloop.feedback_round": str(cfg.feedback_round),
        "pathloop.method": cfg.method,
        "pathloop.feedback_fraction": str(cfg.feedback_fraction),
    }
    cfg, uri, run_id = prepare_run(cfg, "finetune", tags)
    data_file = Path(cfg.workdir) / "finetune_data.npz"
    stats = _finetune_data(cfg, start.vocab, data_file)
    rprint({"config": cfg.model_dump(mode="json"), "data": stats})
    ckpt = fit(
        finetune_loop,
        cfg,
        {
            "cfg": cfg.model_dump(mode="json"),
            "vocab": start.vocab.model_dump(mode="json"),
            "pretrained_dir": str(Path(ckpt_dir).resolve()),
            "data_file": str(data_file),
            "mlflow": {"uri": uri, "run_id": run_id},
        },
    )
    return finish_run(cfg, uri, run_id, ckpt, {"data": stats, "lineage": tags})


# ---- reward model (Eq. 2) ----
# Step 2 of Sun et al. 2023: a reward model learns the experts' plausible/implausible feedback.
# Models, the Eq. 2 step and the metrics live in pathloop.reward (imported lazily: it imports
# torch); this section holds the job configs, the Ray worker loop and the drivers.


class RewardConfig(Frozen):
    """Step 2 of Sun et al. 2023: the reward model Γφ(x, c) learns expert feedback (Eq. 2)."""

    workdir: str = Field("runs/reward", description="Checkpoints, Ray results, result.json.")
    name: str = Field("reward", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    feedback: str = Field(
        "runs/feedback/feedback.parquet",
        description="export_round's feedback.parquet, or the folder holding it.",
    )
    real_shards: str = Field(
        "runs/demo/phantoms",
        description=(
            "Real shard set: the λr term and, when backbone is None, the backbone's training data."
        ),
    )
    real_split: str = Field("train", description="Split of real_shards used.")
    backbone: str | None = Field(
        None,
        description=(
            "Trained backbone (dir, result.json or MLflow URI); None = train one on real_shards."
        ),
    )
    backbone_arch: str = Field(
        "tiny",
        description=("When backbone is None: preset (tiny, paper) or timm model name to train."),
    )
    backbone_steps: int = Field(300, gt=0, description="When backbone is None: its train steps.")
    finetune_backbone: bool = Field(
        False,
        description=("Train the backbone with the head; false = frozen, embeddings computed once."),
    )
    hidden: int = Field(256, gt=0, description="Width of the head's MLP.")
    lambda_r: float = Field(1.0, ge=0, description="Weight of the real-image term of Eq. 2.")
    holdout_frac: float = Field(
        0.2,
        ge=0,
        lt=1,
        description=("Feedback held out for AUC/accuracy/ECE (seeded, stratified by label)."),
    )
    fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description=(
            "Fraction of the non-held-out feedback used (the paper's 0/10/50/100 % ablation); "
            "0 = real-image term only. The held-out set does not change with it."
        ),
    )
    steps: int = Field(500, gt=0, description="Optimizer steps.")
    batch_size: int = Field(
        32,
        gt=0,
        description=(
            "Global batch of feedback rows (plus as many real rows); must divide by num_workers."
        ),
    )
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    augment: bool = Field(
        True,
        description=("Random flips/90° turns; frozen backbone: 8 cached embeddings per image."),
    )
    seed: int = Field(0, description="Seed of the holdout split, fraction, init and draws.")
    log_every: int = Field(25, gt=0, description="Steps between loss reports.")
    checkpoint_every: int = Field(
        250,
        gt=0,
        description=("Steps between checkpoints; each one also measures the held-out metrics."),
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray keeps on storage.")
    storage: str | None = Field(
        None, description="Ray Train storage (path or pyarrow.fs URI); None = <workdir>/ray."
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-reward")
    )

    @property
    def train(self) -> TrainConfig:
        """The step/checkpoint settings as the ``TrainConfig`` that the shared ``fit`` reads."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            seed=self.seed,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints,
            storage=self.storage,
            sample_every=0,
        )


def reward_loop(config: dict) -> None:
    """Ray Train worker loop for the reward model. A feedback round is small (hundreds to a few
    thousand images), so each worker loads the driver's .npz into memory instead of streaming
    it through Ray Data; rows come from the seeded global draw, sliced by rank."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = RewardConfig.model_validate(config["cfg"])
    from pathloop.reward import RewardData, RewardFit, RewardModel, load_backbone
    from pathloop.vocab import Vocabulary

    vocab = Vocabulary.model_validate(config["vocab"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads or cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # the same head init on every rank
    model = RewardModel(load_backbone(config["backbone_dir"]), vocab, hidden=cfg.hidden)
    fitter = RewardFit(
        model,
        RewardData.load(config["data_file"]),
        lr=cfg.lr,
        lambda_r=cfg.lambda_r,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        finetune_backbone=cfg.finetune_backbone,
        augment=cfg.augment,
        weight_decay=cfg.weight_decay,
        device=ray.train.torch.get_device(),
        wrap=ray.train.torch.prepare_model,
    )
    step = _restore_reward(fitter, ray.train.get_checkpoint())
    mlflow_info = config.get("mlflow") if rank == 0 else None

    losses: list[float] = []
    while step < cfg.steps:
        losses.append(fitter.step(step, rank, world))
        step += 1
        metrics = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = {"loss": sum(losses) / len(losses), "step": step}
            losses = []
        _report_reward(cfg, fitter, step, metrics, rank, mlflow_info)


def _restore_reward(fitter: Any, checkpoint: Any) -> int:
    """Load head, backbone and optimizer from a Ray checkpoint; return its step (0 if none)."""
    if checkpoint is None:
        return 0
    import torch

    from pathloop.reward import load_reward_model

    with checkpoint.as_directory() as d:
        saved = load_reward_model(d)
        fitter.model.head.load_state_dict(saved.head.state_dict())
        fitter.model.backbone.load_state_dict(saved.backbone.state_dict())
        if (Path(d) / "optimizer.pt").exists():
            fitter.opt.load_state_dict(torch.load(Path(d) / "optimizer.pt", map_location="cpu"))
        return int(json.loads((Path(d) / "state.json").read_text())["step"])


def _report_reward(
    cfg: RewardConfig,
    fitter: Any,
    step: int,
    metrics: dict | None,
    rank: int,
    mlflow_info: dict | None,
) -> None:
    """Report every log step; at checkpoints rank 0 also measures the held-out feedback and
    writes the reward model dir. All ranks call ``ray.train.report`` together."""

    from pathloop import tracking
    from pathloop.reward import save_reward_model

    want_ckpt = step % cfg.checkpoint_every == 0 or step >= cfg.steps
    if metrics is None and not want_ckpt:
        return
    metrics = dict(metrics or {"step": step})
    if rank == 0 and want_ckpt:
        metrics.update(fitter.evaluate())  # held-out AUC, accuracy at 0.5, ECE
    if rank == 0:
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step")
        say(f"[{cfg.name}] step {step}/{cfg.steps} {shown}")
    if mlflow_info:
        tracking.log_metrics(
            mlflow_info["uri"],
            mlflow_info["run_id"],
            {k: v for k, v in metrics.items() if k != "step"},
            step,
        )
    report_step(
        metrics,
        want_ckpt,
        rank,
        lambda tmp: save_reward_model(
            tmp,
            fitter.model,
            step=step,
            config=cfg.model_dump(mode="json"),
            metrics=metrics,
            optimizer=fitter.opt,
        ),
    )


def _reward_arithmetic(cfg: RewardConfig, data: Any, n_feedback: int) -> dict[str, Any]:
    """State the numbers before the loop and check that they divide."""
    w = cfg.scaling.num_workers
    if cfg.batch_size % w:
        raise ValueError(
            f"batch_size={cfg.batch_size} must divide by scaling.num_workers={w}; "
            f"use e.g. batch_size={cfg.batch_size // w * w or w}"
        )
    n_syn = len(data.syn_x)
    return {
        "feedback_rows": n_feedback,
        "held_out": len(data.test_x),
        "feedback_used": n_syn,
        "fraction": cfg.fraction,
        "real_images": len(data.real_x),
        "workers": w,
        "global_batch": f"{cfg.batch_size} feedback + {cfg.batch_size} real",
        "per_worker_batch": cfg.batch_size // w,
        "steps": cfg.steps,
        "epochs_over_feedback": round(cfg.steps * cfg.batch_size / n_syn, 2) if n_syn else 0,
    }


def _reward_backbone(cfg: RewardConfig, uri: str, run_id: str) -> str:
    """The backbone dir: resolve ``cfg.backbone``, or train one on the real shards (logged as
    this run's ``backbone`` artifact; reused when resuming)."""
    from pathloop import tracking
    from pathloop.reward import BackboneConfig, train_backbone
    from pathloop.sampling import resolve_model_ref

    if cfg.backbone:
        return str(resolve_model_ref(cfg.backbone, cfg.tracking)[0].resolve())
    out = Path(cfg.workdir) / "backbone"
    if cfg.resume and (out / "config.json").exists():
        return str(out)
    bcfg = BackboneConfig(name=cfg.backbone_arch, steps=cfg.backbone_steps, seed=cfg.seed)
    m = train_backbone(cfg.real_shards, out, bcfg, split=cfg.real_split)
    tracking.log_metrics(uri, run_id, {f"backbone_{k}": v for k, v in m.items() if k != "path"}, 0)
    tracking.log_artifact(uri, run_id, out, "backbone")
    return str(out)


def run_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Driver: load and split the feedback, get a backbone, fit Γφ on Ray Train, log the
    held-out metrics, register the model; result.json has its URI, AUC, accuracy and ECE."""
    from rich import print as rprint

    from pathloop.data import load_arrays, read_vocab
    from pathloop.reward import load_feedback, split_feedback

    # Workers do not share the driver's cwd: every local path crosses as an absolute one.
    local = {
        k: str(Path(v).resolve())
        for k in ("feedback", "real_shards", "backbone")
        if (v := getattr(cfg, k)) and ":/" not in v
    }
    cfg = cfg.model_copy(update=local)
    vocab = read_vocab(cfg.real_shards)
    images, class_ids, targets, fb_vocab = load_feedback(cfg.feedback)
    if fb_vocab is not None and fb_vocab.names != vocab.names:
        raise ValueError(
            f"feedback classes {fb_vocab.names} differ from {cfg.real_shards}'s "
            f"{vocab.names}; pair a feedback round with the shards it came from"
        )
    real = load_arrays(cfg.real_shards, cfg.real_split)
    if len(real[0]) and real[0].shape[1:] != images.shape[1:]:
        raise ValueError(
            f"feedback images are {images.shape[1:3]} px but real images "
            f"{real[0].shape[1:3]} px; use real shards of the sampled size"
        )
    data = split_feedback(
        images, class_ids, targets, real, cfg.holdout_frac, cfg.fraction, cfg.seed
    )
    arith = _reward_arithmetic(cfg, data, len(images))
    tags = {
        "pathloop.feedback": cfg.feedback,
        "pathloop.real_shards": cfg.real_shards,
        "pathloop.feedback_fraction": str(cfg.fraction),
    }
    cfg, uri, run_id = prepare_run(cfg, "reward", tags)
    backbone_dir = _reward_backbone(cfg, uri, run_id)
    data_file = Path(cfg.workdir) / "reward_data.npz"
    data.save(data_file)
    rprint({"config": cfg.model_dump(mode="json"), "arithmetic": arith})
    ckpt = fit(
        reward_loop,
        cfg,
        {
            "cfg": cfg.model_dump(mode="json"),
            "vocab": vocab.model_dump(mode="json"),
            "backbone_dir": backbone_dir,
            "data_file": str(data_file),
            "mlflow": {"uri": uri, "run_id": run_id},
        },
    )
    metrics = json.loads((ckpt / "config.json").read_text())["metrics"]
    keys = ("auc", "auc_lo", "auc_hi", "accuracy", "ece")
    held_out = {k: metrics[k] for k in keys if k in metrics}
    return finish_run(
        cfg, uri, run_id, ckpt, {**held_out, "backbone": backbone_dir, "arithmetic": arith}
    )


class ClassifierJobConfig(Frozen):
    """What the jobs that train one timm classifier in the driver process share."""

    workdir: str = Field("runs/classifier", description="The model dir, result.json, MLflow db.")
    name: str = Field("classifier", description="MLflow run name.")
    shards: str = Field("runs/demo/phantoms", description="Real (or phantom) shard set.")
    arch: str = Field("tiny", description="Preset (tiny, paper) or timm model name.")
    in_px: int | None = Field(None, gt=0, description="Side the network sees; None = data's.")
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Images per step.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate.")
    seed: int = Field(0, description="Seed of init, batches and augmentation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def classifier(self) -> Any:
        """The ``reward.BackboneConfig`` these settings describe."""
        from pathloop.reward import BackboneConfig

        return BackboneConfig(
            name=self.arch,
            in_px=self.in_px,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
        )


class BackboneJobConfig(ClassifierJobConfig):
    """The reward model's backbone on its own: a cell-type classifier on real cells."""

    workdir: str = Field("runs/backbone", description="The model dir, result.json, MLflow db.")
    name: str = Field("backbone", description="MLflow run name.")
    split: str = Field("train", description="Split to train on; the test split is measured.")
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-backbone")
    )


def run_classifier_job(cfg: ClassifierJobConfig, step: str, train: Any, tags: dict) -> dict:
    """Driver of a job that trains in this process (no Ray): MLflow run, ``train(cfg, model_dir,
    on_log) -> metrics``, the model dir logged and registered, result.json in the workdir."""
    from pathloop import storage, tracking

    cfg = cfg.model_copy(update={"shards": storage.absolute(cfg.shards)})
    cfg, uri, run_id = start_tracked_run(cfg, step, {"pathloop.shards": cfg.shards, **tags})
    workdir = Path(cfg.workdir)
    model_dir = workdir / "model"
    try:
        metrics = train(
            cfg,
            model_dir,
            lambda s, loss: tracking.log_metrics(uri, run_id, {"loss": loss}, s),
        )
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.log_metrics(uri, run_id, metrics, cfg.steps)
    model_uri = tracking.log_checkpoint_model(uri, run_id, model_dir, cfg.tracking.register_as)
    tracking.end_run(uri, run_id)
    out = {
        "run_id": run_id,
        "tracking_uri": uri,
        "model_uri": model_uri,
        "checkpoint": str(model_dir),
        **metrics,
    }
    (workdir / "result.json").write_text(json.dumps(out, indent=2))
    return out


def run_backbone(cfg: BackboneJobConfig) -> dict[str, Any]:
    """The backbone job without Ray (a small CNN trains in this process); writes result.json.
    The CLI can call this directly."""
    from pathloop.reward import train_backbone

    def train(cfg: BackboneJobConfig, out: Path, on_log: Any) -> dict:
        m = train_backbone(cfg.shards, out, cfg.classifier(), split=cfg.split, on_log=on_log)
        return {k: v for k, v in m.items() if k != "path"}

    return run_classifier_job(cfg, "backbone", train, {})


class GuidanceJobConfig(ClassifierJobConfig):
    """The classifier-guidance baseline (Dhariwal & Nichol 2021), the paper's "automatic
    feedback" row: a noise-aware classifier p(c | x_t, t) on real cells (train split; test-split
    accuracy at t = 0.05 T, 0.25 T, 0.5 T), for ``diffusion.sample(guidance_fn=...)``."""

    workdir: str = Field("runs/guidance", description="The model dir, result.json, MLflow db.")
    name: str = Field("guidance", description="MLflow run name.")
    pretrained: str | None = Field(
        None,
        description="Diffusion model to guide (path, result.json or MLflow URI): the classifier "
        "learns its noise schedule; None = use `noise`.",
    )
    noise: NoiseConfig = Field(
        default_factory=NoiseConfig, description="Noise schedule; replaced by `pretrained`'s."
    )
    classes: list[str] | None = Field(
        None, description="Train on these classes only (logits still cover every class)."
    )
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-guidance")
    )


def run_guidance_classifier(cfg: GuidanceJobConfig) -> dict[str, Any]:
    """Train and register the noise-aware guidance classifier in this process; result.json."""
    from pathloop.reward import train_guidance_classifier
    from pathloop.sampling import resolve_model_ref

    tags = {}
    if cfg.pretrained:
        ckpt_dir, model_uri = resolve_model_ref(cfg.pretrained, cfg.tracking)
        noise = json.loads((Path(ckpt_dir) / "config.json").read_text()).get("noise")
        cfg = cfg.model_copy(update={"noise": NoiseConfig.model_validate(noise or {})})
        tags["pathloop.pretrained"] = model_uri

    def train(cfg: GuidanceJobConfig, out: Path, on_log: Any) -> dict:
        return train_guidance_classifier(
            cfg.shards, cfg.noise, out, cfg.classifier(), classes=cfg.classes
        )[1]

    return run_classifier_job(cfg, "guidance", train, tags)
